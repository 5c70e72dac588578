"""From a sweep file to the main job's work: extract on Ray, then one study run per model group."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from mechdiff.analyses.common import ModelGroup
from mechdiff.cluster.sweep import Sweep, SweepError, load_sweep
from mechdiff.pipeline import StudyInputs

__all__ = ["sweep_jobs", "group_inputs"]


def group_inputs(sweep: Sweep, group: str) -> StudyInputs:
    """The datasets each configured study reads for ``group`` (refusal names its two via harmful / harmless)."""
    paths = {name: Path(d.path) for name, d in sweep.datasets.items()}

    def first(study: str) -> Path | None:
        s = sweep.studies.get(study)
        return paths[s.datasets[0]] if s and group in s.groups and s.datasets else None

    truth = sweep.studies.get("truthfulness")
    refusal = sweep.studies.get("refusal")
    harmful = harmless = None
    if refusal and group in refusal.groups:
        try:
            harmful, harmless = paths[refusal.options["harmful"]], paths[refusal.options["harmless"]]
        except KeyError as e:
            raise SweepError(f"{sweep.file}: studies.refusal needs harmful: and harmless: dataset names ({e} missing)") from None
    return StudyInputs(
        statements=tuple(paths[d] for d in truth.datasets) if truth and group in truth.groups else (),
        patching_pairs=first("knowledge"),
        harmful=harmful,
        harmless=harmless,
        confidence_texts=first("confidence"),
    )


def sweep_jobs(
    sweep_file: str | Path, out_dir: str | Path, *, address: str | None = None, studies: Sequence[str] = ()
) -> list[tuple[ModelGroup, StudyInputs, Path]]:
    """Validate the sweep, run its extraction (Ray; ``address`` for a cluster), and return one
    (group, inputs, output directory) per model group, for the studies the sweep configures."""
    from mechdiff.cluster.runner import run_sweep

    sweep = load_sweep(sweep_file)
    jobs = []
    for name, specs in sweep.groups.items():
        group = ModelGroup(name, specs[0].path, tuple(m.path for m in specs[1:]), tuple(m.label for m in specs))
        inputs = group_inputs(sweep, name)
        wanted = [s for s in (studies or sweep.studies) if s in sweep.studies and name in sweep.studies[s].groups]
        inputs.check(wanted)
        jobs.append((group, inputs, Path(out_dir) / name))
    run_sweep(sweep, address=address)
    return jobs
