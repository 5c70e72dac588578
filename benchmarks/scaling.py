"""Scaling of sweep extraction over Ray actors on CPU: tokens/s with 1 and with 2 actors (1 torch thread
each), against one process with 2 threads; and 2 actors whose writes do not overlap the next unit (the pool
with ``pipeline=1``, as before the persistent writer) against the default pool (each actor's persistent
writer writes a unit while the next one computes).

The benchmark Llama of the engine issue (random weights, 8 layers, d_model 512, 8 heads, MLP 1536, vocab
8192), 512 prompts of 16-128 tokens (fixed seed), last-token resid_post at every layer into an fp16 store,
shards of 32 examples (16 work units), token budget 4096. The three modes run the same batches.

A local Ray with 5 logical CPUs holds the three pools at once (1 actor, 2 actors, 2 actors without overlap),
so every model loads once and an idle actor uses no core. Modes are interleaved round by round (order rotated), the first round is a
warm-up, and ratios are taken within a round (this machine's run-to-run noise is larger than the effects).

tokens/s of a pool run = its tokens / (last unit done - first unit dispatched): the extraction phase, like
the single process's ``ExtractReport.tokens_per_s`` (forward passes and writes, after tokenization and
store creation). End-to-end rates (the whole ``run_sweep`` / ``extract`` call) are printed too, and tokens
per CPU-second of the working processes: on a machine shared with other jobs the wall-clock ratios
understate the scaling, while tokens per CPU-second show whether the actors lose efficiency by running
side by side.

    python benchmarks/scaling.py [--rounds 3] [--prompts 512] [--shard-size 32]
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import os
import statistics
import sys
import tempfile
import time

# Fewer page faults, steadier timings; set before the process (and the Ray workers it starts) begins.
_TUNABLES = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736"
if os.environ.get("GLIBC_TUNABLES") != _TUNABLES and not os.environ.get("MECHDIFF_BENCH_NO_REEXEC"):
    os.environ["GLIBC_TUNABLES"] = _TUNABLES
    os.execv(sys.executable, [sys.executable, *sys.argv])

import torch  # noqa: E402

from mechdiff.cluster.pool import ActorPool  # noqa: E402
from mechdiff.cluster.ray_env import connect  # noqa: E402
from mechdiff.cluster.runner import run_sweep  # noqa: E402
from mechdiff.cluster.sweep import parse_sweep  # noqa: E402
from mechdiff.engine.data import load_prompts  # noqa: E402
from mechdiff.engine.extract import extract  # noqa: E402
from mechdiff.engine.models import load_model  # noqa: E402
from mechdiff.engine.tiny import build_tiny_model, random_prompts  # noqa: E402


def _load() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3, help="measured rounds (after one warm-up round)")
    ap.add_argument("--prompts", type=int, default=512)
    ap.add_argument("--shard-size", type=int, default=32)
    ap.add_argument("--token-budget", type=int, default=4096)
    args = ap.parse_args()

    print(f"{os.cpu_count()} cores; load average at start {_load()}", flush=True)
    tmp = tempfile.mkdtemp(prefix="mechdiff-scaling-")
    model = build_tiny_model(f"{tmp}/llama", "llama", n_layers=8, d_model=512, n_heads=8, d_mlp=1536,
                             vocab_size=8192, max_positions=512)
    with open(f"{tmp}/prompts.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text"])
        for t in random_prompts(args.prompts, 16, 128, vocab_size=8192, seed=0):
            w.writerow([t])

    def sweep_text(out: str) -> str:
        return f"""
output: {out}
shard_size: {args.shard_size}
token_budget: {args.token_budget}
models:
  bench: {{base: {model}, post: {{same: {model}}}}}
datasets:
  prompts: {tmp}/prompts.csv
captures:
  resid: {{sites: [resid_post], layers: all, positions: last, models: [bench]}}
"""

    def one_target(out: str):
        sw = parse_sweep(sweep_text(out), file="scaling.yaml", base_dir=tmp)
        # only the base model: the post "model" is there because a group needs one
        return sw, [t for t in sw.targets() if t.model.label == "base"]

    connect(None, num_cpus=5)
    pool1 = ActorPool(1, num_cpus=1, torch_threads=1, max_retries=0)
    pool2 = ActorPool(2, num_cpus=1, torch_threads=1, max_retries=0)
    pool2s = ActorPool(2, num_cpus=1, torch_threads=1, max_retries=0, pipeline=1)
    for p in (pool1, pool2, pool2s):
        p.start()
    for p in (pool1, pool2, pool2s):
        p.pids(timeout=300)

    torch.set_num_threads(2)
    lm = load_model(model)
    prompts = load_prompts(f"{tmp}/prompts.csv")

    def run_pool(pool: ActorPool, out: str) -> tuple[float, float, int, float]:
        sw, targets = one_target(out)
        sw = dataclasses.replace(sw, models=tuple(m for m in sw.models if m.label == "base"))
        marks: dict[str, float] = {"cpu": 0.0}

        def ev(e) -> None:
            if e.task is not None and e.task.kind == "unit":
                if e.kind == "dispatch":
                    marks.setdefault("first", time.perf_counter())
                elif e.kind == "done":
                    marks["last"] = time.perf_counter()
                    marks["cpu"] += e.result.cpu_seconds

        t0 = time.perf_counter()
        rep = run_sweep(sw, pool=pool, progress=False, on_event=ev, extra=[])  # no studies
        wall = time.perf_counter() - t0
        return rep.tokens / (marks["last"] - marks["first"]), rep.tokens / wall, rep.tokens, rep.tokens / marks["cpu"]

    def run_single(out: str) -> tuple[float, float, int, float]:
        _, (t,) = one_target(out)
        t0, c0 = time.perf_counter(), time.process_time()
        rep = extract(lm, prompts, t.capture.spec, out, t.group, token_budget=args.token_budget,
                      shard_size=args.shard_size, progress=False)
        cpu = time.process_time() - c0
        return rep.tokens_per_s, rep.tokens / (time.perf_counter() - t0), rep.tokens, rep.tokens / cpu

    modes = {
        "1 actor x 1 thread": lambda out: run_pool(pool1, out),
        "2 actors x 1 thread": lambda out: run_pool(pool2, out),
        "1 process x 2 threads": run_single,
        "2 actors, writes not overlapped": lambda out: run_pool(pool2s, out),
    }
    names = list(modes)
    phase: dict[str, list[float]] = {k: [] for k in names}
    e2e: dict[str, list[float]] = {k: [] for k in names}
    per_cpu: dict[str, list[float]] = {k: [] for k in names}
    for r in range(args.rounds + 1):
        order = names[r % len(names):] + names[: r % len(names)]
        line = []
        for name in order:
            tps, tps_e2e, tokens, tpc = modes[name](f"{tmp}/out-{r}-{names.index(name)}")
            if r > 0:
                phase[name].append(tps)
                e2e[name].append(tps_e2e)
                per_cpu[name].append(tpc)
            line.append(f"{name}: {tps:,.0f} tok/s ({tps_e2e:,.0f} end-to-end)")
        print(("warm-up " if r == 0 else f"round {r}: ") + "; ".join(line) + f"  [{tokens:,} tokens, load {_load()}]", flush=True)

    a1, a2, p2, a2s = names
    ratio_actors = [b / a for a, b in zip(phase[a1], phase[a2])]
    ratio_vs_proc = [b / a for a, b in zip(phase[p2], phase[a2])]
    ratio_proc = [b / a for a, b in zip(phase[a1], phase[p2])]
    print()
    for name in names:
        print(f"{name:32s} {statistics.median(phase[name]):9,.0f} tok/s   end-to-end {statistics.median(e2e[name]):9,.0f} tok/s"
              f"   {statistics.median(per_cpu[name]):9,.0f} tok per CPU-s")
    print()
    print(f"2 actors / 1 actor            = {statistics.median(ratio_actors):.2f}   per round {[round(x, 2) for x in ratio_actors]}  (target >= 1.7)")
    print(f"2 actors / 1 process 2 threads = {statistics.median(ratio_vs_proc):.2f}   per round {[round(x, 2) for x in ratio_vs_proc]}")
    print(f"1 process 2 threads / 1 actor  = {statistics.median(ratio_proc):.2f}   per round {[round(x, 2) for x in ratio_proc]}")
    ratio_overlap = [b / a for a, b in zip(phase[a2s], phase[a2])]
    print(f"2 actors overlapped / not      = {statistics.median(ratio_overlap):.2f}   per round {[round(x, 2) for x in ratio_overlap]}")
    e2e_ratio = [b / a for a, b in zip(e2e[a1], e2e[a2])]
    print(f"end-to-end 2 actors / 1 actor = {statistics.median(e2e_ratio):.2f}")
    print(f"load average at end {_load()}")
    for p in (pool1, pool2, pool2s):
        p.close()


if __name__ == "__main__":
    main()
