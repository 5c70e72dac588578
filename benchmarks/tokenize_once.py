"""What tokenizing a dataset once saves: the sweep's shared tokenization and the CLI's reused checks.

A dataset of --prompts prompts (random real words of the tokenizer's vocabulary, 20-120 words each) is
prepared for a capture, on SmolLM2-135M-Instruct's BPE tokenizer when the GGUF is in .cache/models (else a
tiny random Llama's word-level one). Timed in one process, the median of --rounds, same inputs:

  sweep    ``prepare`` of a model whose tokenizer another model of the sweep shares: tokenized itself, vs
           taking the other's ids (``reuse``: the key compared, a sample of rows re-tokenized)
  cli      ``mechdiff extract``'s checks before the weights load, plus ``prepare`` after: tokenizing twice
           (as before) vs once (``prepare`` takes the checks' ids)

Every reused preparation is checked equal to the fresh one.

    python benchmarks/tokenize_once.py [--prompts 50000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

from mechdiff.cli.extract import precheck
from mechdiff.engine.capture import CaptureSpec
from mechdiff.engine.data import PromptSet
from mechdiff.engine.extract import prepare
from mechdiff.engine.models import load_model

GGUF = Path(__file__).resolve().parent.parent / ".cache" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def model_path(tmp: Path) -> str:
    if GGUF.is_file():
        return str(GGUF)
    from mechdiff.engine.tiny import build_tiny_model

    return str(build_tiny_model(tmp / "tiny", "llama", n_layers=2, vocab_size=4096, max_positions=512))


def words(tokenizer) -> list[str]:
    vocab = sorted(tokenizer.get_vocab())  # a fixed order: the same prompts in every run
    spaced = [w[1:] for w in vocab if w[:1] in ("Ġ", "▁") and w[1:].isalpha()]
    return spaced or [w for w in vocab if w.isalnum()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=50_000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = model_path(Path(tmp))
        lm = load_model(path)
        vocab, rng = words(lm.tokenizer), random.Random(0)
        prompts = PromptSet([" ".join(rng.choice(vocab) for _ in range(rng.randint(20, 120)))
                             for _ in range(args.prompts)], source="bench.csv")
        spec = CaptureSpec(sites=("resid_post",), layers="all", positions="last:4")
        times: dict[str, list[float]] = {k: [] for k in ("fresh", "reused", "checks", "twice", "once")}
        n_tokens = 0
        for _ in range(args.rounds):
            t = time.perf_counter()
            fresh = prepare(lm, prompts, spec)
            times["fresh"].append(time.perf_counter() - t)
            n_tokens = sum(map(len, fresh.token_ids))
            t = time.perf_counter()
            reused = prepare(lm, prompts, spec, reuse={fresh.tokenization_key: fresh.tokenization()})
            times["reused"].append(time.perf_counter() - t)
            assert reused.reused_tokens and reused.token_ids == fresh.token_ids and reused.counts == fresh.counts
            t = time.perf_counter()
            tokens = precheck(path, prompts, spec, str(Path(tmp) / "none.zarr"), "g", shard_size=256, truncate=False,
                              allow_pickle=False, trust_remote_code=False)
            checks = time.perf_counter() - t
            t = time.perf_counter()
            once = prepare(lm, prompts, spec, reuse={tokens.key: tokens})
            after = time.perf_counter() - t
            assert once.reused_tokens and once.token_ids == fresh.token_ids
            times["checks"].append(checks)
            times["twice"].append(checks + times["fresh"][-1])
            times["once"].append(checks + after)
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"tokenizer: {type(lm.tokenizer).__name__} of {Path(path).name}; {args.prompts:,} prompts, "
              f"{n_tokens:,} tokens; median of {args.rounds}")
        print(f"sweep  prepare: tokenized itself {med['fresh']:.2f} s, another model's ids {med['reused']:.2f} s "
              f"(ratio {med['reused'] / med['fresh']:.3f})")
        print(f"cli    checks + prepare: twice {med['twice']:.2f} s, once {med['once']:.2f} s "
              f"(ratio {med['once'] / med['twice']:.3f}; the checks alone {med['checks']:.2f} s)")


if __name__ == "__main__":
    main()
