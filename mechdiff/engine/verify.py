"""A store checks itself: every chunk of its finished shards, then stored examples re-run through the model."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from mechdiff.engine.capture import ResolvedCapture
from mechdiff.engine.extract import PreparedExtraction, forward_capture
from mechdiff.engine.models import LoadedModel, load_model
from mechdiff.engine.integrity import IntegrityReport
from mechdiff.engine.store import ActivationStore, bf16_bits_to_float32, float32_to_bf16_bits, open_store, resolve_group

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
    integrity: IntegrityReport | None = None
    repaired: list[int] = field(default_factory=list)  # shards whose done flags were taken down

    @property
    def ok(self) -> bool:
        chunks_ok = self.integrity is None or self.integrity.ok
        return chunks_ok and all(s.max_rel_diff <= self.tolerance for s in self.sites)


def verify_store(
    url: str,
    group: str | None = None,
    *,
    sample: int = 8,
    model: str | LoadedModel | None = None,
    seed: int = 0,
    device: str = "cpu",
    storage_options: dict | None = None,
    checksums: bool = True,
    repair: bool = False,
) -> VerifyReport:
    """Check a group: every chunk of every finished shard is present and (``checksums``) matches its crc32c;
    then re-run ``sample`` random finished examples through the model (the one named in the store's
    provenance unless ``model`` is given), from the stored token ids, and report the largest difference per
    site. ``sample=0`` checks the chunks only. ``repair`` takes down the done flags of damaged shards, so that
    the next extraction rewrites exactly those; the model is not re-run on a damaged group."""
    if sample < 0:
        raise ValueError(f"--sample {sample}: the number of examples to re-run must be >= 0 (0: check chunks only)")
    group = resolve_group(url, group, storage_options)
    st = ActivationStore.open(url, group, storage_options=storage_options, read_only=not repair)
    integrity = st.check(checksums=checksums)
    if integrity.group_damaged:
        repair = False  # a shard rewrite cannot restore coords written at creation
    repaired = integrity.damaged_shards if repair else []
    st.clear_done(repaired)
    if not integrity.ok or sample == 0:
        return VerifyReport(group, [], [], _tolerance(st), integrity, repaired)

    ds = open_store(url, group=group, storage_options=storage_options)
    prov = ds.attrs
    cap = prov.get("capture")
    if not isinstance(cap, ResolvedCapture):
        raise ValueError(f"store {url} group {group or '/'} records no capture spec: it cannot be re-run")
    spec = cap.as_spec()
    lm = model if isinstance(model, LoadedModel) else load_model(model or prov["model_id"], device=device)
    if lm.weights_hash != prov.get("weights_hash"):
        raise ValueError(
            f"model {lm.model_id} (weights {lm.weights_hash[:12]}) is not the store's model "
            f"{prov['model_id']} (weights {str(prov.get('weights_hash'))[:12]})"
        )
    done = np.asarray([i for s in integrity.done for i in st.shard_range(s)], dtype=np.int64)
    if len(done) == 0:
        raise ValueError(f"store {url} group {group or '/'} has no finished examples to re-run (use --sample 0 to check chunks only)")
    rng = np.random.default_rng(seed)
    picks = np.sort(rng.choice(done, size=min(sample, len(done)), replace=False))
    tok = ds["token_ids"].values[picks]
    token_ids = [[int(t) for t in row if t >= 0] for row in tok]
    counts = [int(c) for c in ds["n_positions"].values[picks]]
    layers = tuple(int(l) for l in ds["layer"].values)
    pos = cap.positions
    width = ds.sizes.get("position", 1)
    prep = PreparedExtraction(spec, layers, pos, token_ids, counts, width, [], {}, dict(prov))
    fresh = forward_capture(lm, prep, list(range(len(picks))))
    checks = []
    for site in spec.sites:
        stored = ds[site].isel(example=picks).values.astype(np.float32)
        new = fresh[site]
        if spec.dtype == "float16":
            new = new.astype(np.float16).astype(np.float32)
        elif spec.dtype == "bfloat16":  # rounded as the store rounds it
            new = bf16_bits_to_float32(float32_to_bf16_bits(new))
        ok = ~np.isnan(stored)  # layers / positions this array never captured
        diff = np.abs(stored - new)[ok]
        scale = float(np.abs(stored[ok]).max()) if ok.any() else 1.0
        mx = float(diff.max()) if diff.size else 0.0
        checks.append(SiteCheck(site, mx, mx / (scale or 1.0)))
    return VerifyReport(group, [int(p) for p in picks], checks, _tolerance(st), integrity, repaired)


def _tolerance(st: ActivationStore) -> float:
    """Relative difference allowed between a re-run and the store: a rounding step of the stored dtype (a rerun
    can round a value the other way), float32's reordering noise otherwise."""
    steps = {"bfloat16": 1e-2, "float16": 2e-3, "float32": 1e-5}
    return max(steps[a.dtype] for a in st.arrays)
