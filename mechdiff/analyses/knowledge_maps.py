"""Statistics of knowledge-patching heatmaps (layer x role slot, mean over pairs), their same-run controls and the
knowledge study's verdict.

Everything here is plain numpy over per-pair slot heatmaps ``x`` [pair, layer, slot] (NaN where a pair lacks a
slot), a ``keep`` mask [pair] (the pairs a model separates), the ``topics`` of the pairs (resamples and splits stay
within topics) and the role of each slot. Seeds make every control reproducible: the same ``seed`` draws the same
bootstrap resamples, split halves and permutations for every comparison of a run.

* :func:`compare_maps`: the correlation of two models' mean heatmaps, its bootstrap interval over pairs, the
  permuted-map null (layers permuted within each slot, slots within each role) and each map's split-half
  reliability (Spearman-Brown corrected), whose geometric mean is the ceiling a correlation can reach;
* :func:`transfer_check`: the cross-model effect relative to the target's own, with its interval;
* :func:`separation`: whether a model tells the true prompts from the false ones at all;
* :func:`binned_difference` / :func:`max_abs_by_role`: the paper's 20-bin difference heatmap and its largest
  change per token group;
* :func:`knowledge_verdict`: the rule that turns these into agrees / disagrees / inconclusive.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from mechdiff.analyses.directions import _strata
from mechdiff.errors import MechdiffError

__all__ = [
    "MapError",
    "KnowledgeControls",
    "MapComparison",
    "CrossCheck",
    "Separation",
    "pearson",
    "mean_maps",
    "permutation_null",
    "split_half_reliability",
    "compare_maps",
    "transfer_check",
    "separation",
    "binned_map",
    "binned_difference",
    "max_abs_by_role",
    "knowledge_verdict",
]


class MapError(MechdiffError, ValueError):
    """Heatmaps or settings that the controls cannot use (shapes that do not match, bad counts)."""


@dataclass(frozen=True)
class KnowledgeControls:
    """Controls of the knowledge study's verdict and the thresholds of its rule (see :func:`knowledge_verdict`)."""

    n_permutations: int = 200  # seeded permuted maps: the chance correlation of two maps with this structure
    null_quantile: float = 0.95  # the null's bound is this quantile of the permuted correlations
    n_bootstrap: int = 200  # seeded resamples of the pairs (within topic): 95% intervals
    n_splits: int = 10  # seeded split halves of the pairs per map: split-half reliability
    seed: int = 0
    ceiling_tolerance: float = 0.1  # agrees only when the correlation >= ceiling - this; disagrees when its
    # interval lies entirely below ceiling - this
    min_pairs: int = 6  # pairs a model must separate (both halves of a split need some)
    min_transfer: float = 0.5  # cross-model effect at least this fraction of the target's own
    n_bins: int = 20  # the paper's binned difference heatmap

    def __post_init__(self) -> None:
        for name in ("n_permutations", "n_bootstrap", "n_splits"):
            if int(getattr(self, name)) < 1:
                raise MapError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0 < self.null_quantile < 1:
            raise MapError(f"null_quantile must lie in (0, 1), got {self.null_quantile}")
        if self.ceiling_tolerance < 0:
            raise MapError(f"ceiling_tolerance must be >= 0, got {self.ceiling_tolerance}")
        if self.min_pairs < 4:
            raise MapError(f"min_pairs must be at least 4 (two per split half), got {self.min_pairs}")
        if self.n_bins < 2:
            raise MapError(f"n_bins must be at least 2, got {self.n_bins}")


@dataclass(frozen=True)
class MapComparison:
    """Correlation of two mean heatmaps with its controls (from :func:`compare_maps`)."""

    correlation: float
    interval: tuple[float, float]  # bootstrap 95% over pairs
    null_upper: float  # permuted-map null, ``null_quantile`` quantile
    null_mean: float
    reliability: tuple[float, float]  # split-half (Spearman-Brown) reliability of map a, of map b
    ceiling: float  # geometric mean of the two reliabilities
    n_kept: tuple[int, int]


@dataclass(frozen=True)
class CrossCheck:
    """Cross-model patching against the target's own: map correlation with its controls, and effect ratio."""

    comparison: MapComparison  # a = the cross run's map, b = the target's own
    transfer: float
    transfer_interval: tuple[float, float]


@dataclass(frozen=True)
class Separation:
    """Does a model tell the pairs apart? Logit gap (true run - false run) over every pair, and pairs kept."""

    n_pairs: int
    n_kept: int
    mean_gap: float
    interval: tuple[float, float]


# ---------------------------------------------------------------------------------------------- correlation


def _rows_pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of each row of ``a`` with the matching row of ``b`` (broadcast), over the entries
    finite in both; NaN where fewer than 3 or no variance."""
    a, b = np.broadcast_arrays(np.atleast_2d(np.asarray(a, np.float64)), np.atleast_2d(np.asarray(b, np.float64)))
    ok = np.isfinite(a) & np.isfinite(b)
    n = ok.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        ma = np.where(ok, a, 0).sum(1) / n
        mb = np.where(ok, b, 0).sum(1) / n
        da = np.where(ok, a - ma[:, None], 0)
        db = np.where(ok, b - mb[:, None], 0)
        den = np.sqrt((da * da).sum(1) * (db * db).sum(1))
        r = (da * db).sum(1) / den
    return np.where((n >= 3) & (den > 0), r, np.nan)


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation over the entries finite in both (NaN if fewer than 3 or no variance)."""
    return float(_rows_pearson(np.ravel(a), np.ravel(b))[0])


# ---------------------------------------------------------------------------------------------- maps


def _check(x: np.ndarray, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x, dtype=np.float64)
    keep = np.asarray(keep, dtype=bool)
    if x.ndim != 3 or keep.shape != (x.shape[0],):
        raise MapError(f"slot heatmaps must be [pair, layer, slot] with a keep mask [pair], got {x.shape} and "
                       f"{keep.shape}")
    return x, keep


def mean_maps(x: np.ndarray, keep: np.ndarray, counts: np.ndarray | None = None) -> np.ndarray:
    """Mean heatmaps [k, layer, slot] over the kept pairs, each pair counted ``counts`` [k, pair] times (default:
    once, k = 1); NaN where no counted pair has the slot."""
    x, keep = _check(x, keep)
    w = (np.ones((1, x.shape[0])) if counts is None else np.asarray(counts, np.float64)) * keep[None]
    fin = np.isfinite(x)
    num = np.einsum("kp,pls->kls", w, np.where(fin, x, 0.0))
    den = np.einsum("kp,pls->kls", w, fin.astype(np.float64))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / den, np.nan)


def _bootstrap_counts(topics: np.ndarray, n_bootstrap: int, rng: np.random.Generator) -> np.ndarray:
    """[n_bootstrap, pair] multiplicities of resamples drawn within each topic."""
    n = len(topics)
    counts = np.zeros((n_bootstrap, n))
    for idx in _strata(np.zeros(n, dtype=bool), np.asarray(topics)):
        counts[:, idx] = rng.multinomial(idx.size, np.full(idx.size, 1.0 / idx.size), size=n_bootstrap)
    return counts


def _halves(topics: np.ndarray, n_splits: int, rng: np.random.Generator) -> np.ndarray:
    """[n_splits, pair] True for the first half of each random split, halving every topic."""
    n = len(topics)
    out = np.zeros((n_splits, n), dtype=bool)
    for s in range(n_splits):
        for idx in _strata(np.zeros(n, dtype=bool), np.asarray(topics)):
            p = rng.permutation(idx)
            out[s, p[: (idx.size + int(rng.integers(2))) // 2]] = True  # odd topics: the spare pair either side
    return out


def _rngs(seed: int) -> tuple[np.random.Generator, ...]:
    # one independent stream per control, so changing one control's size leaves the others' draws alone
    return tuple(np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3))


def _interval(values: np.ndarray) -> tuple[float, float]:
    v = values[np.isfinite(values)]
    if v.size == 0:
        return math.nan, math.nan
    lo, hi = np.quantile(v, [0.025, 0.975])
    return float(lo), float(hi)


def permutation_null(a_map: np.ndarray, b_map: np.ndarray, slot_roles: Sequence[str], n: int,
                     rng: np.random.Generator) -> np.ndarray:
    """Correlations of ``a_map`` with ``n`` permutations of ``b_map`` [layer, slot]: slots permuted within each
    role, then layers permuted independently within each slot. What two maps give by chance when one keeps the
    other's values per token group but not where in depth and within the group they sit."""
    b_map = np.asarray(b_map, np.float64)
    roles = np.asarray(slot_roles)
    if roles.shape != (b_map.shape[1],) or np.shape(a_map) != b_map.shape:
        raise MapError(f"maps {np.shape(a_map)} / {b_map.shape} and {roles.shape} slot roles do not match")
    groups = [np.flatnonzero(roles == g) for g in dict.fromkeys(roles.tolist())]
    n_layer, n_slot = b_map.shape
    out = np.empty((n, n_layer * n_slot))
    for i in range(n):
        cols = np.arange(n_slot)
        for g in groups:
            cols[g] = rng.permutation(g)
        layer_order = np.argsort(rng.random((n_layer, n_slot)), axis=0)
        out[i] = np.take_along_axis(b_map[:, cols], layer_order, axis=0).ravel()
    return _rows_pearson(out, np.ravel(a_map)[None])


def split_half_reliability(x: np.ndarray, keep: np.ndarray, halves: np.ndarray) -> float:
    """Spearman-Brown corrected correlation (2r / (1 + r)) between the mean maps of two halves of the pairs,
    r averaged over the splits ``halves`` [split, pair]: how well a map of this many pairs reproduces itself."""
    m1 = mean_maps(x, keep, halves.astype(np.float64))
    m2 = mean_maps(x, keep, (~halves).astype(np.float64))
    r = _rows_pearson(m1.reshape(len(halves), -1), m2.reshape(len(halves), -1))
    if not np.isfinite(r).any():
        return math.nan
    r = float(np.nanmean(r))
    return 2 * r / (1 + r) if r > 0 else r


def compare_maps(x_a: np.ndarray, keep_a: np.ndarray, x_b: np.ndarray, keep_b: np.ndarray,
                 slot_roles: Sequence[str], topics: Sequence[str],
                 settings: KnowledgeControls = KnowledgeControls()) -> MapComparison:
    """Correlation of the mean heatmaps of the same pairs in two runs, with its controls (see the module doc):
    the bootstrap resamples the pairs, the same resample for both runs."""
    x_a, keep_a = _check(x_a, keep_a)
    x_b, keep_b = _check(x_b, keep_b)
    topics = np.asarray(topics)
    if x_a.shape != x_b.shape or topics.shape != (x_a.shape[0],):
        raise MapError(f"the two runs' heatmaps {x_a.shape} / {x_b.shape} and {topics.shape} topics do not match")
    r_boot, r_split, r_null = _rngs(settings.seed)
    a, b = mean_maps(x_a, keep_a)[0], mean_maps(x_b, keep_b)[0]
    counts = _bootstrap_counts(topics, settings.n_bootstrap, r_boot)
    k = settings.n_bootstrap
    boot = _rows_pearson(mean_maps(x_a, keep_a, counts).reshape(k, -1), mean_maps(x_b, keep_b, counts).reshape(k, -1))
    null = permutation_null(a, b, slot_roles, settings.n_permutations, r_null)
    halves = _halves(topics, settings.n_splits, r_split)
    rel = (split_half_reliability(x_a, keep_a, halves), split_half_reliability(x_b, keep_b, halves))
    ceiling = math.sqrt(rel[0] * rel[1]) if min(rel) > 0 else float(min(rel))
    fin = null[np.isfinite(null)]
    return MapComparison(
        correlation=pearson(a, b),
        interval=_interval(boot),
        null_upper=float(np.quantile(fin, settings.null_quantile)) if fin.size else math.nan,
        null_mean=float(fin.mean()) if fin.size else math.nan,
        reliability=rel,
        ceiling=ceiling,
        n_kept=(int(keep_a.sum()), int(keep_b.sum())),
    )


def _mass(maps: np.ndarray, cols: np.ndarray) -> np.ndarray:
    return np.nansum(maps[..., cols], axis=(-2, -1))


def transfer_check(x_cross: np.ndarray, keep_cross: np.ndarray, x_own: np.ndarray, keep_own: np.ndarray,
                   slot_roles: Sequence[str], topics: Sequence[str],
                   settings: KnowledgeControls = KnowledgeControls()) -> CrossCheck:
    """Cross-model patching (``x_cross``: the source's activations patched into the target) against the target's
    own patching: :func:`compare_maps` of the two maps, and the transfer -- the cross map's summed effect over the
    statement's slots (all but the context) relative to the own map's -- with its bootstrap interval."""
    comp = compare_maps(x_cross, keep_cross, x_own, keep_own, slot_roles, topics, settings)
    cols = np.flatnonzero(np.asarray(slot_roles) != "context")
    counts = _bootstrap_counts(np.asarray(topics), settings.n_bootstrap, _rngs(settings.seed)[0])
    with np.errstate(invalid="ignore", divide="ignore"):
        point = _mass(mean_maps(x_cross, keep_cross), cols) / _mass(mean_maps(x_own, keep_own), cols)
        boot = _mass(mean_maps(x_cross, keep_cross, counts), cols) / _mass(mean_maps(x_own, keep_own, counts), cols)
    return CrossCheck(comp, float(point[0]), _interval(boot))


def separation(gap: np.ndarray, keep: np.ndarray, topics: Sequence[str],
               settings: KnowledgeControls = KnowledgeControls()) -> Separation:
    """The mean logit gap (true run - false run) over every pair with its bootstrap interval, and the pairs kept."""
    gap = np.asarray(gap, np.float64)
    counts = _bootstrap_counts(np.asarray(topics), settings.n_bootstrap, _rngs(settings.seed)[0])
    boot = counts @ gap / counts.sum(1)
    return Separation(len(gap), int(np.asarray(keep, bool).sum()), float(gap.mean()), _interval(boot))


# ---------------------------------------------------------------------------------------------- the paper's figure


def binned_map(m: np.ndarray, n_bins: int = 20) -> np.ndarray:
    """A mean heatmap rescaled to [0, 1] over its finite cells (min to max) and cut into ``n_bins`` equal bins,
    each cell the centre of its bin: the paper's normalisation before the difference heatmap (maps of models
    with different effect scales become comparable; differences smaller than a bin vanish)."""
    m = np.asarray(m, np.float64)
    fin = np.isfinite(m)
    if not fin.any():
        return np.full_like(m, np.nan)
    lo, hi = float(m[fin].min()), float(m[fin].max())
    scaled = (m - lo) / (hi - lo) if hi > lo else np.zeros_like(m)
    k = np.clip(np.floor(scaled * n_bins), 0, n_bins - 1)
    return np.where(fin, (k + 0.5) / n_bins, np.nan)


def binned_difference(a: np.ndarray, b: np.ndarray, n_bins: int = 20) -> np.ndarray:
    """``binned_map(b) - binned_map(a)``: steps of 1 / ``n_bins``."""
    return binned_map(b, n_bins) - binned_map(a, n_bins)


def max_abs_by_role(diff: np.ndarray, slot_roles: Sequence[str]) -> dict[str, float]:
    """Largest |difference| over the cells of each token group (role) of a [layer, slot] map; NaN where none."""
    d = np.abs(np.asarray(diff, np.float64))
    roles = np.asarray(slot_roles)
    out = {}
    for role in dict.fromkeys(roles.tolist()):
        v = d[:, roles == role]
        out[role] = float(np.nanmax(v)) if np.isfinite(v).any() else math.nan
    return out


# ---------------------------------------------------------------------------------------------- the verdict


def _ci(lo_hi: tuple[float, float]) -> str:
    return f"95% CI [{lo_hi[0]:.2f}, {lo_hi[1]:.2f}]"


def knowledge_verdict(
    comparison: MapComparison,
    *,
    separated: Mapping[str, Separation],
    control: float | None = None,
    cross: Mapping[str, CrossCheck] | None = None,
    names: tuple[str, str] = ("base", "post"),
    settings: KnowledgeControls = KnowledgeControls(),
) -> tuple[str, str]:
    """(verdict, reason) for "knowledge storage unchanged" from the base-vs-post heatmap comparison and its
    controls. In order:

    1. a model that does not separate the pairs (fewer than ``min_pairs`` kept, or its mean logit gap's interval
       not above 0: e.g. a random-init model): ``inconclusive``, patching has no effect to locate;
    2. an undefined number: ``inconclusive``;
    3. a map that does not reproduce itself (split-half reliability not above the permuted null's bound):
       ``inconclusive``, the maps carry no signal;
    4. the correlation's interval entirely below ceiling - ``ceiling_tolerance`` (both maps reliable):
       ``disagrees``, storage moved; likewise a cross-model run whose map correlation interval lies below its null
       or whose transfer interval lies below ``min_transfer``: ``disagrees``, cross-model patching fails;
    5. ``inconclusive`` when the correlation's interval is not above the unrelated ``control`` model's correlation
       with base (where given), or not above the permuted null, or a cross-model run is not clearly working;
    6. ``agrees`` when the correlation is within ``ceiling_tolerance`` of the ceiling; else ``inconclusive``.

    ``separated``: model -> :class:`Separation`; ``control``: the unrelated model's heatmap correlation with base;
    ``cross``: cross run name -> :class:`CrossCheck`; ``names``: the two compared models, as in ``comparison``.
    """
    cross = dict(cross or {})
    weak = [f"{m} ({s.n_kept} of {s.n_pairs} pairs kept; mean logit gap true - false run {s.mean_gap:.3g}, 95% CI "
            f"[{s.interval[0]:.3g}, {s.interval[1]:.3g}])"
            for m, s in separated.items()
            if not (s.n_kept >= settings.min_pairs and s.interval[0] > 0)]
    if weak:
        return "inconclusive", (f"the model does not tell the pairs apart, so patching has no effect to locate: "
                                f"{', '.join(weak)}; needs >= {settings.min_pairs} kept pairs and a gap interval above 0")
    c = comparison
    lo, hi = c.interval
    nums = [c.correlation, lo, hi, c.null_upper, c.ceiling, *c.reliability]
    for x in cross.values():
        nums += [x.comparison.correlation, *x.comparison.interval, x.comparison.null_upper, x.transfer,
                 *x.transfer_interval]
    what = f"heatmap correlation {c.correlation:.3f} ({_ci(c.interval)})"
    null = f"permuted-map null bound {c.null_upper:.2f}"
    if not all(math.isfinite(v) for v in nums) or (control is not None and not math.isfinite(control)):
        return "inconclusive", f"{what}, {null}, ceiling {c.ceiling:.2f}, control {control}: a number is undefined"
    unreliable = [f"{name} {r:.2f}" for name, r in zip(names, c.reliability) if not r > c.null_upper]
    if unreliable:
        return "inconclusive", (f"split-half reliability of the {' and '.join(unreliable)} map not above the {null}: "
                                "the maps carry no signal")
    bar = c.ceiling - settings.ceiling_tolerance
    if hi < bar:
        return "disagrees", (f"{what} entirely below the split-half ceiling {c.ceiling:.2f} - "
                             f"{settings.ceiling_tolerance:g}, with reliable maps in {' and '.join(names)}: storage moved")
    for name, x in cross.items():
        xc = x.comparison
        if xc.interval[1] < xc.null_upper or x.transfer_interval[1] < settings.min_transfer:
            return "disagrees", (f"cross-model patching {name} fails: map correlation {xc.correlation:.2f} "
                                 f"({_ci(xc.interval)}, null bound {xc.null_upper:.2f}), effect {x.transfer:.2f}x "
                                 f"({_ci(x.transfer_interval)}) of the target's own (needs {settings.min_transfer:g}x)")
    if control is not None and not lo > control:
        return "inconclusive", f"{what} not above the unrelated control model's correlation with {names[0]} {control:.3f}"
    if not lo > c.null_upper:
        return "inconclusive", f"{what} overlaps the {null}"
    for name, x in cross.items():
        xc = x.comparison
        if not (xc.interval[0] > xc.null_upper and x.transfer >= settings.min_transfer):
            return "inconclusive", (f"cross-model patching {name} unclear: map correlation {xc.correlation:.2f} "
                                    f"({_ci(xc.interval)}, null bound {xc.null_upper:.2f}), effect {x.transfer:.2f}x "
                                    f"of the target's own (needs {settings.min_transfer:g}x)")
    ctl = f", above the control model's {control:.3f}" if control is not None else ""
    xs = "; cross-model patching " + ", ".join(
        f"{n} correlation {x.comparison.correlation:.2f}, effect {x.transfer:.2f}x" for n, x in cross.items()) \
        if cross else ""
    if c.correlation >= bar:
        return "agrees", (f"{what} above the {null}{ctl} and within {settings.ceiling_tolerance:g} of the split-half "
                          f"ceiling {c.ceiling:.2f}{xs}")
    return "inconclusive", (f"{what} above the {null}{ctl} but more than {settings.ceiling_tolerance:g} below the "
                            f"split-half ceiling {c.ceiling:.2f}: partly moved")
