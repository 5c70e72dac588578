"""The vLLM backend on CPU: guards, settings refusals, per-family layer lookup, the hook-never-fired error, the
flat-row -> request map, and extraction through a fake engine into the store the HF path writes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from mechdiff.engine import vllm_backend as vb
from mechdiff.engine.capture import CaptureSpec
from mechdiff.engine.data import PromptSet
from mechdiff.engine.generate import VLLMGenerator, vllm_available
from mechdiff.engine.sites import Add, ProjectOut
from mechdiff.engine.store import open_store
from mechdiff.engine.tiny import random_prompts
from mechdiff.engine.vllm_extract import extract_vllm, plan_vllm_extraction, token_batches

ROOT = Path(__file__).resolve().parents[1]


# -- a fake engine: vLLM's calling convention (flat rows, input_ids/positions keywords, (hidden, residual) layers)


class FlatBlock(nn.Module):
    def __init__(self, d: int, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = nn.Parameter(torch.randn(d, d, generator=g) / d**0.5)

    def forward(self, positions, hidden, residual):
        residual = hidden if residual is None else hidden + residual
        return torch.tanh(residual @ self.w) + 0.01 * positions[:, None].float(), residual


class FakeModel(nn.Module):
    """Per-token (no attention), so a request's rows are the same flat or alone."""

    def __init__(self, n_layers: int, d: int, vocab: int = 512, arch: str = "llama"):
        super().__init__()
        self.config = SimpleNamespace(model_type=arch)
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(vocab, d)
        self.model.layers = nn.ModuleList(FlatBlock(d, i) for i in range(n_layers))

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None):
        h, r = self.model.embed_tokens(input_ids), None
        for layer in self.model.layers:
            h, r = layer(positions, h, r)
        return h + r

    @torch.no_grad()
    def resid(self, ids: list[int]) -> np.ndarray:
        """[layer, tok, d] of one request run alone."""
        t = torch.as_tensor(ids)
        h, r, out = self.model.embed_tokens(t), None, []
        for layer in self.model.layers:
            h, r = layer(torch.arange(len(ids)), h, r)
            out.append((h + r).numpy())
        return np.stack(out)


class FakeLLM:
    """``apply_model`` / ``generate`` as vLLM's LLM has them. ``reverse``: schedule requests in reverse order;
    ``pad``: padding rows after the real ones (position 0, a stale id); ``step_tokens``: split the flat batch into
    steps of that many rows (splitting a prompt when it does not fit: chunked prefill); ``run_hooks=False``: run
    a copy of the model without the hooks (what a compiled model does)."""

    def __init__(self, model: FakeModel, *, reverse=False, pad=0, step_tokens=None, run_hooks=True, eager=True):
        self.model, self.reverse, self.pad, self.step_tokens = model, reverse, pad, step_tokens
        self.shadow = None if run_hooks else FakeModel(len(model.model.layers), model.model.embed_tokens.embedding_dim)
        self.llm_engine = SimpleNamespace(model_config=SimpleNamespace(enforce_eager=eager))
        self.calls = 0

    def apply_model(self, fn):
        return [fn(self.model)]

    @torch.no_grad()
    def generate(self, reqs, max_tokens, use_tqdm=False):
        self.calls += 1
        run = self.model if self.shadow is None else self.shadow
        order = list(range(len(reqs)))[:: -1 if self.reverse else 1]
        ids = [t for j in order for t in reqs[j]["prompt_token_ids"]]
        pos = [p for j in order for p in range(len(reqs[j]["prompt_token_ids"]))]
        ids, pos = ids + [1] * self.pad, pos + [0] * self.pad
        step = self.step_tokens or len(ids)
        for s in range(0, len(ids), step):
            run(input_ids=torch.as_tensor(ids[s:s + step]), positions=torch.as_tensor(pos[s:s + step]))
        for k in range(1, max_tokens):  # decode steps: one row per request
            run(input_ids=torch.full((len(reqs),), 5), positions=torch.as_tensor(
                [len(reqs[j]["prompt_token_ids"]) + k - 1 for j in order]))
        return [SimpleNamespace(outputs=[SimpleNamespace(token_ids=[5 + (j % 3)] * max_tokens)]) for j in range(len(reqs))]


def _hooked(llm):
    return vb.HookedLLM(llm, sampling=lambda n: n)


# -- guards and settings ------------------------------------------------------------------------------------


def test_guards_say_why(tiny_llama, tmp_path):
    ok, why = vllm_available()
    if ok:  # pragma: no cover - GPU machines with vLLM
        pytest.skip("vLLM and a GPU are here: the guards do not apply")
    assert "vLLM" in why
    with pytest.raises(vb.VLLMUnavailableError, match=why.split("(")[0].strip()):
        VLLMGenerator(tiny_llama.model_id)
    prompts = PromptSet(["w1 w2 w3"])
    with pytest.raises(vb.VLLMUnavailableError):
        extract_vllm(tiny_llama.model_id, prompts, CaptureSpec(), str(tmp_path / "s.zarr"))
    assert not (tmp_path / "s.zarr").exists()  # refused before the store is touched


def test_engine_kwargs_force_eager_and_refuse(monkeypatch):
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
    kw = vb.engine_kwargs({"seed": 3}, hooks=True, tensor_parallel_size=1, gpu_memory_utilization=0.5)
    assert kw == {"seed": 3, "tensor_parallel_size": 1, "gpu_memory_utilization": 0.5, "enforce_eager": True,
                  "enable_prefix_caching": False}
    assert "enforce_eager" not in vb.engine_kwargs({}, hooks=False)
    with pytest.raises(vb.HookSettingsError, match="enforce_eager=False"):
        vb.engine_kwargs({"enforce_eager": False}, hooks=True)
    with pytest.raises(vb.HookSettingsError, match="prefix"):
        vb.engine_kwargs({"enable_prefix_caching": True}, hooks=True)
    with pytest.raises(vb.HookSettingsError, match="pipeline"):
        vb.engine_kwargs({"pipeline_parallel_size": 2}, hooks=True)
    with pytest.raises(vb.HookSettingsError, match="tensor_parallel_size"):
        vb.engine_kwargs({}, hooks=True, tensor_parallel_size=0)
    with pytest.raises(vb.HookSettingsError, match="gpu_memory_utilization"):
        vb.engine_kwargs({}, hooks=True, gpu_memory_utilization=1.5)
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    with pytest.raises(vb.HookSettingsError, match="MULTIPROCESSING"):
        vb.engine_kwargs({}, hooks=True)


def test_release_cuda_empties_the_module():
    m = nn.Linear(4, 4)
    vb.release_cuda(SimpleNamespace(model=m))
    assert m.weight.device.type == "meta"


def test_engine_share_beside_a_resident_model():
    gib = 2**30
    assert vb.share_beside([80 * gib], [80 * gib]) == 0.9  # an empty GPU: vLLM's usual share
    # an 8B bf16 copy (16 GiB) stays on an 80 GiB GPU: 56 of the 64 GiB free, not 0.9 of the whole (72 GiB)
    assert vb.share_beside([64 * gib], [80 * gib]) == 0.7
    # the tightest GPU of a tensor-parallel engine decides
    assert vb.share_beside([70 * gib, 40 * gib], [80 * gib, 80 * gib]) == 0.4
    with pytest.raises(vb.HookSettingsError, match=r"GPU 1 has 6\.0 of 80\.0 GiB free.*'hf' generator"):
        vb.share_beside([60 * gib, 6 * gib], [80 * gib, 80 * gib])
    with pytest.raises(ValueError, match="one free and one total"):
        vb.share_beside([], [])


# -- layer lookup -------------------------------------------------------------------------------------------


def _tree(path: str, n: int = 2, arch: str | None = None) -> nn.Module:
    root = nn.Module()
    if arch is not None:
        root.config = SimpleNamespace(model_type=arch)
    obj = root
    parts = path.split(".")
    for p in parts[:-1]:
        setattr(obj, p, nn.Module())
        obj = getattr(obj, p)
    setattr(obj, parts[-1], nn.ModuleList(nn.Identity() for _ in range(n)))
    return root


@pytest.mark.parametrize("arch,path", sorted(vb.VLLM_LAYER_PATHS.items()))
def test_layer_lookup_per_family(arch, path):
    found, layers = vb.decoder_layers(_tree(path, 3, arch))
    assert found == path and len(layers) == 3


def test_layer_lookup_transformers_backend_and_unknown():
    assert vb.decoder_layers(_tree("model.model.layers"))[0] == "model.model.layers"  # HF model kept as .model
    assert vb.decoder_layers(_tree("model.transformer.h", arch="gpt2"))[0] == "model.transformer.h"
    root = _tree("model.layers", arch="gpt2")  # the family's path first, then the candidates
    assert vb.decoder_layers(root)[0] == "model.layers"
    with pytest.raises(vb.UnsupportedArchitectureError, match="no decoder layers.*model.layers"):
        vb.decoder_layers(_tree("blocks", arch="mystery"))


def test_resid_of_and_with_resid():
    h, r = torch.randn(5, 4), torch.randn(5, 4)
    assert torch.equal(vb.resid_of((h, r)), h + r)
    new = torch.randn(5, 4)
    a, b = vb.with_resid((h, r), new)
    assert torch.equal(a + b, new)
    assert vb.with_resid(h, new) is new and vb.resid_of(h) is h


# -- flat rows -> requests ----------------------------------------------------------------------------------


def test_match_requests_maps_flat_rows():
    prompts = [[1, 7, 8], [1, 9], [1, 7, 8], [1, 4, 4, 4]]
    # scheduled as 3, 1, 0, 2 with two padding rows (position 0, stale ids) at the end
    order = [3, 1, 0, 2]
    ids = [t for j in order for t in prompts[j]] + [1, 1]
    pos = [p for j in order for p in range(len(prompts[j]))] + [0, 0]
    pending = vb.pending_index(prompts)
    hits = vb.match_requests(torch.as_tensor(pos), torch.as_tensor(ids), pending)
    starts = dict(hits)
    assert sorted(starts) == [0, 1, 2, 3] and not pending
    assert starts[3] == 0 and starts[1] == 4 and {starts[0], starts[2]} == {6, 9}  # equal prompts, in order
    rows = vb.kept_rows([starts[j] for j in range(4)], [len(p) for p in prompts], [2, 2, 2, 2], 2)
    for j in range(4):
        assert [ids[r] for r in rows[j]] == prompts[j][-2:]
    rows = vb.kept_rows([starts[3], starts[1]], [4, 2], [4, 2], 4)  # `all`: right-aligned, -1 before
    assert rows[1].tolist() == [-1, -1, 4, 5] and rows[0].tolist() == [0, 1, 2, 3]


def test_match_requests_refuses_a_split_prefill_and_skips_decode_rows():
    prompts = [[1, 2, 3, 4], [1, 5]]
    pending = vb.pending_index(prompts)
    assert vb.match_requests(np.array([0, 1, 0, 1]), np.array([1, 5, 1, 2]), pending) == [(1, 0)]
    with pytest.raises(vb.PrefillSplitError, match="split"):  # the rest of [1, 2, 3, 4] from position 2
        vb.match_requests(np.array([2, 3]), np.array([3, 4]), pending)
    done = vb.pending_index([[1, 2]])
    vb.match_requests(np.array([0, 1]), np.array([1, 2]), done)
    assert vb.match_requests(np.array([2]), np.array([9]), done) == []  # a decode step: nothing pending continues
    assert token_batches([3, 5, 2, 9], [0, 1, 2, 3], 8) == [[2, 0], [1], [3]]


# -- hooks through the fake engine ----------------------------------------------------------------------------


def test_hooks_steer_and_never_fired_is_loud(tiny_llama):
    model = FakeModel(3, 16)
    v = torch.randn(16)
    gen = VLLMGenerator.from_llm(FakeLLM(model), tiny_llama.tokenizer, sampling=lambda n: n)
    seen = []
    h = model.model.layers[2].register_forward_hook(lambda m, a, out: seen.append(vb.resid_of(out).clone()))
    gen.generate(["w1 w2", "w3"], max_new_tokens=2, interventions=[Add("resid_post", 1, vector=v, coef=100.0)])
    plain_seen = list(seen)
    seen.clear()
    gen.generate(["w1 w2", "w3"], max_new_tokens=2)
    h.remove()
    assert not torch.allclose(plain_seen[0], seen[0])  # the intervention reached the model
    assert not model.model.layers[1]._forward_hooks  # and was taken out again
    silent = VLLMGenerator.from_llm(FakeLLM(model, run_hooks=False), tiny_llama.tokenizer, sampling=lambda n: n)
    with pytest.raises(vb.HookNeverFiredError, match=r"layer\(s\) \[1\].*enforce_eager=True"):
        silent.generate(["w1 w2"], max_new_tokens=2, interventions=[ProjectOut("resid_post", 1, vector=v)])
    assert not model.model.layers[1]._forward_hooks
    compiled = VLLMGenerator.from_llm(FakeLLM(model, eager=False), tiny_llama.tokenizer, sampling=lambda n: n)
    with pytest.raises(vb.HookSettingsError, match="enforce_eager=False"):
        compiled.generate(["w1"], interventions=[ProjectOut("resid_post", 1, vector=v)])
    with pytest.raises(ValueError, match="prompt_only"):
        gen.generate(["w1"], interventions=[Add("resid_post", 1, vector=v, prompt_only=True)])


def test_projectout_in_vllm_layout_matches_the_formula():
    model = FakeModel(2, 8)
    v = torch.randn(8)
    hooked = _hooked(FakeLLM(model))
    ids = [[1, 5, 6, 7]]
    _, cap = hooked.run(ids, 1, [ProjectOut("resid_post", 0, vector=v)], capture_layers=(0, 1), counts=[4], width=4)
    d = v / v.norm()
    assert np.abs(cap.acts[0, 0] @ d.numpy()).max() < 1e-5  # layer 0 ablated, captured after the change
    ref = model.resid(ids[0])
    assert not np.allclose(cap.acts[0, 1], ref[1])  # and layer 1 saw the ablated stream


# -- extraction into the store --------------------------------------------------------------------------------


@pytest.mark.parametrize("positions,llm_kw", [("last", {"reverse": True, "pad": 2}), ("last:4", {}),
                                              ("all", {"reverse": True})])
def test_extract_vllm_writes_the_hf_store(tiny_llama, tmp_path, positions, llm_kw):
    n_layers, d = tiny_llama.adapter.n_layers, tiny_llama.adapter.d_model
    model = FakeModel(n_layers, d)
    texts = random_prompts(10, 4, 9, vocab_size=512, seed=1)
    prompts = PromptSet(texts, source="mem")
    spec = CaptureSpec(layers="0,2", positions=positions, dtype="float32")
    url = str(tmp_path / "s.zarr")
    llm = FakeLLM(model, **llm_kw)
    rep = extract_vllm(tiny_llama.model_id, prompts, spec, url, "g", shard_size=4, token_budget=20,
                       progress=False, engine=_hooked(llm), shards=[0, 2])
    assert rep.shards_written == 2 and llm.calls >= 2
    again = extract_vllm(tiny_llama.model_id, prompts, spec, url, "g", shard_size=4, token_budget=20,
                         progress=False, engine=_hooked(llm))  # resumes: only shard 1 is left
    assert (again.shards_written, again.shards_skipped) == (1, 2)
    ds = open_store(url, "g")
    got = ds["resid_post"].values
    ids = [tiny_llama.tokenizer(t)["input_ids"] for t in texts]
    for i, tok in enumerate(ids):
        ref = model.resid(tok)[[0, 2]]  # [layer, tok, d]
        if positions == "last":
            np.testing.assert_allclose(got[i], ref[:, -1], rtol=1e-5, atol=1e-6)
        else:
            k = 4 if positions == "last:4" else len(tok)
            w = got.shape[2]
            np.testing.assert_allclose(got[i][:, w - k:], ref[:, -k:], rtol=1e-5, atol=1e-6)
            assert np.isnan(got[i][:, : w - k]).all()
    # the HF path's provenance and identity: the HF extractor sees a finished store of its own kind
    from mechdiff.engine.extract import extract

    hf = extract(tiny_llama, prompts, spec, url, "g", shard_size=4, progress=False)
    assert hf.shards_written == 0 and hf.shards_skipped == 3
    assert ds.attrs["architecture"] == tiny_llama.adapter.describe() and ds.attrs["backend"] == "vllm"


def test_extract_vllm_appends_a_grown_dataset(tiny_llama, tmp_path):
    """The vLLM backend opens its group as the HF one does: a dataset that grew at its end grows the group by
    whole shards and only they are captured; without append the grown dataset is refused, naming the way out."""
    from mechdiff.engine.store import StoreMismatchError

    model = FakeModel(tiny_llama.adapter.n_layers, tiny_llama.adapter.d_model)
    texts = random_prompts(12, 4, 9, vocab_size=512, seed=3)
    texts.sort(key=lambda t: -len(t.split()))  # the stored token-id matrix is as wide as the first rows' longest
    texts = texts[::3] + [t for i, t in enumerate(texts) if i % 3]
    spec = CaptureSpec(layers="0,2", positions="last", dtype="float32")
    url = str(tmp_path / "s.zarr")
    first = extract_vllm(tiny_llama.model_id, PromptSet(texts[:8], source="stream"), spec, url, "g", shard_size=4,
                         progress=False, engine=_hooked(FakeLLM(model)))
    assert first.shards_written == 2
    grown = PromptSet(texts, source="stream")
    with pytest.raises(StoreMismatchError, match=r"holds 8 examples of another dataset.*append"):
        extract_vllm(tiny_llama.model_id, grown, spec, url, "g", shard_size=4, progress=False,
                     engine=_hooked(FakeLLM(model)))
    llm = FakeLLM(model)
    rep = extract_vllm(tiny_llama.model_id, grown, spec, url, "g", shard_size=4, progress=False,
                       engine=_hooked(llm), append=True)
    assert (rep.shards_written, rep.shards_skipped, rep.n_examples) == (1, 2, 12)
    got = open_store(url, "g")["resid_post"].values
    for i, t in enumerate(texts):
        np.testing.assert_allclose(got[i], model.resid(tiny_llama.tokenizer(t)["input_ids"])[[0, 2], -1],
                                   rtol=1e-5, atol=1e-6)


def test_the_vllm_plan_takes_the_checks_tokenization(tiny_llama, tmp_path):
    """``mechdiff extract --backend vllm`` hands its checks' tokenization to the plan (no second tokenization),
    and the plan's preparation equals one made without it."""
    from mechdiff.engine.models import load_tokenizer
    from mechdiff.engine.precheck import early_tokenization

    prompts = PromptSet(random_prompts(20, 3, 9, vocab_size=512, seed=4), source="mem")
    spec = CaptureSpec(layers="0,1", positions="last:2", dtype="float32")
    a = tiny_llama.adapter
    tokens = early_tokenization(load_tokenizer(tiny_llama.model_id), a.n_layers, a.max_positions, prompts, spec)
    plan = plan_vllm_extraction(tiny_llama.model_id, prompts, spec, str(tmp_path / "a.zarr"), "g",
                                reuse={tokens.key: tokens})
    alone = plan_vllm_extraction(tiny_llama.model_id, prompts, spec, str(tmp_path / "b.zarr"), "g")
    assert plan.prep.reused_tokens and not alone.prep.reused_tokens
    assert plan.prep.token_ids == alone.prep.token_ids and plan.prep.provenance == alone.prep.provenance


def test_extract_vllm_refuses_before_the_engine(tiny_llama, tmp_path):
    prompts = PromptSet(["w1 w2 w3"])
    with pytest.raises(ValueError, match="resid_post only"):
        plan_vllm_extraction(tiny_llama.model_id, prompts, CaptureSpec(sites="mlp_out"), str(tmp_path / "a.zarr"))
    with pytest.raises(ValueError, match="token budget"):
        plan_vllm_extraction(tiny_llama.model_id, prompts, CaptureSpec(), str(tmp_path / "a.zarr"), token_budget=0)
    assert not (tmp_path / "a.zarr").exists()
    model = FakeModel(tiny_llama.adapter.n_layers, tiny_llama.adapter.d_model)
    texts = random_prompts(3, 6, 6, vocab_size=512)
    with pytest.raises(vb.PrefillSplitError, match="split"):  # a step smaller than a prompt: chunked prefill
        extract_vllm(tiny_llama.model_id, PromptSet(texts), CaptureSpec(layers="0"), str(tmp_path / "b.zarr"),
                     progress=False, engine=_hooked(FakeLLM(model, step_tokens=4)))


def test_gpu_check_exits_0_on_cpu():
    if torch.cuda.is_available():  # pragma: no cover
        pytest.skip("a GPU is here: the check runs for real (benchmarks/gpu_check.py)")
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py")], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert "needs a CUDA GPU" in r.stdout
