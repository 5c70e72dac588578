"""Planted models whose answer is known by construction, for the studies' verdict tests."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch

# Llama-style parameter names (suffixes) by how they touch the residual stream
_READS = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "gate_proj.weight", "up_proj.weight", "embed_tokens.weight",
          "lm_head.weight")  # [*, d_model]: columns index the residual basis
_WRITES = ("o_proj.weight", "down_proj.weight")  # [d_model, *]: rows index it
_NORMS = ("input_layernorm.weight", "post_attention_layernorm.weight", "norm.weight")  # [d_model]


def rotate_residual_basis(src: str | Path, dst: str | Path, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Save to ``dst`` a copy of the Llama-style model at ``src`` whose residual stream is expressed in a signed
    permutation of the original basis: x' = x Q, Q = P S. RMSNorm commutes with it (the norm is invariant and
    the gain is permuted with the coordinates), rotary embeddings act inside heads, and every weight that reads
    or writes the residual stream is permuted and signed to match, so the copy computes exactly the same
    function, token for token, while every residual direction d becomes d Q (cosine with d near 0). Returns
    (perm, signs): x'[:, j] = signs[j] * x[:, perm[j]]."""
    from transformers import AutoModelForCausalLM

    src, dst = Path(src), Path(dst)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    d = model.config.hidden_size
    rng = np.random.default_rng(seed)
    perm = rng.permutation(d)
    signs = rng.choice([-1.0, 1.0], size=d)
    p, s = torch.as_tensor(perm), torch.as_tensor(signs, dtype=torch.float32)
    seen = set()
    with torch.no_grad():
        for name, w in model.named_parameters():
            if id(w) in seen:  # tied embeddings: one tensor, transformed once
                continue
            seen.add(id(w))
            if name.endswith(_NORMS):
                w.copy_(w[p])
            elif name.endswith(_READS):
                w.copy_(w[:, p] * s)
            elif name.endswith(_WRITES):
                w.copy_(w[p, :] * s[:, None])
            elif w.ndim and d in w.shape:
                raise ValueError(f"rotate_residual_basis: no rule for parameter {name} {tuple(w.shape)}")
    dst.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dst)
    for f in src.iterdir():  # tokenizer, chat template, generation config
        if f.is_file() and not (dst / f.name).exists():
            shutil.copy(f, dst / f.name)
    return perm, signs
