"""Bad input on the command line: one line on stderr (``error: ...``), exit 2, no traceback, and no work done
before the error (no weights loaded, no training, nothing written)."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mechdiff.cli import app
from mechdiff.errors import MechdiffError

runner = CliRunner()


class Reached(MechdiffError):
    """Raised by a monkeypatched step to show that the command got past its checks."""


def _no_call(what: str):
    def boom(*a, **k):
        raise AssertionError(f"{what} ran before the bad input was refused")

    return boom


def error_of(args, *needles, code=2) -> str:
    """Run ``mechdiff ARGS``; check it failed with exactly one ``error:`` line holding every needle."""
    r = runner.invoke(app, [str(a) for a in args])
    assert r.exit_code == code, r.output
    assert "Traceback" not in r.output, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


@contextmanager
def read_only_dir(path: Path):
    """A directory nobody (root included) can create files in. As root chmod does not stop writes, so the
    immutable flag (chattr +i) is used; skip, saying why, where neither works."""
    path.mkdir()
    if os.geteuid() != 0:
        path.chmod(0o500)
        undo = lambda: path.chmod(0o700)  # noqa: E731
    else:
        chattr = shutil.which("chattr")
        if chattr is None or subprocess.run([chattr, "+i", str(path)], capture_output=True).returncode != 0:
            pytest.skip("tests run as root, where chmod does not stop writes, and `chattr +i` is not available here")
        undo = lambda: subprocess.run([chattr, "-i", str(path)], check=True)  # noqa: E731
    try:
        try:
            (path / "probe").touch()
        except OSError:
            pass
        else:
            pytest.skip(f"{path} stayed writable after making it read-only")
        yield path
    finally:
        undo()


@pytest.fixture
def model(tiny_dir):
    return str(tiny_dir("llama", n_layers=3))  # max_position_embeddings 256


@pytest.fixture
def data(tmp_path):
    p = tmp_path / "good.csv"
    p.write_text("text,label\nw1 w2 w3,1\nw4 w5,0\nw6 w7 w8 w9,1\n")
    return p


# ------------------------------------------------------------------------------------ the error path


def test_unexpected_errors_are_one_line_and_debug_shows_the_traceback(monkeypatch, tmp_path):
    import mechdiff.engine.store as store_mod

    def broken(*a, **k):
        raise TypeError("something unplanned\nover two lines")

    monkeypatch.setattr(store_mod, "store_info", broken)
    line = error_of(["store", "info", tmp_path], "TypeError: something unplanned over two lines", "--debug")
    assert "unexpected" in line
    r = runner.invoke(app, ["--debug", "store", "info", str(tmp_path)])
    assert isinstance(r.exception, TypeError)  # raised, so the shell shows its traceback

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(store_mod, "store_info", interrupted)
    error_of(["store", "info", tmp_path], "interrupted", code=130)


def test_usage_errors_keep_typers_handling():
    r = runner.invoke(app, ["store", "verify"])  # missing argument
    assert r.exit_code == 2 and "Missing argument" in r.output


def test_console_script_prints_one_line_and_the_traceback_with_debug(tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    cmd = [sys.executable, "-m", "mechdiff.cli"]
    r = subprocess.run([*cmd, "run", "--out", str(f)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == f"error: output {f} exists and is not a directory; give a directory path"
    r = subprocess.run([*cmd, "--debug", "run", "--out", str(f)], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "Traceback" in r.stderr and "OutputError" in r.stderr


def test_one_fail_function():
    """One error path: fail() is defined once, in mechdiff/cli/common.py, and every command module uses it (no
    copies, no error printed another way)."""
    root = Path(__file__).resolve().parents[1] / "mechdiff"
    files = sorted((root / "cli").glob("*.py"))
    assert {f.name for f in files} >= {"__init__.py", "common.py", "extract.py", "store.py", "run.py", "analyze.py",
                                       "sweep.py", "zoo.py"}
    defined = [f.name for f in files if re.search(r"^def _?fail\(", f.read_text(), re.M)]
    assert defined == ["common.py"]
    for f in files:
        text = f.read_text()
        assert not re.search(r"(print|echo)\(f?[\"'][^\"']*error:", text) or f.name == "common.py", \
            f"{f.name} prints its own error line"
        if f.name in ("extract.py", "store.py", "run.py", "analyze.py", "sweep.py", "zoo.py"):
            assert "from mechdiff.cli.common import" in text and "fail" in text, f


def test_python_dash_m_mechdiff(tmp_path):
    """``python -m mechdiff`` and ``python -m mechdiff.cli`` are the console script."""
    for mod in ("mechdiff", "mechdiff.cli"):
        r = subprocess.run([sys.executable, "-m", mod, "zoo", "path", "nope"], capture_output=True, text=True, timeout=300)
        assert r.returncode == 2 and "expected one of" in r.stderr, r.stderr


def test_console_script_ends_after_exit_handlers_and_flushed_output():
    """The console script skips the interpreter's teardown, not what exit must do: exit handlers run, piped
    (block-buffered) output arrives, the status is the command's; with a non-daemon thread still running, or
    MECHDIFF_FAST_EXIT=0, it exits the ordinary way (the thread is waited for, the teardown happens). The
    teardown shows as a module-level object's finalizer, which only the interpreter's teardown calls."""
    probe = ("import atexit, sys, threading, time; atexit.register(lambda: print('handler ran'));"
             "Torn = type('Torn', (), {{'__del__': lambda self: print('torn down')}}); marker = Torn();"
             "sys.argv = ['mechdiff', 'zoo', 'path', {what!r}];"
             "{extra}"
             "from mechdiff.cli import main; main()")

    def run(what="base", extra="", **env):
        return subprocess.run([sys.executable, "-c", probe.format(what=what, extra=extra)], capture_output=True,
                              text=True, timeout=300, env={**os.environ, **env})

    for what, status in (("base", 0), ("nope", 2)):
        r = run(what)
        assert r.returncode == status, r.stderr
        assert r.stdout.rstrip().endswith("handler ran") and "torn down" not in r.stdout
        assert (status == 0) == bool(re.search(r"^/.*base", r.stdout, re.M))
    r = run(extra="threading.Thread(target=lambda: (time.sleep(1), print('thread done'))).start();")
    assert r.returncode == 0 and "thread done" in r.stdout and "handler ran" in r.stdout and "torn down" in r.stdout
    r = run(MECHDIFF_FAST_EXIT="0")
    assert r.returncode == 0 and "handler ran" in r.stdout and "torn down" in r.stdout


# ------------------------------------------------------------------------------------ mechdiff run --out


def test_run_out_is_a_file(tmp_path, monkeypatch):
    import mechdiff.pipeline as pipeline

    monkeypatch.setattr(pipeline, "run_group", _no_call("run_group"))
    f = tmp_path / "afile"
    f.write_text("x")
    error_of(["run", "--out", f, "--quick"], f"output {f} exists and is not a directory")
    assert f.read_text() == "x"


def test_run_out_is_read_only(tmp_path, monkeypatch):
    import mechdiff.pipeline as pipeline

    monkeypatch.setattr(pipeline, "run_group", _no_call("run_group"))
    with read_only_dir(tmp_path / "ro") as ro:
        error_of(["run", "--out", ro, "--quick"], f"output {ro} is not writable", str(ro))
        error_of(["run", "--out", ro / "sub", "--quick"], "is not writable", str(ro))


# ------------------------------------------------------------------------------------ store verify --sample


def test_verify_sample_negative_is_refused_and_zero_does_not_crash(model, data, tmp_path):
    url = tmp_path / "s.zarr"
    r = runner.invoke(app, ["extract", "--model", model, "--data", str(data), "--out", str(url), "--group", "g"])
    assert r.exit_code == 0, r.output
    error_of(["store", "verify", url, "--sample", "-1"], "--sample -1", "0 or more")
    r = runner.invoke(app, ["store", "verify", str(url), "--sample", "0"])
    assert r.exit_code == 0 and "no examples re-run" in r.output and "Traceback" not in r.output, r.output


# ------------------------------------------------------------------------------------ a missing model directory


def test_missing_model_directory_is_named(data, tmp_path, monkeypatch):
    from mechdiff.cli.extract import config_layers as _config_layers
    from mechdiff.engine.models import ModelLoadError, load_model, load_tokenizer

    monkeypatch.chdir(tmp_path)
    for m in ("./does-not-exist", "../nope", "~/nope-mechdiff", str(tmp_path / "nope"), "a/b/c"):
        msg = f"model directory {m} does not exist"
        error_of(["extract", "--model", m, "--data", data, "--out", tmp_path / "s.zarr"], msg)
        for f in (load_model, load_tokenizer, lambda x: _config_layers(x, False)):
            with pytest.raises(ModelLoadError, match="^" + re.escape(msg) + "$"):
                f(m)
    assert not (tmp_path / "s.zarr").exists()


# ------------------------------------------------------------------------------------ an incomplete store


def _incomplete_store(model, data, tmp_path) -> Path:
    url = tmp_path / "s.zarr"
    r = runner.invoke(app, ["extract", "--model", model, "--data", str(data), "--out", str(url), "--group", "g"])
    assert r.exit_code == 0, r.output
    shutil.rmtree(url / "g" / "_progress" / "done")  # what an interrupted creation leaves
    return url


def test_incomplete_store_in_store_info(model, data, tmp_path):
    url = _incomplete_store(model, data, tmp_path)
    error_of(["store", "info", url], f"store {url} group g is incomplete")


def test_incomplete_store_in_extract_before_weights_load(model, data, tmp_path, monkeypatch):
    url = _incomplete_store(model, data, tmp_path)
    import mechdiff.engine.models as models

    monkeypatch.setattr(models, "load_model", _no_call("load_model"))
    error_of(["extract", "--model", model, "--data", data, "--out", url, "--group", "g"], "group g is incomplete")


# ------------------------------------------------------------------------------------ extract: checks before weights


def test_extract_refuses_before_loading_weights(model, data, tmp_path, monkeypatch):
    import mechdiff.engine.models as models

    url = tmp_path / "s.zarr"
    base = ["extract", "--model", model, "--out", url, "--group", "g"]
    r = runner.invoke(app, [str(a) for a in [*base, "--data", data, "--positions", "last"]])
    assert r.exit_code == 0, r.output

    def reached(*a, **k):
        raise Reached("reached load_model")

    monkeypatch.setattr(models, "load_model", reached)
    # the same run gets through every early check
    error_of([*base, "--data", data, "--positions", "last"], "reached load_model")
    # another capture spec: the line names what differs
    error_of([*base, "--data", data, "--positions", "last:2"], "group g was made with another capture spec",
             "positions stored last, this run last:2")
    error_of([*base, "--data", data, "--layers", "0:2"], "another capture spec", "layers stored [0,1,2], this run [0,1]")
    # another dataset
    other = tmp_path / "other.csv"
    other.write_text("text,label\nw9 w8,1\nw7 w6 w5,0\nw4,1\n")
    error_of([*base, "--data", other], "was made from another dataset", str(data), str(other))
    # another shard size
    error_of([*base, "--data", data, "--shard-size", "2"], "shard size differs: stored 256, this run 2")
    # another model with the same architecture: known by its weights hash, before loading them
    monkeypatch.undo()
    from mechdiff.engine.tiny import build_tiny_model

    other_model = str(build_tiny_model(tmp_path / "m2", arch="llama", n_layers=3, seed=7))
    monkeypatch.setattr(models, "load_model", reached)
    error_of(["extract", "--model", other_model, "--out", url, "--group", "g", "--data", data], "was made by model")


def test_extract_refuses_long_prompts_before_loading_weights(model, tmp_path, monkeypatch):
    import mechdiff.engine.models as models

    def reached(*a, **k):
        raise Reached("reached load_model")

    monkeypatch.setattr(models, "load_model", reached)
    longer = tmp_path / "long.csv"
    longer.write_text("text\nw1 w2\n" + " ".join(["w1"] * 300) + "\n")
    args = ["extract", "--model", model, "--data", longer, "--out", tmp_path / "s.zarr"]
    error_of(args, "example 1 has", "more than the model's context of 256", "--truncate")
    error_of([*args, "--truncate"], "reached load_model")  # allowed with --truncate
    missing = tmp_path / "nomarker.csv"
    missing.write_text("text\nw1 w2\nw3 w4\n")
    error_of(["extract", "--model", model, "--data", missing, "--out", tmp_path / "s.zarr", "--positions", "from:w9"],
             "marker 'w9'", "not found")
    assert not (tmp_path / "s.zarr").exists()


def test_extract_backend_is_checked_and_vllm_without_a_gpu_is_one_line(model, data, tmp_path):
    base = ["extract", "--model", model, "--data", data, "--out", tmp_path / "s.zarr"]
    error_of([*base, "--backend", "onnx"], "--backend 'onnx': hf or vllm")
    # no vLLM or no GPU here: said before the store is touched
    error_of([*base, "--backend", "vllm"], "vLLM")
    assert not (tmp_path / "s.zarr").exists()


def test_early_tokenizer_is_the_loaded_one(model):
    """The early checks compare the hash of the tokenizer load_model would give."""
    from mechdiff.engine.models import load_model, load_tokenizer, tokenizer_hash

    assert tokenizer_hash(load_tokenizer(model)) == load_model(model).tokenizer_hash


def test_early_provenance_matches_prepare(tiny_llama, model, data):
    """precheck computes the provenance entries prepare() stores, by the same functions."""
    from mechdiff.engine.data import load_prompts
    from mechdiff.engine.extract import CaptureSpec, prepare
    from mechdiff.engine.models import load_tokenizer, tokenizer_hash
    from mechdiff.engine.precheck import (config_max_positions, config_n_layers, early_provenance, early_tokenization,
                                          read_config)

    prompts = load_prompts(data)
    cfg = read_config(model)
    assert config_n_layers(cfg, model) == tiny_llama.adapter.n_layers
    assert config_max_positions(cfg) == tiny_llama.adapter.max_positions
    for spec in (CaptureSpec(), CaptureSpec(sites=("mlp_out", "resid_pre"), layers="1:3", positions="all", template="chat")):
        tok = load_tokenizer(model)
        tokens = early_tokenization(tok, config_n_layers(cfg, model), config_max_positions(cfg), prompts, spec)
        early = early_provenance(tokenizer_hash(tok), config_n_layers(cfg, model), prompts, spec)
        prep = prepare(tiny_llama, prompts, spec)
        assert {k: prep.provenance[k] for k in early} == early
        # and the tokenization the loaded model would make, under the key it computes
        assert (tokens.key, tokens.token_ids, tokens.counts) == (prep.tokenization_key, prep.token_ids, prep.counts)


# ------------------------------------------------------------------------------------ zoo build --out


def test_zoo_build_refuses_a_non_empty_or_file_target(tmp_path, monkeypatch):
    import mechdiff.zoo.build as build

    monkeypatch.setattr(build, "_build_into", _no_call("the build"))
    full = tmp_path / "pair"
    (full / "base").mkdir(parents=True)
    (full / "base" / "keep.txt").write_text("mine")
    error_of(["zoo", "build", "--out", full], f"--out {full} is not empty")
    assert (full / "base" / "keep.txt").read_text() == "mine"
    f = tmp_path / "afile"
    f.write_text("x")
    error_of(["zoo", "build", "--out", f], f"--out {f} exists and is not a directory")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "pair"]  # no temporary directory left


def test_zoo_build_builds_beside_and_renames_into_place(tmp_path, monkeypatch):
    """With the slow build replaced by one that writes a few files: the result appears only when complete."""
    import mechdiff.zoo.build as build

    seen = {}

    def fake(out, *, steps, seed, progress, evaluate):
        seen["dir"] = out
        assert out.parent == tmp_path and ".building-" in out.name and out.is_dir() and not any(out.iterdir())
        target = tmp_path / out.name[1:].split(".building-")[0]
        assert not target.exists() or not any(target.iterdir())  # OUT fills only when the build is complete
        (out / "base").mkdir()
        (out / "base" / "model.safetensors").write_bytes(b"w")
        (out / "manifest.json").write_text("{}")

    monkeypatch.setattr(build, "_build_into", fake)
    r = runner.invoke(app, ["zoo", "build", "--out", str(tmp_path / "pair"), "--steps", "1", "--no-evaluate"])
    assert r.exit_code == 0, r.output
    assert sorted(p.relative_to(tmp_path / "pair").as_posix() for p in (tmp_path / "pair").rglob("*")) == [
        "base", "base/model.safetensors", "manifest.json"]
    assert seen["dir"].name.startswith(".pair.building-") and not seen["dir"].exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pair"]
    # an existing empty directory is a fine target too
    (tmp_path / "empty").mkdir()
    assert build.build_pair(tmp_path / "empty", steps=1) == tmp_path / "empty"
    assert (tmp_path / "empty" / "manifest.json").exists()

    # a build that fails half-way leaves neither OUT nor its temporary directory
    def half(out, **kw):
        (out / "base").mkdir()
        raise KeyboardInterrupt

    monkeypatch.setattr(build, "_build_into", half)
    with pytest.raises(KeyboardInterrupt):
        build.build_pair(tmp_path / "killed")
    assert not (tmp_path / "killed").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# ------------------------------------------------------------------------------------ analyze: OUT checked first


@pytest.mark.parametrize("study, runner_name", [("confidence", "run_confidence"), ("knowledge", "run_knowledge")])
def test_analyze_checks_out_before_work(study, runner_name, tmp_path, monkeypatch):
    import importlib

    mod = importlib.import_module(f"mechdiff.analyses.{study}")
    monkeypatch.setattr(mod, runner_name, _no_call(runner_name))
    f = tmp_path / "afile"
    f.write_text("x")
    error_of(["analyze", study, "--out", f], f"output {f} exists and is not a directory")
    with read_only_dir(tmp_path / "ro") as ro:
        error_of(["analyze", study, "--out", ro], f"output {ro} is not writable")


# ------------------------------------------------------------------------------------ analyze: flags from the Config


def _field_paths(cls, prefix=()):
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _field_paths(hints[f.name], (*prefix, f.name))
        else:
            yield (*prefix, f.name)


@pytest.mark.parametrize("name", ["knowledge", "truthfulness", "refusal", "confidence"])
def test_every_config_field_is_a_flag_of_its_analyze_command(name):
    from mechdiff.analyses.study import get_study
    from mechdiff.cli.analyze import study_flags

    study = get_study(name)
    flags = {f.path: f.flag for f in study_flags(study)}
    assert set(flags) == set(_field_paths(study.Config)), "a Config field without a flag"
    assert len(set(flags.values())) == len(flags)
    r = runner.invoke(app, ["analyze", name, "--help"], env={"COLUMNS": "250"})
    assert r.exit_code == 0, r.output
    for flag in flags.values():
        assert f" {flag} " in r.output or f" {flag}\n" in r.output, (flag, "not in --help")
    for role in study.datasets:
        assert f"--{role}" in r.output
    for heading in ("OUTPUT", "EXAMPLE", "EXIT STATUS"):
        assert heading in r.output


@pytest.mark.parametrize("name", ["knowledge", "truthfulness", "refusal", "confidence"])
def test_each_flag_given_its_default_as_text_gives_the_default_config(name):
    """The text of each default, parsed by the flag's type and through config_from_options, is the default: every
    kind of field (int, float, str, Optional, tuple, nested dataclass) reads back."""
    from mechdiff.analyses.study import get_study
    from mechdiff.cli.analyze import _show, config_from_flags, parse_value, study_flags

    study = get_study(name)
    for f in study_flags(study):
        if f.is_dict or f.is_bool:
            continue
        text = _show(f.default)
        text = eval(text) if text.startswith("'") else text  # a quoted default (e.g. a suffix starting with a space)
        value = parse_value(text, f.hint, f.flag)
        assert config_from_flags(study, {f.path: value}) == study.Config(), f.flag


@dataclasses.dataclass(frozen=True)
class _Inner:
    depth: int = 3  # how deep to go


@dataclasses.dataclass(frozen=True)
class _MadeUpConfig:
    """A made-up study. ``ratio``: a share of the rows."""

    brand_new: tuple[float, ...] = (1.0, 2.0)  # values to try
    ratio: float = 0.5
    maybe: int | None = None
    fast: bool = False
    inner: _Inner = _Inner()

    def __post_init__(self):
        if not 0 < self.ratio <= 1:
            raise ValueError(f"ratio must lie in (0, 1], got {self.ratio}")


def test_a_new_config_field_is_a_flag_with_no_cli_edit(tmp_path):
    """A study whose Config gains a field gets the flag, its help from the field's comment, and its value
    through config_from_options."""
    import typer

    from mechdiff.analyses.study import StudyDef
    from mechdiff.cli.analyze import _command, config_from_flags, parse_value, study_flags

    seen = {}
    study = StudyDef("madeup", _MadeUpConfig, ("texts",), lambda c, g, d: [], lambda ctx, c: seen.setdefault("config", c))
    flags = {f.flag: f for f in study_flags(study)}
    assert set(flags) == {"--brand-new", "--ratio", "--maybe", "--fast", "--depth"}
    assert flags["--brand-new"].help == "values to try." and flags["--depth"].help == "how deep to go."
    assert flags["--ratio"].help.startswith("a share of the rows")
    assert config_from_flags(study, {("brand_new",): parse_value("3,4.5", flags["--brand-new"].hint, "--brand-new"),
                                     ("inner", "depth"): 7, ("fast",): True}) == _MadeUpConfig(
        (3.0, 4.5), fast=True, inner=_Inner(7))
    sub = typer.Typer()
    sub.command("madeup")(_command(study))
    sub.command("other")(lambda: None)
    r = runner.invoke(sub, ["madeup", "--help"], env={"COLUMNS": "200"})
    assert r.exit_code == 0 and "--brand-new" in r.output and "--no-fast" in r.output and "--depth" in r.output
    r = runner.invoke(sub, ["madeup", "--ratio", "2", "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "ratio must lie in (0, 1], got 2.0" in r.stderr, r.output


def _reached_run(monkeypatch, seen):
    import mechdiff.analyses.study as study_mod

    def reached(study, config, ctx, **kw):
        seen.update(study=study.name, config=config, ctx=ctx, kw=kw)
        raise Reached("reached run_study")

    monkeypatch.setattr(study_mod, "run_study", reached)


def test_analyze_defaults_to_the_embedded_pair_for_every_study(tmp_path, monkeypatch):
    """No --base/--post (refusal included, which required them before) and no datasets: the embedded pair and its
    datasets; the study gets the Config with only the given flags changed."""
    from mechdiff.zoo.paths import zoo_path

    seen = {}
    _reached_run(monkeypatch, seen)
    for name, extra, check in (
        ("refusal", ["--n-val", "5", "--phrases", "w5,w9 w1", "--no-select-all", "--templates", "post=chat"],
         lambda c: c.n_val == 5 and c.phrases == ("w5", "w9 w1") and c.templates == {"post": "chat"}),
        ("knowledge", ["--layers", "0:2", "--n-bootstrap", "7", "--min-gap", "none"],
         lambda c: c.layers == "0:2" and c.controls.n_bootstrap == 7 and c.min_gap is None),
        ("truthfulness", ["--heldout-topics", "cities", "--iv-layers", "0,2:4", "--center-by-topic"],
         lambda c: c.heldout_topics == ("cities",) and c.iv_layers == (0, 2, 3) and c.center_by_topic),
        ("confidence", ["-q", "0.5", "--bootstrap", "9", "--q-factors", "1,2"],
         lambda c: c.q == 0.5 and c.n_bootstrap == 9 and c.q_factors == (1.0, 2.0)),
    ):
        error_of(["analyze", name, "--out", tmp_path / name, *extra], "reached run_study")
        assert seen["study"] == name and check(seen["config"]), seen["config"]
        ctx = seen["ctx"]
        assert ctx.group.models == {"base": str(zoo_path("base")), "post": str(zoo_path("post"))}
        assert all(ctx.datasets[r] is not None for r in ctx.datasets if r != "shots"), ctx.datasets


@pytest.mark.parametrize("args, needles", [
    (["analyze", "refusal", "--n-val", "abc"], ["--n-val 'abc': not a whole number"]),
    (["analyze", "refusal", "--kl-max", "lots"], ["--kl-max 'lots'", "not a number"]),
    (["analyze", "refusal", "--templates", "chat"], ["--templates 'chat': give KEY=VALUE"]),
    (["analyze", "refusal", "--harmful", "/no/such.csv"], ["--harmful /no/such.csv: no such file"]),
    (["analyze", "refusal", "--phrases", "@/no/phrases.txt"], ["--phrases @/no/phrases.txt: no such file"]),
    (["analyze", "confidence", "--q", "1.5"], ["q must be a fraction in (0, 1], got 1.5"]),
    (["analyze", "confidence", "--bootstrap", "3", "--n-bootstrap", "4"], ["--n-bootstrap given twice"]),
    (["analyze", "knowledge", "--n-bootstrap", "0"], ["n_bootstrap must be at least 1"]),
    (["analyze", "knowledge", "--normalisation", "nie"], ["normalisation 'nie': one of logit, paper"]),
    (["analyze", "knowledge", "--no-few-shot", "--shots", __file__], ["few_shot is off but shots are given"]),
    (["analyze", "truthfulness", "--probe-layer", "99"], ["probe_layer 99: model 'base' has layers 0..5"]),
    (["analyze", "truthfulness", "--heldout-topics", "moon"], ["heldout_topics moon: not among the statements' topics"]),
    (["analyze", "knowledge", "--base", "./no-model-here"], ["give both --base and at least one --post"]),
])
def test_analyze_bad_flags_are_one_line_before_any_work(args, needles, tmp_path, monkeypatch):
    seen = {}
    _reached_run(monkeypatch, seen)
    error_of([*args, "--out", tmp_path / "out"], *needles)
    assert not seen and not (tmp_path / "out").exists()
