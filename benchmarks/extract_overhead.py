"""What capture costs: extraction tokens/s over a plain forward pass on the same batches.

A random-weight Llama (8 layers, d_model 512, 8 heads, MLP 1536, vocab 8192), 512 prompts of 16-128
tokens (fixed seed), 2 threads. Methods are interleaved round by round in one process and compared by
the median over rounds, since this machine's run-to-run noise is larger than the effects measured.

    python benchmarks/extract_overhead.py [--rounds 3] [--prompts 512]
    python benchmarks/extract_overhead.py --sweep-budgets 1024,2048,4096,16384   # (e) only

(a)  plain forward, HF default (logits at every position), length-bucketed batches
(a') forward of the decoder stack alone (no unembedding), same batches: the stricter baseline
(b)  extraction of last-token resid_post at all layers into a store (writer thread included)
(c)  the same at all positions
(d)  plain forward with length-bucketed vs dataset-order batches (same rows per batch on average)
(e)  with --sweep-budgets: extraction (b) at each token budget, shards of 256 as `extract` makes by default,
     the budgets interleaved shard by shard, wall and CPU time: what the per-device default rests on
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

# Fewer page faults, steadier timings (measured: spread 8.7% -> 3.4%). Must be set before the process
# starts, so re-exec once with it.
_TUNABLES = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736"
if os.environ.get("GLIBC_TUNABLES") != _TUNABLES and not os.environ.get("MECHDIFF_BENCH_NO_REEXEC"):
    os.environ["GLIBC_TUNABLES"] = _TUNABLES
    os.execv(sys.executable, [sys.executable, *sys.argv])

import torch  # noqa: E402

from mechdiff.engine.batching import length_batches, pad_batch, tokenize  # noqa: E402
from mechdiff.engine.data import PromptSet  # noqa: E402
from mechdiff.engine.extract import CaptureSpec, extract  # noqa: E402
from mechdiff.engine.models import load_model  # noqa: E402
from mechdiff.engine.tiny import build_tiny_model, random_prompts  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=512)
    ap.add_argument("--token-budget", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sweep-budgets", help="comma-separated token budgets: run (e) only")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    tmp = tempfile.mkdtemp(prefix="mechdiff-bench-")
    path = build_tiny_model(
        f"{tmp}/llama", "llama", n_layers=8, d_model=512, n_heads=8, d_mlp=1536, vocab_size=8192, max_positions=512
    )
    lm = load_model(path)
    texts = random_prompts(args.prompts, 16, 128, vocab_size=8192, seed=0)
    prompts = PromptSet.from_texts(texts)
    ids = tokenize(lm.tokenizer, texts)
    lengths = [len(x) for x in ids]
    n_tokens = sum(lengths)
    pad = lm.tokenizer.pad_token_id
    # The same batches extraction uses: one shard holding every prompt, bucketed under the token budget.
    bucketed = [pad_batch([ids[i] for i in b], pad) for b in length_batches(lengths, range(len(ids)), args.token_budget)]
    rows = max(1, round(len(ids) / len(bucketed)))
    in_order = [pad_batch(ids[s : s + rows], pad) for s in range(0, len(ids), rows)]
    real = n_tokens / sum(b["input_ids"].numel() for b in in_order)
    print(f"{len(ids)} prompts, {n_tokens} tokens; {len(bucketed)} bucketed batches; dataset-order batches of "
          f"{rows} rows are {real:.0%} real tokens")

    @torch.inference_mode()
    def plain(batches) -> float:
        t = time.perf_counter()
        for b in batches:
            lm.model(**b, use_cache=False)
        return time.perf_counter() - t

    @torch.inference_mode()
    def decoder_only(batches) -> float:
        t = time.perf_counter()
        for b in batches:
            lm.model.model(**b, use_cache=False)
        return time.perf_counter() - t

    def run_extract(positions: str, r: int) -> float:
        spec = CaptureSpec(sites=("resid_post",), layers="all", positions=positions)
        t = time.perf_counter()
        extract(lm, prompts, spec, f"{tmp}/{positions}-{r}.zarr", "g", token_budget=args.token_budget,
                shard_size=len(prompts), progress=False)
        return time.perf_counter() - t

    if args.sweep_budgets:
        sweep_budgets(lm, prompts, [int(b) for b in args.sweep_budgets.split(",")], args.rounds, n_tokens, tmp)
        return
    plain(bucketed[:2])  # warm-up
    times: dict[str, list[float]] = {k: [] for k in ("a", "a2", "b", "c", "d_bucketed", "d_order")}
    for r in range(args.rounds):
        times["a"].append(plain(bucketed))
        times['a2'].append(decoder_only(bucketed))
        times["b"].append(run_extract("last", r))
        times["c"].append(run_extract("all", r))
        times["d_order"].append(plain(in_order))
        times["d_bucketed"].append(plain(bucketed))
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()), flush=True)

    tps = {k: n_tokens / statistics.median(v) for k, v in times.items()}
    print()
    print(f"(a)  plain forward          {tps['a']:10,.0f} tok/s")
    print(f"(a') decoder stack only     {tps['a2']:10,.0f} tok/s")
    print(f"(b)  extract last, all layers {tps['b']:8,.0f} tok/s")
    print(f"(c)  extract all positions  {tps['c']:10,.0f} tok/s")
    print(f"(d)  bucketed {tps['d_bucketed']:,.0f} tok/s vs dataset order {tps['d_order']:,.0f} tok/s")
    print()
    print(f"b/a  = {tps['b'] / tps['a']:.3f}   b/a' = {tps['b'] / tps['a2']:.3f}")
    print(f"c/a  = {tps['c'] / tps['a']:.3f}   c/a' = {tps['c'] / tps['a2']:.3f}")
    print(f"d: bucketed / dataset order = {tps['d_bucketed'] / tps['d_order']:.3f}")


def sweep_budgets(lm, prompts: PromptSet, budgets: list[int], rounds: int, n_tokens: int, tmp: str) -> None:
    """(e): last-token extraction at each budget, one shard at a time, the budgets' order rotating."""
    shard = 256
    shards = [list(range(s, min(s + shard, len(prompts)))) for s in range(0, len(prompts), shard)]
    spec = CaptureSpec(sites=("resid_post",), layers="all", positions="last")
    for b in budgets:  # warm-up: the first extraction of a process pays for imports and allocator growth
        extract(lm, prompts.subset(shards[0][:32]), spec, f"{tmp}/sweep-warm-{b}.zarr", "g", token_budget=b,
                shard_size=shard, progress=False)
    wall = {b: 0.0 for b in budgets}
    cpu = {b: 0.0 for b in budgets}
    k = 0
    for r in range(rounds):
        for rows in shards:
            part = prompts.subset(rows)
            for b in budgets[k % len(budgets):] + budgets[: k % len(budgets)]:
                t, c = time.perf_counter(), time.process_time()
                extract(lm, part, spec, f"{tmp}/sweep-{b}-{k}.zarr", "g", token_budget=b, shard_size=shard, progress=False)
                wall[b] += time.perf_counter() - t
                cpu[b] += time.process_time() - c
            k += 1
        print(f"round {r + 1}: " + ", ".join(f"{b} {wall[b]:.1f}s" for b in budgets), flush=True)
    print()
    best = min(wall.values())
    for b in budgets:
        print(f"(e)  budget {b:6d}: {n_tokens * rounds / wall[b]:8,.0f} tok/s wall ({best / wall[b]:.2f} of the best), "
              f"{n_tokens * rounds / cpu[b]:8,.0f} tok per CPU-s")


if __name__ == "__main__":
    main()
