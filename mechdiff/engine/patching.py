"""Activation patching of pairs of prompts: exact (a batched engine), a naive reference, and attribution
patching (gradient estimates of every patch at once).

A pair is two prompts of equal token length and two answer tokens (:class:`PatchPairs`). The *true* prompt's
activation at one site ``s``, layer ``l``, position ``p`` is patched into the *false* prompt's run, and the
readout at the last token is ``logit(answer 0) - logit(answer 1)`` and ``P(answer 0) - P(answer 1)``
(:func:`mechdiff.engine.scoring.answer_readout`). The activations may come from another model of the same
tokenizer and shapes (``source``) than the one patched (``target``). Every function returns an
:class:`xarray.Dataset` over (site, pair, layer, position), positions right-aligned (``position`` = -n .. -1,
counted from each prompt's end), with the raw readouts (``patched``, ``ld_true``, ``ld_false`` and, for exact
and naive patching, ``patched_pd``, ``pd_true``, ``pd_false``) and ``effect`` = ``(patched - ld_false) /
(ld_true - ld_false)``: 0 = the false run, 1 = the true run. ``mask`` (per pair, the positions to patch) leaves
the others NaN.

Exact patching (:func:`exact_patching`) is efficient by construction:

- The true and false runs are made once per batch of pairs, capturing every layer's residual stream, the
  patched sites and the attention keys/values.
- Patching position ``p`` cannot change positions before ``p`` (causal attention), and a patch whose value
  equals the value it replaces changes nothing. Those variants are answered from the false run without
  running anything, and the rest only recompute the suffix from the first position any of them touches,
  attending to the false run's cached keys/values for the prefix.
- A patch at layer ``l`` resumes from the cached residual stream at layer ``l``: the HF decoder blocks
  (``adapter.layer(k)``) are called directly, with the keyword arguments (rotary position embeddings, masks,
  cache positions) recorded from the model's own forward over the same suffix, so no architecture's position
  handling is re-implemented here. Variants of every layer share one batched pass ("staggered": rows that
  start at layer ``l`` join the batch at block ``l``).
- Before it is trusted, the resumed path must reproduce the model's own logits for the unpatched rows; where
  it cannot (an architecture whose blocks need more than what was recorded), the batch falls back to full
  forwards with engine ``Replace`` intervention hooks, still batched.

:func:`naive_patching` is the reference: one full forward per variant, patched by a hand-written hook.

Attribution patching (:func:`attribution_patching`): a gradient estimate of every patch, its corrected forms
AtP* and integrated gradients, a few forwards and backwards per batch of pairs.

Notation (one pair, one site ``n`` = (site, layer l, position p); the patch puts the true run's activation into
the false run, as :func:`exact_patching` does; ``m`` = logit(answer 0) - logit(answer 1)):

    c(n)        = m(false run with n <- n_true) - m(false run)             (exact patching)
    delta(n)    = n_true - n_false
    AtP(n)      = delta(n) . dm/dn                                          (gradient at the false run)

AtP* (Kramar, Lieberum, Shah, Nanda 2024, "AtP*: An efficient and scalable method for localizing LLM behaviour to
components", arXiv:2403.00745) adds two corrections; ``method`` picks which (see :data:`ATTRIBUTION_METHODS`):

*QK fix* (``"atp+qk"``; the paper's fix for attention saturation). AtP linearises the attention softmax, which
fails where attention is saturated (a patch that moves attention from one key to another has a near-zero
gradient). The paper's nodes are queries and keys; here a node is a residual-width activation, and the attention
it feeds first is that of its *entry layer* k (``resid_pre`` l: k = l; ``resid_post`` / ``attn_out`` / ``mlp_out`` /
``mlp_act`` l: k = l + 1), which reads ``x_k = resid_pre(k)`` changed by D(n) at position p only (D = delta for
the residual-width sites, which reach x_k through the skip connection; ``down_proj(a_true) - down_proj(a_false)``,
after the post-MLP norm where the block has one, for ``mlp_act``). Then

    AtP_qk(n) = AtP(n) - D(n) . d<G_k, A_k>/dx_k[p]  +  sum_{h,t,s} G_k[h,t,s] (A'_k - A_k)[h,t,s]

with A_k the entry layer's attention probabilities in the false run, G_k = dm/dA_k, and A'_k the probabilities
recomputed *exactly through the softmax* with the patched query at p (row p) and the patched key at p (column p
of every later row) -- q and k at p are computed by the block's own modules from ``x_k[p] + D(n)``. The second
term is the linearised contribution of those queries/keys that AtP contains; it is replaced by the exact change
of the pattern, linearised only after the softmax (the paper's fix for queries and for keys, the latter summed
over the queries that attend to the key). Values, MLPs and every later layer stay linear, as in the paper. With
no attention after the node (the last layer's resid_post / attn_out / mlp_out) AtP_qk = AtP.

*GradDrop* (``"atp+gd"``; the paper's fix for cancellation between paths). The backward pass is repeated L times,
each time with the gradient through one layer's contribution to the residual stream zeroed (forward values
untouched; the skip connection keeps its gradient), and the estimate is the mean of the absolute per-variant
estimates:

    GD(n) = 1/|L(n)| sum_{l in L(n)} |AtP_l(n)|

For the paper's nodes (inside a layer: heads, neurons -- here ``attn_out``, ``mlp_out``, ``mlp_act``) dropping
their own layer zeroes their gradient, so L(n) is the other L - 1 layers: the paper's ``1/(L-1) sum_l |.|``. A
residual-stream node (``resid_pre`` / ``resid_post``) has no such zero term, so L(n) is all L layers. GradDrop
estimates the *magnitude* |c(n)|: these methods return ``attrs["signed"] = False``.

``"atp*"`` is both: ``GD`` of ``AtP_qk`` (the QK fix computed with each dropped-layer variant's gradients).

*Integrated gradients* (``"ig"``; the inputs-interpolation form of EAP-IG, Hanna, Pezzelle, Belinkov 2024, "Have
Faith in Faithfulness", arXiv:2403.17806). Not part of AtP*: it attacks the other failure, a patch too large for
a gradient taken at one end of it. The target runs on input embeddings interpolated between the false and the true
prompt, ``e_false + a (e_true - e_false)`` at the midpoints ``a = (j + 1/2) / n``, j < n = ``ig_steps``, and

    IG(n) = delta(n) . (1/n) sum_j dm/dn |_(run at a_j)

with delta(n) taken between the true (source) and false (target) runs as for AtP. Signed; it costs n forward and
backward passes instead of one (n = 1: one gradient, at the midpoint). Across models the interpolation ends at the
target's own true-prompt run, not at the source's activations that are patched in.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
import xarray as xr

from mechdiff.engine.adapter import hidden_from_inputs, hidden_from_output, replace_hidden_in_output
from mechdiff.engine.models import LoadedModel
from mechdiff.engine.scoring import answer_readout, last_token, logit_difference
from mechdiff.engine.sites import Capture, Intervention, Replace, SiteError, hooks, parse_layers, parse_sites
from mechdiff.errors import MechdiffError

__all__ = [
    "PATCH_SITES",
    "ATTRIBUTION_METHODS",
    "PatchingError",
    "ModelMismatchError",
    "AttributionError",
    "PatchPairs",
    "resolve_sites",
    "check_patchable",
    "exact_patching",
    "naive_patching",
    "attribution_patching",
]

log = logging.getLogger(__name__)

PATCH_SITES: tuple[str, ...] = ("resid_pre", "resid_post", "attn_out", "mlp_out", "mlp_act")
_RESID = ("resid_pre", "resid_post")


class PatchingError(MechdiffError, ValueError):
    """Patching inputs that cannot be used (pairs of unequal length, answers outside the vocabulary, ...)."""


class ModelMismatchError(MechdiffError, ValueError):
    """Two models that cannot be patched into each other (different tokenizers or shapes)."""


class AttributionError(MechdiffError, ValueError):
    """Attribution patching, or its comparison with exact patching, that cannot be done as asked (unknown method,
    an architecture whose attention the QK fix cannot reproduce, results that do not match)."""


# =============================================================================================
# inputs


@dataclass
class PatchPairs:
    """Tokenised pairs: per pair, equal-length true and false token ids and the two answer tokens the readout
    compares ([pair, 2]: answer 0, answer 1). ``tokenizer_hash``: the tokenizer they were made with ("" =
    unchecked). A subclass may carry labels of its own into the results through :meth:`coords`."""

    true_ids: list[list[int]]
    false_ids: list[list[int]]
    answers: np.ndarray
    tokenizer_hash: str = ""

    def __post_init__(self) -> None:
        self.answers = np.asarray(self.answers, dtype=np.int64)
        if len(self.true_ids) != len(self.false_ids) or self.answers.shape != (len(self.true_ids), 2):
            raise PatchingError(f"{len(self.true_ids)} true prompts, {len(self.false_ids)} false prompts and answers "
                                f"of shape {self.answers.shape}: one true, one false prompt and two answers per pair")
        if not len(self.true_ids):
            raise PatchingError("no pairs to patch")
        for i, (a, b) in enumerate(zip(self.true_ids, self.false_ids)):
            if len(a) != len(b) or not len(a):
                raise PatchingError(f"pair {i}: the true prompt has {len(a)} tokens, the false prompt {len(b)}; "
                                    "patching needs prompts of equal, non-zero token length")

    def __len__(self) -> int:
        return len(self.true_ids)

    @property
    def lengths(self) -> np.ndarray:
        return np.array([len(x) for x in self.true_ids])

    def coords(self) -> dict[str, Any]:
        """Extra coordinates of the results (over ``pair``, or (``pair``, ``position``) right-aligned)."""
        return {}


def _masks(pairs: PatchPairs, mask: Sequence[np.ndarray] | None) -> list[np.ndarray]:
    """Per pair, the positions to patch (default: all), checked against the pairs' lengths."""
    if mask is None:
        return [np.ones(n, dtype=bool) for n in pairs.lengths]
    out = [np.asarray(m, dtype=bool) for m in mask]
    if len(out) != len(pairs):
        raise PatchingError(f"mask has {len(out)} entries for {len(pairs)} pairs")
    bad = [i for i, (m, n) in enumerate(zip(out, pairs.lengths)) if m.shape != (n,)]
    if bad:
        i = bad[0]
        raise PatchingError(f"mask of pair {i} has shape {out[i].shape}; the pair has {pairs.lengths[i]} tokens")
    return out


def resolve_sites(sites: str | Sequence[str]) -> tuple[str, ...]:
    """Parse patch sites (a comma-separated string or a sequence), each one of :data:`PATCH_SITES`."""
    out = parse_sites(sites)
    bad = [s for s in out if s not in PATCH_SITES]
    if bad:
        raise SiteError(f"cannot patch site {bad[0]!r}: choose from {', '.join(PATCH_SITES)}")
    return out


def check_patchable(source: LoadedModel, target: LoadedModel) -> None:
    """Raise :class:`ModelMismatchError` unless ``source``'s activations can be patched into ``target``: one
    tokenizer (so token positions correspond) and the same layer count and widths."""
    if source is target:
        return
    if source.tokenizer_hash != target.tokenizer_hash:
        raise ModelMismatchError(
            f"cross-model patching needs one tokenizer, but {source.model_id!r} and {target.model_id!r} have "
            f"different tokenizers ({source.tokenizer_hash[:19]}.. vs {target.tokenizer_hash[:19]}..): token "
            "positions would not correspond"
        )
    a, b = source.adapter, target.adapter
    for what in ("n_layers", "d_model", "d_mlp"):
        if getattr(a, what) != getattr(b, what):
            raise ModelMismatchError(
                f"cross-model patching needs the same shapes, but {source.model_id!r} has {what}={getattr(a, what)} "
                f"and {target.model_id!r} has {what}={getattr(b, what)}"
            )


def _check_pairs_for(lm: LoadedModel, pairs: PatchPairs) -> None:
    if pairs.tokenizer_hash and pairs.tokenizer_hash != lm.tokenizer_hash:
        raise ModelMismatchError(
            f"these pairs were tokenized with another tokenizer than {lm.model_id!r}'s; prepare them with its tokenizer"
        )
    if int(pairs.answers.max()) >= lm.adapter.vocab_size or int(pairs.answers.min()) < 0:
        raise PatchingError(f"an answer token id is outside {lm.model_id!r}'s vocabulary of {lm.adapter.vocab_size}")


# =============================================================================================
# shared machinery


def _groups(pairs: PatchPairs, token_budget: int, max_pairs: int = 64,
            order: np.ndarray | None = None) -> list[list[int]]:
    """Pairs of one token length together (no padding at all), at most ``token_budget`` tokens per prompt batch;
    within a length, pairs go in ``order`` (default: as given)."""
    by_len: dict[int, list[int]] = {}
    for i in (range(len(pairs)) if order is None else order):
        by_len.setdefault(int(pairs.lengths[i]), []).append(int(i))
    out = []
    for n, idx in sorted(by_len.items()):
        size = max(1, min(max_pairs, token_budget // max(1, n)))
        out += [idx[j : j + size] for j in range(0, len(idx), size)]
    return out


def _align(values: Mapping[int, np.ndarray], pairs: PatchPairs, lead: tuple[int, ...]) -> np.ndarray:
    """Per-pair [..., T_i] arrays right-aligned into one [lead[0], pair, *lead[1:], T] array (NaN-padded)."""
    n, t = len(pairs), int(pairs.lengths.max())
    out = np.full((lead[0], n, *lead[1:], t), np.nan)
    for i in range(n):
        out[:, i, ..., t - len(pairs.true_ids[i]) :] = values[i]
    return out


def _dataset(
    values: Mapping[int, np.ndarray],
    pairs: PatchPairs,
    sites: tuple[str, ...],
    layers: tuple[int, ...],
    ld_true: np.ndarray,
    ld_false: np.ndarray,
    attrs: dict[str, Any],
    *,
    prob: tuple[Mapping[int, np.ndarray], np.ndarray, np.ndarray] | None = None,
) -> xr.Dataset:
    """Assemble per-pair [site, layer, T] logit differences into right-aligned labelled arrays, with ``effect``
    (module docstring). ``prob``: the same for the probability difference, with its true- and false-run values."""
    dims = ("site", "pair", "layer", "position")
    patched = _align(values, pairs, (len(sites), len(layers)))
    data: dict[str, Any] = {"patched": (dims, patched), "ld_true": ("pair", ld_true), "ld_false": ("pair", ld_false)}
    if prob is not None:
        data.update(patched_pd=(dims, _align(prob[0], pairs, (len(sites), len(layers)))), pd_true=("pair", prob[1]),
                    pd_false=("pair", prob[2]))
    with np.errstate(divide="ignore", invalid="ignore"):
        effect = (patched - ld_false[None, :, None, None]) / (ld_true - ld_false)[None, :, None, None]
    coords = {
        "site": list(sites),
        "pair": np.arange(len(pairs)),
        "layer": np.asarray(layers),
        "position": np.arange(-int(pairs.lengths.max()), 0),
        "n_tokens": ("pair", pairs.lengths),
        **pairs.coords(),
    }
    return xr.Dataset({"effect": (dims, effect), **data}, coords=coords, attrs={"normalisation": "logit", **attrs})


# =============================================================================================
# exact patching


class _ResumeFailed(RuntimeError):
    pass


@dataclass
class _Group:
    """Everything one batch of equal-length pairs needs: clean/corrupted caches and recorded block calls."""

    idx: list[int]
    n_tokens: int
    answers: torch.Tensor  # [G, 2]
    true_run: torch.Tensor  # [G, 2] readout (logit difference, probability difference) of the target's true run
    false_run: torch.Tensor  # [G, 2] the same, false run
    false_ids: torch.Tensor  # [G, T]
    # target false run, [G, T, d]: resid_pre of block k for k < L, the last block's resid_post at L
    resid: list[torch.Tensor]
    src: dict[tuple[str, int], torch.Tensor]  # source true run: [G, T, w]
    tgt: dict[tuple[str, int], torch.Tensor]  # target false run: [G, T, w]
    kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # target false run keys/values per layer
    start: int = 0  # first suffix position recomputed
    records: dict[int, tuple[tuple, dict]] = field(default_factory=dict)


def _caches(source: LoadedModel, target: LoadedModel, pairs: PatchPairs, idx: list[int],
            sites: tuple[str, ...], layers: tuple[int, ...], want_kv: bool) -> _Group:
    dev = target.device
    L = target.adapter.n_layers
    t_ids = torch.tensor([pairs.true_ids[i] for i in idx], device=dev)
    f_ids = torch.tensor([pairs.false_ids[i] for i in idx], device=dev)
    answers = torch.as_tensor(pairs.answers[idx], device=dev)
    g = len(idx)
    all_layers = tuple(range(L))
    # One capture of the target's false run: every block input (to resume from) plus the patched sites.
    tgt_sites = tuple(dict.fromkeys(("resid_pre", *sites, "resid_post")))
    if source is target:
        cap = Capture(tgt_sites, all_layers)
        out = last_token(target, torch.cat([t_ids, f_ids]), capture=cap, use_cache=want_kv)
        m = answer_readout(out.logits, answers.repeat(2, 1))
        true_run, false_run = m[:g], m[g:]
        src = {(s, l): cap.acts[(s, l)][:g] for s in sites for l in layers}
        tgt = {(s, l): cap.acts[(s, l)][g:] for s in sites for l in layers}
        acts = {k: v[g:] for k, v in cap.acts.items()}
        rows = slice(g, 2 * g)
    else:
        scap = Capture(sites, layers)
        last_token(source, t_ids, capture=scap, use_cache=False)
        src = dict(scap.acts)
        true_run = answer_readout(last_token(target, t_ids, use_cache=False).logits, answers)
        cap = Capture(tgt_sites, all_layers)
        out = last_token(target, f_ids, capture=cap, use_cache=want_kv)
        false_run = answer_readout(out.logits, answers)
        acts = cap.acts
        tgt = {(s, l): acts[(s, l)] for s in sites for l in layers}
        rows = slice(0, g)
    resid = [acts[("resid_pre", k)] for k in range(L)] + [acts[("resid_post", L - 1)]]
    kv = _layer_kv(out.output.past_key_values, rows, L, t_ids.shape[1]) if want_kv else None
    return _Group(idx, int(t_ids.shape[1]), answers, true_run, false_run, f_ids, resid, src, tgt, kv)


def _layer_kv(cache: Any, rows: slice, n_layers: int, n_tokens: int) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """Keys and values per layer of ``rows`` of a forward's cache, or None where no prefix can be cut from it."""
    try:
        kv = [(cache.layers[k].keys[rows], cache.layers[k].values[rows]) for k in range(n_layers)]
    except (AttributeError, IndexError, TypeError):
        return None  # not a layered cache: resuming from a prefix is not possible, only from position 0
    # a sliding-window layer shorter than the prompt keeps only its last keys: no prefix to slice
    if any(k.dim() != 4 or k.shape[-2] != n_tokens for k, _ in kv):
        return None
    return kv


def _prefix_cache(model, kv: list[tuple[torch.Tensor, torch.Tensor]], s: int, rows: torch.Tensor | None = None,
                  first_layer: int = 0):
    """A fresh cache holding the first ``s`` positions' keys/values (of ``rows``, default all) of the layers from
    ``first_layer`` on, to run a suffix on."""
    from transformers import DynamicCache

    past = DynamicCache(config=model.config)
    for k, (key, val) in enumerate(kv):
        key, val = key[:, :, :s], val[:, :, :s]
        if rows is not None:
            key, val = key.index_select(0, rows), val.index_select(0, rows)
        past.update(key, val, first_layer + k)
    return past


def _cache_arg(model) -> str:
    # newer transformers name the cache argument ``cache`` (``past_key_values`` is deprecated there)
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _expand(x: Any, src: torch.Tensor, g: int, cache: Any) -> Any:
    """A recorded block argument for the replay batch: batch-leading tensors of the recorded batch ``g`` are
    re-indexed by ``src`` (replay row -> recorded row); any KV cache is replaced by ``cache``."""
    from transformers.cache_utils import Cache

    if isinstance(x, Cache):
        return cache
    if isinstance(x, torch.Tensor):
        # dim >= 2 so that 1-D tensors (cache positions) are never mistaken for a batch
        return x.index_select(0, src) if x.dim() >= 2 and x.shape[0] == g else x
    if isinstance(x, tuple):
        return tuple(_expand(y, src, g, cache) for y in x)
    if isinstance(x, list):
        return [_expand(y, src, g, cache) for y in x]
    if isinstance(x, dict):
        return {k: _expand(v, src, g, cache) for k, v in x.items()}
    return x


def _record(target: LoadedModel, grp: _Group) -> None:
    """Run the false prompts' suffix once through the model, recording each block's call (args, kwargs).

    With a prefix (start > 0) the model sees the prefix's keys/values in its cache, so the recorded position
    embeddings, masks and cache positions are exactly those of the suffix.
    """
    adapter = target.adapter
    s = grp.start
    records: dict[int, tuple[tuple, dict]] = {}

    def make(k: int):
        def pre(module, args, kwargs):
            records[k] = (tuple(args), dict(kwargs))
        return pre

    past = _prefix_cache(target.model, grp.kv, s) if s > 0 else None
    handles = [adapter.layer(k).register_forward_pre_hook(make(k), with_kwargs=True) for k in range(adapter.n_layers)]
    try:
        last_token(target, grp.false_ids[:, s:], use_cache=s > 0, **{_cache_arg(target.model): past})
    finally:
        for h in handles:
            h.remove()
    if len(records) != adapter.n_layers:
        raise _ResumeFailed(f"only {len(records)} of {adapter.n_layers} blocks were called")
    grp.records = records


def _call_block(target: LoadedModel, grp: _Group, k: int, hidden: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    args, kwargs = grp.records[k]
    cache = None
    if grp.start > 0:
        cache = _prefix_cache(target.model, grp.kv[k : k + 1], grp.start, src, first_layer=k)
    g = len(grp.idx)
    a = _expand(args[1:], src, g, cache)
    kw = _expand(kwargs, src, g, cache)
    if args:
        out = target.adapter.layer(k)(hidden, *a, **kw)
    else:
        out = target.adapter.layer(k)(**{**kw, "hidden_states": hidden})
    return hidden_from_output(out)


@dataclass
class _Rows:
    """Patch variants: site index, layer, pair (in group), position, first block that must run."""

    site: torch.Tensor
    layer: torch.Tensor
    pair: torch.Tensor
    pos: torch.Tensor
    start: torch.Tensor

    def __len__(self) -> int:
        return int(self.site.numel())

    def take(self, sel: torch.Tensor) -> "_Rows":
        return _Rows(self.site[sel], self.layer[sel], self.pair[sel], self.pos[sel], self.start[sel])


def _rows(grp: _Group, sites: tuple[str, ...], layers: tuple[int, ...], skip_unchanged: bool,
          allowed: torch.Tensor) -> tuple[_Rows, int]:
    """Variants to run (at ``allowed`` [G, T] positions); with ``skip_unchanged`` those whose patch value equals
    the value it replaces are left out (exactly a no-op: the result is the false run). Returns the rows and the
    number left out."""
    parts = []
    skipped = 0
    for si, site in enumerate(sites):
        for l in layers:
            run = allowed.clone()
            if skip_unchanged:
                same = torch.eq(grp.src[(site, l)], grp.tgt[(site, l)]).all(-1)  # [G, T]
                skipped += int((same & allowed).sum())
                run &= ~same
            g, p = torch.nonzero(run, as_tuple=True)
            start = l + 1 if site == "resid_post" else l
            parts.append(torch.stack([torch.full_like(g, si), torch.full_like(g, l), g, p, torch.full_like(g, start)]))
    allr = torch.cat(parts, dim=1) if parts else torch.zeros(5, 0, dtype=torch.long)
    order = torch.argsort(allr[4], stable=True)  # by first block, so rows join the batch in order
    allr = allr[:, order]
    return _Rows(*allr), skipped


def _replay(target: LoadedModel, grp: _Group, rows: _Rows, sites: tuple[str, ...]) -> torch.Tensor:
    """Resume every row from its cached residual stream; rows join the batch at their first block. Returns
    the readout per row, [rows, 2] (see :func:`_readout`)."""
    order = torch.argsort(rows.start, stable=True)  # rows join the batch in this order
    rows = rows.take(order)
    adapter = target.adapter
    L = adapter.n_layers
    s = grp.start
    hidden: torch.Tensor | None = None
    src_rows = torch.zeros(0, dtype=torch.long, device=rows.pair.device)
    k0 = int(rows.start.min())
    n_done = 0
    for k in range(k0, L + 1):
        new = torch.nonzero(rows.start == k, as_tuple=True)[0]
        if len(new):
            nr = rows.take(new)
            x = grp.resid[k].index_select(0, nr.pair)[:, s:].clone()
            for si, site in enumerate(sites):
                if site not in _RESID:
                    continue
                m = torch.nonzero(nr.site == si, as_tuple=True)[0]
                if len(m):
                    l = k if site == "resid_pre" else k - 1
                    x[m, nr.pos[m] - s] = grp.src[(site, l)][nr.pair[m], nr.pos[m]]
            hidden = x if hidden is None else torch.cat([hidden, x])
            src_rows = torch.cat([src_rows, nr.pair])
            n_done += len(new)
        if k == L:
            break
        if hidden is None:
            continue
        ivs = []
        b = hidden.shape[0]
        for si, site in enumerate(sites):
            if site in _RESID:
                continue
            m = torch.nonzero((rows.site[:b] == si) & (rows.layer[:b] == k), as_tuple=True)[0]
            if len(m) == 0:
                continue
            src_val = grp.src[(site, k)]
            index = torch.full((b, 1), -1, dtype=torch.long, device=hidden.device)
            index[m, 0] = rows.pos[m] - s
            values = torch.zeros(b, 1, src_val.shape[-1], dtype=src_val.dtype, device=hidden.device)
            values[m, 0] = src_val[rows.pair[m], rows.pos[m]]
            ivs.append(Replace(site, k, values=values, index=index))
        with hooks(adapter, None, ivs):
            hidden = _call_block(target, grp, k, hidden, src_rows)
    assert hidden is not None and n_done == len(rows)
    logits = adapter.logits(hidden[:, -1])
    out = torch.empty(len(rows), 2, dtype=torch.float64, device=logits.device)
    out[order] = answer_readout(logits, grp.answers.index_select(0, rows.pair))
    return out


def _hooked(target: LoadedModel, grp: _Group, rows: _Rows, sites: tuple[str, ...]) -> torch.Tensor:
    """Full forwards of the false prompts with engine replace-interventions (the fallback), batched."""
    b = len(rows)
    ivs = []
    for si, site in enumerate(sites):
        for l in torch.unique(rows.layer[rows.site == si]).tolist():
            m = torch.nonzero((rows.site == si) & (rows.layer == l), as_tuple=True)[0]
            src_val = grp.src[(site, l)]
            index = torch.full((b, 1), -1, dtype=torch.long, device=src_val.device)
            index[m, 0] = rows.pos[m]
            values = torch.zeros(b, 1, src_val.shape[-1], dtype=src_val.dtype, device=src_val.device)
            values[m, 0] = src_val[rows.pair[m], rows.pos[m]]
            ivs.append(Replace(site, int(l), values=values, index=index))
    logits = last_token(target, grp.false_ids.index_select(0, rows.pair), interventions=ivs, use_cache=False).logits
    return answer_readout(logits, grp.answers.index_select(0, rows.pair))


def _segments(rows: _Rows, n_tokens: int, g: int, n_layers: int, prefix_ok: bool) -> list[tuple[int, torch.Tensor]]:
    """Split variants by patch position into segments that each recompute only from their first position.

    A segment starting at ``s`` costs, in token-layers, sum over its rows of (layers resumed) x (T - s), plus a
    recording pass of the group's ``g`` prompts over (T - s) tokens and a fixed cost per pass; the split
    minimising the total is found by dynamic programming over the distinct positions. Returns (start, row
    indices) per segment.
    """
    if not prefix_ok:
        return [(0, torch.arange(len(rows), device=rows.pos.device))]
    p = rows.pos.cpu().numpy()
    depth = np.maximum(1, n_layers - rows.start.cpu().numpy())  # blocks each row runs (1: the unembedding)
    u, inv = np.unique(p, return_inverse=True)
    wsum = np.concatenate([[0.0], np.cumsum(np.bincount(inv, weights=depth, minlength=len(u)))])
    m = len(u)
    best = np.zeros(m + 1)
    arg = np.zeros(m + 1, dtype=np.int64)
    for j in range(1, m + 1):
        i = np.arange(j)
        suffix = n_tokens - u[i]
        cost = best[i] + (wsum[j] - wsum[i] + g * n_layers) * suffix + n_layers * n_tokens
        k = int(np.argmin(cost))
        best[j], arg[j] = cost[k], k
    out = []
    j = m
    while j > 0:
        i = int(arg[j])
        sel = np.nonzero((p >= u[i]) & (p <= u[j - 1]))[0]
        out.append((int(u[i]), torch.as_tensor(sel, device=rows.pos.device)))
        j = i
    return out[::-1]


def _chunks(rows: _Rows, per_row_tokens: int, token_budget: int) -> list[torch.Tensor]:
    size = max(1, token_budget // max(1, per_row_tokens))
    n = len(rows)
    return [torch.arange(a, min(n, a + size), device=rows.pair.device) for a in range(0, n, size)]


def _validate(target: LoadedModel, grp: _Group) -> None:
    """The resumed path must reproduce the model's own logits for unpatched rows (each pair twice, so the
    re-indexing of recorded arguments is exercised)."""
    g = len(grp.idx)
    pair = torch.arange(g, device=grp.false_ids.device).repeat(2)
    z = torch.zeros_like(pair)
    ident = _Rows(z - 1, z, pair, z + grp.start, z)  # site -1: no patch
    got = _replay(target, grp, ident, ())[:, 0]
    want = grp.false_run[:, 0].repeat(2)
    scale = 1.0 + float(want.abs().max())
    tol = {torch.float32: 1e-4, torch.float64: 1e-8}.get(target.dtype, 5e-2) * scale
    err = float((got - want).abs().max())
    if not err <= tol:
        raise _ResumeFailed(f"resumed blocks differ from the model's forward by {err:.3g} (> {tol:.3g})")


def exact_patching(
    source: LoadedModel,
    target: LoadedModel | None,
    pairs: PatchPairs,
    *,
    sites: str | Sequence[str] = ("resid_post",),
    layers: str | Sequence[int] = "all",
    mask: Sequence[np.ndarray] | None = None,
    method: str = "auto",
    skip_unchanged: bool = True,
    token_budget: int = 8192,
    reuse_prefix: bool = True,
) -> xr.Dataset:
    """Exact activation patching of every (site, layer, position): ``source``'s true-prompt activations into
    ``target``'s false run (``target=None`` or ``source``: within one model).

    ``method``: ``resume`` (call the decoder blocks from the cached residual stream; error if it cannot be
    validated), ``hooked`` (full forwards with replace-interventions), ``auto`` (resume, else hooked).
    ``skip_unchanged``: answer patches that replace a value by an identical one from the false run.
    ``mask``: per pair, a bool array over its tokens: the positions to patch (default all; the others are NaN).
    ``token_budget``: rows x recomputed tokens per batched pass.
    ``reuse_prefix``: a resumed patch recomputes only the positions from the patched one on, attending to the
    false run's cached keys/values before it; False recomputes every position from the patched layer on.

    Returns a Dataset with ``effect`` (0 = false run, 1 = true run, from logit differences), ``patched`` (raw
    logit difference) and ``patched_pd`` (raw probability difference) over (site, pair, layer, position),
    ``ld_true`` / ``ld_false`` and ``pd_true`` / ``pd_false`` per pair, the pairs' :meth:`PatchPairs.coords`,
    and attrs with the method used, variants run and skipped, and seconds.
    """
    t0 = time.perf_counter()
    target = source if target is None else target
    if method not in ("auto", "resume", "hooked"):
        raise PatchingError(f"method {method!r}: auto, resume or hooked")
    check_patchable(source, target)
    _check_pairs_for(target, pairs)
    masks = _masks(pairs, mask)
    sites = resolve_sites(sites)
    layers = parse_layers(layers, target.adapter.n_layers)
    L = target.adapter.n_layers
    values: dict[int, np.ndarray] = {}  # per pair [site, layer, T, 2]: both readouts
    runs = np.zeros((len(pairs), 2, 2))  # per pair: (true run, false run) x (logit diff, prob diff)
    n_run = n_skip = 0
    used: set[str] = set()
    resume_ok = method != "hooked"
    validated: set[bool] = set()
    with torch.no_grad():
        for idx in _groups(pairs, token_budget):
            grp = _caches(source, target, pairs, idx, sites, layers, want_kv=resume_ok and reuse_prefix)
            allowed = torch.as_tensor(np.stack([masks[i] for i in idx]), device=grp.false_ids.device)
            rows, skipped = _rows(grp, sites, layers, skip_unchanged, allowed)
            n_skip += skipped
            n_run += len(rows)
            res = grp.false_run[:, None, None, None].expand(len(idx), len(sites), len(layers), grp.n_tokens, 2).clone()
            res.masked_fill_(~allowed[:, None, None, :, None], float("nan"))
            if len(rows):
                out = torch.empty(len(rows), 2, dtype=torch.float64, device=grp.false_ids.device)
                mode = "hooked"
                if resume_ok:
                    try:
                        for start, sel in _segments(rows, grp.n_tokens, len(idx), L, grp.kv is not None):
                            grp.start = start
                            _record(target, grp)
                            # once per call for each way of resuming (whole prompt / after a cached prefix)
                            if (start > 0) not in validated:
                                _validate(target, grp)
                                validated.add(start > 0)
                            seg = rows.take(sel)
                            for ch in _chunks(seg, grp.n_tokens - start, token_budget):
                                part = seg.take(ch)
                                out[sel[ch]] = _replay(target, grp, part, sites)
                        mode = "resume"
                    except Exception as e:  # noqa: BLE001 - any failure to resume means: use full forwards
                        if method == "resume":
                            raise RuntimeError(f"cannot resume {target.adapter.arch} decoder blocks: {e}") from e
                        log.warning("patching %s: resuming failed (%s); using full hooked forwards", target.model_id, e)
                        resume_ok = False
                if mode == "hooked":
                    for ch in _chunks(rows, grp.n_tokens, token_budget):
                        out[ch] = _hooked(target, grp, rows.take(ch), sites)
                used.add(mode)
                lut = torch.full((L,), -1, dtype=torch.long, device=out.device)
                lut[list(layers)] = torch.arange(len(layers), device=out.device)
                res[rows.pair, rows.site, lut[rows.layer], rows.pos] = out
            for j, i in enumerate(idx):
                values[i] = res[j].cpu().numpy().astype(np.float64)
                runs[i] = torch.stack([grp.true_run[j], grp.false_run[j]]).cpu().numpy()
    attrs = {
        "method": "exact",
        "execution": "+".join(sorted(used)) or "none",
        "source": source.model_id,
        "target": target.model_id,
        "variants_run": n_run,
        "variants_skipped": n_skip,
        "seconds": time.perf_counter() - t0,
    }
    return _readout_dataset(values, runs, pairs, sites, layers, attrs)


def _readout_dataset(values: Mapping[int, np.ndarray], runs: np.ndarray, pairs: PatchPairs,
                     sites: tuple[str, ...], layers: tuple[int, ...], attrs: dict[str, Any]) -> xr.Dataset:
    """:func:`_dataset` from per-pair [..., 2] readouts (logit difference, probability difference) and the true
    and false runs' ``runs`` [pair, 2 runs, 2 readouts]."""
    prob = ({i: v[..., 1] for i, v in values.items()}, runs[:, 0, 1], runs[:, 1, 1])
    return _dataset({i: v[..., 0] for i, v in values.items()}, pairs, sites, layers, runs[:, 0, 0], runs[:, 1, 0],
                    attrs, prob=prob)


# =============================================================================================
# naive reference


def _hand_hook(adapter, site: str, layer: int, pos: int, value: torch.Tensor):
    """A hand-written patch of one position (independent of the engine's hook code), for the reference."""

    def set_pos(x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        x[:, pos] = value
        return x

    if site in ("resid_pre", "mlp_act"):
        module = adapter.layer(layer) if site == "resid_pre" else adapter.down_proj(layer)

        def pre(mod, args, kwargs):
            if args:
                return (set_pos(args[0]), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": set_pos(kwargs["hidden_states"])}

        return module.register_forward_pre_hook(pre, with_kwargs=True)
    module = {
        "resid_post": adapter.layer,
        "attn_out": adapter.attn_out_module,
        "mlp_out": adapter.mlp_out_module,
    }[site](layer)

    def post(mod, args, output):
        return replace_hidden_in_output(output, set_pos(hidden_from_output(output)))

    return module.register_forward_hook(post)


def naive_patching(
    source: LoadedModel,
    target: LoadedModel | None,
    pairs: PatchPairs,
    *,
    sites: str | Sequence[str] = ("resid_post",),
    layers: str | Sequence[int] = "all",
    mask: Sequence[np.ndarray] | None = None,
) -> xr.Dataset:
    """The reference: for every pair, site, layer and position, one full forward of the false prompt with that
    one activation replaced by a hand-written hook. Slow by design; same output layout as :func:`exact_patching`."""
    t0 = time.perf_counter()
    target = source if target is None else target
    check_patchable(source, target)
    _check_pairs_for(target, pairs)
    masks = _masks(pairs, mask)
    sites = resolve_sites(sites)
    layers = parse_layers(layers, target.adapter.n_layers)
    values: dict[int, np.ndarray] = {}
    runs = np.zeros((len(pairs), 2, 2))
    dev = target.device
    with torch.no_grad():
        for i in range(len(pairs)):
            t_ids = torch.tensor([pairs.true_ids[i]], device=dev)
            f_ids = torch.tensor([pairs.false_ids[i]], device=dev)
            a_t, a_f = (int(x) for x in pairs.answers[i])
            cap = Capture(sites, layers)
            with hooks(source.adapter, cap):
                source.model(input_ids=t_ids, use_cache=False)

            def ld(ids: torch.Tensor) -> tuple[float, float]:
                """(logit difference, probability difference), written out independently of ``answer_readout``."""
                lg = target.model(input_ids=ids, use_cache=False).logits[0, -1].double()
                p = torch.exp(lg - torch.logsumexp(lg, 0))
                return float(lg[a_t] - lg[a_f]), float(p[a_t] - p[a_f])

            runs[i] = ld(t_ids), ld(f_ids)
            n = t_ids.shape[1]
            v = np.full((len(sites), len(layers), n, 2), np.nan)
            for si, site in enumerate(sites):
                for li, l in enumerate(layers):
                    for p in np.nonzero(masks[i])[0].tolist():
                        h = _hand_hook(target.adapter, site, l, p, cap.acts[(site, l)][0, p])
                        try:
                            v[si, li, p] = ld(f_ids)
                        finally:
                            h.remove()
            values[i] = v
    attrs = {"method": "naive", "source": source.model_id, "target": target.model_id,
             "seconds": time.perf_counter() - t0}
    return _readout_dataset(values, runs, pairs, sites, layers, attrs)


# =============================================================================================
# attribution patching

#: ``method`` of :func:`attribution_patching`: plain AtP, AtP + QK fix, AtP + GradDrop, AtP* (both), integrated
#: gradients.
ATTRIBUTION_METHODS: tuple[str, ...] = ("atp", "atp+qk", "atp+gd", "atp*", "ig")
_QK = {"atp": False, "atp+qk": True, "atp+gd": False, "atp*": True, "ig": False}
_GD = {"atp": False, "atp+qk": False, "atp+gd": True, "atp*": True, "ig": False}
_IN_LAYER = ("attn_out", "mlp_out", "mlp_act")  # dropping their own layer zeroes their gradient
_IMPL = "mechdiff_qk"  # the attention implementation that records queries, keys and probabilities


# =============================================================================================
# hooks: taps, GradDrop gates, recorded block calls and attention


class _Tap(Intervention):
    """Keeps the live (differentiable) activation at a site; changes nothing."""

    def __init__(self, site: str, layer: int, store: dict):
        super().__init__(site, layer)
        self._store = store

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        if not x.requires_grad:  # frozen weights: make the earliest site a leaf so gradients reach it
            x = x.detach().requires_grad_(True)
        self._store[(self.site, self.layer)] = x
        return x


@dataclass
class _Drop:
    """Which layer's residual contribution the next backward pass drops (None: none)."""

    layer: int | None = None


class _Gate(torch.autograd.Function):
    """Identity on a block's output in the forward pass; in the backward pass, when its layer is dropped, the
    gradient skips the block (goes to the block's input only), so nothing flows through what the block added."""

    @staticmethod
    def forward(ctx, out: torch.Tensor, inp: torch.Tensor, drop: _Drop, layer: int) -> torch.Tensor:
        ctx.drop, ctx.layer = drop, layer
        return out.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if ctx.drop.layer != ctx.layer:
            return grad, None, None, None
        return None, (grad if ctx.needs_input_grad[1] else None), None, None


@contextlib.contextmanager
def _gates(adapter, drop: _Drop) -> Iterator[None]:
    def make(l: int):
        def hook(module, args, kwargs, output):
            out = hidden_from_output(output)
            return replace_hidden_in_output(output, _Gate.apply(out, hidden_from_inputs(args, kwargs), drop, l))
        return hook

    # prepend: the gate acts before any resid_post tap on the same block, so the tap sees the gated tensor
    handles = [adapter.layer(l).register_forward_hook(make(l), with_kwargs=True, prepend=True)
               for l in range(adapter.n_layers)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def _block_records(adapter, layers: Sequence[int], store: dict) -> Iterator[None]:
    """Record each listed block's call (args, kwargs), to call it again on other hidden states."""
    def make(k: int):
        def pre(module, args, kwargs):
            store[k] = (tuple(args), dict(kwargs))
        return pre

    handles = [adapter.layer(k).register_forward_pre_hook(make(k), with_kwargs=True) for k in layers]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@dataclass
class _AttnCall:
    """One attention call: post-RoPE queries [B, H, Tq, hd] and keys [B, Hkv, Tk, hd], the additive mask, the
    score scale and soft-cap, and the probabilities [B, H, Tq, Tk] (None when the call was stopped before them)."""

    query: torch.Tensor
    key: torch.Tensor
    mask: torch.Tensor | None
    scaling: float
    softcap: float | None
    weights: torch.Tensor | None


@dataclass
class _AttnRecorder:
    layer_of: dict[int, int]  # id(attention module) -> layer
    calls: dict[int, _AttnCall] = field(default_factory=dict)
    stop: bool = False  # record queries/keys, then stop the forward pass (raise _Stop)


class _Stop(Exception):
    pass


_RECORDING: contextvars.ContextVar[_AttnRecorder | None] = contextvars.ContextVar("mechdiff_qk", default=None)


def _recording_attention(module, query, key, value, attention_mask, **kwargs):
    """The model family's own eager attention, recording what the QK fix needs."""
    eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if eager is None:
        raise AttributionError(f"{type(module).__name__} has no eager attention function: the QK fix (atp+qk, atp*) "
                               "cannot recompute its attention pattern; use method 'atp' or 'atp+gd'")
    rec = _RECORDING.get()
    layer = rec.layer_of.get(id(module)) if rec is not None else None
    scaling = kwargs.get("scaling")
    scaling = float(query.shape[-1] ** -0.5 if scaling is None else scaling)
    if layer is not None and rec.stop:
        rec.calls[layer] = _AttnCall(query, key, attention_mask, scaling, kwargs.get("softcap"), None)
        raise _Stop
    out, w = eager(module, query, key, value, attention_mask, **kwargs)
    if layer is not None:
        rec.calls[layer] = _AttnCall(query, key, attention_mask, scaling, kwargs.get("softcap"), w)
    return out, w


def _register_attention() -> None:
    try:
        from transformers.masking_utils import AttentionMaskInterface, eager_mask
        from transformers.modeling_utils import AttentionInterface
    except ImportError as e:  # transformers without pluggable attention
        raise AttributionError(f"the QK fix needs transformers' AttentionInterface ({e}); use method 'atp' or "
                               "'atp+gd'") from None
    AttentionInterface.register(_IMPL, _recording_attention)
    AttentionMaskInterface.register(_IMPL, eager_mask)  # the masks eager attention gets


@contextlib.contextmanager
def _recording(lm: LoadedModel, recorder: _AttnRecorder) -> Iterator[_AttnRecorder]:
    """Run ``lm`` with :func:`_recording_attention` (eager attention, probabilities returned) for the block."""
    _register_attention()
    adapter = lm.adapter
    configs = {id(c): c for c in [lm.model.config, *(getattr(adapter.attn_module(k), "config", None)
                                                      for k in range(adapter.n_layers))] if c is not None}
    old = {i: c._attn_implementation for i, c in configs.items()}
    token = _RECORDING.set(recorder)
    try:
        for c in configs.values():
            c._attn_implementation = _IMPL
        yield recorder
    finally:
        _RECORDING.reset(token)
        for i, c in configs.items():
            c._attn_implementation = old[i]


# =============================================================================================
# the QK fix


def _repeat_kv(k: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Keys [B, Hkv, T, hd] -> [B, H, T, hd] (grouped-query attention: query head h reads key head h // group)."""
    return k.repeat_interleave(n_heads // k.shape[1], dim=1) if k.shape[1] != n_heads else k


def _softcap(z: torch.Tensor, cap: float | None) -> torch.Tensor:
    return z if cap is None else cap * torch.tanh(z / cap)


def _scores(call: _AttnCall, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Raw scores q . k * scale (before soft-cap and mask), float64."""
    return torch.einsum("bhid,bhjd->bhij", q.double(), k.double()) * call.scaling


def _masked(call: _AttnCall, z: torch.Tensor, rows: torch.Tensor | None, start: int) -> torch.Tensor:
    """Add the call's mask (rows ``rows`` of its batch; causal from the suffix offset ``start`` if it had none)."""
    if call.mask is not None:
        m = call.mask if rows is None or call.mask.shape[0] == 1 else call.mask.index_select(0, rows)
        return z + m.double().clamp(min=-1e30)  # finite: a fully masked row stays finite, its A is 0 anyway
    tq, tk = z.shape[-2:]
    allowed = torch.arange(tk, device=z.device)[None, :] <= (torch.arange(tq, device=z.device)[:, None] + start)
    return z.masked_fill(~allowed, -1e30)


def _others(logp: torch.Tensor, g: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """For every key column j of attention rows ``logp`` (log-probabilities, [..., Tk]): log sum_{s != j} A[s],
    and with ``g`` the mean of g over those keys weighted by A, sum_{s != j} g A / sum_{s != j} A.

    Computed from weights exp(logp - shift) <= 1 with the row's largest entry as shift -- at the largest entry's
    own column, the second largest -- so every sum holds a term equal to 1: nothing underflows or cancels when a
    saturated row puts all but 1e-300 of its attention on one key (no 1 - A, no 1/D times a tiny sum)."""
    top_val, top = logp.max(-1, keepdim=True)
    is_top = torch.zeros_like(logp, dtype=torch.bool).scatter_(-1, top, True)
    second = logp.masked_fill(is_top, -math.inf).max(-1, keepdim=True).values

    def excl(x: torch.Tensor) -> torch.Tensor:  # sum over s != j, as sums before and after j (nothing subtracted)
        c = torch.cumsum(x, -1)
        return torch.nn.functional.pad(c[..., :-1], (1, 0)) + (c[..., -1:] - c)  # c[-1] - c[j]: the sum after j

    w = torch.exp(logp - top_val)  # 1 at the top key
    w2 = torch.exp(logp - second).masked_fill(is_top, 0.0)  # 1 at the second; the top excluded
    rest, rest2 = excl(w), w2.sum(-1, keepdim=True)
    log_rest = torch.where(is_top, second + torch.log(rest2), top_val + torch.log(rest))
    if g is None:
        return log_rest, None
    return log_rest, torch.where(is_top, (g * w2).sum(-1, keepdim=True) / rest2, excl(g * w) / rest)


@dataclass
class _QKPlan:
    """Per variant row r (a site entering layer k, a pair g = pair[r]) and suffix position i, what the exact
    softmax gives, independent of the gradient: ``row`` = A'[r, :, i, :] - A[g, :, i, :] (the patched query's
    row); for every later row t, when only key p = start + i changes, the other keys keep their proportions, so
    ``rest[r, :, t, i]`` = the change of their total probability and ``col[r, :, t, i]`` = A'[t, p] - A[t, p].
    Then

        sum_{t,s} G (A' - A) = sum_s G[i, s] row[s] + sum_{t>i} (rest mean_{s != p}(G[t, s]) + col G[t, p])

    with the mean over the other keys weighted by A[t, s]."""

    pair: torch.Tensor  # [R]
    row: torch.Tensor  # [R, H, Ts, Tk]
    rest: torch.Tensor  # [R, H, Ts(t), Ts(i)]
    col: torch.Tensor  # [R, H, Ts(t), Ts(i)]
    logp: torch.Tensor  # [G, H, Ts, Tk] the false run's log-probabilities (replicated, float64)
    start: int

    def term(self, grad: torch.Tensor) -> torch.Tensor:
        """sum_{h,t,s} G (A' - A) per variant row and position, [R, Ts], for ``grad`` = dm/dA [G, H, Ts, Tk]."""
        g = grad.double()
        ts = g.shape[2]
        gr = g.index_select(0, self.pair)
        out = torch.einsum("rhij,rhij->ri", gr, self.row)
        mean = _others(self.logp, g)[1][..., self.start : self.start + ts].index_select(0, self.pair)
        gcol = gr[..., self.start : self.start + ts]  # G[t, start + i], [R, H, Ts(t), Ts(i)]
        return out + (self.rest * mean + self.col * gcol).sum((1, 2))


def _qk_plan(call: _AttnCall, new: _AttnCall, pair: torch.Tensor, start: int) -> _QKPlan:
    """The exact softmax for every single-position patch: ``call`` is the false run's attention of a layer,
    ``new`` the same layer's queries/keys for packed rows whose every suffix position carries a patch (q and k
    are position-local, so position i of row r is the query/key of the patch at i alone)."""
    n_heads = call.query.shape[1]
    q, k = call.query.detach(), _repeat_kv(call.key.detach(), n_heads)  # [G, H, Ts, hd], [G, H, Tk, hd]
    ts, tk = q.shape[2], k.shape[2]
    if tk != start + ts:
        raise AttributionError(f"attention sees {tk} keys for {ts} queries after a prefix of {start}: the QK fix needs "
                               "every key (no sliding-window cache shorter than the prompt)")
    raw = _scores(call, q, k)  # [G, H, Ts, Tk]
    logp = torch.log_softmax(_masked(call, _softcap(raw, call.softcap), None, start), dim=-1)
    # the patched query's row: new q against the old keys, with the new key at its own position
    q2 = new.query.detach()  # [R, H, Ts, hd]
    k2 = _repeat_kv(new.key.detach()[..., -ts:, :], n_heads)  # the suffix keys of the packed rows, [R, H, Ts, hd]
    z = _scores(call, q2, k.index_select(0, pair))  # [R, H, Ts, Tk]
    own = torch.einsum("rhid,rhid->rhi", q2.double(), k2.double()) * call.scaling
    diag = torch.arange(ts, device=z.device)
    z[:, :, diag, start + diag] = own
    a_row = torch.softmax(_masked(call, _softcap(z, call.softcap), pair, start), dim=-1)
    row = a_row - logp.exp().index_select(0, pair)
    # later rows t > i: only the score on key p = start + i changes, by dz
    dk = k2 - k.index_select(0, pair)[..., start:, :]  # [R, H, Ts(i), hd]
    qg = q.index_select(0, pair).double()
    raw_col = raw.index_select(0, pair)[..., start:]  # old raw scores on the suffix keys, [R, H, Ts(t), Ts(i)]
    dz = _softcap(raw_col + torch.einsum("rhtd,rhid->rhti", qg, dk.double()) * call.scaling, call.softcap) \
        - _softcap(raw_col, call.softcap)
    logp_col = logp[..., start:].index_select(0, pair)  # log A[t, p]
    log_rest = _others(logp)[0][..., start:].index_select(0, pair)  # log sum_{s != p} A[t, s]
    log_d = torch.logaddexp(log_rest, logp_col + dz)  # the new normaliser, relative to the old
    later = (diag[:, None] > diag[None, :]).to(z.dtype)  # t > i
    rest = (torch.exp(log_rest - log_d) - torch.exp(log_rest)) * later
    col = (torch.exp(logp_col + dz - log_d) - torch.exp(logp_col)) * later
    return _QKPlan(pair, row, rest, col, logp, start)


def _check_scores(call: _AttnCall, start: int, arch: str) -> None:
    """The replicated scores must give the model's own attention probabilities."""
    q, k = call.query.detach(), _repeat_kv(call.key.detach(), call.query.shape[1])
    p = torch.softmax(_masked(call, _softcap(_scores(call, q, k), call.softcap), None, start), dim=-1)
    tol = {torch.float32: 1e-4, torch.float64: 1e-8}.get(call.weights.dtype, 2e-2)
    err = float((p - call.weights.detach().double()).abs().max())
    if not err <= tol:
        raise AttributionError(f"the QK fix cannot reproduce {arch}'s attention probabilities (off by {err:.3g}); "
                               "use method 'atp' or 'atp+gd'")


# =============================================================================================
# one batch of equal-length pairs


def _entry(site: str, layer: int) -> int:
    """The first layer whose attention reads what the site writes (see the module docstring)."""
    return layer if site == "resid_pre" else layer + 1


def _affected(site: str, layer: int, dropped: int) -> bool:
    """Does dropping layer ``dropped``'s residual contribution change the gradient at (site, layer)?"""
    return dropped > layer if site == "resid_post" else dropped >= layer


def _residual_delta(adapter, site: str, layer: int, x_true: torch.Tensor, x_false: torch.Tensor) -> torch.Tensor:
    """What the patch adds to the residual stream that its entry layer reads, [G, Ts, d_model]."""
    if site != "mlp_act":
        return x_true - x_false
    down = adapter.down_proj(layer)
    a, b = down(x_true), down(x_false)
    if adapter.post_norm:  # mlp_out = post-feedforward norm of the down projection
        norm = adapter.mlp_out_module(layer)
        a, b = norm(a), norm(b)
    return a - b


@dataclass
class _Forward:
    """The false run's differentiable forward pass and everything the estimates read from it."""

    metric: torch.Tensor  # [G]
    taps: dict[tuple[str, int], torch.Tensor]  # site activations, [G, Ts, w]
    resid: dict[int, torch.Tensor]  # resid_pre of the entry layers (QK fix), [G, Ts, d]
    attn: dict[int, _AttnCall]  # the entry layers' attention calls
    blocks: dict[int, tuple[tuple, dict]]  # the entry layers' recorded block calls
    drop: _Drop


def _suffix_kwargs(lm: LoadedModel, kv, start: int) -> dict[str, Any]:
    if start > 0:  # the same tokens in both prompts before ``start``: one prefix cache serves both runs
        return {"use_cache": True, _cache_arg(lm.model): _prefix_cache(lm.model, kv, start)}
    return {"use_cache": False}


def _false_forward(target: LoadedModel, f_ids: torch.Tensor, answers: torch.Tensor, kv, start: int,
                   sites: tuple[str, ...], layers: tuple[int, ...], entries: tuple[int, ...], gd: bool) -> _Forward:
    """The false run with taps at the sites; for the QK fix (``entries``) eager attention recorded at those layers
    and their block calls; for GradDrop (``gd``) a gate on every block."""
    adapter = target.adapter
    taps: dict[tuple[str, int], torch.Tensor] = {}
    resid: dict[tuple[str, int], torch.Tensor] = {}
    ivs = [_Tap(s, l, taps) for l in layers for s in sites] + [_Tap("resid_pre", k, resid) for k in entries]
    blocks: dict[int, tuple[tuple, dict]] = {}
    drop = _Drop()
    recorder = _AttnRecorder({id(adapter.attn_module(k)): k for k in entries})
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.enable_grad())
        if entries:
            stack.enter_context(_recording(target, recorder))
            stack.enter_context(_block_records(adapter, entries, blocks))
        if gd:
            stack.enter_context(_gates(adapter, drop))
        stack.enter_context(hooks(adapter, None, ivs))
        logits = last_token(target, f_ids[:, start:], **_suffix_kwargs(target, kv, start)).logits
    missing = [k for k in entries if k not in recorder.calls or recorder.calls[k].weights is None]
    if missing:
        raise AttributionError(f"{adapter.arch}: attention of layer(s) {missing} was not recorded: the QK fix cannot "
                               "follow this architecture's attention; use method 'atp' or 'atp+gd'")
    return _Forward(logit_difference(logits, answers), taps, {k: resid[("resid_pre", k)] for k in entries},
                    dict(recorder.calls), blocks, drop)


def _patched_qk(target: LoadedModel, fw: _Forward, k: int, hidden: torch.Tensor, pair: torch.Tensor, kv,
                start: int) -> _AttnCall:
    """Layer k's queries and keys for ``hidden`` [R, Ts, d] (rows of pairs ``pair``): block k called again with its
    recorded arguments (re-indexed to the rows), stopped right after it computes them."""
    args, kwargs = fw.blocks[k]
    cache = _prefix_cache(target.model, kv[k : k + 1], start, pair, first_layer=k) if start > 0 else None
    g = fw.metric.shape[0]
    a, kw = _expand(args[1:], pair, g, cache), _expand(kwargs, pair, g, cache)
    recorder = _AttnRecorder({id(target.adapter.attn_module(k)): k}, stop=True)
    block = target.adapter.layer(k)
    with _recording(target, recorder), torch.no_grad():
        try:
            if args:
                block(hidden, *a, **kw)
            else:
                block(**{**kw, "hidden_states": hidden})
        except _Stop:  # the queries and keys are recorded: the rest of the block is not needed
            pass
    if k not in recorder.calls:
        raise AttributionError(f"{target.adapter.arch}: block {k} called again did not reach its attention")
    return recorder.calls[k]


def _qk_plans(target: LoadedModel, fw: _Forward, deltas: Mapping[tuple[str, int], torch.Tensor], kv, start: int,
              check: bool) -> dict[int, tuple[list[tuple[str, int]], _QKPlan]]:
    """Per entry layer: the sites entering it and the exact-softmax plan of their patches. ``check``: also
    confirm that the block called again reproduces the false run's queries/keys and the replicated scores its
    probabilities (once per call of :func:`attribution_patching`)."""
    out = {}
    g = fw.metric.shape[0]
    for k in fw.attn:
        keys = [key for key in deltas if _entry(*key) == k]
        base = fw.resid[k].detach()
        pair = torch.arange(g, device=base.device).repeat(len(keys))
        hidden = [base + deltas[key].to(base.dtype) for key in keys]
        rows = pair
        if check:  # one unpatched row last: it must give the false run's own queries/keys
            hidden.append(base[:1])
            rows = torch.cat([pair, pair.new_zeros(1)])
        new = _patched_qk(target, fw, k, torch.cat(hidden), rows, kv, start)
        call = fw.attn[k]
        if check:
            _check_scores(call, start, target.adapter.arch)
            ts = call.query.shape[2]
            err = max(float((new.query[-1] - call.query[0].detach()).abs().max()),
                      float((new.key[-1, :, -ts:] - call.key[0, :, -ts:].detach()).abs().max()))
            scale = 1.0 + float(call.query.abs().max())
            tol = {torch.float32: 1e-4, torch.float64: 1e-8}.get(call.query.dtype, 5e-2) * scale
            if not err <= tol:
                raise AttributionError(f"{target.adapter.arch}: block {k} called again gives other queries/keys than "
                                       f"the model's forward (off by {err:.3g}); use method 'atp' or 'atp+gd'")
            new = _AttnCall(new.query[:-1], new.key[:-1], None, new.scaling, new.softcap, None)
        out[k] = (keys, _qk_plan(call, new, pair, start))
    return out


def _estimates(fw: _Forward, deltas: Mapping[tuple[str, int], torch.Tensor],
               res_deltas: Mapping[tuple[str, int], torch.Tensor], plans: Mapping[int, tuple[list, _QKPlan]],
               keys: Sequence[tuple[str, int]]) -> dict[tuple[str, int], torch.Tensor]:
    """One backward pass (with ``fw.drop`` as set): the estimate [G, Ts] of each site in ``keys``, QK-fixed for the
    sites whose entry layer has a plan."""
    entries = sorted({_entry(*key) for key in keys if _entry(*key) in plans})
    inputs = [fw.taps[key] for key in keys] + [fw.attn[k].weights for k in entries]
    grads = torch.autograd.grad(fw.metric.sum(), inputs, retain_graph=True, allow_unused=True)
    out = {}
    for key, gr in zip(keys, grads):
        # no gradient: the metric does not depend on the site in this backward pass (a dropped path)
        out[key] = torch.zeros(deltas[key].shape[:2], dtype=torch.float64, device=deltas[key].device) if gr is None \
            else (deltas[key].double() * gr.double()).sum(-1)
    for k, g_attn in zip(entries, grads[len(keys):]):
        if g_attn is None:
            continue
        linear = torch.autograd.grad(fw.attn[k].weights, fw.resid[k], grad_outputs=g_attn, retain_graph=True,
                                     allow_unused=True)[0]
        names, plan = plans[k]
        exact = plan.term(g_attn)  # [R, Ts], R = len(names) x G
        g = fw.metric.shape[0]
        for j, key in enumerate(names):
            if key not in out:
                continue
            lin = 0.0 if linear is None else (res_deltas[key].double() * linear.double()).sum(-1)
            out[key] = out[key] - lin + exact[j * g : (j + 1) * g]
    return out


def _grad_drop(fw: _Forward, deltas, res_deltas, plans, keys, full: dict, n_layers: int) -> dict:
    """GradDrop: per site, the mean over dropped layers l of |estimate with layer l dropped| (module docstring)."""
    total = {key: torch.zeros_like(v) for key, v in full.items()}
    count = {key: 0 for key in keys}
    for dropped in range(n_layers):
        fw.drop.layer = dropped
        try:
            # in-layer sites of the dropped layer get no gradient at all: their term is 0 and not counted
            changed = [key for key in keys if _affected(*key, dropped)
                       and not (key[0] in _IN_LAYER and key[1] == dropped)]
            est = _estimates(fw, deltas, res_deltas, plans, changed) if changed else {}
        finally:
            fw.drop.layer = None
        for key in keys:
            if key[0] in _IN_LAYER and key[1] == dropped:
                continue
            total[key] += (est[key] if key in est else full[key]).abs()
            count[key] += 1
    return {key: total[key] / count[key] if count[key] else full[key].abs() for key in keys}


@dataclass
class _Batch:
    idx: list[int]
    t_ids: torch.Tensor
    f_ids: torch.Tensor
    answers: torch.Tensor
    start: int = 0  # the first position run: before it the prompts are the same and every estimate 0 or not asked
    kv: Any = None  # the target's keys/values of the positions before ``start``
    src_kv: Any = None  # the source's (across models)


def _prefix(source: LoadedModel, target: LoadedModel, b: _Batch, start: int) -> None:
    """Run the prompts' shared prefix once per model (no gradients) and keep its keys/values."""

    def run(lm: LoadedModel):
        with torch.no_grad():
            out = last_token(lm, b.f_ids[:, :start], use_cache=True).output
        return _layer_kv(out.past_key_values, slice(None), lm.adapter.n_layers, start)

    b.kv = run(target)
    b.src_kv = b.kv if source is target else run(source)
    if b.kv is None or b.src_kv is None:
        b.kv = b.src_kv = None
    b.start = start if b.kv is not None else 0


def _true_run(source: LoadedModel, target: LoadedModel, b: _Batch, sites: tuple[str, ...],
              layers: tuple[int, ...]) -> tuple[dict[tuple[str, int], torch.Tensor], torch.Tensor]:
    """The source's true-run activations at the sites (suffix positions) and the target's true-run metric."""
    with torch.no_grad():
        cap = Capture(sites, layers)
        logits = last_token(source, b.t_ids[:, b.start :], capture=cap,
                            **_suffix_kwargs(source, b.src_kv, b.start)).logits
        if source is not target:
            logits = last_token(target, b.t_ids[:, b.start :], **_suffix_kwargs(target, b.kv, b.start)).logits
    return cap.acts, logit_difference(logits, b.answers)


def _to_array(est: Mapping[tuple[str, int], torch.Tensor], b: _Batch, sites: tuple[str, ...],
              layers: tuple[int, ...]) -> np.ndarray:
    arr = np.zeros((len(b.idx), len(sites), len(layers), b.t_ids.shape[1]))
    for (s, l), v in est.items():
        arr[:, sites.index(s), layers.index(l), b.start :] = v.detach().cpu().numpy()
    return arr


def _batch_estimates(source: LoadedModel, target: LoadedModel, b: _Batch, sites: tuple[str, ...],
                     layers: tuple[int, ...], method: str, check: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Estimates [G, site, layer, T] (0 before the shared prefix's end), the false and the true runs' metric."""
    L = target.adapter.n_layers
    x_true, lt = _true_run(source, target, b, sites, layers)
    keys = [(s, l) for l in layers for s in sites]
    entries = tuple(sorted({_entry(*key) for key in keys if _entry(*key) < L})) if _QK[method] else ()
    fw = _false_forward(target, b.f_ids, b.answers, b.kv, b.start, sites, layers, entries, _GD[method])
    with torch.no_grad():
        deltas = {key: x_true[key].double() - fw.taps[key].detach().double() for key in keys}
        res_deltas = {key: _residual_delta(target.adapter, *key, x_true[key], fw.taps[key].detach())
                      for key in keys if _entry(*key) in entries}
        plans = _qk_plans(target, fw, res_deltas, b.kv, b.start, check) if entries else {}
    est = _estimates(fw, deltas, res_deltas, plans, keys)
    if _GD[method]:
        est = _grad_drop(fw, deltas, res_deltas, plans, keys, est, L)
    return _to_array(est, b, sites, layers), fw.metric.detach().double().cpu().numpy(), lt.double().cpu().numpy()


def _ig_estimates(source: LoadedModel, target: LoadedModel, b: _Batch, sites: tuple[str, ...],
                  layers: tuple[int, ...], steps: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Integrated gradients (module docstring): like :func:`_batch_estimates`."""
    x_true, lt = _true_run(source, target, b, sites, layers)
    keys = [(s, l) for l in layers for s in sites]
    with torch.no_grad():
        cap = Capture(sites, layers)
        logits = last_token(target, b.f_ids[:, b.start :], capture=cap, **_suffix_kwargs(target, b.kv, b.start)).logits
        mf = logit_difference(logits, b.answers)
        e_true, e_false = (target.adapter.embed(ids[:, b.start :]) for ids in (b.t_ids, b.f_ids))
    mean = {key: torch.zeros_like(cap.acts[key], dtype=torch.float64) for key in keys}
    for j in range(steps):
        a = (j + 0.5) / steps
        taps: dict[tuple[str, int], torch.Tensor] = {}
        with torch.enable_grad():
            logits = last_token(target, inputs_embeds=e_false + a * (e_true - e_false),
                                interventions=[_Tap(s, l, taps) for s, l in keys],
                                **_suffix_kwargs(target, b.kv, b.start)).logits
            grads = torch.autograd.grad(logit_difference(logits, b.answers).sum(), [taps[k] for k in keys],
                                        allow_unused=True)
        for key, gr in zip(keys, grads):
            if gr is not None:
                mean[key] += gr.double() / steps
    est = {key: ((x_true[key] - cap.acts[key]).double() * mean[key]).sum(-1) for key in keys}
    return _to_array(est, b, sites, layers), mf.double().cpu().numpy(), lt.double().cpu().numpy()


def attribution_patching(
    source: LoadedModel,
    target: LoadedModel | None,
    pairs: PatchPairs,
    *,
    sites: str | Sequence[str] = ("resid_post",),
    layers: str | Sequence[int] = "all",
    mask: Sequence[np.ndarray] | None = None,
    token_budget: int = 8192,
    reuse_prefix: bool = True,
    method: str = "atp",
    ig_steps: int = 5,
) -> xr.Dataset:
    """Estimate every patch of ``source``'s true-prompt activations into ``target``'s false run at once.

    ``method`` (:data:`ATTRIBUTION_METHODS`; definitions in the module docstring):

    * ``"atp"``: delta . gradient at the false run (one forward and one backward pass per batch of pairs);
    * ``"atp+qk"``: AtP with the first attention the patch feeds recomputed exactly through its softmax (one
      extra pass of each entry layer's attention inputs, plus one vector-Jacobian product per entry layer);
    * ``"atp+gd"``: GradDrop, the mean |AtP| over L backward passes that each drop one layer;
    * ``"atp*"``: both;
    * ``"ig"``: integrated gradients over ``ig_steps`` points between the false and the true prompt's input
      embeddings (``ig_steps`` forward and backward passes).

    Same layout as :func:`exact_patching`: ``patched`` = false run + estimate, ``effect`` normalised like exact
    patching (no probability readouts). GradDrop estimates are magnitudes (``attrs["signed"]`` False): compare
    them with |exact|. ``mask``: the positions to estimate per pair (default all; the others are NaN).
    ``reuse_prefix``: within one model, the
    positions before a batch's first differing token hold the same activations in both runs, so their estimate is
    exactly 0; that prefix runs once, without gradients, and both runs and the backward passes cover only the
    tokens after it (from its cached keys/values). Across models the same holds for a leading span that ``mask``
    leaves out (it runs once in each model).
    """
    if method not in ATTRIBUTION_METHODS:
        raise AttributionError(f"method {method!r}: one of {', '.join(ATTRIBUTION_METHODS)}")
    if method == "ig" and (isinstance(ig_steps, bool) or not isinstance(ig_steps, int) or ig_steps < 1):
        raise AttributionError(f"ig_steps must be a whole number >= 1, got {ig_steps!r}")
    t0 = time.perf_counter()
    target = source if target is None else target
    check_patchable(source, target)
    _check_pairs_for(target, pairs)
    sites = resolve_sites(sites)
    layers = parse_layers(layers, target.adapter.n_layers)
    dev = target.device
    values: dict[int, np.ndarray] = {}
    ld_t, ld_f = np.zeros(len(pairs)), np.zeros(len(pairs))
    within = source is target
    masks = _masks(pairs, mask)
    # How far each pair's prompts can share one prefix run: up to the first differing token within a model (the
    # estimate is exactly 0 before it); across models only over positions not estimated at all (the context
    # before the first position ``mask`` asks for), where the two prompts are the same as well.
    shared = np.array([int(np.argmax(np.asarray(t) != np.asarray(f)))
                       for t, f in zip(pairs.true_ids, pairs.false_ids)])
    if not within:
        shared = np.minimum(shared, [int(np.argmax(m)) if m.any() else len(m) for m in masks])
    # Pairs that can share much together, so that a batch's shared prefix is long.
    order = np.argsort(shared, kind="stable") if reuse_prefix else None
    n_prefix = 0
    for n, idx in enumerate(_groups(pairs, token_budget, order=order)):
        b = _Batch(idx, torch.tensor([pairs.true_ids[i] for i in idx], device=dev),
                   torch.tensor([pairs.false_ids[i] for i in idx], device=dev),
                   torch.as_tensor(pairs.answers[idx], device=dev))
        if reuse_prefix and int(shared[idx].min()) > 0:
            _prefix(source, target, b, int(shared[idx].min()))
        n_prefix += b.start * len(idx)
        if method == "ig":
            est, mf, lt = _ig_estimates(source, target, b, sites, layers, ig_steps)
        else:
            est, mf, lt = _batch_estimates(source, target, b, sites, layers, method, check=n == 0)
        for j, i in enumerate(idx):
            values[i] = np.where(masks[i], mf[j] + est[j], np.nan)
            ld_t[i], ld_f[i] = float(lt[j]), float(mf[j])
    attrs = {"method": "attribution", "estimate": method, "signed": not _GD[method], "source": source.model_id,
             **({"ig_steps": ig_steps} if method == "ig" else {}),
             "target": target.model_id, "prefix_tokens_shared": int(n_prefix), "seconds": time.perf_counter() - t0}
    return _dataset(values, pairs, sites, layers, ld_t, ld_f, attrs)


