"""mechdiff.cluster under faults: an actor killed (ray.kill) while units are in flight, an unreachable cluster
address, an output path that is a file, and finished stores that a changed sweep must not reuse.

Only the killed-actor test starts Ray: one node of 2 CPUs on 127.0.0.1 (ray.cluster_utils, its own temp dir),
stopped at the end of the test. The others need no Ray: an address is refused before Ray is asked.
"""

from __future__ import annotations

import csv
import shutil
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from mechdiff import open_store
from mechdiff.cluster.sweep import SweepError, load_sweep, plan_sweep
from mechdiff.engine.data import load_prompts
from mechdiff.engine.extract import extract
from mechdiff.engine.models import load_model
from mechdiff.engine.store import ActivationStore
from mechdiff.engine.tiny import build_tiny_model, random_prompts

pytestmark = pytest.mark.timeout(300)

SHARD = 4
BUDGET = 256
N = 20  # 5 shards per model


def _yaml(output: str, *, layers: str = "all", retries: int = 2) -> str:
    return f"""\
name: faults
output: {output}
shard_size: {SHARD}
token_budget: {BUDGET}
models:
  tiny:
    base: ./models/base
    post:
      sft: ./models/sft
datasets:
  cities: data/cities.csv
captures:
  resid:
    sites: [resid_post, mlp_out]
    layers: {layers}
    positions: last:2
    dtype: float32
resources:
  num_cpus: 1
  torch_threads: 1
  max_retries: {retries}
"""


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("faultworld")
    build_tiny_model(root / "models/base", "llama", n_layers=2, seed=0)
    build_tiny_model(root / "models/sft", "llama", n_layers=2, seed=1)
    (root / "data").mkdir()
    with open(root / "data/cities.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["statement", "label"])
        for j, text in enumerate(random_prompts(N, 3, 24, vocab_size=512, seed=7)):
            w.writerow([text, j % 2])
    return root


def _write(world: Path, name: str, text: str) -> Path:
    p = world / name
    p.write_text(text)
    return p


def _extract_like_the_sweep(sweep_file: Path, url: str | None = None) -> None:
    """Single-process extraction of every target of the sweep into its own store groups, one torch thread
    like the actors (same kernels, same bits)."""
    sw = load_sweep(sweep_file)
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for t in sw.targets():
            extract(load_model(t.model.path), load_prompts(t.dataset.path), t.capture.spec, url or t.url, t.group,
                    token_budget=BUDGET, shard_size=SHARD, progress=False)
    finally:
        torch.set_num_threads(old)


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed on leaving: nothing listens there


def _tree(p: Path) -> dict[str, tuple[int, int]]:
    return {str(q.relative_to(p)): (q.stat().st_size, q.stat().st_mtime_ns) for q in sorted(p.rglob("*")) if q.is_file()}


# --------------------------------------------------------------------------------------------- killed actor


def test_actor_killed_mid_sweep_ends_equal_to_single_process(world):
    """ray.kill an actor while it is inside a unit (the other actor busy too): the unit is retried on a
    replacement, and every store is array-equal to a single-process extraction of the same units."""
    import ray

    from mechdiff.cluster.pool import ActorPool
    from mechdiff.cluster.ray_env import LocalCluster
    from mechdiff.cluster.runner import run_sweep

    path = _write(world, "kill.yaml", _yaml("out-kill"))
    _extract_like_the_sweep(path, str(world / "ref-kill.zarr"))
    state: dict = {}
    events: list[tuple] = []

    def hook(ev):
        events.append((ev.kind, ev.task.key if ev.task else None, ev.slot.id if ev.slot else None, ev.detail))
        if ev.kind != "dispatch" or ev.task.kind != "unit" or state.get("killed"):
            return
        state["n"] = state.get("n", 0) + 1
        if state["n"] < 3:
            return
        deadline = time.time() + 30
        while time.time() < deadline:  # wait until the actor is really inside this unit
            current, _ = ray.get(ev.slot.handle.live.remote(), timeout=60)
            if current == ev.task.key:
                break
            time.sleep(0.002)
        else:
            raise AssertionError(f"{ev.task.key} never started on its actor")
        ray.kill(ev.slot.handle, no_restart=True)
        state.update(killed=ev.task.key, slot=ev.slot.id)

    with LocalCluster(nodes=1, cpus_per_node=2) as c:
        with ActorPool(2, num_cpus=1, torch_threads=1, max_retries=2) as pool:
            assert len(set(pool.pids(timeout=120).values())) == 2
            rep = run_sweep(path, address=c.address, pool=pool, progress=False, on_event=hook)
    assert state.get("killed"), "the fault was never injected"
    assert rep.actor_deaths == 1 and rep.retries >= 1 and not rep.failures
    retried = [e for e in events if e[0] == "retry" and e[1] == state["killed"]]
    assert retried and "actor died" in retried[0][3]
    finished = [e for e in events if e[0] == "done" and e[1] == state["killed"]]
    assert len(finished) == 1 and finished[0][2] != state["slot"]
    assert rep.units_run == 10

    sw = load_sweep(path)
    for t in sw.targets():
        got, ref = open_store(t.url, t.group), open_store(str(world / "ref-kill.zarr"), t.group)
        assert set(got.data_vars) == set(ref.data_vars) == {"resid_post", "mlp_out"}
        for v in ref.data_vars:
            np.testing.assert_array_equal(got[v].values, ref[v].values, err_msg=f"{t.group} {v}")
        for co in ref.coords:
            np.testing.assert_array_equal(got[co].values, ref[co].values, err_msg=f"{t.group} coord {co}")
        assert list(got["example"].values) == list(range(N))
        assert ActivationStore.open(t.url, t.group).missing_shards() == []
        skip = {"created", "store_url"}
        assert {k: v for k, v in got.attrs.items() if k not in skip} == {k: v for k, v in ref.attrs.items() if k not in skip}


# --------------------------------------------------------------------------------------------- unreachable address


def test_unreachable_address_fails_fast_naming_it_and_creates_nothing(world):
    from mechdiff.cli import app

    port = _dead_port()
    address = f"127.0.0.1:{port}"
    path = _write(world, "dead.yaml", _yaml("out-dead"))
    runner = CliRunner()

    t0 = time.perf_counter()
    r = runner.invoke(app, ["sweep", "run", str(path), "--address", address, "--no-progress"])
    took = time.perf_counter() - t0
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and address in lines[0], r.output
    assert took < 30
    assert not (world / "out-dead").exists()  # no store, no output folder

    out = world / "dead-main-out"
    t0 = time.perf_counter()
    r = runner.invoke(app, ["run", str(path), "--address", address, "--out", str(out)])
    took = time.perf_counter() - t0
    assert r.exit_code == 2, r.output
    err = [ln for ln in r.output.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and address in err[0], r.output
    assert took < 30
    assert not (world / "out-dead").exists() and not out.exists()


def test_address_that_accepts_but_is_no_ray_cluster_fails_within_the_bound(world, monkeypatch):
    """A port that accepts TCP but never speaks (a wrong service, a half-dead head): ray.init alone would
    retry for minutes; the gRPC gate gives up after CONNECT_TIMEOUT_S, naming the address."""
    from mechdiff.cluster import ray_env
    from mechdiff.cluster.ray_env import ClusterUnreachable
    from mechdiff.cluster.runner import run_sweep
    from mechdiff.errors import MechdiffError

    monkeypatch.setattr(ray_env, "CONNECT_TIMEOUT_S", 3.0)
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept():
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(srv.accept()[0])  # accept and say nothing
            except OSError:
                pass

    th = threading.Thread(target=accept, daemon=True)
    th.start()
    address = f"127.0.0.1:{srv.getsockname()[1]}"
    try:
        path = _write(world, "silent.yaml", _yaml("out-silent"))
        for addr in (address, f"ray://{address}"):
            t0 = time.perf_counter()
            with pytest.raises(ClusterUnreachable) as e:
                run_sweep(path, address=addr, progress=False)
            assert time.perf_counter() - t0 < 10
            assert isinstance(e.value, MechdiffError) and str(e.value).startswith(f"cannot reach the Ray cluster at {addr}: ")
            assert "\n" not in str(e.value)
        assert not (world / "out-silent").exists()
    finally:
        stop.set()
        th.join()
        for s in held:
            s.close()
        srv.close()


# --------------------------------------------------------------------------------------------- output is a file


def test_status_of_a_sweep_whose_output_is_a_file_is_one_line(world):
    from mechdiff.cli import app

    (world / "a-file").write_text("not a folder\n")
    path = _write(world, "onfile.yaml", _yaml("a-file"))
    r = CliRunner().invoke(app, ["sweep", "status", str(path)])
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and str(world / "a-file") in lines[0] and "is a file" in lines[0], r.output
    assert r.exception is None or isinstance(r.exception, SystemExit)
    with pytest.raises(SweepError, match="a-file is a file, not a folder"):
        load_sweep(path)
    # a store path (<output>/<capture>.zarr) that is a file: the same, from planning
    (world / "out-zfile").mkdir()
    (world / "out-zfile/resid.zarr").write_text("x")
    path = _write(world, "zfile.yaml", _yaml("out-zfile"))
    r = CliRunner().invoke(app, ["sweep", "status", str(path)])
    assert r.exit_code == 2 and "resid.zarr is a file, not a folder" in r.output, r.output
    assert len([ln for ln in r.output.splitlines() if ln.strip()]) == 1


# --------------------------------------------------------------------------------------------- reuse of finished stores


def test_finished_store_is_reused_only_for_the_same_capture_and_weights(world):
    from mechdiff.cli import app
    from mechdiff.cluster.sweep import StoreReuseError

    path = _write(world, "reuse.yaml", _yaml("out-reuse"))
    _extract_like_the_sweep(path)  # the stores a finished sweep leaves
    store_dir = world / "out-reuse/resid.zarr"
    before = _tree(store_dir)
    # the same sweep: every target done, reused (the identity the sweep would produce is the stored one)
    plan = plan_sweep(load_sweep(path))
    assert [(p.target.key, len(p.done), p.n_shards) for p in plan.targets] == [
        ("tiny/base cities resid", 5, 5), ("tiny/sft cities resid", 5, 5)]
    # the same layers spelled otherwise resolve to the same identity: still reused
    same = _write(world, "reuse-same.yaml", _yaml("out-reuse", layers="[0, -1]"))
    assert plan_sweep(load_sweep(same)).remaining_units == 0

    # other layers under the same capture name: refused, naming layers with both values
    other = _write(world, "reuse-layers.yaml", _yaml("out-reuse", layers="[1]"))
    with pytest.raises(StoreReuseError) as e:
        plan_sweep(load_sweep(other))
    msg = str(e.value)
    assert "capture.layers: the store has [0, 1], captures.resid asks for [1]" in msg, msg
    assert "weights_hash" not in msg and "\n" not in msg
    for cmd in (["sweep", "status", str(other)], ["sweep", "run", str(other), "--no-progress"]):
        r = CliRunner().invoke(app, cmd)
        assert r.exit_code == 2 and "capture.layers" in r.output, r.output
        assert len([ln for ln in r.output.splitlines() if ln.strip()]) == 1, r.output

    # other weights at the same path: refused, naming the weights hash with both values
    old = ActivationStore.open(str(store_dir), "tiny/sft/cities").provenance["weights_hash"]
    moved = world / "models/sft-moved"
    shutil.copytree(world / "models/sft", moved)  # the original weights, elsewhere
    shutil.rmtree(world / "models/sft")
    build_tiny_model(world / "models/sft", "llama", n_layers=2, seed=99)
    from mechdiff.engine.models import local_weights_hash

    new = local_weights_hash(str(world / "models/sft"))
    assert new != old
    with pytest.raises(StoreReuseError) as e:
        plan_sweep(load_sweep(path))
    msg = str(e.value)
    assert "tiny/sft/cities" in msg and "weights_hash: the store has " + old in msg and new in msg, msg
    r = CliRunner().invoke(app, ["sweep", "run", str(path), "--no-progress"])
    assert r.exit_code == 2 and "weights_hash" in r.output, r.output
    assert _tree(store_dir) == before  # neither refusal touched the stores

    # the original weights in another directory are the same model: reused
    text = _yaml("out-reuse").replace("sft: ./models/sft", "sft: ./models/sft-moved")
    assert plan_sweep(load_sweep(_write(world, "reuse-moved.yaml", text))).remaining_units == 0
