"""Linear directions from activation stores: difference of means, cosines between models, 1-D probes.

Shared by the truthfulness and refusal studies. Directions are reduced from the dask-backed store chunk by
chunk into float64 *sums* (:class:`MeanDiffSums`), so that shards, processes or cluster workers can each
reduce their own part and the parts merge in any order. Means, the difference of means and centring are
derived from the sums only at the end.

Slots an example lacks (NaN in the store: a short example under ``all`` / ``post_instruction`` positions, or
a layer an array did not capture) are left out of both the sums and the counts, so every (layer, position)
is averaged over the examples that really have it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Hashable, Sequence

import numpy as np
import xarray as xr

__all__ = [
    "MeanDiffSums",
    "LazySums",
    "mean_diff_sums",
    "mean_difference",
    "unit",
    "cosine_by_layer",
    "cosine_matrix",
    "width_dim",
    "Probe",
    "best_threshold",
    "direction_controls",
    "ControlWeights",
    "control_weights",
    "weighted_row_sums",
    "GroupWeights",
    "group_means",
    "centre_by_group",
    "accuracy_interval",
]

_WIDTH_DIMS = ("hidden", "neuron")


def width_dim(x: xr.DataArray | xr.Dataset) -> str:
    """The feature dim of an activation array: ``hidden`` or ``neuron``."""
    dims = [d for d in _WIDTH_DIMS if d in x.dims]
    if len(dims) != 1:
        raise ValueError(f"expected exactly one of dims {_WIDTH_DIMS}, got dims {tuple(x.dims)}")
    return dims[0]


# ---------------------------------------------------------------------------------------------
# mergeable sums


@dataclass
class MeanDiffSums:
    """float64 sums of the positive and negative class, mergeable in any order.

    ``sum_pos`` / ``sum_neg``: [layer(, position), width], summed over every group. ``n_pos`` / ``n_neg``:
    examples in each class. ``count_pos`` / ``count_neg``: [layer(, position)] examples whose slot was present
    (== n when no slot is NaN). With centring, the per-group sums and counts are kept too (leading axis =
    ``groups``), because the group means are only known once every part has been merged.
    """

    sum_pos: np.ndarray
    sum_neg: np.ndarray
    n_pos: int
    n_neg: int
    count_pos: np.ndarray | None = None
    count_neg: np.ndarray | None = None
    dims: tuple[str, ...] = ()  # of sum_pos, e.g. ("layer", "position", "hidden")
    coords: dict[str, np.ndarray] = field(default_factory=dict)  # for dims above
    site: str = ""
    groups: tuple[Hashable, ...] = ()  # centring groups, () = no centring
    group_sum_pos: np.ndarray | None = None  # [group, layer(, position), width]
    group_sum_neg: np.ndarray | None = None
    group_count_pos: np.ndarray | None = None  # [group, layer(, position)]
    group_count_neg: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.sum_pos = np.asarray(self.sum_pos, dtype=np.float64)
        self.sum_neg = np.asarray(self.sum_neg, dtype=np.float64)
        if self.sum_pos.shape != self.sum_neg.shape:
            raise ValueError(f"sum_pos {self.sum_pos.shape} and sum_neg {self.sum_neg.shape} differ in shape")
        slot = self.sum_pos.shape[:-1]
        # Without explicit counts every slot is present in every example.
        if self.count_pos is None:
            self.count_pos = np.full(slot, float(self.n_pos))
        if self.count_neg is None:
            self.count_neg = np.full(slot, float(self.n_neg))
        self.count_pos = np.asarray(self.count_pos, dtype=np.float64)
        self.count_neg = np.asarray(self.count_neg, dtype=np.float64)
        if not self.dims:
            self.dims = tuple(f"dim_{i}" for i in range(self.sum_pos.ndim))

    # -- combining -----------------------------------------------------------------------------

    def merge(self, other: "MeanDiffSums") -> "MeanDiffSums":
        """The sums over both parts (e.g. two shards). Associative and commutative up to float64 rounding."""
        if self.sum_pos.shape != other.sum_pos.shape or self.dims != other.dims:
            raise ValueError(
                f"cannot merge sums of shape {self.sum_pos.shape} {self.dims} with {other.sum_pos.shape} {other.dims}"
            )
        for d, c in self.coords.items():
            oc = other.coords.get(d)
            if oc is not None and not np.array_equal(np.asarray(c), np.asarray(oc)):
                raise ValueError(f"cannot merge sums with different {d!r} coords")
        if bool(self.groups) != bool(other.groups):
            raise ValueError("cannot merge centred with uncentred sums (center_by must match)")
        out = MeanDiffSums(
            self.sum_pos + other.sum_pos,
            self.sum_neg + other.sum_neg,
            self.n_pos + other.n_pos,
            self.n_neg + other.n_neg,
            self.count_pos + other.count_pos,
            self.count_neg + other.count_neg,
            self.dims,
            dict(self.coords),
            self.site,
        )
        if self.groups:
            keys = list(dict.fromkeys([*self.groups, *other.groups]))
            shape = (len(keys), *self.sum_pos.shape)
            gsp, gsn = np.zeros(shape), np.zeros(shape)
            gcp, gcn = np.zeros(shape[:-1]), np.zeros(shape[:-1])
            for part in (self, other):
                idx = [keys.index(k) for k in part.groups]
                np.add.at(gsp, idx, part.group_sum_pos)
                np.add.at(gsn, idx, part.group_sum_neg)
                np.add.at(gcp, idx, part.group_count_pos)
                np.add.at(gcn, idx, part.group_count_neg)
            out.groups, out.group_sum_pos, out.group_sum_neg = tuple(keys), gsp, gsn
            out.group_count_pos, out.group_count_neg = gcp, gcn
        return out

    __add__ = merge

    def select_groups(self, keys: Sequence[Hashable], *, centred: bool | None = None) -> "MeanDiffSums":
        """The sums over the centring groups ``keys`` only (e.g. every topic but a held-out one), without
        re-reading the store. ``centred=False`` drops the per-group centring (plain difference of means over
        those groups); default: keep it as it was."""
        if not self.groups:
            raise ValueError("select_groups needs sums made with center_by")
        missing = [k for k in keys if k not in self.groups]
        if missing:
            raise KeyError(f"groups {missing} not in these sums (have {list(self.groups)})")
        idx = [self.groups.index(k) for k in keys]
        gsp, gsn = self.group_sum_pos[idx], self.group_sum_neg[idx]
        gcp, gcn = self.group_count_pos[idx], self.group_count_neg[idx]
        # n_pos / n_neg count examples; with NaN-free slots the slot counts equal them.
        n_pos, n_neg = int(round(gcp.max(initial=0, axis=tuple(range(1, gcp.ndim))).sum())), int(
            round(gcn.max(initial=0, axis=tuple(range(1, gcn.ndim))).sum())
        )
        out = MeanDiffSums(gsp.sum(0), gsn.sum(0), n_pos, n_neg, gcp.sum(0), gcn.sum(0), self.dims, dict(self.coords), self.site)
        if centred if centred is not None else True:
            out.groups = tuple(keys)
            out.group_sum_pos, out.group_sum_neg, out.group_count_pos, out.group_count_neg = gsp, gsn, gcp, gcn
        return out

    def uncentred(self) -> "MeanDiffSums":
        """The same sums without centring."""
        return MeanDiffSums(self.sum_pos, self.sum_neg, self.n_pos, self.n_neg, self.count_pos, self.count_neg, self.dims, dict(self.coords), self.site)

    # -- results -------------------------------------------------------------------------------

    @property
    def centred(self) -> bool:
        return bool(self.groups)

    def _group_mean_weighted(self, counts: np.ndarray) -> np.ndarray:
        """sum_g counts_g * mean_g, the amount centring removes from a class's sum."""
        total = self.group_count_pos + self.group_count_neg  # [G, slot]
        with np.errstate(invalid="ignore", divide="ignore"):
            mu = (self.group_sum_pos + self.group_sum_neg) / total[..., None]
        mu = np.where(total[..., None] > 0, mu, 0.0)
        return np.einsum("g...,g...w->...w", counts, mu)

    @property
    def mean_pos(self) -> np.ndarray:
        """Mean of the positive class per slot (centred per group when the sums were made with ``center_by``)."""
        s = self.sum_pos
        if self.centred:
            s = s - self._group_mean_weighted(self.group_count_pos)
        with np.errstate(invalid="ignore", divide="ignore"):
            return s / self.count_pos[..., None]

    @property
    def mean_neg(self) -> np.ndarray:
        s = self.sum_neg
        if self.centred:
            s = s - self._group_mean_weighted(self.group_count_neg)
        with np.errstate(invalid="ignore", divide="ignore"):
            return s / self.count_neg[..., None]

    @property
    def diff(self) -> np.ndarray:
        """mean_pos - mean_neg, [layer(, position), width]; NaN where a class has no example in a slot."""
        return self.mean_pos - self.mean_neg

    def to_dataarray(self, values: np.ndarray | None = None, name: str = "direction") -> xr.DataArray:
        """``values`` (default: :attr:`diff`) labelled with the store's dims and coords."""
        v = self.diff if values is None else values
        coords = {d: self.coords[d] for d in self.dims if d in self.coords}
        return xr.DataArray(v, dims=self.dims, coords=coords, name=name)


# ---------------------------------------------------------------------------------------------
# reduction from a store


def _column(ds: xr.Dataset, name: str, what: str) -> np.ndarray:
    if name not in ds.coords and name not in ds.data_vars:
        from mechdiff.analyses.common import StoreRequirementError

        where = ds.attrs.get("group") or ds.attrs.get("dataset") or "store"
        cols = sorted(str(k) for k in ds.coords if ds[k].dims == ("example",) and k != "example")
        raise StoreRequirementError(
            f"{where} has no {name!r} column for the {what} (columns: {', '.join(cols) or 'none'}); "
            f"extract from a dataset with a {name!r} column"
        )
    return np.asarray(ds[name].values)


def _resolve_rows(rows: np.ndarray | Sequence[int] | None, n: int) -> np.ndarray:
    if rows is None:
        return np.ones(n, dtype=bool)
    r = np.asarray(rows)
    if r.dtype == bool:
        if r.shape != (n,):
            raise ValueError(f"boolean rows mask has shape {r.shape}, the store has {n} examples")
        return r
    if r.dtype.kind not in "iu":
        raise TypeError(f"rows must be example indices or a boolean mask, got dtype {r.dtype}")
    if r.size and (r.min() < 0 or r.max() >= n):
        raise IndexError(f"rows out of range 0..{n - 1}")
    mask = np.zeros(n, dtype=bool)
    mask[r] = True
    return mask


def _block_sums(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """One chunk: ``x`` [e, *slot, width] (any float), ``w`` [e, K] one-hot float64 ->
    [1, K, *slot, width + 1]: the float64 sums per column of ``w``, with the count of present slots as the
    extra last entry. Each row belongs to at most one column, so this is one pass over the chunk (plain
    reductions, no BLAS: BLAS would add per-thread buffers and pairwise summation is the more accurate)."""
    slot_shape = x.shape[1:-1]
    out = np.zeros((1, w.shape[1], *slot_shape, x.shape[-1] + 1), dtype=np.float64)
    used = w.any(axis=1)
    col = np.argmax(w, axis=1)
    for k in np.unique(col[used]):
        rows = x[used & (col == k)].astype(np.float64)  # float16 -> float64 before summing
        valid = np.isfinite(rows).all(axis=-1)  # a slot is present only if its whole vector is
        rows[~valid] = 0.0
        out[0, k, ..., :-1] = rows.sum(axis=0)
        out[0, k, ..., -1] = valid.sum(axis=0)
    return out


def mean_diff_sums(
    ds: xr.Dataset,
    site: str,
    labels: np.ndarray | str,
    *,
    positive: Any = 1,
    negative: Any = None,
    rows: np.ndarray | Sequence[int] | None = None,
    center_by: str | np.ndarray | None = None,
    layers: Sequence[int] | None = None,
    compute: bool = True,
    split_every: int | None = 8,
) -> MeanDiffSums | LazySums:
    """float64 sums of ``ds[site]`` over the positive and negative rows, reduced lazily with dask.

    ``labels``: a column name of the store or an array over all examples. Positive rows have ``labels ==
    positive``; negative rows ``labels == negative`` (default: every other selected row). ``rows``: example
    indices or a boolean mask restricting the rows (e.g. a training split). ``center_by``: a column name (or
    array) whose values define groups (topic, dataset) centred separately before the difference.
    ``layers``: restrict to these layers.

    Each zarr chunk is read once, cast to float64 and multiplied by a one-hot [example, class x group] matrix;
    the per-chunk partial sums are added in a tree (``split_every`` at a time), so memory stays at a few chunks
    whatever the store size. ``compute=False`` returns the lazy dask array of the reduction instead, for the
    caller to compute together with others: ``dask.compute(*[l.total for l in lazies])`` then ``l.finish(value)``.
    """
    import dask.array as da

    if site not in ds.data_vars:
        from mechdiff.analyses.common import StoreRequirementError

        where = ds.attrs.get("group") or ds.attrs.get("dataset") or "store"
        raise StoreRequirementError(
            f"{where} has no {site!r} activations ({', '.join(map(str, ds.data_vars)) or 'none'}); extract with --sites {site}"
        )
    arr = ds[site]
    if layers is not None:
        arr = arr.sel(layer=list(layers))
    n = arr.sizes["example"]
    lab = _column(ds, labels, "labels") if isinstance(labels, str) else np.asarray(labels)
    if lab.shape != (n,):
        raise ValueError(f"labels have shape {lab.shape}, the store has {n} examples")
    sel = _resolve_rows(rows, n)
    pos = sel & (lab == positive)
    neg = sel & ((lab != positive) if negative is None else (lab == negative))
    if not pos.any() or not neg.any():
        raise ValueError(
            f"{site}: {int(pos.sum())} positive (== {positive!r}) and {int(neg.sum())} negative rows selected; both classes need rows"
        )

    if center_by is None:
        gid = np.zeros(n, dtype=np.int64)
        keys: tuple = ()
        n_groups = 1
    else:
        g = _column(ds, center_by, "centring groups") if isinstance(center_by, str) else np.asarray(center_by)
        if g.shape != (n,):
            raise ValueError(f"center_by values have shape {g.shape}, the store has {n} examples")
        g = np.asarray([v.item() if isinstance(v, np.generic) else v for v in g], dtype=object)
        used = sel & (pos | neg)
        keys = tuple(dict.fromkeys(g[used].tolist()))  # groups in order of first appearance
        lookup = {k: i for i, k in enumerate(keys)}
        gid = np.asarray([lookup.get(v, 0) for v in g.tolist()], dtype=np.int64)
        n_groups = len(keys)

    # Columns: 2*g = positive rows of group g, 2*g + 1 = negative rows.
    K = 2 * n_groups
    w = np.zeros((n, K), dtype=np.float64)
    w[pos, 2 * gid[pos]] = 1.0
    w[neg, 2 * gid[neg] + 1] = 1.0

    x = arr.data
    if not isinstance(x, da.Array):
        x = da.from_array(np.asarray(x), chunks=(min(n, 256), *x.shape[1:]))
    if x.numblocks[-1] != 1:
        x = x.rechunk({x.ndim - 1: -1})  # the count column needs the whole width in one block
    wd = da.from_array(w, chunks=(x.chunks[0], K))
    mid = "abcdfghijlmnopqrstuvxyz"[: x.ndim - 2]
    parts = da.blockwise(
        _block_sums,
        "e" + "k" + mid + "w",
        x,
        "e" + mid + "w",
        wd,
        "ek",
        adjust_chunks={"e": 1, "w": lambda c: c + 1},
        dtype=np.float64,
        concatenate=True,
        meta=np.empty((0,) * (x.ndim + 1), dtype=np.float64),
    )
    total = parts.sum(axis=0, split_every=split_every)  # [K, *slot, width + 1]
    meta = dict(
        dims=tuple(d for d in arr.dims if d != "example"),
        coords={d: np.asarray(arr[d].values) for d in arr.dims if d != "example" and d in arr.coords},
        site=site,
        keys=keys,
        n_pos=int(pos.sum()),
        n_neg=int(neg.sum()),
    )
    if not compute:
        return LazySums(total, meta)
    return _finish(total.compute(), meta)


@dataclass
class LazySums:
    """A reduction not yet computed (``mean_diff_sums(..., compute=False)``): compute several in one dask pass with
    ``dask.compute(*[l.total for l in lazies])``, then ``l.finish(value)`` gives each :class:`MeanDiffSums`."""

    total: Any
    meta: dict

    def finish(self, value: np.ndarray) -> MeanDiffSums:
        return _finish(value, self.meta)


def _finish(total: np.ndarray, meta: dict) -> MeanDiffSums:
    sums, counts = total[..., :-1], total[..., -1]
    gsp, gsn = sums[0::2], sums[1::2]
    gcp, gcn = counts[0::2], counts[1::2]
    out = MeanDiffSums(
        gsp.sum(axis=0),
        gsn.sum(axis=0),
        meta["n_pos"],
        meta["n_neg"],
        gcp.sum(axis=0),
        gcn.sum(axis=0),
        meta["dims"],
        meta["coords"],
        meta["site"],
    )
    if meta["keys"]:
        out.groups = meta["keys"]
        out.group_sum_pos, out.group_sum_neg = gsp, gsn
        out.group_count_pos, out.group_count_neg = gcp, gcn
    return out


def mean_difference(
    ds: xr.Dataset,
    site: str,
    labels: np.ndarray | str,
    *,
    positive: Any = 1,
    negative: Any = None,
    rows: np.ndarray | Sequence[int] | None = None,
    center_by: str | np.ndarray | None = None,
    unit: bool = False,
    layers: Sequence[int] | None = None,
) -> xr.DataArray:
    """Difference of means (positive minus negative) per layer (and position), float64.

    ``unit=False``: the mean-difference-scaled vector (its norm is the distance between the class means);
    ``unit=True``: normalised along the width dim. dims: (layer[, position], hidden|neuron).
    """
    s = mean_diff_sums(ds, site, labels, positive=positive, negative=negative, rows=rows, center_by=center_by, layers=layers)
    d = s.to_dataarray(name=f"{site}_direction")
    d.attrs.update(site=site, n_pos=s.n_pos, n_neg=s.n_neg, centred_by=str(center_by) if center_by is not None else "")
    return _unit(d) if unit else d


# ---------------------------------------------------------------------------------------------
# cosines


def unit(x: xr.DataArray, dim: str | None = "hidden") -> xr.DataArray:
    """``x`` divided by its norm along ``dim`` (``None``: the width dim it has). Zero vectors stay zero."""
    return _unit(x, dim)


def _unit(x: xr.DataArray, dim: str | None = None) -> xr.DataArray:
    if dim is None or dim not in x.dims:
        dim = width_dim(x)
    norm = np.sqrt((x.astype(np.float64) ** 2).sum(dim))
    out = x / norm.where(norm > 0, 1.0)
    out.attrs = dict(x.attrs)
    return out


def cosine_by_layer(a: xr.DataArray, b: xr.DataArray) -> xr.DataArray:
    """Cosine similarity of ``a`` and ``b`` per layer (and position if both have one), on their common layers."""
    da_ = width_dim(a)
    if width_dim(b) != da_ or a.sizes[da_] != b.sizes[da_]:
        raise ValueError(f"directions differ in width: {dict(a.sizes)} vs {dict(b.sizes)}")
    a, b = xr.align(_unit(a).drop_vars(da_, errors="ignore"), _unit(b).drop_vars(da_, errors="ignore"), join="inner")
    out = (a * b).sum(da_)
    out.name = "cosine"
    return out


def cosine_matrix(a: xr.DataArray, b: xr.DataArray) -> xr.DataArray:
    """Cosine of ``a`` at every layer with ``b`` at every layer: dims (layer_a, layer_b[, position])."""
    dim = width_dim(a)
    if width_dim(b) != dim or a.sizes[dim] != b.sizes[dim]:
        raise ValueError(f"directions differ in width: {dict(a.sizes)} vs {dict(b.sizes)}")
    ua = _unit(a).drop_vars(dim, errors="ignore").rename(layer="layer_a")
    ub = _unit(b).drop_vars(dim, errors="ignore").rename(layer="layer_b")
    out = xr.dot(ua, ub, dim=dim)
    order = ["layer_a", "layer_b"] + [d for d in out.dims if d not in ("layer_a", "layer_b")]
    out = out.transpose(*order)
    out.name = "cosine"
    return out


# ---------------------------------------------------------------------------------------------
# 1-D probe


def best_threshold(scores: np.ndarray, y: np.ndarray, sign: int = 1) -> tuple[float, float]:
    """The threshold t maximising the accuracy of ``predict 1 iff sign * (score - t) > 0``; (t, accuracy).

    Candidates are midpoints between consecutive distinct scores (and one step beyond each end), so the
    chosen t never sits on a training score. Ties in accuracy take the middle candidate of the best run.
    """
    s = np.asarray(scores, dtype=np.float64) * sign
    y = np.asarray(y).astype(bool)
    if s.ndim != 1 or s.shape != y.shape or s.size == 0:
        raise ValueError(f"scores {s.shape} and labels {y.shape} must be equal-length 1-D and non-empty")
    u = np.unique(s)
    span = (u[-1] - u[0]) if u.size > 1 else 1.0
    cands = np.concatenate([[u[0] - 0.5 * span - 1e-12], (u[:-1] + u[1:]) / 2, [u[-1] + 0.5 * span + 1e-12]])
    # positives above t: count of positive scores > t; negatives at or below t.
    sp, sn = np.sort(s[y]), np.sort(s[~y])
    pos_above = sp.size - np.searchsorted(sp, cands, side="right")
    neg_below = np.searchsorted(sn, cands, side="right")
    acc = (pos_above + neg_below) / s.size
    best = np.flatnonzero(acc == acc.max())
    # the longest run of best candidates is contiguous in practice; take its middle for a margin
    i = best[len(best) // 2]
    return float(cands[i] * sign), float(acc[i])


@dataclass
class Probe:
    """A 1-D linear probe: predict the positive class iff ``sign * (X @ direction - threshold) > 0``."""

    direction: np.ndarray
    threshold: float
    sign: int = 1

    def __post_init__(self) -> None:
        self.direction = np.asarray(self.direction, dtype=np.float64).ravel()
        if self.sign not in (1, -1):
            raise ValueError(f"sign must be 1 or -1, got {self.sign}")

    @classmethod
    def fit(
        cls,
        X: np.ndarray,
        y: np.ndarray,
        direction: np.ndarray | None = None,
        *,
        method: str = "mean_diff",
        fit_sign: bool = False,
        l2: float = 1e-3,
    ) -> "Probe":
        """Fit on rows ``X`` [n, width] with binary labels ``y`` (1 = positive).

        ``method="mean_diff"``: project on ``direction`` (default: the difference of class means of ``X``) and
        choose the best threshold. ``method="logistic"``: an L2-regularised logistic regression on ``X`` gives
        the direction and threshold (``direction`` must be None). ``fit_sign``: also try the flipped orientation
        (for a given direction whose orientation is unknown); by default the direction points to the positive class.
        """
        X, y = _check_xy(X, y)
        if method == "logistic":
            if direction is not None:
                raise ValueError("method='logistic' fits its own direction; pass direction=None")
            wv, b = _logistic(X, y, l2)
            return cls(wv, float(-b), 1)
        if method != "mean_diff":
            raise ValueError(f"unknown probe method {method!r}: mean_diff or logistic")
        if direction is None:
            direction = X[y].mean(axis=0) - X[~y].mean(axis=0)
        d = np.asarray(direction, dtype=np.float64).ravel()
        if d.shape[0] != X.shape[1]:
            raise ValueError(f"direction has width {d.shape[0]}, X has {X.shape[1]} columns")
        s = X @ d
        t, acc = best_threshold(s, y, 1)
        sign = 1
        if fit_sign:
            t2, acc2 = best_threshold(s, y, -1)
            if acc2 > acc:
                t, sign = t2, -1
        return cls(d, t, sign)

    def refit_threshold(self, X: np.ndarray, y: np.ndarray) -> "Probe":
        """The same direction and orientation with the threshold refitted on ``X``, ``y`` (e.g. another model)."""
        X, y = _check_xy(X, y, width=self.direction.shape[0])
        t, _ = best_threshold(X @ self.direction, y, self.sign)
        return Probe(self.direction.copy(), t, self.sign)

    def scores(self, X: np.ndarray) -> np.ndarray:
        X = np.asarray(X, dtype=np.float64)
        if X.ndim != 2 or X.shape[1] != self.direction.shape[0]:
            raise ValueError(f"X must be [n, {self.direction.shape[0]}], got {X.shape}")
        return X @ self.direction

    def predict(self, X: np.ndarray) -> np.ndarray:
        """1 for the positive class, 0 otherwise."""
        return (self.sign * (self.scores(X) - self.threshold) > 0).astype(np.int64)

    def accuracy(self, X: np.ndarray, y: np.ndarray) -> float:
        X, y = _check_xy(X, y, width=self.direction.shape[0])
        return float((self.predict(X).astype(bool) == y).mean())


def _check_xy(X: np.ndarray, y: np.ndarray, width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y)
    if X.ndim != 2 or y.shape != (X.shape[0],):
        raise ValueError(f"X must be [n, width] and y [n], got {X.shape} and {y.shape}")
    if width is not None and X.shape[1] != width:
        raise ValueError(f"X has {X.shape[1]} columns, the probe direction {width}")
    if not np.isfinite(X).all():
        raise ValueError("X has NaN/inf rows (slots the examples lack): select present rows first")
    vals = set(np.unique(y).tolist())
    if not vals <= {0, 1, True, False}:
        raise ValueError(f"labels must be 0/1, got values {sorted(vals)[:5]}")
    y = y.astype(bool)
    if y.all() or (~y).all():
        raise ValueError("both classes need rows")
    return X, y


def _logistic(X: np.ndarray, y: np.ndarray, l2: float) -> tuple[np.ndarray, float]:
    from scipy.optimize import minimize

    # Standardise for conditioning, then map the weights back to raw coordinates.
    mu, sd = X.mean(axis=0), X.std(axis=0)
    sd = np.where(sd > 0, sd, 1.0)
    Z = (X - mu) / sd
    t = y.astype(np.float64)
    n, p = Z.shape

    def f(theta: np.ndarray) -> tuple[float, np.ndarray]:
        w, b = theta[:p], theta[p]
        z = Z @ w + b
        loss = np.mean(np.logaddexp(0.0, z) - t * z) + 0.5 * l2 * (w @ w)
        g = 1.0 / (1.0 + np.exp(-z)) - t
        return loss, np.concatenate([Z.T @ g / n + l2 * w, [g.mean()]])

    res = minimize(f, np.zeros(p + 1), jac=True, method="L-BFGS-B")
    w, b = res.x[:p] / sd, res.x[p] - (res.x[:p] / sd) @ mu
    return w, float(b)


# ---------------------------------------------------------------------------------------------
# controls for a cross-model direction comparison (shared by the truthfulness and refusal studies)


def _strata(y: np.ndarray, groups: np.ndarray) -> list[np.ndarray]:
    """Row indices of each (group, label) cell: resampling and splitting within cells keeps every class's count."""
    keys = list(dict.fromkeys(zip(groups.tolist(), y.tolist())))
    return [np.flatnonzero((groups == g) & (y == l)) for g, l in keys]


def _row_cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    na, nb = np.linalg.norm(a, axis=-1), np.linalg.norm(b, axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.einsum("kw,kw->k", a, b) / (na * nb)


def _count_dtype(n: int) -> np.dtype:
    """The smallest unsigned dtype that holds every multiplicity a resample of ``n`` rows can give."""
    return np.dtype(np.uint16) if n < 2**16 else np.dtype(np.uint32)


@dataclass
class ControlWeights:
    """Every direction the controls compare, as compact per-row multiplicities and labels (no [k, n] float64
    matrix): ``rows(lo, hi)`` builds the float64 weights of examples lo..hi only, so the products with the
    activations can be reduced chunk by chunk. Memory: about ``n * (n_bootstrap * 2 + 2 * n_null + n_splits)``
    bytes (``* 4`` per bootstrap row past 65535 rows), whatever the width.

    Row order (``K`` rows): the full direction, ``n_bootstrap`` resamples, ``n_null`` shuffles for model a,
    ``n_null`` for model b, ``n_splits`` first halves, ``n_splits`` second halves. Each row's weights are
    ``c * l / n_pos - c * (1 - l) / n_neg`` (``c`` multiplicity, ``l`` label): its product with X is the
    difference of class means of the rows it counts.
    """

    y: np.ndarray  # bool [n]
    counts: np.ndarray  # unsigned [n_bootstrap, n]: bootstrap multiplicities
    null_a: np.ndarray  # bool [n_null, n]: labels shuffled within each cell, for model a
    null_b: np.ndarray  # bool [n_null, n]: another shuffle, for model b
    halves: np.ndarray  # bool [n_splits, n]: the first half of each split (the second is its complement)
    n_pos: np.ndarray = field(init=False)  # float64 [K]: the counted positive rows of each weight row
    n_neg: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        y = self.y
        # integer sums, exact: the same normalisers as the sums of a [k, n] float64 matrix
        cy, cn = self.counts[:, y].sum(1, dtype=np.int64), self.counts[:, ~y].sum(1, dtype=np.int64)
        ny, nn = int(y.sum()), int((~y).sum())
        hy = self.halves[:, y].sum(1, dtype=np.int64)
        hn = self.halves[:, ~y].sum(1, dtype=np.int64)
        n_pos = np.concatenate([[ny], cy, self.null_a.sum(1), self.null_b.sum(1), hy, ny - hy]).astype(np.float64)
        n_neg = np.concatenate([[nn], cn, (~self.null_a).sum(1), (~self.null_b).sum(1), hn, nn - hn]).astype(np.float64)
        self.n_pos, self.n_neg = np.maximum(n_pos, 1e-300), np.maximum(n_neg, 1e-300)

    @property
    def n(self) -> int:
        return int(self.y.shape[0])

    @property
    def n_rows(self) -> int:
        return 1 + self.counts.shape[0] + 2 * self.null_a.shape[0] + 2 * self.halves.shape[0]

    def parts(self) -> dict[str, slice]:
        """Where each kind of row lies among the ``K`` rows."""
        b, m, s = self.counts.shape[0], self.null_a.shape[0], self.halves.shape[0]
        edges = np.cumsum([0, 1, b, m, m, s, s])
        names = ("full", "bootstrap", "null_a", "null_b", "half1", "half2")
        return {k: slice(int(edges[i]), int(edges[i + 1])) for i, k in enumerate(names)}

    def rows(self, lo: int = 0, hi: int | None = None) -> np.ndarray:
        """The float64 weights [K, hi - lo] of examples lo..hi."""
        hi = self.n if hi is None else hi
        yb = self.y[lo:hi]
        m = hi - lo
        s = self.halves[:, lo:hi]
        c = np.concatenate([np.ones((1, m)), self.counts[:, lo:hi], np.ones((2 * self.null_a.shape[0], m)), s, ~s])
        lab = np.concatenate([
            np.broadcast_to(yb, (1 + self.counts.shape[0], m)), self.null_a[:, lo:hi], self.null_b[:, lo:hi],
            np.broadcast_to(yb, (2 * s.shape[0], m)),
        ])
        # c * l / n_pos - c * (1 - l) / n_neg, bit for bit (c / -n_neg == -(c / n_neg)), in two buffers
        den = np.where(lab, self.n_pos[:, None], -self.n_neg[:, None])
        return np.divide(c, den, out=c)


def control_weights(
    labels: np.ndarray, groups: np.ndarray | None = None, *, n_null: int = 20, n_splits: int = 5,
    n_bootstrap: int = 200, seed: int = 0,
) -> ControlWeights:
    """The seeded resamples, shuffles and split halves of :func:`direction_controls` (labels only, no activations).
    Shuffles, resamples and splits stay within each group x label cell."""
    y = np.asarray(labels).astype(bool)
    n = len(y)
    g = np.zeros(n, dtype=np.int64) if groups is None else np.asarray(groups)
    if g.shape != (n,):
        raise ValueError(f"groups have shape {g.shape}, expected ({n},)")
    cells = _strata(y, g)
    rng = np.random.default_rng(seed)
    # the draws in the order this module always made them: bootstrap, shuffles (a, then b), halves
    counts = np.zeros((n_bootstrap, n), dtype=_count_dtype(n))
    for idx in cells:
        counts[:, idx] = rng.multinomial(idx.size, np.full(idx.size, 1.0 / idx.size), size=n_bootstrap)
    groups_in_order = list(dict.fromkeys(g.tolist()))

    def shuffled() -> np.ndarray:
        out = y.copy()
        for t in groups_in_order:
            idx = np.flatnonzero(g == t)
            out[idx] = rng.permutation(out[idx])
        return out

    null_a = np.stack([shuffled() for _ in range(n_null)]) if n_null else np.zeros((0, n), bool)
    null_b = np.stack([shuffled() for _ in range(n_null)]) if n_null else np.zeros((0, n), bool)
    halves = np.zeros((n_splits, n), dtype=bool)
    for s in range(n_splits):
        for idx in cells:
            p = rng.permutation(idx)
            halves[s, p[: (idx.size + int(rng.integers(2))) // 2]] = True
    return ControlWeights(y, counts, null_a, null_b, halves)


def _dask_of(x: Any) -> Any:
    """The dask array behind ``x`` (an xarray DataArray or a dask array), else None."""
    import dask.array as da

    data = x.data if isinstance(x, xr.DataArray) else x
    return data if isinstance(data, da.Array) else None


def weighted_row_sums(weights: Any, x: Any, *, split_every: int = 4) -> np.ndarray:
    """``weights.rows() @ x`` ([K, width] float64) for activations ``x`` [n, width] in memory or dask-backed
    (an xarray DataArray or a dask array). ``weights``: anything with ``rows(lo, hi)`` and ``n_rows``
    (:class:`ControlWeights`, :class:`GroupWeights`). A dask ``x`` is reduced chunk by chunk (each chunk times its
    columns of the weights, partial sums added in a tree), so memory stays at a few chunks and their weights."""
    d = _dask_of(x)
    if d is None:
        X = np.asarray(x, dtype=np.float64)
        return weights.rows(0, X.shape[0]) @ X
    if d.ndim != 2:
        raise ValueError(f"activations must be [example, width], got shape {d.shape}")
    d = d.rechunk({1: -1})
    K, width = weights.n_rows, d.shape[1]

    def block(xb: np.ndarray, block_info: dict | None = None) -> np.ndarray:
        lo, hi = block_info[0]["array-location"][0]
        return (weights.rows(lo, hi) @ np.asarray(xb, dtype=np.float64))[None]

    parts = d.map_blocks(block, new_axis=[1], chunks=(1, K, width), dtype=np.float64,
                         meta=np.empty((0, 0, 0), dtype=np.float64))
    return np.asarray(parts.sum(axis=0, split_every=split_every).compute())


@dataclass
class GroupWeights:
    """One-hot rows of groups (``gid`` [n] in 0..n_groups-1; -1 = in none): ``rows(lo, hi) @ X`` sums each group."""

    gid: np.ndarray
    n_groups: int

    @property
    def n_rows(self) -> int:
        return self.n_groups

    def rows(self, lo: int, hi: int) -> np.ndarray:
        g = self.gid[lo:hi]
        return (np.arange(self.n_groups)[:, None] == g[None, :]).astype(np.float64)


def group_means(x: Any, groups: np.ndarray, *, skipna: bool = False) -> tuple[list[Any], np.ndarray]:
    """(group keys in order of first appearance, their mean rows [G, width]) of activations ``x`` [n, width],
    in memory or dask-backed (streamed). ``skipna``: each entry averaged over the rows where it is finite (as
    ``np.nanmean``); otherwise a NaN row makes its group's mean NaN (as ``mean``)."""
    g = np.asarray(groups)
    keys = list(dict.fromkeys(g.tolist()))
    lookup = {k: i for i, k in enumerate(keys)}
    gid = np.asarray([lookup[v] for v in g.tolist()], dtype=np.int64)
    gw = GroupWeights(gid, len(keys))
    if not skipna:
        sums = weighted_row_sums(gw, x)
        return keys, sums / np.bincount(gid, minlength=len(keys))[:, None]
    import dask.array as da

    d = _dask_of(x)
    src = np.asarray(x, dtype=np.float64) if d is None else d.astype(np.float64)
    finite = np.isfinite(src)
    where = np.where if d is None else da.where
    sums = weighted_row_sums(gw, where(finite, src, 0.0))
    counts = weighted_row_sums(gw, finite.astype(np.float64))
    with np.errstate(invalid="ignore", divide="ignore"):
        return keys, sums / counts


def centre_by_group(x: Any, groups: np.ndarray, means: np.ndarray, keys: Sequence[Any]) -> Any:
    """``x`` [n, width] with its group's mean row (``means[keys.index(group)]``) subtracted from each row: numpy
    in, numpy out; a dask-backed ``x`` stays lazy (subtracted block by block)."""
    lookup = {k: i for i, k in enumerate(keys)}
    gid = np.asarray([lookup[v] for v in np.asarray(groups).tolist()], dtype=np.int64)
    d = _dask_of(x)
    if d is None:
        return np.asarray(x, dtype=np.float64) - means[gid]
    d = d.rechunk({1: -1})

    def block(xb: np.ndarray, block_info: dict | None = None) -> np.ndarray:
        lo, hi = block_info[0]["array-location"][0]
        return np.asarray(xb, dtype=np.float64) - means[gid[lo:hi]]

    return d.map_blocks(block, dtype=np.float64)


def direction_controls(
    Xa: Any,
    Xb: Any,
    labels: np.ndarray,
    *,
    groups: np.ndarray | None = None,
    center: bool = False,
    n_null: int = 20,
    null_quantile: float = 0.95,
    n_splits: int = 5,
    n_bootstrap: int = 200,
    seed: int = 0,
) -> dict[str, Any]:
    """The cross-model cosine of the difference-of-means directions and its controls, from activations alone.

    ``Xa``, ``Xb``: [n, width] activations of the same n statements in two models (the rows the directions are
    fitted on, at the chosen layer and position): numpy arrays, or dask-backed (an xarray DataArray or a dask
    array, e.g. one layer of an opened store), which are streamed chunk by chunk and never loaded whole (see
    :class:`ControlWeights` for the memory the weights take); ``labels``: 0/1 per row; ``groups``: topic per row
    (shuffles, resamples and splits stay within each topic x label cell; ``center`` removes each topic's mean first).

    * ``cosine`` and its ``interval``: the 2.5/97.5% quantiles over ``n_bootstrap`` resamples of the statements
      (the same resample in both models);
    * ``null``: the cosine with the labels shuffled within topic, independently in each model, ``n_null`` seeded
      times: what two directions without any truth signal give; ``null_upper`` is its ``null_quantile`` quantile.
      ``null_shared_upper`` is the same with one shuffle for both models (the similarity of an arbitrary contrast of
      the same statements; near 1 for a near-copy): recorded, not used by the verdict;
    * ``split_half``: per model, the cosine between the directions of two random halves of the statements,
      averaged over ``n_splits`` seeded splits; ``ceiling`` is their Spearman-Brown correction to full size
      (2r / (1 + r)), geometric mean over the two models: the cosine identical directions would reach through
      the sampling noise of this many statements.

    Every direction is a weighted sum of the rows, so only the products of the weight rows with each model's
    activations ([K, width]) are ever formed.
    """
    y = np.asarray(labels).astype(bool)
    n = len(y)
    sa, sb = tuple(np.shape(Xa)), tuple(np.shape(Xb))
    if sa != sb or len(sa) != 2 or sa[0] != n:
        raise ValueError(f"activations {sa} / {sb} do not match {n} labels")
    if y.all() or not y.any():
        raise ValueError("the directions need both true and false statements")
    g = np.zeros(n, dtype=np.int64) if groups is None else np.asarray(groups)
    if center:
        centred = []
        for X in (Xa, Xb):
            keys, means = group_means(X, g)
            centred.append(centre_by_group(X, g, means, keys))
        Xa, Xb = centred
    cw = control_weights(y, g, n_null=n_null, n_splits=n_splits, n_bootstrap=n_bootstrap, seed=seed)
    pa, pb = weighted_row_sums(cw, Xa), weighted_row_sums(cw, Xb)  # [K, width]: every direction, both models
    at = cw.parts()

    cosine = float(_row_cos(pa[at["full"]], pb[at["full"]])[0])
    boot = _row_cos(pa[at["bootstrap"]], pb[at["bootstrap"]])
    lo, hi = np.nanquantile(boot, [0.025, 0.975])
    null = _row_cos(pa[at["null_a"]], pb[at["null_b"]])
    null_shared = _row_cos(pa[at["null_a"]], pb[at["null_a"]])
    split = {
        "a": float(np.nanmean(_row_cos(pa[at["half1"]], pa[at["half2"]]))),
        "b": float(np.nanmean(_row_cos(pb[at["half1"]], pb[at["half2"]]))),
    }
    sb_ = {k: 2 * r / (1 + r) if r > 0 else r for k, r in split.items()}
    ceiling = float(math.sqrt(sb_["a"] * sb_["b"])) if min(sb_.values()) > 0 else float(min(sb_.values()))
    return {
        "cosine": cosine,
        "interval": (float(lo), float(hi)),
        "bootstrap": boot,
        "null": null,
        "null_upper": float(np.quantile(null, null_quantile)),
        "null_mean": float(np.mean(null)),
        "null_shared_upper": float(np.quantile(null_shared, null_quantile)),
        "split_half": split,
        "ceiling": ceiling,
    }


def accuracy_interval(correct: np.ndarray, *, n_bootstrap: int = 200, seed: int = 0) -> tuple[float, float, float]:
    """Held-out accuracy (mean over folds of each fold's mean) and its bootstrap 95% interval, resampling the
    statements within each fold. ``correct``: [fold, example] 1/0, NaN where the statement was not held out."""
    c = np.atleast_2d(np.asarray(correct, dtype=np.float64))
    rng = np.random.default_rng(seed)
    point, boots = [], []
    for row in c:
        v = row[np.isfinite(row)]
        if v.size == 0:
            continue
        point.append(v.mean())
        boots.append(v[rng.integers(0, v.size, size=(n_bootstrap, v.size))].mean(1))
    if not point:
        return math.nan, math.nan, math.nan
    b = np.mean(boots, axis=0)
    lo, hi = np.quantile(b, [0.025, 0.975])
    return float(np.mean(point)), float(lo), float(hi)
