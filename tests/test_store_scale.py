"""The store at scale: shard objects, format-2 stores, bfloat16 arrays, consolidation at finish, extension."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import xarray as xr
import zarr

from mechdiff.engine import store as store_mod
from mechdiff.engine.store import ActivationStore, ArraySpec, StoreIncompleteError, open_store
from mechdiff.errors import StoreCorruptError
from tests.test_store import PROV, SHARD, check_against, coords, fill, make, random_shard, reference, token_ids, tree

MiB = 2**20


# ------------------------------------------------------------------------- shard shapes


def test_shard_shapes_at_scale():
    ss, cs = store_mod._shard_shape, store_mod._chunk_shape
    # 1 M examples x 32 layers x 4096, fp16 last token, work shards of 256: one 64 MiB object per work shard
    shape = (1_000_000, 32, 4096)
    inner = cs(shape, 256, 2, has_position=False)
    assert inner == (256, 1, 4096)
    assert ss(shape, inner, 256, 2) == (256, 32, 4096)
    # all 2048 positions of an 8B model: a 16 MiB inner chunk per (example, layer), 32 of them per object
    shape = (10_000, 32, 2048, 4096)
    inner = cs(shape, 256, 2, has_position=True)
    assert inner == (1, 1, 2048, 4096)
    shard = ss(shape, inner, 256, 2)
    nbytes = int(np.prod(shard)) * 2
    assert 64 * MiB <= nbytes <= 512 * MiB and 256 % shard[0] == 0 and shard[2:] == (2048, 4096)
    # never across work shards: a prime work shard size leaves a whole work shard (or one example) per object
    shape = (700, 4, 131072)
    inner = cs(shape, 37, 4, has_position=False)
    shard = ss(shape, inner, 37, 4)
    assert 37 % shard[0] == 0 and int(np.prod(shard)) * 4 <= 512 * MiB
    # a 64 MiB layer per work shard: 8 layers per object, 4 objects per work shard
    shape = (1000, 32, 65536)
    assert ss(shape, cs(shape, 256, 4, has_position=False), 256, 4) == (256, 8, 65536)
    # layers are split evenly: 3 objects of 11 or fewer layers, not 15 + 15 + 3
    shape = (1000, 33, 65536)
    assert ss(shape, cs(shape, 256, 2, has_position=False), 256, 2) == (256, 11, 65536)
    # positions split into inner chunks are rounded up to whole inner chunks in the object
    assert ss((10, 2, 5, 16), (1, 1, 3, 16), 4, 4)[2] == 6


def test_small_shard_objects_roundtrip_and_concurrent_layout(tmp_path, monkeypatch):
    # tiny limits: several objects per work shard (along examples and layers), positions split in inner chunks
    monkeypatch.setattr(store_mod, "MAX_CHUNK_BYTES", 200)
    monkeypatch.setattr(store_mod, "MAX_SHARD_BYTES", 900)
    url = tmp_path / "s.zarr"
    arrays = [
        ArraySpec("resid_post", "resid_post", (0, 1, 2), 5, 16, "hidden", dtype="float32"),
        ArraySpec("mlp_act", "mlp_act", (0, 2), None, 10, "neuron"),  # layers 0 and 2 of 0..2: two runs
    ]
    st = make(url, arrays=arrays, n=30, shard=12)
    g = zarr.open_group(str(url), path="base/cities", mode="r")
    for name in ("resid_post", "mlp_act"):
        za = g[name]
        assert za.shards is not None and 12 % za.shards[0] == 0, (name, za.shards)
        assert all(s % c == 0 for s, c in zip(za.shards, za.chunks))
    written = fill(st, seed=3)
    check_against(open_store(url), reference(st, written))
    assert st.check(checksums=True).ok
    # every object belongs to exactly one work shard
    for grid in st._grids():
        if grid.per_shard:
            keys = [k for i in range(st.n_shards) for k in grid.keys(i)]
            assert len(keys) == len(set(keys)) and all(grid.shard_of(k) is not None for k in keys)


def test_sharded_store_has_fewer_objects_and_plain_xarray_opens_it(tmp_path):
    arrays = [ArraySpec("resid_post", "resid_post", tuple(range(8)), None, 64, "hidden")]
    new, old = tmp_path / "new.zarr", tmp_path / "old.zarr"
    a = make(new, arrays=arrays, n=40, shard=10)
    b = ActivationStore.create_or_open(old, "base/cities", n_examples=40, shard_size=10, arrays=arrays,
                                       coords=coords(40), token_ids=token_ids(40)[0], provenance=PROV, sharded=False)
    wa, wb = fill(a, seed=1), fill(b, seed=1)
    n_new = len(list((new / "base/cities/resid_post").glob("c.*")))
    n_old = len(list((old / "base/cities/resid_post").glob("c.*")))
    assert (n_new, n_old) == (4, 32)  # one object per work shard vs one per (work shard, layer)
    ref = reference(a, wa)
    check_against(open_store(new), ref)
    check_against(open_store(old), reference(b, wb))
    # plain xarray, without and (after the run's finish) with consolidated metadata
    check_against(xr.open_zarr(str(new), group="base/cities", consolidated=False), ref)
    a.finish()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_against(xr.open_zarr(str(new), group="base/cities"), ref)


# ------------------------------------------------------------------------- format 2


def test_format2_store_written_by_the_old_layout_reads_checks_and_resumes(tmp_path):
    url = tmp_path / "f2.zarr"
    ids, _ = token_ids()
    kw = dict(n_examples=22, shard_size=SHARD, arrays=None, coords=coords(), token_ids=ids, provenance=PROV)
    st = ActivationStore.create_or_open(url, "base/cities", **{**kw, "arrays": __import__("tests.test_store").test_store.specs()},
                                        sharded=False)
    assert st.format == 2
    g = zarr.open_group(str(url), path="base/cities", mode="r")
    assert g["resid_post"].shards is None and g.attrs["mechdiff_store"]["format"] == 2
    written = fill(st, order=[0, 2])
    # the current code opens it (a resume with the default sharded=True keeps its layout) and finishes it
    again = make(url)
    assert again.format == 2 and again.missing_shards() == [1, 3, 4]
    for i in (1, 3, 4):
        written[i] = random_shard(again, i, np.random.default_rng(i))
        again.write_shard(i, written[i])
    check_against(open_store(url), reference(again, written))
    assert again.check(checksums=True).ok
    # a missing chunk of a format-2 store is still found by the listing
    (url / "base/cities/mlp_act" / next(g for g in again._grids() if g.name == "mlp_act").keys(3)[0]).unlink()
    assert again.missing_shards() == [3]


# ------------------------------------------------------------------------- damaged shard objects


def _object(url, st: ActivationStore, array: str, shard: int):
    grid = next(g for g in st._grids() if g.name == array)
    assert grid.sharded
    return url / "base/cities" / array / grid.keys(shard)[0]


def test_missing_shard_object_is_found_and_its_work_shard_redone(tmp_path):
    url = tmp_path / "m.zarr"
    st = make(url)
    written = fill(st)
    _object(url, st, "resid_post", 2).unlink()
    assert st.missing_shards() == [2] and st.check().damaged_shards == [2]
    with pytest.raises(StoreCorruptError, match=r"resid_post \(shard 2\).*missing"):
        open_store(url)
    st.write_shard(2, written[2])
    assert st.missing_shards() == [] and st.check(checksums=True).ok
    check_against(open_store(url), reference(st, written))


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_truncated_or_flipped_shard_object_fails_checks_and_reads(tmp_path, damage):
    url = tmp_path / "t.zarr"
    st = make(url)
    written = fill(st)
    f = _object(url, st, "mlp_act", 1)
    data = bytearray(f.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 3] ^= 0xFF
    f.write_bytes(bytes(data))
    before = tree(url)
    rep = st.check(checksums=True)
    assert rep.damaged_shards == [1] and rep.problems[0].problem == "checksum mismatch"
    ds = open_store(url)  # presence is fine
    with pytest.raises(StoreCorruptError, match=r"mlp_act \(shard 1\).*checksum"):
        ds["mlp_act"].values
    assert tree(url) == before
    # the repair: take the flag down, the next extraction rewrites exactly that work shard
    st.clear_done(rep.damaged_shards)
    assert st.missing_shards() == [1]
    st.write_shard(1, written[1])  # replaces the damaged object instead of merging into it
    assert st.check(checksums=True).ok
    check_against(open_store(url), reference(st, written))


# ------------------------------------------------------------------------- bfloat16


def test_bfloat16_roundtrip_is_exact_and_lazy(tmp_path):
    import torch

    url = tmp_path / "bf.zarr"
    arrays = [
        ArraySpec("resid_post", "resid_post", (0, 1), 3, 16, "hidden", dtype="bfloat16"),
        ArraySpec("mlp_act", "mlp_act", (1,), None, 24, "neuron", dtype="bfloat16", compression=None),
    ]
    st = make(url, arrays=arrays)
    assert st.arrays[0].dtype == "bfloat16" and st.arrays[0].storage_dtype == np.uint16
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for i in range(st.n_shards - 1):  # the last shard stays unwritten: NaN
        n = len(st.shard_range(i))
        t = {a.name: (torch.randn(a.shard_shape(n), generator=g) * 300).to(torch.bfloat16) for a in st.arrays}
        t["resid_post"][0, 0, 0, :3] = torch.tensor([float("inf"), float("-inf"), float("nan")])
        tensors[i] = t
        # what extraction hands the store: numpy float32 (the bf16 values widened)
        st.write_shard(i, {k: v.float().numpy() for k, v in t.items()})
    ds = open_store(url)
    for name in ("resid_post", "mlp_act"):
        var = ds[name]
        assert var.dtype == np.float32 and var.chunks is not None  # lazy, dask-backed
        got = var.values
        for i, t in tensors.items():
            r = st.shard_range(i)
            want = t[name].float().numpy()
            sel = got[r.start : r.stop][:, [1]] if name == "mlp_act" else got[r.start : r.stop]
            np.testing.assert_array_equal(sel, want)
            np.testing.assert_array_equal(sel.view(np.uint32), want.view(np.uint32))  # the very bits
        assert np.isnan(got[20:]).all()  # unwritten shard
    assert np.isnan(ds["mlp_act"].values[:, 0]).all()  # an uncaptured layer
    # plain xarray shows the bit patterns, and says what they are
    plain = xr.open_zarr(str(url), group="base/cities", consolidated=False)
    assert plain["mlp_act"].dtype == np.uint16 and plain["mlp_act"].attrs["mechdiff_dtype"] == "bfloat16"
    assert st.check(checksums=True).ok


def test_bfloat16_rounding_bits_and_overflow(tmp_path):
    import torch

    x = torch.randn(1000, dtype=torch.float32) * 1e3
    x[:4] = torch.tensor([1.00390625, 1.01171875, -0.0, 3.3e38])  # ties to even, a negative zero, near max
    bits = store_mod.float32_to_bf16_bits(x.numpy())
    want = x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(bits, want)
    spec = ArraySpec("a", "resid_post", (0,), None, 2, "hidden", dtype="bfloat16")
    with pytest.raises(OverflowError, match="overflows bfloat16"):
        store_mod.cast_to_spec(spec, np.array([[[3.4e38, 1.0]]], np.float32), [7])
    st = make(tmp_path / "b.zarr", arrays=[spec], n=4, shard=2)
    # bit patterns are taken as they are; other integer arrays are refused
    st.write_shard(0, {"a": store_mod.float32_to_bf16_bits(np.ones((2, 1, 2), np.float32))})
    with pytest.raises(TypeError, match="float"):
        st.write_shard(1, {"a": np.ones((2, 1, 2), np.int32)})
    np.testing.assert_array_equal(open_store(tmp_path / "b.zarr")["a"].values[:2], 1.0)
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        ArraySpec("a", "resid_post", (0,), None, 2, "hidden", dtype="int8")


# ------------------------------------------------------------------------- consolidation


def test_consolidated_once_at_finish_and_never_stale(tmp_path):
    url = tmp_path / "c.zarr"
    a = make(url, "base/cities")
    fill(a)
    a.finish()
    root = zarr.open_group(str(url), mode="r", use_consolidated=True)
    assert "base/cities/resid_post" in dict(root.metadata.consolidated_metadata.flattened_metadata)
    # a second group drops the root's copy (it would not list the new group): plain open_zarr still works
    b = make(url, "chat/cities", prov={**PROV, "model_id": "tiny/chat"})
    assert zarr.open_group(str(url), mode="r", use_consolidated=False).metadata.consolidated_metadata is None
    with pytest.warns(RuntimeWarning, match="consolidated"):
        assert xr.open_zarr(str(url), group="chat/cities").attrs["model_id"] == "tiny/chat"
    b.finish()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert xr.open_zarr(str(url), group="chat/cities").attrs["model_id"] == "tiny/chat"


# ------------------------------------------------------------------------- extending the example dim


def _more(n0: int, n: int, t: int = 5):
    ids, _ = token_ids(n, t=t, seed=n0)
    c = coords(n0 + n)
    return {k: v[n0:] for k, v in c.items()}, ids


def test_extend_interrupted_then_resumed(tmp_path, monkeypatch):
    url = tmp_path / "e.zarr"
    st = make(url, n=20, shard=5)
    written = fill(st, order=[0, 1, 2, 3])
    st.finish()
    before = {name: open_store(url)[name].values for name in ("resid_post", "mlp_act")}
    new_coords, new_ids = _more(20, 12)  # 12 new examples: shards 4, 5 and a partial 6

    def killed(self, n_shards):
        raise RuntimeError("killed between the arrays' resize and the flags")

    monkeypatch.setattr(ActivationStore, "_extend_flags", killed)
    with pytest.raises(RuntimeError, match="killed"):
        st.extend(12, new_coords, new_ids, provenance={"dataset_hash": "data456+12"})
    monkeypatch.undo()
    # the interrupted extension is seen by every handle: nothing writes or reads it half-made
    half = ActivationStore.open(url, "base/cities")
    assert half.extending == 32 and half.n_examples == 20
    with pytest.raises(StoreIncompleteError, match="extended to 32"):
        half.write_shard(0, written[0])
    with pytest.raises(StoreIncompleteError, match="extend"):
        open_store(url)
    with pytest.raises(StoreIncompleteError, match="unfinished"):
        half.extend(5, *_more(20, 5))
    # plain readers never see a stale consolidated copy of the old shapes
    assert zarr.open_group(str(url), mode="r", use_consolidated=False).metadata.consolidated_metadata is None

    half.extend(12, new_coords, new_ids, provenance={"dataset_hash": "data456+12"})  # the resume
    assert half.extending is None and half.n_examples == 32 and half.n_shards == 7
    assert half.provenance["dataset_hash"] == "data456+12"
    assert half.done_shards() == [0, 1, 2, 3] and half.missing_shards() == [4, 5, 6]
    ds = open_store(url)
    for name, old in before.items():
        np.testing.assert_array_equal(ds[name].values[:20], old)  # existing data untouched
        assert np.isnan(ds[name].values[20:]).all()
    ids = ds["token_ids"].values
    assert ids.shape == (32, 7) and (ids[20:, :2] == -1).all()  # narrower ids, padded on the left
    np.testing.assert_array_equal(ids[20:, 2:], new_ids)
    assert list(ds["example"].values) == list(range(32))
    assert [str(x) for x in ds["text"].values[20:]] == list(new_coords["text"])
    for i in (4, 5, 6):
        written[i] = random_shard(half, i, np.random.default_rng(i))
        half.write_shard(i, written[i])
    check_against(open_store(url), reference(half, written))
    assert half.check(checksums=True).ok
    half.finish()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert xr.open_zarr(str(url), group="base/cities").sizes["example"] == 32


def test_extend_bad_input_touches_nothing(tmp_path):
    url = tmp_path / "x.zarr"
    st = make(url)  # 22 examples: not whole work shards of 5
    before = tree(url)
    with pytest.raises(ValueError, match="whole work shards"):
        st.extend(5, *_more(22, 5))
    st = make(tmp_path / "y.zarr", n=20, shard=5)
    before = tree(tmp_path / "y.zarr")
    c, ids = _more(20, 5)
    with pytest.raises(ValueError, match="wide"):
        st.extend(5, c, np.full((5, 9), 1, np.int32))
    with pytest.raises(ValueError, match="coords of the new examples"):
        st.extend(5, {k: v for k, v in c.items() if k != "topic"}, ids)
    with pytest.raises(ValueError, match="coord 'label'"):
        st.extend(5, {**c, "label": np.array(["a"] * 5)}, ids)
    with pytest.raises(ValueError, match="n_new_examples"):
        st.extend(0, c, ids)
    assert tree(tmp_path / "y.zarr") == before
