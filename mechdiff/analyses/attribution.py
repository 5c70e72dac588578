"""How far an attribution-patching estimate can stand in for exact activation patching on a given model pair.

The estimates themselves (AtP, AtP*'s QK fix and GradDrop, integrated gradients) are
:func:`mechdiff.engine.patching.attribution_patching`; exact patching is
:func:`mechdiff.engine.patching.exact_patching`. :func:`attribution_agreement` measures how well an estimate
tracks exact patching (Pearson r per site and per run, with a bootstrap interval over pairs) and applies the rule
the report prints: reliable where r >= :data:`RELIABLE_R`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import xarray as xr

from mechdiff.engine.patching import AttributionError

__all__ = [
    "RELIABLE_R",
    "SiteAgreement",
    "AttributionAgreement",
    "attribution_agreement",
]

#: Pearson r against exact patching from which an attribution estimate counts as reliable.
RELIABLE_R = 0.8


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

    ``exact`` / ``attrib``: datasets in the layout of :func:`mechdiff.engine.patching.exact_patching`, with or
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
