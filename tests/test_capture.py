"""The capture spec: parsed once into typed parts, resolved against a model, recorded once in the store, compared
by one method that names the differing fields."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import zarr

from mechdiff.engine.batching import PromptTemplate
from mechdiff.engine.capture import CaptureSpec, LayerSelection, ResolvedCapture, capture_of, describe_differences
from mechdiff.engine.data import PromptSet, load_prompts
from mechdiff.engine.extract import extract
from mechdiff.engine.models import load_model
from mechdiff.engine.positions import PositionError, Positions
from mechdiff.engine.sites import SiteError
from mechdiff.engine.store import StoreMismatchError, open_store


def test_strings_are_parsed_once_into_typed_parts():
    spec = CaptureSpec(sites="resid_post, mlp_act", layers="0, 2:4", positions="last:3", template="chat")
    assert spec.sites == ("resid_post", "mlp_act")
    assert spec.layers == LayerSelection("0,2:4") and spec.positions == Positions("last", 3)
    assert spec.template == PromptTemplate("chat")
    # typed parts are taken as they are, and equal specs are equal whatever form they were given in
    assert CaptureSpec(("resid_post", "mlp_act"), LayerSelection.parse([0, 2, 3]), Positions.parse("last:3"),
                       PromptTemplate("chat")).resolve(6) == spec.resolve(6)
    assert hash(spec) == hash(CaptureSpec(sites="resid_post,mlp_act", layers="0,2:4", positions="last:3", template="chat"))


@pytest.mark.parametrize("kw, field, err, words", [
    ({"sites": "resid_mid"}, "sites", SiteError, "unknown site 'resid_mid'"),
    ({"layers": "two"}, "layers", SiteError, "layers 'two'"),
    ({"positions": "last:x"}, "positions", PositionError, "whole number"),
    ({"template": "User: {prompt}"}, "template", ValueError, "{text}"),
    ({"dtype": "int8"}, "dtype", ValueError, "float16, bfloat16, float32"),
])
def test_a_bad_field_fails_when_the_spec_is_made_naming_itself(kw, field, err, words):
    with pytest.raises(err) as e:
        CaptureSpec(**kw)
    assert words in str(e.value) and e.value.field == field


def test_resolve_against_a_model_and_round_trip_the_record():
    spec = CaptureSpec(layers="-2:", positions="post_instruction", template="Q: {text}\nA:", dtype="bfloat16")
    r = spec.resolve(5)
    assert r.layers == (3, 4) and r.n_layers == 5
    assert ResolvedCapture.from_json(json.loads(json.dumps(r.to_json()))) == r
    assert r.as_spec().resolve(5) == r
    with pytest.raises(SiteError, match="out of range"):
        CaptureSpec(layers="7").resolve(5)
    assert LayerSelection.parse("all").fixed is None and LayerSelection.parse("3,1").fixed == (3, 1)
    assert LayerSelection.parse("-1").fixed is None  # needs the model's depth


def test_differences_and_lacks_name_every_differing_field():
    have = CaptureSpec(sites="resid_post,mlp_out", layers="all", positions="last:2").resolve(4)
    want = CaptureSpec(sites="resid_post", layers="1,3", positions="last", template="chat", dtype="float32")
    fields = [d.field for d in have.differences(want)]
    assert fields == ["sites", "layers", "positions", "template", "dtype"]
    line = describe_differences(have.differences(want))
    assert "positions stored last:2, this run last," in line and "layers stored [0,1,2,3], this run [1,3]" in line
    # a reader asks less: a store with more sites and layers serves it, the dtype does not matter...
    assert have.lacks(CaptureSpec(sites="mlp_out", layers="1,3", positions="last:2", dtype="float32")) == []
    # ...but positions and template must be the same, and every site and layer must be there
    lack = have.lacks(CaptureSpec(sites="attn_out,resid_post", layers="all", positions="last", template="chat"))
    assert [d.field for d in lack] == ["sites", "positions", "template"]
    small = CaptureSpec(layers="0,1", positions="last:2").resolve(4)
    assert [d.field for d in small.lacks(CaptureSpec(layers="all", positions="last:2"))] == ["layers"]
    # without a model's depth, selections compare as selections: "all" covers any, a fixed list its subsets
    assert CaptureSpec(layers="all").lacks(CaptureSpec(layers="0,3")) == []
    assert CaptureSpec(layers="0,1,3").lacks(CaptureSpec(layers="3,0")) == []
    assert [d.field for d in CaptureSpec(layers="0,1").lacks(CaptureSpec(layers="all"))] == ["layers"]


def test_older_records_read_typed():
    old = {"capture_spec": json.dumps({"sites": ["resid_post"], "layers": [0, 1], "positions": "last:2", "template": "chat",
                                       "dtype": "float16", "compression": "zstd"}),
           "positions": "last:2", "template": "chat"}
    r = capture_of(old)
    assert r.layers == (0, 1) and r.positions == Positions("last", 2) and r.template.spec == "chat" and r.n_layers is None
    # positions and template alone (a store written without a spec record)
    bare = capture_of({"positions": "last:2", "template": "none"})
    assert bare.positions == Positions("last", 2) and bare.layers == ()
    assert capture_of({}) is None
    with pytest.raises(ValueError, match="not a capture record"):
        capture_of({"capture": {"sites": ["resid_post"]}})


def test_the_store_keeps_one_capture_record_and_open_store_returns_it_typed(tiny_dir, tmp_path):
    lm = load_model(str(tiny_dir("llama", n_layers=3)))
    ps = PromptSet.from_texts(["w1 w2 w3", "w4 w5 w6 w7", "w8 w9"])
    spec = CaptureSpec(sites="resid_post,mlp_act", layers="1:", positions="last:2")
    url = str(tmp_path / "s.zarr")
    extract(lm, ps, spec, url, "m/d", progress=False)
    attrs = dict(zarr.open_group(url, path="m/d", mode="r").attrs)
    assert attrs["capture"] == spec.resolve(3).to_json()
    assert not {"positions", "template", "capture_spec"} & set(attrs)
    ds = open_store(url, "m/d")
    assert ds.attrs["capture"] == spec.resolve(3)
    np.testing.assert_array_equal(ds["layer"].values, [1, 2])
    # appending with another spec is refused before any work, naming the fields
    with pytest.raises(StoreMismatchError, match=r'another capture spec: layers stored \[1,2\], this run \[2\], '
                                                 r'positions stored last:2, this run last'):
        extract(lm, ps, CaptureSpec(sites="resid_post,mlp_act", layers="2", positions="last"), url, "m/d", progress=False)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_captures_cast_on_the_device_equal_the_host_cast(tiny_dir, dtype):
    """``forward_capture(stored=True)`` casts on the model's device; the bytes equal casting the float32 capture
    on the host (bfloat16 to nearest-even, as its uint16 bits)."""
    from mechdiff.engine.extract import forward_capture, prepare
    from mechdiff.engine.store import cast_to_spec

    lm = load_model(str(tiny_dir("llama", n_layers=3)))
    ps = PromptSet.from_texts(["w1 w2 w3", "w4 w5", "w6 w7 w8 w9"])
    prep = prepare(lm, ps, CaptureSpec(sites="resid_post,mlp_act", positions="last:2", dtype=dtype))
    f32 = forward_capture(lm, prep, [0, 1, 2])
    dev = forward_capture(lm, prep, [0, 1, 2], stored=True)
    for a in prep.arrays:
        host = cast_to_spec(a, f32[a.name], [0, 1, 2])
        assert dev[a.name].dtype == a.storage_dtype == host.dtype
        np.testing.assert_array_equal(dev[a.name], host)


def test_a_float16_overflow_on_the_device_is_named_on_the_host(tiny_dir, tmp_path):
    from mechdiff.engine.sites import Add, hooks

    lm = load_model(str(tiny_dir("llama", n_layers=3)))
    ps = PromptSet.from_texts(["w1 w2 w3", "w4 w5"])
    big = Add("resid_pre", 1, torch.full((lm.adapter.d_model,), 1e6))  # pushes resid_post of layer 1 past fp16
    with hooks(lm.adapter, None, [big]), pytest.raises(OverflowError, match=r"resid_post.*layer 1.*float32"):
        extract(lm, ps, CaptureSpec(layers="all", dtype="float16"), str(tmp_path / "s.zarr"), "g", progress=False)


def test_a_bfloat16_store_equals_the_model_and_verifies(tiny_dir, tmp_path):
    """Extracted as bfloat16 (cast on the device), read back float32: the model's own activations rounded to
    bfloat16; ``verify_store`` re-runs examples and accepts it."""
    from mechdiff.engine.extract import forward_capture, prepare
    from mechdiff.engine.verify import verify_store

    lm = load_model(str(tiny_dir("llama", n_layers=3)))
    ps = PromptSet.from_texts(["w1 w2 w3", "w4 w5", "w6 w7 w8 w9", "w2 w9"])
    spec = CaptureSpec(sites="resid_post", positions="last:2", dtype="bfloat16")
    url = str(tmp_path / "b.zarr")
    extract(lm, ps, spec, url, "g", shard_size=2, progress=False)
    ds = open_store(url, "g")
    assert ds["resid_post"].dtype == np.float32 and ds.attrs["capture"].dtype == "bfloat16"
    want = torch.from_numpy(forward_capture(lm, prepare(lm, ps, spec), [0, 1, 2, 3])["resid_post"]).bfloat16().float()
    np.testing.assert_array_equal(ds["resid_post"].values, want.numpy())
    rep = verify_store(url, "g", model=lm, sample=3)
    assert rep.ok and rep.tolerance == 1e-2, rep


def test_a_grown_dataset_is_appended_and_an_interrupted_growth_resumes(tiny_dir, tmp_path, monkeypatch):
    """A streamed dataset: the group made from its first 4 rows grows by the next 4 (two more work shards), only
    they are extracted, and the result equals extracting all 8 at once. An append killed halfway is finished
    by the same call; a store whose rows are not the dataset's first rows is refused before any write."""
    from mechdiff.engine.store import ActivationStore, StoreIncompleteError

    lm = load_model(str(tiny_dir("llama", n_layers=3)))
    texts = ["w1 w2 w3", "w4 w5", "w6 w7 w8 w9", "w2 w9", "w3 w3 w1", "w5", "w8 w1", "w7 w6 w5"]
    spec = CaptureSpec(sites="resid_post", positions="last:2", dtype="float32")
    first, whole = PromptSet.from_texts(texts[:4]), PromptSet.from_texts(texts)
    url, ref = str(tmp_path / "s.zarr"), str(tmp_path / "ref.zarr")
    extract(lm, whole, spec, ref, "g", shard_size=2, progress=False)
    extract(lm, first, spec, url, "g", shard_size=2, progress=False)
    with pytest.raises(StoreMismatchError, match=r"holds 4 examples of another dataset.*extract with append \(--append\)"):
        extract(lm, whole, spec, url, "g", shard_size=2, progress=False)  # growing needs append
    # killed after the resize, before the growth is recorded
    real = ActivationStore._extend_flags

    def killed(self, n):
        raise KeyboardInterrupt

    monkeypatch.setattr(ActivationStore, "_extend_flags", killed)
    with pytest.raises(KeyboardInterrupt):
        extract(lm, whole, spec, url, "g", shard_size=2, progress=False, append=True)
    monkeypatch.setattr(ActivationStore, "_extend_flags", real)
    with pytest.raises(StoreIncompleteError, match="--append"):
        extract(lm, whole, spec, url, "g", shard_size=2, progress=False)
    rep = extract(lm, whole, spec, url, "g", shard_size=2, progress=False, append=True)
    assert (rep.shards_written, rep.shards_skipped, rep.n_examples) == (2, 2, 8)
    a, b = open_store(url, "g"), open_store(ref, "g")
    np.testing.assert_array_equal(a["resid_post"].values, b["resid_post"].values)
    np.testing.assert_array_equal(a["token_ids"].values, b["token_ids"].values)
    assert list(a["text"].values) == texts and a.attrs["dataset_hash"] == whole.hash
    # the stored rows must be the dataset's first rows
    shuffled = PromptSet.from_texts([texts[1], texts[0], *texts[2:], "w9 w9"])
    with pytest.raises(StoreMismatchError, match="example 0 of the dataset"):
        extract(lm, shuffled, spec, url, "g", shard_size=2, progress=False, append=True)


def test_extract_append_on_the_command_line(tiny_dir, tmp_path):
    from typer.testing import CliRunner

    from mechdiff.cli import app

    model = str(tiny_dir("llama", n_layers=3))
    rows = ["w1 w2", "w3 w4 w5", "w6", "w7 w8", "w9 w1", "w2 w2 w3"]
    (tmp_path / "a.csv").write_text("text\n" + "\n".join(rows[:2]) + "\n")
    (tmp_path / "b.csv").write_text("text\n" + "\n".join(rows) + "\n")
    base = ["extract", "--model", model, "--out", str(tmp_path / "s.zarr"), "--group", "g", "--shard-size", "2"]
    r = CliRunner().invoke(app, [*base, "--data", str(tmp_path / "a.csv")])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, [*base, "--data", str(tmp_path / "b.csv")])
    assert r.exit_code == 2 and "--append" in r.output, r.output  # refused before the model loads, with the way out
    r = CliRunner().invoke(app, [*base, "--data", str(tmp_path / "b.csv"), "--append"])
    assert r.exit_code == 0 and "6 examples, 2 shards written, 1 already done" in r.output, r.output


def test_extract_on_the_command_line_tokenizes_the_dataset_once(tiny_dir, tmp_path, monkeypatch):
    """The checks before the weights load tokenize the dataset; the extraction takes those ids (under the loaded
    tokenizer's key, after a spot check) instead of a second tokenization, and writes the same store."""
    from typer.testing import CliRunner

    from mechdiff.cli import app
    from mechdiff.engine import tokenization
    from mechdiff.engine.batching import tokenize
    from mechdiff.engine.tiny import random_prompts

    model = str(tiny_dir("llama", n_layers=2))
    n = 200
    (tmp_path / "d.csv").write_text("text\n" + "\n".join(random_prompts(n, 3, 12, vocab_size=512, seed=5)) + "\n")
    encoded = []

    def counting(tokenizer, texts, **kw):
        encoded.append(len(texts))
        return tokenize(tokenizer, texts, **kw)

    monkeypatch.setattr(tokenization, "tokenize", counting)
    args = ["extract", "--model", model, "--data", str(tmp_path / "d.csv"), "--out", str(tmp_path / "s.zarr"),
            "--group", "g", "--positions", "last:2", "--store-dtype", "float32"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert encoded[0] == n and sum(encoded[1:]) <= tokenization.SPOT_CHECK_ROWS, encoded  # once, then the check
    lm = load_model(model)
    extract(lm, load_prompts(tmp_path / "d.csv"), CaptureSpec(sites="resid_post", positions="last:2", dtype="float32"),
            str(tmp_path / "ref.zarr"), "g", progress=False)
    a, b = open_store(str(tmp_path / "s.zarr"), "g"), open_store(str(tmp_path / "ref.zarr"), "g")
    np.testing.assert_array_equal(a["resid_post"].values, b["resid_post"].values)
    np.testing.assert_array_equal(a["token_ids"].values, b["token_ids"].values)
