"""The refusal verdict as a pure rule, on planted measurements whose answer is known by construction."""

from __future__ import annotations

import numpy as np
import pytest

from mechdiff.analyses.directions import direction_controls
from mechdiff.analyses.refusal_controls import Comparison, Rate, classify, rate_difference, refusal_verdict


def _acts(n=120, d=48, shift=None, seed=0, noise=1.0):
    rng = np.random.default_rng(seed)
    y = np.r_[np.ones(n // 2), np.zeros(n // 2)].astype(int)
    X = rng.normal(size=(n, d)) * noise
    if shift is not None:
        X += y[:, None] * shift
    return X, y


def _cmp(Xa, Xb, y, what="under base's template"):
    return Comparison.from_controls(what, direction_controls(Xa, Xb, y, n_bootstrap=300, seed=1))


def _unit(d, k):
    v = np.zeros(d)
    v[k] = 4.0
    return v


def test_rate_difference_is_the_mean_difference_with_a_bootstrap_interval():
    a = np.r_[np.ones(30), np.zeros(10)]
    b = np.zeros(40)
    r = rate_difference(a, b, paired=True, seed=0)
    assert r.value == pytest.approx(0.75) and r.low < 0.75 < r.high and r.positive
    z = rate_difference(np.zeros(40), np.zeros(40), paired=False)
    assert (z.value, z.low, z.high) == (0.0, 0.0, 0.0) and not z.positive
    with pytest.raises(ValueError, match="paired"):
        rate_difference(np.ones(3), np.ones(4), paired=True)


def test_classify_planted_directions():
    Xa, y = _acts(shift=_unit(48, 0))
    Xb, _ = _acts(shift=_unit(48, 0), seed=1)
    assert classify(_cmp(Xa, Xb, y)) == "shared"  # the same direction, independent noise
    Xc, _ = _acts(shift=_unit(48, 1), seed=2)
    assert classify(_cmp(Xa, Xc, y)) == "differs"  # orthogonal directions
    Xn, _ = _acts(seed=3)
    Xm, _ = _acts(seed=4)
    assert classify(_cmp(Xn, Xm, y)) == "undecided"  # no direction in either: the ceiling is noise


def test_verdict_rules():
    yes = Rate(0.8, 0.6, 0.95, 32)
    no = Rate(0.0, 0.0, 0.0, 32)
    Xa, y = _acts(shift=_unit(48, 0))
    Xb, _ = _acts(shift=_unit(48, 0), seed=1)
    Xc, _ = _acts(shift=_unit(48, 1), seed=2)
    shared, differs = _cmp(Xa, Xb, y), _cmp(Xa, Xc, y, "own templates")
    both = {"base": yes, "post": yes}
    drops = {"base": yes, "post": yes}
    # a model that never refuses: inconclusive whatever the cosines say
    v, why = refusal_verdict({"base": no, "post": yes}, drops, {"under base's template": differs}, differs)
    assert v == "inconclusive" and "base refuses" in why
    # a direction whose ablation does not lower its own model's refusal is not a refusal direction
    v, why = refusal_verdict(both, {"base": yes, "post": None}, {"u": differs}, differs)
    assert v == "inconclusive" and "post's own direction" in why
    # planted: different directions under one template -> agrees; the same -> disagrees
    assert refusal_verdict(both, drops, {"under base's template": differs}, differs)[0] == "agrees"
    assert refusal_verdict(both, drops, {"under base's template": shared}, shared)[0] == "disagrees"
    # shared when template-matched, different under own templates: the template did it, and the reason says so
    v, why = refusal_verdict(both, drops, {"under base's template": shared, "under post's template": shared}, differs)
    assert v == "disagrees" and "only because of the template" in why
    # the two templates disagree: inconclusive
    v, _ = refusal_verdict(both, drops, {"under base's template": shared, "under post's template": differs}, differs)
    assert v == "inconclusive"
