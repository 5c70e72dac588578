"""Model loading, the architecture adapter and the tiny-model builder, checked against HF references."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from mechdiff.engine.adapter import (
    ArchAdapter,
    UnsupportedArchitectureError,
    hidden_from_inputs,
    hidden_from_output,
    position_ids_from_attention_mask,
    replace_hidden_in_output,
)
from mechdiff.engine.models import LoadedModel, ModelLoadError, load_model, resolve_device
from mechdiff.engine.tiny import (
    BOS_ID,
    SPECIAL_TOKENS,
    TINY_ARCHS,
    build_tiny_model,
    n_tiny_words,
    random_prompts,
)

ATOL = 1e-5
N_LAYERS = 3  # so there is a middle layer, not only first and last
VOCAB = 300


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny")
    for arch in TINY_ARCHS:
        build_tiny_model(root / arch, arch, n_layers=N_LAYERS, vocab_size=VOCAB, seed=1)
    return root


@pytest.fixture(scope="module")
def loaded(tiny_root):
    cache: dict[str, LoadedModel] = {}

    def get(arch: str) -> LoadedModel:
        if arch not in cache:
            cache[arch] = load_model(tiny_root / arch)
        return cache[arch]

    return get


def _prompts(n: int = 5, seed: int = 0) -> list[str]:
    return random_prompts(n, 3, 24, vocab_size=VOCAB, seed=seed)


class Recorder:
    """Forward hooks that record resid_pre/resid_post, attn_out, mlp_out, mlp_act and the MLP output."""

    def __init__(self, ad: ArchAdapter):
        self.ad = ad
        self.data: dict[tuple[str, int], torch.Tensor] = {}
        self.handles = []
        for l in range(ad.n_layers):
            self._pre(ad.layer(l), ("resid_pre", l))
            self._post(ad.layer(l), ("resid_post", l))
            self._post(ad.attn_out_module(l), ("attn_out", l))
            self._post(ad.mlp_out_module(l), ("mlp_out", l))
            self._post(ad.mlp_module(l), ("mlp", l))
            self._post(ad.down_proj(l), ("down_out", l))
            self._pre(ad.down_proj(l), ("mlp_act", l))

    def _pre(self, module: nn.Module, key) -> None:
        def hook(mod, args, kwargs):
            self.data[key] = hidden_from_inputs(args, kwargs).detach().clone()

        self.handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))

    def _post(self, module: nn.Module, key) -> None:
        def hook(mod, args, output):
            self.data[key] = hidden_from_output(output).detach().clone()

        self.handles.append(module.register_forward_hook(hook))

    def __getitem__(self, key) -> torch.Tensor:
        return self.data[key]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _run(lm: LoadedModel, text: str):
    enc = lm.tokenizer(text, return_tensors="pt")
    rec = Recorder(lm.adapter)
    try:
        with torch.no_grad():
            out = lm.model(**enc, output_hidden_states=True)
    finally:
        rec.remove()
    return out, rec


# -- per architecture -----------------------------------------------------------------------------


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_adapter_sizes(loaded, arch):
    lm = loaded(arch)
    ad = lm.adapter
    assert ad.arch == arch
    assert (ad.n_layers, ad.d_model, ad.d_mlp, ad.vocab_size, ad.max_positions) == (N_LAYERS, 64, 128, VOCAB, 256)
    assert ad.embed.weight.shape == (VOCAB, 64)
    for l in range(ad.n_layers):
        assert ad.down_proj_weight(l).shape == (64, 128)
    assert ad.unembed_weight().shape == (VOCAB, 64)
    # untied embeddings in the tiny models
    assert ad.unembed_weight().data_ptr() != ad.embed.weight.data_ptr()
    assert not lm.model.training
    json.dumps(lm.provenance())


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_resid_matches_hf_hidden_states(loaded, arch):
    lm = loaded(arch)
    ad = lm.adapter
    out, rec = _run(lm, _prompts(1, seed=5)[0])
    hs = out.hidden_states
    assert len(hs) == ad.n_layers + 1
    torch.testing.assert_close(rec["resid_pre", 0], hs[0], atol=ATOL, rtol=0)
    if arch != "gpt2":  # GPT-2 adds learned position embeddings after the token embedding
        ids = lm.tokenizer(_prompts(1, seed=5)[0], return_tensors="pt").input_ids
        with torch.no_grad():  # embed already includes Gemma's sqrt(d_model) scale
            torch.testing.assert_close(ad.embed(ids), hs[0], atol=ATOL, rtol=0)
    for l in range(ad.n_layers - 1):
        torch.testing.assert_close(rec["resid_post", l], hs[l + 1], atol=ATOL, rtol=0)
        torch.testing.assert_close(rec["resid_pre", l + 1], hs[l + 1], atol=ATOL, rtol=0)
    last = rec["resid_post", ad.n_layers - 1]
    with torch.no_grad():
        torch.testing.assert_close(ad.final_norm(last), hs[-1], atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_residual_decomposition_and_neurons(loaded, arch):
    lm = loaded(arch)
    ad = lm.adapter
    _, rec = _run(lm, _prompts(1, seed=6)[0])
    for l in range(ad.n_layers):
        # attn_out + mlp_out is exactly what the block adds, sequential or parallel residual alike
        torch.testing.assert_close(
            rec["resid_pre", l] + rec["attn_out", l] + rec["mlp_out", l], rec["resid_post", l], atol=ATOL, rtol=0
        )
        act = rec["mlp_act", l]
        assert act.shape[-1] == ad.d_mlp
        with torch.no_grad():
            down = ad.down_proj(l)(act)
            # the weight accessor agrees with the module (GPT-2 Conv1D is stored transposed)
            manual = act @ ad.down_proj_weight(l).T
            if ad.down_proj_bias(l) is not None:
                manual = manual + ad.down_proj_bias(l)
            torch.testing.assert_close(manual, down, atol=ATOL, rtol=0)
            torch.testing.assert_close(down, rec["mlp", l], atol=ATOL, rtol=0)
            if ad.post_norm:
                # sandwich blocks: mlp_out = post-feedforward norm of the MLP output
                torch.testing.assert_close(ad.mlp_out_module(l)(down), rec["mlp_out", l], atol=ATOL, rtol=0)
            else:
                torch.testing.assert_close(down, rec["mlp_out", l], atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_unembedding_reproduces_logits(loaded, arch):
    lm = loaded(arch)
    ad = lm.adapter
    out, rec = _run(lm, _prompts(1, seed=7)[0])
    last = rec["resid_post", ad.n_layers - 1]
    with torch.no_grad():
        raw = ad.final_norm(last) @ ad.unembed_weight().T
        if ad.unembed_bias() is not None:
            raw = raw + ad.unembed_bias()
        expected = raw if ad.logit_softcap is None else ad.logit_softcap * torch.tanh(raw / ad.logit_softcap)
        torch.testing.assert_close(expected, out.logits, atol=ATOL, rtol=0)
        torch.testing.assert_close(ad.logits(last), out.logits, atol=ATOL, rtol=0)


def test_gemma2_softcap_is_applied(loaded):
    lm = loaded("gemma2")
    ad = lm.adapter
    assert ad.post_norm and ad.logit_softcap == 30.0 and ad.embed_scale == 8.0
    # Random tiny logits are far below 30, where tanh is ~linear: shrink the cap to see it act.
    old = lm.model.config.final_logit_softcapping
    lm.model.config.final_logit_softcapping = 0.05
    try:
        out, rec = _run(lm, "w1 w2 w3")
        last = rec["resid_post", ad.n_layers - 1]
        with torch.no_grad():
            raw = ad.final_norm(last) @ ad.unembed_weight().T
            torch.testing.assert_close(ad.logits(last), out.logits, atol=ATOL, rtol=0)
        assert out.logits.abs().max() <= 0.05
        assert (raw - out.logits).abs().max() > 1e-3
    finally:
        lm.model.config.final_logit_softcapping = old


def test_architecture_flags(loaded):
    flags = {a: (loaded(a).adapter.post_norm, loaded(a).adapter.parallel_residual) for a in TINY_ARCHS}
    assert {a for a, (post, _) in flags.items() if post} == {"gemma2", "olmo2"}
    assert {a for a, (_, par) in flags.items() if par} == {"gpt_neox"}
    assert loaded("gemma").adapter.embed_scale == 8.0
    assert loaded("llama").adapter.embed_scale == 1.0
    assert loaded("gpt2").adapter.down_proj_path == "mlp.c_proj"
    assert loaded("gpt_neox").adapter.down_proj_path == "mlp.dense_4h_to_h"


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_padding_matches_single_runs(loaded, arch):
    lm = loaded(arch)
    ad, tok = lm.adapter, lm.tokenizer
    prompts = _prompts(4, seed=11)
    singles = []
    for p in prompts:
        _, rec = _run(lm, p)
        singles.append([rec["resid_post", l][0, -1] for l in range(ad.n_layers)])
    old_side = tok.padding_side
    try:
        for side in ("left", "right"):
            tok.padding_side = side
            enc = tok(prompts, return_tensors="pt", padding=True)
            assert len(set(enc.attention_mask.sum(1).tolist())) > 1, "prompts should differ in length"
            rec = Recorder(ad)
            try:
                with torch.no_grad():
                    # absolute position embeddings (GPT-2) need positions that skip the padding
                    lm.model(**enc, position_ids=position_ids_from_attention_mask(enc.attention_mask))
            finally:
                rec.remove()
            lengths = enc.attention_mask.sum(1)
            for i in range(len(prompts)):
                pos = enc.input_ids.shape[1] - 1 if side == "left" else int(lengths[i]) - 1
                for l in range(ad.n_layers):
                    torch.testing.assert_close(rec["resid_post", l][i, pos], singles[i][l], atol=ATOL, rtol=0)
    finally:
        tok.padding_side = old_side


# -- tokenizer and prompts -----------------------------------------------------------------------


def test_tiny_tokenizer(loaded):
    tok = loaded("llama").tokenizer
    assert len(tok) == VOCAB
    assert (tok.pad_token, tok.bos_token, tok.eos_token, tok.unk_token) == SPECIAL_TOKENS
    ids = tok("w0 w5 w17").input_ids
    assert ids == [BOS_ID, 4, 9, 21]
    assert tok.decode(ids, skip_special_tokens=True) == "w0 w5 w17"
    chat = tok.apply_chat_template([{"role": "user", "content": "w3 w4"}], tokenize=False, add_generation_prompt=True)
    assert chat == "User: w3 w4\nAssistant:"
    assert tok.unk_token_id not in tok(chat).input_ids
    # Every architecture gets the word-level tokenizer as saved (transformers 5.x would swap in a
    # BPE Qwen2Tokenizer for qwen2; load_model undoes that), hence also the same tokenizer hash.
    for arch in TINY_ARCHS:
        other = loaded(arch)
        assert other.tokenizer("w0 w5 w17").input_ids == ids, arch
        assert other.tokenizer.apply_chat_template(
            [{"role": "user", "content": "w3 w4"}], tokenize=False, add_generation_prompt=True
        ) == chat, arch
        assert other.tokenizer_hash == loaded("llama").tokenizer_hash, arch


def test_random_prompts_lengths(loaded):
    tok = loaded("llama").tokenizer
    prompts = random_prompts(50, 2, 9, vocab_size=VOCAB, seed=3)
    assert prompts == random_prompts(50, 2, 9, vocab_size=VOCAB, seed=3)
    counts = [len(tok(p).input_ids) for p in prompts]
    assert min(counts) >= 2 and max(counts) <= 9 and len(set(counts)) > 3
    assert all(tok.unk_token_id not in tok(p).input_ids for p in prompts)
    assert all(int(w[1:]) < n_tiny_words(VOCAB) for p in prompts for w in p.split())


# -- loading ------------------------------------------------------------------------------------------


def test_weights_hash_and_provenance(tiny_root, loaded, tmp_path):
    a = loaded("llama")
    b = load_model(tiny_root / "llama")
    assert a.weights_hash == b.weights_hash and a.weights_hash.startswith("sha256:")
    other = load_model(build_tiny_model(tmp_path / "llama_seed2", "llama", n_layers=N_LAYERS, vocab_size=VOCAB, seed=2))
    assert other.weights_hash != a.weights_hash
    prov = json.loads(json.dumps(a.provenance()))
    assert prov["model_id"] == str(tiny_root / "llama")
    assert prov["dtype"] == "float32" and prov["device"] == "cpu"
    assert prov["architecture"]["n_layers"] == N_LAYERS


def test_dtype_and_padding_side(tiny_root):
    lm = load_model(tiny_root / "qwen2", dtype="bfloat16", padding_side="right")
    assert lm.dtype == torch.bfloat16
    assert next(lm.model.parameters()).dtype == torch.bfloat16
    assert lm.tokenizer.padding_side == "right"
    # a tokenizer without a pad token pads with eos rather than growing the vocabulary
    from mechdiff.engine.models import _ensure_pad_token

    lm.tokenizer.pad_token = None
    _ensure_pad_token(lm.tokenizer, lm.model)
    assert lm.tokenizer.pad_token == "<eos>" and len(lm.tokenizer) == VOCAB


def test_device_resolution():
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="CUDA is not available"):
            resolve_device("cuda:0")


def test_missing_directory_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match="config.json"):
        load_model(empty)


def test_pickle_only_directory(tiny_root, tmp_path):
    src = tiny_root / "llama"
    dst = tmp_path / "pickled"
    shutil.copytree(src, dst)
    from safetensors.torch import load_file

    torch.save(load_file(dst / "model.safetensors"), dst / "pytorch_model.bin")
    (dst / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="allow_pickle") as err:
        load_model(dst)
    assert "--allow-pickle" in str(err.value)
    lm = load_model(dst, allow_pickle=True)
    ref = load_model(src)
    enc = ref.tokenizer("w1 w2 w3", return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(lm.model(**enc).logits, ref.model(**enc).logits)


def test_hub_id_offline_from_cache(tiny_root, tmp_path):
    """A hub id resolves from the HF cache with HF_HUB_OFFLINE=1; the weights hash is the commit."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    commit = "0123456789abcdef0123456789abcdef01234567"
    for repo, pickled in (("tiny-llama", False), ("pickled", True)):
        snap = tmp_path / f"models--acme--{repo}" / "snapshots" / commit
        shutil.copytree(tiny_root / "llama", snap)
        (snap.parent.parent / "refs").mkdir()
        (snap.parent.parent / "refs" / "main").write_text(commit)
        if pickled:
            torch.save(load_file(snap / "model.safetensors"), snap / "pytorch_model.bin")
            (snap / "model.safetensors").unlink()
    script = f"""
from mechdiff.engine.models import load_model, ModelLoadError
lm = load_model("acme/tiny-llama")
assert lm.weights_hash == "git:{commit}", lm.weights_hash
assert not lm.is_local and lm.provenance()["source"] == "hub"
assert lm.tokenizer("w0 w1").input_ids == [1, 4, 5]
try:
    load_model("acme/pickled")
except ModelLoadError as e:
    assert "allow_pickle" in str(e), e
else:
    raise AssertionError("pickle-only hub repo loaded without allow_pickle")
assert load_model("acme/pickled", allow_pickle=True).weights_hash == "git:{commit}"
print("OK")
"""
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-3000:]


# -- unsupported models and helpers -------------------------------------------------------------


def test_bert_is_unsupported():
    from transformers import BertConfig, BertForMaskedLM

    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    with pytest.raises(UnsupportedArchitectureError) as err:
        ArchAdapter(BertForMaskedLM(cfg))
    msg = str(err.value)
    assert msg.startswith("BertForMaskedLM:")
    assert "no decoder layers found (looked for model.layers, transformer.h, gpt_neox.layers)" in msg
    assert isinstance(err.value, ValueError)


def test_custom_model_names_missing_piece():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.self_attn = nn.Linear(8, 8)
            self.mlp = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))  # no down_proj name

    class Inner(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed_tokens = nn.Embedding(10, 8)
            self.layers = nn.ModuleList([Block(), Block()])
            self.norm = nn.LayerNorm(8)

    class MyModelForCausalLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = Inner()
            self.lm_head = nn.Linear(8, 10, bias=False)

    with pytest.raises(UnsupportedArchitectureError) as err:
        ArchAdapter(MyModelForCausalLM())
    msg = str(err.value)
    assert msg.startswith("MyModelForCausalLM:")
    assert "no MLP down-projection found" in msg and "layers[0].mlp.down_proj" in msg
    assert "decoder layers" not in msg and "final norm" not in msg


def test_output_helpers():
    x = torch.randn(3, 4, 5)
    w = torch.randn(3, 2, 4, 4)
    assert hidden_from_output(x) is x
    assert hidden_from_output((x, w)) is x
    y = torch.zeros_like(x)
    assert replace_hidden_in_output(x, y) is y
    out = replace_hidden_in_output((x, w), y)
    assert isinstance(out, tuple) and out[0] is y and out[1] is w
    assert hidden_from_inputs((), {"hidden_states": x}) is x
    assert hidden_from_inputs((x,), {}) is x
    with pytest.raises(TypeError):
        hidden_from_output((None, w))
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    assert position_ids_from_attention_mask(mask).tolist() == [[0, 0, 0, 1], [0, 1, 2, 3]]


# -- GGUF as a model source (no real file needed; the real model is in test_real_model.py) ------------------


def _fake_gguf(path: Path, file_type: int = 3) -> Path:
    """A GGUF header with a few key-values (a string, an array of strings, general.file_type) and no tensors."""
    import struct

    def s(x: str) -> bytes:
        b = x.encode()
        return struct.pack("<Q", len(b)) + b

    kvs = [
        s("general.architecture") + struct.pack("<I", 8) + s("llama"),
        s("tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, 2) + s("a") + s("bc"),
        s("llama.block_count") + struct.pack("<II", 4, 2),
        s("general.file_type") + struct.pack("<II", 4, file_type),
    ]
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, len(kvs)) + b"".join(kvs))
    return path


def test_gguf_sources_are_recognised(tmp_path):
    from mechdiff.engine.models import gguf_source

    f = _fake_gguf(tmp_path / "m.Q4_1.gguf")
    gg = gguf_source(f)
    assert (gg.source, gg.file, gg.is_local, gg.model_id) == (str(tmp_path), "m.Q4_1.gguf", True, str(f))
    assert gguf_source(tmp_path, "m.Q4_1.gguf") == gg  # a directory plus --gguf-file names the same file
    assert gguf_source(f, "m.Q4_1.gguf") == gg
    assert gguf_source(tmp_path) is None and gguf_source("org/name") is None  # safetensors dir, hub id
    hub = gguf_source("org/name-GGUF", "model.Q8_0.gguf")
    assert (hub.source, hub.file, hub.is_local) == ("org/name-GGUF", "model.Q8_0.gguf", False)
    with pytest.raises(ModelLoadError, match="file name"):
        gguf_source(tmp_path, "sub/m.gguf")


def test_gguf_header_gives_the_quantization_and_the_hash_is_the_files(tmp_path):
    import hashlib

    from mechdiff.engine.models import gguf_source, local_weights_hash

    f = _fake_gguf(tmp_path / "m.gguf", file_type=7)
    assert gguf_source(f).quantization() == "Q8_0"
    assert gguf_source(_fake_gguf(tmp_path / "n.gguf", file_type=3)).quantization() == "Q4_1"
    (tmp_path / "bad.gguf").write_bytes(b"nope")
    assert gguf_source(tmp_path / "bad.gguf").quantization() is None
    pytest.importorskip("gguf")
    assert local_weights_hash(str(f)) == "sha256:" + hashlib.sha256(f.read_bytes()).hexdigest()
    assert local_weights_hash(str(tmp_path), gguf_file="m.gguf") == local_weights_hash(str(f))


def test_a_missing_gguf_package_is_one_clear_line(tmp_path, monkeypatch):
    import sys

    from mechdiff.engine.models import load_tokenizer
    from mechdiff.engine.precheck import read_config

    f = _fake_gguf(tmp_path / "m.gguf")
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf now fails, find_spec says None
    for call in (lambda: load_model(f), lambda: load_tokenizer(f), lambda: read_config(f),
                 lambda: load_model(tmp_path, gguf_file="m.gguf")):
        with pytest.raises(ModelLoadError) as e:
            call()
        msg = str(e.value)
        assert "pip install mechdiff[gguf]" in msg and "\n" not in msg, msg


def test_a_missing_gguf_file_is_named(tmp_path):
    pytest.importorskip("gguf")
    for call in (lambda: load_model(tmp_path / "nope.gguf"), lambda: load_model(tmp_path, gguf_file="nope.gguf")):
        with pytest.raises(ModelLoadError, match="GGUF file .*nope.gguf does not exist"):
            call()


def test_cli_extract_without_the_gguf_package_says_how_to_install_it(tmp_path, monkeypatch):
    import sys

    from typer.testing import CliRunner

    from mechdiff.cli import app

    f = _fake_gguf(tmp_path / "m.gguf")
    data = tmp_path / "d.csv"
    data.write_text("text\nhello\n")
    monkeypatch.setitem(sys.modules, "gguf", None)
    r = CliRunner().invoke(app, ["extract", "--model", str(f), "--data", str(data), "--out", str(tmp_path / "s.zarr")])
    assert r.exit_code == 2
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "pip install mechdiff[gguf]" in lines[0], r.output
    r = CliRunner().invoke(app, ["extract", "--help"])
    assert "gguf" in r.output.lower() and "not pickle" in " ".join(r.output.split())
