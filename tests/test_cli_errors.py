"""Bad input on the command line: one line on stderr (``error: ...``), exit 2, no traceback, and no work done
before the error (no weights loaded, no training, nothing written)."""

from __future__ import annotations

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
    """Every CLI module reports through mechdiff.cli_common.fail (no copies left)."""
    root = Path(__file__).resolve().parents[1] / "mechdiff"
    files = [root / "cli.py", root / "zoo" / "cli.py", root / "cluster" / "cli.py", *sorted((root / "analyses").glob("*_cli.py"))]
    for f in files:
        text = f.read_text()
        assert "def fail(" not in text and "def _fail(" not in text, f


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
    from mechdiff.cli import _config_layers
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


def test_early_tokenizer_is_the_loaded_one(model):
    """The early checks compare the hash of the tokenizer load_model would give."""
    from mechdiff.engine.models import load_model, load_tokenizer, tokenizer_hash

    assert tokenizer_hash(load_tokenizer(model)) == load_model(model).tokenizer_hash


def test_early_provenance_matches_prepare(tiny_llama, model, data):
    """precheck computes the provenance entries prepare() stores, by the same functions."""
    from mechdiff.engine.data import load_prompts
    from mechdiff.engine.extract import CaptureSpec, prepare
    from mechdiff.engine.models import load_tokenizer
    from mechdiff.engine.precheck import config_max_positions, config_n_layers, early_provenance, read_config

    prompts = load_prompts(data)
    cfg = read_config(model)
    assert config_n_layers(cfg, model) == tiny_llama.adapter.n_layers
    assert config_max_positions(cfg) == tiny_llama.adapter.max_positions
    for spec in (CaptureSpec(), CaptureSpec(sites=("mlp_out", "resid_pre"), layers="1:3", positions="all", template="chat")):
        early = early_provenance(load_tokenizer(model), config_n_layers(cfg, model), config_max_positions(cfg), prompts, spec)
        full = prepare(tiny_llama, prompts, spec).provenance
        assert {k: full[k] for k in early} == early


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
