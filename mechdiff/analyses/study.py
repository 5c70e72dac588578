"""The shape every study has, and the one registry of them.

A study is a :class:`Study`: a name, a typed ``Config`` dataclass holding every option and verdict threshold,
the datasets it reads (by role: ``statements``, ``harmful``...), ``requirements(config, group)`` naming the store
groups it reads (model label, dataset role, capture spec), and ``run(ctx, config) -> StudyResult``. The caller
(the main job, a sweep, a notebook) makes a :class:`StudyContext`, sees that every requirement has a store
(extracting what is missing, through the actor pool on a cluster), runs the study and writes its result once.
A study never extracts: it opens the stores the context hands it, through :meth:`StudyContext.store`, which
checks each against the requirement before any work and records what was read.
"""

from __future__ import annotations

import dataclasses
import importlib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, Sequence

from mechdiff.analyses.common import ModelGroup, StoreRequirementError, StudyResult
from mechdiff.engine.capture import CaptureDifference, CaptureSpec, ResolvedCapture, capture_of
from mechdiff.errors import MechdiffError

__all__ = [
    "STUDY_NAMES",
    "CaptureRequirement",
    "StoreRef",
    "StoreRead",
    "StudyContext",
    "Study",
    "StudyConfigError",
    "get_study",
    "studies",
    "config_from_options",
    "check_study",
    "layer_counts",
    "check_store_covers",
    "provide_captures",
    "run_study",
    "run_on",
]

#: Every study, in the order the main job runs them.
STUDY_NAMES: tuple[str, ...] = ("knowledge", "truthfulness", "refusal", "confidence")


class StudyConfigError(MechdiffError, ValueError):
    """A study option that the study's ``Config`` does not have, or a value of the wrong type."""


@dataclass(frozen=True)
class CaptureRequirement:
    """One store group a study reads: model ``model``'s capture ``spec`` of the study's dataset ``dataset``.

    ``name`` is the group's name in a store the caller creates for it (``<model>/<name>``), e.g. ``truth``."""

    study: str
    model: str  # the group's label: base, post...
    dataset: str  # the study's dataset role: statements, harmful, harmless...
    spec: CaptureSpec
    name: str
    prompts: Any = field(default=None, compare=False, repr=False)
    variant: str = ""  # which of the study's captures of this model and dataset (e.g. refusal's template)  # the PromptSet to capture (rows as the study reads them)

    @property
    def key(self) -> tuple[str, str, str]:
        """What the context files a store under: (model label, dataset role, capture name)."""
        return (self.model, self.dataset, self.name)

    def describe(self) -> str:
        return f"{self.study}: {self.model}'s {self.dataset} with {self.spec.describe()}"


@dataclass(frozen=True)
class StoreRef:
    """Where a capture lives: a store URL and the group inside it."""

    url: str
    group: str
    storage_options: dict | None = None

    def open(self):
        from mechdiff.engine.store import open_store

        return open_store(self.url, self.group, self.storage_options)


@dataclass(frozen=True)
class StoreRead:
    """A store group a study read, for ``results.json``."""

    study: str
    model: str
    dataset: str
    url: str
    group: str


def check_store_covers(ds, req: CaptureRequirement, n_layers: int | None = None) -> None:
    """Raise :class:`StoreRequirementError` unless the opened store ``ds`` holds ``req``: every site, every layer
    (``all`` means the model's), the same positions and template. The message names the missing piece."""
    where = f"store {ds.attrs.get('store_url', '?')} group {ds.attrs.get('group', '?')}"
    have = capture_of(ds.attrs)
    if have is None:  # a store written without a capture record: what its arrays hold is all there is to go by
        layers = sorted({int(x) for x in ds["layer"].values}) if "layer" in ds.coords else []
        have = ResolvedCapture(tuple(str(v) for v in ds.data_vars), tuple(layers), req.spec.positions,
                               req.spec.template, "float32", None, n_layers)
    elif n_layers is not None and have.n_layers is None:
        have = ResolvedCapture(have.sites, have.layers, have.positions, have.template, have.dtype, have.compression, n_layers)
    lacking = have.lacks(req.spec.resolve(n_layers) if n_layers is not None else req.spec)
    missing_vars = [s for s in req.spec.sites if s not in ds.data_vars]
    if missing_vars and not any(d.field == "sites" for d in lacking):
        lacking.insert(0, CaptureDifference("sites", [str(v) for v in ds.data_vars], list(req.spec.sites)))
    if lacking:
        parts = "; ".join(_lack(d) for d in lacking)
        raise StoreRequirementError(f"{req.study}: {where} {parts}; it needs {req.describe()}")


def _lack(d) -> str:
    """One missing piece in words: the sites or layers not captured, or the positions / template it was made with."""
    if d.field in ("sites", "layers"):
        miss = [x for x in d.want if x not in d.have]
        return f"lacks {d.field} {', '.join(map(str, miss))} (it holds {', '.join(map(str, d.have)) or 'none'})"
    return f"was captured with {d.field} {d.have!r}, {d.want!r} needed"


@dataclass
class StudyContext:
    """What a study runs with: the model group, its datasets (role -> file), the loaded models, the stores that
    hold its requirements, the output folder, and the device. Models load once, on first use, and are shared by
    every study run with this context."""

    group: ModelGroup
    datasets: Mapping[str, Any]  # role -> file path (or a PromptSet / list of texts)
    out: Path
    device: str = "cpu"
    model_dtype: str = "auto"  # bfloat16 on a GPU, float32 on the CPU
    progress: bool = False
    stores: dict[tuple[str, str, str], StoreRef] = field(default_factory=dict)
    models: dict[str, Any] = field(default_factory=dict)
    reads: list[StoreRead] = field(default_factory=list)
    load_options: dict[str, Any] = field(default_factory=dict)  # e.g. allow_pickle, trust_remote_code
    planned: dict[str, list[CaptureRequirement]] = field(default_factory=dict)  # study -> its requirements
    # where the study's dask graphs run: a dask scheduler name ("threads", "synchronous") or a get function
    # (e.g. Ray's ray_dask_get); None keeps the caller's dask configuration
    scheduler: Any = None

    def requirements(self, study: "StudyDef", config: Any) -> list[CaptureRequirement]:
        """``study``'s requirements under ``config`` here, computed once (the runner's, reused by the run)."""
        if study.name not in self.planned:
            self.planned[study.name] = study.requirements(config, self.group, self.datasets)
        return self.planned[study.name]

    def model(self, label: str):
        """The loaded model ``label`` of the group (loaded on first use, then kept)."""
        if label not in self.models:
            from mechdiff.engine.models import load_model

            path = self.group.models[label]
            # a local directory by its absolute path, so "pair/base" and "/abs/pair/base" resume the same store group
            path = str(Path(path).resolve()) if Path(path).is_dir() else path
            self.models[label] = load_model(path, dtype=self.model_dtype, device=self.device, **self.load_options)
        return self.models[label]

    def all_models(self) -> dict[str, Any]:
        return {label: self.model(label) for label in self.group.labels}

    def dataset(self, role: str, study: str) -> Any:
        if role not in self.datasets or self.datasets[role] is None:
            raise StoreRequirementError(f"{study}: no {role} dataset given")
        return self.datasets[role]

    def store(self, req: CaptureRequirement):
        """The opened store group that holds ``req``, checked against it; the read is recorded."""
        ref = self.stores.get(req.key)
        if ref is None:
            raise StoreRequirementError(f"{req.study}: no store holds {req.describe()}")
        ds = ref.open()
        n_layers = self.models[req.model].adapter.n_layers if req.model in self.models else _stored_n_layers(ds)
        check_store_covers(ds, req, n_layers)
        self.reads.append(StoreRead(req.study, req.model, req.dataset, ref.url, ref.group))
        return ds


def _stored_n_layers(ds) -> int | None:
    """The capturing model's layer count, from the store's provenance (``architecture``)."""
    import ast

    arch = ds.attrs.get("architecture")
    if isinstance(arch, str):
        try:
            arch = ast.literal_eval(arch)
        except (ValueError, SyntaxError):
            return None
    n = arch.get("n_layers") if isinstance(arch, Mapping) else None
    return int(n) if n is not None else None


class Study(Protocol):
    """A study: see the module docstring."""

    name: str
    Config: type
    datasets: tuple[str, ...]

    def requirements(self, config: Any, group: ModelGroup) -> list[CaptureRequirement]: ...

    def run(self, ctx: StudyContext, config: Any) -> StudyResult: ...


@dataclass(frozen=True)
class StudyDef:
    """A study as its module declares it (the concrete :class:`Study`)."""

    name: str
    Config: type
    datasets: tuple[str, ...]
    requirements: Callable[[Any, ModelGroup], list[CaptureRequirement]]
    run: Callable[[StudyContext, Any], StudyResult]
    describe: str = ""
    # what the Config cannot check alone, as it needs the datasets or the models' layer counts (never their
    # weights): check(config, group, datasets, layers) raises on bad input; see check_study
    check: Callable[[Any, ModelGroup, Mapping[str, Any], Mapping[str, int]], None] | None = None


class _LayerCounts(Mapping):
    """Each model's layer count by label, read from its config (no weights) when first asked for: a check that
    needs none reads no config (a GGUF file's takes seconds to parse)."""

    def __init__(self, group: ModelGroup, trust_remote_code: bool):
        self.paths, self.trust_remote_code, self.known = dict(group.models), trust_remote_code, {}

    def __getitem__(self, label: str) -> int:
        if label not in self.known:
            from mechdiff.engine.precheck import config_n_layers, read_config

            path = self.paths[label]
            self.known[label] = config_n_layers(read_config(path, trust_remote_code=self.trust_remote_code), path)
        return self.known[label]

    def __iter__(self):
        return iter(self.paths)

    def __len__(self) -> int:
        return len(self.paths)


def layer_counts(group: ModelGroup, *, trust_remote_code: bool = False) -> Mapping[str, int]:
    """Each model's layer count, by label, from its config alone (no weights; each read when first needed)."""
    return _LayerCounts(group, trust_remote_code)


def check_study(study: StudyDef, config: Any, group: ModelGroup, datasets: Mapping[str, Any],
                layers: Mapping[str, int] | None = None) -> None:
    """Refuse ``config`` for ``group`` and ``datasets`` before any model loads or store is written (the CLI, the
    main job and a sweep's plan call it): the study's own :attr:`StudyDef.check`. ``layers``: the models' layer
    counts by label where the caller knows them (a model left out is not checked); default
    :func:`layer_counts`."""
    if not isinstance(config, study.Config):
        raise StudyConfigError(f"study {study.name} takes a {study.Config.__name__}, not {type(config).__name__}")
    if study.check is not None:
        study.check(config, group, datasets, layer_counts(group) if layers is None else layers)


def get_study(name: str) -> StudyDef:
    """The study called ``name`` (its module is imported on first use)."""
    if name not in STUDY_NAMES:
        raise StudyConfigError(f"unknown study {name!r}: choose from {', '.join(STUDY_NAMES)}")
    return importlib.import_module(f"mechdiff.analyses.{name}").study


def studies(names: Sequence[str] = STUDY_NAMES) -> list[StudyDef]:
    return [get_study(n) for n in names]


def config_from_options(study: StudyDef, options: Mapping[str, Any], *, where: str = "",
                        base: Any = None) -> Any:
    """``study.Config`` from a mapping of option names to values (a sweep file's study block, CLI flags): an
    unknown name or a value of the wrong type is a :class:`StudyConfigError` naming it (and ``where``, e.g. the
    file and line). Lists become tuples where the field is a tuple. ``base``: the config to start from."""
    cfg_type = study.Config
    fields = {f.name: f for f in dataclasses.fields(cfg_type)}
    hints = typing.get_type_hints(cfg_type)
    at = f"{where}: " if where else ""
    unknown = [k for k in options if k not in fields]
    if unknown:
        raise StudyConfigError(f"{at}study {study.name} has no option {unknown[0]!r}; its options are "
                               f"{', '.join(sorted(fields))}")
    values = {}
    for k, v in options.items():
        values[k] = _coerce(v, hints[k], f"{at}study {study.name} option {k}")
    try:
        return dataclasses.replace(base, **values) if base is not None else cfg_type(**values)
    except (TypeError, ValueError) as e:
        raise StudyConfigError(f"{at}study {study.name}: {e}") from None


def _coerce(v: Any, hint: Any, what: str) -> Any:
    """``v`` as type ``hint`` where it is a plain conversion (list -> tuple, int -> float); else a clear error."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if v is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(v, a, what)
            except StudyConfigError as e:
                errors.append(str(e))
        raise StudyConfigError(f"{what}: {v!r} is not {_type_name(hint)}")
    if origin is dict:
        if not isinstance(v, Mapping):
            raise StudyConfigError(f"{what}: {v!r} is not a mapping")
        kt, vt = args if args else (Any, Any)
        return {_coerce(k, kt, what): _coerce(x, vt, f"{what}.{k}") for k, x in v.items()}
    if origin is tuple:
        if not isinstance(v, (list, tuple)):
            raise StudyConfigError(f"{what}: {v!r} is not a list")
        inner = args[0] if args else Any
        return tuple(_coerce(x, inner, what) for x in v)
    if origin is typing.Literal:
        if v not in args:
            raise StudyConfigError(f"{what}: {v!r} is not one of {', '.join(map(repr, args))}")
        return v
    if hint is Any:
        return v
    if hint is bool:
        if not isinstance(v, bool):
            raise StudyConfigError(f"{what}: {v!r} is not true/false")
        return v
    if hint is int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise StudyConfigError(f"{what}: {v!r} is not a whole number")
        return v
    if hint is float:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise StudyConfigError(f"{what}: {v!r} is not a number")
        return float(v)
    if hint is str:
        if not isinstance(v, str):
            raise StudyConfigError(f"{what}: {v!r} is not a string")
        return v
    if dataclasses.is_dataclass(hint) and isinstance(v, Mapping):
        sub = {f.name for f in dataclasses.fields(hint)}
        bad = [k for k in v if k not in sub]
        if bad:
            raise StudyConfigError(f"{what}: no field {bad[0]!r} (fields: {', '.join(sorted(sub))})")
        h = typing.get_type_hints(hint)
        return hint(**{k: _coerce(x, h[k], f"{what}.{k}") for k, x in v.items()})
    if isinstance(hint, type) and not isinstance(v, hint):
        raise StudyConfigError(f"{what}: {v!r} is not {_type_name(hint)}")
    return v


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _identity(ctx: StudyContext, r: CaptureRequirement) -> tuple:
    """What makes two requirements one capture: the same model files, capture spec and rows (e.g. a model
    compared with itself, as a control, under one template)."""
    path = ctx.group.models[r.model]
    path = str(Path(path).resolve()) if Path(path).is_dir() else path
    return (path, r.spec, r.prompts.hash if r.prompts is not None else None)


def provide_captures(ctx: StudyContext, reqs: Sequence[CaptureRequirement], store: str, *, shard_size: int = 256,
                     token_budget: int | None = None) -> list[Any]:
    """Extract, in this process, every requirement that ``ctx.stores`` has no store for, into ``store``
    (group ``<model>/<name>``; resumable), and file it in ``ctx.stores``; a requirement that is the same capture
    as one already filed (same model files, spec and rows) shares its store. Returns the extraction reports.
    A sweep provides its stores through the actor pool instead, and this then finds nothing missing."""
    from mechdiff.engine.extract import extract

    reports = []
    have = {_identity(ctx, r): ctx.stores[r.key] for r in reqs if r.key in ctx.stores}
    for r in reqs:
        if r.key in ctx.stores:
            continue
        ident = _identity(ctx, r)
        if ident in have:
            ctx.stores[r.key] = have[ident]
            continue
        if r.prompts is None:
            raise StoreRequirementError(f"no store holds {r.describe()}, and no prompts were given to extract it from")
        rep = extract(ctx.model(r.model), r.prompts, r.spec, store, f"{r.model}/{r.name}", shard_size=shard_size,
                      token_budget=token_budget, progress=ctx.progress)
        ctx.stores[r.key] = have[ident] = StoreRef(rep.url, rep.group)
        reports.append(rep)
    return reports


def run_study(study: StudyDef, config: Any, ctx: StudyContext, *, store: str | None = None, shard_size: int = 256,
              token_budget: int | None = None, save: bool = True) -> StudyResult:
    """``study`` with ``config`` in ``ctx``: its missing captures extracted into ``store`` (default
    ``ctx.out/store.zarr``), then run; the store groups it read go into its summary (``stores_read``), and what
    was extracted for it (``extracted``); with ``save``, its results are written under ``ctx.out/<study>/``."""
    if not isinstance(config, study.Config):
        raise StudyConfigError(f"study {study.name} takes a {study.Config.__name__}, not {type(config).__name__}")
    ctx.planned.pop(study.name, None)  # this config's, not a previous run's
    reqs = ctx.requirements(study, config)
    reports = provide_captures(ctx, reqs, store or str(Path(ctx.out) / "store.zarr"), shard_size=shard_size,
                               token_budget=token_budget)
    first = len(ctx.reads)
    if ctx.scheduler is None:
        result = study.run(ctx, config)
    else:
        import dask

        with dask.config.set(scheduler=ctx.scheduler):
            result = study.run(ctx, config)
    result.summary["stores_read"] = [dataclasses.asdict(r) for r in ctx.reads[first:]]
    # what this run extracted itself for the study (nothing where a sweep's pool provided the stores)
    result.summary["extracted"] = [
        {"url": r.url, "group": r.group, "shards_written": r.shards_written, "shards_skipped": r.shards_skipped,
         "tokens": r.tokens, "seconds": round(r.seconds, 3)} for r in reports]
    if save:
        result.save(ctx.out)
    return result


def run_on(study: StudyDef, group: ModelGroup, out: str | Path, config: Any = None, *, device: str = "cpu",
           model_dtype: str = "auto", models: Mapping[str, Any] | None = None,
           stores: Mapping[tuple[str, str, str], StoreRef] | None = None, store: str | None = None,
           progress: bool = False, **datasets: Any) -> StudyResult:
    """``study`` on ``group`` on its own (a notebook's call): ``datasets`` by role (see ``study.datasets``),
    ``config`` (default ``study.Config()``), already-loaded ``models`` and existing ``stores`` used as they
    are; what no store holds is extracted into ``store`` (default ``out/store.zarr``). Writes the results under
    ``out/<study>/`` and returns them."""
    unknown = [k for k in datasets if k not in study.datasets]
    if unknown:
        raise StudyConfigError(f"study {study.name} reads no dataset {unknown[0]!r}; its datasets are "
                               f"{', '.join(study.datasets)}")
    ctx = StudyContext(group, datasets, Path(out), device=device, model_dtype=model_dtype, progress=progress,
                       stores=dict(stores or {}), models=dict(models or {}))
    return run_study(study, config if config is not None else study.Config(), ctx, store=store)
