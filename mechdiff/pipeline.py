"""The main job: every study for a model group, then ``results.json``, ``report.html`` and a summary.

With no sweep it runs on the embedded pair and its datasets; a sweep file names other groups and
datasets, and its Ray actor pool extracts every study's captures first. The models load once for all
studies. Each study's captures are read from the stores handed in (a sweep's), and what no store holds
is extracted here into ``OUT/store.zarr`` (resumable: a second run reuses finished shards); each study's
results group, summary and figures go under ``OUT/<study>/``, written once, here.
"""

from __future__ import annotations

import json
import math
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import mechdiff
from mechdiff.analyses.common import Finding, ModelGroup, StudyResult, to_jsonable
from mechdiff.analyses.study import STUDY_NAMES, StoreRef, StudyContext, check_study, config_from_options, get_study, run_study

__all__ = ["STUDIES", "StudyInputs", "RunOptions", "RunOutcome", "GroupJob", "embedded_inputs", "embedded_job",
           "study_configs", "run_group", "run_job", "finite_numbers"]

STUDIES: tuple[str, ...] = STUDY_NAMES

# The main job's sample sizes (default, quick), as options of each study's Config.
_SIZES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "knowledge": ({"limit": 48}, {"limit": 12}),
    "truthfulness": ({"n_intervene": 100}, {"n_intervene": 24}),
    "refusal": ({"n_val": 32, "n_eval": 64, "max_new_tokens": 24}, {"n_val": 12, "n_eval": 24, "max_new_tokens": 12}),
    "confidence": ({"limit": 256}, {"limit": 64}),
}


@dataclass(frozen=True)
class StudyInputs:
    """The datasets the four studies read, as files (CSV / JSON / JSONL)."""

    statements: tuple[Path, ...] = ()  # true/false statements, one file per topic
    patching_pairs: Path | None = None  # paired true/false statements of equal token length
    harmful: Path | None = None
    harmless: Path | None = None
    confidence_texts: Path | None = None  # texts whose next-token entropy the confidence study measures
    shots: Path | None = None  # few-shot examples per topic (JSON), if the datasets come with them

    def datasets(self) -> dict[str, Any]:
        """The studies' dataset roles -> files (see each study's ``datasets``)."""
        return {"statements": self.statements or None, "shots": self.shots, "pairs": self.patching_pairs,
                "harmful": self.harmful, "harmless": self.harmless, "texts": self.confidence_texts}

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


@dataclass
class GroupJob:
    """A model group's studies as the main job runs them: the datasets, which studies, each study's Config,
    and the stores that already hold their captures (a sweep's; requirement key -> store group)."""

    group: ModelGroup
    inputs: StudyInputs
    out: Path
    studies: tuple[str, ...]
    configs: dict[str, Any]
    stores: dict[tuple[str, str, str], StoreRef] = field(default_factory=dict)


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


def embedded_job(out: str | Path, studies: Sequence[str] = STUDIES, quick: bool = False) -> GroupJob:
    """The main job without a sweep: the embedded pair and its datasets."""
    return GroupJob(embedded_group(), embedded_inputs(), Path(out), tuple(studies), study_configs(quick))


def run_job(job: GroupJob, opts: RunOptions = RunOptions(), *,
            on_study: Callable[[str, float], None] | None = None) -> RunOutcome:
    """:func:`run_group` for ``job`` (its studies, configs and stores)."""
    from dataclasses import replace

    return run_group(job.group, job.inputs, job.out, replace(opts, studies=job.studies), configs=job.configs,
                     stores=job.stores, on_study=on_study)


def study_configs(quick: bool = False, options: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """Each study's Config for the main job: its sample sizes (``quick``: the smaller ones) under ``options``
    (study -> option -> value, e.g. a sweep file's study blocks), checked against the study's Config."""
    options = dict(options or {})
    if "phrases" not in options.get("refusal", {}):
        options["refusal"] = {**options.get("refusal", {}), "phrases": refusal_phrases()}
    return {name: config_from_options(get_study(name), {**_SIZES[name][1 if quick else 0], **options.get(name, {})})
            for name in STUDY_NAMES}


def refusal_phrases() -> tuple[str, ...]:
    """The refusal study's default phrases: the embedded pair's own (its phrases and their markers) plus the
    common ones, so a completion of either kind counts."""
    from mechdiff.analyses.refusal import default_refusal_phrases
    from mechdiff.zoo import REFUSAL_MARKERS, REFUSAL_PHRASES

    return default_refusal_phrases((*REFUSAL_PHRASES, *REFUSAL_MARKERS))


def run_group(
    group: ModelGroup,
    inputs: StudyInputs,
    out: str | Path,
    opts: RunOptions = RunOptions(),
    *,
    configs: Mapping[str, Any] | None = None,
    stores: Mapping[tuple[str, str, str], StoreRef] | None = None,
    on_study: Callable[[str, float], None] | None = None,
) -> RunOutcome:
    """Run ``opts.studies`` for ``group`` into ``out``; write ``results.json`` and ``report.html``.

    ``configs``: study -> Config (default :func:`study_configs` for ``opts.quick``); ``stores``: where
    captures already are (requirement key -> store group, as a sweep's pool wrote them); anything else a
    study needs is extracted here into ``out/store.zarr``."""
    from mechdiff.report.html import write_report

    inputs.check(opts.studies)
    cfg = dict(study_configs(opts.quick)) if configs is None else dict(configs)
    for name in opts.studies:  # every study's settings against the data and the models' configs, before any loads
        check_study(get_study(name), cfg[name], group, inputs.datasets())
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ctx = StudyContext(group, inputs.datasets(), out, device=opts.device, progress=opts.progress,
                       stores=dict(stores or {}))
    models = ctx.all_models()  # once, for every study
    given = set(ctx.stores)
    results: dict[str, StudyResult] = {}
    seconds: dict[str, float] = {}
    for name in opts.studies:
        t = time.perf_counter()
        results[name] = run_study(get_study(name), cfg[name], ctx, store=str(out / "store.zarr"))
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
        # every store group each study read, and which of them this run extracted itself
        "stores_read": {n: to_jsonable(r.summary.get("stores_read", [])) for n, r in results.items()},
        "extracted_here": [{"model": k[0], "dataset": k[1], "capture": k[2], "url": v.url, "group": v.group}
                           for k, v in ctx.stores.items() if k not in given],
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
