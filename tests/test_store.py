"""Tests for mechdiff.engine.store: layout, shard writes, done flags, mismatch checks, remote URLs."""

from __future__ import annotations

import hashlib
import socket
import threading
import uuid
import warnings
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr

from mechdiff.engine import store as store_mod
from mechdiff.engine.store import (
    ActivationStore,
    ArraySpec,
    StoreMismatchError,
    list_groups,
    open_store,
    store_info,
)

N_EX = 22
SHARD = 5  # 5 shards, the last one partial (2 examples)
T = 7

PROV = {
    "model_id": "tiny/base",
    "revision": None,
    "weights_hash": "1a2b3c4d5e6f7a8b9c0d",
    "dtype": "float32",
    "tokenizer_hash": "tok123",
    "template": None,
    "dataset_hash": "data456",
    "capture_spec": {"sites": ["resid_post", "mlp_act"], "positions": "last:3"},
    "mechdiff_version": "0.1.0",
}


def specs() -> list[ArraySpec]:
    return [
        ArraySpec("resid_post", "resid_post", (0, 1, 2), 3, 16, "hidden"),  # fp16, 4-d
        ArraySpec("mlp_act", "mlp_act", (1, 2), None, 24, "neuron", dtype="float32"),  # fp32, 3-d
        ArraySpec("attn_out", "attn_out", (0, 2), 2, 16, "hidden", dtype="float32", compression=None),  # layers 0,2 of 0..2
    ]


def token_ids(n: int = N_EX, t: int = T, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, t + 1, size=n)
    ids = np.full((n, t), -1, np.int32)
    for i, k in enumerate(lengths):
        ids[i, t - k :] = rng.integers(0, 500, size=k)
    return ids, lengths


def coords(n: int = N_EX) -> dict[str, np.ndarray]:
    return {
        "text": np.array([f"statement number {i} é" for i in range(n)]),
        "label": np.arange(n) % 2,
        "topic": np.array(["geo", "sci", "art"] * n)[:n],
    }


# what must match: the store's default keys, and this file's own capture record (not a mechdiff capture)
IDENTITY = ("model_id", "weights_hash", "tokenizer_hash", "dataset_hash", "capture_spec")


def make(url, group="base/cities", *, prov=PROV, arrays=None, n=N_EX, shard=SHARD, so=None) -> ActivationStore:
    ids, _ = token_ids(n)
    return ActivationStore.create_or_open(
        url,
        group,
        n_examples=n,
        shard_size=shard,
        arrays=arrays or specs(),
        coords=coords(n),
        token_ids=ids,
        provenance=prov,
        identity_keys=IDENTITY,
        storage_options=so,
    )


def random_shard(st: ActivationStore, i: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    n = len(st.shard_range(i))
    return {s.name: (rng.standard_normal(s.shard_shape(n)) * 10).astype(np.float32) for s in st.arrays}


def fill(st: ActivationStore, seed: int = 0, order=None) -> dict[int, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    order = list(order) if order is not None else list(rng.permutation(st.n_shards))
    written = {}
    for i in order:
        written[int(i)] = random_shard(st, int(i), rng)
        st.write_shard(int(i), written[int(i)])
    return written


def reference(st: ActivationStore, written: dict[int, dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Full arrays as a reader should see them: NaN at uncaptured layers/positions and unwritten shards."""
    out = {}
    L, P = len(st.layers), st.n_positions
    for s in st.arrays:
        shape = (st.n_examples, L, *((P,) if s.n_positions is not None else ()), s.width)
        ref = np.full(shape, np.nan, dtype=s.dtype)
        for i, d in written.items():
            r = st.shard_range(i)
            for j, layer in enumerate(s.layers):
                k = st.layers.index(layer)
                v = d[s.name][:, j].astype(s.dtype)
                if s.n_positions is None:
                    ref[r.start : r.stop, k] = v
                else:
                    ref[r.start : r.stop, k, P - s.n_positions :] = v
        out[s.name] = ref
    return out


def check_against(ds: xr.Dataset, ref: dict[str, np.ndarray]) -> None:
    for name, r in ref.items():
        got = ds[name].values
        assert got.dtype == r.dtype, name
        np.testing.assert_array_equal(got, r, err_msg=name)  # NaN == NaN here; exact otherwise


def tree(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------- round trip


def test_roundtrip_shuffled_shards_local(tmp_path):
    url = tmp_path / "store.zarr"
    st = make(url)
    assert st.n_shards == 5 and st.shard_range(4) == range(20, 22) and st.shard_range(0) == range(0, 5)
    assert st.done_shards() == [] and st.missing_shards() == [0, 1, 2, 3, 4] and st.fraction_done() == 0.0
    written = fill(st, order=[3, 0, 4, 2, 1])
    assert st.done_shards() == [0, 1, 2, 3, 4] and st.fraction_done() == 1.0 and st.missing_shards() == []
    ref = reference(st, written)
    # fp16 stored equals astype(float16); fp32 exact; uncaptured layer 0 of mlp_act / layer 1 of attn_out stay NaN
    assert np.isnan(ref["mlp_act"][:, 0]).all() and np.isnan(ref["attn_out"][:, 1]).all()
    assert not np.isnan(ref["resid_post"]).any()

    ds = open_store(url, "base/cities")
    check_against(ds, ref)
    st.finish()  # the run's end: the root's metadata is consolidated once
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no consolidated-metadata or dtype warnings for plain xarray
        plain = xr.open_zarr(str(url), group="base/cities")
        check_against(plain, ref)

    # dims and coords
    assert plain["resid_post"].dims == ("example", "layer", "position", "hidden")
    assert plain["mlp_act"].dims == ("example", "layer", "neuron")
    assert plain["attn_out"].dims == ("example", "layer", "position", "hidden")
    np.testing.assert_array_equal(plain["example"].values, np.arange(N_EX))
    np.testing.assert_array_equal(plain["layer"].values, [0, 1, 2])
    np.testing.assert_array_equal(plain["position"].values, [-3, -2, -1])
    np.testing.assert_array_equal(plain["tok"].values, np.arange(-T, 0))
    ids, lengths = token_ids()
    np.testing.assert_array_equal(plain["token_ids"].values, ids)
    assert plain["token_ids"].dtype == np.int32 and plain["token_ids"].dims == ("example", "tok")
    np.testing.assert_array_equal(plain["n_tokens"].values, lengths)
    c = coords()
    assert [str(x) for x in plain["text"].values] == list(c["text"])
    assert [str(x) for x in plain["topic"].values] == list(c["topic"])
    np.testing.assert_array_equal(plain["label"].values, c["label"])
    for name in ("text", "label", "topic", "n_tokens", "token_ids"):
        assert name in plain.coords
    assert set(plain.data_vars) == {"resid_post", "mlp_act", "attn_out"}  # no _progress, no token_ids

    # attrs: provenance + bookkeeping, JSON values
    for k, v in PROV.items():
        assert plain.attrs[k] == v, k
    assert plain.attrs["shard_size"] == SHARD and plain.attrs["n_shards"] == 5 and plain.attrs["n_examples"] == N_EX
    assert "created" in plain.attrs
    assert plain["mlp_act"].attrs["captured_layers"] == [1, 2] and plain["mlp_act"].attrs["site"] == "mlp_act"
    assert st.provenance == PROV

    # selecting by position offset and layer works like any xarray dataset
    last = ds["resid_post"].sel(layer=2, position=-1).values
    np.testing.assert_array_equal(last[5:10], written[1]["resid_post"][:, 2, -1].astype(np.float16))

    # data is lazy
    assert ds["resid_post"].chunks is not None


def test_chunks_and_compression(tmp_path):
    url = tmp_path / "c.zarr"
    st = make(url)
    g = zarr.open_group(str(url), path="base/cities", mode="r")
    assert g["resid_post"].chunks == (SHARD, 1, 3, 16)
    assert g["mlp_act"].chunks == (SHARD, 1, 24)
    assert g["resid_post"].dtype == np.float16 and g["mlp_act"].dtype == np.float32
    # every chunk carries a crc32c of its bytes, compressed or not
    assert [type(c).__name__ for c in g["resid_post"].compressors] == ["ZstdCodec", "Crc32cCodec"]
    assert [type(c).__name__ for c in g["attn_out"].compressors] == ["Crc32cCodec"]
    assert [type(c).__name__ for c in g["token_ids"].compressors] == ["ZstdCodec", "Crc32cCodec"]
    done = g["_progress/done"]
    assert done.shape == (5,) and done.chunks == (1,) and done.dtype == bool
    assert list(g["resid_post"].metadata.dimension_names) == ["example", "layer", "position", "hidden"]
    assert st.info().arrays[0].chunks == (SHARD, 1, 3, 16)
    ds = open_store(url)
    assert ds["resid_post"].encoding["chunks"] == (SHARD, 1, 3, 16)
    assert ds["resid_post"].data.chunksize == (SHARD, 1, 3, 16)


def test_chunk_sizes_for_large_arrays(tmp_path):
    mb16 = store_mod.MAX_CHUNK_BYTES
    cs = store_mod._chunk_shape
    # small: one shard per chunk
    assert cs((1000, 32, 4096), 100, 2, has_position=False) == (100, 1, 4096)
    # 48 x 512 KiB = 24 MiB: largest divisor of 48 that fits is 24
    assert cs((96, 4, 131072), 48, 4, has_position=False) == (24, 1, 131072)
    # prime shard size: only 1 divides it
    assert cs((200, 4, 131072), 37, 4, has_position=False) == (1, 1, 131072)
    # one example's positions over the limit: split positions evenly
    shape = cs((10, 2, 100, 65536), 8, 4, has_position=True)
    assert shape == (1, 1, 50, 65536) and 50 * 65536 * 4 <= mb16
    # fewer examples than the shard size
    assert cs((3, 2, 8), 100, 2, has_position=False) == (3, 1, 8)
    # the sizes land in the created group, without writing any data
    arrays = [ArraySpec("mlp_act", "mlp_act", (0, 1, 2, 3), None, 131072, "neuron", dtype="float32")]
    st = make(tmp_path / "big.zarr", arrays=arrays, n=96, shard=48)
    za = zarr.open_group(str(tmp_path / "big.zarr"), path="base/cities", mode="r")["mlp_act"]
    assert za.chunks == (24, 1, 131072)
    assert 1 * 2**20 <= 24 * 131072 * 4 <= mb16
    assert st.estimate_nbytes_for(96, arrays) == 96 * 4 * 131072 * 4
    assert st.estimate_nbytes() == 96 * 4 * 131072 * 4 + 96 * T * 4
    assert sum(f.stat().st_size for f in (tmp_path / "big.zarr").rglob("*") if f.is_file()) < 100_000


def test_writes_with_chunks_smaller_than_shards(tmp_path, monkeypatch):
    # Shrink the chunk limit so shards span several example chunks and positions split too.
    monkeypatch.setattr(store_mod, "MAX_CHUNK_BYTES", 200)
    url = tmp_path / "small.zarr"
    arrays = [
        ArraySpec("resid_post", "resid_post", (0, 1), 5, 16, "hidden", dtype="float32"),  # 320 B per example > 200
        ArraySpec("mlp_act", "mlp_act", (1,), None, 10, "neuron"),  # 20 B per example: at most 10 fit
    ]
    st = make(url, arrays=arrays, n=30, shard=12)
    g = zarr.open_group(str(url), path="base/cities", mode="r")
    assert g["resid_post"].chunks == (1, 1, 3, 16)  # 200 // 64 = 3 positions; 5 -> 2 chunks of 3
    assert g["mlp_act"].chunks == (6, 1, 10)  # largest divisor of 12 with 20*d <= 200
    written = fill(st, seed=3)
    check_against(open_store(url), reference(st, written))


def test_unsorted_layers_and_single_position(tmp_path):
    arrays = [ArraySpec("resid_post", "resid_post", (3, 1), 1, 8, "hidden", dtype="float32")]
    st = make(tmp_path / "u.zarr", arrays=arrays, n=6, shard=3)
    assert st.layers == (1, 3)
    written = fill(st, seed=1)
    ds = open_store(tmp_path / "u.zarr")
    assert ds["resid_post"].dims == ("example", "layer", "position", "hidden")
    np.testing.assert_array_equal(ds["resid_post"].sel(layer=3).values[:3, 0], written[0]["resid_post"][:, 0, 0])
    np.testing.assert_array_equal(ds["resid_post"].sel(layer=1).values[:3, 0], written[0]["resid_post"][:, 1, 0])


def test_partial_progress_reads_nan_and_reopen(tmp_path):
    url = tmp_path / "p.zarr"
    st = make(url)
    written = fill(st, order=[1, 3])
    # a worker re-opening (by open, or by create_or_open with the same arguments) sees the same progress
    assert ActivationStore.open(url, "base/cities").done_shards() == [1, 3]
    again = make(url)
    assert again.missing_shards() == [0, 2, 4] and again.fraction_done() == pytest.approx(0.4)
    check_against(open_store(url, "base/cities"), reference(st, written))
    # a retry overwrites a shard
    rng = np.random.default_rng(9)
    written[1] = random_shard(st, 1, rng)
    again.write_shard(1, written[1])
    check_against(open_store(url, "base/cities"), reference(st, written))


def test_concurrent_writers_of_different_shards(tmp_path):
    url = tmp_path / "cc.zarr"
    make(url, n=40, shard=4)
    rng = np.random.default_rng(5)
    handles = [ActivationStore.open(url, "base/cities") for _ in range(4)]
    written = {i: random_shard(handles[0], i, rng) for i in range(10)}
    errors = []

    def worker(k: int) -> None:
        try:
            for i in range(k, 10, 4):
                handles[k].write_shard(i, written[i])
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    st = ActivationStore.open(url, "base/cities")
    assert st.done_shards() == list(range(10))
    check_against(open_store(url), reference(st, written))


# ------------------------------------------------------------------------- done flags and failures


def test_flag_only_after_data(tmp_path, monkeypatch):
    url = tmp_path / "f.zarr"
    st = make(url)
    rng = np.random.default_rng(2)
    data = random_shard(st, 2, rng)

    def crash(self, i):
        raise RuntimeError("worker killed between data and flag")

    monkeypatch.setattr(ActivationStore, "_mark_done", crash)
    with pytest.raises(RuntimeError, match="killed"):
        st.write_shard(2, data)
    monkeypatch.undo()
    # data is there, the flag is not
    assert st.done_shards() == [] and 2 in st.missing_shards()
    ds = open_store(url)
    np.testing.assert_array_equal(ds["mlp_act"].values[10:15, 1:], data["mlp_act"])
    assert not (url / "base/cities/_progress/done/c.2").exists()

    # a failure half-way through the arrays leaves no flag either
    calls = []
    real = ActivationStore._write_array

    def fail_second(self, name, rng_, values):
        calls.append(name)
        if len(calls) == 2:
            raise OSError("disk full")
        real(self, name, rng_, values)

    monkeypatch.setattr(ActivationStore, "_write_array", fail_second)
    with pytest.raises(OSError):
        st.write_shard(0, random_shard(st, 0, rng))
    monkeypatch.undo()
    assert st.done_shards() == []
    st.write_shard(2, data)  # the retry succeeds and sets the flag
    assert st.done_shards() == [2]
    assert (url / "base/cities/_progress/done/c.2").exists()


def test_overflow_raises_and_writes_nothing(tmp_path):
    url = tmp_path / "o.zarr"
    st = make(url)
    rng = np.random.default_rng(4)
    data = random_shard(st, 1, rng)
    data["resid_post"][3, 2, 1, 5] = 70000.0  # finite in fp32, inf in fp16
    before = tree(url)
    with pytest.raises(OverflowError, match=r"resid_post.*example 8"):
        st.write_shard(1, data)
    assert tree(url) == before and st.done_shards() == []
    # inf and nan that were already there are kept, not reported
    data["resid_post"][3, 2, 1, 5] = np.inf
    data["resid_post"][0, 0, 0, 0] = np.nan
    st.write_shard(1, data)
    got = open_store(url)["resid_post"].values
    assert np.isposinf(got[8, 2, 1, 5]) and np.isnan(got[5, 0, 0, 0])
    # float32 arrays take large values as they are
    assert st.done_shards() == [1]


def test_write_shard_validation(tmp_path):
    st = make(tmp_path / "v.zarr")
    rng = np.random.default_rng(0)
    good = random_shard(st, 4, rng)
    with pytest.raises(ValueError, match="missing arrays \\['mlp_act'\\]"):
        st.write_shard(4, {k: v for k, v in good.items() if k != "mlp_act"})
    with pytest.raises(ValueError, match="unexpected arrays \\['extra'\\]"):
        st.write_shard(4, {**good, "extra": good["mlp_act"]})
    with pytest.raises(ValueError, match="resid_post: shape"):
        st.write_shard(4, {**good, "resid_post": good["resid_post"][:1]})
    with pytest.raises(TypeError, match="float"):
        st.write_shard(4, {**good, "mlp_act": good["mlp_act"].astype(np.int32)})
    with pytest.raises(IndexError):
        st.write_shard(5, good)
    assert st.done_shards() == []


# ------------------------------------------------------------------------- identity checks


@pytest.mark.parametrize(
    "change, fragments",
    [
        ({"model_id": "tiny/chat", "weights_hash": "ffff0000eeee"}, ["made by model 'tiny/base'", "1a2b3c4d5e6f", "this run uses model 'tiny/chat'"]),
        ({"weights_hash": "9999"}, ["was made by model 'tiny/base'", "1a2b3c4d5e6f", "9999"]),
        ({"tokenizer_hash": "tokXYZ"}, ["tokenizer_hash", "'tok123'", "'tokXYZ'"]),
        ({"dataset_hash": "other"}, ["dataset_hash", "'data456'", "'other'"]),
        ({"capture_spec": {"sites": ["resid_post"], "positions": "last"}}, ["capture_spec", "last:3"]),
    ],
)
def test_mismatch_names_key_and_touches_nothing(tmp_path, change, fragments):
    url = tmp_path / "m.zarr"
    st = make(url)
    fill(st, order=[0])
    before = tree(url)
    with pytest.raises(StoreMismatchError) as ei:
        make(url, prov={**PROV, **change})
    msg = str(ei.value)
    assert "\n" not in msg and str(url) in msg and "base/cities" in msg
    for f in fragments:
        assert f in msg, (f, msg)
    assert tree(url) == before


def test_mismatch_on_structure_and_other_keys_ignored(tmp_path):
    url = tmp_path / "s.zarr"
    make(url)
    before = tree(url)
    with pytest.raises(StoreMismatchError, match="shard_size differs: stored 5, this run 4"):
        make(url, shard=4)
    with pytest.raises(StoreMismatchError, match="n_examples differs"):
        make(url, n=N_EX + 1)
    with pytest.raises(StoreMismatchError, match="array mlp_act differs"):
        make(url, arrays=[*specs()[:1], ArraySpec("mlp_act", "mlp_act", (2,), None, 24, "neuron", dtype="float32"), specs()[2]])
    assert tree(url) == before
    # keys outside identity_keys (e.g. the mechdiff version) may change
    st = make(url, prov={**PROV, "mechdiff_version": "0.2.0"})
    assert st.provenance["mechdiff_version"] == "0.1.0"


def test_not_an_activation_group(tmp_path):
    url = tmp_path / "x.zarr"
    zarr.open_group(str(url), path="base/cities", mode="w", zarr_format=3)
    with pytest.raises(StoreMismatchError, match="not a mechdiff activation group"):
        make(url)
    with pytest.raises(FileNotFoundError):
        ActivationStore.open(url, "base/other")


def test_bad_create_arguments(tmp_path):
    ids, _ = token_ids()
    kw = dict(n_examples=N_EX, shard_size=SHARD, arrays=specs(), coords=coords(), token_ids=ids, provenance=PROV)
    left = np.full((N_EX, T), -1, np.int32)
    left[:, 0] = 1  # left-aligned
    with pytest.raises(ValueError, match="right-aligned"):
        ActivationStore.create_or_open(tmp_path / "a.zarr", "g", **{**kw, "token_ids": left})
    with pytest.raises(ValueError, match="coord 'label'"):
        ActivationStore.create_or_open(tmp_path / "a.zarr", "g", **{**kw, "coords": {"label": np.zeros(3)}})
    with pytest.raises(ValueError, match="reserved"):
        ActivationStore.create_or_open(tmp_path / "a.zarr", "g", **{**kw, "provenance": {"shard_size": 3}})
    with pytest.raises(ValueError, match="disagree"):
        ActivationStore.create_or_open(
            tmp_path / "a.zarr", "g",
            **{**kw, "arrays": [ArraySpec("a", "resid_post", (0,), None, 8, "hidden"), ArraySpec("b", "attn_out", (0,), None, 9, "hidden")]},
        )
    with pytest.raises(ValueError, match="dim"):
        ArraySpec("a", "resid_post", (0,), None, 8, "width")
    with pytest.raises(ValueError, match="compression"):
        ArraySpec("a", "resid_post", (0,), None, 8, "hidden", compression="lz4")
    assert not (tmp_path / "a.zarr").exists()


# ------------------------------------------------------------------------- discovery


def test_groups_listing_and_open_store_discovery(tmp_path):
    url = tmp_path / "multi.zarr"
    a = make(url, "base/cities")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # one group: open_store finds it
        assert set(open_store(url).data_vars) == {"resid_post", "mlp_act", "attn_out"}
        b = make(url, "chat/cities", prov={**PROV, "model_id": "tiny/chat"})
        fill(a, order=[0, 1])
        fill(b)
        b.finish()
        assert list_groups(url) == ["base/cities", "chat/cities"]
        with pytest.raises(ValueError, match="2 activation groups.*base/cities, chat/cities"):
            open_store(url)
        # the root's consolidated metadata was written by the finish, with the second group
        assert xr.open_zarr(str(url), group="chat/cities").attrs["model_id"] == "tiny/chat"
    infos = {i.group: i for i in store_info(url)}
    assert infos["base/cities"].fraction_done == pytest.approx(0.4)
    assert infos["chat/cities"].fraction_done == 1.0
    assert infos["chat/cities"].provenance["model_id"] == "tiny/chat"
    arr = {x.name: x for x in infos["base/cities"].arrays}
    assert arr["resid_post"].shape == (N_EX, 3, 3, 16) and arr["resid_post"].dtype == "float16"
    assert arr["mlp_act"].chunks == (SHARD, 1, 24)
    with pytest.raises(FileNotFoundError):
        list_groups(tmp_path / "missing.zarr")


def test_group_at_root(tmp_path):
    url = tmp_path / "root.zarr"
    st = make(url, group=None)
    written = fill(st)
    check_against(open_store(url), reference(st, written))
    assert list_groups(url) == [""]
    st.finish()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_against(xr.open_zarr(str(url)), reference(st, written))


# ------------------------------------------------------------------------- fsspec URLs


def test_memory_url():
    url = f"memory://mechdiff-{uuid.uuid4().hex}/store.zarr"
    st = make(url, "base/cities")
    written = fill(st, order=[4, 2])
    st2 = ActivationStore.open(url, "base/cities")
    assert st2.done_shards() == [2, 4]
    ref = reference(st, written)
    check_against(open_store(url, "base/cities"), ref)
    check_against(xr.open_zarr(url, group="base/cities"), ref)
    assert list_groups(url) == ["base/cities"]


@pytest.fixture(scope="module")
def s3_endpoint():
    from moto.server import ThreadedMotoServer

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


def test_s3_roundtrip(s3_endpoint, monkeypatch):
    import s3fs

    for var in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    so = {"client_kwargs": {"endpoint_url": s3_endpoint}, "key": "x", "secret": "x"}
    s3fs.S3FileSystem(**so, skip_instance_cache=True).mkdir("mechdiff-test")
    url = "s3://mechdiff-test/out/store.zarr"
    st = make(url, "base/cities", so=so)
    written = fill(st, order=[3, 1, 0])
    reopened = ActivationStore.open(url, "base/cities", storage_options=so)
    assert reopened.done_shards() == [0, 1, 3]
    ref = reference(st, written)
    check_against(open_store(url, storage_options=so), ref)
    st.finish()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_against(xr.open_zarr(url, group="base/cities", storage_options=so), ref)
    with pytest.raises(StoreMismatchError, match="dataset_hash"):
        make(url, "base/cities", prov={**PROV, "dataset_hash": "zzz"}, so=so)
    [info] = store_info(url, storage_options=so)
    assert info.group == "base/cities" and info.fraction_done == pytest.approx(0.6)
