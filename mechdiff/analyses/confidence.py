"""Confidence: entropy neurons in the last MLP layer, and whether they explain a confidence change.

Entropy neurons (Stolfo et al. 2024, "Confidence regulation neurons") write with a large norm into directions
the unembedding barely distinguishes tokens by: they move the final norm's scale, and so the output entropy,
without favouring any token. Per model, for every neuron ``i`` of the last MLP layer:

- ``norm[i]`` = ||W_out[:, i]|| (``adapter.down_proj_weight``, the neuron's write direction);
- ``logit_var[i]`` = variance over the vocabulary of cos(W_out[:, i], W_U[v, :]) -- the cosine of the
  write direction with every unembedding vector. Computed exactly through the vocabulary's second moment
  (a d_model x d_model matrix), so it costs one pass over the unembedding whatever the MLP width.

Candidates are the top ``q`` of neurons by norm, then the ``n`` of those with the lowest variance. Candidate
sets of models of one architecture are compared by IoU. Mean-ablation (each candidate's activation set to its
mean over a text set, at every position) and the same for norm-matched random neurons as a control measure
the neurons' effect on next-token entropy and maximum probability.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import xarray as xr

from mechdiff.errors import MechdiffError
from mechdiff.analyses.common import Finding, ModelGroup, StudyResult
from mechdiff.engine.batching import length_batches, pad_batch, tokenize
from mechdiff.engine.models import LoadedModel
from mechdiff.engine.sites import Capture, Intervention, hooks

__all__ = [
    "ArchitectureMismatchError",
    "EntropyNeurons",
    "NeuronMeanAblation",
    "neuron_stats",
    "select_candidates",
    "entropy_neurons",
    "check_same_architecture",
    "candidate_iou",
    "norm_matched_controls",
    "neuron_means",
    "next_token_confidence",
    "run_confidence",
]

log = logging.getLogger(__name__)


class ArchitectureMismatchError(MechdiffError, ValueError):
    """Neuron indices of two models are only comparable within one architecture and shape."""


# =============================================================================================
# weights


def neuron_stats(lm: LoadedModel, *, layer: int = -1, vocab_chunk: int = 8192) -> tuple[np.ndarray, np.ndarray]:
    """(norm, logit_var), each [d_mlp], for the MLP neurons of ``layer`` (default: the last).

    var_v cos(w, u_v) = w^T C w - (m . w)^2 with unit w, unit rows u_v, C = mean_v u_v u_v^T and m = mean_v u_v;
    C and m are accumulated in float64 over chunks of the vocabulary.
    """
    adapter = lm.adapter
    with torch.no_grad():
        w = adapter.down_proj_weight(layer).detach().to(torch.float64)  # [d_model, d_mlp]
        u_all = adapter.unembed_weight().detach()
        vocab, d = u_all.shape
        gram = torch.zeros(d, d, dtype=torch.float64, device=w.device)
        mean = torch.zeros(d, dtype=torch.float64, device=w.device)
        for a in range(0, vocab, vocab_chunk):
            u = u_all[a : a + vocab_chunk].to(torch.float64)
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


def select_candidates(
    norm: np.ndarray, logit_var: np.ndarray, *, q: float = 0.25, n: int = 10
) -> tuple[np.ndarray, np.ndarray]:
    """(top-norm neurons, candidates): the ceil(q * d_mlp) neurons of largest norm (at least ``n``), then the
    ``n`` of those with the smallest logit variance, in ascending variance. Ties go to the lower index."""
    norm = np.asarray(norm, dtype=np.float64)
    var = np.asarray(logit_var, dtype=np.float64)
    if norm.shape != var.shape or norm.ndim != 1:
        raise ValueError(f"norm {norm.shape} and logit_var {var.shape} must be one vector each of the same length")
    if not 0 < q <= 1:
        raise ValueError(f"q must be a fraction in (0, 1], got {q}")
    if not 1 <= n <= len(norm):
        raise ValueError(f"n must be between 1 and the number of neurons ({len(norm)}), got {n}")
    k = max(n, math.ceil(q * len(norm)))
    idx = np.arange(len(norm))
    top = np.lexsort((idx, -norm))[:k]
    cand = top[np.lexsort((top, var[top]))][:n]
    return np.sort(top), cand


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


def entropy_neurons(lm: LoadedModel, *, q: float = 0.25, n: int = 10, layer: int = -1) -> EntropyNeurons:
    norm, var = neuron_stats(lm, layer=layer)
    top, cand = select_candidates(norm, var, q=q, n=n)
    return EntropyNeurons(layer % lm.adapter.n_layers, norm, var, top, cand, q, n)


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
    sa = set(np.asarray(a.candidates if isinstance(a, EntropyNeurons) else a).tolist())
    sb = set(np.asarray(b.candidates if isinstance(b, EntropyNeurons) else b).tolist())
    union = sa | sb
    return len(sa & sb) / len(union) if union else float("nan")


def norm_matched_controls(
    norm: np.ndarray, candidates: np.ndarray, *, draws: int = 5, nearest: int = 5, seed: int = 0
) -> list[np.ndarray]:
    """``draws`` random neuron sets, each matching the candidates one for one in norm: for every candidate, one
    of the ``nearest`` non-candidate neurons closest to it in norm (not already taken in that draw)."""
    rng = np.random.default_rng(seed)
    cand = set(np.asarray(candidates).tolist())
    pool = np.array([i for i in range(len(norm)) if i not in cand])
    if len(pool) < len(cand):
        raise ValueError(f"only {len(pool)} non-candidate neurons to match {len(cand)} candidates")
    out = []
    for _ in range(draws):
        taken: set[int] = set()
        pick = []
        for c in sorted(cand, key=lambda i: -norm[i]):
            free = np.array([i for i in pool if i not in taken])
            near = free[np.argsort(np.abs(norm[free] - norm[c]), kind="stable")[: max(1, nearest)]]
            j = int(rng.choice(near))
            taken.add(j)
            pick.append(j)
        out.append(np.array(sorted(pick)))
    return out


# =============================================================================================
# running the model


class NeuronMeanAblation(Intervention):
    """``mlp_act`` intervention: the given neurons' activations set to fixed values at every position."""

    def __init__(self, layer: int, neurons: np.ndarray | torch.Tensor, values: np.ndarray | torch.Tensor):
        super().__init__("mlp_act", int(layer), "add", vector=torch.zeros(1))  # kind is unused: apply() is ours
        self.kind = "mean_ablate"
        self.neurons = torch.as_tensor(np.asarray(neurons), dtype=torch.long)
        self.values = torch.as_tensor(np.asarray(values), dtype=torch.float32)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        out[..., self.neurons.to(x.device)] = self.values.to(device=x.device, dtype=x.dtype)
        return out


def _batches(lm: LoadedModel, texts: Sequence[str], token_budget: int):
    ids = tokenize(lm.tokenizer, texts, max_length=lm.adapter.max_positions)
    lengths = [len(x) for x in ids]
    pad = lm.tokenizer.pad_token_id
    for b in length_batches(lengths, range(len(ids)), token_budget):
        yield b, pad_batch([ids[i] for i in b], pad, side="right", device=lm.device)


def neuron_means(lm: LoadedModel, texts: Sequence[str], *, layer: int = -1, token_budget: int = 4096) -> np.ndarray:
    """Mean ``mlp_act`` of every neuron of ``layer`` over all real tokens of ``texts`` ([d_mlp], float64)."""
    layer = layer % lm.adapter.n_layers
    total = torch.zeros(lm.adapter.d_mlp, dtype=torch.float64)
    count = 0
    with torch.no_grad():
        for _, batch in _batches(lm, texts, token_budget):
            cap = Capture(("mlp_act",), (layer,))
            with hooks(lm.adapter, cap):
                lm.model(**batch, use_cache=False)
            m = batch["attention_mask"].bool()
            total += cap.acts[("mlp_act", layer)][m].double().sum(0).cpu()
            count += int(m.sum())
    return (total / max(1, count)).numpy()


def next_token_confidence(
    lm: LoadedModel,
    texts: Sequence[str],
    *,
    interventions: Sequence[Intervention] = (),
    token_budget: int = 4096,
) -> dict[str, np.ndarray]:
    """Entropy (nats) and maximum probability of the next-token distribution at every real token of ``texts``
    (in text order, flattened), with optional interventions installed."""
    ent: list[np.ndarray] = []
    mx: list[np.ndarray] = []
    order: list[int] = []
    with torch.no_grad():
        for b, batch in _batches(lm, texts, token_budget):
            with hooks(lm.adapter, None, interventions):
                logits = lm.model(**batch, use_cache=False).logits
            logp = torch.log_softmax(logits.double(), dim=-1)
            h = -(logp.exp() * logp).sum(-1)
            pmax = logp.max(-1).values.exp()
            m = batch["attention_mask"].bool()
            for r, i in enumerate(b):
                order.append(i)
                ent.append(h[r][m[r]].cpu().numpy())
                mx.append(pmax[r][m[r]].cpu().numpy())
    back = np.argsort(order)
    return {"entropy": np.concatenate([ent[j] for j in back]), "max_prob": np.concatenate([mx[j] for j in back])}


def _effect(base: dict[str, np.ndarray], abl: dict[str, np.ndarray]) -> dict[str, float]:
    out = {}
    for k in ("entropy", "max_prob"):
        d = abl[k] - base[k]
        out[f"{k}"] = float(abl[k].mean())
        out[f"delta_{k}"] = float(d.mean())
        out[f"delta_{k}_se"] = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else float("nan")
    return out


# =============================================================================================
# the study


def _default_texts() -> list[str]:
    import pandas as pd

    from mechdiff.zoo.paths import zoo_path

    facts = pd.read_csv(Path(zoo_path("data")) / "facts.csv", keep_default_na=False)
    return [f"{p} {a}." for p, a in zip(facts["prompt"], facts["answer"])]


def _load_texts(texts: Sequence[str] | str | Path | None, text_column: str | None, limit: int | None) -> list[str]:
    if texts is None:
        out = _default_texts()
    elif isinstance(texts, (str, Path)):
        from mechdiff.engine.data import load_prompts

        out = load_prompts(texts, text_column=text_column).texts
    else:
        out = [str(t) for t in texts]
    if not out:
        raise ValueError("the text set is empty")
    return out[:limit] if limit else out


def _scatter_figure(neurons: Mapping[str, EntropyNeurons], path: Path) -> Path:
    from mechdiff.report.plotting import MODEL_COLORS, new_figure, save_figure

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
    from mechdiff.report.plotting import new_figure, save_figure

    fig, ax = new_figure(width=1.2 + 1.1 * len(labels), height=0.8 + 0.5 * len(labels))
    ax.axis("off")
    cells = [[f"{v:.2f}" for v in row] for row in iou]
    table = ax.table(cellText=cells, rowLabels=labels, colLabels=labels, loc="center", cellLoc="center")
    table.scale(1.0, 1.4)
    ax.set_title("entropy-neuron candidates: IoU", fontsize=9)
    return save_figure(fig, path)


def run_confidence(
    group: ModelGroup,
    texts: Sequence[str] | str | Path | None,
    out_dir: str | Path,
    *,
    q: float = 0.25,
    n: int = 10,
    layer: int = -1,
    controls: int = 5,
    text_column: str | None = None,
    limit: int | None = None,
    seed: int = 0,
    device: str = "cpu",
    dtype: str = "float32",
    token_budget: int = 4096,
    models: Mapping[str, LoadedModel] | None = None,
    min_iou: float = 0.5,
) -> StudyResult:
    """The confidence study for a model group.

    Per model: last-layer neuron norms and logit variances, candidates (top ``q`` by norm, then the ``n`` of
    lowest variance), and the effect on next-token entropy / max probability over ``texts`` of mean-ablating
    the candidates vs ``controls`` draws of norm-matched random neurons. Between models: IoU of candidate sets
    (one architecture required). ``texts``: strings, a prompt file (CSV/JSON/JSONL, see
    ``engine.data.load_prompts``), or None for the zoo's fact sentences.
    Writes ``out_dir/confidence/{results.zarr, summary.json, *.png}``.
    """
    t0 = time.perf_counter()
    labels = list(group.labels)
    text_list = _load_texts(texts, text_column, limit)
    if models is None:
        from mechdiff.engine.models import load_model

        models = {lab: load_model(p, device=device, dtype=dtype) for lab, p in group.models.items()}
    missing = [lab for lab in labels if lab not in models]
    if missing:
        raise ValueError(f"no loaded model for label(s) {', '.join(missing)}")
    for lab in labels[1:]:
        check_same_architecture(models[labels[0]], models[lab])

    neurons = {lab: entropy_neurons(models[lab], q=q, n=n, layer=layer) for lab in labels}
    iou = np.array([[candidate_iou(neurons[a], neurons[b]) for b in labels] for a in labels])

    conditions = ["baseline", "candidates", "control"]
    stats = {k: np.full((len(labels), len(conditions)), np.nan) for k in ("entropy", "max_prob")}
    deltas = {k: np.full((len(labels), 2), np.nan) for k in ("entropy", "max_prob")}
    delta_spread = {k: np.full((len(labels), 2), np.nan) for k in ("entropy", "max_prob")}
    per_model: dict[str, Any] = {}
    control_sets: dict[str, list[list[int]]] = {}
    for mi, lab in enumerate(labels):
        lm, en = models[lab], neurons[lab]
        means = neuron_means(lm, text_list, layer=en.layer, token_budget=token_budget)
        base = next_token_confidence(lm, text_list, token_budget=token_budget)
        cand = next_token_confidence(
            lm, text_list, token_budget=token_budget,
            interventions=[NeuronMeanAblation(en.layer, en.candidates, means[en.candidates])])
        ctrl_sets = norm_matched_controls(en.norm, en.candidates, draws=controls, seed=seed + mi)
        control_sets[lab] = [c.tolist() for c in ctrl_sets]
        ctrl = [
            _effect(base, next_token_confidence(
                lm, text_list, token_budget=token_budget,
                interventions=[NeuronMeanAblation(en.layer, c, means[c])]))
            for c in ctrl_sets
        ]
        ce = _effect(base, cand)
        per_model[lab] = {
            "model": lm.model_id,
            "layer": en.layer,
            "candidates": en.candidates.tolist(),
            "candidate_norm": en.norm[en.candidates].tolist(),
            "candidate_logit_var": en.logit_var[en.candidates].tolist(),
            "median_norm": float(np.median(en.norm)),
            "median_logit_var": float(np.median(en.logit_var)),
            "n_tokens": int(len(base["entropy"])),
            "baseline": {"entropy": float(base["entropy"].mean()), "max_prob": float(base["max_prob"].mean())},
            "ablate_candidates": ce,
            "ablate_control": {
                k: float(np.mean([c[k] for c in ctrl]))
                for k in ("entropy", "max_prob", "delta_entropy", "delta_max_prob")
            } | {
                f"{k}_spread": float(np.std([c[k] for c in ctrl], ddof=1)) if len(ctrl) > 1 else float("nan")
                for k in ("delta_entropy", "delta_max_prob")
            },
        }
        for k in ("entropy", "max_prob"):
            stats[k][mi] = [base[k].mean(), ce[k], per_model[lab]["ablate_control"][k]]
            deltas[k][mi] = [ce[f"delta_{k}"], per_model[lab]["ablate_control"][f"delta_{k}"]]
            delta_spread[k][mi] = [ce[f"delta_{k}_se"], per_model[lab]["ablate_control"][f"delta_{k}_spread"]]

    d_mlp = len(neurons[labels[0]].norm)  # one architecture, checked above

    def flags(which: str) -> np.ndarray:
        return np.stack([np.isin(np.arange(d_mlp), getattr(neurons[lab], which)) for lab in labels])

    data = xr.Dataset(
        {
            "norm": (("model", "neuron"), np.stack([neurons[lab].norm for lab in labels])),
            "logit_var": (("model", "neuron"), np.stack([neurons[lab].logit_var for lab in labels])),
            "is_candidate": (("model", "neuron"), flags("candidates")),
            "is_top_norm": (("model", "neuron"), flags("top_norm")),
            "iou": (("model", "model_b"), iou),
            "entropy": (("model", "condition"), stats["entropy"]),
            "max_prob": (("model", "condition"), stats["max_prob"]),
            "delta_entropy": (("model", "ablation"), deltas["entropy"]),
            "delta_max_prob": (("model", "ablation"), deltas["max_prob"]),
            "delta_entropy_spread": (("model", "ablation"), delta_spread["entropy"]),
            "delta_max_prob_spread": (("model", "ablation"), delta_spread["max_prob"]),
        },
        coords={"model": labels, "model_b": labels, "neuron": np.arange(d_mlp), "condition": conditions,
                "ablation": ["candidates", "control"]},
        attrs={"study": "confidence", "q": q, "n": n, "controls": controls},
    )
    summary: dict[str, Any] = {
        "models": {lab: models[lab].model_id for lab in labels},
        "n_texts": len(text_list),
        "q": q,
        "n": n,
        "controls": controls,
        "per_model": per_model,
        "control_sets": control_sets,
        "iou": {f"{a} vs {b}": float(iou[labels.index(a), labels.index(b)]) for a, b in group.pairs},
        "confidence_change": {
            f"{a} vs {b}": {
                "entropy": [per_model[a]["baseline"]["entropy"], per_model[b]["baseline"]["entropy"]],
                "max_prob": [per_model[a]["baseline"]["max_prob"], per_model[b]["baseline"]["max_prob"]],
            }
            for a, b in group.pairs
        },
    }
    findings = []
    for a, b in group.pairs:
        v = float(iou[labels.index(a), labels.index(b)])
        pa, pb = per_model[a], per_model[b]
        figs = {
            "iou": v,
            f"delta_entropy_{a}": pa["ablate_candidates"]["delta_entropy"],
            f"delta_entropy_{a}_control": pa["ablate_control"]["delta_entropy"],
            f"delta_entropy_{b}": pb["ablate_candidates"]["delta_entropy"],
            f"delta_entropy_{b}_control": pb["ablate_control"]["delta_entropy"],
            f"entropy_{a}": pa["baseline"]["entropy"],
            f"entropy_{b}": pb["baseline"]["entropy"],
        }
        if not np.isfinite(v):
            verdict, reason = "inconclusive", "candidate IoU undefined (no candidates in either model)"
        elif v >= min_iou:
            verdict, reason = "agrees", f"candidate IoU {v:.2f} >= {min_iou}"
        else:
            verdict, reason = "disagrees", f"candidate IoU {v:.2f} < {min_iou}"
        findings.append(Finding(
            "entropy neurons shared", f"{a} vs {b}", figs, verdict,
            f"candidate IoU {v:.2f} (agreement: >= {min_iou}); mean-ablating the candidates changes entropy by "
            f"{figs[f'delta_entropy_{a}']:+.4f} nats in {a} (control {figs[f'delta_entropy_{a}_control']:+.4f}) and "
            f"{figs[f'delta_entropy_{b}']:+.4f} in {b} (control {figs[f'delta_entropy_{b}_control']:+.4f}); baseline "
            f"entropy {figs[f'entropy_{a}']:.3f} -> {figs[f'entropy_{b}']:.3f}",
            reason=reason,
            controls={f"delta_entropy_{a}_control": figs[f"delta_entropy_{a}_control"],
                      f"delta_entropy_{b}_control": figs[f"delta_entropy_{b}_control"]},
        ))
    d = Path(out_dir) / "confidence"
    figures = {
        "scatter": _scatter_figure(neurons, d / "norm_vs_logit_var.png"),
        "iou": _iou_figure(labels, iou, d / "iou_table.png"),
    }
    summary["seconds"] = time.perf_counter() - t0
    result = StudyResult("confidence", data, summary, figures, findings)
    result.save(out_dir)
    return result
