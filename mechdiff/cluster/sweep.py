"""Sweep files: model groups x datasets x capture specs (x studies), planned into work units.

A sweep file is YAML::

    name: llama31-8b-post-training
    output: s3://bucket/mechdiff/llama31      # store root; one Zarr store per capture: <output>/<capture>.zarr
    storage_options: {endpoint_url: ...}      # fsspec options for s3:// / gs:// outputs (optional)
    shard_size: 256                           # examples per shard = per work unit (optional)
    token_budget: 16384                       # padded tokens per batch (optional; default: per device type)
    models:
      llama31-8b:                             # a model group: a base and its post-trained versions
        base: meta-llama/Llama-3.1-8B
        post:
          instruct: meta-llama/Llama-3.1-8B-Instruct
          tulu-sft: {path: allenai/Llama-3.1-Tulu-3-8B-SFT, revision: main}
        dtype: bfloat16
    datasets:
      cities: data/cities.csv                 # or {path: ..., text_column: ..., limit: ...}
    captures:                                 # optional when studies are given
      resid:
        sites: [resid_post]
        layers: all
        positions: last
        datasets: [cities]                    # optional: default every dataset
    studies:                                  # each study's options are its Config's fields
      truthfulness: {datasets: [cities], n_intervene: 50}   # its own capture is planned: resid_post, last:2
      confidence: {datasets: [cities]}                      # or pin one: capture: NAME (it must hold the study's)
    resources:                                # per model replica (= per actor); a model group (or one
      num_cpus: 1                             #   model given as {path: ..., resources: {...}}) may carry its
      num_gpus: 1                             #   own block, whose keys override these: 0 on CPU clusters;
      torch_threads: 1                        #   >1 loads with device_map="auto" (layers spread over them)
      tensor_parallel: 1                      # the replica's layout: GPUs = tensor_parallel x pipeline_parallel
      pipeline_parallel: 1                    #   when num_gpus is not given
      dtype: bfloat16                         # the model dtype where its group names none
      unit_tokens: 1000000                    # real tokens per work unit (whole store shards; default: one
                                              #   shard per unit on CPU replicas, 1M tokens on GPU replicas)
      actors: 8                               # at most this many replicas in all (default: as many as fit)
      max_retries: 2                          # (actors and max_retries: sweep-wide only)

Models with different resources get different actors (one actor set per resource shape); a unit goes only
to an actor of its model's shape, and a model too big for every node of the cluster is refused before
anything runs.

Every problem is reported as ``file:line: key.path: what is wrong`` (line numbers come from the YAML
node marks) before any model loads or any store is touched. Relative paths (datasets, local model
directories, a local output) are resolved against the sweep file's directory.

Planning turns the sweep into targets (model x capture x dataset), each one store group
``<output>/<capture>.zarr`` group ``<model group>/<label>/<dataset>``, split into work units of
``shard_size`` examples that are exactly the store's shards. Each study adds the captures it reads
(``<output>/<study>.zarr``, see :mod:`mechdiff.cluster.study_plan`), so the pool extracts those too.
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import yaml

from mechdiff.analyses.study import STUDY_NAMES, StudyConfigError, config_from_options, get_study
from mechdiff.errors import MechdiffError
from mechdiff.engine.data import DataError, PromptSet, load_prompts
from mechdiff.engine.extract import CaptureSpec

__all__ = [
    "SweepError",
    "StoreReuseError",
    "ModelSpec",
    "DatasetSpec",
    "CaptureEntry",
    "StudyEntry",
    "Resources",
    "Sweep",
    "Target",
    "TargetPlan",
    "SweepPlan",
    "StatusRow",
    "load_sweep",
    "parse_sweep",
    "plan_sweep",
    "sweep_status",
    "STUDIES",
]

#: Studies a sweep may name (the four questions of mechdiff).
STUDIES: tuple[str, ...] = STUDY_NAMES
# Study options that name one of the sweep's datasets (checked like ``datasets``).
_DATASET_OPTIONS: dict[str, tuple[str, ...]] = {"refusal": ("harmful", "harmless")}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_MODEL_DTYPES = ("auto", "float32", "bfloat16", "float16")  # auto: bfloat16 on a GPU replica, float32 on a CPU one


class SweepError(MechdiffError, ValueError):
    """A sweep file that cannot be run; the message names the file, the line and the key."""


# ---------------------------------------------------------------------------------------------
# the parsed sweep


@dataclass(frozen=True)
class ModelSpec:
    """One model of a group, as a replica loads it."""

    group: str
    label: str
    path: str  # local directory (absolute) or hub id
    revision: str | None = None
    dtype: str = "auto"  # bfloat16 on a GPU replica, float32 on a CPU one
    allow_pickle: bool = False
    trust_remote_code: bool = False
    resources: Resources | None = None  # its own replica resources (the sweep's merged in); None: the sweep's

    @property
    def key(self) -> str:
        return f"{self.group}/{self.label}"


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    path: str
    text_column: str | None = None
    limit: int | None = None
    line: int = field(default=0, compare=False)  # where the sweep file names it, for load errors

    def load(self) -> PromptSet:
        return load_prompts(self.path, text_column=self.text_column, limit=self.limit)


@dataclass(frozen=True)
class CaptureEntry:
    """A named capture spec and the datasets / model groups it applies to."""

    name: str
    spec: CaptureSpec
    datasets: tuple[str, ...]
    groups: tuple[str, ...]


@dataclass(frozen=True)
class StudyEntry:
    """A study to run on the sweep's stores. ``options``: everything in its block but capture / datasets /
    models; ``study_options``: those that are fields of the study's Config (checked when the file is read),
    the rest (refusal's harmful / harmless) name datasets."""

    name: str
    capture: str | None
    datasets: tuple[str, ...]
    groups: tuple[str, ...]
    options: dict[str, Any] = field(default_factory=dict)
    study_options: dict[str, Any] = field(default_factory=dict)
    line: int = field(default=0, compare=False)


@dataclass(frozen=True)
class Resources:
    """What one model replica (one actor) reserves, and the pool's limits (``actors``, ``max_retries``: sweep-wide)."""

    num_cpus: float = 1.0
    num_gpus: float | None = None  # None: tensor_parallel x pipeline_parallel if the cluster has GPUs, else 0
    torch_threads: int | None = None  # None: max(1, int(num_cpus))
    actors: int | None = None  # None: as many replicas as the cluster fits
    max_retries: int = 2
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    dtype: str | None = None  # the model dtype where the model group names none
    unit_tokens: int | None = None  # None: one store shard per unit on CPU replicas, DEFAULT_GPU_UNIT_TOKENS on GPU ones

    def threads(self) -> int:
        return self.torch_threads or max(1, int(self.num_cpus))

    def gpus(self, cluster_has_gpus: bool) -> float:
        """GPUs per replica: ``num_gpus``, else the layout's on a cluster with GPUs, else 0."""
        if self.num_gpus is not None:
            return self.num_gpus
        return float(self.tensor_parallel * self.pipeline_parallel) if cluster_has_gpus else 0.0

    def describe(self) -> str:
        """One short line for status tables, e.g. ``4 GPU (tp 4), 8 CPU``."""
        gpus = "auto GPU" if self.num_gpus is None else f"{self.num_gpus:g} GPU"
        layout = [f"{k} {v}" for k, v in (("tp", self.tensor_parallel), ("pp", self.pipeline_parallel)) if v > 1]
        return gpus + (f" ({', '.join(layout)})" if layout else "") + f", {self.num_cpus:g} CPU"


#: Real tokens per work unit on GPU replicas when the sweep names no ``unit_tokens``: tens of seconds of an
#: 8B model on one H100 (a 256-example shard is about one second there, too little to amortize a unit's cost).
DEFAULT_GPU_UNIT_TOKENS = 1_000_000


@dataclass(frozen=True)
class Sweep:
    name: str
    file: str
    output: str
    models: tuple[ModelSpec, ...]
    datasets: dict[str, DatasetSpec]
    captures: dict[str, CaptureEntry]
    studies: dict[str, StudyEntry] = field(default_factory=dict)
    storage_options: dict[str, Any] | None = None
    shard_size: int = 256
    token_budget: int | None = None  # None: each replica's device's default (engine.batching.TOKEN_BUDGETS)
    max_length: int | None = None
    truncate: bool = False
    resources: Resources = Resources()

    def resources_of(self, model: ModelSpec) -> Resources:
        """The replica resources of one model: its own block (over the sweep's), else the sweep's."""
        return model.resources or self.resources

    def describe_resources(self, model: ModelSpec) -> str:
        return f"{self.resources_of(model).describe()}, {model.dtype}"

    @property
    def groups(self) -> dict[str, tuple[ModelSpec, ...]]:
        """Model group name -> its models, base first."""
        out: dict[str, list[ModelSpec]] = {}
        for m in self.models:
            out.setdefault(m.group, []).append(m)
        return {k: tuple(v) for k, v in out.items()}

    def store_url(self, capture: str) -> str:
        return f"{self.output.rstrip('/')}/{capture}.zarr"

    def targets(self) -> list[Target]:
        """Every (model, capture, dataset) store group, grouped by model (the order units are scheduled in)."""
        out = []
        for m in self.models:
            for c in self.captures.values():
                if m.group not in c.groups:
                    continue
                for d in c.datasets:
                    out.append(Target(m, self.datasets[d], c, self.store_url(c.name), f"{m.group}/{m.label}/{d}"))
        return out


@dataclass(frozen=True)
class Target:
    """One store group: a model's capture of one dataset."""

    model: ModelSpec
    dataset: DatasetSpec
    capture: CaptureEntry
    url: str
    group: str

    @property
    def key(self) -> str:
        return f"{self.model.key} {self.dataset.name} {self.capture.name}"


# ---------------------------------------------------------------------------------------------
# YAML with line numbers


class _N:
    """A YAML node with its key path, for errors that name the key and the line."""

    def __init__(self, node: yaml.Node, path: str, file: str, key_mark: yaml.Mark | None = None) -> None:
        self.node = node
        self.path = path
        self.file = file
        self.key_mark = key_mark

    @property
    def line(self) -> int:
        # the key's line: a block mapping's own node starts at its first child
        return (self.key_mark or self.node.start_mark).line + 1

    def error(self, problem: str) -> SweepError:
        where = f"{self.path}: " if self.path else ""
        return SweepError(f"{self.file}:{self.line}: {where}{problem}")

    def child(self, node: yaml.Node, key: str, key_mark: yaml.Mark | None = None) -> _N:
        return _N(node, f"{self.path}.{key}" if self.path else key, self.file, key_mark)

    @property
    def is_null(self) -> bool:
        return isinstance(self.node, yaml.ScalarNode) and self.node.tag == "tag:yaml.org,2002:null"

    def mapping(self, allowed: Iterable[str] | None = None, required: Iterable[str] = ()) -> dict[str, _N]:
        if not isinstance(self.node, yaml.MappingNode):
            raise self.error(f"expected a mapping (key: value), got {self._kind()}")
        out: dict[str, _N] = {}
        allowed = None if allowed is None else tuple(allowed)
        for knode, vnode in self.node.value:
            if not isinstance(knode, yaml.ScalarNode):
                raise _N(knode, self.path, self.file).error("keys must be plain names")
            key = str(knode.value)
            kn = _N(knode, f"{self.path}.{key}" if self.path else key, self.file)
            if key in out:
                raise kn.error(f"duplicate key (first at line {out[key].line})")
            if allowed is not None and key not in allowed:
                hint = difflib.get_close_matches(key, allowed, n=1)
                raise kn.error(
                    "unknown key" + (f"; did you mean {hint[0]!r}?" if hint else f"; allowed: {', '.join(allowed)}")
                )
            out[key] = self.child(vnode, key, knode.start_mark)
        missing = [k for k in required if k not in out]
        if missing:
            raise self.error(f"missing key {missing[0]!r}")
        return out

    def _kind(self) -> str:
        if isinstance(self.node, yaml.MappingNode):
            return "a mapping"
        if isinstance(self.node, yaml.SequenceNode):
            return "a list"
        return f"{self.value()!r}"

    def value(self) -> Any:
        loader = yaml.SafeLoader("")
        try:
            return loader.construct_document(self.node)
        except yaml.YAMLError as e:
            raise self.error(str(e).splitlines()[0]) from None
        finally:
            loader.dispose()

    def str(self) -> str:
        v = self.value()
        if not isinstance(v, str) or not v.strip():
            raise self.error(f"expected a non-empty string, got {self._kind()}")
        return v

    def name(self) -> str:
        v = self.str()
        if not _NAME.match(v):
            raise self.error(f"{v!r} is not a valid name (letters, digits, '_', '-', '.'; no '/')")
        return v

    def int(self, minimum: int | None = None) -> int:
        v = self.value()
        if isinstance(v, bool) or not isinstance(v, int):
            raise self.error(f"expected an integer, got {self._kind()}")
        if minimum is not None and v < minimum:
            raise self.error(f"must be >= {minimum}, got {v}")
        return v

    def number(self, minimum: float = 0.0, strict: bool = False) -> float:
        v = self.value()
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise self.error(f"expected a number, got {self._kind()}")
        if v < minimum or (strict and v == minimum):
            raise self.error(f"must be {'>' if strict else '>='} {minimum:g}, got {v}")
        return float(v)

    def bool(self) -> bool:
        v = self.value()
        if not isinstance(v, bool):
            raise self.error(f"expected true or false, got {self._kind()}")
        return v

    def str_list(self) -> list[_N]:
        """A list of strings, or one string (a one-element list)."""
        if isinstance(self.node, yaml.ScalarNode):
            self.str()
            return [self]
        if not isinstance(self.node, yaml.SequenceNode):
            raise self.error(f"expected a list of names, got {self._kind()}")
        items = [self.child(n, f"[{i}]") for i, n in enumerate(self.node.value)]
        for it in items:
            it.str()
        if not items:
            raise self.error("empty list")
        return items


def load_sweep(path: str | Path) -> Sweep:
    """Read and validate a sweep file (raises :class:`SweepError` naming the line and key)."""
    p = Path(path)
    if not p.is_file():
        raise SweepError(f"sweep file {p} does not exist")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SweepError(f"sweep file {p}: cannot read it ({e})") from None
    return parse_sweep(text, file=str(p), base_dir=p.resolve().parent)


def parse_sweep(text: str, *, file: str = "<sweep>", base_dir: str | Path = ".") -> Sweep:
    """Validate a sweep given as YAML text; relative paths resolve against ``base_dir``."""
    base = Path(base_dir)
    try:
        # compose, not load: the nodes keep their line numbers for every later error
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = f":{mark.line + 1}" if mark is not None else ""
        raise SweepError(f"{file}{line}: not valid YAML: {e.problem or e.context}") from None
    except yaml.YAMLError as e:
        raise SweepError(f"{file}: not valid YAML: {e}") from None
    if root is None:
        raise SweepError(f"{file}: the sweep file is empty")
    top = _N(root, "", file).mapping(
        allowed=(
            "name", "output", "storage_options", "shard_size", "token_budget", "max_length", "truncate",
            "models", "datasets", "captures", "studies", "resources",
        ),
        required=("output", "models", "datasets"),
    )
    if "captures" not in top and "studies" not in top:
        raise _N(root, "", file).error("missing key 'captures' (or 'studies', whose captures the sweep plans itself)")
    name = top["name"].name() if "name" in top else Path(file).stem
    storage_options = None
    if "storage_options" in top and not top["storage_options"].is_null:
        top["storage_options"].mapping()
        storage_options = top["storage_options"].value()
    output = _output(top["output"], base, storage_options)

    resources = _resources(top["resources"]) if "resources" in top else Resources()
    models = _models(top["models"], base, resources)
    datasets = _datasets(top["datasets"], base)
    groups = sorted({m.group for m in models})
    captures = _captures(top["captures"], datasets, groups) if "captures" in top else {}
    studies = _studies(top["studies"], datasets, groups, captures) if "studies" in top else {}
    return Sweep(
        name=name,
        file=file,
        output=output,
        models=tuple(models),
        datasets=datasets,
        captures=captures,
        studies=studies,
        storage_options=storage_options,
        shard_size=top["shard_size"].int(1) if "shard_size" in top else 256,
        token_budget=top["token_budget"].int(1) if "token_budget" in top else None,
        max_length=top["max_length"].int(1) if "max_length" in top and not top["max_length"].is_null else None,
        truncate=top["truncate"].bool() if "truncate" in top else False,
        resources=resources,
    )


def _output(n: _N, base: Path, storage_options: dict | None) -> str:
    out = n.str()
    if "://" in out and not out.startswith("file://"):
        return out.rstrip("/")
    if storage_options:
        raise n.error("storage_options are for fsspec URLs (s3://, gs://); this output is a local path")
    p = Path(out.removeprefix("file://")).expanduser()
    p = p if p.is_absolute() else (base / p).resolve()
    bad = _not_a_folder(p)
    if bad is not None:
        raise n.error(f"{bad} is a file, not a folder; name another output or move that file away")
    return str(p)


def _not_a_folder(p: Path) -> Path | None:
    """The first existing path on the way to ``p`` (``p`` included) that is not a directory, if any."""
    for q in (p, *p.parents):
        if q.exists() or q.is_symlink():
            return None if q.is_dir() else q
    return None


def _model_ref(n: _N, base: Path) -> tuple[str, str | None, _N | None]:
    """``id`` or ``{path: id, revision: r, resources: {...}}``; local-looking paths are resolved and must exist."""
    res_n = None
    if isinstance(n.node, yaml.MappingNode):
        m = n.mapping(allowed=("path", "revision", "resources"), required=("path",))
        path_n = m["path"]
        revision = m["revision"].str() if "revision" in m and not m["revision"].is_null else None
        res_n = m.get("resources")
    else:
        path_n, revision = n, None
    raw = path_n.str()
    p = Path(raw).expanduser()
    looks_local = raw.startswith(("/", "./", "../", "~")) or raw.count("/") > 1 or (base / p).exists()
    if looks_local:
        p = p if p.is_absolute() else (base / p).resolve()
        if not p.is_dir():
            raise path_n.error(f"model directory {p} does not exist")
        if not (p / "config.json").is_file():
            raise path_n.error(f"model directory {p} has no config.json")
        return str(p), revision, res_n
    return raw, revision, res_n


def _model_dtype(group_dtype: str | None, res_n: _N | None, res: Resources | None) -> str:
    """A model's dtype: its own ``resources.dtype``, else its group's ``dtype``, else the (group's or sweep's)
    ``resources.dtype``, else auto (bfloat16 on a GPU replica, float32 on a CPU one)."""
    if res_n is not None and "dtype" in res_n.mapping():
        return res_n.mapping()["dtype"].str()  # checked by _resources
    return group_dtype or (res.dtype if res is not None else None) or "auto"


def _models(n: _N, base: Path, sweep_res: Resources = Resources()) -> list[ModelSpec]:
    groups = n.mapping()
    if not groups:
        raise n.error("no model group given")
    out: list[ModelSpec] = []
    for gname, gn in groups.items():
        if not _NAME.match(gname):
            raise gn.error(f"{gname!r} is not a valid group name (letters, digits, '_', '-', '.')")
        g = gn.mapping(allowed=("base", "post", "dtype", "allow_pickle", "trust_remote_code", "resources"), required=("base", "post"))
        group_res = _resources(g["resources"], sweep_res) if "resources" in g else None
        group_dtype = g["dtype"].str() if "dtype" in g else None
        if group_dtype is not None and group_dtype not in _MODEL_DTYPES:
            raise g["dtype"].error(f"unknown dtype {group_dtype!r}; use {', '.join(_MODEL_DTYPES)}")
        if group_dtype is not None and "resources" in g and "dtype" in g["resources"].mapping() and group_res.dtype != group_dtype:
            raise g["dtype"].error(f"dtype {group_dtype!r}, but resources.dtype {group_res.dtype!r}; name one")
        flags = {k: g[k].bool() for k in ("allow_pickle", "trust_remote_code") if k in g}

        def own(res_n: _N | None) -> Resources | None:
            # a model's own block overrides its group's, which overrides the sweep's
            return _resources(res_n, group_res or sweep_res) if res_n is not None else group_res

        path, rev, res_n = _model_ref(g["base"], base)
        res = own(res_n)
        out.append(ModelSpec(gname, "base", path, rev, _model_dtype(group_dtype, res_n, res or sweep_res), **flags, resources=res))
        post = g["post"]
        if isinstance(post.node, yaml.SequenceNode):
            items = [(f"post{i}" if len(post.node.value) > 1 else "post", post.child(x, f"[{i}]")) for i, x in enumerate(post.node.value)]
        elif isinstance(post.node, yaml.MappingNode):
            items = list(post.mapping().items())
        else:
            items = [("post", post)]
        if not items:
            raise post.error("no post-trained model given")
        for label, pn in items:
            if label == "base" or not _NAME.match(label):
                raise pn.error(f"{label!r} is not a valid model label (letters, digits, '_', '-', '.'; not 'base')")
            path, rev, res_n = _model_ref(pn, base)
            res = own(res_n)
            out.append(ModelSpec(gname, label, path, rev, _model_dtype(group_dtype, res_n, res or sweep_res), **flags, resources=res))
    return out


def _datasets(n: _N, base: Path) -> dict[str, DatasetSpec]:
    entries = n.mapping()
    if not entries:
        raise n.error("no dataset given")
    out: dict[str, DatasetSpec] = {}
    for name, dn in entries.items():
        if not _NAME.match(name):
            raise dn.error(f"{name!r} is not a valid dataset name (letters, digits, '_', '-', '.')")
        if isinstance(dn.node, yaml.MappingNode):
            d = dn.mapping(allowed=("path", "text_column", "limit"), required=("path",))
            path_n = d["path"]
            text_column = d["text_column"].str() if "text_column" in d else None
            limit = d["limit"].int(1) if "limit" in d else None
        else:
            path_n, text_column, limit = dn, None, None
        p = Path(path_n.str()).expanduser()
        p = p if p.is_absolute() else (base / p).resolve()
        if not p.is_file():
            raise path_n.error(f"dataset file {p} does not exist")
        out[name] = DatasetSpec(name, str(p), text_column, limit, line=path_n.line)
    return out


def _names_in(n: _N, known: Iterable[str], what: str) -> tuple[str, ...]:
    known = tuple(known)
    names = []
    for it in n.str_list():
        v = it.str()
        if v not in known:
            hint = difflib.get_close_matches(v, known, n=1)
            raise it.error(f"unknown {what} {v!r}" + (f"; did you mean {hint[0]!r}?" if hint else f"; known: {', '.join(known)}"))
        names.append(v)
    return tuple(dict.fromkeys(names))


def _captures(n: _N, datasets: Mapping[str, DatasetSpec], groups: list[str]) -> dict[str, CaptureEntry]:
    entries = n.mapping()
    if not entries:
        raise n.error("no capture given")
    out: dict[str, CaptureEntry] = {}
    for name, cn in entries.items():
        if not _NAME.match(name):
            raise cn.error(f"{name!r} is not a valid capture name (letters, digits, '_', '-', '.')")
        c = cn.mapping(allowed=("sites", "layers", "positions", "template", "dtype", "compression", "datasets", "models"))
        kw: dict[str, Any] = {}
        if "sites" in c:
            kw["sites"] = tuple(x.str() for x in c["sites"].str_list())
        if "layers" in c:
            v = c["layers"].value()
            if isinstance(v, list):
                if not v or not all(isinstance(x, int) and not isinstance(x, bool) for x in v):
                    raise c["layers"].error("expected 'all', 'a:b', '0,3,5' or a list of integers")
                kw["layers"] = tuple(v)
            elif isinstance(v, int) and not isinstance(v, bool):
                kw["layers"] = (v,)
            elif isinstance(v, str):
                kw["layers"] = v
            else:
                raise c["layers"].error("expected 'all', 'a:b', '0,3,5' or a list of integers")
        for key in ("positions", "template", "dtype"):
            if key in c:
                kw[key] = c[key].str()
        if "compression" in c:
            kw["compression"] = None if c["compression"].is_null or c["compression"].value() == "none" else c["compression"].str()
        # parsed once, by the spec; an error is put on the key whose parser raised it
        try:
            spec = CaptureSpec(**kw)
        except ValueError as e:
            key = getattr(e, "field", None)  # the spec names the field whose parser raised
            raise (c[key] if key in c else cn).error(str(e)) from None
        if "compression" in kw:
            from mechdiff.engine.store import _compressors  # validates zstd / zstd:<level> / None

            try:
                _compressors(kw["compression"])
            except ValueError as e:
                raise c["compression"].error(str(e)) from None
        ds = _names_in(c["datasets"], datasets, "dataset") if "datasets" in c else tuple(datasets)
        gs = _names_in(c["models"], groups, "model group") if "models" in c else tuple(groups)
        out[name] = CaptureEntry(name, spec, ds, gs)
    return out


def _studies(n: _N, datasets: Mapping[str, DatasetSpec], groups: list[str], captures: Mapping[str, CaptureEntry]) -> dict[str, StudyEntry]:
    out: dict[str, StudyEntry] = {}
    for name, sn in n.mapping(allowed=STUDIES).items():
        if sn.is_null:
            out[name] = StudyEntry(name, None, tuple(datasets), tuple(groups))
            continue
        s = sn.mapping()
        capture = None
        if "capture" in s:
            capture = s["capture"].str()
            if capture not in captures:
                hint = difflib.get_close_matches(capture, captures, n=1)
                raise s["capture"].error(f"unknown capture {capture!r}" + (f"; did you mean {hint[0]!r}?" if hint else ""))
        ds = _names_in(s["datasets"], datasets, "dataset") if "datasets" in s else (captures[capture].datasets if capture else tuple(datasets))
        gs = _names_in(s["models"], groups, "model group") if "models" in s else tuple(groups)
        if capture is not None:
            missing = [d for d in ds if d not in captures[capture].datasets]
            if missing:
                raise (s["datasets"] if "datasets" in s else sn).error(
                    f"capture {capture!r} does not cover dataset {missing[0]!r}; add it to captures.{capture}.datasets"
                )
        for key in _DATASET_OPTIONS.get(name, ()):
            if key in s:
                _names_in(s[key], datasets, "dataset")
        options = {k: v.value() for k, v in s.items() if k not in ("capture", "datasets", "models")}
        study_options = {k: v for k, v in options.items() if k not in _DATASET_OPTIONS.get(name, ())}
        study = get_study(name)
        for k, v in study_options.items():  # one at a time, so that an error names its own line
            try:
                config_from_options(study, {k: v})
            except StudyConfigError as e:
                raise s[k].error(str(e)) from None
        try:
            config_from_options(study, study_options)
        except StudyConfigError as e:
            raise sn.error(str(e)) from None
        out[name] = StudyEntry(name, capture, ds, gs, options, study_options, sn.line)
    return out


_REPLICA_KEYS = ("num_cpus", "num_gpus", "torch_threads", "tensor_parallel", "pipeline_parallel", "dtype", "unit_tokens")
_POOL_KEYS = ("actors", "max_retries")


def _resources(n: _N, inherit: Resources | None = None) -> Resources:
    """The sweep's ``resources`` block, or (``inherit`` given) a model's, whose keys override ``inherit``'s."""
    model_level = inherit is not None
    allowed = _REPLICA_KEYS if model_level else (*_REPLICA_KEYS, *_POOL_KEYS)
    if model_level:
        for k, kn in n.mapping().items():
            if k in _POOL_KEYS:
                raise kn.error(f"a pool-wide setting: put {k} in the sweep's top-level resources")
    r = n.mapping(allowed=allowed)
    base = inherit or Resources()
    kw: dict[str, Any] = {}
    if "num_gpus" in r:
        auto = r["num_gpus"].is_null or r["num_gpus"].value() == "auto"
        kw["num_gpus"] = None if auto else r["num_gpus"].number(0.0)
    if "num_cpus" in r:
        kw["num_cpus"] = r["num_cpus"].number(0.0, strict=True)
    for k in ("torch_threads", "tensor_parallel", "pipeline_parallel", "unit_tokens"):
        if k in r and not r[k].is_null:
            kw[k] = r[k].int(1)
    if "dtype" in r:
        kw["dtype"] = r["dtype"].str()
        if kw["dtype"] not in _MODEL_DTYPES:
            raise r["dtype"].error(f"unknown dtype {kw['dtype']!r}; use {', '.join(_MODEL_DTYPES)}")
    if "actors" in r:
        kw["actors"] = None if r["actors"].is_null else r["actors"].int(1)
    if "max_retries" in r:
        kw["max_retries"] = r["max_retries"].int(0)
    out = replace(base, **kw)
    layout = out.tensor_parallel * out.pipeline_parallel
    if out.num_gpus is not None and layout > 1 and out.num_gpus != layout:
        key = r["num_gpus"] if "num_gpus" in r else r.get("tensor_parallel") or r.get("pipeline_parallel") or n
        raise key.error(f"num_gpus {out.num_gpus:g} does not match tensor_parallel x pipeline_parallel = "
                        f"{out.tensor_parallel} x {out.pipeline_parallel} = {layout}; give one of them")
    return out


# ---------------------------------------------------------------------------------------------
# planning


@dataclass
class TargetPlan:
    """A target's state before a run: how many shards, which are done."""

    target: Target
    prompts: PromptSet
    n_shards: int
    done: list[int]
    exists: bool

    @property
    def missing(self) -> int:
        return self.n_shards - len(self.done)


@dataclass
class SweepPlan:
    sweep: Sweep
    targets: list[TargetPlan]

    @property
    def total_units(self) -> int:
        return sum(t.n_shards for t in self.targets)

    @property
    def remaining_units(self) -> int:
        return sum(t.missing for t in self.targets)


def _load_datasets(sweep: Sweep) -> dict[str, PromptSet]:
    """The datasets the sweep's captures extract, as prompts (a dataset only studies read is theirs to load)."""
    used = {d for c in sweep.captures.values() for d in c.datasets}
    out = {}
    for name, d in sweep.datasets.items():
        if name not in used:
            continue
        try:
            out[name] = d.load()
        except (DataError, OSError, ValueError) as e:
            where = f"{sweep.file}:{d.line}: datasets.{name}" if d.line else f"{sweep.file}: datasets.{name}"
            raise SweepError(f"{where}: {e}") from None
        if len(out[name]) == 0:
            raise SweepError(f"{sweep.file}: datasets.{name}: {d.path} holds no prompt")
    return out


def _config_n_layers(path: str) -> int | None:
    """A local model's layer count from its config.json (no weights); None for hub ids or odd configs."""
    cfg_path = Path(path) / "config.json"
    if not cfg_path.is_file():
        return None
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError):
        return None
    cfg = cfg.get("text_config") or cfg
    return next((cfg[k] for k in ("num_hidden_layers", "n_layer", "num_layers") if isinstance(cfg.get(k), int)), None)


def _check_local_layers(sweep: Sweep) -> None:
    """Layer selections against the layer count of local models (read from config.json, no weights)."""
    for m in sweep.models:
        n_layers = _config_n_layers(m.path)
        if n_layers is None:
            continue  # a hub id: checked when the replica loads it
        for c in sweep.captures.values():
            if m.group in c.groups:
                try:
                    c.spec.resolve_layers(n_layers)
                except ValueError as e:
                    raise SweepError(f"{sweep.file}: captures.{c.name}.layers: model {m.key} ({n_layers} layers): {e}") from None


class StoreReuseError(SweepError):
    """An existing store group was made by another model (weights), dataset or capture spec than the sweep
    names; the message lists every differing field with both values. Nothing is reused or overwritten."""


def _open_existing(t: Target, storage_options: dict | None):
    """The target's store group if it exists (read without creating anything), else None."""
    from mechdiff.engine.store import ActivationStore, StoreIncompleteError, StoreMismatchError

    if "://" not in t.url or t.url.startswith("file://"):
        bad = _not_a_folder(Path(t.url.removeprefix("file://")))
        if bad is not None:
            raise SweepError(f"target {t.key}: store path {bad} is a file, not a folder; use another output or move it away")
    try:
        # read-only: opening for writing would create the store's folders for a target not yet started
        return ActivationStore.open(t.url, t.group, storage_options, read_only=True)
    except FileNotFoundError:
        return None
    except (StoreMismatchError, StoreIncompleteError, ValueError, OSError) as e:
        raise SweepError(f"target {t.key}: {e}") from None


def _model_n_layers(m: ModelSpec, prov: Mapping[str, Any]) -> int | None:
    """The layer count the sweep's capture resolves against: the local config, else the store's record of the
    model it was made by (the same weights have the same layers: the weights are compared separately)."""
    n = _config_n_layers(m.path)
    if n is not None:
        return n
    arch = prov.get("architecture")
    if isinstance(arch, str):
        try:
            arch = json.loads(arch)
        except ValueError:
            arch = None
    n = arch.get("n_layers") if isinstance(arch, Mapping) else None
    return n if isinstance(n, int) else None


def _show(v: Any) -> str:
    return json.dumps(v) if isinstance(v, (list, dict)) else repr(v)


def _check_done_store(sweep: Sweep, t: Target, store, prompts: PromptSet) -> None:
    """An existing group (done or partial) has to be the one this sweep describes: the same weights, dataset and
    whole capture spec (sites, layers resolved against the model's layer count, positions, template, dtype,
    compression) and shard size. Otherwise :class:`StoreReuseError` names each differing field with both values."""
    from mechdiff.engine.capture import capture_of
    from mechdiff.engine.models import local_weights_hash

    prov = store.provenance
    where = f"store {t.url} group {t.group}"
    problems = []
    stored_w = prov.get("weights_hash")
    want_w = None
    if Path(t.model.path).is_dir():
        try:
            want_w = local_weights_hash(t.model.path, allow_pickle=t.model.allow_pickle)
        except (OSError, ValueError) as e:
            raise StoreReuseError(f"{where}: cannot hash the weights of model {t.model.path} to compare ({e})") from None
    if want_w is not None and stored_w is not None:
        # local weights are known by their content: a moved directory still matches, other weights at the same
        # path do not
        if stored_w != want_w:
            problems.append(f"weights_hash: the store has {stored_w} (model {prov.get('model_id')}), "
                            f"model {t.model.key} at {t.model.path} has {want_w}")
    elif prov.get("model_id") not in (None, t.model.path):
        problems.append(f"model_id: the store has {prov.get('model_id')!r}, the sweep names {t.model.path!r}")
    elif want_w is None and t.model.revision is not None and prov.get("revision") not in (None, t.model.revision):
        problems.append(f"revision: the store has {prov.get('revision')!r}, the sweep names {t.model.revision!r}")
    if prov.get("dataset_hash") not in (None, prompts.hash):
        problems.append(f"dataset_hash: the store has {prov.get('dataset_hash')}, dataset {t.dataset.name} "
                        f"({t.dataset.path}) now has {prompts.hash}")
    try:
        stored = capture_of(prov)
    except ValueError as e:
        problems.append(f"capture: the store's record is not a capture spec ({e})")
        stored = None
    if stored is not None:
        n_layers = _model_n_layers(t.model, prov)
        try:
            want = t.capture.spec.resolve(n_layers) if n_layers is not None else t.capture.spec
        except ValueError as e:  # layers out of range for this model
            raise SweepError(f"{sweep.file}: captures.{t.capture.name}.layers: model {t.model.key}: {e}") from None
        for d in stored.differences(want):
            problems.append(f"capture.{d.field}: the store has {_show(d.have)}, "
                            f"captures.{t.capture.name} asks for {_show(d.want)}")
    if store.shard_size != sweep.shard_size:
        problems.append(f"shard_size: the store has {store.shard_size}, the sweep {sweep.shard_size}")
    if problems:
        raise StoreReuseError(
            f"{where} does not match the sweep: " + "; ".join(problems)
            + "; use another output (or another capture name), or remove that group"
        )


def plan_sweep(sweep: Sweep, extra: Sequence[tuple[Target, PromptSet]] = ()) -> SweepPlan:
    """Load the datasets, check layer ranges, and read what the stores already hold. Touches no store.
    ``extra``: more targets with their prompts (the studies' own captures)."""
    prompts = _load_datasets(sweep)
    _check_local_layers(sweep)
    plans = []
    for t, ps in [*((t, prompts[t.dataset.name]) for t in sweep.targets()), *extra]:
        n_shards = -(-len(ps) // sweep.shard_size)
        store = _open_existing(t, sweep.storage_options)
        if store is None:
            plans.append(TargetPlan(t, ps, n_shards, [], False))
            continue
        _check_done_store(sweep, t, store, ps)
        if store.n_examples != len(ps):
            raise SweepError(
                f"store {t.url} group {t.group} holds {store.n_examples} examples, dataset {t.dataset.name} has "
                f"{len(ps)}; use another output or remove that group"
            )
        # one listing: flagged shards with a chunk missing are left to do, like unflagged ones
        todo = set(store.missing_shards())
        plans.append(TargetPlan(t, ps, store.n_shards, [i for i in range(store.n_shards) if i not in todo], True))
    return SweepPlan(sweep, plans)


@dataclass
class StatusRow:
    model: str  # group/label
    model_path: str
    capture: str
    dataset: str
    url: str
    group: str
    done: int
    total: int
    resources: str = ""  # the model's replica shape and dtype, e.g. "4 GPU (tp 4), 1 CPU, bfloat16"

    @property
    def state(self) -> str:
        return "done" if self.done == self.total else ("not started" if self.done == 0 else "partial")


def sweep_status(sweep: Sweep | str | Path) -> list[StatusRow]:
    """Units (shards) done / total for every model x capture x dataset of the sweep, the studies' own captures
    included."""
    from mechdiff.cluster.study_plan import study_extraction

    if not isinstance(sweep, Sweep):
        sweep = load_sweep(sweep)
    plan = plan_sweep(sweep, study_extraction(sweep))
    return [
        StatusRow(p.target.model.key, p.target.model.path, p.target.capture.name, p.target.dataset.name,
                  p.target.url, p.target.group, len(p.done), p.n_shards, sweep.describe_resources(p.target.model))
        for p in plan.targets
    ]
