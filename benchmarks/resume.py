"""How long it takes to plan a resume: which shards of a big store still need writing.

A group of 10,000 shards (one example each, two arrays: resid_post at 2 layers x 2 positions and mlp_act at
1 layer) is made and filled, then a few chunks and done flags are removed. Timed, on a local directory and on
an S3-protocol server on 127.0.0.1 (moto), each the median of --rounds:

  plan     ActivationStore.missing_shards(): one listing of the group, checked against the chunk grid
           (flagged shards with a chunk missing count as missing)
  flags    one read of every done flag (what one planning call cost before, without finding missing chunks;
           extraction made one such call per shard, so the old plan cost shards x flags)
  verify   ActivationStore.check(checksums=True): every chunk read and its crc32c checked

    python benchmarks/resume.py [--shards 10000] [--rounds 3] [--no-s3] [--no-local] [--no-verify-s3]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import tempfile
import time

import numpy as np

from mechdiff.engine.store import ActivationStore, ArraySpec


def make_store(url: str, n: int, so: dict | None) -> ActivationStore:
    arrays = [
        ArraySpec("resid_post", "resid_post", (0, 1), 2, 8, "hidden"),
        ArraySpec("mlp_act", "mlp_act", (1,), None, 16, "neuron"),
    ]
    ids = np.arange(n * 3, dtype=np.int32).reshape(n, 3) % 500
    st = ActivationStore.create_or_open(
        url, "m/d", n_examples=n, shard_size=1, arrays=arrays, coords={"text": np.array([f"t{i}" for i in range(n)], dtype=object)},
        token_ids=ids, provenance={"model_id": "bench"}, storage_options=so,
    )
    rng = np.random.default_rng(0)
    # Fill every shard in one zarr write per array (concurrent chunk writes), then every flag: the result is
    # what shard-by-shard extraction leaves, made in seconds instead of minutes.
    st._zarrays["resid_post"][:] = rng.standard_normal((n, 2, 2, 8)).astype(np.float16)
    st._zarrays["mlp_act"][:, 1:2] = rng.standard_normal((n, 1, 16)).astype(np.float16)
    st._done.with_config({"write_empty_chunks": True})[:] = True
    return st


def damage(st: ActivationStore, url: str, so: dict | None) -> set[int]:
    """Delete 5 chunks and 5 done flags; return the shards a resume must rewrite."""
    from zarr.core.sync import sync

    store = st._zgroup.store
    grid = next(g for g in st._grids() if g.name == "resid_post")
    hit = {7, 1234, 5000, 8888, st.n_shards - 1}
    for s in hit:
        sync(store.delete(f"m/d/resid_post/{grid.keys(s)[0]}"))
    flags = {3, 42, 4321, 7777, 9000}
    for s in flags:
        st._clear_flag(s)
    return hit | flags


def timed(fn, rounds: int) -> tuple[float, object]:
    out, times = None, []
    for _ in range(rounds):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def bench(label: str, url: str, n: int, rounds: int, so: dict | None, verify: bool = True) -> None:
    t0 = time.perf_counter()
    st = make_store(url, n, so)
    made = time.perf_counter() - t0
    want = damage(st, url, so)
    st = ActivationStore.open(url, "m/d", so)
    t_plan, missing = timed(st.missing_shards, rounds)
    assert set(missing) == want, (sorted(missing), sorted(want))
    t_flags, _ = timed(lambda: st._done[:], 1)  # slow on S3: once is enough to see it
    t_verify, rep = timed(lambda: st.check(checksums=True), 1) if verify else (float("nan"), None)
    print(
        f"{label}: {n} shards (filled in {made:.1f}s), {len(missing)} to rewrite found\n"
        f"  plan (one listing + grid)     {t_plan:8.3f} s\n"
        f"  read of all done flags        {t_flags:8.3f} s   (old plan: x{n} calls = {t_flags * n / 60:.1f} min)\n"
        f"  verify every chunk's crc32c   {t_verify:8.3f} s   ({rep.chunks_checked if rep else 0} chunks)",
        flush=True,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", type=int, default=10_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-s3", action="store_true")
    ap.add_argument("--no-local", action="store_true")
    ap.add_argument("--no-verify-s3", action="store_true", help="skip reading every chunk back from the S3 server (slow on moto)")
    args = ap.parse_args()
    if not args.no_local:
        with tempfile.TemporaryDirectory() as d:
            bench("local", os.path.join(d, "store.zarr"), args.shards, args.rounds, None)
    if args.no_s3:
        return
    import logging

    import s3fs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request

    for var in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE"):
        os.environ.pop(var, None)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        so = {"client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}"}, "key": "x", "secret": "x"}
        s3fs.S3FileSystem(**so, skip_instance_cache=True).mkdir("bench")
        bench("s3 (moto on 127.0.0.1)", "s3://bench/store.zarr", args.shards, args.rounds, so, verify=not args.no_verify_s3)
    finally:
        server.stop()


if __name__ == "__main__":
    main()
