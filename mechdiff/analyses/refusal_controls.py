"""The refusal finding's controls and its verdict, as pure functions of measurements made in one run.

"The refusal direction is not shared between base and post-trained models" can fail three ways that a single
cosine hides:

- a model that does not refuse has no refusal direction to compare, only a difference of means;
- a direction that does not lower its own model's refusal when ablated is not shown to be a refusal direction;
- base and post-trained models are usually prompted under different templates, and the template alone moves
  the direction (the same model under two templates can give a low cosine).

So each model must refuse (harmful prompts refused more often than harmless ones, the difference's bootstrap
interval above 0), its own direction must lower its refusal (the paired drop's interval above 0), and the
directions are compared *template-matched* (both models under one template, for each of the two templates) as
well as under their own templates. Each comparison is placed against two same-run controls from
:func:`~mechdiff.analyses.directions.direction_controls`: the shuffled-label null (what two directions without
a refusal contrast give) and the split-half ceiling (what identical directions reach through the sampling
noise of this many prompts).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

__all__ = [
    "Rate",
    "Comparison",
    "rate_difference",
    "classify",
    "refusal_verdict",
    "CEILING_TOLERANCE",
]

#: How far below the split-half ceiling a cosine may lie and still count as the same direction (as for truth).
CEILING_TOLERANCE = 0.1


@dataclass(frozen=True)
class Rate:
    """A difference of refusal rates with its bootstrap 95% interval (``n``: prompts per side)."""

    value: float
    low: float
    high: float
    n: int

    @property
    def positive(self) -> bool:
        """The interval lies above 0."""
        return math.isfinite(self.low) and self.low > 0

    def text(self) -> str:
        return f"{self.value:+.2f} (95% CI [{self.low:+.2f}, {self.high:+.2f}], n={self.n})"


def rate_difference(a: np.ndarray, b: np.ndarray, *, paired: bool, n_bootstrap: int = 1000, seed: int = 0) -> Rate:
    """mean(a) - mean(b) of 0/1 refusal flags, with a seeded bootstrap 95% interval. ``paired``: a and b are the
    same prompts under two conditions (resampled together); otherwise two independent prompt sets."""
    a = np.asarray(a, dtype=np.float64).reshape(-1)
    b = np.asarray(b, dtype=np.float64).reshape(-1)
    if a.size == 0 or b.size == 0:
        raise ValueError("rate_difference needs flags on both sides")
    if paired and a.size != b.size:
        raise ValueError(f"paired flags differ in length: {a.size} vs {b.size}")
    rng = np.random.default_rng(seed)
    if paired:
        idx = rng.integers(0, a.size, size=(n_bootstrap, a.size))
        boot = (a[idx] - b[idx]).mean(1)
    else:
        boot = a[rng.integers(0, a.size, size=(n_bootstrap, a.size))].mean(1) - b[
            rng.integers(0, b.size, size=(n_bootstrap, b.size))].mean(1)
    lo, hi = np.quantile(boot, [0.025, 0.975])
    return Rate(float(a.mean() - b.mean()), float(lo), float(hi), int(min(a.size, b.size)))


@dataclass(frozen=True)
class Comparison:
    """One cosine between two refusal directions and its same-run controls.

    ``what``: e.g. "under base's template"; ``cosine`` and ``interval`` (bootstrap over prompts, the same
    resample in both); ``null_upper``: the shuffled-label null's 95% bound; ``ceiling``: the split-half
    ceiling; ``where``: the (layer, position) compared."""

    what: str
    cosine: float
    interval: tuple[float, float]
    null_upper: float
    ceiling: float
    where: str = ""

    @classmethod
    def from_controls(cls, what: str, c: Mapping[str, Any], where: str = "") -> "Comparison":
        """From :func:`~mechdiff.analyses.directions.direction_controls`' output."""
        return cls(what, float(c["cosine"]), (float(c["interval"][0]), float(c["interval"][1])),
                   float(c["null_upper"]), float(c["ceiling"]), where)

    @property
    def status(self) -> str:
        return classify(self)

    def text(self) -> str:
        lo, hi = self.interval
        return (f"{self.what}: cosine {self.cosine:.2f} [{lo:.2f}, {hi:.2f}] (null {self.null_upper:.2f}, "
                f"ceiling {self.ceiling:.2f})")


def classify(c: Comparison, tolerance: float = CEILING_TOLERANCE) -> str:
    """``shared``: the interval clears the null and the cosine is within ``tolerance`` of the ceiling;
    ``differs``: the whole interval lies more than ``tolerance`` below the ceiling, and the ceiling itself
    stands clear of the null (else noise alone could explain a low cosine); ``undecided`` otherwise."""
    lo, hi = c.interval
    if not all(math.isfinite(v) for v in (c.cosine, lo, hi, c.null_upper, c.ceiling)):
        return "undecided"
    near = c.ceiling - tolerance
    if lo > c.null_upper and c.cosine >= near:
        return "shared"
    if hi < near and near > c.null_upper:
        return "differs"
    return "undecided"


def refusal_verdict(
    refuses: Mapping[str, Rate],
    own_drop: Mapping[str, Rate | None],
    matched: Mapping[str, Comparison],
    own: Comparison,
    *,
    tolerance: float = CEILING_TOLERANCE,
) -> tuple[str, str]:
    """(verdict, reason) for "refusal direction not shared". In order:

    1. a model that does not refuse (``refuses[m]``: harmful minus harmless refusal rate, interval not above 0):
       ``inconclusive``;
    2. a model whose own direction, ablated, does not lower its refusal (``own_drop[m]``: baseline minus
       ablated rate on the same harmful prompts, interval not above 0, or not measured): ``inconclusive``;
    3. the template-matched comparisons (``matched``: one per template, both models under it): all ``differs``
       -> ``agrees`` (the weights differ); all ``shared`` -> ``disagrees``, saying when the own-template
       comparison ``own`` differs, i.e. the difference comes from the template only; otherwise ``inconclusive``.
    """
    quiet = [f"{m} refuses harmful {r.text()} more often than harmless" for m, r in refuses.items() if not r.positive]
    if quiet:
        return "inconclusive", "no refusal to compare: " + "; ".join(quiet) + " (needs an interval above 0)"
    weak = [f"{m}'s own direction lowers its refusal by " + (d.text() if d is not None else "(not measured)")
            for m, d in own_drop.items() if d is None or not d.positive]
    if weak:
        return "inconclusive", "not shown to be refusal directions: " + "; ".join(weak)
    if not matched:
        raise ValueError("refusal_verdict needs at least one template-matched comparison")
    st = {k: classify(c, tolerance) for k, c in matched.items()}
    cmp = "; ".join(c.text() for c in matched.values())
    if all(s == "differs" for s in st.values()):
        return "agrees", f"template-matched directions differ ({cmp}): the difference is in the weights"
    if all(s == "shared" for s in st.values()):
        if classify(own, tolerance) != "shared":
            return "disagrees", (f"template-matched directions are shared ({cmp}); the own-template {own.text()} "
                                 "differs only because of the template")
        return "disagrees", f"shared under every template ({cmp}; own templates {own.text()})"
    return "inconclusive", f"template-matched comparisons disagree or cannot decide ({cmp})"
