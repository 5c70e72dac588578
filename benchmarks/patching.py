"""The full layer x position patching sweep: exact method vs the naive loop, and attribution patching.

Two workloads, site resid_post, every layer and every position of every pair:

(1) the embedded pair (the post model, within-model patching of the zoo's few-shot "This statement is:" pairs);
    skipped with a message when the pair is not shipped yet;
(2) a random-weight Llama (8 layers, d_model 512, 8 heads, MLP 1536, vocab 8192), pairs of 16-token prompts
    that differ in one token at a random position.

Methods, interleaved round by round in one process (this machine's run-to-run noise is larger than some
effects), each timed end to end including its own clean / corrupted runs:

  naive        one full forward per (pair, layer, position), patched by a hand-written hook
  exact        mechdiff.engine.patching.exact_patching (defaults: no-op variants answered from the false
               run, suffix-only recomputation from the cached keys/values, resumed blocks, batched)
  exact-all    the same with skip_unchanged=False: every variant is run
  exact-layer  every variant, each resumed from the cached residual stream at its layer but recomputing every
               position there (reuse_prefix=False): batched resumption alone, without the position savings
  attribution  attribution_patching: per batch of pairs, the shared prefix once, then the true run and one
               forward and one backward of the false run over the tokens after it

Reported: median seconds per method, the ratios, and the largest |exact - naive| patched logit difference.

    python benchmarks/patching.py [--rounds 3] [--pairs 8] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

# Fewer page faults, steadier timings (see benchmarks/extract_overhead.py). Must be set before the process
# starts, so re-exec once with it.
_TUNABLES = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736"
if os.environ.get("GLIBC_TUNABLES") != _TUNABLES and not os.environ.get("MECHDIFF_BENCH_NO_REEXEC"):
    os.environ["GLIBC_TUNABLES"] = _TUNABLES
    os.execv(sys.executable, [sys.executable, *sys.argv])

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from mechdiff.analyses.knowledge import load_pairs, load_shots, pearson, prepare_pairs  # noqa: E402
from mechdiff.engine.models import load_model  # noqa: E402
from mechdiff.engine.patching import attribution_patching, exact_patching, naive_patching  # noqa: E402
from mechdiff.engine.tiny import build_tiny_model  # noqa: E402

SITES = ("resid_post",)


def bench(name: str, lm, pairs, rounds: int, naive: bool = True) -> None:
    n_var = int(sum(pairs.lengths)) * lm.adapter.n_layers * len(SITES)
    print(f"\n== {name}: {len(pairs)} pairs, {sorted(set(pairs.lengths.tolist()))} tokens, {lm.adapter.n_layers} layers "
          f"-> {n_var} variants per sweep ({torch.get_num_threads()} threads)")
    methods = {
        "exact": lambda: exact_patching(lm, None, pairs, sites=SITES),
        "exact-all": lambda: exact_patching(lm, None, pairs, sites=SITES, skip_unchanged=False),
        "exact-layer": lambda: exact_patching(lm, None, pairs, sites=SITES, skip_unchanged=False, reuse_prefix=False),
        "attribution": lambda: attribution_patching(lm, None, pairs, sites=SITES),
    }
    if naive:
        methods["naive"] = lambda: naive_patching(lm, None, pairs, sites=SITES)
    times: dict[str, list[float]] = {k: [] for k in methods}
    out = {}
    methods["exact"]()  # warm-up (lazy imports, allocator)
    for r in range(rounds):
        for k, f in methods.items():
            t = time.perf_counter()
            out[k] = f()
            times[k].append(time.perf_counter() - t)
        print(f"  round {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()))
    med = {k: statistics.median(v) for k, v in times.items()}
    ex = out["exact"]
    print(f"  exact: {ex.attrs['variants_run']} variants run, {ex.attrs['variants_skipped']} answered as no-ops "
          f"({ex.attrs['execution']})")
    for k, v in med.items():
        print(f"  {k:<12} median {v:8.3f} s")
    if naive:
        diff = max(float(np.nanmax(np.abs(out[k]["patched"].values - out["naive"]["patched"].values)))
                   for k in ("exact", "exact-all", "exact-layer"))
        print(f"  naive / exact     = {med['naive'] / med['exact']:.1f}x   (target >= 3x)")
        print(f"  naive / exact-all = {med['naive'] / med['exact-all']:.1f}x")
        print(f"  naive / exact-layer = {med['naive'] / med['exact-layer']:.1f}x")
        print(f"  naive / attribution = {med['naive'] / med['attribution']:.1f}x")
        print(f"  max |exact - naive| patched logit difference: {diff:.2e}")
    print(f"  exact / attribution     = {med['exact'] / med['attribution']:.1f}x   (target >= 20x)")
    print(f"  exact-all / attribution = {med['exact-all'] / med['attribution']:.1f}x")
    print(f"  exact-layer / attribution = {med['exact-layer'] / med['attribution']:.1f}x")
    a = out["attribution"]
    r = pearson(ex["patched"] - ex["ld_false"], a["patched"] - a["ld_false"])
    print(f"  attribution vs exact: Pearson r = {r:.3f} over all (pair, layer, position)")


def random_llama_pairs(lm, n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        w = [f"w{x}" for x in rng.integers(10, 8000, 15)]  # 15 words + <bos> = 16 tokens
        f = list(w)
        k = int(rng.integers(0, 15))
        f[k] = f"w{(int(w[k][1:]) + 1 + int(rng.integers(0, 7000))) % 8000 + 10}"
        rows.append(dict(true_statement=" ".join(w), false_statement=" ".join(f), true_answer="w1",
                         false_answer="w2", topic="random"))
    return prepare_pairs(lm.tokenizer, pd.DataFrame(rows), prompt=lambda s, t: s, tokenizer_hash=lm.tokenizer_hash)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--pairs", type=int, default=8, help="pairs per workload")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-naive", action="store_true", help="skip the (slow) naive loop")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    try:
        from mechdiff.zoo.paths import zoo_path

        post, data = zoo_path("post"), zoo_path("data")
    except (FileNotFoundError, ImportError) as e:
        print(f"== embedded pair: skipped, not shipped yet ({e})")
    else:
        lm = load_model(post)
        df = load_pairs(data / "patching.csv", limit=args.pairs)
        pairs = prepare_pairs(lm.tokenizer, df, shots=load_shots(data / "shots.json"), tokenizer_hash=lm.tokenizer_hash)
        bench("embedded pair (post model)", lm, pairs, args.rounds, not args.no_naive)

    tmp = tempfile.mkdtemp(prefix="mechdiff-bench-")
    path = build_tiny_model(f"{tmp}/llama", "llama", n_layers=8, d_model=512, n_heads=8, d_mlp=1536, vocab_size=8192,
                            max_positions=512)
    lm = load_model(path)
    bench("random Llama", lm, random_llama_pairs(lm, args.pairs), args.rounds, not args.no_naive)


if __name__ == "__main__":
    main()
