"""mechdiff.cluster: sweeps on a real two-node Ray cluster (127.0.0.1 only), equal to single-process
extraction; an actor SIGKILLed mid-sweep; a store on an S3 server (moto); dask-on-Ray; sweep files.

One Ray cluster (a head and a worker node, 1 CPU each, started in this process with
ray.cluster_utils, its own temp dir) is shared by the whole module and stopped at the end.
"""

from __future__ import annotations

import csv
import os
import signal
import socket
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from mechdiff import open_store
from mechdiff.cluster.sweep import SweepError, load_sweep, parse_sweep, plan_sweep, sweep_status
from mechdiff.engine.data import load_prompts
from mechdiff.engine.extract import extract
from mechdiff.engine.models import load_model
from mechdiff.engine.store import ActivationStore
from mechdiff.engine.tiny import build_tiny_model, random_prompts

pytestmark = pytest.mark.timeout(900)

SHARD = 8
BUDGET = 256
SIZES = {"cities": 37, "harmful": 21}  # 5 and 3 shards, the last ones short


def _sweep_yaml(output: str, *, storage_options: dict | None = None, datasets=("cities", "harmful"), max_retries=2) -> str:
    so = ""
    if storage_options:
        so = "storage_options:\n" + "".join(f"  {k}: {v}\n" for k, v in storage_options.items())
    ds = "".join(f"  {d}: data/{d}.csv\n" for d in datasets)
    return f"""\
name: tiny-pair
output: {output}
{so}shard_size: {SHARD}
token_budget: {BUDGET}
models:
  tiny:
    base: ./models/base
    post:
      sft: ./models/sft
datasets:
{ds}captures:
  resid:
    sites: [resid_post, mlp_out]
    layers: all
    positions: last:2
    dtype: float32
studies:
  truthfulness: {{capture: resid, datasets: [{datasets[0]}]}}
resources:
  num_cpus: 1
  torch_threads: 1
  max_retries: {max_retries}
"""


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """Two tiny Llamas (base, and 'sft' with other weights) and two labelled datasets."""
    root = tmp_path_factory.mktemp("sweepworld")
    build_tiny_model(root / "models/base", "llama", n_layers=2, seed=0)
    build_tiny_model(root / "models/sft", "llama", n_layers=2, seed=1)
    (root / "data").mkdir()
    for i, (name, n) in enumerate(SIZES.items()):
        with open(root / f"data/{name}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["statement", "label", "topic"])  # a topic column: truthfulness reads the store as it is
            for j, text in enumerate(random_prompts(n, 3, 24, vocab_size=512, seed=10 + i)):
                w.writerow([text, j % 2, name])
    return root


@pytest.fixture(scope="module")
def reference(world) -> dict[str, "object"]:
    """Single-process extraction of every target, in one thread like the actors (same kernels, same bits)."""
    sw = load_sweep(_write(world, "ref.yaml", _sweep_yaml("ref-out")))
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    out = {}
    try:
        for t in sw.targets():
            lm = load_model(t.model.path)
            extract(lm, load_prompts(t.dataset.path), t.capture.spec, str(world / "reference.zarr"), t.group,
                    token_budget=BUDGET, shard_size=SHARD, progress=False)
            out[t.group] = open_store(str(world / "reference.zarr"), t.group).load()
    finally:
        torch.set_num_threads(old)
    return out


def _write(world: Path, name: str, text: str) -> Path:
    p = world / name
    p.write_text(text)
    return p


@pytest.fixture(scope="module")
def cluster():
    from mechdiff.cluster.ray_env import LocalCluster

    with LocalCluster(nodes=2, cpus_per_node=1) as c:
        yield c


def _assert_stores_equal(reference, url: str, storage_options=None) -> None:
    for group, ref in reference.items():
        got = open_store(url, group, storage_options=storage_options)
        assert set(got.data_vars) == set(ref.data_vars) == {"resid_post", "mlp_out"}
        for v in ref.data_vars:
            np.testing.assert_array_equal(got[v].values, ref[v].values, err_msg=f"{group} {v}")
        for c in ref.coords:
            np.testing.assert_array_equal(got[c].values, ref[c].values, err_msg=f"{group} coord {c}")
        # every example exactly once, in dataset order, fully written
        n = ref.sizes["example"]
        assert list(got["example"].values) == list(range(n))
        assert not np.isnan(got["resid_post"].values).any()
        skip = {"created", "store_url"}
        assert {k: v for k, v in got.attrs.items() if k not in skip} == {k: v for k, v in ref.attrs.items() if k not in skip}
        store = ActivationStore.open(url, group, storage_options)
        assert store.missing_shards() == []


class _Recorder:
    def __init__(self):
        self.events = []

    def __call__(self, ev):
        self.events.append((ev.kind, ev.task.key if ev.task else None, ev.slot.id if ev.slot else None,
                            ev.slot.node_id if ev.slot else None, ev.detail))

    def kinds(self, kind):
        return [e for e in self.events if e[0] == kind]


@pytest.fixture(scope="module")
def clean_run(world, cluster):
    from mechdiff.cluster.runner import run_sweep

    from mechdiff.cluster.pool import ActorPool

    path = _write(world, "clean.yaml", _sweep_yaml("out-clean"))
    before = sweep_status(path)
    rec = _Recorder()
    # both replicas started before the sweep, so that both nodes surely get work however slow a start
    with ActorPool(2, num_cpus=1, torch_threads=1) as pool:
        assert len(set(pool.pids(timeout=120).values())) == 2
        rep = run_sweep(path, address=cluster.address, pool=pool, progress=False, on_event=rec)
    return path, before, rep, rec


# ---------------------------------------------------------------------------------------------


def test_sweep_on_two_nodes_equals_single_process(world, reference, clean_run, cluster):
    path, before, rep, rec = clean_run
    assert [(r.model, r.dataset, r.done, r.total) for r in before] == [
        ("tiny/base", "cities", 0, 5), ("tiny/base", "harmful", 0, 3), ("tiny/sft", "cities", 0, 5), ("tiny/sft", "harmful", 0, 3)
    ]
    assert rep.units_run == 16 and rep.units_skipped == 0 and not rep.failures
    assert rep.tokens == 2 * sum(int(r["n_tokens"].sum()) for g, r in reference.items() if g.startswith("tiny/base"))
    # the units really ran on both nodes of the cluster, each unit exactly once
    done_units = [e for e in rec.kinds("done") if " shard " in e[1]]
    assert len(done_units) == 16 and len({e[1] for e in done_units}) == 16
    assert len({e[3] for e in done_units}) == 2
    _assert_stores_equal(reference, str(world / "out-clean/resid.zarr"))
    assert all(r.done == r.total for r in sweep_status(path))

    # a re-run skips every done unit without starting an actor
    from mechdiff.cluster.runner import run_sweep

    rec2 = _Recorder()
    again = run_sweep(path, address=cluster.address, progress=False, on_event=rec2)
    assert again.units_run == 0 and again.units_skipped == 16 and rec2.events == []


def test_models_with_one_tokenizer_tokenize_a_dataset_once(world, reference, cluster):
    """On one replica the post-trained model's prepare comes after the base model's units: it takes the base
    model's token ids (same tokenizer), and its store equals the one extracted on its own."""
    from mechdiff.cluster.pool import ActorPool
    from mechdiff.cluster.runner import run_sweep

    path = _write(world, "shared-tokens.yaml", _sweep_yaml("out-shared", datasets=("cities",)))
    rec = _Recorder()
    with ActorPool(1, num_cpus=1, torch_threads=1) as pool:
        rep = run_sweep(path, address=cluster.address, pool=pool, progress=False, on_event=rec)
    prepares = [e[1] for e in rec.kinds("dispatch") if e[1].startswith("prepare")]
    assert prepares == ["prepare tiny/base cities resid", "prepare tiny/sft cities resid"], prepares
    assert rep.tokenizations_reused == 1 and rep.units_run == 10 and not rep.failures
    _assert_stores_equal({g: r for g, r in reference.items() if g.endswith("/cities")},
                         str(world / "out-shared/resid.zarr"))


def _kill_mid_unit(state):
    """on_event hook: SIGKILL the actor running the 4th unit once it is inside that unit."""
    import ray

    def hook(ev):
        if ev.kind != "dispatch" or ev.task.kind != "unit" or state.get("killed"):
            return
        state["n"] = state.get("n", 0) + 1
        if state["n"] < 4:
            return
        pid = ray.get(ev.slot.handle.info.remote(), timeout=60)["pid"]  # answers while the actor works
        deadline = time.time() + 30
        while time.time() < deadline:
            current, _ = ray.get(ev.slot.handle.live.remote(), timeout=60)
            if current == ev.task.key:
                break
            time.sleep(0.002)
        os.kill(pid, signal.SIGKILL)
        state.update(killed=ev.task.key, slot=ev.slot.id, pid=pid)

    return hook


def test_actor_sigkilled_mid_sweep_is_retried_elsewhere(world, reference, cluster):
    from mechdiff.cluster.runner import run_sweep

    path = _write(world, "fault.yaml", _sweep_yaml("out-fault"))
    state: dict = {}
    rec = _Recorder()
    kill = _kill_mid_unit(state)

    def both(ev):
        kill(ev)
        rec(ev)

    rep = run_sweep(path, address=cluster.address, progress=False, on_event=both)
    assert state.get("killed"), "the fault was never injected"
    with pytest.raises(ProcessLookupError):
        os.kill(state["pid"], 0)  # that process is really gone
    assert rep.actor_deaths == 1 and rep.retries >= 1 and not rep.failures
    retried = [e for e in rec.kinds("retry") if e[1] == state["killed"]]
    assert retried and "actor died" in retried[0][4]
    # the killed unit finished on another actor, once
    finished = [e for e in rec.kinds("done") if e[1] == state["killed"]]
    assert len(finished) == 1 and finished[0][2] != state["slot"]
    assert rep.units_run == 16
    _assert_stores_equal(reference, str(world / "out-fault/resid.zarr"))


def _n_layers(lm, scale):
    return lm.adapter.n_layers * scale, os.getpid()


def _die(lm):
    os.kill(os.getpid(), signal.SIGKILL)


def _bad_input(lm):
    raise ValueError("bad prompt")


def test_pool_bounded_retries_name_the_unit(world, cluster):
    import ray

    from mechdiff.cluster.pool import ActorPool, PoolError
    from mechdiff.cluster.sweep import ModelSpec

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the test functions travel by value
    m = ModelSpec("tiny", "base", str(world / "models/base"))
    with ActorPool(2, num_cpus=1, torch_threads=1, max_retries=1) as pool:
        out = pool.map(_n_layers, [(m, (10,)), (m, (100,))])
        assert [o[0] for o in out] == [20, 200]
        with pytest.raises(PoolError) as e:
            pool.map(_die, [(m, ())], keys=["ablation of tiny/base"])
        assert list(e.value.failures) == ["ablation of tiny/base"]
        assert "failed after 2 attempt(s)" in str(e.value) and "actor died" in str(e.value)
        assert pool.actor_deaths == 2 and sum(s.alive for s in pool.slots) == 2  # replaced
        # a deterministic error is not retried
        with pytest.raises(PoolError, match=r"bad: failed after 1 attempt\(s\): ValueError: bad prompt"):
            pool.map(_bad_input, [(m, ())], keys=["bad"])

        # in a sweep, a target that cannot be prepared fails by name; the others complete
        from mechdiff.cluster.runner import SweepFailed, run_sweep

        with open(world / "data/long.csv", "w") as f:
            f.write("statement\n" + "w1 " * 300 + "\n" + "w2 w3\n")  # 301 tokens > 256 positions
        path = _write(world, "partly.yaml", _sweep_yaml("out-partly", datasets=("harmful", "long")))
        with pytest.raises(SweepFailed) as e:
            run_sweep(path, pool=pool, progress=False)
        rep = e.value.report
        assert sorted(rep.failures) == ["prepare tiny/base long resid", "prepare tiny/sft long resid"]
        assert all("failed after 1 attempt(s)" in v and "301 tokens" in v for v in rep.failures.values()), rep.failures
        assert [(r.dataset, r.done, r.total) for r in rep.rows] == [("harmful", 3, 3), ("long", 0, 1), ("harmful", 3, 3), ("long", 0, 1)]
        assert "prepare tiny/base long resid" in str(e.value)


@pytest.fixture(scope="module")
def s3_server():
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


def test_sweep_into_s3_reads_back_with_open_store(world, reference, cluster, s3_server):
    import s3fs

    from mechdiff.cluster.runner import run_sweep

    opts = {"endpoint_url": s3_server, "key": "testing", "secret": "testing"}
    s3fs.S3FileSystem(**opts).mkdir("acts")
    path = _write(world, "s3.yaml", _sweep_yaml("s3://acts/sweeps/tiny", storage_options=opts, datasets=("harmful",)))
    rep = run_sweep(path, address=cluster.address, progress=False)
    assert rep.units_run == 6 and not rep.failures
    ref = {g: ds for g, ds in reference.items() if g.endswith("/harmful")}
    _assert_stores_equal(ref, "s3://acts/sweeps/tiny/resid.zarr", storage_options=opts)
    ds = open_store("s3://acts/sweeps/tiny/resid.zarr", "tiny/sft/harmful", storage_options=opts)
    assert ds.attrs["model_id"] == str(world / "models/sft")
    assert [(r.done, r.total) for r in sweep_status(path)] == [(3, 3), (3, 3)]


def _pid():
    return os.getpid()


def test_dask_graphs_run_on_ray_or_local_threads(world, clean_run, cluster):
    import dask

    from mechdiff.cluster.dask_ray import dask_scheduler

    ds = open_store(str(world / "out-clean/resid.zarr"), "tiny/sft/cities")
    ds = ds.chunk({"example": 8})
    want = ds["resid_post"].values.astype(np.float64).mean(axis=0)
    with dask_scheduler(cluster.address) as where:
        assert where == "ray"
        got = ds["resid_post"].astype("float64").mean("example").compute().values
        pids = set(dask.compute(*[dask.delayed(_pid)() for _ in range(4)]))
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert os.getpid() not in pids  # the tasks ran in Ray worker processes
    with dask_scheduler(None) as where:
        assert where == "threads"
        assert dask.compute(dask.delayed(_pid)())[0] == os.getpid()
        np.testing.assert_allclose(ds["resid_post"].astype("float64").mean("example").compute().values, want, rtol=1e-12)


def test_cli_status_and_run_of_a_finished_sweep(clean_run, cluster):
    from mechdiff.cli import app

    path = clean_run[0]
    runner = CliRunner()
    r = runner.invoke(app, ["sweep", "status", str(path)], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    lines = [ln for ln in r.output.splitlines() if "tiny/" in ln and "resid" in ln]
    assert len(lines) == 4 and all(("5/5" in ln or "3/3" in ln) and "done" in ln for ln in lines)
    assert "16/16 units done" in r.output
    r = runner.invoke(app, ["sweep", "run", str(path), "--address", cluster.address])
    assert r.exit_code == 0, r.output
    assert "16/16 units done (0 run now, 16 already done)" in r.output


# --------------------------------------------------------------------------------------------- no Ray


def _parse(text: str, base: Path):
    return parse_sweep(text, file="s.yaml", base_dir=base)


@pytest.mark.parametrize(
    "old, new, line_of, expected",
    [
        ("shard_size: 8", "shard_sise: 8", "shard_sise", r"shard_sise: unknown key; did you mean 'shard_size'\?"),
        ("shard_size: 8", "shard_size: eight", "shard_size", r"shard_size: expected an integer, got 'eight'"),
        ("    base: ./models/base\n", "", "  tiny:", r"models\.tiny: missing key 'base'"),
        ("positions: last:2", "positions: lats", "lats", r"captures\.resid\.positions: .*'lats'"),
        ("[resid_post, mlp_out]", "[resid_post, mlp_outt]", "mlp_outt", r"captures\.resid\.sites: unknown site 'mlp_outt'"),
        ("datasets: [cities]}", "datasets: [citys]}", "citys",
         r"studies\.truthfulness\.datasets\.\[0\]: unknown dataset 'citys'; did you mean 'cities'\?"),
        ("truthfulness:", "truthfullness:", "truthfullness", r"studies\.truthfullness: unknown key; did you mean 'truthfulness'\?"),
        ("studies:\n", "studies:\n  refusal: {harmful: harmfull, harmless: cities}\n", "harmfull",
         r"studies\.refusal\.harmful: unknown dataset 'harmfull'; did you mean 'harmful'\?"),
        ("data/harmful.csv", "data/nope.csv", "nope", r"datasets\.harmful: dataset file \S*nope\.csv does not exist"),
        ("./models/sft", "./models/none", "models/none", r"models\.tiny\.post\.sft: model directory \S*none does not exist"),
        ("num_cpus: 1", "num_cpus: 0", "num_cpus", r"resources\.num_cpus: must be > 0, got 0"),
        ("  max_retries: 2", "  max_retries: 2\n  max_retries: 3", "max_retries: 3",
         r"resources\.max_retries: duplicate key \(first at line \d+\)"),
        ("layers: all", "layers: [0, x]", "layers:", r"captures\.resid\.layers: expected 'all'"),
        ("dtype: float32", "dtype: float64", "float64", r"captures\.resid\.dtype: store dtype 'float64'"),
        ("    post:\n      sft: ./models/sft\n", "    post: [unclosed\n", "datasets:", r"not valid YAML"),
    ],
)
def test_malformed_sweep_names_key_and_line(world, old, new, line_of, expected):
    good = _sweep_yaml("out")
    _parse(good, world)  # the unmodified file is fine
    assert old in good
    bad = good.replace(old, new, 1)
    line = next(i for i, ln in enumerate(bad.splitlines(), 1) if line_of in ln)
    with pytest.raises(SweepError, match=rf"^s\.yaml:{line}: {expected}"):
        _parse(bad, world)


def test_line_numbers_point_at_the_offending_key(world):
    text = _sweep_yaml("out").replace("positions: last:2", "positions: bogus")
    line = next(i for i, ln in enumerate(text.splitlines(), 1) if "bogus" in ln)
    with pytest.raises(SweepError) as e:
        _parse(text, world)
    assert str(e.value).startswith(f"s.yaml:{line}: captures.resid.positions:")
    # layer ranges are checked against local models' configs before anything runs
    sw = _parse(_sweep_yaml("out").replace("layers: all", "layers: [0, 5]"), world)
    with pytest.raises(SweepError, match=r"captures\.resid\.layers: model tiny/base \(2 layers\)"):
        plan_sweep(sw)


def test_sweep_targets_groups_and_study_inputs(world):
    sw = _parse(_sweep_yaml("out"), world)
    assert [t.key for t in sw.targets()] == ["tiny/base cities resid", "tiny/base harmful resid", "tiny/sft cities resid", "tiny/sft harmful resid"]
    assert sw.store_url("resid") == str(world / "out/resid.zarr")
    assert [m.label for m in sw.groups["tiny"]] == ["base", "sft"]
    # truthfulness pins capture resid, which holds what it reads: it reads those store groups, nothing is added
    from mechdiff.cluster.study_plan import study_extraction, study_targets

    got = {st.requirement.key: (st.target.url, st.target.group, st.pinned) for st in study_targets(sw)}
    assert got == {
        ("base", "statements", "truth"): (str(world / "out/resid.zarr"), "tiny/base/cities", True),
        ("sft", "statements", "truth"): (str(world / "out/resid.zarr"), "tiny/sft/cities", True),
    }
    assert study_extraction(sw) == []
    plan = plan_sweep(sw)
    assert plan.total_units == plan.remaining_units == 16
    # a post list gets post0, post1 labels; hub ids stay as they are
    sw2 = _parse(_sweep_yaml("out").replace("    post:\n      sft: ./models/sft\n", "    post: [org/a-Instruct, org/b-SFT]\n"), world)
    assert [(m.label, m.path) for m in sw2.models] == [("base", str(world / "models/base")), ("post0", "org/a-Instruct"), ("post1", "org/b-SFT")]


def test_progress_display_and_summary():
    from types import SimpleNamespace as NS

    from mechdiff.cluster.pool import PoolEvent, Slot, Task, UnitResult
    from mechdiff.cluster.progress import SweepProgress, TargetStats

    stats = [TargetStats("m/base d resid", "m/base", "d", "resid", total=4, done_before=1)]
    slot = Slot(0, None, pid=123, node_ip="127.0.0.1")
    pool = NS(slots=[slot])
    con = Console(record=True, width=140)
    p = SweepProgress("sweep x", stats, console=con, enabled=False, pool=pool)
    m = NS(key="m/base")
    t1 = Task("m/base d resid shard 1", m, "extract_shard", kind="unit", info="m/base d resid")
    t2 = Task("m/base d resid shard 2", m, "extract_shard", kind="unit", info="m/base d resid")
    slot.units, slot.tokens, slot.compute_seconds = 1, 500, 2.0
    p.on_event(PoolEvent("done", slot, t1, result=UnitResult(1, 8, 500, 2.0, 123)))
    t2.attempts = 1
    p.on_event(PoolEvent("actor_died", slot, None, "its actor died"))
    p.on_event(PoolEvent("retry", slot, t2, "its actor died"))
    t2.attempts = 3
    p.on_event(PoolEvent("failed", None, t2, "failed after 3 attempt(s): its actor died"))
    con.print(p)
    con.print(p.summary())
    con.print(p.actor_table())
    text = con.export_text()
    assert "units 1/3" in text and "retries 1" in text and "dead actors 1" in text and "failed 1" in text
    assert "FAILED m/base d resid shard 2" in text
    row = next(ln for ln in text.splitlines() if ln.startswith("│ m/base"))
    assert "2/4" in row and "500" in row and "250" in row  # 500 tokens in 2 s of compute

    # in a batch job's log (no terminal): a status line every log_every seconds and each incident
    log = Console(record=True, width=140)
    q = SweepProgress("sweep y", [TargetStats("k", "m/base", "d", "resid", total=2, done_before=0)], console=log,
                      pool=pool, log_every=0.0)
    with q:
        q.on_event(PoolEvent("retry", slot, t2, "its actor died"))
        q.tick()
    lines = log.export_text().splitlines()
    assert any(ln.startswith("retry m/base d resid shard 2") for ln in lines)
    assert sum(ln.startswith("sweep y  units 0/2") for ln in lines) == 2  # the tick and the end


def test_deploy_files_are_valid():
    """The launcher config against Ray's own schema, the RayJob's shape, the Slurm script's syntax, and
    the sweep command lines they run against the real CLI."""
    import json
    import subprocess

    import jsonschema
    import ray
    import yaml

    from mechdiff.cli import app

    deploy = Path(__file__).resolve().parents[1] / "deploy"
    schema = json.loads((Path(ray.__file__).parent / "autoscaler/ray-schema.json").read_text())
    launcher = yaml.safe_load((deploy / "ray-cluster.yaml").read_text())
    jsonschema.validate(launcher, schema)
    assert launcher["available_node_types"][launcher["head_node_type"]]["resources"] == {"CPU": 0}

    (job,) = yaml.safe_load_all((deploy / "kuberay-rayjob.yaml").read_text())
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec = job["spec"]["rayClusterSpec"]
    images = {c["image"] for c in spec["headGroupSpec"]["template"]["spec"]["containers"]}
    for g in spec["workerGroupSpecs"]:
        images |= {c["image"] for c in g["template"]["spec"]["containers"]}
        assert g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert len(images) == 1  # one image for head and workers

    sbatch = deploy / "slurm-sweep.sbatch"
    subprocess.run(["bash", "-n", str(sbatch)], check=True)
    assert "ray start --head --block" in sbatch.read_text()

    # the command lines the files run are accepted by the CLI (only the sweep file is missing here)
    entry = job["spec"]["entrypoint"].split()
    assert entry[:3] == ["mechdiff", "sweep", "run"]
    r = CliRunner().invoke(app, entry[1:])
    assert r.exit_code == 2 and "sweep file /sweeps/sweep.yaml does not exist" in r.output
    r = CliRunner().invoke(app, ["sweep", "run", "missing.yaml", "--address", "127.0.0.1:1", "--no-progress"])
    assert r.exit_code == 2 and "does not exist" in r.output

    docker = (deploy / "Dockerfile").read_text()
    assert 'index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}"' in docker


def test_main_job_on_the_cluster_runs_its_studies_in_a_worker(world, clean_run, cluster):
    """`mechdiff run SWEEP --address`: extraction (already done: the units are skipped), then the studies as a
    task on the cluster (models load and run in a worker process, not here), their dask graphs there too."""
    from mechdiff.cli import app

    conf = _sweep_yaml("out-clean").replace(
        "studies:\n  truthfulness: {capture: resid, datasets: [cities]}",
        "studies:\n  confidence: {capture: resid, datasets: [cities]}",
    )
    assert "confidence:" in conf
    path = _write(world, "main-job.yaml", conf)
    out = world / "main-job-out"
    r = CliRunner().invoke(app, ["run", str(path), "--out", str(out), "--address", cluster.address, "--quick"],
                           env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())
    assert f"studies of 1 group(s) run on the Ray cluster at {cluster.address}, dask graphs too" in text
    import re

    pid = int(re.search(r"tiny: studies ran on \S+ \(pid (\d+)\) in confidence", text).group(1))
    assert pid != os.getpid()
    import json

    res = json.loads((out / "tiny" / "results.json").read_text())
    assert set(res["studies"]) == {"confidence"}
    assert 0.0 <= res["studies"]["confidence"]["findings"][0]["figures"]["iou"] <= 1.0
