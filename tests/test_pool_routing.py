"""Per-model resources: parsing, and a mixed sweep routed by resource shape on a local Ray with fake GPUs.

The Ray test declares 6 GPUs on a CPU-only machine (``ray.init(num_gpus=6)``): an "8B-like" group asks 1 GPU
per replica, a "70B-like" one a 4-GPU layout (tensor_parallel: 4). The models are tiny random Llamas and run
on the CPU; the GPUs only steer Ray's placement and the pool's routing.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from mechdiff.cluster.sweep import Resources, SweepError, parse_sweep
from mechdiff.engine.tiny import build_tiny_model, random_prompts

pytestmark = pytest.mark.timeout(300)

N = 12
SHARD = 4  # 3 shards per target


def _yaml(big_gpus: str = "tensor_parallel: 4", extra: str = "") -> str:
    return f"""\
name: mixed
output: out
shard_size: {SHARD}
token_budget: 256
models:
  small:
    base: ./models/s0
    post: {{chat: ./models/s1}}
    resources: {{num_gpus: 1}}
  big:
    base: ./models/b0
    post: {{chat: ./models/b1}}
    dtype: float32
    resources: {{{big_gpus}, unit_tokens: 1000}}
datasets:
  d: data/d.csv
captures:
  resid: {{sites: [resid_post], layers: all, positions: last, dtype: float32}}
resources:
  num_cpus: 1
  torch_threads: 1
  max_retries: 1
{extra}"""


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mixed")
    for name, layers, seed in (("s0", 2, 0), ("s1", 2, 1), ("b0", 3, 2), ("b1", 3, 3)):
        build_tiny_model(root / "models" / name, "llama", n_layers=layers, seed=seed)
    (root / "data").mkdir()
    with open(root / "data/d.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text"])
        for t in random_prompts(N, 3, 20, vocab_size=512, seed=5):
            w.writerow([t])
    return root


def _parse(world: Path, text: str):
    return parse_sweep(text, file="m.yaml", base_dir=world)


# --------------------------------------------------------------------------------------------- parsing, no Ray


def test_model_resources_override_the_sweeps(world):
    sw = _parse(world, _yaml())
    small, big = sw.models[0], sw.models[2]
    assert sw.resources_of(small) == Resources(num_cpus=1.0, num_gpus=1.0, torch_threads=1, max_retries=1)
    rb = sw.resources_of(big)
    assert (rb.num_gpus, rb.tensor_parallel, rb.unit_tokens, rb.num_cpus, rb.torch_threads) == (None, 4, 1000, 1.0, 1)
    assert rb.gpus(cluster_has_gpus=True) == 4.0 and rb.gpus(cluster_has_gpus=False) == 0.0
    assert sw.resources_of(sw.models[1]) == sw.resources_of(small)  # the group's block covers its post models
    assert sw.describe_resources(big) == "auto GPU (tp 4), 1 CPU, float32"
    assert sw.describe_resources(small) == "1 GPU, 1 CPU, auto"  # bfloat16 on a GPU, float32 on a CPU
    # one model of a group with its own block (over its group's); dtype from resources where the group names none
    text = _yaml().replace("post: {chat: ./models/s1}", "post: {chat: {path: ./models/s1, resources: {num_gpus: 2, dtype: bfloat16}}}")
    sw2 = _parse(world, text)
    assert sw2.resources_of(sw2.models[1]).num_gpus == 2.0 and sw2.models[1].dtype == "bfloat16"
    assert sw2.models[0].dtype == "auto" and sw2.resources_of(sw2.models[0]).num_gpus == 1.0


@pytest.mark.parametrize(
    "old, new, expected",
    [
        ("tensor_parallel: 4", "tensor_parallel: 4, num_gpus: 2",
         r"models\.big\.resources\.num_gpus: num_gpus 2 does not match tensor_parallel x pipeline_parallel = 4 x 1 = 4"),
        ("{num_gpus: 1}", "{num_gpus: 1, actors: 2}", r"models\.small\.resources\.actors: a pool-wide setting"),
        ("{num_gpus: 1}", "{num_gpu: 1}", r"models\.small\.resources\.num_gpu: unknown key; did you mean 'num_gpus'\?"),
        ("{num_gpus: 1}", "{num_gpus: 1, dtype: float8}", r"models\.small\.resources\.dtype: unknown dtype 'float8'"),
        ("tensor_parallel: 4", "tensor_parallel: 0", r"models\.big\.resources\.tensor_parallel: must be >= 1, got 0"),
        ("tensor_parallel: 4", "tensor_parallel: 4, dtype: bfloat16", r"models\.big\.dtype: dtype 'float32', but resources\.dtype 'bfloat16'"),
    ],
)
def test_bad_model_resources_name_key_and_line(world, old, new, expected):
    text = _yaml().replace(old, new, 1)
    assert text != _yaml()
    with pytest.raises(SweepError, match=rf"^m\.yaml:\d+: {expected}"):
        _parse(world, text)


def test_units_group_whole_consecutive_shards_by_tokens():
    from mechdiff.cluster.runner import actors_per_shape, group_shards

    tokens = {0: 40, 1: 40, 2: 40, 3: 100, 4: 10, 6: 10}
    assert group_shards(list(tokens), tokens.__getitem__, None) == [(0,), (1,), (2,), (3,), (4,), (6,)]
    # within 90 tokens, never across a gap (shard 5 is done), an oversized shard alone
    assert group_shards(list(tokens), tokens.__getitem__, 90) == [(0, 1), (2,), (3,), (4,), (6,)]
    assert actors_per_shape({"a": 6, "b": 2}, lambda s: {"a": 5, "b": 1}[s], None) == {"a": 5, "b": 1}
    assert actors_per_shape({"a": 6, "b": 2}, lambda s: 99, 4) == {"a": 3, "b": 1}
    assert actors_per_shape({"a": 1, "b": 1}, lambda s: 99, 8) == {"a": 1, "b": 1}  # never more than the units


def test_persistent_writer_fails_only_the_shard_that_failed():
    import numpy as np

    from mechdiff.engine.extract import ShardWriter

    class Store:
        def __init__(self, bad=()):
            self.bad, self.written = set(bad), []

        def write_shard(self, i, data):
            if i in self.bad:
                raise OSError(f"disk gone for shard {i}")
            self.written.append(i)

    a, b = Store(bad={1}), Store()
    w = ShardWriter()  # no store of its own: long-lived, any store per shard
    futs = [w.put(0, {}, a), w.put(1, {}, a), w.put(0, {"x": np.zeros(1)}, b)]
    assert futs[0].result(10) == 0 and futs[2].result(10) == 0
    with pytest.raises(OSError, match="shard 1"):
        futs[1].result(10)
    assert w.put(2, {}, a).result(10) == 2  # the writer goes on after a failed shard
    assert a.written == [0, 2] and b.written == [0]
    with pytest.raises(ValueError, match="name the shard's store"):
        w.put(3, {})
    w.close()


# --------------------------------------------------------------------------------------------- Ray, fake GPUs


@pytest.fixture(scope="module")
def fake_gpu_ray():
    import ray

    from mechdiff.cluster.ray_env import connect

    if ray.is_initialized():
        ray.shutdown()
    connect(None, num_cpus=2, num_gpus=6)
    try:
        yield
    finally:
        ray.shutdown()


def test_mixed_sweep_routes_units_to_actors_of_their_shape(world, fake_gpu_ray):
    from mechdiff.cluster.pool import ReplicaShape, UnitResult
    from mechdiff.cluster.runner import run_sweep
    from mechdiff.cluster.sweep import sweep_status
    from mechdiff.engine.store import ActivationStore

    path = world / "mixed.yaml"
    path.write_text(_yaml())
    small = ReplicaShape(num_cpus=1.0, num_gpus=1.0, torch_threads=1)
    big = ReplicaShape(num_cpus=1.0, num_gpus=4.0, torch_threads=1, tensor_parallel=4)
    want = {"small": small, "big": big}
    events = []
    rep = run_sweep(path, progress=False, on_event=events.append)
    assert not rep.failures and rep.units_run == 12 and rep.units_skipped == 0

    units = [e for e in events if e.kind == "done" and e.task.kind == "unit"]
    for e in [e for e in events if e.kind == "dispatch"]:
        # every task (prepares too) ran on an actor of its model's shape
        assert e.slot.shape == want[e.task.model.group] == e.task.shape, e.task.key
    # units of whole shards: the 70B-like model's within its unit_tokens (1000), the 8B-like one's within the
    # GPU default (1M tokens: each of its targets is one unit)
    big_units = [e.result for e in units if e.task.model.group == "big"]
    assert sum(r.n_shards for r in big_units) == 6 and len(big_units) < 6 and max(r.n_shards for r in big_units) > 1
    assert sorted(e.result.shards for e in units if e.task.model.group == "small") == [(0, 1, 2), (0, 1, 2)]
    # no actor loaded a model twice, and none loaded a model of another shape
    last: dict[int, UnitResult] = {}
    for e in units:
        last[e.result.pid] = e.result
    for r in last.values():
        assert len(r.loads) == len(set(r.loads)), r.loads
        assert len({k.split("/")[0] for k in r.loads}) == 1, r.loads
    # the GPU actors ran torch on the CPU (no CUDA here); 3 replicas on 2 CPUs: one waited, and the sweep still
    # finished (a released actor of a finished shape makes room when the waiting one has work)
    started = [e.detail for e in events if e.kind == "actor_started"]
    assert started and all("torch sees no CUDA" in d for d in started), started
    rows = sweep_status(path)
    assert all(r.done == r.total == 3 for r in rows)
    assert {r.model: r.resources for r in rows}["big/base"] == "auto GPU (tp 4), 1 CPU, float32"
    sw = _parse(world, _yaml())
    for t in sw.targets():
        assert ActivationStore.open(str(world / "out/resid.zarr"), t.group).missing_shards() == []


def test_model_bigger_than_every_node_is_refused_before_any_work(world, fake_gpu_ray):
    from mechdiff.cluster.runner import run_sweep

    path = world / "too-big.yaml"
    path.write_text(_yaml(big_gpus="tensor_parallel: 8").replace("output: out", "output: out-too-big"))
    with pytest.raises(SweepError, match=r"no node of the cluster can hold big/base, big/chat: a replica needs "
                                         r"8 GPU \(tp 8\), 1 CPU \(the largest node has 6 GPU, 2 CPU\)"):
        run_sweep(path, progress=False)
    assert not (world / "out-too-big").exists()


def test_retried_unit_keeps_the_shards_its_killed_attempt_finished(world, fake_gpu_ray):
    """A unit of several shards whose first attempt died after writing some: the retry writes only the others
    (store shards stay the resume unit)."""
    import ray

    from mechdiff.cluster.pool import ModelWorker, ReplicaShape
    from mechdiff.engine.data import load_prompts
    from mechdiff.engine.extract import extract, prepare
    from mechdiff.engine.models import load_model

    sw = _parse(world, _yaml())
    m = sw.models[0]
    t = next(t for t in sw.targets() if t.model == m)
    url = str(world / "resume.zarr")
    lm = load_model(m.path)
    extract(lm, load_prompts(t.dataset.path), t.capture.spec, url, t.group, token_budget=256, shard_size=SHARD, progress=False)
    from mechdiff.engine.store import ActivationStore

    store = ActivationStore.open(url, t.group)
    before = store.done_shards()
    store.clear_done([1])  # as if the attempt died inside shard 1
    prep = prepare(lm, load_prompts(t.dataset.path), t.capture.spec)
    w = ModelWorker.options(num_cpus=1, num_gpus=0).remote(ReplicaShape())
    try:
        r = ray.get(w.extract_unit.remote(m, "k", [ray.put(prep)], url, t.group, None, (0, 1, 2), 256, "unit"), timeout=120)
    finally:
        ray.kill(w)
    assert before == [0, 1, 2] and r.shards == (0, 1, 2) and r.examples == SHARD
    assert r.tokens == int(prep.coords["n_tokens"][SHARD:2 * SHARD].sum())
    assert store.missing_shards() == []
