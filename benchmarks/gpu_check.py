"""GPU check: HF-bf16 and vLLM against the HF fp32 reference on a tiny random Llama (built and saved locally).

Compares resid_post captures (all layers, last:4, through the real extractors into stores) and hooked greedy
generations (an Add and a ProjectOut intervention), prints the max abs / rel differences per method and prefill
tokens/s for HF-fp32, HF-bf16 and vLLM, and exits 1 on a mismatch beyond the tolerances below.

    python benchmarks/gpu_check.py              # on a GPU (about 1-3 minutes, most of it vLLM's start-up)
    python benchmarks/gpu_check.py --allow-cpu  # the HF-fp32 vs HF-bf16 part on the CPU

Without CUDA (and no --allow-cpu) it says it needs a GPU and exits 0; without vLLM it runs the HF parts and says
why vLLM was skipped.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

#: Largest allowed error of a capture against fp32, relative to the reference's largest magnitude in that
#: (example, layer): bf16 keeps 8 mantissa bits (~4e-3 per op), a few layers compound it.
REL_TOL = 0.05
#: Share of greedy completions that must equal the fp32 reference's (a near-tie in logits may flip a token in
#: bf16; the tiny model's unembedding is scaled so that few are near ties).
AGREE_TOL = 0.75


def build(root: Path):
    from mechdiff.engine.tiny import build_tiny_model

    path = build_tiny_model(root / "tiny-llama", "llama", n_layers=4, d_model=128, n_heads=4, d_mlp=256,
                            vocab_size=512, max_positions=256, seed=0)
    # Peaked logits: random init gives near-flat ones, where any rounding flips a greedy choice.
    from safetensors.torch import load_file, save_file

    f = path / "model.safetensors"
    w = load_file(f)
    w["lm_head.weight"] = w["lm_head.weight"] * 30.0
    save_file(w, f, metadata={"format": "pt"})
    return path


def rel_err(a: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """(max abs difference, max over (example, layer) of max |a - ref| / max |ref|)."""
    diff = np.abs(a - ref)
    scale = np.nanmax(np.abs(ref), axis=tuple(range(2, ref.ndim)), keepdims=True)
    return float(np.nanmax(diff)), float(np.nanmax(diff / np.maximum(scale, 1e-12)))


def agreement(a: list[list[str]], ref: list[list[str]]) -> float:
    pairs = [(x, y) for ca, cr in zip(a, ref) for x, y in zip(ca, cr)]
    return sum(x == y for x, y in pairs) / max(1, len(pairs))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--allow-cpu", action="store_true", help="run the HF fp32 vs bf16 part on the CPU")
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--out", default=None, help="working directory (default: a temporary one)")
    args = ap.parse_args(argv)

    cuda = torch.cuda.is_available()
    if not cuda and not args.allow_cpu:
        print("gpu_check needs a CUDA GPU and none is visible: nothing checked (use --allow-cpu for the "
              "HF fp32 vs bf16 part on the CPU)")
        return 0
    device = "cuda" if cuda else "cpu"

    from mechdiff.engine.capture import CaptureSpec
    from mechdiff.engine.data import PromptSet
    from mechdiff.engine.extract import extract
    from mechdiff.engine.generate import HFGenerator
    from mechdiff.engine.models import load_model
    from mechdiff.engine.sites import Add, ProjectOut
    from mechdiff.engine.store import open_store
    from mechdiff.engine.tiny import random_prompts
    from mechdiff.engine.vllm_backend import release_cuda, vllm_available

    tmp = tempfile.TemporaryDirectory() if args.out is None else None
    root = Path(args.out or tmp.name)
    root.mkdir(parents=True, exist_ok=True)
    path = build(root)
    texts = random_prompts(args.prompts, 6, 40, vocab_size=512, seed=3)
    prompts = PromptSet(texts, source="gpu_check")
    spec = CaptureSpec(layers="all", positions="last:4", dtype="float32")
    url = str(root / "stores.zarr")
    failures: list[str] = []
    speed: dict[str, float] = {}

    def captures(name: str) -> np.ndarray:
        return open_store(url, name)["resid_post"].values  # [example, layer, 4, d]

    def generations(gen) -> list[list[str]]:
        return [gen.generate(texts, max_new_tokens=args.max_new_tokens, interventions=ivs) for ivs in conditions]

    # -- HF fp32: the reference ------------------------------------------------------------------------------
    lm32 = load_model(path, dtype="float32", device=device)
    extract(lm32, PromptSet(texts[:2], source="warmup"), spec, url, "warmup-fp32", progress=False)  # untimed
    rep = extract(lm32, prompts, spec, url, "hf-fp32", progress=False)
    speed["hf-fp32"] = rep.tokens_per_s
    ref = captures("hf-fp32")
    mean = torch.as_tensor(np.nanmean(ref[:, 1, -1], axis=0))
    rng = np.random.default_rng(0)
    steer = torch.as_tensor(rng.standard_normal(ref.shape[-1]), dtype=torch.float32)
    steer = steer / steer.norm() * float(np.linalg.norm(ref[:, 2, -1], axis=-1).mean()) * 2
    conditions = [[], [Add("resid_post", 2, vector=steer)], [ProjectOut("resid_post", 1, vector=mean)]]
    gen_ref = generations(HFGenerator(lm32, batch_size=8))
    changed = sum(a != b for a, b in zip(gen_ref[0], gen_ref[1]))
    print(f"hf-fp32   prefill {speed['hf-fp32']:10.0f} tok/s; Add changes {changed}/{len(texts)} completions")
    if changed == 0:
        failures.append("the Add intervention changes no fp32 completion: the generation check could not fail")

    def compare(name: str, caps: np.ndarray, gens: list[list[str]]) -> None:
        ab, rel = rel_err(caps, ref)
        agree = agreement(gens, gen_ref)
        per = [agreement([g], [r]) for g, r in zip(gens, gen_ref)]
        print(f"{name:9s} prefill {speed[name]:10.0f} tok/s; captures max abs {ab:.3e} max rel {rel:.3e}; "
              f"completions equal to fp32: plain {per[0]:.2f} add {per[1]:.2f} project-out {per[2]:.2f}")
        if not rel <= REL_TOL:
            failures.append(f"{name}: captures differ from fp32 by {rel:.3e} relative (tolerance {REL_TOL})")
        if not agree >= AGREE_TOL:
            failures.append(f"{name}: {agree:.2f} of completions equal fp32's (tolerance {AGREE_TOL})")

    # -- HF bf16 ---------------------------------------------------------------------------------------------
    lm16 = load_model(path, dtype="bfloat16", device=device)
    extract(lm16, PromptSet(texts[:2], source="warmup"), spec, url, "warmup-bf16", progress=False)
    rep = extract(lm16, prompts, spec, url, "hf-bf16", progress=False)
    speed["hf-bf16"] = rep.tokens_per_s
    compare("hf-bf16", captures("hf-bf16"), generations(HFGenerator(lm16, batch_size=8)))

    # -- vLLM ------------------------------------------------------------------------------------------------
    ok, why = vllm_available()
    if not ok:
        print(f"vllm      skipped: {why}")
    else:
        from mechdiff.engine.generate import VLLMGenerator
        from mechdiff.engine.vllm_extract import build_engine, extract_vllm

        left = release_cuda(lm32, lm16)  # vLLM sizes its cache from the free memory
        print(f"released the HF models: {left / 2**20:.0f} MiB left allocated by torch")
        t = time.perf_counter()
        longest = max(len(x) for x in lm32.tokenizer(texts)["input_ids"])
        engine = build_engine(str(path), dtype="bfloat16", token_budget=8192, longest=longest + args.max_new_tokens,
                              gpu_memory_utilization=0.3)
        print(f"vllm      engine up in {time.perf_counter() - t:.0f} s")
        rep = extract_vllm(str(path), prompts, spec, url, "vllm-bf16", progress=False, engine=engine)
        speed["vllm"] = rep.tokens_per_s
        gen = VLLMGenerator.from_llm(engine.llm, lm32.tokenizer)
        compare("vllm", captures("vllm-bf16"), generations(gen))

    if tmp is not None:
        tmp.cleanup()
    if failures:
        print("MISMATCH:\n  " + "\n  ".join(failures))
        return 1
    print("gpu_check: all within tolerance")
    return 0


if __name__ == "__main__":
    sys.exit(main())
