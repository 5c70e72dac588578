"""The one place that knows where things live inside a Hugging Face causal LM.

``ArchAdapter`` finds the pieces mechdiff hooks (embedding, decoder blocks, the attention and MLP
outputs added to the residual stream, the MLP down-projection, final norm, unembedding) by
*structure*: each piece has a short table of candidate attribute paths, and the first that exists
wins. Nothing else in mechdiff should branch on the model family.

Supported and tested (transformers 5.x module names):

=========  ======================  =====================================  ==========================
arch       layers                  attn_out / mlp_out (per layer)         down_proj (input = mlp_act)
=========  ======================  =====================================  ==========================
llama      model.layers            self_attn / mlp                        mlp.down_proj
mistral    model.layers            self_attn / mlp                        mlp.down_proj
qwen2      model.layers            self_attn / mlp                        mlp.down_proj
qwen3      model.layers            self_attn / mlp                        mlp.down_proj
gemma      model.layers            self_attn / mlp                        mlp.down_proj
gemma2     model.layers            post_attention_layernorm /             mlp.down_proj
                                   post_feedforward_layernorm (post-norm)
gpt2       transformer.h           attn / mlp                             mlp.c_proj (Conv1D)
gpt_neox   gpt_neox.layers         attention / mlp (parallel residual)    mlp.dense_4h_to_h
phi3       model.layers            self_attn / mlp                        mlp.down_proj
olmo2      model.layers            post_attention_layernorm /             mlp.down_proj
                                   post_feedforward_layernorm (post-norm)
=========  ======================  =====================================  ==========================

Post-norm ("sandwich") blocks are recognised by a ``post_feedforward_layernorm`` in the block: then
``post_attention_layernorm`` is the norm *after* attention (Gemma2, OLMo-2). In Llama-style blocks
the same name is the norm *before* the MLP, which is why the name alone cannot decide.

Module outputs: in transformers 5.x a decoder block returns a tensor, attention modules return
``(out, weights)``. Use :func:`hidden_from_output` / :func:`replace_hidden_in_output` in hooks;
never ``output[0]``, which on a tensor silently takes batch row 0.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from mechdiff.errors import MechdiffError

__all__ = [
    "ArchAdapter",
    "UnsupportedArchitectureError",
    "hidden_from_output",
    "replace_hidden_in_output",
    "hidden_from_inputs",
    "position_ids_from_attention_mask",
]


class UnsupportedArchitectureError(MechdiffError, ValueError):
    """The model lacks a piece mechdiff needs; the message names the class and the missing pieces."""


# ---------------------------------------------------------------------------------------------
# Output helpers (used by every hook in mechdiff)


def hidden_from_output(output: Any) -> torch.Tensor:
    """The hidden-state tensor in a module's output: the tensor itself, or the first element of a tuple.

    Works for decoder blocks (tensor in transformers 5.x, tuple in 4.x) and attention modules
    (``(out, weights)``).
    """
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"cannot find a hidden-state tensor in module output of type {type(output).__name__}")


def replace_hidden_in_output(output: Any, new: torch.Tensor) -> Any:
    """``output`` with its hidden-state tensor replaced by ``new``, in the same form (tensor or tuple).

    Return this from a forward hook to change what the module passes on.
    """
    if isinstance(output, torch.Tensor):
        return new
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
        return (new, *output[1:])
    if isinstance(output, list) and output and isinstance(output[0], torch.Tensor):
        return [new, *output[1:]]
    raise TypeError(f"cannot replace the hidden state in module output of type {type(output).__name__}")


def hidden_from_inputs(args: tuple[Any, ...], kwargs: dict[str, Any] | None = None) -> torch.Tensor:
    """The hidden-state input of a module, from a forward pre-hook's ``(args, kwargs)``.

    Decoder blocks get it positionally, but attention modules in transformers 5.x get it as
    ``hidden_states=``; register pre-hooks with ``with_kwargs=True`` and call this.
    """
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    if kwargs and isinstance(kwargs.get("hidden_states"), torch.Tensor):
        return kwargs["hidden_states"]
    raise TypeError("cannot find the hidden-state input (neither args[0] nor hidden_states=)")


def position_ids_from_attention_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that count only real tokens, so left padding does not shift them.

    HF forward() does not derive these from the mask. Rotary models are (numerically) indifferent
    to a constant shift, but absolute position embeddings (GPT-2) are not: pass these for any
    left-padded batch.
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


# ---------------------------------------------------------------------------------------------
# Candidate attribute paths, tried in order. Relative to the CausalLM for model-level pieces,
# to a decoder block for per-layer pieces, to the MLP module for the down-projection.

LAYERS_PATHS = ("model.layers", "transformer.h", "gpt_neox.layers")
EMBED_PATHS = ("model.embed_tokens", "transformer.wte", "gpt_neox.embed_in")
FINAL_NORM_PATHS = ("model.norm", "transformer.ln_f", "gpt_neox.final_layer_norm")
LM_HEAD_PATHS = ("lm_head", "embed_out")
ATTN_PATHS = ("self_attn", "attn", "attention")
MLP_PATHS = ("mlp", "feed_forward")
DOWN_PROJ_PATHS = ("down_proj", "c_proj", "dense_4h_to_h", "fc2")
# Present only in post-norm ("sandwich") blocks; see the module docstring.
POST_FFN_NORM_PATHS = ("post_feedforward_layernorm",)
POST_ATTN_NORM_PATHS = ("post_attention_layernorm",)


def _get_path(root: nn.Module, path: str) -> Any:
    obj: Any = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _find(root: nn.Module, paths: Sequence[str]) -> tuple[str, nn.Module] | None:
    for p in paths:
        obj = _get_path(root, p)
        if isinstance(obj, nn.Module):
            return p, obj
    return None


def _looked_for(paths: Sequence[str], prefix: str = "") -> str:
    return ", ".join(prefix + p for p in paths)


def _linear_weight_out_in(module: nn.Module) -> torch.Tensor:
    """A projection's weight as [out_features, in_features].

    nn.Linear stores [out, in]; GPT-2's Conv1D stores [in, out] (it computes x @ W + b).
    """
    if isinstance(module, nn.Linear):
        return module.weight
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return module.weight.t()
    raise UnsupportedArchitectureError(
        f"down-projection of type {type(module).__name__} is neither nn.Linear nor Conv1D"
    )


class ArchAdapter:
    """Where the hook sites of a loaded HF causal LM are, found by structure.

    Attributes:
        arch: ``config.model_type`` (e.g. "llama", "gpt2").
        n_layers, d_model, d_mlp, vocab_size: sizes read from the modules themselves
            (``vocab_size`` is the unembedding's row count, which may exceed the tokenizer's).
        max_positions: the configured context length (``max_position_embeddings`` / ``n_positions``);
            a hard limit for learned position embeddings (GPT-2), the trained context for rotary
            models. None if the config has none.
        embed: the token-embedding module. Its output already includes ``embed_scale`` where the
            architecture scales embeddings (Gemma's scaled embedding module), but not position
            embeddings (GPT-2 adds ``wpe`` afterwards): use ``layer(0)``'s input for resid_pre 0.
        embed_scale: the factor token embeddings are multiplied by (sqrt(d_model) for Gemma,
            1.0 otherwise). Informational: with ``embed_scale_in_module`` (transformers 5.x) it is
            already in ``embed``'s output; either way ``layer(0)``'s input includes it.
        final_norm: the norm before the unembedding.
        logit_softcap: if not None, logits = softcap * tanh((final_norm(h) @ W_U.T) / softcap)
            (Gemma2 ``final_logit_softcapping``). :meth:`logits` applies it.
        post_norm: True for sandwich blocks (Gemma2, OLMo-2): attn_out / mlp_out are the outputs
            of the post-attention / post-feedforward norms, so mlp_out is a *nonlinear* function
            of mlp_act (``mlp_out = post_ffn_norm(down_proj(mlp_act))``).
        parallel_residual: True for GPT-NeoX-style blocks where attention and MLP both read
            resid_pre; resid_post = resid_pre + attn_out + mlp_out in both layouts.
        layers_path, embed_path, final_norm_path, lm_head_path: the model-level paths found;
        attn_out_path, mlp_out_path, down_proj_path: the per-block paths found (see :meth:`describe`).
    """

    def __init__(self, model: nn.Module):
        self.model = model
        config = getattr(model, "config", None)
        name = type(model).__name__
        self.arch: str = str(getattr(config, "model_type", None) or name)
        missing: list[str] = []

        layers = _find(model, LAYERS_PATHS)
        if layers is None or not isinstance(layers[1], (nn.ModuleList, nn.Sequential)) or len(layers[1]) == 0:
            missing.append(f"no decoder layers found (looked for {_looked_for(LAYERS_PATHS)})")
        embed = _find(model, EMBED_PATHS)
        if embed is None:
            missing.append(f"no token embedding found (looked for {_looked_for(EMBED_PATHS)})")
        final_norm = _find(model, FINAL_NORM_PATHS)
        if final_norm is None:
            missing.append(f"no final norm found (looked for {_looked_for(FINAL_NORM_PATHS)})")
        lm_head = _find(model, LM_HEAD_PATHS)
        if lm_head is None or not isinstance(getattr(lm_head[1], "weight", None), torch.Tensor):
            missing.append(f"no unembedding found (looked for {_looked_for(LM_HEAD_PATHS)})")

        self.attn_path = self.mlp_path = self.down_proj_path = ""
        self.post_norm = False
        if layers is not None and len(layers[1]) > 0:
            missing += self._resolve_block_paths(layers[1])

        if missing:
            raise UnsupportedArchitectureError(f"{name}: " + "; ".join(missing))

        assert layers is not None and embed is not None and final_norm is not None and lm_head is not None
        self.layers_path, self._layers = layers[0], layers[1]
        self.embed_path, self.embed = embed
        self.final_norm_path, self.final_norm = final_norm
        self.lm_head_path, self.lm_head = lm_head

        self.n_layers: int = len(self._layers)
        self.d_model: int = int(self.embed.weight.shape[1])
        try:
            self.d_mlp: int = int(self.down_proj_weight(0).shape[1])
        except UnsupportedArchitectureError as e:
            raise UnsupportedArchitectureError(f"{name}: layers[0].{self.down_proj_path}: {e}") from None
        self.vocab_size: int = int(self.unembed_weight().shape[0])
        self.max_positions: int | None = None
        for key in ("max_position_embeddings", "n_positions"):
            value = getattr(config, key, None)
            if isinstance(value, int) and value > 0:
                self.max_positions = value
                break

        # Gemma scales embeddings by sqrt(d_model). transformers 5.x does it inside the embedding
        # module (a buffer on it); older versions did it in the model's forward, after `embed`.
        scale = getattr(self.embed, "scalar_embed_scale", None)
        if scale is None and isinstance(getattr(self.embed, "embed_scale", None), torch.Tensor):
            scale = float(self.embed.embed_scale)
        self.embed_scale_in_module: bool = scale is not None
        if scale is None and self.arch.startswith("gemma"):
            scale = self.d_model**0.5
        self.embed_scale: float = float(scale) if scale is not None else 1.0
        self.parallel_residual: bool = bool(getattr(self._layers[0], "use_parallel_residual", False))

        self._check_widths()

    # -- resolution ------------------------------------------------------------------------

    def _resolve_block_paths(self, layers: nn.ModuleList | nn.Sequential) -> list[str]:
        """Find attention / MLP / down-projection paths in block 0, then insist every block has them."""
        block = layers[0]
        missing = []
        attn = _find(block, ATTN_PATHS)
        mlp = _find(block, MLP_PATHS)
        prefix = "layers[0]."
        if attn is None:
            missing.append(f"no attention module found (looked for {_looked_for(ATTN_PATHS, prefix)})")
        if mlp is None:
            missing.append(f"no MLP module found (looked for {_looked_for(MLP_PATHS, prefix)})")
            return missing
        down = _find(mlp[1], DOWN_PROJ_PATHS)
        if down is None:
            missing.append(
                f"no MLP down-projection found (looked for {_looked_for(DOWN_PROJ_PATHS, prefix + mlp[0] + '.')})"
            )
        if missing:
            return missing
        assert attn is not None and down is not None
        self.attn_path, self.mlp_path = attn[0], mlp[0]
        self.down_proj_path = f"{mlp[0]}.{down[0]}"
        self.post_norm = _find(block, POST_FFN_NORM_PATHS) is not None
        if self.post_norm:
            post_attn = _find(block, POST_ATTN_NORM_PATHS)
            post_ffn = _find(block, POST_FFN_NORM_PATHS)
            if post_attn is None:
                return [f"post-norm block without a post-attention norm (looked for {_looked_for(POST_ATTN_NORM_PATHS, prefix)})"]
            assert post_ffn is not None
            self.attn_out_path, self.mlp_out_path = post_attn[0], post_ffn[0]
        else:
            self.attn_out_path, self.mlp_out_path = self.attn_path, self.mlp_path
        for i, blk in enumerate(layers):
            for p in {self.attn_out_path, self.mlp_out_path, self.down_proj_path}:
                if not isinstance(_get_path(blk, p), nn.Module):
                    missing.append(f"layers[{i}] has no {p} (layer 0 does)")
        return missing

    def _check_widths(self) -> None:
        for l in range(self.n_layers):
            w = self.down_proj_weight(l)
            if w.shape[0] != self.d_model:
                raise UnsupportedArchitectureError(
                    f"{type(self.model).__name__}: layers[{l}].{self.down_proj_path} maps to width "
                    f"{w.shape[0]}, not d_model={self.d_model}"
                )
        if self.unembed_weight().shape[1] != self.d_model:
            raise UnsupportedArchitectureError(
                f"{type(self.model).__name__}: {self.lm_head_path} expects width "
                f"{self.unembed_weight().shape[1]}, not d_model={self.d_model}"
            )

    # -- per-layer pieces -------------------------------------------------------------------

    def _check_layer(self, l: int) -> int:
        if not -self.n_layers <= l < self.n_layers:
            raise IndexError(f"layer {l} out of range for a {self.n_layers}-layer model")
        return l % self.n_layers

    def layer(self, l: int) -> nn.Module:
        """Decoder block ``l``: its input hidden states are resid_pre, its output resid_post."""
        return self._layers[self._check_layer(l)]

    @property
    def layers(self) -> Sequence[nn.Module]:
        return self._layers

    def attn_module(self, l: int) -> nn.Module:
        """The attention module itself (returns ``(out, weights)``); before any post-norm."""
        return _get_path(self.layer(l), self.attn_path)

    def mlp_module(self, l: int) -> nn.Module:
        """The MLP module itself; before any post-norm."""
        return _get_path(self.layer(l), self.mlp_path)

    def attn_out_module(self, l: int) -> nn.Module:
        """Module whose output (first element if a tuple) is exactly what attention adds to the residual."""
        return _get_path(self.layer(l), self.attn_out_path)

    def mlp_out_module(self, l: int) -> nn.Module:
        """Module whose output is exactly what the MLP adds to the residual."""
        return _get_path(self.layer(l), self.mlp_out_path)

    def down_proj(self, l: int) -> nn.Module:
        """Module whose *input* is the neuron activations (mlp_act, width d_mlp)."""
        return _get_path(self.layer(l), self.down_proj_path)

    def down_proj_weight(self, l: int) -> torch.Tensor:
        """[d_model, d_mlp]: column i is neuron i's write direction (before any post-norm)."""
        return _linear_weight_out_in(self.down_proj(l))

    def down_proj_bias(self, l: int) -> torch.Tensor | None:
        return getattr(self.down_proj(l), "bias", None)

    @property
    def logit_softcap(self) -> float | None:
        """Final-logit soft-cap (Gemma2): logits = c * tanh(raw / c). Read live from the config."""
        value = getattr(getattr(self.model, "config", None), "final_logit_softcapping", None)
        return float(value) if value else None

    # -- unembedding --------------------------------------------------------------------------

    def unembed_weight(self) -> torch.Tensor:
        """[vocab, d_model] (the lm_head weight; the embedding matrix itself when tied)."""
        return self.lm_head.weight

    def unembed_bias(self) -> torch.Tensor | None:
        return getattr(self.lm_head, "bias", None)

    def logits(self, resid_final: torch.Tensor) -> torch.Tensor:
        """Logits from the last block's resid_post, as the model computes them (norm, unembed, softcap)."""
        out = self.lm_head(self.final_norm(resid_final))
        if self.logit_softcap is not None:
            out = self.logit_softcap * torch.tanh(out / self.logit_softcap)
        return out

    # -- reporting ----------------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        """JSON-serialisable summary (sizes, paths, flags) for provenance and reports."""
        return {
            "arch": self.arch,
            "model_class": type(self.model).__name__,
            "n_layers": self.n_layers,
            "d_model": self.d_model,
            "d_mlp": self.d_mlp,
            "vocab_size": self.vocab_size,
            "max_positions": self.max_positions,
            "layers_path": self.layers_path,
            "embed_path": self.embed_path,
            "final_norm_path": self.final_norm_path,
            "lm_head_path": self.lm_head_path,
            "attn_out_path": self.attn_out_path,
            "mlp_out_path": self.mlp_out_path,
            "down_proj_path": self.down_proj_path,
            "post_norm": self.post_norm,
            "parallel_residual": self.parallel_residual,
            "embed_scale": self.embed_scale,
            "embed_scale_in_module": self.embed_scale_in_module,
            "logit_softcap": self.logit_softcap,
        }

    def __repr__(self) -> str:
        return (
            f"ArchAdapter(arch={self.arch!r}, n_layers={self.n_layers}, d_model={self.d_model}, "
            f"d_mlp={self.d_mlp}, vocab_size={self.vocab_size})"
        )

