"""Extraction into stores: exact against the model, ordered, resumable after SIGKILL, strict on bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
from typer.testing import CliRunner

from mechdiff import open_store
from mechdiff.cli import app
from mechdiff.engine import extract as extract_mod
from mechdiff.engine.batching import TOKEN_BUDGETS, BatchingError, default_token_budget, pad_batch, resolve_token_budget, tokenize
from mechdiff.engine.data import PromptSet
from mechdiff.engine.extract import CaptureSpec, extract
from mechdiff.engine.models import load_model
from mechdiff.engine.store import ActivationStore, StoreMismatchError
from mechdiff.engine.tiny import SPECIAL_TOKENS, random_prompts
from mechdiff.errors import MechdiffError

runner = CliRunner()


def _prompts(n=40, seed=1, lo=3, hi=20):
    texts = random_prompts(n, lo, hi, vocab_size=512, seed=seed)
    return PromptSet.from_texts(texts, label=np.arange(n) % 2, topic=np.array(["a", "b"] * (n // 2)))


def _reference(lm, texts):
    """Per-example unpadded forward: hidden states [layer+1, seq, d] and the final block by hand."""
    refs = []
    for ids in tokenize(lm.tokenizer, texts):
        inp = pad_batch([ids], lm.tokenizer.pad_token_id)
        with torch.no_grad():
            out = lm.model(**inp, output_hidden_states=True, use_cache=False)
        refs.append(torch.stack(out.hidden_states)[:, 0])
    return refs


def test_store_equals_hidden_states_in_dataset_order(tiny_llama, tmp_path):
    lm = tiny_llama
    ps = _prompts()
    n = lm.adapter.n_layers
    spec = CaptureSpec(sites=("resid_post",), layers=tuple(range(n - 1)), positions="last:3", dtype="float32")
    # a small token budget and shard size: many batches, each shard's rows batched out of order by length
    rep = extract(lm, ps, spec, str(tmp_path / "s.zarr"), "m/d", token_budget=64, shard_size=16, progress=False)
    assert rep.shards_written == 3 and rep.shards_skipped == 0
    ds = open_store(str(tmp_path / "s.zarr"), "m/d")
    assert ds["resid_post"].dims == ("example", "layer", "position", "hidden")
    assert list(ds["position"].values) == [-3, -2, -1]
    assert list(ds["text"].values) == ps.texts
    assert list(ds["label"].values) == list(ps.columns["label"])
    refs = _reference(lm, ps.texts)
    got = ds["resid_post"].values
    for i, r in enumerate(refs):
        np.testing.assert_allclose(got[i], r[1:n, -3:].numpy(), atol=1e-5, rtol=1e-5)
        assert int(ds["n_tokens"][i]) == r.shape[1]
        tok = ds["token_ids"].values[i]
        assert list(tok[tok >= 0]) == tokenize(lm.tokenizer, [ps.texts[i]])[0]

    # the fp16 store holds the same values within fp16 rounding; plain xarray.open_zarr reads it too
    spec16 = CaptureSpec(sites=("resid_post",), layers=tuple(range(n - 1)), positions="last:3")
    extract(lm, ps, spec16, str(tmp_path / "h.zarr"), "m/d", token_budget=64, shard_size=16, progress=False)
    ds16 = xr.open_zarr(str(tmp_path / "h.zarr"), group="m/d")
    assert ds16["resid_post"].dtype == np.float16
    np.testing.assert_array_equal(ds16["resid_post"].values, got.astype(np.float16))


@pytest.mark.parametrize("sites, cut", [(("resid_post",), True), (("resid_post", "mlp_out"), False)])
def test_deepest_block_runs_its_mlp_at_the_captured_positions_only(tiny_llama, tmp_path, sites, cut):
    """A last-token capture needs the deepest captured block's output at the last token alone: its MLP runs
    there only (the values are the full forward's: the test above). Capturing the MLP itself keeps it whole."""
    lm = tiny_llama
    ps = _prompts(12, seed=4, lo=6)
    deepest = lm.adapter.n_layers - 2
    seen = []
    h = lm.adapter.mlp_module(deepest).register_forward_hook(lambda m, a, o: seen.append(a[0].shape[1]))
    try:
        spec = CaptureSpec(sites=sites, layers=(0, deepest), positions="last", dtype="float32")
        extract(lm, ps, spec, str(tmp_path / "s.zarr"), "m/d", token_budget=64, progress=False)
    finally:
        h.remove()
    assert seen and all(t == 1 for t in seen) == cut and all(t > 1 for t in seen) != cut
    ref = _reference(lm, ps.texts)
    got = open_store(str(tmp_path / "s.zarr"), "m/d")["resid_post"].values
    for i, r in enumerate(ref):
        np.testing.assert_allclose(got[i], r[[1, deepest + 1], -1].numpy(), atol=1e-5, rtol=1e-5)


def test_last_layer_and_all_positions(tiny_llama, tmp_path):
    lm = tiny_llama
    ps = _prompts(12, seed=2)
    n = lm.adapter.n_layers
    spec = CaptureSpec(sites=("resid_post", "resid_pre", "mlp_out", "attn_out"), layers="all", positions="all", dtype="float32")
    extract(lm, ps, spec, str(tmp_path / "a.zarr"), "g", token_budget=50, shard_size=5, progress=False)
    ds = open_store(str(tmp_path / "a.zarr"), "g")
    refs = _reference(lm, ps.texts)
    width = ds.sizes["position"]
    assert width == max(r.shape[1] for r in refs)
    for i, r in enumerate(refs):
        t = r.shape[1]
        post = ds["resid_post"].values[i]  # [layer, position, hidden]
        assert np.isnan(post[:, : width - t]).all()  # slots this example does not have
        np.testing.assert_allclose(post[: n - 1, width - t :], r[1:n].numpy(), atol=1e-5, rtol=1e-5)
        # the last block by hand: HF's last hidden state is final_norm(resid_post[last])
        last = torch.from_numpy(post[n - 1, width - t :])
        torch.testing.assert_close(lm.adapter.final_norm(last), r[n], atol=1e-5, rtol=1e-5)
        pre = ds["resid_pre"].values[i][:, width - t :]
        add = ds["attn_out"].values[i][:, width - t :] + ds["mlp_out"].values[i][:, width - t :]
        np.testing.assert_allclose(post[:, width - t :], pre + add, atol=1e-5, rtol=1e-5)


def test_post_instruction_positions(tiny_llama, tmp_path):
    lm = tiny_llama
    ps = _prompts(6, seed=4)
    spec = CaptureSpec(sites=("resid_post",), layers=(1,), positions="post_instruction", template="chat", dtype="float32")
    extract(lm, ps, spec, str(tmp_path / "p.zarr"), "g", progress=False)
    ds = open_store(str(tmp_path / "p.zarr"), "g")
    # the template's text after the instruction is "\nAssistant:" -> tokens "Assistant", ":"
    assert ds.sizes["position"] == 2
    assert (ds["n_positions"].values == 2).all()
    tok = ds["token_ids"].values
    vocab = lm.tokenizer.get_vocab()
    assert (tok[:, -2] == vocab["Assistant"]).all() and (tok[:, -1] == vocab[":"]).all()


def test_refuses_store_of_another_model(tiny_dir, tiny_llama, tmp_path):
    ps = _prompts(8)
    spec = CaptureSpec(layers=(0,))
    url = str(tmp_path / "s.zarr")
    extract(tiny_llama, ps, spec, url, "g", progress=False)
    before = _tree(tmp_path / "s.zarr")
    other = load_model(tiny_dir("llama", n_layers=3, seed=7))
    with pytest.raises(StoreMismatchError, match="was made by model"):
        extract(other, ps, spec, url, "g", progress=False)
    with pytest.raises(StoreMismatchError, match="another capture spec: layers stored"):
        extract(tiny_llama, ps, CaptureSpec(layers=(1,)), url, "g", progress=False)
    with pytest.raises(StoreMismatchError, match="dataset"):
        extract(tiny_llama, _prompts(8, seed=9), spec, url, "g", progress=False)
    assert _tree(tmp_path / "s.zarr") == before
    # the same run again: nothing to do
    rep = extract(tiny_llama, ps, spec, url, "g", progress=False)
    assert rep.shards_written == 0 and rep.shards_skipped == 1


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


_SLOW_EXTRACT = """
import sys, time
import mechdiff.engine.extract as ex
real = ex.forward_capture
def slow(*a, **k):
    time.sleep(0.1)
    return real(*a, **k)
ex.forward_capture = slow
from mechdiff.cli import app
sys.argv = ["mechdiff"] + sys.argv[1:]
app()
"""


def test_sigkill_then_rerun_equals_uninterrupted_run(tiny_dir, tmp_path):
    model = str(tiny_dir("llama", n_layers=3))
    data = tmp_path / "data.csv"
    texts = random_prompts(300, 3, 24, vocab_size=512, seed=11)
    data.write_text("text,label\n" + "".join(f"{t},{i % 2}\n" for i, t in enumerate(texts)))
    args = ["extract", "--model", model, "--data", str(data), "--sites", "resid_post,mlp_act", "--layers", "all",
            "--positions", "last:2", "--shard-size", "10", "--token-budget", "64"]
    clean = tmp_path / "clean.zarr"
    r = runner.invoke(app, [*args, "--out", str(clean), "--group", "g"])
    assert r.exit_code == 0, r.output

    killed = tmp_path / "killed.zarr"
    script = tmp_path / "slow.py"
    script.write_text(_SLOW_EXTRACT)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, str(script), *args, "--out", str(killed), "--group", "g"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    frac = 0.0
    try:
        while time.time() < deadline:
            time.sleep(0.1)
            if (killed / "g").exists():
                try:
                    frac = ActivationStore.open(str(killed), "g").fraction_done()
                except Exception:
                    continue
                if frac >= 0.1:
                    break
        assert proc.poll() is None, "extraction finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    partial = ActivationStore.open(str(killed), "g").fraction_done()
    assert 0 < partial < 1
    r = runner.invoke(app, [*args, "--out", str(killed), "--group", "g"])
    assert r.exit_code == 0, r.output
    assert "already done" in r.output
    a, b = open_store(str(clean), "g"), open_store(str(killed), "g")
    assert ActivationStore.open(str(killed), "g").fraction_done() == 1.0
    for v in ("resid_post", "mlp_act", "token_ids", "text", "label"):
        np.testing.assert_array_equal(a[v].values, b[v].values)
    assert a.sizes["example"] == b.sizes["example"] == 300

    # the store checks itself against its model
    r = runner.invoke(app, ["store", "verify", str(killed), "--group", "g", "--sample", "5"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["store", "info", str(killed)])
    assert r.exit_code == 0 and "resid_post" in r.output and "100% done" in r.output


def test_verify_detects_a_corrupted_store(tiny_llama, tmp_path):
    import zarr

    ps = _prompts(10)
    url = str(tmp_path / "v.zarr")
    extract(tiny_llama, ps, CaptureSpec(layers=(0, 2), dtype="float32"), url, "g", progress=False)
    from mechdiff.engine.verify import verify_store

    rep = verify_store(url, "g", sample=10, model=tiny_llama)
    assert rep.ok and max(s.max_abs_diff for s in rep.sites) < 1e-5
    arr = zarr.open_group(url, mode="r+")["g"]["resid_post"]
    arr[3, 1, 0] = arr[3, 1, 0] + 0.5
    rep = verify_store(url, "g", sample=10, model=tiny_llama)
    assert not rep.ok and abs(rep.sites[0].max_abs_diff - 0.5) < 1e-3


def _cli_error(args, match):
    r = runner.invoke(app, args)
    assert r.exit_code == 2, r.output
    text = " ".join(r.output.split())
    assert match in text, text
    return text


def test_cli_bad_input_fails_before_work(tiny_dir, tmp_path):
    model = str(tiny_dir("llama", n_layers=3))
    good = tmp_path / "good.csv"
    good.write_text("text,label\nw1 w2 w3,1\nw4 w5,0\n")
    store = tmp_path / "s.zarr"
    base = ["extract", "--model", model, "--out", str(store)]
    _cli_error([*base, "--data", str(tmp_path / "missing.csv")], "missing.csv")
    nocol = tmp_path / "nocol.csv"
    nocol.write_text("foo,bar\n1,2\n")
    _cli_error([*base, "--data", str(nocol)], "text")
    empty = tmp_path / "empty.csv"
    empty.write_text("text,label\n")
    _cli_error([*base, "--data", str(empty)], "empty")
    _cli_error([*base, "--data", str(good), "--sites", "resid_mid"], "unknown site 'resid_mid'")
    _cli_error([*base, "--data", str(good), "--layers", "0,9"], "layer 9 is out of range")
    _cli_error([*base, "--data", str(good), "--positions", "first"], "unknown positions")
    _cli_error([*base, "--data", str(good), "--token-budget", "0"], "token budget 0")
    _cli_error(["extract", "--model", str(tmp_path / "nomodel"), "--out", str(store), "--data", str(good)], "nomodel")
    longer = tmp_path / "long.csv"
    longer.write_text("text\n" + " ".join(["w1"] * 300) + "\n")
    _cli_error([*base, "--data", str(longer)], "more than the model's context of 256")
    assert not store.exists()  # nothing was written by any failed run
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    if not os.access(ro, os.W_OK):  # root can write anywhere; the check is meaningful only otherwise
        _cli_error(["extract", "--model", model, "--data", str(good), "--out", str(ro / "s.zarr")], "not writable")
    fileout = tmp_path / "afile"
    fileout.write_text("x")
    _cli_error(["extract", "--model", model, "--data", str(good), "--out", str(fileout)], "not a directory")
    # truncation only when asked
    r = runner.invoke(app, [*base, "--data", str(longer), "--truncate", "--group", "t"])
    assert r.exit_code == 0, r.output
    assert int(open_store(str(store), "t")["n_tokens"][0]) == 256
    # a store made by another model
    other = str(tiny_dir("llama", n_layers=3, seed=5))
    r = runner.invoke(app, [*base, "--data", str(good), "--group", "g"])
    assert r.exit_code == 0
    before = _tree(store)
    _cli_error(["extract", "--model", other, "--out", str(store), "--data", str(good), "--group", "g"], "was made by model")
    assert _tree(store) == before


def test_default_token_budget_per_device():
    # CPU gets its own (smaller) budget; accelerators and unnamed device types the large one
    assert default_token_budget("cpu") == default_token_budget(torch.device("cpu")) == TOKEN_BUDGETS["cpu"]
    assert default_token_budget("cuda:1") == default_token_budget("meta") == TOKEN_BUDGETS["*"]
    assert TOKEN_BUDGETS["cpu"] < TOKEN_BUDGETS["*"]
    assert resolve_token_budget(None, "cpu") == TOKEN_BUDGETS["cpu"]
    assert resolve_token_budget(np.int64(64), "cpu") == 64  # a caller's budget wins over the default
    for bad in (0, -5, 1.5, True, "64"):
        with pytest.raises(BatchingError, match="token budget"):
            resolve_token_budget(bad, "cpu")
    assert issubclass(BatchingError, MechdiffError) and issubclass(BatchingError, ValueError)


def test_extract_batches_under_the_device_budget(tiny_llama, tmp_path, monkeypatch):
    ps = _prompts(24, seed=3, lo=3, hi=12)
    lengths = [len(x) for x in tokenize(tiny_llama.tokenizer, ps.texts)]
    seen: list[list[int]] = []
    real = extract_mod.forward_capture

    def record(lm, prep, batch, **kw):
        seen.append(list(batch))
        return real(lm, prep, batch, **kw)

    monkeypatch.setattr(extract_mod, "forward_capture", record)
    monkeypatch.setitem(TOKEN_BUDGETS, "cpu", 30)
    spec = CaptureSpec(layers=(0, 2), dtype="float32")
    extract(tiny_llama, ps, spec, str(tmp_path / "d.zarr"), "g", shard_size=12, progress=False)  # no budget given
    assert len(seen) > 2 and all(max(lengths[i] for i in b) * len(b) <= 30 for b in seen)
    assert sorted(i for b in seen for i in b) == list(range(24))
    seen.clear()
    extract(tiny_llama, ps, spec, str(tmp_path / "e.zarr"), "g", shard_size=12, token_budget=10**6, progress=False)
    assert len(seen) == 2  # one batch per shard: the explicit budget, not the device's
    # the same values whatever the batching (within float rounding of differently padded batches)
    a, b = open_store(str(tmp_path / "d.zarr"), "g"), open_store(str(tmp_path / "e.zarr"), "g")
    np.testing.assert_allclose(a["resid_post"].values, b["resid_post"].values, atol=1e-5, rtol=1e-5)
    # a bad budget is refused before the store is touched
    with pytest.raises(BatchingError, match="token budget 0"):
        extract(tiny_llama, ps, spec, str(tmp_path / "f.zarr"), "g", token_budget=0, progress=False)
    assert not (tmp_path / "f.zarr").exists()


def test_overflow_in_a_batch_names_its_example(tiny_dir, tmp_path):
    """Batches are cast to the stored dtype as they arrive (out of dataset order): an overflow names the
    dataset's example, and no shard is flagged done."""
    lm = load_model(tiny_dir("llama", n_layers=3))
    hot = len(SPECIAL_TOKENS) + 7  # the id of w7
    with torch.no_grad():
        lm.adapter.embed.weight[hot] = 1e6  # finite in fp32, inf in fp16 from the first residual on
    texts = [" ".join(f"w{10 + (i * 3 + j) % 50}" for j in range(2 + i % 5)) for i in range(12)]
    texts[9] += " w7"  # the only example whose last token is w7
    ps = PromptSet.from_texts(texts)
    url = str(tmp_path / "o.zarr")
    with pytest.raises(OverflowError, match=r"resid_post: value .* at example 9 \(layer 0\) overflows float16"):
        extract(lm, ps, CaptureSpec(layers="all"), url, "g", token_budget=16, shard_size=6, progress=False)
    # shard 0 (examples 0-5) was handed to the writer before the error and is finished; shard 1 is not
    assert ActivationStore.open(url, "g").done_shards() == [0]


def test_cli_extract_batches_under_the_device_budget(tiny_dir, tmp_path, monkeypatch):
    """Without --token-budget the command takes the device's default, not one size for every device."""
    model = str(tiny_dir("llama", n_layers=3))
    data = tmp_path / "d.csv"
    data.write_text("text\n" + "".join(f"{t}\n" for t in random_prompts(12, 3, 12, vocab_size=512, seed=4)))
    budgets: list[int] = []
    real = extract_mod.length_batches
    monkeypatch.setattr(extract_mod, "length_batches", lambda n, idx, b: budgets.append(b) or real(n, idx, b))
    base = ["extract", "--model", model, "--data", str(data)]
    r = runner.invoke(app, [*base, "--out", str(tmp_path / "a.zarr")])
    assert r.exit_code == 0, r.output
    assert budgets and set(budgets) == {TOKEN_BUDGETS["cpu"]}
    budgets.clear()
    r = runner.invoke(app, [*base, "--out", str(tmp_path / "b.zarr"), "--token-budget", "40"])
    assert r.exit_code == 0, r.output
    assert budgets and set(budgets) == {40}


# Modules the extract path has no use for: each costs start-up time and memory in every extraction process.
_UNUSED_ON_EXTRACT = ("xarray", "pandas", "dask", "ray", "matplotlib", "sklearn")
_EXTRACT_AND_LIST = """
import json, sys
from mechdiff.cli import app
try:
    app(sys.argv[1:], standalone_mode=False)
finally:
    print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in %r)))
"""


def test_extract_command_imports_only_what_it_uses(tiny_dir, tmp_path):
    """A whole ``mechdiff extract`` process (and ``import mechdiff.engine.extract``) imports no xarray, pandas,
    dask, ray or matplotlib: they are for the analyses. Checked in a fresh interpreter, where nothing else has
    imported them."""
    model = str(tiny_dir("llama", n_layers=3))
    data = tmp_path / "d.csv"
    data.write_text("text\nw1 w2 w3\nw4 w5\n")
    out = tmp_path / "s.zarr"
    script = _EXTRACT_AND_LIST % (_UNUSED_ON_EXTRACT,)
    r = subprocess.run([sys.executable, "-c", script, "extract", "--model", model, "--data", str(data), "--out",
                        str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout.strip().splitlines()[-1]) == []
    assert open_store(str(out))["resid_post"].shape[:2] == (2, 3)  # the run did extract (read here, with xarray)
    probe = f"import sys, mechdiff.engine.extract; print([m for m in sys.modules if m.split('.')[0] in {_UNUSED_ON_EXTRACT!r}])"
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip() == "[]"
