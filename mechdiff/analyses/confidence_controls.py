"""Confidence study: candidate selection, the controls every verdict is decided against, and the verdicts.

Pure functions over numpy arrays (no model here), so each rule is tested on planted numbers:

- :func:`select_candidates`: the top ``q`` of neurons by write norm, then the ``n`` of lowest logit variance;
- :func:`iou_stability`: the candidate IoU between two models and its range over perturbations of ``q``;
- :func:`iou_baselines`: what other neuron sets of the same size give between the same two models: the top-n by
  norm alone, the top-n by *highest* variance among the top-q by norm (extreme-ranked sets, which a short
  fine-tune preserves whatever they are), random n-sets from the top-q by norm, and random n-sets of all neurons;
- :func:`ablation_gate`: whether mean-ablating the candidates moves entropy more than norm-matched random sets do
  (only then are they entropy neurons);
- :func:`explained_fraction`: how much of the base -> post entropy change moves with the candidates' activations
  when they are patched from one model into the other, against norm-matched random sets;
- :func:`confidence_verdict`, :func:`explain_verdict`: the two findings' rules.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from mechdiff.errors import MechdiffError

__all__ = [
    "ConfidenceRule",
    "ControlInputError",
    "select_candidates",
    "top_norm_size",
    "set_iou",
    "IouStability",
    "iou_stability",
    "IouBaselines",
    "iou_baselines",
    "AblationGate",
    "ablation_gate",
    "ExplainedFraction",
    "explained_fraction",
    "confidence_verdict",
    "explain_verdict",
]


class ControlInputError(MechdiffError, ValueError):
    """Arrays given to a control do not fit together, or a setting is out of range."""


@dataclass(frozen=True)
class ConfidenceRule:
    """The verdicts' settings, fixed before any measurement.

    ``control_quantile``: the candidates' ablation effect must exceed this quantile of the norm-matched controls'
    (one-sided: an entropy neuron moves entropy *more*); ``min_controls``: fewer control draws than this cannot
    place that quantile, so the verdict is inconclusive; ``null_quantile``: the upper bound taken from the random
    n-sets drawn from the top-q by norm; ``explained_max``: the largest fraction of the confidence change that
    still counts as "not explained" (a quarter: the paper's claim is that entropy neurons are not the mechanism,
    so they may carry a minor share but not a major one).
    """

    control_quantile: float = 0.95
    min_controls: int = 20
    null_quantile: float = 0.95
    explained_max: float = 0.25

    def __post_init__(self) -> None:
        for name in ("control_quantile", "null_quantile"):
            v = getattr(self, name)
            if not 0 < v < 1:
                raise ControlInputError(f"{name} must be in (0, 1), got {v}")
        if self.min_controls < 1:
            raise ControlInputError(f"min_controls must be at least 1, got {self.min_controls}")
        if not 0 < self.explained_max < 1:
            raise ControlInputError(f"explained_max must be in (0, 1), got {self.explained_max}")


# =============================================================================================
# selection and overlap


def top_norm_size(d_mlp: int, q: float, n: int) -> int:
    """How many neurons the top-``q`` by norm keeps: ceil(q * d_mlp), at least ``n``."""
    return max(n, math.ceil(q * d_mlp))


def _top(score: np.ndarray, k: int, among: np.ndarray | None = None) -> np.ndarray:
    """The ``k`` indices (of ``among``, default all) with the largest ``score``, in rank order; ties go to the
    lower index, so a selection never depends on sort stability."""
    idx = np.arange(len(score)) if among is None else np.asarray(among)
    return idx[np.lexsort((idx, -score[idx]))][:k]


def select_candidates(
    norm: np.ndarray, logit_var: np.ndarray, *, q: float = 0.25, n: int = 10
) -> tuple[np.ndarray, np.ndarray]:
    """(top-norm neurons, candidates): the ceil(q * d_mlp) neurons of largest norm (at least ``n``), then the
    ``n`` of those with the smallest logit variance, in ascending variance. Ties go to the lower index."""
    norm = np.asarray(norm, dtype=np.float64)
    var = np.asarray(logit_var, dtype=np.float64)
    if norm.shape != var.shape or norm.ndim != 1:
        raise ControlInputError(f"norm {norm.shape} and logit_var {var.shape} must be one vector each of the same length")
    if not 0 < q <= 1:
        raise ControlInputError(f"q must be a fraction in (0, 1], got {q}")
    if not 1 <= n <= len(norm):
        raise ControlInputError(f"n must be between 1 and the number of neurons ({len(norm)}), got {n}")
    top = _top(norm, top_norm_size(len(norm), q, n))
    return np.sort(top), _top(-var, n, among=top)


def set_iou(a: Sequence[int] | np.ndarray, b: Sequence[int] | np.ndarray) -> float:
    """|A n B| / |A u B| of two index sets (NaN when both are empty)."""
    sa, sb = set(np.asarray(a).tolist()), set(np.asarray(b).tolist())
    union = sa | sb
    return len(sa & sb) / len(union) if union else float("nan")


def _check_pair(norm_a, var_a, norm_b, var_b) -> tuple[np.ndarray, ...]:
    arrs = [np.asarray(x, dtype=np.float64) for x in (norm_a, var_a, norm_b, var_b)]
    if len({x.shape for x in arrs}) != 1 or arrs[0].ndim != 1:
        raise ControlInputError(
            "norms and logit variances of the two models must be vectors of one length (one architecture), got "
            + ", ".join(str(x.shape) for x in arrs)
        )
    return tuple(arrs)


@dataclass
class IouStability:
    """The candidate IoU at ``q`` and its range over the perturbed fractions ``by_q`` (q -> IoU)."""

    iou: float
    low: float
    high: float
    by_q: dict[float, float]

    @property
    def interval(self) -> tuple[float, float]:
        return (self.low, self.high)


def iou_stability(
    norm_a: np.ndarray, var_a: np.ndarray, norm_b: np.ndarray, var_b: np.ndarray, *, q: float, n: int,
    factors: Sequence[float] = (0.5, 1.0, 1.5),
) -> IouStability:
    """Candidate IoU between two models at ``q`` and at ``factor * q`` (capped at 1) for each factor.

    The candidates are exact functions of the weights, so there is no sampling to bootstrap; what is arbitrary is
    the cut ``q``. The interval is the IoU's range over these cuts: an overlap that survives halving and
    enlarging the top-norm pool is a property of the models, one that does not is a property of the cut.
    """
    norm_a, var_a, norm_b, var_b = _check_pair(norm_a, var_a, norm_b, var_b)
    if not factors or any(f <= 0 for f in factors):
        raise ControlInputError(f"q factors must be positive, got {tuple(factors)}")
    qs = sorted({round(min(1.0, f * q), 12) for f in (*factors, 1.0)})  # rounded: 1.5 * 0.2 is 0.30000000000000004
    by_q = {
        qq: set_iou(select_candidates(norm_a, var_a, q=qq, n=n)[1], select_candidates(norm_b, var_b, q=qq, n=n)[1])
        for qq in qs
    }
    v = by_q[round(min(1.0, q), 12)]
    return IouStability(v, min(by_q.values()), max(by_q.values()), by_q)


@dataclass
class IouBaselines:
    """IoU between the two models of other neuron sets of the candidates' size ``n`` (same run, same weights).

    ``top_norm``: the top-n by norm; ``top_var``: the top-n by *highest* logit variance among the top-q by norm
    (the opposite of entropy neurons); ``random_top_norm_*``: mean and ``quantile`` quantile over ``draws`` random
    n-subsets of each model's top-q by norm (the null for the variance ranking, given the norms);
    ``random_all_*``: the same for random n-subsets of all neurons (overlap by chance alone).
    """

    top_norm: float
    top_var: float
    random_top_norm_mean: float
    random_top_norm_upper: float
    random_all_mean: float
    random_all_upper: float
    draws: int
    quantile: float

    @property
    def extreme(self) -> float:
        """The largest IoU an extreme-ranked set reaches: what the candidates must beat."""
        return max(self.top_norm, self.top_var)


def _random_set_iou(pool_a: np.ndarray, pool_b: np.ndarray, n: int, width: int, draws: int, rng) -> np.ndarray:
    """IoU of ``draws`` pairs of independent random n-subsets of ``pool_a`` and ``pool_b`` (indices < width)."""
    def pick(pool: np.ndarray) -> np.ndarray:
        chosen = pool[np.argsort(rng.random((draws, len(pool))), axis=1)[:, :n]]
        member = np.zeros((draws, width), dtype=bool)
        member[np.arange(draws)[:, None], chosen] = True
        return member

    inter = (pick(pool_a) & pick(pool_b)).sum(1)
    return inter / (2 * n - inter)


def iou_baselines(
    norm_a: np.ndarray, var_a: np.ndarray, norm_b: np.ndarray, var_b: np.ndarray, *, q: float, n: int,
    draws: int = 1000, quantile: float = 0.95, seed: int = 0,
) -> IouBaselines:
    """The IoU baselines of :class:`IouBaselines` for two models' neuron statistics (one architecture)."""
    norm_a, var_a, norm_b, var_b = _check_pair(norm_a, var_a, norm_b, var_b)
    if draws < 1:
        raise ControlInputError(f"draws must be at least 1, got {draws}")
    d = len(norm_a)
    top_a, _ = select_candidates(norm_a, var_a, q=q, n=n)  # validates q and n
    top_b, _ = select_candidates(norm_b, var_b, q=q, n=n)
    rng = np.random.default_rng(seed)
    near = _random_set_iou(top_a, top_b, n, d, draws, rng)
    chance = _random_set_iou(np.arange(d), np.arange(d), n, d, draws, rng)
    return IouBaselines(
        top_norm=set_iou(_top(norm_a, n), _top(norm_b, n)),
        top_var=set_iou(_top(var_a, n, among=top_a), _top(var_b, n, among=top_b)),
        random_top_norm_mean=float(near.mean()),
        random_top_norm_upper=float(np.quantile(near, quantile)),
        random_all_mean=float(chance.mean()),
        random_all_upper=float(np.quantile(chance, quantile)),
        draws=draws,
        quantile=quantile,
    )


# =============================================================================================
# are the candidates entropy neurons?


@dataclass
class AblationGate:
    """One model's candidates against its norm-matched controls: ``effect`` (the candidates' mean |delta entropy|
    per token under mean-ablation), the controls' mean and ``quantile`` quantile over ``draws`` seeded sets."""

    effect: float
    control_mean: float
    control_upper: float
    draws: int
    quantile: float

    @property
    def beats(self) -> bool:
        """The candidates move entropy more than the controls' upper quantile (False if anything is undefined)."""
        return bool(math.isfinite(self.effect) and math.isfinite(self.control_upper) and self.effect > self.control_upper)


def ablation_gate(effect: float, control_effects: Sequence[float] | np.ndarray, *, quantile: float = 0.95) -> AblationGate:
    """:class:`AblationGate` from the candidates' effect and one effect per control draw.

    Effects are magnitudes (mean |delta H| over tokens): a set of neurons can raise entropy on some tokens and
    lower it on others, which a signed mean would cancel; the test is one-sided because an entropy neuron is one
    that moves entropy more than a random neuron of its norm.
    """
    c = np.asarray(control_effects, dtype=np.float64)
    if c.ndim != 1 or c.size == 0:
        raise ControlInputError("the ablation gate needs at least one control effect")
    return AblationGate(float(effect), float(c.mean()), float(np.quantile(c, quantile)), int(c.size), quantile)


# =============================================================================================
# does the confidence change move with the candidates?


@dataclass
class ExplainedFraction:
    """How much of the entropy gap between a source and a destination model moves with patched neurons.

    ``fraction`` = mean(H_dst,patched - H_dst) / mean(H_src - H_dst) over all tokens (0: the patched neurons carry
    none of the gap, 1: all of it), with the 2.5/97.5% ``low``/``high`` of its bootstrap over texts; ``change`` =
    mean(H_src - H_dst) with its interval (the gap to explain); ``control``: the same fraction for each
    norm-matched random set, summarised by ``control_mean`` and ``control_upper`` (its ``quantile`` quantile).
    """

    fraction: float
    low: float
    high: float
    change: float
    change_low: float
    change_high: float
    control: list[float] = field(default_factory=list)
    control_mean: float = math.nan
    control_upper: float = math.nan
    quantile: float = 0.95

    @property
    def interval(self) -> tuple[float, float]:
        return (self.low, self.high)


def _per_text_sums(x: np.ndarray, text: np.ndarray, n_texts: int) -> np.ndarray:
    return np.bincount(text, weights=x, minlength=n_texts)


def explained_fraction(
    h_dst: np.ndarray,
    h_src: np.ndarray,
    h_patched: np.ndarray,
    text: np.ndarray,
    *,
    h_controls: Sequence[np.ndarray] = (),
    n_bootstrap: int = 200,
    quantile: float = 0.95,
    seed: int = 0,
) -> ExplainedFraction:
    """:class:`ExplainedFraction` from per-token entropies of the same tokens: ``h_dst`` (the destination model),
    ``h_src`` (the source model), ``h_patched`` (the destination with the neurons' activations taken from the
    source), ``h_controls`` (the same for each control set) and ``text`` (which text each token belongs to).

    The bootstrap resamples texts, not tokens: tokens of one text share a context and are not independent.
    """
    h_dst, h_src, h_patched = (np.asarray(x, dtype=np.float64) for x in (h_dst, h_src, h_patched))
    text = np.asarray(text)
    if not (h_dst.shape == h_src.shape == h_patched.shape == text.shape) or h_dst.ndim != 1:
        raise ControlInputError(
            f"per-token arrays must be vectors of one length: dst {h_dst.shape}, src {h_src.shape}, "
            f"patched {h_patched.shape}, text {text.shape}"
        )
    if h_dst.size == 0:
        raise ControlInputError("no tokens to compare")
    _, text = np.unique(text, return_inverse=True)
    n_texts = int(text.max()) + 1
    gap = _per_text_sums(h_src - h_dst, text, n_texts)
    moved = _per_text_sums(h_patched - h_dst, text, n_texts)
    tokens = np.bincount(text, minlength=n_texts).astype(np.float64)
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(n_texts, np.full(n_texts, 1.0 / n_texts), size=n_bootstrap).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        frac = moved.sum() / gap.sum()
        boot = (counts @ moved) / (counts @ gap)
        change_boot = (counts @ gap) / (counts @ tokens)
        ctrl = [float(_per_text_sums(np.asarray(h, np.float64) - h_dst, text, n_texts).sum() / gap.sum()) for h in h_controls]
    lo, hi = np.nanquantile(boot, [0.025, 0.975]) if np.isfinite(boot).any() else (math.nan, math.nan)
    clo, chi = np.quantile(change_boot, [0.025, 0.975])
    c = np.asarray(ctrl)
    return ExplainedFraction(
        fraction=float(frac), low=float(lo), high=float(hi),
        change=float(gap.sum() / tokens.sum()), change_low=float(clo), change_high=float(chi),
        control=ctrl,
        control_mean=float(c.mean()) if c.size else math.nan,
        control_upper=float(np.quantile(c, quantile)) if c.size and np.isfinite(c).all() else math.nan,
        quantile=quantile,
    )


# =============================================================================================
# the verdicts


def _gate_problems(gates: Mapping[str, AblationGate], rule: ConfidenceRule) -> str:
    """Why the candidates of some model cannot count as entropy neurons ('' if they count in every model)."""
    few = [f"{m} ({g.draws})" for m, g in gates.items() if g.draws < rule.min_controls]
    if few:
        return f"too few norm-matched control draws to place a {rule.control_quantile:g} quantile: {', '.join(few)}; need >= {rule.min_controls}"
    weak = [
        f"{m} (mean |dH| {g.effect:.4f} <= the controls' {g.quantile:g} quantile {g.control_upper:.4f})"
        for m, g in gates.items() if not g.beats
    ]
    if weak:
        return "the candidates are not entropy neurons in " + ", ".join(weak) + ": mean-ablating them moves entropy no more than norm-matched random neurons"
    return ""


def confidence_verdict(
    iou: IouStability,
    baselines: IouBaselines,
    gates: Mapping[str, AblationGate],
    rule: ConfidenceRule = ConfidenceRule(),
) -> tuple[str, str]:
    """(verdict, reason) for "entropy neurons shared" on one pair. In order:

    1. the candidates are not entropy neurons in some model (too few control draws, or their mean-ablation
       effect not above the norm-matched controls' ``control_quantile`` quantile): ``inconclusive``;
    2. a number undefined: ``inconclusive``;
    3. no candidate shared at any cut of ``q`` (interval high 0): ``disagrees``;
    4. the IoU's interval low above the random-from-top-norm null's upper bound, and above every extreme-ranked
       baseline (top-n by norm, top-n by highest variance) -- or equal to 1, complete overlap at every cut, which
       no set can exceed: ``agrees``;
    5. the interval high below the null's upper bound: ``disagrees`` (no more shared than random picks from the
       high-norm neurons, though both models have entropy neurons);
    6. otherwise ``inconclusive`` (above chance but no more shared than any extreme-ranked set, or overlapping
       the null).
    """
    why = _gate_problems(gates, rule)
    if why:
        return "inconclusive", why
    lo, hi = iou.interval
    what = f"candidate IoU {iou.iou:.2f} (range over q [{lo:.2f}, {hi:.2f}])"
    null = f"random-from-top-norm null upper {baselines.random_top_norm_upper:.2f}"
    extreme = f"top-n by norm {baselines.top_norm:.2f}, top-n by highest variance {baselines.top_var:.2f}"
    if not all(math.isfinite(v) for v in (iou.iou, lo, hi, baselines.random_top_norm_upper, baselines.extreme)):
        return "inconclusive", f"{what}, {null}, {extreme}: a number is undefined"
    if hi == 0:
        return "disagrees", f"{what}: no entropy neuron is shared at any cut, though both models have them"
    if lo > baselines.random_top_norm_upper and (lo > baselines.extreme or lo == 1.0):
        return "agrees", f"{what} above the {null} and the extreme-ranked baselines ({extreme}), entropy neurons in both models"
    if hi < baselines.random_top_norm_upper:
        return "disagrees", f"{what} below the {null}: no more shared than random high-norm neurons, though both models have entropy neurons"
    if lo > baselines.random_top_norm_upper:
        return "inconclusive", f"{what} above the {null} but not above the extreme-ranked baselines ({extreme}): any extreme-ranked set is this shared"
    return "inconclusive", f"{what} overlaps the {null}"


def explain_verdict(
    fractions: Mapping[str, ExplainedFraction],
    gates: Mapping[str, AblationGate],
    rule: ConfidenceRule = ConfidenceRule(),
) -> tuple[str, str]:
    """(verdict, reason) for "entropy neurons do not explain the confidence change" on one pair; ``fractions``:
    direction (e.g. "base->post") -> the fraction of the entropy change that moves with the candidates. In order:

    1. the candidates are not entropy neurons in some model: ``inconclusive`` (the claim is about entropy neurons);
    2. no direction, or the entropy change's interval includes 0: ``inconclusive`` (no change to explain);
    3. some direction's fraction interval low above ``explained_max`` and above its random-set control's upper
       quantile: ``disagrees`` (the candidates carry a major share, more than random neurons of their norm);
    4. every direction's fraction interval high below ``explained_max`` and its fraction not above its control's
       upper quantile: ``agrees``;
    5. otherwise ``inconclusive``.
    """
    why = _gate_problems(gates, rule)
    if why:
        return "inconclusive", why
    if not fractions:
        return "inconclusive", "no patching direction measured"
    parts = []
    for d, f in fractions.items():
        if not (f.change_low > 0 or f.change_high < 0):
            return "inconclusive", (
                f"no confidence change to explain ({d}): H_src - H_dst {f.change:+.4f} nats, 95% CI "
                f"[{f.change_low:+.4f}, {f.change_high:+.4f}] includes 0"
            )
        if not all(math.isfinite(v) for v in (f.fraction, f.low, f.high, f.control_upper)):
            return "inconclusive", f"{d}: fraction {f.fraction:.2f}, control upper {f.control_upper:.2f}: a number is undefined"
        parts.append(
            f"{d}: fraction {f.fraction:.2f} (95% CI [{f.low:.2f}, {f.high:.2f}]), random-set control "
            f"{f.control_mean:.2f} (upper {f.control_upper:.2f})"
        )
    what = "; ".join(parts)
    m = rule.explained_max
    if any(f.low > m and f.low > f.control_upper for f in fractions.values()):
        return "disagrees", f"{what}: the candidates carry more than {m:g} of the change, more than random neurons"
    if all(f.high < m and f.fraction <= f.control_upper for f in fractions.values()):
        return "agrees", f"{what}: under {m:g} of the change and not above random neurons of their norm"
    return "inconclusive", f"{what}: neither clearly under {m:g} and within the control nor clearly above both"
