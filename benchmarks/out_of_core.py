"""Out of core: the truthfulness and refusal statistics from stores 4x larger than the memory they may use.

Writes, through the real writer (ActivationStore.create_or_open + write_shard: zstd + crc32c, done flags), two
synthetic stores of --size-gb each (no model: random activations with a planted direction):

  truth.zarr    groups a/truth and b/truth (a pair of "models", half the size each), positions last:2, with the
                label / topic / split / text columns the truthfulness study reads
  refusal.zarr  group a/refusal, post_instruction positions (--refusal-positions of them), a 0/1 harmful column

Then each statistic runs in a fresh child process (dask's threaded scheduler, --threads workers: the process is
the dask worker) while this process samples the child's resident memory (VmRSS, every 10 ms) and, like a dask
nanny at its terminate threshold, kills it when it passes --limit-mb (default: a quarter of --size-gb):

  truth    truthfulness_study(stores, models=None, intervene=False): class sums, probes on every layer and
           fold, transfer, cosines, the shuffled-label / split-half / bootstrap controls and the PCA figure
  refusal  refusal_directions: mean(harmful) - mean(harmless) per layer and post-instruction position
  truth-old  today's materialising steps, as they were before the out-of-core rewrite (same class sums, then
           the [example, source, fold, layer] projections of every layer at once, the chosen layer's rows
           loaded whole for the controls with [k, n] float64 weight matrices, and every statement in the PCA)

and prints the wall time, the peak RSS (and that of the child right after its imports) against the limit.
The child's environment sets MALLOC_TRIM_THRESHOLD_=65536 and one BLAS thread, as dask.distributed's nanny does for
its workers. The child's baseline (Python, numpy, dask, zarr, xarray, torch: what any mechdiff worker imports) counts
against the limit.
A store already written (all shards done) is reused; an interrupted write resumes.

    python benchmarks/out_of_core.py [--size-gb 3.2] [--limit-mb N] [--dir /tmp/mechdiff_ooc] [--only truth,refusal,truth-old]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

LAYERS, WIDTH, SHARD = 4, 512, 1024
TOPICS = ("cities", "numbers", "words")


# ---------------------------------------------------------------------------------------------
# writing


def _write_group(url: str, group: str, n: int, n_pos: int, positions: str, coords: dict, y: np.ndarray,
                 direction: np.ndarray, seed: int) -> float:
    """Create (or reopen) one group and write its missing shards: N(0, 1) activations plus ±1.5 * direction at
    layers >= 2 by label. Returns the seconds spent writing."""
    from mechdiff.engine.store import ActivationStore, ArraySpec

    spec = ArraySpec("resid_post", "resid_post", tuple(range(LAYERS)), n_pos, WIDTH, "hidden", "float32")
    st = ActivationStore.create_or_open(
        url, group, n_examples=n, shard_size=SHARD, arrays=[spec], coords=coords, token_ids=np.ones((n, 2), np.int32),
        provenance={"model_id": f"synthetic/{group}", "positions": positions, "template": "none"},
    )
    t0 = time.perf_counter()
    for i in st.missing_shards():
        r = st.shard_range(i)
        rng = np.random.default_rng([seed, i])  # per shard: a resumed write gives the same data
        x = rng.standard_normal((len(r), LAYERS, n_pos, WIDTH), dtype=np.float32)
        x[:, 2:] += ((2 * y[r.start:r.stop] - 1) * 1.5)[:, None, None, None].astype(np.float32) * direction
        st.write_shard(i, {"resid_post": x})
    st.finish()
    return time.perf_counter() - t0


def write_stores(root: Path, size_gb: float, refusal_positions: int) -> dict[str, dict]:
    from mechdiff.engine.store import open_store

    rng = np.random.default_rng(0)
    v = rng.normal(size=WIDTH).astype(np.float32)
    v /= np.linalg.norm(v)
    out = {}
    # truth: two groups of size_gb / 2 each
    n = int(size_gb * 1e9 / 2 / (LAYERS * 2 * WIDTH * 4)) // SHARD * SHARD
    topics = np.asarray([TOPICS[i % len(TOPICS)] for i in range(n)], dtype=object)
    y = (np.arange(n) // len(TOPICS)) % 2
    split = np.where(np.arange(n) % 4 == 3, "test", "train").astype(object)
    coords = {"label": y, "topic": topics, "split": split, "text": np.asarray([f"s{i}" for i in range(n)], dtype=object)}
    secs = 0.0
    for gi, g in enumerate(("a/truth", "b/truth")):
        secs += _write_group(str(root / "truth.zarr"), g, n, 2, "last:2", coords, y, v, seed=1 + gi)
    out["truth"] = dict(n=n, write_s=secs, bytes=2 * n * LAYERS * 2 * WIDTH * 4)
    # refusal: one group of size_gb
    n = int(size_gb * 1e9 / (LAYERS * refusal_positions * WIDTH * 4)) // SHARD * SHARD
    y = np.arange(n) % 2
    secs = _write_group(str(root / "refusal.zarr"), "a/refusal", n, refusal_positions, "post_instruction",
                        {"harmful": y}, y, v, seed=9)
    out["refusal"] = dict(n=n, write_s=secs, bytes=n * LAYERS * refusal_positions * WIDTH * 4)
    for k, g in (("truth", "a/truth"), ("refusal", "a/refusal")):
        ds = open_store(str(root / f"{k}.zarr"), g)
        out[k]["chunk_mb"] = float(np.prod(ds["resid_post"].data.chunksize) * 4 / 2**20)
    return out


# ---------------------------------------------------------------------------------------------
# the statistics (run in the child)


def _old_truth(stores: dict, settings) -> dict:
    """Today's steps before the out-of-core rewrite, reproduced: what the study materialised."""
    import dask
    import xarray as xr

    from mechdiff.analyses.plotting import pca_projection
    from mechdiff.analyses.truthfulness import _centred_diff, _data_from_store, _folds, mean_diff_sums

    names = list(stores)
    data = _data_from_store(stores[names[0]], None)
    fit, topics = data.fit_mask(settings), data.topics
    folds = _folds(data, settings)
    sums = {n: mean_diff_sums(stores[n], settings.site, data.labels, rows=fit, center_by=topics) for n in names}
    keys = list(sums[names[0]].groups)
    pos = -1
    p_idx = int(np.flatnonzero(stores[names[0]]["position"].values == pos)[0])
    D = np.stack([np.stack([_centred_diff(sums[n], [t for t in keys if t != h], None)[:, p_idx] for h in folds]) for n in names])
    layers = stores[names[0]]["layer"].values
    Dx = xr.DataArray(D, dims=("source", "fold", "layer", "width"), coords={"source": names, "fold": folds, "layer": layers})
    projs = {}
    for n in names:  # every layer's scores at once, into numpy
        x = stores[n][settings.site].sel(position=pos).rename(hidden="width")
        projs[n] = np.asarray(dask.compute(xr.dot(x.astype(np.float64), Dx, dim="width").transpose("example", "source", "fold", "layer").data)[0])
    # the controls: the chosen layer's rows of both models loaded whole, [k, n] float64 weights
    X = {n: np.asarray(stores[n][settings.site].sel(layer=2, position=pos).values, dtype=np.float64)[fit] for n in names}
    c, _ = _old_direction_controls(X[names[0]], X[names[1]], data.labels[fit], data.topics[fit], settings)
    # the PCA figure's input: every statement at the layer, both models
    acts = {n: np.asarray(stores[n][settings.site].sel(layer=2, position=pos).values, dtype=np.float64) for n in names}
    coords = {n: pca_projection(a)[0] for n, a in acts.items()}
    return {"cosine": c, "proj_mb": sum(p.nbytes for p in projs.values()) / 2**20, "pca_rows": len(next(iter(coords.values())))}


def _old_direction_controls(Xa, Xb, labels, groups, settings) -> tuple[float, tuple]:
    """The weight matrices the controls built before: [n_bootstrap, n] float64 counts and weights (and the null's
    and split halves'), each multiplied with the whole rows."""
    from mechdiff.analyses.directions import _row_cos, _strata

    y = np.asarray(labels).astype(bool)
    n = len(y)

    def diff_weights(y, counts):
        pos, neg = counts * y, counts * ~y
        return pos / np.maximum(pos.sum(1, keepdims=True), 1e-300) - neg / np.maximum(neg.sum(1, keepdims=True), 1e-300)

    rng = np.random.default_rng(settings.seed + 13)
    counts = np.zeros((settings.n_bootstrap, n))
    for idx in _strata(y, np.asarray(groups)):
        counts[:, idx] = rng.multinomial(idx.size, np.full(idx.size, 1.0 / idx.size), size=settings.n_bootstrap)
    wb = diff_weights(y, counts)
    boot = _row_cos(wb @ Xa, wb @ Xb)
    w = diff_weights(y, np.ones((1, n)))
    return float(_row_cos(w @ Xa, w @ Xb)[0]), tuple(np.nanquantile(boot, [0.025, 0.975]))


def child(kind: str, root: Path, threads: int) -> None:
    import dask

    t_import = time.perf_counter()
    from mechdiff.analyses.refusal import refusal_directions
    from mechdiff.analyses.truthfulness import TruthSettings, truthfulness_study
    from mechdiff.engine.store import open_store

    dask.config.set(scheduler="threads", num_workers=threads)
    base = _rss_mb()
    t0 = time.perf_counter()
    settings = TruthSettings(intervene=False)
    if kind == "truth":
        stores = {m: open_store(str(root / "truth.zarr"), f"{m}/truth") for m in ("a", "b")}
        with tempfile.TemporaryDirectory() as d:
            res = truthfulness_study(stores, None, d, settings=settings, save=False)
        c = res.summary["controls"]["a_vs_b"]
        what = f"cosine {c['cosine']:.3f}, best layers {res.data['best_layer'].values.tolist()}"
    elif kind == "truth-old":
        stores = {m: open_store(str(root / "truth.zarr"), f"{m}/truth") for m in ("a", "b")}
        r = _old_truth(stores, settings)
        what = f"cosine {r['cosine']:.3f}, projections {r['proj_mb']:.0f} MB, PCA of {r['pca_rows']} rows"
    elif kind == "refusal":
        ds = open_store(str(root / "refusal.zarr"), "a/refusal")
        d = refusal_directions(ds)
        what = f"direction norm at layer 2: {float(np.linalg.norm(d.sel(layer=2).values, axis=-1).mean()):.2f}"
    else:
        raise SystemExit(f"unknown statistic {kind!r}")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # the kernel's peak (KiB): no sample missed
    print(json.dumps({"seconds": time.perf_counter() - t0, "base_mb": base, "import_s": t0 - t_import, "what": what,
                      "maxrss_mb": peak}))


def _rss_mb(pid: int | str = "self") -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0.0


# ---------------------------------------------------------------------------------------------
# the parent: run, sample, enforce


def run_child(kind: str, root: Path, limit_mb: float, threads: int, kill: bool) -> dict:
    # what dask.distributed's nanny sets for its workers: freed memory goes back to the OS, one BLAS thread per
    # process (BLAS threads on top of dask's oversubscribe the cores: a 2000 x 512 SVD takes 20x longer here)
    env = dict(os.environ, MALLOC_TRIM_THRESHOLD_="65536", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               OPENBLAS_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, __file__, "--child", kind, "--dir", str(root), "--threads", str(threads)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    peak, killed_at = 0.0, None
    while p.poll() is None:
        rss = _rss_mb(p.pid)
        peak = max(peak, rss)
        if kill and rss > limit_mb and killed_at is None:
            killed_at = time.perf_counter() - t0
            p.kill()
        time.sleep(0.01)
    out, err = p.communicate()
    wall = time.perf_counter() - t0
    row = {"kind": kind, "wall_s": wall, "peak_mb": peak, "limit_mb": limit_mb, "killed_at_s": killed_at, "rc": p.returncode}
    if p.returncode == 0:
        row.update(json.loads(out.strip().splitlines()[-1]))
        row["peak_mb"] = max(peak, row["maxrss_mb"])
    elif killed_at is None:
        row["error"] = err.strip().splitlines()[-1] if err.strip() else f"exit {p.returncode}"
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-gb", type=float, default=3.2, help="size of each store (uncompressed activations)")
    ap.add_argument("--limit-mb", type=float, default=None, help="memory limit of the worker (default: size / 4)")
    ap.add_argument("--dir", default=None, help="where the stores go (default: a temporary directory, removed after)")
    ap.add_argument("--only", default="truth,refusal,truth-old", help="statistics to run, comma-separated")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--refusal-positions", type=int, default=5)
    ap.add_argument("--no-kill", action="store_true", help="let a child run past the limit (to see its full peak)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a.child, Path(a.dir), a.threads)
        return
    if a.size_gb <= 0:
        ap.error("--size-gb must be > 0")
    kinds = [k for k in a.only.split(",") if k]
    bad = [k for k in kinds if k not in ("truth", "refusal", "truth-old")]
    if bad:
        ap.error(f"--only: unknown {bad}; choose from truth, refusal, truth-old")
    limit = a.limit_mb if a.limit_mb is not None else a.size_gb * 1e3 / 4 * 1e6 / 2**20
    tmp = a.dir is None
    root = Path(a.dir or tempfile.mkdtemp(prefix="mechdiff_ooc_"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        info = write_stores(root, a.size_gb, a.refusal_positions)
        print(f"stores under {root} (written/checked in {time.perf_counter() - t0:.0f} s):")
        for k, v in info.items():
            print(f"  {k:8s} {v['n']:>7d} examples, {v['bytes'] / 1e9:.2f} GB of activations, chunks "
                  f"{v['chunk_mb']:.1f} MiB, written in {v['write_s']:.0f} s")
        print(f"memory limit {limit:.0f} MiB (store / {a.size_gb * 1e9 / 2**20 / limit:.1f}), {a.threads} dask threads\n")
        print(f"{'statistic':10s} {'store GB':>8s} {'time s':>7s} {'peak MiB':>9s} {'after imports':>13s}  result")
        for k in kinds:
            r = run_child(k, root, limit, a.threads, kill=not a.no_kill)
            gb = info["refusal" if k == "refusal" else "truth"]["bytes"] / 1e9
            if r.get("killed_at_s") is not None:
                res = f"KILLED: over the {limit:.0f} MiB limit after {r['killed_at_s']:.1f} s"
            elif r["rc"] != 0:
                res = f"FAILED: {r.get('error')}"
            else:
                res = ("within" if r["peak_mb"] <= limit else "OVER") + f" the limit; {r['what']}"
            base = f"{r['base_mb']:.0f}" if "base_mb" in r else "-"
            print(f"{k:10s} {gb:8.2f} {r['wall_s']:7.1f} {r['peak_mb']:9.0f} {base:>13s}  {res}", flush=True)
    finally:
        if tmp:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
