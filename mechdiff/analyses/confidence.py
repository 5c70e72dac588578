"""Confidence: entropy neurons in the last MLP layer, and whether they explain a confidence change.

Entropy neurons (Stolfo et al. 2024, "Confidence regulation neurons") write with a large norm into directions
the unembedding barely distinguishes tokens by: they move the final norm's scale, and so the output entropy,
without favouring any token. Per model, for every neuron ``i`` of the last MLP layer:

- ``norm[i]`` = ||W_out[:, i]|| (``adapter.down_proj_weight``, the neuron's write direction);
- ``logit_var[i]`` = variance over the vocabulary of cos(W_out[:, i], W_U[v, :]) -- the cosine of the
  write direction with every unembedding vector. Computed exactly through the vocabulary's second moment
  (a d_model x d_model matrix), so it costs one pass over the unembedding whatever the MLP width.

Both are taken on weights processed as TransformerLens processes them, which the paper and Stolfo et al. use
(``weight_processing="transformer_lens"``, the default): the final norm's gain folded into W_U (``fold_ln``:
W_U[v, :] * g), W_U centred over the vocabulary (``center_unembed``: each hidden dimension's mean over the
vocabulary subtracted), and for a LayerNorm final norm, which removes the mean over the hidden dimensions,
W_U's rows and the write directions centred over the hidden dimensions too (``fold_ln``'s centring and
``center_writing_weights``). The processing changes the candidates (on the embedded base model the raw
lm_head's candidates overlap the processed ones at IoU 0.05); ``"none"`` uses the raw matrices.

Candidates are the top ``q`` of neurons by norm, then the ``n`` of those with the lowest variance
(:func:`~mechdiff.analyses.confidence_controls.select_candidates`). Candidate sets of models of one
architecture are compared by IoU, against the IoU of other sets of the same size (see ``confidence_controls``).
Mean-ablation (each candidate's activation set to its mean over a text set, at every position), against
norm-matched random neurons, says whether the candidates are entropy neurons at all; patching their activations
from one model into the other says how much of the confidence change moves with them.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import xarray as xr

from mechdiff.errors import MechdiffError
from mechdiff.analyses.common import Finding, ModelGroup, StudyResult
from mechdiff.analyses.study import StudyContext, StudyDef
from mechdiff.analyses.confidence_controls import (
    AblationGate,
    ConfidenceRule,
    ExplainedFraction,
    IouBaselines,
    IouStability,
    ablation_gate,
    confidence_verdict,
    explain_verdict,
    explained_fraction,
    iou_baselines,
    iou_stability,
    select_candidates,
    set_iou,
)
from mechdiff.engine.batching import length_batches, pad_batch, tokenize
from mechdiff.engine.models import LoadedModel
from mechdiff.engine.sites import Capture, Intervention, MeanAblate, hooks

__all__ = [
    "ArchitectureMismatchError",
    "ConfidenceOptionError",
    "ConfidenceRule",
    "WeightProcessingError",
    "TokenMismatchError",
    "WEIGHT_PROCESSING",
    "UnembedProcessing",
    "unembed_processing",
    "processed_unembed",
    "EntropyNeurons",
    "NeuronPatch",
    "neuron_stats",
    "select_candidates",
    "entropy_neurons",
    "check_same_architecture",
    "candidate_iou",
    "norm_matched_controls",
    "neuron_means",
    "next_token_confidence",
    "patched_confidence",
    "same_tokens",
    "run_confidence",
]

log = logging.getLogger(__name__)

#: ``transformer_lens``: fold the final norm's gain into W_U and centre it as TransformerLens does (the paper's
#: weights); ``none``: the raw lm_head and down-projection.
WEIGHT_PROCESSING: tuple[str, ...] = ("transformer_lens", "none")


class ArchitectureMismatchError(MechdiffError, ValueError):
    """Neuron indices of two models are only comparable within one architecture and shape."""


class ConfidenceOptionError(MechdiffError, ValueError):
    """A setting of the confidence study is out of range."""


class WeightProcessingError(MechdiffError, ValueError):
    """The final norm is of a kind whose weights cannot be folded into the unembedding."""


class TokenMismatchError(MechdiffError, ValueError):
    """Two models tokenize the same texts differently, so activations cannot be patched token for token."""


# =============================================================================================
# weights


@dataclass
class UnembedProcessing:
    """How unembedding rows and write directions are processed before their cosines are taken.

    ``norm_kind``: ``rmsnorm`` or ``layernorm`` (the final norm), ``raw`` under mode ``none``; ``gain``: the
    final norm's elementwise gain [d_model] (folded into W_U); ``vocab_mean``: the folded W_U's mean over the
    vocabulary [d_model] (what ``center_unembed`` subtracts). All float64.
    """

    mode: str
    norm_kind: str
    gain: torch.Tensor | None = None
    vocab_mean: torch.Tensor | None = None

    @property
    def center_hidden(self) -> bool:
        """A LayerNorm removes the residual's mean over d_model, so that component reads as nothing."""
        return self.mode != "none" and self.norm_kind == "layernorm"

    def rows(self, u: torch.Tensor) -> torch.Tensor:
        """Processed unembedding rows ([k, d_model], float64) from raw rows of the lm_head."""
        u = u.to(torch.float64)
        if self.mode == "none":
            return u
        u = u * self.gain.to(u.device) - self.vocab_mean.to(u.device)
        return u - u.mean(1, keepdim=True) if self.center_hidden else u

    def write(self, w: torch.Tensor) -> torch.Tensor:
        """Processed write directions ([d_model, d_mlp], float64) from the raw down-projection."""
        w = w.to(torch.float64)
        return w - w.mean(0, keepdim=True) if self.center_hidden else w


def _check_mode(weight_processing: str) -> None:
    if weight_processing not in WEIGHT_PROCESSING:
        raise ConfidenceOptionError(
            f"weight_processing {weight_processing!r}: one of {', '.join(WEIGHT_PROCESSING)}"
        )


def _final_norm_gain(norm: torch.nn.Module, d: int) -> tuple[str, torch.Tensor]:
    """(kind, elementwise gain as float64) of the final norm, checked against the norm's own forward."""
    p = next(norm.parameters(), None)
    device, dtype = (p.device, p.dtype) if p is not None else (torch.device("cpu"), torch.float32)
    with torch.no_grad():
        if isinstance(norm, torch.nn.LayerNorm):
            kind = "layernorm"
            gain = norm.weight.detach().double() if norm.weight is not None else torch.ones(d, dtype=torch.float64)
        else:
            # An RMS norm maps s*sqrt(d)*e_i to sqrt(d)*g_i*e_i: its diagonal is the gain whatever the
            # parametrisation (Gemma's 1 + weight included); a large s makes eps negligible.
            kind, s = "rmsnorm", 100.0
            parts = []
            for a in range(0, d, 1024):
                b = min(d, a + 1024)
                eye = torch.zeros(b - a, d, dtype=dtype, device=device)
                eye[torch.arange(b - a), torch.arange(a, b)] = s * math.sqrt(d)
                out = norm(eye).double()
                parts.append(out[torch.arange(b - a), torch.arange(a, b)] / math.sqrt(d))
            gain = torch.cat(parts)
        x = torch.randn(4, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 100.0
        got = norm(x.to(dtype=dtype, device=device)).double().cpu()
        if kind == "layernorm":
            xc = x - x.mean(1, keepdim=True)
            want = xc / torch.sqrt(xc.pow(2).mean(1, keepdim=True) + norm.eps) * gain.cpu()
            want = want + (norm.bias.detach().double().cpu() if norm.bias is not None else 0.0)
        else:
            want = x / x.pow(2).mean(1, keepdim=True).sqrt() * gain.cpu()
    tol = 1e-4 if dtype == torch.float32 or dtype == torch.float64 else 3e-2
    if not torch.allclose(got, want, rtol=tol, atol=tol * float(want.abs().max())):
        raise WeightProcessingError(
            f"final norm {type(norm).__name__} is neither a LayerNorm nor an RMS norm with an elementwise gain, so it "
            f"cannot be folded into the unembedding; use weight_processing='none'"
        )
    return kind, gain.to(device)


def unembed_processing(lm: LoadedModel, weight_processing: str = "transformer_lens", *, vocab_chunk: int = 8192) -> UnembedProcessing:
    """The :class:`UnembedProcessing` of ``lm`` under ``weight_processing`` (one pass over the vocabulary)."""
    _check_mode(weight_processing)
    if weight_processing == "none":
        return UnembedProcessing("none", "raw")
    adapter = lm.adapter
    kind, gain = _final_norm_gain(adapter.final_norm, adapter.d_model)
    u_all = adapter.unembed_weight().detach()
    total = torch.zeros(adapter.d_model, dtype=torch.float64, device=u_all.device)
    with torch.no_grad():
        for a in range(0, u_all.shape[0], vocab_chunk):
            total += u_all[a : a + vocab_chunk].to(torch.float64).sum(0)
    return UnembedProcessing(weight_processing, kind, gain.to(u_all.device), gain.to(u_all.device) * total / u_all.shape[0])


def processed_unembed(lm: LoadedModel, weight_processing: str = "transformer_lens") -> torch.Tensor:
    """The whole processed unembedding [vocab, d_model] (float64; for inspection and small models)."""
    with torch.no_grad():
        return unembed_processing(lm, weight_processing).rows(lm.adapter.unembed_weight().detach())


def _neuron_stats(lm: LoadedModel, layer: int, proc: UnembedProcessing, vocab_chunk: int) -> tuple[np.ndarray, np.ndarray]:
    adapter = lm.adapter
    with torch.no_grad():
        w = proc.write(adapter.down_proj_weight(layer).detach())  # [d_model, d_mlp]
        u_all = adapter.unembed_weight().detach()
        vocab, d = u_all.shape
        gram = torch.zeros(d, d, dtype=torch.float64, device=w.device)
        mean = torch.zeros(d, dtype=torch.float64, device=w.device)
        for a in range(0, vocab, vocab_chunk):
            u = proc.rows(u_all[a : a + vocab_chunk])
            u = u / u.norm(dim=1, keepdim=True).clamp_min(1e-30)  # an all-zero row has cosine 0 with everything
            gram += u.T @ u
            mean += u.sum(0)
        gram /= vocab
        mean /= vocab
        norm = w.norm(dim=0)
        wu = w / norm.clamp_min(1e-30)
        second = ((gram @ wu) * wu).sum(0)
        var = (second - (mean @ wu) ** 2).clamp_min(0.0)
    return norm.cpu().numpy(), var.cpu().numpy()


def neuron_stats(
    lm: LoadedModel, *, layer: int = -1, vocab_chunk: int = 8192, weight_processing: str = "transformer_lens"
) -> tuple[np.ndarray, np.ndarray]:
    """(norm, logit_var), each [d_mlp], for the MLP neurons of ``layer`` (default: the last), on weights
    processed by ``weight_processing`` (see the module docstring).

    var_v cos(w, u_v) = w^T C w - (m . w)^2 with unit w, unit rows u_v, C = mean_v u_v u_v^T and m = mean_v u_v;
    C and m are accumulated in float64 over chunks of the vocabulary.
    """
    return _neuron_stats(lm, layer, unembed_processing(lm, weight_processing, vocab_chunk=vocab_chunk), vocab_chunk)


@dataclass
class EntropyNeurons:
    """One model's last-layer neuron statistics and its entropy-neuron candidates."""

    layer: int
    norm: np.ndarray
    logit_var: np.ndarray
    top_norm: np.ndarray
    candidates: np.ndarray
    q: float
    n: int
    weight_processing: str = "none"
    norm_kind: str = "raw"


def entropy_neurons(
    lm: LoadedModel, *, q: float = 0.25, n: int = 10, layer: int = -1, weight_processing: str = "transformer_lens"
) -> EntropyNeurons:
    proc = unembed_processing(lm, weight_processing)
    norm, var = _neuron_stats(lm, layer, proc, 8192)
    top, cand = select_candidates(norm, var, q=q, n=n)
    return EntropyNeurons(layer % lm.adapter.n_layers, norm, var, top, cand, q, n, proc.mode, proc.norm_kind)


def check_same_architecture(a: LoadedModel, b: LoadedModel) -> None:
    """Raise :class:`ArchitectureMismatchError` unless neuron ``i`` of ``a`` and of ``b`` are the same slot."""
    aa, bb = a.adapter, b.adapter
    for what in ("arch", "n_layers", "d_model", "d_mlp"):
        if getattr(aa, what) != getattr(bb, what):
            raise ArchitectureMismatchError(
                f"entropy-neuron candidates can only be compared within one architecture: {a.model_id!r} has "
                f"{what}={getattr(aa, what)!r}, {b.model_id!r} has {what}={getattr(bb, what)!r}"
            )


def candidate_iou(a: np.ndarray | EntropyNeurons, b: np.ndarray | EntropyNeurons) -> float:
    """|A n B| / |A u B| of two candidate index sets."""
    return set_iou(a.candidates if isinstance(a, EntropyNeurons) else a, b.candidates if isinstance(b, EntropyNeurons) else b)


def norm_matched_controls(
    norm: np.ndarray, candidates: np.ndarray, *, draws: int = 5, nearest: int = 5, seed: int = 0
) -> list[np.ndarray]:
    """``draws`` random neuron sets, each matching the candidates one for one in norm: for every candidate, one
    of the ``nearest`` non-candidate neurons closest to it in norm (not already taken in that draw)."""
    rng = np.random.default_rng(seed)
    norm = np.asarray(norm)
    cand = set(np.asarray(candidates).tolist())
    pool = np.array([i for i in range(len(norm)) if i not in cand])
    if len(pool) < len(cand):
        raise ValueError(f"only {len(pool)} non-candidate neurons to match {len(cand)} candidates")
    out = []
    for _ in range(draws):
        taken = np.zeros(len(norm), dtype=bool)
        pick = []
        for c in sorted(cand, key=lambda i: -norm[i]):
            free = pool[~taken[pool]]
            near = free[np.argsort(np.abs(norm[free] - norm[c]), kind="stable")[: max(1, nearest)]]
            j = int(rng.choice(near))
            taken[j] = True
            pick.append(j)
        out.append(np.array(sorted(pick)))
    return out


# =============================================================================================
# running the model


@dataclass
class NeuronPatch(Intervention):
    """``mlp_act`` intervention: the given neurons' activations set to ``values`` ([batch, seq, n], one per
    position of the batch it is installed for). (A neuron's mean everywhere is the engine's ``MeanAblate``.)"""

    neurons: torch.Tensor = None
    values: torch.Tensor = None

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        out[..., torch.as_tensor(self.neurons, dtype=torch.long).to(x.device)] = self.values.to(device=x.device, dtype=x.dtype)
        return out


def _token_ids(lm: LoadedModel, texts: Sequence[str]) -> list[list[int]]:
    return tokenize(lm.tokenizer, texts, max_length=lm.adapter.max_positions)


def _batches(lm: LoadedModel, texts: Sequence[str], token_budget: int):
    ids = _token_ids(lm, texts)
    lengths = [len(x) for x in ids]
    pad = lm.tokenizer.pad_token_id
    for b in length_batches(lengths, range(len(ids)), token_budget):
        yield b, pad_batch([ids[i] for i in b], pad, side="right", device=lm.device)


def same_tokens(a: LoadedModel, b: LoadedModel, texts: Sequence[str]) -> bool:
    """Do both tokenizers turn every text into the same token ids? (Patching activations across models needs it.)"""
    return _token_ids(a, texts) == _token_ids(b, texts)


def _capture_mlp_act(lm: LoadedModel, batch: Mapping[str, torch.Tensor], layer: int) -> torch.Tensor:
    cap = Capture(("mlp_act",), (layer,))
    with torch.no_grad(), hooks(lm.adapter, cap):
        lm.model(**{k: v.to(lm.device) for k, v in batch.items()}, use_cache=False)
    return cap.acts[("mlp_act", layer)]


def neuron_means(lm: LoadedModel, texts: Sequence[str], *, layer: int = -1, token_budget: int = 4096) -> np.ndarray:
    """Mean ``mlp_act`` of every neuron of ``layer`` over all real tokens of ``texts`` ([d_mlp], float64)."""
    layer = layer % lm.adapter.n_layers
    total = torch.zeros(lm.adapter.d_mlp, dtype=torch.float64)
    count = 0
    for _, batch in _batches(lm, texts, token_budget):
        m = batch["attention_mask"].bool()
        total += _capture_mlp_act(lm, batch, layer)[m].double().sum(0).cpu()
        count += int(m.sum())
    return (total / max(1, count)).numpy()


def _scan(
    lm: LoadedModel,
    texts: Sequence[str],
    variants: Callable[[Mapping[str, torch.Tensor]], Sequence[Sequence[Intervention]]],
    token_budget: int,
) -> list[dict[str, np.ndarray]]:
    """Next-token entropy and max probability at every real token of ``texts`` (text order, flattened), once per
    set of interventions that ``variants(batch)`` gives for each batch; ``text``: each token's text index."""
    per: list[dict[str, list[np.ndarray]]] = []
    order: list[int] = []
    with torch.no_grad():
        for b, batch in _batches(lm, texts, token_budget):
            m = batch["attention_mask"].bool()
            order.extend(b)
            for k, ivs in enumerate(variants(batch)):
                if k == len(per):
                    per.append({"entropy": [], "max_prob": []})
                with hooks(lm.adapter, None, ivs):
                    logits = lm.model(**batch, use_cache=False).logits
                logp = torch.log_softmax(logits.double(), dim=-1)
                h = -(logp.exp() * logp).sum(-1)
                pmax = logp.max(-1).values.exp()
                for r in range(len(b)):
                    per[k]["entropy"].append(h[r][m[r]].cpu().numpy())
                    per[k]["max_prob"].append(pmax[r][m[r]].cpu().numpy())
    back = np.argsort(order)
    lengths = [len(x) for x in per[0]["entropy"]] if per else []
    text = np.concatenate([np.full(lengths[j], order[j]) for j in back]) if per else np.zeros(0, dtype=int)
    return [
        {k: np.concatenate([v[k][j] for j in back]) for k in ("entropy", "max_prob")} | {"text": text} for v in per
    ]


def next_token_confidence(
    lm: LoadedModel,
    texts: Sequence[str],
    *,
    interventions: Sequence[Intervention] = (),
    token_budget: int = 4096,
) -> dict[str, np.ndarray]:
    """Entropy (nats) and maximum probability of the next-token distribution at every real token of ``texts``
    (in text order, flattened), with optional interventions installed; ``text``: each token's text index."""
    return _scan(lm, texts, lambda batch: [interventions], token_budget)[0]


def patched_confidence(
    src: LoadedModel,
    dst: LoadedModel,
    texts: Sequence[str],
    neuron_sets: Sequence[np.ndarray],
    *,
    layer: int = -1,
    token_budget: int = 4096,
) -> list[dict[str, np.ndarray]]:
    """:func:`next_token_confidence` of ``dst`` with, in turn, each set of neurons' ``mlp_act`` at ``layer`` set
    to ``src``'s activations on the same tokens (one result per set). Raises :class:`ArchitectureMismatchError`
    or :class:`TokenMismatchError` unless the models share the architecture and the tokenization of ``texts``."""
    check_same_architecture(src, dst)
    if not same_tokens(src, dst, texts):
        raise TokenMismatchError(
            f"{src.model_id!r} and {dst.model_id!r} tokenize the texts differently: activations cannot be patched "
            "between them token for token"
        )
    layer = layer % dst.adapter.n_layers
    sets = [torch.as_tensor(np.asarray(s), dtype=torch.long) for s in neuron_sets]

    def variants(batch):
        acts = _capture_mlp_act(src, batch, layer).to(dst.device)
        return [[NeuronPatch("mlp_act", layer, s, acts[..., s.to(acts.device)])] for s in sets]

    return _scan(dst, texts, variants, token_budget)


def _effect(base: dict[str, np.ndarray], abl: dict[str, np.ndarray]) -> dict[str, float]:
    out = {}
    for k in ("entropy", "max_prob"):
        d = abl[k] - base[k]
        out[f"{k}"] = float(abl[k].mean())
        out[f"delta_{k}"] = float(d.mean())
        out[f"delta_{k}_se"] = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else float("nan")
    # the size of the change whatever its sign per token: what the entropy-neuron test compares
    out["mean_abs_delta_entropy"] = float(np.abs(abl["entropy"] - base["entropy"]).mean())
    return out


# =============================================================================================
# the study


def _load_texts(texts: Sequence[str] | str | Path, text_column: str | None, limit: int | None) -> list[str]:
    if texts is None:
        # the dataset is the caller's choice (the CLI and the main job pass the embedded one)
        raise ConfidenceOptionError("give texts: strings or a prompt file (CSV / JSON / JSONL)")
    if isinstance(texts, (str, Path)):
        from mechdiff.engine.data import load_prompts

        out = load_prompts(texts, text_column=text_column).texts
    else:
        out = [str(t) for t in texts]
    if not out:
        raise ValueError("the text set is empty")
    return out[:limit] if limit else out


def _check_options(*, q: float, n: int, controls: int, weight_processing: str, iou_draws: int, n_bootstrap: int,
                   q_factors: Sequence[float]) -> None:
    """Every setting checked before a model is loaded or run."""
    _check_mode(weight_processing)
    if not 0 < q <= 1:
        raise ConfidenceOptionError(f"q must be a fraction in (0, 1], got {q}")
    if n < 1:
        raise ConfidenceOptionError(f"n must be at least 1, got {n}")
    for name, v in (("controls", controls), ("iou_draws", iou_draws), ("n_bootstrap", n_bootstrap)):
        if v < 1:
            raise ConfidenceOptionError(f"{name} must be at least 1, got {v}")
    if not q_factors or any(not f > 0 for f in q_factors):
        raise ConfidenceOptionError(f"q_factors must be positive numbers, got {tuple(q_factors)}")


def _ablation(lm: LoadedModel, en: EntropyNeurons, texts: Sequence[str], *, controls: int, seed: int,
              token_budget: int, quantile: float) -> tuple[dict[str, Any], AblationGate, list[np.ndarray], dict[str, np.ndarray]]:
    """Mean-ablation of the candidates and of ``controls`` norm-matched random sets, in one pass over the texts:
    (the model's summary entry, its :class:`AblationGate`, the control sets, the unablated confidence)."""
    means = neuron_means(lm, texts, layer=en.layer, token_budget=token_budget)
    ctrl_sets = norm_matched_controls(en.norm, en.candidates, draws=controls, seed=seed)
    sets = [en.candidates, *ctrl_sets]
    ablations = [[MeanAblate("mlp_act", en.layer, mean=means[s], units=s)] for s in sets]
    base, cand, *ctrl_runs = _scan(lm, texts, lambda batch: [[], *ablations], token_budget)
    ce = _effect(base, cand)
    ctrl = [_effect(base, r) for r in ctrl_runs]
    gate = ablation_gate(ce["mean_abs_delta_entropy"], [c["mean_abs_delta_entropy"] for c in ctrl], quantile=quantile)
    keys = ("entropy", "max_prob", "delta_entropy", "delta_max_prob", "mean_abs_delta_entropy")
    entry = {
        "model": lm.model_id,
        "layer": en.layer,
        "norm_kind": en.norm_kind,
        "candidates": en.candidates.tolist(),
        "candidate_norm": en.norm[en.candidates].tolist(),
        "candidate_logit_var": en.logit_var[en.candidates].tolist(),
        "median_norm": float(np.median(en.norm)),
        "median_logit_var": float(np.median(en.logit_var)),
        "n_tokens": int(len(base["entropy"])),
        "baseline": {"entropy": float(base["entropy"].mean()), "max_prob": float(base["max_prob"].mean())},
        "ablate_candidates": ce,
        "ablate_control": {k: float(np.mean([c[k] for c in ctrl])) for k in keys} | {
            f"{k}_spread": float(np.std([c[k] for c in ctrl], ddof=1)) if len(ctrl) > 1 else float("nan")
            for k in ("delta_entropy", "delta_max_prob", "mean_abs_delta_entropy")
        },
        "control_mean_abs_delta_entropy": [c["mean_abs_delta_entropy"] for c in ctrl],
        "entropy_neurons": asdict(gate) | {"beats": gate.beats},
    }
    return entry, gate, ctrl_sets, base


def _explained(models: Mapping[str, LoadedModel], neurons: Mapping[str, EntropyNeurons], base_conf: Mapping[str, dict],
               a: str, b: str, texts: Sequence[str], *, controls: int, seed: int, token_budget: int,
               n_bootstrap: int, quantile: float) -> dict[str, ExplainedFraction] | str:
    """Per direction ``src->dst`` of the pair, the fraction of the entropy change that moves when the union of
    both models' candidates is patched from src into dst, against norm-matched random sets (matched in dst);
    a one-line reason instead where the models cannot be patched token for token."""
    if not same_tokens(models[a], models[b], texts):
        return f"{a} and {b} tokenize the texts differently, so activations cannot be patched between them"
    union = np.union1d(neurons[a].candidates, neurons[b].candidates)
    out = {}
    for k, (src, dst) in enumerate(((a, b), (b, a))):
        ctrl = norm_matched_controls(neurons[dst].norm, union, draws=controls, seed=seed + k)
        runs = patched_confidence(models[src], models[dst], texts, [union, *ctrl], layer=neurons[dst].layer,
                                  token_budget=token_budget)
        out[f"{src}->{dst}"] = explained_fraction(
            base_conf[dst]["entropy"], base_conf[src]["entropy"], runs[0]["entropy"], base_conf[dst]["text"],
            h_controls=[r["entropy"] for r in runs[1:]], n_bootstrap=n_bootstrap, quantile=quantile, seed=seed + 7 + k,
        )
    return out


def _shared_finding(a: str, b: str, stab: IouStability, base: IouBaselines, gates: Mapping[str, AblationGate],
                    per_model: Mapping[str, dict], rule: ConfidenceRule) -> Finding:
    verdict, reason = confidence_verdict(stab, base, {a: gates[a], b: gates[b]}, rule)
    pa, pb = per_model[a], per_model[b]
    figs = {
        "iou": stab.iou,
        "iou_top_norm": base.top_norm,
        "iou_top_var": base.top_var,
        "iou_random_top_norm_upper": base.random_top_norm_upper,
        "iou_low": stab.low,
        "iou_high": stab.high,
        f"abs_delta_entropy_{a}": gates[a].effect,
        f"abs_delta_entropy_{a}_control_upper": gates[a].control_upper,
        f"abs_delta_entropy_{b}": gates[b].effect,
        f"abs_delta_entropy_{b}_control_upper": gates[b].control_upper,
        f"delta_entropy_{a}": pa["ablate_candidates"]["delta_entropy"],
        f"delta_entropy_{a}_control": pa["ablate_control"]["delta_entropy"],
        f"delta_entropy_{b}": pb["ablate_candidates"]["delta_entropy"],
        f"delta_entropy_{b}_control": pb["ablate_control"]["delta_entropy"],
        f"entropy_{a}": pa["baseline"]["entropy"],
        f"entropy_{b}": pb["baseline"]["entropy"],
    }
    controls = {
        "iou_top_norm": base.top_norm,
        "iou_top_var": base.top_var,
        "iou_random_top_norm_mean": base.random_top_norm_mean,
        "iou_random_top_norm_upper": base.random_top_norm_upper,
        "iou_random_all_mean": base.random_all_mean,
        "iou_random_all_upper": base.random_all_upper,
    }
    for m in (a, b):
        controls[f"abs_delta_entropy_{m}_control_mean"] = gates[m].control_mean
        controls[f"abs_delta_entropy_{m}_control_upper"] = gates[m].control_upper
        controls[f"delta_entropy_{m}_control"] = per_model[m]["ablate_control"]["delta_entropy"]
    by_q = ", ".join(f"q={k:.3g}: {v:.2f}" for k, v in stab.by_q.items())
    detail = (
        f"candidate IoU {stab.iou:.2f} ({by_q}); baselines: top-n by norm {base.top_norm:.2f}, top-n by highest "
        f"variance {base.top_var:.2f}, random from top-norm {base.random_top_norm_mean:.2f} (upper "
        f"{base.random_top_norm_upper:.2f}), random {base.random_all_mean:.2f} (upper {base.random_all_upper:.2f}); "
        f"mean |dH| of mean-ablating the candidates {gates[a].effect:.4f} in {a} (norm-matched control "
        f"{gates[a].control_mean:.4f}, upper {gates[a].control_upper:.4f}, {gates[a].draws} draws) and "
        f"{gates[b].effect:.4f} in {b} (control {gates[b].control_mean:.4f}, upper {gates[b].control_upper:.4f}); "
        f"baseline entropy {pa['baseline']['entropy']:.3f} -> {pb['baseline']['entropy']:.3f}"
    )
    return Finding("entropy neurons shared", f"{a} vs {b}", figs, verdict, detail, reason=reason,
                   interval=stab.interval, controls=controls)


def _explain_finding(a: str, b: str, fractions: dict[str, ExplainedFraction] | str,
                     gates: Mapping[str, AblationGate], rule: ConfidenceRule) -> Finding:
    name = "entropy neurons do not explain the confidence change"
    if isinstance(fractions, str):
        return Finding(name, f"{a} vs {b}", {}, "inconclusive", fractions, reason=fractions)
    verdict, reason = explain_verdict(fractions, {a: gates[a], b: gates[b]}, rule)
    head = fractions[f"{a}->{b}"]
    figs: dict[str, float] = {}
    controls: dict[str, float] = {}
    for d, f in fractions.items():
        key = d.replace("->", "_to_")
        figs |= {f"explained_{key}": f.fraction, f"explained_{key}_control_upper": f.control_upper,
                 f"explained_{key}_low": f.low, f"explained_{key}_high": f.high}
        controls |= {f"explained_{key}_control_mean": f.control_mean, f"explained_{key}_control_upper": f.control_upper}
    figs["entropy_change"] = head.change
    controls |= {"entropy_change_low": head.change_low, "entropy_change_high": head.change_high,
                 "explained_max": rule.explained_max}
    detail = (
        f"the union of both models' candidates patched from one model into the other; fraction = "
        f"mean(H_dst,patched - H_dst) / mean(H_src - H_dst); entropy change {a} -> {b} {-head.change:+.4f} nats "
        f"(95% CI [{-head.change_high:+.4f}, {-head.change_low:+.4f}])"
    )
    return Finding(name, f"{a} vs {b}", figs, verdict, detail, reason=reason, interval=head.interval, controls=controls)


def _scatter_figure(neurons: Mapping[str, EntropyNeurons], path: Path) -> Path:
    from mechdiff.analyses.plotting import MODEL_COLORS, new_figure, save_figure

    fig, axes = new_figure(width=3.8, height=3.2, ncols=len(neurons))
    axes = np.atleast_1d(axes)
    for i, (ax, (lab, en)) in enumerate(zip(axes, neurons.items())):
        var = np.maximum(en.logit_var, 1e-12)
        ax.scatter(en.norm, var, s=5, alpha=0.35, color=MODEL_COLORS[i % len(MODEL_COLORS)], label="neurons")
        ax.scatter(en.norm[en.candidates], var[en.candidates], s=28, facecolors="none", edgecolors="black",
                   linewidths=1.0, label=f"candidates (n={len(en.candidates)})")
        thr = en.norm[en.top_norm].min()
        ax.axvline(thr, color="gray", lw=0.8, ls="--", label=f"top {en.q:.0%} by norm")
        ax.set_yscale("log")
        ax.set_xlabel("output-weight norm")
        ax.set_title(f"{lab}: layer {en.layer}", fontsize=9)
        ax.legend(fontsize=6, loc="lower left")
    axes[0].set_ylabel("variance over vocab of cos(w_out, W_U)")
    return save_figure(fig, path)


def _iou_figure(labels: list[str], iou: np.ndarray, path: Path) -> Path:
    from mechdiff.analyses.plotting import new_figure, save_figure

    fig, ax = new_figure(width=1.2 + 1.1 * len(labels), height=0.8 + 0.5 * len(labels))
    ax.axis("off")
    cells = [[f"{v:.2f}" for v in row] for row in iou]
    table = ax.table(cellText=cells, rowLabels=labels, colLabels=labels, loc="center", cellLoc="center")
    table.scale(1.0, 1.4)
    ax.set_title("entropy-neuron candidates: IoU", fontsize=9)
    return save_figure(fig, path)


def _venn_figure(neurons: Mapping[str, EntropyNeurons], pairs: Sequence[tuple[str, str]], path: Path) -> Path:
    """The paper's Figure 1d: each pair's two candidate sets as overlapping circles with their counts."""
    from matplotlib.patches import Circle

    from mechdiff.analyses.plotting import MODEL_COLORS, new_figure, save_figure

    fig, axes = new_figure(width=3.2, height=2.4, ncols=len(pairs))
    for ax, (a, b) in zip(np.atleast_1d(axes), pairs):
        sa, sb = set(neurons[a].candidates.tolist()), set(neurons[b].candidates.tolist())
        for x, colour in ((-0.5, MODEL_COLORS[0]), (0.5, MODEL_COLORS[1])):
            ax.add_patch(Circle((x, 0), 1.0, color=colour, alpha=0.3, lw=1.2))
        for x, count in ((-1.0, len(sa - sb)), (0.0, len(sa & sb)), (1.0, len(sb - sa))):
            ax.text(x, 0, str(count), ha="center", va="center", fontsize=12)
        ax.text(-0.9, 1.15, a, ha="center", fontsize=9)
        ax.text(0.9, 1.15, b, ha="center", fontsize=9)
        ax.set_xlim(-1.7, 1.7)
        ax.set_ylim(-1.2, 1.4)
        ax.set_aspect("equal")
        ax.axis("off")
        ax.set_title(f"entropy-neuron candidates: IoU {set_iou(list(sa), list(sb)):.2f}", fontsize=9)
    return save_figure(fig, path)


def _pair_dataset(pairs: Sequence[tuple[str, str]], stab: Mapping[str, IouStability], base: Mapping[str, IouBaselines],
                  explained: Mapping[str, dict[str, ExplainedFraction] | str]) -> xr.Dataset:
    names = [f"{a} vs {b}" for a, b in pairs]
    cuts = sorted({c for s in stab.values() for c in s.by_q})
    bl = ["top_norm", "top_var", "random_top_norm_mean", "random_top_norm_upper", "random_all_mean", "random_all_upper"]
    stats = ["fraction", "low", "high", "control_mean", "control_upper", "change"]
    frac = np.full((len(pairs), 2, len(stats)), np.nan)
    for i, (a, b) in enumerate(pairs):
        ex = explained[names[i]]
        if isinstance(ex, dict):
            for j, d in enumerate((f"{a}->{b}", f"{b}->{a}")):
                frac[i, j] = [getattr(ex[d], s) for s in stats]
    return xr.Dataset(
        {
            "iou_by_q": (("pair", "q_cut"), [[stab[p].by_q.get(c, np.nan) for c in cuts] for p in names]),
            "iou_baseline": (("pair", "baseline"), [[getattr(base[p], k) for k in bl] for p in names]),
            "explained_fraction": (("pair", "direction", "stat"), frac),
        },
        coords={"pair": names, "q_cut": cuts, "baseline": bl, "direction": ["into_post", "into_base"], "stat": stats},
    )


@dataclass(frozen=True)
class ConfidenceConfig:
    """Every option of the confidence study and its verdict rule (see :func:`run_confidence`)."""

    q: float = 0.25  # candidates come from the top q of neurons by output-weight norm
    n: int = 10  # ... the n of lowest logit variance among them
    layer: int = -1
    controls: int = 20  # norm-matched random neuron sets per ablation
    text_column: str | None = None
    limit: int | None = None  # texts read from the dataset (None: all)
    seed: int = 0
    token_budget: int = 4096
    weight_processing: str = "transformer_lens"
    iou_draws: int = 1000
    n_bootstrap: int = 200
    q_factors: tuple[float, ...] = (0.5, 1.0, 1.5)
    patch: bool = True
    rule: ConfidenceRule = ConfidenceRule()

    def __post_init__(self) -> None:
        object.__setattr__(self, "q_factors", tuple(self.q_factors))
        _check_options(q=self.q, n=self.n, controls=self.controls, weight_processing=self.weight_processing,
                       iou_draws=self.iou_draws, n_bootstrap=self.n_bootstrap, q_factors=self.q_factors)


def run_confidence(
    group: ModelGroup,
    texts: Sequence[str] | str | Path,
    out_dir: str | Path,
    config: ConfidenceConfig | None = None,
    *,
    device: str = "cpu",
    dtype: str = "float32",
    models: Mapping[str, LoadedModel] | None = None,
    save: bool = True,
    **options: Any,
) -> StudyResult:
    """The confidence study for a model group (``options``: fields of :class:`ConfidenceConfig`, over ``config``).

    Per model: last-layer neuron norms and logit variances on weights processed by ``weight_processing``,
    candidates (top ``q`` by norm, then the ``n`` of lowest variance), and the effect on next-token entropy /
    max probability over ``texts`` of mean-ablating the candidates vs ``controls`` draws of norm-matched random
    neurons (the candidates count as entropy neurons only if their effect beats the controls'). Per pair: the
    candidate IoU with its range over ``q * q_factors``, against IoU baselines (``iou_draws`` random draws); with
    ``patch``, the fraction of the entropy change that moves when the candidates' activations are patched from one
    model into the other (interval: ``n_bootstrap`` resamples of the texts), against norm-matched random sets.
    ``rule``: the verdicts' settings. ``texts``: strings, a prompt file (CSV/JSON/JSONL, see
    ``engine.data.load_prompts``); required.
    Writes its figures to ``out_dir/confidence/`` and, with ``save``, results.zarr and summary.json.
    """
    if options:
        from mechdiff.analyses.study import config_from_options

        config = config_from_options(study, options, base=config or ConfidenceConfig())
    c = config or ConfidenceConfig()
    q, n, layer, controls, seed, token_budget = c.q, c.n, c.layer, c.controls, c.seed, c.token_budget
    weight_processing, iou_draws, n_bootstrap, q_factors, patch, rule = (
        c.weight_processing, c.iou_draws, c.n_bootstrap, c.q_factors, c.patch, c.rule)
    t0 = time.perf_counter()
    labels = list(group.labels)
    text_list = _load_texts(texts, c.text_column, c.limit)
    if models is None:
        from mechdiff.engine.models import load_model

        models = {lab: load_model(p, device=device, dtype=dtype) for lab, p in group.models.items()}
    missing = [lab for lab in labels if lab not in models]
    if missing:
        raise ValueError(f"no loaded model for label(s) {', '.join(missing)}")
    for lab in labels[1:]:
        check_same_architecture(models[labels[0]], models[lab])

    neurons = {
        lab: entropy_neurons(models[lab], q=q, n=n, layer=layer, weight_processing=weight_processing) for lab in labels
    }
    iou = np.array([[candidate_iou(neurons[a], neurons[b]) for b in labels] for a in labels])

    per_model: dict[str, Any] = {}
    gates: dict[str, AblationGate] = {}
    control_sets: dict[str, list[list[int]]] = {}
    base_conf: dict[str, dict[str, np.ndarray]] = {}
    for mi, lab in enumerate(labels):
        per_model[lab], gates[lab], ctrl, base_conf[lab] = _ablation(
            models[lab], neurons[lab], text_list, controls=controls, seed=seed + mi, token_budget=token_budget,
            quantile=rule.control_quantile)
        control_sets[lab] = [c.tolist() for c in ctrl]

    stab: dict[str, IouStability] = {}
    base: dict[str, IouBaselines] = {}
    explained: dict[str, dict[str, ExplainedFraction] | str] = {}
    findings = []
    for pi, (a, b) in enumerate(group.pairs):
        p = f"{a} vs {b}"
        ea, eb = neurons[a], neurons[b]
        stab[p] = iou_stability(ea.norm, ea.logit_var, eb.norm, eb.logit_var, q=q, n=n, factors=q_factors)
        base[p] = iou_baselines(ea.norm, ea.logit_var, eb.norm, eb.logit_var, q=q, n=n, draws=iou_draws,
                                quantile=rule.null_quantile, seed=seed + 1000 + pi)
        explained[p] = (
            _explained(models, neurons, base_conf, a, b, text_list, controls=controls, seed=seed + 2000 + 10 * pi,
                       token_budget=token_budget, n_bootstrap=n_bootstrap, quantile=rule.control_quantile)
            if patch else "patching not run (patch=False)"
        )
        findings.append(_shared_finding(a, b, stab[p], base[p], gates, per_model, rule))
        findings.append(_explain_finding(a, b, explained[p], gates, rule))

    data = _model_dataset(labels, neurons, per_model, iou).merge(_pair_dataset(group.pairs, stab, base, explained))
    data.attrs = {"study": "confidence", "q": q, "n": n, "controls": controls, "weight_processing": weight_processing,
                  "norm_kind": {lab: neurons[lab].norm_kind for lab in labels}, "q_factors": list(q_factors),
                  "iou_draws": iou_draws, "n_bootstrap": n_bootstrap, "rule": asdict(rule)}
    summary: dict[str, Any] = {
        "models": {lab: models[lab].model_id for lab in labels},
        "n_texts": len(text_list),
        "q": q,
        "n": n,
        "controls": controls,
        "weight_processing": weight_processing,
        "norm_kind": {lab: neurons[lab].norm_kind for lab in labels},
        "rule": asdict(rule),
        "per_model": per_model,
        "control_sets": control_sets,
        "iou": {f"{a} vs {b}": float(iou[labels.index(a), labels.index(b)]) for a, b in group.pairs},
        "iou_stability": stab,
        "iou_baselines": base,
        "explained": explained,
        "confidence_change": {
            f"{a} vs {b}": {
                "entropy": [per_model[a]["baseline"]["entropy"], per_model[b]["baseline"]["entropy"]],
                "max_prob": [per_model[a]["baseline"]["max_prob"], per_model[b]["baseline"]["max_prob"]],
            }
            for a, b in group.pairs
        },
    }
    d = Path(out_dir) / "confidence"
    figures = {
        "scatter": _scatter_figure(neurons, d / "norm_vs_logit_var.png"),
        "iou": _iou_figure(labels, iou, d / "iou_table.png"),
        "venn": _venn_figure(neurons, group.pairs, d / "candidates_venn.png"),
    }
    notes = {"venn": "Entropy-neuron candidates of each pair of models (the paper's Figure 1d): counts only in the "
                     "first model, in both, only in the second."}
    summary["seconds"] = time.perf_counter() - t0
    result = StudyResult("confidence", data, summary, figures, findings, notes)
    if save:
        result.save(out_dir)
    return result


def _run(ctx: StudyContext, config: ConfidenceConfig) -> StudyResult:
    return run_confidence(ctx.group, ctx.dataset("texts", "confidence"), ctx.out, config, models=ctx.all_models(),
                          save=False)


def _check(config: ConfidenceConfig, group: ModelGroup, datasets: Mapping[str, Any],
           layers: Mapping[str, int]) -> None:
    """A layer every model has, and texts that load."""
    for label, n in layers.items():
        if not -n <= config.layer < n:
            raise ConfidenceOptionError(f"layer {config.layer}: model {label!r} has layers 0..{n - 1} "
                                        f"(or -{n}..-1 from the end)")
    texts = datasets.get("texts")
    if isinstance(texts, (str, Path)):
        _load_texts(texts, config.text_column, config.limit)


study = StudyDef(
    name="confidence", Config=ConfidenceConfig, datasets=("texts",), requirements=lambda config, group, datasets: [],
    run=_run, describe="entropy neurons of the last layer, their overlap across models, and their ablation effect",
    check=_check,
)


def _model_dataset(labels: list[str], neurons: Mapping[str, EntropyNeurons], per_model: Mapping[str, dict],
                   iou: np.ndarray) -> xr.Dataset:
    d_mlp = len(neurons[labels[0]].norm)  # one architecture, checked by the caller

    def flags(which: str) -> np.ndarray:
        return np.stack([np.isin(np.arange(d_mlp), getattr(neurons[lab], which)) for lab in labels])

    def by_condition(key: str) -> np.ndarray:
        pm = [per_model[lab] for lab in labels]
        return np.array([[m["baseline"][key], m["ablate_candidates"][key], m["ablate_control"][key]] for m in pm])

    def by_ablation(key: str, spread: str) -> tuple[np.ndarray, np.ndarray]:
        pm = [per_model[lab] for lab in labels]
        return (np.array([[m["ablate_candidates"][key], m["ablate_control"][key]] for m in pm]),
                np.array([[m["ablate_candidates"][spread], m["ablate_control"][f"{key}_spread"]] for m in pm]))

    de, de_s = by_ablation("delta_entropy", "delta_entropy_se")
    dm, dm_s = by_ablation("delta_max_prob", "delta_max_prob_se")
    ctrl = np.array([per_model[lab]["control_mean_abs_delta_entropy"] for lab in labels])
    return xr.Dataset(
        {
            "norm": (("model", "neuron"), np.stack([neurons[lab].norm for lab in labels])),
            "logit_var": (("model", "neuron"), np.stack([neurons[lab].logit_var for lab in labels])),
            "is_candidate": (("model", "neuron"), flags("candidates")),
            "is_top_norm": (("model", "neuron"), flags("top_norm")),
            "iou": (("model", "model_b"), iou),
            "entropy": (("model", "condition"), by_condition("entropy")),
            "max_prob": (("model", "condition"), by_condition("max_prob")),
            "delta_entropy": (("model", "ablation"), de),
            "delta_max_prob": (("model", "ablation"), dm),
            "delta_entropy_spread": (("model", "ablation"), de_s),
            "delta_max_prob_spread": (("model", "ablation"), dm_s),
            "abs_delta_entropy": (("model", "ablation"), np.array(
                [[per_model[lab]["ablate_candidates"]["mean_abs_delta_entropy"],
                  per_model[lab]["ablate_control"]["mean_abs_delta_entropy"]] for lab in labels])),
            "control_abs_delta_entropy": (("model", "control_draw"), ctrl),
        },
        coords={"model": labels, "model_b": labels, "neuron": np.arange(d_mlp),
                "condition": ["baseline", "candidates", "control"], "ablation": ["candidates", "control"],
                "control_draw": np.arange(ctrl.shape[1])},
    )
