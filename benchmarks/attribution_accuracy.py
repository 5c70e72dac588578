"""How well attribution patching stands in for exact patching on the embedded pair, and what it costs.

The knowledge study's workload: the zoo's patching pairs (``--pairs``, taken round-robin over topics as the study
does; the main job uses 48), few-shot prompts, sites resid_post, mlp_out and attn_out at every layer, the
statement's positions (``pairs.mask("statement")``), three runs: base, post (within each model) and base->post
(base activations patched into post).

Per run: exact patching (``exact_patching``), then every estimate of ``mechdiff.engine.patching.attribution_patching``:

  atp      plain attribution patching (the current estimate: delta . gradient at the false run)
  atp+qk   AtP with the QK fix (the first attention the patch feeds, exactly through its softmax)
  atp+gd   AtP with GradDrop (mean |AtP| over L backward passes that each drop one layer)
  atp*     both (Kramar et al. 2024)
  ig       integrated gradients over --ig-steps interpolated input embeddings (EAP-IG, Hanna et al. 2024)

Reported: Pearson r against exact patching per site, with a bootstrap 95% interval over pairs
(``attribution_agreement``), on normalised effects over the pairs the study keeps (ld_true - ld_false >
--min-gap) and on the un-normalised change of the logit difference over every pair ("delta"); GradDrop estimates
are magnitudes, so they are compared with |exact|, and plain AtP is shown that way too (``atp|abs|``). Then the
wall time and the CPU time of each method (median over --rounds, methods interleaved round by round: this
machine's run-to-run noise is larger than some effects) and the ratios exact / method.

    python benchmarks/attribution_accuracy.py [--pairs 48] [--rounds 1] [--threads 2] [--ig-steps 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from mechdiff.analyses.attribution import attribution_agreement
from mechdiff.analyses.knowledge import load_pairs, load_shots, prepare_pairs
from mechdiff.engine.models import load_model
from mechdiff.engine.patching import ATTRIBUTION_METHODS as METHODS
from mechdiff.engine.patching import attribution_patching, exact_patching

SITES = ("resid_post", "mlp_out", "attn_out")


def _line(name: str, ag) -> str:
    return f"  {name:<9}" + "".join(
        f"  {s} {a.r:6.3f} [{a.interval[0]:6.3f}, {a.interval[1]:6.3f}]" for s, a in ag.per_site.items())


def bench_run(name: str, source, target, pairs, methods: list[str], rounds: int, ig_steps: int, min_gap: float,
              n_bootstrap: int) -> dict:
    kw = dict(sites=SITES, mask=pairs.mask("statement"))
    calls = {"exact": lambda: exact_patching(source, target, pairs, **kw)}
    for m in methods:
        calls[m] = lambda m=m: attribution_patching(source, target, pairs, method=m, ig_steps=ig_steps, **kw)
    times: dict[str, list[float]] = {k: [] for k in calls}
    cpu: dict[str, list[float]] = {k: [] for k in calls}
    out = {}
    for r in range(rounds):
        for k in (list(calls)[r % len(calls):] + list(calls)[: r % len(calls)]):  # rotate the order
            t, c = time.perf_counter(), time.process_time()
            out[k] = calls[k]()
            times[k].append(time.perf_counter() - t)
            cpu[k].append(time.process_time() - c)
    ex = out["exact"]
    keep = (ex["ld_true"] - ex["ld_false"]) > min_gap
    print(f"\n== {name}: {len(pairs)} pairs ({int(keep.sum())} separated by more than {min_gap}), sites "
          f"{', '.join(SITES)}, {target.adapter.n_layers if target is not None else source.adapter.n_layers} layers")
    res: dict = {"pairs": len(pairs), "kept": int(keep.sum()), "seconds": {}, "r": {}}
    for quantity, kp in (("effect", keep), ("delta", None)):
        which = "kept pairs" if kp is not None else "all pairs"
        print(f" Pearson r against exact patching, {quantity} ({which})")
        for m in methods:
            ag = attribution_agreement(ex, out[m], quantity=quantity, keep=kp, n_bootstrap=n_bootstrap)
            print(_line(m, ag))
            res["r"][f"{m}/{quantity}"] = {s: [a.r, *a.interval] for s, a in ag.per_site.items()}
            if m == "atp":
                ag = attribution_agreement(ex, out[m], quantity=quantity, keep=kp, n_bootstrap=n_bootstrap,
                                           signed=False)
                print(_line("atp|abs|", ag))
                res["r"][f"atp|abs|/{quantity}"] = {s: [a.r, *a.interval] for s, a in ag.per_site.items()}
    med = {k: statistics.median(v) for k, v in times.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    print(f" wall time (median of {rounds}): " + ", ".join(f"{k} {v:.2f}s" for k, v in med.items()))
    print(" exact / method, wall: " + ", ".join(f"{k} {med['exact'] / med[k]:.1f}x" for k in methods))
    # CPU seconds of this process (all its threads): steadier than wall time on a machine shared with other jobs
    print(f" CPU time (median of {rounds}): " + ", ".join(f"{k} {v:.2f}s" for k, v in med_cpu.items()))
    print(" exact / method, CPU: " + ", ".join(f"{k} {med_cpu['exact'] / med_cpu[k]:.1f}x" for k in methods))
    res["seconds"], res["cpu_seconds"] = med, med_cpu
    for m in methods:  # the line the report would print, on what it shows (normalised effects, kept pairs)
        ag = attribution_agreement(ex, out[m], keep=keep, n_bootstrap=0)
        print(f" {m}: {ag.message()}")
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=48, help="patching pairs (the main job uses 48)")
    ap.add_argument("--rounds", type=int, default=1, help="timing rounds (methods interleaved)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ig-steps", type=int, default=5)
    ap.add_argument("--min-gap", type=float, default=0.1, help="the knowledge study's min_gap")
    ap.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples of the pairs for the intervals")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--runs", default="base,post,base->post")
    ap.add_argument("--json", help="also write the numbers here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        sys.exit(f"error: unknown method(s) {', '.join(bad)}: choose from {', '.join(METHODS)}")
    try:
        from mechdiff.zoo.paths import zoo_path

        data = zoo_path("data")
        models = {k: load_model(zoo_path(k)) for k in ("base", "post")}
    except FileNotFoundError as e:
        sys.exit(f"error: the embedded pair is not shipped in this install ({e})")
    df = load_pairs(data / "patching.csv", limit=args.pairs)
    post = models["post"]
    pairs = prepare_pairs(post.tokenizer, df, shots=load_shots(data / "shots.json"), tokenizer_hash=post.tokenizer_hash)
    results = {}
    for run in [r.strip() for r in args.runs.split(",") if r.strip()]:
        src, _, tgt = run.partition("->")
        results[run] = bench_run(run, models[src], models[tgt] if tgt else None, pairs, methods, args.rounds,
                                 args.ig_steps, args.min_gap, args.bootstrap)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
