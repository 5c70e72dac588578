"""From a sweep file to the studies' work: what each study reads, planned into the sweep's extraction.

For every model group and every study the sweep configures for it, the study's ``Config`` is built from the
sweep's study block (checked there, with its line) and the study names the store groups it reads
(:meth:`Study.requirements`). Each requirement becomes an extraction target of the sweep, in
``<output>/<study>.zarr`` group ``<model group>/<label>/<capture name>``, so that the actor pool extracts it
with everything else; a study that pins ``capture:`` reads that capture's store instead, and a pinned capture
that does not hold what the study needs is an error naming the difference. After the extraction each group's
studies get the stores as a map from requirement to store group: they extract nothing themselves.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from mechdiff.analyses.common import ModelGroup
from mechdiff.analyses.study import CaptureRequirement, StoreRef, check_study, get_study
from mechdiff.cluster.sweep import CaptureEntry, DatasetSpec, Sweep, SweepError, Target, _config_n_layers, load_sweep
from mechdiff.engine.data import PromptSet
from mechdiff.pipeline import GroupJob, StudyInputs

__all__ = ["GroupJob", "StudyTarget", "group_of", "group_inputs", "group_configs", "study_targets", "study_extraction",
           "sweep_jobs"]


@dataclass(frozen=True)
class StudyTarget:
    """A study's requirement as one of the sweep's extraction targets (or, when ``pinned``, a sweep capture's
    existing target that holds it)."""

    group: str  # the model group whose study reads it
    requirement: CaptureRequirement
    target: Target
    prompts: PromptSet = field(compare=False, repr=False)
    pinned: bool = False
    shared: bool = False  # the same capture as an earlier requirement's (same model files, spec, rows): read, not extracted

    @property
    def extracts(self) -> bool:
        return not (self.pinned or self.shared)


def group_of(sweep: Sweep, name: str) -> ModelGroup:
    specs = sweep.groups[name]
    return ModelGroup(name, specs[0].path, tuple(m.path for m in specs[1:]), tuple(m.label for m in specs))


def group_inputs(sweep: Sweep, group: str) -> StudyInputs:
    """The datasets each configured study reads for ``group`` (refusal names its two via harmful / harmless).
    A study reads its files whole (its own options subsample them), so a dataset it reads may not set
    ``limit`` or ``text_column``: that would be dropped without a word."""
    paths = {name: Path(d.path) for name, d in sweep.datasets.items()}
    for name, entry in sweep.studies.items():
        if group not in entry.groups:
            continue
        for d in (*entry.datasets, *(entry.options[k] for k in ("harmful", "harmless") if k in entry.options)):
            spec = sweep.datasets[d]
            if spec.limit is not None or spec.text_column is not None:
                raise SweepError(f"{sweep.file}:{spec.line}: datasets.{d}: study {name} reads the file whole; drop "
                                 f"limit/text_column there (the study's own options choose its rows)")

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


def group_configs(sweep: Sweep, group: str, quick: bool = False) -> dict[str, Any]:
    """Each study's Config for ``group``: the main job's sizes under the sweep's study options."""
    from mechdiff.pipeline import study_configs

    return study_configs(quick, {name: s.study_options for name, s in sweep.studies.items() if group in s.groups})


def _pinned_target(sweep: Sweep, st_name: str, req: CaptureRequirement, prompts: PromptSet, group: str) -> Target:
    """The target of the capture a study pinned, when it holds ``req``; else a SweepError naming the difference."""
    entry = sweep.studies[st_name]
    cap = sweep.captures[entry.capture]
    where = f"{sweep.file}:{entry.line}: studies.{st_name}.capture {cap.name}" if entry.line else f"{sweep.file}: studies.{st_name}"
    model = next(m for m in sweep.groups[group] if m.label == req.model)
    problems = [f"{d.field} {'are' if d.field in ('sites', 'layers') else 'is'} {d.have!r}, the study needs {d.want!r}"
                for d in cap.spec.lacks(req.spec, _config_n_layers(model.path))]
    for t in sweep.targets():
        if t.model == model and t.capture.name == cap.name and sweep.datasets[t.dataset.name].load().hash == prompts.hash:
            break
    else:
        problems.append(f"no dataset of it has the study's {req.dataset} rows as the study reads them "
                        f"({len(prompts)} prompts from {prompts.source})")
        t = None
    if problems:
        raise SweepError(f"{where} does not hold what {req.describe()}: " + "; ".join(problems)
                         + "; remove capture: to let the sweep plan the study's own capture")
    return t


def study_targets(sweep: Sweep, *, quick: bool = False, studies: Sequence[str] | None = None) -> list[StudyTarget]:
    """Every requirement of every study the sweep configures (``studies``: only these), as extraction targets."""
    out: list[StudyTarget] = []
    seen: set[tuple[str, str]] = set()
    planned: dict[tuple, Target] = {}  # (model files, spec, rows) -> the target that extracts it
    for gname, specs in sweep.groups.items():
        if not any(gname in e.groups and (studies is None or n in studies) for n, e in sweep.studies.items()):
            continue  # no study runs on this group (e.g. an extraction-only sweep of a base model)
        group = group_of(sweep, gname)
        datasets = group_inputs(sweep, gname).datasets()
        configs = group_configs(sweep, gname, quick)
        # layer counts of local models (hub ids are not asked for theirs, as elsewhere in planning)
        layers = {m.label: n for m in specs if (n := _config_n_layers(m.path)) is not None}
        for st_name, entry in sweep.studies.items():
            if gname not in entry.groups or (studies is not None and st_name not in studies):
                continue
            study = get_study(st_name)
            if any(datasets.get(role) is None for role in study.datasets if role != "shots"):
                continue  # the study has no data for this group: it is not run for it
            try:  # before any extraction: a setting the data or a model's config refutes
                check_study(study, configs[st_name], group, datasets, layers)
            except ValueError as e:
                raise SweepError(f"{sweep.file}: studies.{st_name} (model group {gname}): {e}") from None
            for req in study.requirements(configs[st_name], group, datasets):
                if entry.capture is not None:
                    t = _pinned_target(sweep, st_name, req, req.prompts, gname)
                    out.append(StudyTarget(gname, req, t, req.prompts, pinned=True))
                    continue
                model = next(m for m in specs if m.label == req.model)
                ident = (model.path, model.revision, model.dtype, req.spec, req.prompts.hash)
                if ident in planned:
                    out.append(StudyTarget(gname, req, planned[ident], req.prompts, shared=True))
                    continue
                ds = DatasetSpec(f"{st_name}.{req.dataset}.{req.prompts.hash[:12]}", req.prompts.source)
                cap = CaptureEntry(f"{st_name}.{req.name}", req.spec, (ds.name,), (gname,))
                url = f"{sweep.output.rstrip('/')}/{st_name}.zarr"
                t = Target(model, ds, cap, url, f"{gname}/{req.model}/{req.name}")
                if (t.url, t.group) in seen:
                    raise SweepError(f"{sweep.file}: study {st_name} asks for store group {t.group} twice")
                seen.add((t.url, t.group))
                planned[ident] = t
                out.append(StudyTarget(gname, req, t, req.prompts))
    return out


def study_extraction(sweep: Sweep, *, quick: bool = False, studies: Sequence[str] | None = None) -> list[tuple[Target, PromptSet]]:
    """The studies' own targets with their prompts, as :func:`~mechdiff.cluster.runner.run_sweep` extracts them."""
    return [(st.target, st.prompts) for st in study_targets(sweep, quick=quick, studies=studies) if st.extracts]


def sweep_jobs(
    sweep_file: str | Path, out_dir: str | Path, *, address: str | None = None, studies: Sequence[str] = (),
    quick: bool = False, progress: bool = True,
) -> list[GroupJob]:
    """Validate the sweep, run its extraction with every study's captures (Ray; ``address`` for a cluster), and
    return one :class:`GroupJob` per model group: its datasets, configs and the stores the pool wrote."""
    from mechdiff.cluster.runner import run_sweep

    sweep = load_sweep(sweep_file)
    wanted = tuple(studies) if studies else tuple(sweep.studies)
    targets = study_targets(sweep, quick=quick, studies=wanted)
    jobs = []
    for name in sweep.groups:
        inputs = group_inputs(sweep, name)
        here = tuple(s for s in wanted if s in sweep.studies and name in sweep.studies[s].groups
                     and all(p is not None for p in inputs.files(s)))
        inputs.check(here)
        stores = {st.requirement.key: StoreRef(st.target.url, st.target.group, sweep.storage_options)
                  for st in targets if st.group == name}
        jobs.append(GroupJob(group_of(sweep, name), inputs, Path(out_dir) / name, here,
                             group_configs(sweep, name, quick), stores))
    run_sweep(sweep, address=address, extra=[(st.target, st.prompts) for st in targets if st.extracts],
              progress=progress)
    return jobs
