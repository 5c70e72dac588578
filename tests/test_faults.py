"""Fault injection on the store: each fault ends with a store array-equal to a clean run, or with a one-line
error and the store untouched.

The kills are real SIGKILLs of a separate extraction process, sent from inside it at the exact point (the
process patches the step it dies at), so no timing decides where it stops.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from mechdiff.engine.data import PromptSet
from mechdiff.engine.extract import CaptureSpec, extract
from mechdiff.engine.models import load_model
from mechdiff.engine.store import ActivationStore, open_store
from mechdiff.engine.tiny import random_prompts
from mechdiff.engine.verify import verify_store
from mechdiff.errors import MechdiffError, StoreCorruptError

N, SHARD, GROUP = 20, 4, "g"
SPEC = dict(sites=("resid_post", "mlp_act"), layers="all", positions="last:2")
runner = CliRunner()


@pytest.fixture(scope="module")
def setup(tiny_dir, tmp_path_factory):
    """The model, its prompts (also as a CSV) and a clean reference store."""
    model_dir = tiny_dir("llama", n_layers=3)
    lm = load_model(model_dir)
    texts = random_prompts(N, 3, 16, vocab_size=512, seed=5)
    root = tmp_path_factory.mktemp("faults")
    csv = root / "data.csv"
    csv.write_text("text,label\n" + "".join(f"{t},{i % 2}\n" for i, t in enumerate(texts)))
    from mechdiff.engine.data import load_prompts

    prompts = load_prompts(csv)
    ref = root / "ref.zarr"
    run(lm, prompts, ref)
    return lm, prompts, model_dir, csv, ref


def run(lm, prompts: PromptSet, url: Path):
    return extract(lm, prompts, CaptureSpec(**SPEC), str(url), GROUP, shard_size=SHARD, progress=False)


def assert_equal_to(ref: Path, url: Path) -> None:
    a, b = open_store(str(ref), GROUP), open_store(str(url), GROUP)
    assert set(a.variables) == set(b.variables)
    for v in a.variables:
        np.testing.assert_array_equal(a[v].values, b[v].values, err_msg=v)
    rep = ActivationStore.open(str(url), GROUP).check(checksums=True)
    assert rep.ok and rep.done == list(range(N // SHARD)), rep.summary()


def tree(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.rglob("*")) if p.is_file()}


def chunk_file(url: Path, array: str, shard: int) -> Path:
    st = ActivationStore.open(str(url), GROUP)
    grid = next(g for g in st._grids() if g.name == array)
    return url / GROUP / array / grid.keys(shard)[0]


def copy_of(ref: Path, tmp_path: Path) -> Path:
    url = tmp_path / "s.zarr"
    shutil.copytree(ref, url)
    return url


# --------------------------------------------------------------------------- kills

_KILLER = textwrap.dedent(
    """
    import os, signal, sys
    import xarray as xr
    from mechdiff.engine import store as S
    from mechdiff.engine.data import load_prompts
    from mechdiff.engine.extract import CaptureSpec, extract
    from mechdiff.engine.models import load_model

    point, model, data, out = sys.argv[1:5]
    die = lambda: os.kill(os.getpid(), signal.SIGKILL)
    calls = [0]
    if point == "create":
        # the skeleton's arrays and coords are written, the done flags and the marker are not
        import zarr
        create_group = zarr.Group.create_group
        def patched(self, name, *a, **k):
            if name == S._PROGRESS:
                die()
            return create_group(self, name, *a, **k)
        zarr.Group.create_group = patched
    elif point == "mid-shard":
        # shard 1: its first array is written, its second is not
        write = S.ActivationStore._write_array
        def patched(self, *a, **k):
            calls[0] += 1
            write(self, *a, **k)
            if calls[0] == 3:
                die()
        S.ActivationStore._write_array = patched
    elif point == "before-flag":
        # shard 2: all of its data is written and synced, its done flag is not
        mark = S.ActivationStore._mark_done
        def patched(self, i):
            if i == 2:
                die()
            mark(self, i)
        S.ActivationStore._mark_done = patched
    spec = CaptureSpec(sites=("resid_post", "mlp_act"), layers="all", positions="last:2")
    extract(load_model(model), load_prompts(data), spec, out, "g", shard_size=4, progress=False)
    print("finished without being killed")
    """
)


@pytest.mark.parametrize("point", ["create", "mid-shard", "before-flag"])
def test_sigkill_then_rerun_equals_clean_run(setup, tmp_path, point):
    lm, prompts, model_dir, csv, ref = setup
    script = tmp_path / "killer.py"
    script.write_text(_KILLER)
    url = tmp_path / "killed.zarr"
    proc = subprocess.run([sys.executable, str(script), point, str(model_dir), str(csv), str(url)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    if point == "create":
        # a group whose creation was killed is recognised as such, not as a foreign group
        with pytest.raises(MechdiffError, match="incomplete"):
            ActivationStore.open(str(url), GROUP)
    else:
        st = ActivationStore.open(str(url), GROUP)
        done = {"mid-shard": [0], "before-flag": [0, 1]}[point]
        assert st.done_shards() == done and st.check(checksums=True).ok
    rep = run(lm, prompts, url)
    assert rep.shards_written == {"create": 5, "mid-shard": 4, "before-flag": 3}[point]
    assert_equal_to(ref, url)


# --------------------------------------------------------------------------- damaged chunks and flags


def test_deleted_chunk_is_refused_and_exactly_its_shard_rewritten(setup, tmp_path):
    lm, prompts, _, _, ref = setup
    url = copy_of(ref, tmp_path)
    chunk_file(url, "resid_post", 1).unlink()
    with pytest.raises(StoreCorruptError) as e:
        open_store(str(url), GROUP)
    msg = str(e.value)
    assert "\n" not in msg and "resid_post" in msg and "shard 1" in msg and "missing" in msg and "extraction" in msg
    info = ActivationStore.open(str(url), GROUP).info()
    assert info.damaged_shards == [1] and info.fraction_done == 0.8
    rep = verify_store(str(url), GROUP, sample=0)
    assert not rep.ok and rep.integrity.damaged_shards == [1]
    out = run(lm, prompts, url)
    assert out.shards_written == 1 and out.shards_skipped == 4
    assert_equal_to(ref, url)


def test_flipped_bytes_fail_on_read_and_verify_repair_rewrites_the_shard(setup, tmp_path):
    lm, prompts, _, _, ref = setup
    url = copy_of(ref, tmp_path)
    f = chunk_file(url, "mlp_act", 2)
    b = bytearray(f.read_bytes())
    b[len(b) // 2] ^= 0xFF
    f.write_bytes(bytes(b))
    before = tree(url)
    ds = open_store(str(url), GROUP)  # the listing is complete: presence is fine
    with pytest.raises(StoreCorruptError, match=r"mlp_act \(shard 2\).*checksum"):
        ds["mlp_act"].values
    ds["resid_post"].values  # other arrays still read
    rep = verify_store(str(url), GROUP, sample=0)
    assert not rep.ok and rep.integrity.damaged_shards == [2] and rep.integrity.problems[0].problem == "checksum mismatch"
    assert tree(url) == before  # checking touches nothing
    rep = verify_store(str(url), GROUP, sample=0, repair=True)
    assert rep.repaired == [2]
    out = run(lm, prompts, url)
    assert out.shards_written == 1
    assert_equal_to(ref, url)


def test_deleted_done_flag_rewrites_that_shard(setup, tmp_path):
    lm, prompts, _, _, ref = setup
    url = copy_of(ref, tmp_path)
    (url / GROUP / "_progress" / "done" / "c.3").unlink()
    assert ActivationStore.open(str(url), GROUP).missing_shards() == [3]
    out = run(lm, prompts, url)
    assert out.shards_written == 1
    assert_equal_to(ref, url)


def test_truncated_array_metadata_is_one_line_and_touches_nothing(setup, tmp_path):
    lm, prompts, _, _, ref = setup
    url = copy_of(ref, tmp_path)
    meta = url / GROUP / "resid_post" / "zarr.json"
    meta.write_bytes(meta.read_bytes()[:40])
    before = tree(url)
    for call in (lambda: open_store(str(url), GROUP), lambda: run(lm, prompts, url)):
        with pytest.raises(StoreCorruptError) as e:
            call()
        msg = str(e.value)
        assert "\n" not in msg and f"{GROUP}/resid_post/zarr.json" in msg
    assert tree(url) == before


def test_corrupt_group_metadata_names_the_file(setup, tmp_path):
    _, _, _, _, ref = setup
    url = copy_of(ref, tmp_path)
    (url / GROUP / "zarr.json").write_text("{not json")
    with pytest.raises(StoreCorruptError, match=f"{GROUP}/zarr.json"):
        open_store(str(url), GROUP)


def test_corrupt_chunk_from_the_cli_is_one_line(setup, tmp_path):
    _, _, _, _, ref = setup
    url = copy_of(ref, tmp_path)
    chunk_file(url, "resid_post", 4).unlink()
    r = runner.invoke(_app(), ["store", "verify", str(url), "--group", GROUP, "--sample", "0"])
    assert r.exit_code == 1, r.output
    assert "shard 4" in r.output and "--repair" in r.output
    r = runner.invoke(_app(), ["store", "info", str(url)])
    assert r.exit_code == 0 and "80% done" in r.output and "damaged" in r.output


def _app():
    from mechdiff.cli import app

    return app


# --------------------------------------------------------------------------- the disk


def test_full_disk_fails_cleanly_and_the_rerun_completes(setup, tmp_path, monkeypatch):
    import zarr.storage._local as local

    lm, prompts, _, _, ref = setup
    url = tmp_path / "full.zarr"
    put = local._put
    writes = [0]

    def full(path, value, exclusive=False):
        if "/c." in str(path) and ("resid_post" in str(path) or "mlp_act" in str(path)):
            writes[0] += 1
            if writes[0] > 4:  # a few shards in (one shard object per array and shard), the disk fills up
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return put(path, value, exclusive)

    monkeypatch.setattr(local, "_put", full)
    with pytest.raises(OSError) as e:
        run(lm, prompts, url)
    assert e.value.errno == errno.ENOSPC
    monkeypatch.setattr(local, "_put", put)
    st = ActivationStore.open(str(url), GROUP)
    assert 0 < len(st.done_shards()) < N // SHARD and st.check(checksums=True).ok
    run(lm, prompts, url)
    assert_equal_to(ref, url)


@pytest.fixture
def readonly_dir(tmp_path):
    """A directory on a read-only mount (as root, chmod does not stop writes; a read-only mount does)."""
    d = tmp_path / "ro"
    d.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(d)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here to make a read-only directory: {r.stderr.strip()}")
    yield d
    subprocess.run(["umount", str(d)], capture_output=True)


def test_read_only_output_fails_before_work_and_touches_nothing(setup, readonly_dir):
    lm, prompts, model_dir, csv, ref = setup
    url = readonly_dir / "s.zarr"
    shutil.copytree(ref, url)
    (url / GROUP / "_progress" / "done" / "c.0").unlink()  # one shard left to do
    subprocess.run(["mount", "-o", "remount,ro", str(readonly_dir)], check=True)
    before = tree(url)
    with pytest.raises(PermissionError, match="not writable"):
        run(lm, prompts, url)
    r = runner.invoke(_app(), ["extract", "--model", str(model_dir), "--data", str(csv), "--out", str(readonly_dir / "new.zarr"),
                               "--sites", "resid_post"])
    assert r.exit_code == 2, r.output
    assert "not writable" in r.output and "Traceback" not in r.output
    assert tree(url) == before and not (readonly_dir / "new.zarr").exists()
