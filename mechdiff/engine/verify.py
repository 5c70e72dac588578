"""A store checks itself against its model: re-run stored examples and compare."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from mechdiff.engine.extract import CaptureSpec, PreparedExtraction, forward_capture
from mechdiff.engine.models import LoadedModel, load_model
from mechdiff.engine.positions import Positions
from mechdiff.engine.store import ActivationStore, open_store

__all__ = ["SiteCheck", "VerifyReport", "verify_store"]


@dataclass
class SiteCheck:
    site: str
    max_abs_diff: float
    max_rel_diff: float  # relative to the largest stored magnitude of that site


@dataclass
class VerifyReport:
    group: str
    examples: list[int]
    sites: list[SiteCheck]
    tolerance: float

    @property
    def ok(self) -> bool:
        return all(s.max_rel_diff <= self.tolerance for s in self.sites)


def verify_store(
    url: str,
    group: str | None = None,
    *,
    sample: int = 8,
    model: str | LoadedModel | None = None,
    seed: int = 0,
    device: str = "cpu",
    storage_options: dict | None = None,
) -> VerifyReport:
    """Re-run ``sample`` random finished examples through the model (the one named in the store's provenance
    unless ``model`` is given), from the stored token ids, and report the largest difference per site."""
    ds = open_store(url, group=group, storage_options=storage_options)
    prov = ds.attrs
    spec = CaptureSpec(**{k: (tuple(v) if k in ("sites", "layers") else v) for k, v in json.loads(prov["capture_spec"]).items()})
    lm = model if isinstance(model, LoadedModel) else load_model(model or prov["model_id"], device=device)
    if lm.weights_hash != prov.get("weights_hash"):
        raise ValueError(
            f"model {lm.model_id} (weights {lm.weights_hash[:12]}) is not the store's model "
            f"{prov['model_id']} (weights {str(prov.get('weights_hash'))[:12]})"
        )
    st = ActivationStore.open(url, ds.attrs["group"], storage_options=storage_options)
    done = np.asarray([i for s in st.done_shards() for i in st.shard_range(s)], dtype=np.int64)
    if len(done) == 0:
        raise ValueError(f"store {url} has no finished examples to verify")
    rng = np.random.default_rng(seed)
    picks = np.sort(rng.choice(done, size=min(sample, len(done)), replace=False))
    tok = ds["token_ids"].values[picks]
    token_ids = [[int(t) for t in row if t >= 0] for row in tok]
    counts = [int(c) for c in ds["n_positions"].values[picks]]
    layers = tuple(int(l) for l in ds["layer"].values)
    pos = Positions.parse(prov["positions"])
    width = ds.sizes.get("position", 1)
    prep = PreparedExtraction(spec, layers, pos, token_ids, counts, width, [], {}, dict(prov))
    fresh = forward_capture(lm, prep, list(range(len(picks))))
    checks = []
    for site in spec.sites:
        stored = ds[site].isel(example=picks).values.astype(np.float32)
        new = fresh[site]
        if spec.dtype == "float16":
            new = new.astype(np.float16).astype(np.float32)
        ok = ~np.isnan(stored)
        diff = np.abs(stored - new)[ok]
        scale = float(np.abs(stored[ok]).max()) or 1.0
        mx = float(diff.max()) if diff.size else 0.0
        checks.append(SiteCheck(site, mx, mx / scale))
    tol = 2e-3 if spec.dtype == "float16" else 1e-5
    return VerifyReport(ds.attrs["group"], [int(p) for p in picks], checks, tol)
