"""The main job: every study for a model group, then ``results.json``, ``report.html`` and a summary.

With no sweep it runs on the embedded pair and its datasets; a sweep file names other groups and
datasets (and a Ray cluster extracts for it first). Each study extracts what it needs into
``OUT/store.zarr`` (resumable: a second run reuses finished shards) and writes its results group,
summary and figures under ``OUT/<study>/``.
"""

from __future__ import annotations

import json
import math
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import mechdiff
from mechdiff.analyses.common import Finding, ModelGroup, StudyResult, to_jsonable

__all__ = ["STUDIES", "StudyInputs", "RunOptions", "RunOutcome", "embedded_inputs", "run_group", "finite_numbers"]

STUDIES: tuple[str, ...] = ("knowledge", "truthfulness", "refusal", "confidence")


@dataclass(frozen=True)
class StudyInputs:
    """The datasets the four studies read, as files (CSV / JSON / JSONL)."""

    statements: tuple[Path, ...] = ()  # true/false statements, one file per topic
    patching_pairs: Path | None = None  # paired true/false statements of equal token length
    harmful: Path | None = None
    harmless: Path | None = None
    confidence_texts: Path | None = None  # texts whose next-token entropy the confidence study measures
    shots: Path | None = None  # few-shot examples per topic (JSON), if the datasets come with them

    def files(self, study: str) -> tuple[Path | None, ...]:
        return {
            "truthfulness": self.statements or (None,),
            "knowledge": (self.patching_pairs,),
            "refusal": (self.harmful, self.harmless),
            "confidence": (self.confidence_texts,),
        }[study]

    def check(self, studies: Sequence[str] = STUDIES) -> None:
        """Every file the given studies read exists, before any model loads."""
        for study in studies:
            for p in self.files(study):
                if p is None:
                    raise ValueError(f"study {study}: no dataset given")
                if not Path(p).is_file():
                    raise FileNotFoundError(f"study {study}: dataset {p} does not exist")


@dataclass(frozen=True)
class RunOptions:
    studies: tuple[str, ...] = STUDIES
    quick: bool = False  # smaller samples everywhere: for tests and smoke runs
    device: str = "cpu"
    progress: bool = True

    def __post_init__(self) -> None:
        bad = [s for s in self.studies if s not in STUDIES]
        if bad:
            raise ValueError(f"unknown studies {bad}: choose from {', '.join(STUDIES)}")


@dataclass
class RunOutcome:
    out: Path
    results: dict[str, StudyResult]
    results_json: Path
    report: Path
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def findings(self) -> list[Finding]:
        return [f for s in STUDIES if s in self.results for f in self.results[s].findings]


def embedded_group() -> ModelGroup:
    from mechdiff.zoo.paths import zoo_path

    return ModelGroup("embedded", str(zoo_path("base")), (str(zoo_path("post")),), ("base", "post"))


def embedded_inputs() -> StudyInputs:
    from mechdiff.zoo.paths import zoo_path

    d = zoo_path("data")
    topics = ("cities", "neg_cities", "translations", "neg_translations", "larger_than", "smaller_than")
    return StudyInputs(
        statements=tuple(d / f"truth_{t}.csv" for t in topics if (d / f"truth_{t}.csv").is_file()),
        patching_pairs=d / "patching.csv",
        harmful=d / "instructions_harmful.csv",
        harmless=d / "instructions_harmless.csv",
        confidence_texts=d / "facts.csv",
        shots=d / "shots.json" if (d / "shots.json").is_file() else None,
    )


def _runners(group: ModelGroup, inputs: StudyInputs, out: Path, store: str, opts: RunOptions, models) -> dict[str, Callable[[], StudyResult]]:
    """One closure per study, with the sizes the default job and the quick job use."""
    from mechdiff.analyses.confidence import run_confidence
    from mechdiff.analyses.knowledge import run_knowledge
    from mechdiff.analyses.refusal import run_refusal
    from mechdiff.analyses.truthfulness import TruthSettings, run_truthfulness

    q = opts.quick
    return {
        "knowledge": lambda: run_knowledge(
            group, inputs.patching_pairs, out, limit=12 if q else 48, device=opts.device, models=models,
            attribution=True, cross=True,
        ),
        "truthfulness": lambda: run_truthfulness(
            group, list(inputs.statements), out, store=store, shots=inputs.shots, device=opts.device,
            settings=TruthSettings(n_intervene=24 if q else 100),
            progress=opts.progress,
        ),
        "refusal": lambda: run_refusal(
            group, inputs.harmful, inputs.harmless, out, store=store, device=opts.device, lms=models,
            n_val=12 if q else 32, n_eval=24 if q else 64, max_new_tokens=12 if q else 24, progress=opts.progress,
        ),
        "confidence": lambda: run_confidence(
            group, inputs.confidence_texts, out, limit=64 if q else 256, device=opts.device, models=models,
        ),
    }


def run_group(
    group: ModelGroup,
    inputs: StudyInputs,
    out: str | Path,
    opts: RunOptions = RunOptions(),
    *,
    on_study: Callable[[str, float], None] | None = None,
) -> RunOutcome:
    """Run ``opts.studies`` for ``group`` into ``out``; write ``results.json`` and ``report.html``."""
    from mechdiff.engine.models import load_model
    from mechdiff.report.html import write_report

    inputs.check(opts.studies)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    store = str(out / "store.zarr")
    models = {label: load_model(path, device=opts.device) for label, path in group.models.items()}
    runners = _runners(group, inputs, out, store, opts, models)
    results: dict[str, StudyResult] = {}
    seconds: dict[str, float] = {}
    for name in opts.studies:
        t = time.perf_counter()
        res = runners[name]()
        res.save(out)
        results[name] = res
        seconds[name] = time.perf_counter() - t
        if on_study is not None:
            on_study(name, seconds[name])
    prov = provenance(group, inputs, models)
    payload = {
        "mechdiff_version": mechdiff.__version__,
        "group": {"name": group.name, "models": group.models},
        "seconds": seconds,
        "findings": [to_jsonable(f) for n in STUDIES if n in results for f in results[n].findings],
        "studies": {n: {"summary": to_jsonable(r.summary), "findings": [to_jsonable(f) for f in r.findings]} for n, r in results.items()},
        "provenance": to_jsonable(prov),
    }
    results_json = out / "results.json"
    results_json.write_text(json.dumps(payload, indent=2))
    report = write_report(out / "report.html", results, title=f"mechdiff: {group.name}", provenance=prov)
    return RunOutcome(out, results, results_json, report, seconds)


def provenance(group: ModelGroup, inputs: StudyInputs, models: dict[str, Any]) -> dict[str, Any]:
    import numpy
    import torch
    import transformers
    import xarray
    import zarr

    from mechdiff.engine.data import load_prompts

    def data_hash(p: Path) -> str:
        try:
            return load_prompts(p).hash[:16]
        except Exception:  # a file no prompt loader reads (e.g. JSON shots): hash its bytes
            import hashlib

            return hashlib.sha256(Path(p).read_bytes()).hexdigest()[:16]

    files = [p for s in STUDIES for p in inputs.files(s) if p is not None]
    return {
        "models": {
            label: f"{lm.model_id} | weights {lm.weights_hash[:23]} | revision {lm.revision or '-'} | {lm.adapter.arch}, "
                   f"{lm.adapter.n_layers} layers, d_model {lm.adapter.d_model}"
            for label, lm in models.items()
        },
        "datasets": {Path(p).name: f"{p} | sha256 {data_hash(p)}" for p in dict.fromkeys(files)},
        "versions": {
            "mechdiff": mechdiff.__version__, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "zarr": zarr.__version__, "xarray": xarray.__version__,
            "numpy": numpy.__version__,
        },
    }


def finite_numbers(x: Any, path: str = "") -> list[str]:
    """Paths of every number in a JSON-like value that is not finite (None counts: JSON's stand-in for NaN)."""
    bad: list[str] = []
    if isinstance(x, dict):
        for k, v in x.items():
            bad += finite_numbers(v, f"{path}.{k}")
    elif isinstance(x, list):
        for i, v in enumerate(x):
            bad += finite_numbers(v, f"{path}[{i}]")
    elif isinstance(x, float) and not math.isfinite(x):
        bad.append(path)
    return bad
