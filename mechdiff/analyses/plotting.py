"""Matplotlib set-up shared by every study's figures: headless, consistent, small PNGs."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import matplotlib
import numpy as np

matplotlib.use("Agg")  # no display on cluster nodes or CI
import matplotlib.pyplot as plt  # noqa: E402

from mechdiff.errors import MechdiffError  # noqa: E402

__all__ = ["plt", "new_figure", "save_figure", "MODEL_COLORS", "CLASS_COLORS", "FigureInputError", "pca_projection", "pca_figure"]

MODEL_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e")
CLASS_COLORS = ("#ff7f0e", "#1f77b4")  # class 0, class 1


class FigureInputError(MechdiffError, ValueError):
    """The arrays given to a figure do not fit together (shapes, labels, non-finite values)."""


def new_figure(width: float = 5.0, height: float = 3.4, ncols: int = 1):
    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, height), constrained_layout=True)
    return fig, axes


def save_figure(fig, path: str | Path) -> Path:
    """Write ``fig`` as PNG (dpi 110) and close it; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def pca_projection(X: np.ndarray, k: int = 2) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The rows of ``X`` [n, width] on their first ``k`` principal components.

    Returns ``(coords [n, k], components [k, width], explained [k])``: the centred rows times the components,
    the components as unit rows (right singular vectors of the centred rows, numpy SVD), and each component's
    share of the total variance. Each component's sign is fixed so that its largest-magnitude loading is
    positive: SVD signs are arbitrary, and figures of the same data should not flip between runs.
    """
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2:
        raise FigureInputError(f"PCA needs a 2-D [rows, width] array, got shape {X.shape}")
    if X.shape[0] <= k or X.shape[1] < k:
        raise FigureInputError(f"PCA onto {k} components needs more than {k} rows and at least {k} columns, got {X.shape}")
    if not np.isfinite(X).all():
        raise FigureInputError("PCA input has NaN/inf entries: select the rows that have the slot first")
    Xc = X - X.mean(axis=0)
    _, s, vt = np.linalg.svd(Xc, full_matrices=False)
    comps = vt[:k]
    flip = np.sign(comps[np.arange(k), np.argmax(np.abs(comps), axis=1)])
    comps = comps * np.where(flip == 0, 1.0, flip)[:, None]
    total = float((s**2).sum())
    explained = s[:k] ** 2 / total if total > 0 else np.zeros(k)
    return Xc @ comps.T, comps, explained


def _check_pca_inputs(acts: Mapping[str, np.ndarray], labels: np.ndarray, class_names: Sequence[str],
                      directions: Mapping[str, np.ndarray] | None) -> np.ndarray:
    if not acts:
        raise FigureInputError("pca_figure needs the activations of at least one model")
    if len(class_names) != 2:
        raise FigureInputError(f"class_names must name the two classes (label 0, label 1), got {tuple(class_names)}")
    y = np.asarray(labels)
    if y.ndim != 1 or not set(np.unique(y).tolist()) <= {0, 1}:
        raise FigureInputError(f"labels must be a 1-D array of 0/1 (0 = {class_names[0]}, 1 = {class_names[1]})")
    if y.all() or not y.any():
        raise FigureInputError("labels need rows of both classes")
    for name, X in acts.items():
        shape = np.shape(X)
        if len(shape) != 2 or shape[0] != y.size:
            raise FigureInputError(f"activations of {name!r} have shape {shape}; expected [{y.size} rows (one per label), width]")
    for name, d in (directions or {}).items():
        if name not in acts:
            raise FigureInputError(f"direction given for {name!r}, which has no activations (models: {list(acts)})")
        if np.shape(d) != (np.shape(acts[name])[1],):
            raise FigureInputError(f"direction of {name!r} has shape {np.shape(d)}; expected ({np.shape(acts[name])[1]},)")
    return y.astype(bool)


def pca_figure(
    acts: Mapping[str, np.ndarray],
    labels: np.ndarray,
    path: str | Path,
    *,
    title: str,
    class_names: Sequence[str] = ("false", "true"),
    directions: Mapping[str, np.ndarray] | None = None,
) -> Path:
    """One panel per model: its activations on their own first two principal components, with a direction.

    ``acts``: model name -> [n, width] activations of the same n examples (one layer and position; widths may
    differ between models, each panel has its own PCA); ``labels``: [n] 0/1, coloured as ``class_names[0]`` /
    ``class_names[1]`` (truth: false / true; refusal: harmless / harmful). ``directions``: model name -> [width]
    vector to draw (e.g. the study's fitted direction, or another model's); models without one get the difference
    of their class means (class 1 minus class 0). The direction is projected into the panel's plane and drawn as
    an arrow from the class-0 mean, at its own length, so the difference of means ends at the class-1 mean; the
    panel says which share of the direction's norm lies in the plane (a low share: the plane shows other variance).
    Writes a PNG at ``path`` and returns it. Raises :class:`FigureInputError` before drawing on inputs that do not
    fit together.
    """
    y = _check_pca_inputs(acts, labels, class_names, directions)
    fig, axes = new_figure(width=4.0, height=3.6, ncols=len(acts))
    for ax, (name, X) in zip(np.atleast_1d(axes).ravel(), acts.items()):
        X = np.asarray(X, dtype=np.float64)
        coords, comps, explained = pca_projection(X)
        for c in (0, 1):
            rows = y == bool(c)
            ax.scatter(coords[rows, 0], coords[rows, 1], s=5, alpha=0.45, color=CLASS_COLORS[c], label=class_names[c], linewidths=0)
        d = np.asarray(directions[name], dtype=np.float64) if directions and name in directions else X[y].mean(0) - X[~y].mean(0)
        start, vec = coords[~y].mean(0), comps @ d
        ax.annotate("", xy=tuple(start + vec), xytext=tuple(start),
                    arrowprops=dict(arrowstyle="-|>", color="black", lw=1.8))
        ax.update_datalim(np.stack([start, start + vec]))  # annotations do not widen the axes by themselves
        ax.autoscale_view()
        norm = float(np.linalg.norm(d))
        share = float(np.linalg.norm(vec)) / norm if norm > 0 else float("nan")
        ax.set_title(f"{name}: direction {share:.0%} in this plane", fontsize=9)
        ax.set_xlabel(f"PC1 ({explained[0]:.0%} of variance)")
        ax.set_ylabel(f"PC2 ({explained[1]:.0%} of variance)")
    np.atleast_1d(axes).ravel()[0].legend(fontsize=7, markerscale=2)
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)
