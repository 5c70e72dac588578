"""What every study shares: model groups, store requirements, and how results are written."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import xarray as xr

from mechdiff.errors import MechdiffError

__all__ = ["ModelGroup", "StoreRequirementError", "require", "StudyResult", "Finding", "VERDICTS", "to_jsonable"]

#: A finding's verdict on one pair, decided against controls computed in the same run.
VERDICTS = ("agrees", "disagrees", "inconclusive")


@dataclass(frozen=True)
class ModelGroup:
    """A base model and its post-trained versions, compared pairwise (base vs each post model)."""

    name: str
    base: str
    post: tuple[str, ...]
    labels: tuple[str, ...] = ()  # short names: base first, then each post model

    def __post_init__(self) -> None:
        if not self.post:
            raise ValueError(f"model group {self.name!r} needs at least one post-trained model")
        if not self.labels:
            object.__setattr__(self, "labels", ("base", *(f"post{i}" if len(self.post) > 1 else "post" for i in range(len(self.post)))))
        if len(self.labels) != 1 + len(self.post):
            raise ValueError(f"model group {self.name!r}: {len(self.labels)} labels for {1 + len(self.post)} models")

    @property
    def models(self) -> dict[str, str]:
        """label -> model path or hub id, base first."""
        return dict(zip(self.labels, (self.base, *self.post)))

    @property
    def pairs(self) -> list[tuple[str, str]]:
        """(base label, post label) for each post-trained model."""
        return [(self.labels[0], p) for p in self.labels[1:]]


class StoreRequirementError(MechdiffError, ValueError):
    """A store lacks what a study needs; the message says what to extract."""


def require(
    ds: xr.Dataset,
    *,
    site: str,
    study: str,
    positions: str | None = None,
    min_positions: int = 1,
    coords: Sequence[str] = (),
    layers: Sequence[int] | None = None,
) -> None:
    """Raise ``StoreRequirementError`` naming the missing piece and the extraction that would provide it."""
    where = ds.attrs.get("group") or ds.attrs.get("dataset") or "store"
    hint = f"extract with --sites {site}" + (f" --positions {positions}" if positions else "")
    if site not in ds.data_vars:
        raise StoreRequirementError(f"{study}: {where} has no {site!r} activations ({', '.join(ds.data_vars) or 'none'}); {hint}")
    n_pos = ds.sizes.get("position", 1)
    if n_pos < min_positions:
        raise StoreRequirementError(f"{study}: {where} keeps {n_pos} position(s), {min_positions} needed; {hint}")
    from mechdiff.engine.capture import capture_of
    from mechdiff.engine.positions import Positions

    cap = capture_of(ds.attrs)
    if positions and cap is not None and cap.positions != Positions.parse(positions):
        raise StoreRequirementError(
            f"{study}: {where} was captured at positions {str(cap.positions)!r}, {positions!r} needed; {hint}"
        )
    for c in coords:
        if c not in ds.coords and c not in ds.data_vars:
            raise StoreRequirementError(f"{study}: {where} has no {c!r} column; extract from a dataset with a {c!r} column")
    if layers is not None:
        have = set(int(l) for l in ds["layer"].values)
        miss = [l for l in layers if l not in have]
        if miss:
            raise StoreRequirementError(f"{study}: {where} lacks layers {miss}; extract with --layers all")


def to_jsonable(x: Any) -> Any:
    """Numbers, arrays and dataclasses as plain JSON values; NaN/inf become None (JSON has neither)."""
    if isinstance(x, dict):
        return {str(k): to_jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [to_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return to_jsonable(x.tolist())
    if isinstance(x, (np.floating, float)):
        f = float(x)
        return f if math.isfinite(f) else None
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    if hasattr(x, "to_json") and callable(x.to_json):  # a type with its own record (e.g. a store's capture)
        return to_jsonable(x.to_json())
    if hasattr(x, "__dataclass_fields__"):
        # plus the read-only properties a class lists in ``_json_properties`` (e.g. ``Finding.agrees``)
        keys = [*x.__dataclass_fields__, *getattr(type(x), "_json_properties", ())]
        return to_jsonable({k: getattr(x, k) for k in keys})
    return x


@dataclass
class StudyResult:
    """A study's output: labelled arrays, a summary of every number, figures, and one verdict line per finding."""

    study: str
    data: xr.Dataset
    summary: dict[str, Any]
    figures: dict[str, Path] = field(default_factory=dict)
    findings: list["Finding"] = field(default_factory=list)
    # one line per figure (same keys as ``figures``) saying how to read it; the report prints it
    notes: dict[str, str] = field(default_factory=dict)
    # title -> rows (column -> value) a researcher reads as they are, e.g. completions; the report prints them
    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def save(self, out_dir: str | Path) -> Path:
        """``out_dir/<study>/results.zarr``, ``summary.json`` and figures (already written there by the study)."""
        d = Path(out_dir) / self.study
        d.mkdir(parents=True, exist_ok=True)
        ds = self.data.copy()
        ds.attrs = {k: json.dumps(to_jsonable(v)) if not isinstance(v, (str, int, float)) else v for k, v in ds.attrs.items()}
        # Fixed-width numpy strings have no zarr v3 spec (other readers may not open them); variable-length do.
        for name in list(ds.variables):
            if ds[name].dtype.kind == "U":
                ds[name] = ds[name].astype(object)
        ds.to_zarr(d / "results.zarr", mode="w", zarr_format=3, consolidated=False)
        payload = {
            "study": self.study,
            "summary": to_jsonable(self.summary),
            "findings": [to_jsonable(f) for f in self.findings],
            "figures": {k: str(v) for k, v in self.figures.items()},
            "notes": self.notes,
            "tables": to_jsonable(self.tables),
        }
        (d / "summary.json").write_text(json.dumps(payload, indent=2))
        return d


@dataclass
class Finding:
    """One of the study's findings as measured on one model pair.

    ``verdict``: ``agrees`` / ``disagrees`` (with the paper's finding) or ``inconclusive`` (the measurement cannot
    tell, e.g. there is nothing to compare or a control is as high as the measurement); ``reason``: one line
    saying which rule decided it, with the numbers; ``interval``: the headline number's (low, high) interval, if
    any; ``controls``: the control values computed in the same run that the verdict was decided against.
    """

    finding: str  # e.g. "truth direction shared"
    pair: str  # e.g. "base vs post"
    figures: dict[str, float]  # the numbers behind the verdict
    verdict: str  # one of VERDICTS
    detail: str = ""
    reason: str = ""
    interval: tuple[float, float] | None = None
    controls: dict[str, float] = field(default_factory=dict)

    _json_properties = ("agrees",)

    def __post_init__(self) -> None:
        if isinstance(self.verdict, (bool, np.bool_)):
            raise TypeError("Finding.verdict is one of 'agrees', 'disagrees', 'inconclusive', not a bool")
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict {self.verdict!r}: one of {', '.join(VERDICTS)}")
        if self.interval is not None:
            lo, hi = self.interval
            self.interval = (float(lo), float(hi))

    @property
    def agrees(self) -> bool:
        """Does this pair agree with the paper's finding? (``verdict == "agrees"``; read-only)"""
        return self.verdict == "agrees"
