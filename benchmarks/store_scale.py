"""The activation store at scale: objects per TB, write speed and resume planning, sharded vs one object per chunk.

A synthetic store of --examples (1 M) x --layers (32) x --width (4096), float16, last token only (no model),
is created at full size (its metadata, token ids and done flags), then --write-shards work shards of random
data go through the real writer (ActivationStore.write_shard: cast, zstd + crc32c, fsync, done flag). What a
full store would be is extrapolated from those:

  objects/shard  objects one work shard writes (shard objects or chunks, plus its done flag)
  objects/TB     that per TB of uncompressed activations
  full objects   objects of the whole store (activations + flags)
  MB/s           uncompressed activation bytes written per second (median shard)
  plan s         ActivationStore.missing_shards() on the full-size store with every shard done: the shards
                 not written are stood in for by empty objects of the same names (a listing sees names only)

for --layout new (zarr v3 sharding codec, format 3) and old (one object per chunk, format 2), on a local
directory and, at small scale (--s3-examples, --s3-width), on an S3-protocol server on 127.0.0.1 (moto).

    python benchmarks/store_scale.py [--write-shards 4] [--layout both|new|old] [--no-s3] [--no-local]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import tempfile
import time
from dataclasses import dataclass

import numpy as np

from mechdiff.engine.store import ActivationStore, ArraySpec


@dataclass
class Row:
    layout: str
    where: str
    examples: int
    width: int
    objects_per_shard: float
    objects_per_tb: float
    full_objects: int
    mb_s: float
    create_s: float
    plan_s: float


def build(url: str, n: int, layers: int, width: int, shard: int, sharded: bool, so: dict | None) -> tuple[ActivationStore, float]:
    arrays = [ArraySpec("resid_post", "resid_post", tuple(range(layers)), None, width, "hidden")]
    ids = np.ones((n, 1), np.int32)  # one token id per example: the token matrix is not what is measured
    t0 = time.perf_counter()
    st = ActivationStore.create_or_open(url, "m/d", n_examples=n, shard_size=shard, arrays=arrays, coords={},
                                        token_ids=ids, provenance={"model_id": "bench"}, storage_options=so,
                                        sharded=sharded)
    return st, time.perf_counter() - t0


def count(fs, root: str) -> int:
    if fs is not None:
        fs.invalidate_cache()  # s3fs caches listings: the objects just written would not be seen
    return sum(len(files) for _, _, files in fs.walk(root)) if fs is not None else sum(
        len(files) for _, _, files in os.walk(root))


def placeholders(st: ActivationStore, written: set[int], put) -> None:
    """Empty objects under the names the shards not written would have (their data objects and done flags)."""
    grids = [g for g in st._grids() if g.per_shard]
    flag = st._flag_key
    for i in range(st.n_shards):
        if i in written:
            continue
        for g in grids:
            for k in g.keys(i):
                put(f"{g.name}/{k}")
        put(flag(i))


def measure(layout: str, where: str, url: str, fs, n: int, layers: int, width: int, shard: int, n_write: int,
            so: dict | None) -> Row:
    st, create_s = build(url, n, layers, width, shard, layout == "new", so)
    group_path = (url.split("://", 1)[1] if "://" in url else url) + "/m/d"
    before = count(fs, group_path)
    rng = np.random.default_rng(0)
    spec = st.arrays[0]
    data = {spec.name: rng.standard_normal(spec.shard_shape(shard), dtype=np.float32).astype(np.float16)}
    picks = sorted(rng.choice(st.n_shards - 1, size=min(n_write, st.n_shards - 1), replace=False).tolist())
    times = []
    for i in picks:
        t0 = time.perf_counter()
        st.write_shard(int(i), data)
        times.append(time.perf_counter() - t0)
    objects_per_shard = (count(fs, group_path) - before) / len(picks)
    shard_bytes = spec.nbytes(shard)
    mb_s = shard_bytes / statistics.median(times) / 1e6

    if fs is None:
        def put(key: str) -> None:
            p = os.path.join(group_path, key)
            os.makedirs(os.path.dirname(p), exist_ok=True)
            open(p, "wb").close()
    else:
        def put(key: str) -> None:
            fs.touch(f"{group_path}/{key}")
    placeholders(st, set(picks), put)
    t0 = time.perf_counter()
    missing = ActivationStore.open(url, "m/d", so, read_only=True).missing_shards()
    plan_s = time.perf_counter() - t0
    assert missing == [], f"{layout} {where}: {len(missing)} shards reported missing"
    return Row(layout, where, n, width, objects_per_shard, objects_per_shard / shard_bytes * 1e12,
               int(round(objects_per_shard * st.n_shards)), mb_s, create_s, plan_s)


def s3_server():
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    return server, f"http://127.0.0.1:{port}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=1_000_000)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--shard-size", type=int, default=256)
    ap.add_argument("--write-shards", type=int, default=4, help="work shards of real data written per store")
    ap.add_argument("--layout", choices=("both", "new", "old"), default="both")
    ap.add_argument("--s3-examples", type=int, default=8192)
    ap.add_argument("--s3-width", type=int, default=1024)
    ap.add_argument("--no-s3", action="store_true")
    ap.add_argument("--no-local", action="store_true")
    ap.add_argument("--dir", default=None, help="where the local stores go (default: a temporary directory)")
    a = ap.parse_args()
    for name in ("examples", "layers", "width", "shard_size", "write_shards", "s3_examples", "s3_width"):
        if getattr(a, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if a.examples < 2 * a.shard_size or a.s3_examples < 2 * a.shard_size:
        ap.error("--examples and --s3-examples must hold at least two work shards")
    layouts = ("new", "old") if a.layout == "both" else (a.layout,)
    rows: list[Row] = []
    if not a.no_local:
        base = tempfile.mkdtemp(prefix="store_scale_", dir=a.dir)
        try:
            for layout in layouts:
                url = os.path.join(base, f"{layout}.zarr")
                rows.append(measure(layout, "local", url, None, a.examples, a.layers, a.width, a.shard_size,
                                    a.write_shards, None))
                shutil.rmtree(url)
                print(rows[-1], flush=True)
        finally:
            shutil.rmtree(base, ignore_errors=True)
    if not a.no_s3:
        import s3fs

        for var in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE"):
            os.environ.pop(var, None)
        server, endpoint = s3_server()
        try:
            so = {"client_kwargs": {"endpoint_url": endpoint}, "key": "x", "secret": "x"}
            fs = s3fs.S3FileSystem(**so, skip_instance_cache=True)
            fs.mkdir("bench")
            for layout in layouts:
                url = f"s3://bench/{layout}.zarr"
                rows.append(measure(layout, "s3 (moto)", url, fs, a.s3_examples, a.layers, a.s3_width, a.shard_size,
                                    a.write_shards, so))
                fs.invalidate_cache()
                print(rows[-1], flush=True)
        finally:
            server.stop()

    head = f"{'layout':6} {'where':10} {'examples':>9} {'width':>5} {'obj/shard':>9} {'objects/TB':>11} {'full objects':>12} {'MB/s':>7} {'create s':>8} {'plan s':>7}"
    print()
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r.layout:6} {r.where:10} {r.examples:>9} {r.width:>5} {r.objects_per_shard:>9.1f} {r.objects_per_tb:>11,.0f} "
              f"{r.full_objects:>12,} {r.mb_s:>7.0f} {r.create_s:>8.2f} {r.plan_s:>7.2f}")


if __name__ == "__main__":
    main()
