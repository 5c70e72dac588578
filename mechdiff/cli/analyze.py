"""``mechdiff analyze <study>``: one command per study of the registry, its flags generated from the study.

Each study option is a field of the study's ``Config`` dataclass (``n_val`` -> ``--n-val``; a bool ->
``--x/--no-x``; a tuple -> a comma list (or ``@FILE``, one item a line); an Optional -> ``none`` allowed; a dict ->
``KEY=VALUE``, repeated; a nested dataclass's fields flattened under their own names); the dataset-role flags
are the study's ``datasets``. Only the flags given are read, and they become the Config through
:func:`mechdiff.analyses.study.config_from_options`, so a value is checked by the study's own rules. A new
Config field is a new flag with no edit here. The study then runs as the main job runs it: on a
:class:`StudyContext`, through :func:`run_study`.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Mapping, Optional

import typer
from typer.core import TyperGroup

from mechdiff.cli.common import (
    EXPECTED, check_output_dir, fail, findings_table, group_from_options, man_help, opt_base, opt_device, opt_labels,
    opt_model_dtype, opt_out, opt_post, opt_progress, out,
)
from mechdiff.cli.manpages import DATASET_HELP, FIELD_HELP, STUDY_MAN

__all__ = ["StudyFlag", "study_flags", "parse_value", "config_from_flags", "embedded_texts",
           "embedded_pairs", "embedded_datasets", "analyze_app", "study_command"]

# Old spellings kept as hidden aliases: study -> field (or dataset role) -> flags.
ALIASES: dict[str, dict[str, tuple[str, ...]]] = {
    "confidence": {"q": ("-q", "--top-fraction"), "n": ("-n", "--candidates"), "n_bootstrap": ("--bootstrap",),
                   "texts": ("-t",)},
    "refusal": {"n_bootstrap": ("--bootstrap",), "addition_coefs": ("--addition-coef",)},
    "truthfulness": {"statements": ("--data", "-d"), "heldout_topics": ("--heldout-topic",)},
    "knowledge": {"pairs": ("-p",)},
}
# The flags every analyze command has besides its study's (a Config field may not take one of these names).
COMMON_FLAGS = ("--base", "--post", "--labels", "--name", "--out", "-o", "--store", "--shard-size", "--device",
                "--model-dtype", "--progress", "--no-progress", "--allow-pickle", "--trust-remote-code", "--help")
_NONE = type(None)


@dataclass(frozen=True)
class StudyFlag:
    """One study option on the command line: the Config field it sets (a path into nested dataclasses)."""

    path: tuple[str, ...]  # ("controls", "n_bootstrap") for KnowledgeConfig.controls.n_bootstrap
    flag: str  # --n-bootstrap
    hint: Any  # the field's type
    default: Any
    help: str

    @property
    def dotted(self) -> str:
        return ".".join(self.path)

    @property
    def is_bool(self) -> bool:
        return self.hint is bool

    @property
    def is_dict(self) -> bool:
        return typing.get_origin(_strip_optional(self.hint)) is dict


def _strip_optional(hint: Any) -> Any:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        rest = [a for a in typing.get_args(hint) if a is not _NONE]
        if len(rest) == 1:
            return rest[0]
    return hint


def _is_config(hint: Any) -> bool:
    return dataclasses.is_dataclass(hint) and isinstance(hint, type)


_DANGLING = {"its", "the", "a", "an", "of", "and", "or", "to", "with", "when", "than", "is", "by", "for", "in", "on"}


def _source_comments(cls: type) -> dict[str, str]:
    """Field -> the comment after it in ``cls``'s source (continued on the next line where it breaks mid-phrase)."""
    try:
        lines = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):
        return {}
    found: dict[str, str] = {}
    for i, ln in enumerate(lines):
        m = re.match(r"^\s+(\w+)\s*:[^#]*#\s?(.*)$", ln)
        if not m or m.group(1) in found:
            continue
        text = m.group(2).strip()
        words = text.split()
        if (i + 1 < len(lines) and words and (words[-1] in _DANGLING or text.endswith(","))
                and lines[i + 1].strip().startswith("#")):
            text += " " + lines[i + 1].strip().lstrip("#").strip()
        found[m.group(1)] = text
    return found


def _doc_help(cls: type, name: str) -> str:
    """``name``'s description in the class docstring (``name``: text), if it has one."""
    doc = inspect.getdoc(cls) or ""
    m = re.search(rf"``{re.escape(name)}``:\s*(.*?)(?=;\s*``\w+``:|\n\s*\n|\n\s*\*|$)", doc, re.S)
    return " ".join(m.group(1).split()) if m else ""


def _field_help(study: str, cls: type, f: dataclasses.Field, path: tuple[str, ...], comments: dict[str, str]) -> str:
    # the CLI's own text only where the Config's comment is missing or too terse for a flag's help
    text = (f.metadata.get("help") or FIELD_HELP.get((study, ".".join(path))) or comments.get(f.name)
            or _doc_help(cls, f.name) or "").replace("None:", "none:")
    if text and not text.endswith((".", ")", "]")):
        text += "."
    return text or f"The {cls.__name__} field {f.name}."


def study_flags(study) -> list[StudyFlag]:
    """Every field of ``study.Config`` (nested dataclasses' fields included) as a flag, in field order.

    A nested field's flag is its own name, or ``--<parent>-<name>`` where that is taken. Raises ValueError on
    a Config whose flags cannot be told apart, or that takes a flag every analyze command has."""
    taken = set(COMMON_FLAGS) | {f"--{r.replace('_', '-')}" for r in study.datasets}
    flags: list[StudyFlag] = []

    def walk(cls: type, base_obj: Any, prefix: tuple[str, ...]) -> None:
        hints = typing.get_type_hints(cls)
        comments = _source_comments(cls)
        for f in dataclasses.fields(cls):
            hint, default = hints[f.name], getattr(base_obj, f.name)
            path = (*prefix, f.name)
            if _is_config(hint):
                walk(hint, default, path)
                continue
            flag = "--" + f.name.replace("_", "-")
            if flag in taken and prefix:
                flag = "--" + "-".join(path).replace("_", "-")
            if flag in taken:
                raise ValueError(f"study {study.name}: Config field {'.'.join(path)} would take the flag {flag}, "
                                 "which another option has; rename the field")
            taken.add(flag)
            if hint is bool:
                taken.add("--no-" + flag[2:])
            flags.append(StudyFlag(path, flag, hint, default, _field_help(study.name, cls, f, path, comments)))

    walk(study.Config, study.Config(), ())
    return flags


def _items(text: str, flag: str) -> list[str]:
    """A comma list, or ``@FILE``: one item per non-empty line of FILE."""
    if text.startswith("@"):
        p = Path(text[1:])
        if not p.is_file():
            raise ValueError(f"{flag} {text}: no such file {p}")
        return [ln.strip() for ln in p.read_text().splitlines() if ln.strip()]
    return [x.strip() for x in text.split(",") if x.strip()]


def parse_value(text: str, hint: Any, flag: str) -> Any:
    """The command-line text of ``flag`` as a value of type ``hint`` (the Config then checks its range)."""
    from mechdiff.analyses.study import StudyConfigError

    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if text.strip().lower() == "none" and _NONE in args:
            return None
        rest = [a for a in args if a is not _NONE]
        if str in rest:
            return text  # the study reads the text itself (e.g. layers: all, 0,3 or 2:6)
        errors = []
        for a in rest:
            try:
                return parse_value(text, a, flag)
            except StudyConfigError as e:
                errors.append(e)
        if len(errors) == 1:
            raise errors[0]
        raise StudyConfigError(f"{flag} {text!r}: not {_metavar(hint)}")
    if origin is tuple:
        inner = args[0] if args else str
        values: list[Any] = []
        for x in _items(text, flag):
            if inner is int and re.fullmatch(r"-?\d+:-?\d+", x):  # a range a:b, end exclusive
                a, b = (int(v) for v in x.split(":"))
                values += range(a, b)
            else:
                values.append(parse_value(x, inner, flag))
        return tuple(values)
    if hint is int:
        try:
            return int(text)
        except ValueError:
            raise StudyConfigError(f"{flag} {text!r}: not a whole number") from None
    if hint is float:
        try:
            return float(text)
        except ValueError:
            raise StudyConfigError(f"{flag} {text!r}: not a number") from None
    if hint is bool:
        low = text.strip().lower()
        if low not in ("true", "false", "yes", "no", "1", "0"):
            raise StudyConfigError(f"{flag} {text!r}: not true or false")
        return low in ("true", "yes", "1")
    return text  # str, Literal and Any: the Config checks the value


def _metavar(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return "TEXT" if str in args else "|".join(_metavar(a) for a in args)  # text: the study parses it
    if hint is _NONE:
        return "none"
    if origin is tuple:
        inner = args[0] if args else str
        return {int: "I,J,..|A:B", float: "X,Y,.."}.get(inner, "A,B,..|@FILE")
    if origin is dict:
        return "KEY=VALUE"
    if origin is typing.Literal:
        return "|".join(map(str, args))
    return {int: "INT", float: "FLOAT", str: "TEXT", bool: "BOOL"}.get(hint, "TEXT")


def _show(v: Any) -> str:
    if v is None:
        return "none"
    if isinstance(v, tuple):
        return ",".join(map(str, v))
    if isinstance(v, str) and (v != v.strip() or not v):
        return repr(v)
    return str(v)


def config_from_flags(study, given: Mapping[tuple[str, ...], Any]):
    """``study``'s Config from the values of the flags given (field path -> value; the others keep the Config's
    defaults), through :func:`config_from_options`: the study's own types and checks."""
    from mechdiff.analyses.study import config_from_options

    base = study.Config()
    options: dict[str, Any] = {}
    nested: dict[str, dict[tuple[str, ...], Any]] = {}
    for path, v in given.items():
        if len(path) == 1:
            options[path[0]] = v
        else:
            nested.setdefault(path[0], {})[path[1:]] = v

    def merged(obj: Any, sub: Mapping[tuple[str, ...], Any]) -> dict[str, Any]:
        # a nested dataclass's given fields over its values in the default Config (not its class's defaults)
        vals = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
        deeper: dict[str, dict[tuple[str, ...], Any]] = {}
        for p, v in sub.items():
            if len(p) == 1:
                vals[p[0]] = v
            else:
                deeper.setdefault(p[0], {})[p[1:]] = v
        for k, s in deeper.items():
            vals[k] = merged(getattr(obj, k), s)
        return vals

    for name, sub in nested.items():
        options[name] = merged(getattr(base, name), sub)
    return config_from_options(study, options, base=base)


# -- the datasets: the study's roles, by default the embedded pair's ---------------------------------------------


def embedded_texts() -> list[str]:
    """The embedded fact sentences ("<prompt> <answer>." per row of facts.csv), confidence's default texts."""
    from mechdiff.zoo.datasets import fact_sentences

    try:
        return fact_sentences()
    except FileNotFoundError as e:
        raise ValueError(f"no --texts given and the embedded facts are not available ({e})") from None


def embedded_pairs() -> Path:
    """The embedded pair's patching.csv (its shots.json beside it), knowledge's default pairs."""
    from mechdiff.zoo.paths import zoo_path

    try:
        return zoo_path("data") / "patching.csv"
    except FileNotFoundError as e:
        raise ValueError(f"no --pairs given and the embedded pairs are not available ({e})") from None


def embedded_datasets(study) -> dict[str, Any]:
    """``study``'s dataset roles -> the embedded pair's datasets (as the main job reads them; confidence's texts
    as the fact sentences)."""
    from mechdiff.pipeline import embedded_inputs

    try:
        have = embedded_inputs().datasets()
    except FileNotFoundError as e:
        raise ValueError(f"no datasets given and the embedded ones are not available ({e})") from None
    ds = {role: have.get(role) for role in study.datasets}
    if "texts" in ds:
        ds["texts"] = embedded_texts()
    return ds


def _datasets(study, given: Mapping[str, list[str]]) -> dict[str, Any]:
    """The roles given on the command line (each file checked to exist); none given: the embedded ones."""
    if not any(given.values()):
        return embedded_datasets(study)
    ds: dict[str, Any] = {}
    for role in study.datasets:
        vals = [v for v in given.get(role) or [] if v != "auto"]  # auto: the study's own default
        for v in vals:
            if not Path(v).exists():
                raise FileNotFoundError(f"--{role.replace('_', '-')} {v}: no such file or directory")
        ds[role] = None if not vals else Path(vals[0]) if len(vals) == 1 else tuple(Path(v) for v in vals)
    return ds


# -- the command -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Param:
    """A parameter of a generated command: what the value it receives is."""

    kind: str  # "common", "role", "flag", "alias"
    key: Any  # common option name, role, StudyFlag, or (target kind, target) for an alias


def _parameters(study) -> tuple[list[inspect.Parameter], dict[str, _Param]]:
    P = inspect.Parameter
    params: list[inspect.Parameter] = []
    meaning: dict[str, _Param] = {}

    def add(name: str, annotation: Any, default: Any, m: _Param) -> None:
        params.append(P(name, P.KEYWORD_ONLY, default=default, annotation=annotation))
        meaning[name] = m

    models, data, opts = "Models and output", "Datasets", f"Study options ({study.Config.__name__})"
    add("base", Optional[str], _panel(opt_base(), models), _Param("common", "base"))
    add("post", Optional[List[str]], _panel(opt_post(), models), _Param("common", "post"))
    add("labels", Optional[str], _panel(opt_labels(), models), _Param("common", "labels"))
    add("name", str, typer.Option("group", "--name", help="Name of the model group in the results.",
                                  rich_help_panel=models), _Param("common", "name"))
    add("out", Path, _panel(opt_out(Path("results"), f"Output directory; the study writes OUT/{study.name}/."), models),
        _Param("common", "out"))
    add("store", Optional[str], typer.Option(None, "--store", help="Activation store root for the captures the study "
        "reads (local path or fsspec URL) \\[default: OUT/store.zarr]; finished groups are reused.",
        rich_help_panel=models), _Param("common", "store"))
    add("shard_size", int, typer.Option(256, "--shard-size", help="Examples per store shard (the unit of resumption).",
                                        rich_help_panel=models), _Param("common", "shard_size"))
    add("device", str, _panel(opt_device(), models), _Param("common", "device"))
    add("model_dtype", str, _panel(opt_model_dtype(), models), _Param("common", "model_dtype"))
    add("progress", bool, _panel(opt_progress(), models), _Param("common", "progress"))
    add("allow_pickle", bool, typer.Option(False, "--allow-pickle", help="Allow pickle weights (.bin/.pt: runs pickled "
        "code).", rich_help_panel=models), _Param("common", "allow_pickle"))
    add("trust_remote_code", bool, typer.Option(False, "--trust-remote-code", help="Allow model code from the model's "
        "repository.", rich_help_panel=models), _Param("common", "trust_remote_code"))
    for i, role in enumerate(study.datasets):
        hlp = DATASET_HELP.get((study.name, role)) or DATASET_HELP.get(("", role)) or f"The {role} dataset."
        add(f"d{i}", Optional[List[str]], typer.Option(None, f"--{role.replace('_', '-')}", metavar="PATH",
            help=hlp + " \\[default: the embedded pair's, when no dataset is given]", rich_help_panel=data),
            _Param("role", role))
    for i, f in enumerate(study_flags(study)):
        if f.is_bool:
            opt = typer.Option(None, f"{f.flag}/--no-{f.flag[2:]}",
                               help=_with_default(f.help, f.flag if f.default else "--no-" + f.flag[2:]),
                               rich_help_panel=opts)
            add(f"f{i}", Optional[bool], opt, _Param("flag", f))
        elif f.is_dict:
            add(f"f{i}", Optional[List[str]], typer.Option(None, f.flag, metavar="KEY=VALUE", rich_help_panel=opts,
                help=_with_default(f"{f.help} (repeat for several)", _show(f.default))), _Param("flag", f))
        else:
            add(f"f{i}", Optional[str], typer.Option(None, f.flag, metavar=_metavar(f.hint), rich_help_panel=opts,
                help=_with_default(f.help, _show(f.default))), _Param("flag", f))
    flags = {f.dotted: f for f in study_flags(study)}
    for j, (target, names) in enumerate(ALIASES.get(study.name, {}).items()):
        key = ("role", target) if target in study.datasets else ("flag", flags[target])
        add(f"a{j}", Optional[List[str]], typer.Option(None, *names, hidden=True), _Param("alias", key))
    return params, meaning


def _with_default(text: str, shown: str) -> str:
    return text if "default:" in text else f"{text} \\[default: {shown}]"


def _panel(option: Any, panel: str) -> Any:
    option.rich_help_panel = panel
    return option


def _flag_value(f: StudyFlag, raw: Any) -> Any:
    if f.is_bool:
        return raw
    if f.is_dict:
        hint = _strip_optional(f.hint)
        vt = typing.get_args(hint)[1] if typing.get_args(hint) else str
        d = {}
        for item in raw:
            k, eq, v = item.partition("=")
            if not eq or not k.strip():
                raise ValueError(f"{f.flag} {item!r}: give KEY=VALUE")
            d[k.strip()] = parse_value(v, vt, f.flag)
        return d
    return parse_value(raw, f.hint, f.flag)


def _split(meaning: Mapping[str, _Param], kw: Mapping[str, Any]):
    """The command's keyword arguments as (common options, dataset roles -> values, flag path -> value)."""
    common: dict[str, Any] = {}
    roles: dict[str, list[str]] = {}
    raw: dict[StudyFlag, Any] = {}
    aliases: list[tuple[tuple[str, Any], list[str]]] = []
    for name, v in kw.items():
        m = meaning[name]
        if m.kind == "common":
            common[m.key] = v
        elif m.kind == "role":
            roles[m.key] = list(v or [])
        elif m.kind == "flag":
            if v is not None:
                raw[m.key] = v
        elif v:
            aliases.append((m.key, list(v)))
    for (kind, target), vals in aliases:  # an old spelling: as if the flag had been given
        if kind == "role":
            roles[target] = roles.get(target, []) + vals
        elif target in raw:
            raise ValueError(f"{target.flag} given twice (once under an old name); give it once")
        else:
            raw[target] = ",".join(vals) if typing.get_origin(_strip_optional(target.hint)) is tuple else vals[-1]
    given = {f.path: _flag_value(f, v) for f, v in raw.items()}
    return common, roles, given


def _command(study):
    params, meaning = _parameters(study)

    def command(**kw: Any) -> None:
        from mechdiff.analyses.study import StudyContext, check_study, layer_counts, run_study

        common, roles, given = _split(meaning, kw)
        try:
            check_output_dir(common["out"])  # before any work, not when the results are saved
            group = group_from_options(common["base"], common["post"], common["labels"], common["name"])
            if study.name == "refusal" and ("phrases",) not in given:
                from mechdiff.pipeline import refusal_phrases

                given = {**given, ("phrases",): refusal_phrases()}  # the embedded pair's own too, as the main job
            config = config_from_flags(study, given)
            datasets = _datasets(study, roles)
            ctx = StudyContext(group, datasets, Path(common["out"]), device=common["device"],
                               model_dtype=common["model_dtype"], progress=common["progress"],
                               load_options={"allow_pickle": common["allow_pickle"],
                                             "trust_remote_code": common["trust_remote_code"]})
            ctx.requirements(study, config)  # the capture plan reads every dataset: bad files fail here
            check_study(study, config, group, datasets,  # what the config cannot check alone
                        layer_counts(group, trust_remote_code=common["trust_remote_code"]))
        except EXPECTED as e:
            fail(e)
        try:
            result = run_study(study, config, ctx, store=common["store"], shard_size=common["shard_size"])
        except EXPECTED as e:
            fail(e)
        from mechdiff.cli.reports import REPORTS

        REPORTS.get(study.name, lambda r: out.print(findings_table(r)))(result)
        out.print(f"results: {Path(common['out']) / study.name}")

    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in params}
    command.__name__ = study.name
    return command


def study_help(study) -> str:
    text = STUDY_MAN.get(study.name) or f"{study.describe or study.name}."
    roles = ", ".join(f"--{r.replace('_', '-')}" for r in study.datasets)
    text = inspect.cleandoc(text) + (
        f"\n\nOPTIONS\n\nEvery study option is a field of {study.Config.__name__} (see `mechdiff.studies.{study.name}`): "
        f"FIELD_NAME as --field-name; lists comma-separated (or @FILE, one item a line); none for an optional "
        f"value. The datasets ({roles}) default to the embedded pair's when none is given; --base/--post to the "
        "embedded pair.")
    return man_help(text)


def study_command(name: str):
    """The click command ``analyze NAME`` (typer builds it from the generated signature)."""
    from mechdiff.analyses.study import get_study

    study = get_study(name)
    one = typer.Typer()
    one.command(name, help=study_help(study))(_command(study))
    return typer.main.get_command(one)


class StudyGroup(TyperGroup):
    """The ``analyze`` group: one command per study of the registry, built when asked for, so that other commands
    (``mechdiff extract``) never import the studies and what they import (xarray, pandas, matplotlib...)."""

    def list_commands(self, ctx: Any) -> list[str]:
        from mechdiff.analyses.study import STUDY_NAMES

        return [*super().list_commands(ctx), *STUDY_NAMES]

    def get_command(self, ctx: Any, name: str) -> Any:
        from mechdiff.analyses.study import STUDY_NAMES

        if name not in STUDY_NAMES:
            return super().get_command(ctx, name)
        if name not in self.commands:
            self.commands[name] = study_command(name)
        return self.commands[name]


analyze_app = typer.Typer(cls=StudyGroup, no_args_is_help=True,
                          help="Run one study on a model group (the main job, `mechdiff run`, runs all four).")
