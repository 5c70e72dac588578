"""Attribution patching: a gradient estimate of every activation patch at once, its corrected form AtP*, and how
far either can stand in for exact activation patching on a given model pair.

Notation (one pair, one site ``n`` = (site, layer l, position p); the patch puts the true run's activation into
the false run, as :func:`mechdiff.analyses.knowledge.exact_patching` does; ``m`` = logit(TRUE) - logit(FALSE)):

    c(n)        = m(false run with n <- n_true) - m(false run)             (exact patching)
    delta(n)    = n_true - n_false
    AtP(n)      = delta(n) . dm/dn                                          (gradient at the false run)

AtP* (Kramar, Lieberum, Shah, Nanda 2024, "AtP*: An efficient and scalable method for localizing LLM behaviour to
components", arXiv:2403.00745) adds two corrections; ``method`` picks which (see :data:`METHODS`):

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

:func:`attribution_agreement` measures how well an estimate tracks exact patching (Pearson r per site and per
run, with a bootstrap interval over pairs) and applies the rule the report prints: reliable where r >= 0.8.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

import numpy as np
import torch
import xarray as xr

from mechdiff.errors import MechdiffError
from mechdiff.engine.adapter import hidden_from_inputs, hidden_from_output, replace_hidden_in_output
from mechdiff.engine.models import LoadedModel
from mechdiff.engine.sites import Capture, Intervention, hooks, parse_layers

if TYPE_CHECKING:
    from mechdiff.analyses.knowledge import PatchingPairs

__all__ = [
    "METHODS",
    "RELIABLE_R",
    "AttributionError",
    "attribution_patching",
    "SiteAgreement",
    "AttributionAgreement",
    "attribution_agreement",
]

#: ``method`` of :func:`attribution_patching`: plain AtP, AtP + QK fix, AtP + GradDrop, AtP* (both), integrated
#: gradients.
METHODS: tuple[str, ...] = ("atp", "atp+qk", "atp+gd", "atp*", "ig")
_QK = {"atp": False, "atp+qk": True, "atp+gd": False, "atp*": True, "ig": False}
_GD = {"atp": False, "atp+qk": False, "atp+gd": True, "atp*": True, "ig": False}
#: Pearson r against exact patching from which an attribution estimate counts as reliable.
RELIABLE_R = 0.8
_IN_LAYER = ("attn_out", "mlp_out", "mlp_act")  # dropping their own layer zeroes their gradient
_IMPL = "mechdiff_qk"  # the attention implementation that records queries, keys and probabilities


class AttributionError(MechdiffError, ValueError):
    """Attribution patching that cannot be done as asked (unknown method, an architecture whose attention the QK
    fix cannot reproduce, datasets that do not match)."""


def _knowledge():
    # knowledge.py imports this module; importing it back at call time keeps the two free of an import cycle
    from mechdiff.analyses import knowledge

    return knowledge


# =============================================================================================
# hooks: taps, GradDrop gates, recorded block calls and attention


class _Tap(Intervention):
    """Keeps the live (differentiable) activation at a site; changes nothing."""

    def __init__(self, site: str, layer: int, store: dict):
        self.site, self.layer, self.kind = site, layer, "tap"
        self.vector = self.values = self.index = None
        self.coef = 1.0
        self.prompt_only = False
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
    kn = _knowledge()
    if start > 0:  # the same tokens in both prompts before ``start``: one prefix cache serves both runs
        return {"use_cache": True, kn._cache_arg(lm.model): kn._prefix_cache(lm.model, kv, start)}
    return {"use_cache": False}


def _false_forward(target: LoadedModel, f_ids: torch.Tensor, answers: torch.Tensor, kv, start: int,
                   sites: tuple[str, ...], layers: tuple[int, ...], entries: tuple[int, ...], gd: bool) -> _Forward:
    """The false run with taps at the sites; for the QK fix (``entries``) eager attention recorded at those layers
    and their block calls; for GradDrop (``gd``) a gate on every block."""
    kn = _knowledge()
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
        out = target.model(input_ids=f_ids[:, start:], **_suffix_kwargs(target, kv, start),
                           **kn._forward_kwargs(target.model))
    missing = [k for k in entries if k not in recorder.calls or recorder.calls[k].weights is None]
    if missing:
        raise AttributionError(f"{adapter.arch}: attention of layer(s) {missing} was not recorded: the QK fix cannot "
                               "follow this architecture's attention; use method 'atp' or 'atp+gd'")
    return _Forward(kn._metric(out.logits[:, -1], answers), taps, {k: resid[("resid_pre", k)] for k in entries},
                    dict(recorder.calls), blocks, drop)


def _patched_qk(target: LoadedModel, fw: _Forward, k: int, hidden: torch.Tensor, pair: torch.Tensor, kv,
                start: int) -> _AttnCall:
    """Layer k's queries and keys for ``hidden`` [R, Ts, d] (rows of pairs ``pair``): block k called again with its
    recorded arguments (re-indexed to the rows), stopped right after it computes them."""
    kn = _knowledge()
    args, kwargs = fw.blocks[k]
    cache = kn._prefix_cache(target.model, kv[k : k + 1], start, pair, first_layer=k) if start > 0 else None
    g = fw.metric.shape[0]
    a, kw = kn._expand(args[1:], pair, g, cache), kn._expand(kwargs, pair, g, cache)
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
    kn = _knowledge()

    def run(lm: LoadedModel):
        with torch.no_grad():
            out = lm.model(input_ids=b.f_ids[:, :start], use_cache=True, **kn._forward_kwargs(lm.model))
        return kn._layer_kv(out.past_key_values, slice(None), lm.adapter.n_layers, start)

    b.kv = run(target)
    b.src_kv = b.kv if source is target else run(source)
    if b.kv is None or b.src_kv is None:
        b.kv = b.src_kv = None
    b.start = start if b.kv is not None else 0


def _true_run(source: LoadedModel, target: LoadedModel, b: _Batch, sites: tuple[str, ...],
              layers: tuple[int, ...]) -> tuple[dict[tuple[str, int], torch.Tensor], torch.Tensor]:
    """The source's true-run activations at the sites (suffix positions) and the target's true-run metric."""
    kn = _knowledge()
    with torch.no_grad():
        cap = Capture(sites, layers)
        with hooks(source.adapter, cap):
            out = source.model(input_ids=b.t_ids[:, b.start :], **_suffix_kwargs(source, b.src_kv, b.start),
                               **kn._forward_kwargs(source.model))
        if source is not target:
            out = target.model(input_ids=b.t_ids[:, b.start :], **_suffix_kwargs(target, b.kv, b.start),
                               **kn._forward_kwargs(target.model))
    return cap.acts, kn._metric(out.logits[:, -1], b.answers)


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
    kn = _knowledge()
    x_true, lt = _true_run(source, target, b, sites, layers)
    keys = [(s, l) for l in layers for s in sites]
    with torch.no_grad():
        cap = Capture(sites, layers)
        with hooks(target.adapter, cap):
            out = target.model(input_ids=b.f_ids[:, b.start :], **_suffix_kwargs(target, b.kv, b.start),
                               **kn._forward_kwargs(target.model))
        mf = kn._metric(out.logits[:, -1], b.answers)
        e_true, e_false = (target.adapter.embed(ids[:, b.start :]) for ids in (b.t_ids, b.f_ids))
    mean = {key: torch.zeros_like(cap.acts[key], dtype=torch.float64) for key in keys}
    for j in range(steps):
        a = (j + 0.5) / steps
        taps: dict[tuple[str, int], torch.Tensor] = {}
        with torch.enable_grad(), hooks(target.adapter, None, [_Tap(s, l, taps) for s, l in keys]):
            out = target.model(inputs_embeds=e_false + a * (e_true - e_false),
                               **_suffix_kwargs(target, b.kv, b.start), **kn._forward_kwargs(target.model))
            grads = torch.autograd.grad(kn._metric(out.logits[:, -1], b.answers).sum(), [taps[k] for k in keys],
                                        allow_unused=True)
        for key, gr in zip(keys, grads):
            if gr is not None:
                mean[key] += gr.double() / steps
    est = {key: ((x_true[key] - cap.acts[key]).double() * mean[key]).sum(-1) for key in keys}
    return _to_array(est, b, sites, layers), mf.double().cpu().numpy(), lt.double().cpu().numpy()


def attribution_patching(
    source: LoadedModel,
    target: LoadedModel | None,
    pairs: "PatchingPairs",
    *,
    sites: str | Sequence[str] = ("resid_post",),
    layers: str | Sequence[int] = "all",
    positions: str = "all",
    token_budget: int = 8192,
    reuse_prefix: bool = True,
    method: str = "atp",
    ig_steps: int = 5,
) -> xr.Dataset:
    """Estimate every patch of ``source``'s true-prompt activations into ``target``'s false run at once.

    ``method`` (:data:`METHODS`; definitions in the module docstring):

    * ``"atp"``: delta . gradient at the false run (one forward and one backward pass per batch of pairs);
    * ``"atp+qk"``: AtP with the first attention the patch feeds recomputed exactly through its softmax (one
      extra pass of each entry layer's attention inputs, plus one vector-Jacobian product per entry layer);
    * ``"atp+gd"``: GradDrop, the mean |AtP| over L backward passes that each drop one layer;
    * ``"atp*"``: both;
    * ``"ig"``: integrated gradients over ``ig_steps`` points between the false and the true prompt's input
      embeddings (``ig_steps`` forward and backward passes).

    Same layout as :func:`mechdiff.analyses.knowledge.exact_patching`: ``patched`` = false run + estimate,
    ``effect`` normalised like exact patching. GradDrop estimates are magnitudes (``attrs["signed"]`` False):
    compare them with |exact| (:func:`attribution_agreement` does). ``reuse_prefix``: within one model, the
    positions before a batch's first differing token hold the same activations in both runs, so their estimate is
    exactly 0; that prefix runs once, without gradients, and both runs and the backward passes cover only the
    tokens after it (from its cached keys/values). Across models the same holds for the context that
    ``positions="statement"`` leaves unpatched (it runs once in each model).
    """
    kn = _knowledge()
    if method not in METHODS:
        raise AttributionError(f"method {method!r}: one of {', '.join(METHODS)}")
    if method == "ig" and (isinstance(ig_steps, bool) or not isinstance(ig_steps, int) or ig_steps < 1):
        raise AttributionError(f"ig_steps must be a whole number >= 1, got {ig_steps!r}")
    t0 = time.perf_counter()
    target = source if target is None else target
    kn._check_patchable(source, target)
    kn._check_pairs_for(target, pairs)
    sites = kn._resolve_sites(sites)
    layers = parse_layers(layers, target.adapter.n_layers)
    dev = target.device
    values: dict[int, np.ndarray] = {}
    ld_t, ld_f = np.zeros(len(pairs)), np.zeros(len(pairs))
    within = source is target
    masks = [kn._position_mask(pairs, i, positions) for i in range(len(pairs))]
    # How far each pair's prompts can share one prefix run: up to the first differing token within a model (the
    # estimate is exactly 0 before it); across models only over positions not estimated at all (the context
    # that ``positions="statement"`` leaves out), where the two prompts are the same as well.
    shared = np.array([int(np.argmax(np.asarray(t) != np.asarray(f)))
                       for t, f in zip(pairs.true_ids, pairs.false_ids)])
    if not within:
        shared = np.minimum(shared, [int(np.argmax(m)) if m.any() else len(m) for m in masks])
    # Pairs that can share much together, so that a batch's shared prefix is long.
    order = np.argsort(shared, kind="stable") if reuse_prefix else None
    n_prefix = 0
    for n, idx in enumerate(kn._groups(pairs, token_budget, order=order)):
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
    return kn._dataset(values, pairs, sites, layers, ld_t, ld_f, attrs)


# =============================================================================================
# agreement with exact patching


@dataclass(frozen=True)
class SiteAgreement:
    """Pearson r between exact patching and an estimate at one site (over every layer x position of every pair
    kept), its bootstrap 95% interval over pairs, and the rule: ``reliable`` = r >= the threshold."""

    run: str
    site: str
    r: float
    interval: tuple[float, float]
    n_pairs: int
    n_points: int
    reliable: bool


@dataclass
class AttributionAgreement:
    """How well an attribution estimate tracks exact patching: per (run, site) and per site over all runs."""

    estimate: str  # the attribution method, e.g. "atp", "atp*"
    quantity: str  # "effect" (normalised) or "delta" (change of the logit difference)
    signed: bool  # False: magnitudes compared (|exact| against a GradDrop estimate)
    threshold: float
    per_run: dict[str, dict[str, SiteAgreement]]
    per_site: dict[str, SiteAgreement]

    _json_properties = ("reliable",)

    @property
    def reliable(self) -> bool:
        """Reliable at every site (pooled over runs)."""
        return bool(self.per_site) and all(a.reliable for a in self.per_site.values())

    def message(self) -> str:
        """One line for the report, e.g. "attribution estimate unreliable here: r = 0.31 against exact patching"."""
        worst = min(self.per_site.values(), key=lambda a: a.r if math.isfinite(a.r) else -math.inf)
        what = "|estimate| against |exact|" if not self.signed else "against exact patching"
        if not math.isfinite(worst.r):
            return (f"attribution estimate ({self.estimate}) cannot be judged at {worst.site}: too few pairs or no "
                    f"variance to correlate it {what}")
        sites = ", ".join(_r_text(s, a) for s, a in self.per_site.items())
        verdict = "reliable" if self.reliable else "unreliable"
        return (f"attribution estimate ({self.estimate}) {verdict} here: {sites} {what} "
                f"({self.quantity}, {worst.n_pairs} pairs; reliable from r >= {self.threshold:g})")


def _r_text(site: str, a: SiteAgreement) -> str:
    ci = f" [{a.interval[0]:.2f}, {a.interval[1]:.2f}]" if all(map(math.isfinite, a.interval)) else ""
    return f"{site} r = {a.r:.2f}{ci}"


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 3 or np.std(x[ok]) == 0 or np.std(y[ok]) == 0:
        return math.nan
    return float(np.corrcoef(x[ok], y[ok])[0, 1])


def _site_agreement(run: str, site: str, x: np.ndarray, y: np.ndarray, threshold: float, n_bootstrap: int,
                    rng: np.random.Generator) -> SiteAgreement:
    """``x``, ``y``: [pair, ...] exact and estimated values; r over all entries, interval over resampled pairs."""
    x2, y2 = x.reshape(len(x), -1), y.reshape(len(y), -1)
    used = (np.isfinite(x2) & np.isfinite(y2)).any(1)
    r = _pearson(x2.ravel(), y2.ravel())
    lo = hi = math.nan
    if math.isfinite(r) and n_bootstrap > 0:
        rows = np.nonzero(used)[0]
        boots = [_pearson(x2[s].ravel(), y2[s].ravel())
                 for s in rows[rng.integers(0, len(rows), size=(n_bootstrap, len(rows)))]]
        boots = np.asarray(boots)[np.isfinite(boots)]
        if boots.size:
            lo, hi = (float(v) for v in np.quantile(boots, [0.025, 0.975]))
    n_points = int((np.isfinite(x2) & np.isfinite(y2)).sum())
    return SiteAgreement(run, site, r, (lo, hi), int(used.sum()), n_points, bool(math.isfinite(r) and r >= threshold))


def _values(ds: xr.Dataset, quantity: str) -> xr.DataArray:
    if quantity == "effect":
        return ds["effect"]
    return ds["patched"] - ds["ld_false"]


def attribution_agreement(
    exact: xr.Dataset,
    attrib: xr.Dataset,
    *,
    quantity: str = "effect",
    keep: xr.DataArray | None = None,
    signed: bool | None = None,
    threshold: float = RELIABLE_R,
    n_bootstrap: int = 200,
    seed: int = 0,
) -> AttributionAgreement:
    """Pearson r (``np.corrcoef``) between exact patching and an attribution estimate, per site and per run.

    ``exact`` / ``attrib``: datasets in the layout of :func:`mechdiff.analyses.knowledge.exact_patching`, with or
    without a leading ``run`` dimension (as the knowledge study stacks them); the same sites, pairs, layers and
    positions. ``quantity``: ``"effect"`` (normalised effects, what the report shows) or ``"delta"`` (the change of
    the logit difference, defined for every pair). ``keep``: pairs to use (bool over ``pair`` or (``run``,
    ``pair``)). ``signed``: compare signed values (default: ``attrib.attrs["signed"]``, True when absent); False
    compares |exact| with |estimate| (GradDrop estimates are magnitudes). r is taken over every (layer, position)
    of every pair, per site; its interval is the 2.5/97.5% quantiles over ``n_bootstrap`` resamples of the pairs
    (seeded). ``reliable`` = r >= ``threshold``.
    """
    if quantity not in ("effect", "delta"):
        raise AttributionError(f"quantity {quantity!r}: effect or delta")
    if not -1.0 <= threshold <= 1.0:
        raise AttributionError(f"threshold {threshold!r}: a correlation, between -1 and 1")
    if isinstance(n_bootstrap, bool) or not isinstance(n_bootstrap, int) or n_bootstrap < 0:
        raise AttributionError(f"n_bootstrap must be a whole number >= 0, got {n_bootstrap!r}")
    for name, ds in (("exact", exact), ("attrib", attrib)):
        missing = [v for v in ("effect", "patched", "ld_false") if v not in ds]
        if missing:
            raise AttributionError(f"{name} has no {', '.join(missing)}: pass exact_patching / attribution_patching "
                                   "results")
    x, y = _values(exact, quantity), _values(attrib, quantity)
    if set(x.dims) != set(y.dims):
        raise AttributionError(f"exact has dimensions {sorted(x.dims)}, attrib {sorted(y.dims)}")
    for d in x.dims:
        if d in ("run", "site", "pair", "layer", "position") and not np.array_equal(x[d].values, y[d].values):
            raise AttributionError(f"exact and attrib differ in their {d!r} coordinate: estimate the same patches")
    if "run" not in x.dims:  # one run: named after its target model
        name = str(exact.attrs.get("target", "run"))
        x, y = x.expand_dims(run=[name]), y.expand_dims(run=[name])
    signed = bool(attrib.attrs.get("signed", True)) if signed is None else signed
    if keep is not None:
        k = keep if isinstance(keep, xr.DataArray) else xr.DataArray(np.asarray(keep, bool), dims=("pair",))
        x, y = x.where(k), y.where(k)
    if not signed:
        x, y = abs(x), abs(y)
    order = ("run", "site", "pair", ...)
    xv, yv = x.transpose(*order).values, y.transpose(*order).values
    runs, sites = [str(r) for r in x["run"].values], [str(s) for s in x["site"].values]
    rng = np.random.default_rng(seed)
    per_run = {run: {site: _site_agreement(run, site, xv[i, j], yv[i, j], threshold, n_bootstrap, rng)
                     for j, site in enumerate(sites)} for i, run in enumerate(runs)}
    # pooled over runs: a pair's entries in every run move together when pairs are resampled
    per_site = {site: _site_agreement("all", site, np.moveaxis(xv[:, j], 0, 1), np.moveaxis(yv[:, j], 0, 1),
                                      threshold, n_bootstrap, rng) for j, site in enumerate(sites)}
    estimate = str(attrib.attrs.get("estimate", attrib.attrs.get("method", "attribution")))
    return AttributionAgreement(estimate, quantity, signed, float(threshold), per_run, per_site)
