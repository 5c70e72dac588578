"""Directions from stores against numpy references: difference of means (with NaN slots, row subsets and
centring), mergeable sums, streaming under a memory limit, cosines and the 1-D probe."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import xarray as xr

from mechdiff.analyses.common import StoreRequirementError
from mechdiff.analyses.directions import (
    MeanDiffSums,
    Probe,
    best_threshold,
    cosine_by_layer,
    cosine_matrix,
    mean_diff_sums,
    mean_difference,
    unit,
)
from mechdiff.engine.store import ActivationStore, ArraySpec, open_store


def _make_store(path, X, coords, *, shard_size=32, layers=None, dtype="float16", compression="zstd", name="resid_post"):
    n = X.shape[0]
    n_pos = X.shape[2] if X.ndim == 4 else None
    spec = ArraySpec(name, "resid_post", layers or tuple(range(X.shape[1])), n_pos, X.shape[-1], "hidden", dtype, compression)
    st = ActivationStore.create_or_open(
        str(path), "g", n_examples=n, shard_size=shard_size, arrays=[spec], coords=coords,
        token_ids=np.ones((n, 2), np.int32), provenance={"model_id": "synthetic"},
    )
    for i in range(st.n_shards):
        r = st.shard_range(i)
        st.write_shard(i, {name: X[r.start:r.stop]})
    return open_store(str(path), "g")


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """A fp16 store with a position dim, NaN slots (short examples lack position -3), labels and topics."""
    rng = np.random.default_rng(0)
    n, L, P, W = 150, 3, 3, 24
    lab = rng.integers(0, 2, n)
    topic = np.array(["cities", "numbers", "words"], dtype=object)[rng.integers(0, 3, n)]
    X = rng.normal(size=(n, L, P, W)) + lab[:, None, None, None] * rng.normal(size=(L, P, W))
    X += (topic == "numbers")[:, None, None, None] * 3.0  # a topic offset that centring removes
    X = X.astype(np.float16)
    short = rng.random(n) < 0.2
    X[short, :, 0, :] = np.nan
    ds = _make_store(tmp_path_factory.mktemp("synth") / "s.zarr", X, {"label": lab, "topic": topic})
    return ds, X.astype(np.float64), lab, topic


def _np_diff(X, lab, rows, topic=None, pos=1, neg=None):
    X, lab = X[rows], lab[rows]
    if topic is not None:
        topic = topic[rows]
        X = X.copy()
        for t in np.unique(topic):
            X[topic == t] -= np.nanmean(X[topic == t], axis=0)
    negm = lab != pos if neg is None else lab == neg
    return np.nanmean(X[lab == pos], axis=0) - np.nanmean(X[negm], axis=0)


@pytest.mark.parametrize("center", [False, True])
@pytest.mark.parametrize("rows", ["all", "subset", "mask"])
def test_store_difference_equals_numpy(synth, center, rows):
    ds, X, lab, topic = synth
    n = len(lab)
    sel = {"all": None, "subset": np.arange(0, n, 3), "mask": np.arange(n) % 5 != 0}[rows]
    ref_rows = np.arange(n) if sel is None else sel
    got = mean_difference(ds, "resid_post", "label", rows=sel, center_by="topic" if center else None)
    want = _np_diff(X, lab, ref_rows, topic if center else None)
    assert got.dims == ("layer", "position", "hidden") and got.dtype == np.float64
    assert np.isnan(X[:, 0, 0, 0]).any()  # NaN slots really are present
    np.testing.assert_allclose(got.values, want, rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(got["position"].values, [-3, -2, -1])
    # unit form: the same direction, norm 1
    u = mean_difference(ds, "resid_post", "label", rows=sel, center_by="topic" if center else None, unit=True)
    np.testing.assert_allclose(u.values, want / np.linalg.norm(want, axis=-1, keepdims=True), rtol=1e-10)


def test_labels_as_array_negative_class_and_counts(synth):
    ds, X, lab, topic = synth
    y = np.where(topic == "words", 2, lab)  # three classes: 1 vs 0, leaving 2 out
    s = mean_diff_sums(ds, "resid_post", y, positive=1, negative=0)
    keep = y != 2
    np.testing.assert_allclose(s.diff, _np_diff(X, y, keep, pos=1, neg=0), rtol=1e-10, atol=1e-12)
    assert s.n_pos == int((y == 1).sum()) and s.n_neg == int((y == 0).sum())
    # position -3 is missing in short examples: its count is lower, the others are complete
    present = ~np.isnan(X[:, 0, 0, 0])
    assert s.count_pos[0, 0] == (present & (y == 1)).sum() and s.count_pos[0, 2] == (y == 1).sum()


def test_merge_in_any_order_equals_whole(synth):
    ds, X, lab, topic = synth
    n = len(lab)
    rng = np.random.default_rng(1)
    # uneven shards; shard 0 has no "words" rows, so groups appear in different orders across parts
    cuts = [np.flatnonzero((np.arange(n) < 40) & (topic != "words")), np.flatnonzero((np.arange(n) < 40) & (topic == "words")),
            np.arange(40, 95), np.arange(95, n)]
    for center in (None, "topic"):
        whole = mean_diff_sums(ds, "resid_post", "label", center_by=center)
        parts = [mean_diff_sums(ds, "resid_post", "label", rows=c, center_by=center) for c in cuts]
        for _ in range(4):
            order = rng.permutation(len(parts))
            acc = parts[order[0]]
            for i in order[1:]:
                acc = acc.merge(parts[i])
            tree = (parts[order[0]] + parts[order[1]]).merge(parts[order[2]] + parts[order[3]])
            for m in (acc, tree):
                np.testing.assert_allclose(m.sum_pos, whole.sum_pos, rtol=1e-12, atol=1e-9)
                np.testing.assert_allclose(m.diff, whole.diff, rtol=1e-10, atol=1e-12)
                assert (m.n_pos, m.n_neg) == (whole.n_pos, whole.n_neg)
                np.testing.assert_array_equal(m.count_neg, whole.count_neg)
        if center:
            # a subset of groups from the merged sums = the reduction over those groups' rows only
            sub = whole.select_groups(["cities", "numbers"])
            direct = mean_diff_sums(ds, "resid_post", "label", rows=topic != "words", center_by="topic")
            np.testing.assert_allclose(sub.diff, direct.diff, rtol=1e-10, atol=1e-12)
            np.testing.assert_allclose(sub.diff, _np_diff(X, lab, topic != "words", topic), rtol=1e-10, atol=1e-12)
            plain = whole.select_groups(["cities", "numbers"], centred=False)
            np.testing.assert_allclose(plain.diff, _np_diff(X, lab, topic != "words"), rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="centred with uncentred"):
        parts[0].uncentred().merge(parts[1])


def test_layers_an_array_did_not_capture_are_nan_not_zero(tmp_path):
    rng = np.random.default_rng(2)
    n = 40
    lab = np.arange(n) % 2
    X = rng.normal(size=(n, 2, 8)).astype(np.float32)
    # two arrays with different layers: resid_post at layers 0, 2; the union coord is (0, 1, 2)
    a = ArraySpec("resid_post", "resid_post", (0, 2), None, 8, "hidden", "float32")
    b = ArraySpec("mlp_out", "mlp_out", (1,), None, 8, "hidden", "float32")
    st = ActivationStore.create_or_open(str(tmp_path / "s"), "g", n_examples=n, shard_size=16, arrays=[a, b],
                                        coords={"label": lab}, token_ids=np.ones((n, 1), np.int32), provenance={})
    for i in range(st.n_shards):
        r = st.shard_range(i)
        st.write_shard(i, {"resid_post": X[r.start:r.stop], "mlp_out": X[r.start:r.stop, :1]})
    ds = open_store(str(tmp_path / "s"), "g")
    d = mean_difference(ds, "resid_post", "label")
    assert d.dims == ("layer", "hidden") and list(d["layer"].values) == [0, 1, 2]
    assert np.isnan(d.sel(layer=1)).all()
    X64 = X.astype(np.float64)
    np.testing.assert_allclose(d.sel(layer=2).values, X64[lab == 1, 1].mean(0) - X64[lab == 0, 1].mean(0), rtol=1e-10)
    np.testing.assert_allclose(mean_difference(ds, "resid_post", "label", layers=[2]).sel(layer=2), d.sel(layer=2))


def test_bad_inputs(synth):
    ds, X, lab, topic = synth
    with pytest.raises(StoreRequirementError, match="no 'mlp_act' activations.*--sites mlp_act"):
        mean_difference(ds, "mlp_act", "label")
    with pytest.raises(StoreRequirementError, match="no 'truth' column.*columns: label, n_tokens, topic"):
        mean_difference(ds, "resid_post", "truth")
    with pytest.raises(StoreRequirementError, match="no 'dataset' column"):
        mean_difference(ds, "resid_post", "label", center_by="dataset")
    with pytest.raises(ValueError, match="0 positive"):
        mean_difference(ds, "resid_post", "label", positive=7)
    with pytest.raises(ValueError, match="labels have shape"):
        mean_difference(ds, "resid_post", lab[:5])
    with pytest.raises(IndexError, match="rows out of range"):
        mean_difference(ds, "resid_post", "label", rows=[0, 10_000])


STREAM_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys
    import dask, numpy as np
    from mechdiff.engine.store import open_store
    from mechdiff.analyses.directions import mean_diff_sums

    url, headroom = sys.argv[1], int(sys.argv[2])
    ds = open_store(url, "g")
    with dask.config.set(scheduler="threads", num_workers=2):
        # warm up: start zarr's and dask's threads (their stacks count as address space) before the limit
        mean_diff_sums(ds.isel(example=slice(0, 64)), "resid_post", "label")
        vm = int(open("/proc/self/status").read().split("VmSize:")[1].split()[0]) * 1024
        limit = vm + headroom
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        out = {"vm_before": vm, "limit": limit}
        s = mean_diff_sums(ds, "resid_post", "label")
        out["sum_pos"] = s.sum_pos.sum(axis=-1).tolist()
        out["n"] = [s.n_pos, s.n_neg]
        try:
            ds["resid_post"].values  # control: loading the array whole must not fit under the limit
            out["control"] = "loaded"
        except MemoryError:
            out["control"] = "MemoryError"
    print(json.dumps(out))
    """
)


def test_reduction_streams_under_a_memory_limit(tmp_path):
    """A ~200 MB store reduced in a process whose address space may grow by only 64 MB: it can only finish
    if the reduction really goes chunk by chunk (and the control, loading the array, must fail)."""
    n, L, P, W = 6400, 8, 2, 1024  # float16: 6400 * 8 * 2 * 1024 * 2 B = 210 MB uncompressed, stored uncompressed
    lab = (np.arange(n) % 3 == 0).astype(np.int64)
    spec = ArraySpec("resid_post", "resid_post", tuple(range(L)), P, W, "hidden", "float16", None)
    url = str(tmp_path / "big.zarr")
    st = ActivationStore.create_or_open(url, "g", n_examples=n, shard_size=512, arrays=[spec], coords={"label": lab},
                                        token_ids=np.ones((n, 1), np.int32), provenance={})
    ref = np.zeros((L, P))  # reference: sum over positive rows and the hidden dim, per layer and position
    for i in range(st.n_shards):
        r = st.shard_range(i)
        x = np.random.default_rng(i).standard_normal((len(r), L, P, W), dtype=np.float32).astype(np.float16)
        st.write_shard(i, {"resid_post": x})
        ref += x[lab[r.start:r.stop] == 1].astype(np.float64).sum(axis=(0, 3))
    size = spec.nbytes(n)
    assert size > 200e6
    headroom = 64 * 2**20
    env = {**os.environ, "MALLOC_ARENA_MAX": "1", "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", STREAM_SCRIPT, url, str(headroom)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert size > 3 * headroom
    assert out["control"] == "MemoryError"  # the limit is real
    assert out["n"] == [int(lab.sum()), int((lab == 0).sum())]
    np.testing.assert_allclose(np.asarray(out["sum_pos"]), ref, rtol=1e-9)


def test_cosines_against_numpy():
    rng = np.random.default_rng(3)
    a = rng.normal(size=(4, 2, 16))
    b = a + rng.normal(size=(4, 2, 16)) * np.arange(4)[:, None, None]
    coords = {"layer": [0, 1, 2, 3], "position": [-2, -1]}
    A = xr.DataArray(a, dims=("layer", "position", "hidden"), coords=coords)
    B = xr.DataArray(b, dims=("layer", "position", "hidden"), coords=coords)
    cos = cosine_by_layer(A, B)
    ua, ub = a / np.linalg.norm(a, axis=-1, keepdims=True), b / np.linalg.norm(b, axis=-1, keepdims=True)
    np.testing.assert_allclose(cos.values, (ua * ub).sum(-1), rtol=1e-12)
    assert cos.dims == ("layer", "position") and cos.sel(layer=0).values == pytest.approx([1.0, 1.0])
    m = cosine_matrix(A.sel(position=-1), B.sel(position=-1))
    assert m.dims == ("layer_a", "layer_b")
    np.testing.assert_allclose(m.values, ua[:, 1] @ ub[:, 1].T, rtol=1e-12)
    np.testing.assert_allclose(unit(A).values, ua, rtol=1e-12)
    # common layers only
    assert list(cosine_by_layer(A, B.sel(layer=[1, 3]))["layer"].values) == [1, 3]


def _brute_threshold(s, y):
    best = -1.0
    for t in np.concatenate([[s.min() - 1], s]):
        best = max(best, np.mean((s > t) == y))
    return best


def test_probe_on_separable_data_and_thresholds():
    rng = np.random.default_rng(4)
    n, W = 400, 32
    w = rng.normal(size=W)
    X = rng.normal(size=(n, W)) * 2
    margin = X @ w / np.linalg.norm(w)
    keep = np.abs(margin) > 0.5  # a gap around the separating plane: linearly separable
    X, y = X[keep], (margin[keep] > 0).astype(int)
    tr, te = np.arange(len(y)) % 2 == 0, np.arange(len(y)) % 2 == 1
    p = Probe.fit(X[tr], y[tr], direction=w)
    assert p.accuracy(X[te], y[te]) == 1.0 and p.sign == 1
    lg = Probe.fit(X[tr], y[tr], method="logistic")
    assert lg.accuracy(X[te], y[te]) >= 0.98
    md = Probe.fit(X[tr], y[tr])  # difference-of-means direction
    assert md.accuracy(X[te], y[te]) > 0.9
    np.testing.assert_allclose(md.direction, X[tr][y[tr] == 1].mean(0) - X[tr][y[tr] == 0].mean(0))
    # the flipped direction needs the sign fit, and refit keeps direction and sign
    flipped = Probe.fit(X[tr], y[tr], direction=-w, fit_sign=True)
    assert flipped.sign == -1 and flipped.accuracy(X[te], y[te]) == 1.0
    shifted = X + 5 * w / np.linalg.norm(w)  # another "model": same direction, offset along it
    assert p.accuracy(shifted[te], y[te]) < 0.9
    r = p.refit_threshold(shifted[tr], y[tr])
    assert r.accuracy(shifted[te], y[te]) == 1.0 and np.array_equal(r.direction, p.direction)
    # best_threshold is optimal: equals a brute-force search over noisy scores
    for seed in range(5):
        g = np.random.default_rng(seed)
        s, yy = g.normal(size=60).round(1), g.integers(0, 2, 60).astype(bool)
        t, acc = best_threshold(s, yy)
        assert acc == pytest.approx(_brute_threshold(s, yy))
        assert np.mean((s > t) == yy) == pytest.approx(acc)
    with pytest.raises(ValueError, match="NaN"):
        Probe.fit(np.full((4, 2), np.nan), np.array([0, 1, 0, 1]))
    with pytest.raises(ValueError, match="both classes"):
        Probe.fit(X[:5], np.ones(5))


def test_mean_diff_sums_dataclass_counts_default():
    s = MeanDiffSums(np.ones((2, 3)) * 4, np.ones((2, 3)) * 2, 4, 2)
    np.testing.assert_allclose(s.diff, 0.0)
    t = s.merge(MeanDiffSums(np.zeros((2, 3)), np.ones((2, 3)) * 2, 4, 2))
    np.testing.assert_allclose(t.mean_pos, 0.5)
    np.testing.assert_allclose(t.mean_neg, 1.0)
    with pytest.raises(ValueError, match="cannot merge"):
        s.merge(MeanDiffSums(np.ones((3, 3)), np.ones((3, 3)), 1, 1))
