"""Matplotlib set-up shared by every study's figures: headless, consistent, small PNGs."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on cluster nodes or CI
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["plt", "new_figure", "save_figure", "MODEL_COLORS"]

MODEL_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e")


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
