"""Hook sites against references: HF hidden states, hand-installed hooks, hand-modified forwards."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mechdiff.engine.adapter import hidden_from_output, replace_hidden_in_output
from mechdiff.engine.batching import pad_batch, tokenize
from mechdiff.engine.models import load_model
from mechdiff.engine.positions import Positions, PositionError, gather_index
from mechdiff.engine.sites import (SITES, Add, Capture, Intervention, MeanAblate, ProjectOut, Replace, SiteError, hooks,
                                   mlp_only_at, parse_layers)
from mechdiff.engine.tiny import TINY_ARCHS, random_prompts

PROMPTS = random_prompts(5, 4, 12, vocab_size=512, seed=3)


def _batch(lm, side="right"):
    ids = tokenize(lm.tokenizer, PROMPTS)
    return ids, pad_batch(ids, lm.tokenizer.pad_token_id, side=side)


def _capture_all(lm, inputs, sites=SITES, index=None):
    n = lm.adapter.n_layers
    cap = Capture(tuple(sites), tuple(range(n)), index=index)
    with torch.no_grad(), hooks(lm.adapter, cap):
        out = lm.model(**inputs, output_hidden_states=True, use_cache=False)
    return cap, out


@pytest.fixture(scope="module", params=TINY_ARCHS)
def arch_lm(request, tiny_dir):
    return load_model(tiny_dir(request.param, n_layers=3))


def test_resid_post_equals_hf_hidden_states(arch_lm):
    lm = arch_lm
    _, inputs = _batch(lm)
    cap, out = _capture_all(lm, inputs)
    hs = out.hidden_states
    n = lm.adapter.n_layers
    mask = inputs["attention_mask"].bool()
    for l in range(n - 1):
        got = cap.acts[("resid_post", l)][mask]
        torch.testing.assert_close(got, hs[l + 1][mask], atol=1e-5, rtol=1e-5)
    # resid_pre of layer l is the residual before block l: HF's hidden_states[l] for l < last.
    for l in range(n):
        torch.testing.assert_close(cap.acts[("resid_pre", l)][mask], hs[l][mask], atol=1e-5, rtol=1e-5)
    # Last layer: HF applied the final norm there, so check by hand instead: the block's output is its
    # input plus what attention and the MLP added (parallel or sequential residual alike), and the final
    # norm of it reproduces HF's last hidden state and the logits.
    last = n - 1
    pre = hs[last]
    post = cap.acts[("resid_post", last)]
    torch.testing.assert_close(
        post[mask], (pre + cap.acts[("attn_out", last)] + cap.acts[("mlp_out", last)])[mask], atol=1e-5, rtol=1e-5
    )
    normed = lm.adapter.final_norm(post)
    torch.testing.assert_close(normed[mask], hs[-1][mask], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lm.adapter.logits(post)[mask], out.logits[mask], atol=1e-4, rtol=1e-4)


def test_mlp_act_is_down_projection_input(arch_lm):
    lm = arch_lm
    _, inputs = _batch(lm)
    seen = {}
    handles = [
        lm.adapter.down_proj(l).register_forward_pre_hook(lambda m, a, l=l: seen.__setitem__(l, a[0].detach().clone()))
        for l in range(lm.adapter.n_layers)
    ]
    try:
        cap, _ = _capture_all(lm, inputs, sites=("mlp_act",))
    finally:
        for h in handles:
            h.remove()
    for l in range(lm.adapter.n_layers):
        assert cap.acts[("mlp_act", l)].shape[-1] == lm.adapter.d_mlp
        torch.testing.assert_close(cap.acts[("mlp_act", l)], seen[l], atol=0, rtol=0)


@pytest.mark.parametrize("side", ["left", "right"])
def test_mlp_only_at_the_captured_positions_keeps_them_exact(arch_lm, side):
    """The deepest block's MLP run at the captured positions alone: the block's output there is the full
    forward's, on every architecture (sequential, parallel and post-normed residuals), including examples
    shorter than the positions kept (empty slots, -1); the MLP really sees only those positions."""
    lm = arch_lm
    _, inputs = _batch(lm, side)
    last = lm.adapter.n_layers - 1
    counts = torch.full((inputs["input_ids"].shape[0],), 5)
    counts[0] = 2  # an example keeping fewer positions than the others: three empty slots
    index = gather_index(inputs["attention_mask"], counts, 5)
    assert (index < 0).any()
    full, _ = _capture_all(lm, inputs, sites=("resid_post",), index=index)
    seen = []
    with mlp_only_at(lm.adapter, last, index):
        h = lm.adapter.mlp_module(last).register_forward_pre_hook(  # after the cut: sees what the MLP gets
            lambda m, a, k: seen.append(tuple((a[0] if a else k["hidden_states"]).shape)), with_kwargs=True)
        try:
            cut, _ = _capture_all(lm, inputs, sites=("resid_post",), index=index)
        finally:
            h.remove()
    assert seen == [(len(PROMPTS), 5, lm.adapter.d_model)]
    for l in range(last + 1):
        a, b = cut.acts[("resid_post", l)], full.acts[("resid_post", l)]
        assert torch.equal(a.isnan(), b.isnan())
        torch.testing.assert_close(a.nan_to_num(), b.nan_to_num(), atol=1e-5, rtol=1e-5)
    assert not lm.adapter.mlp_module(last)._forward_hooks and not lm.adapter.mlp_module(last)._forward_pre_hooks


def test_left_and_right_padding_agree(arch_lm):
    lm = arch_lm
    ids, right = _batch(lm, "right")
    _, left = _batch(lm, "left")
    counts = torch.full((len(ids),), 3)
    i_r = gather_index(right["attention_mask"], counts, 3)
    i_l = gather_index(left["attention_mask"], counts, 3)
    cap_r, _ = _capture_all(lm, right, sites=("resid_post", "mlp_act"), index=i_r)
    cap_l, _ = _capture_all(lm, left, sites=("resid_post", "mlp_act"), index=i_l)
    for key in cap_r.acts:
        torch.testing.assert_close(cap_l.acts[key], cap_r.acts[key], atol=2e-5, rtol=1e-4)
    # ... and both equal each prompt run alone.
    for b, x in enumerate(ids):
        single = pad_batch([x], lm.tokenizer.pad_token_id)
        cap_s, _ = _capture_all(lm, single, sites=("resid_post",), index=gather_index(single["attention_mask"], counts[:1], 3))
        for l in range(lm.adapter.n_layers):
            torch.testing.assert_close(cap_r.acts[("resid_post", l)][b], cap_s.acts[("resid_post", l)][0], atol=2e-5, rtol=1e-4)


class _Wrapped(torch.nn.Module):
    """A decoder block whose output a plain function rewrites: the hand-modified forward."""

    def __init__(self, inner, fn):
        super().__init__()
        self.inner, self.fn = inner, fn

    def forward(self, *args, **kwargs):
        out = self.inner(*args, **kwargs)
        return replace_hidden_in_output(out, self.fn(hidden_from_output(out)))


def _hand_logits(lm, inputs, layer, fn):
    layers = lm.adapter.layers
    orig = layers[layer]
    layers[layer] = _Wrapped(orig, fn)
    try:
        with torch.no_grad():
            return lm.model(**inputs, use_cache=False).logits
    finally:
        layers[layer] = orig


@pytest.mark.parametrize("kind", ["add", "ablate", "replace", "mean", "mean_at"])
def test_interventions_equal_hand_modified_forward(tiny_llama, kind):
    lm = tiny_llama
    ids, inputs = _batch(lm)
    g = torch.Generator().manual_seed(0)
    d = lm.adapter.d_model
    v = torch.randn(d, generator=g)
    layer = 1
    index = gather_index(inputs["attention_mask"], torch.full((len(ids),), 2), 2)
    units = torch.tensor([3, 0, 7])
    if kind == "add":
        iv = Add("resid_post", layer, v, 3.0)
        fn = lambda x: x + 3.0 * v
    elif kind == "ablate":
        iv = ProjectOut("resid_post", layer, v)
        u = v / v.norm()
        fn = lambda x: x - (x @ u)[..., None] * u
    elif kind == "mean":  # every unit, every position
        iv = MeanAblate("resid_post", layer, mean=v)
        fn = lambda x: v.expand_as(x).clone()
    elif kind == "mean_at":  # some units, at the last two positions only
        iv = MeanAblate("resid_post", layer, mean=v[units], units=units, index=index)

        def fn(x):
            x = x.clone()
            for b in range(len(ids)):
                for j in range(2):
                    x[b, index[b, j], units] = v[units]
            return x
    else:
        vals = torch.randn(len(ids), 2, d, generator=g)
        iv = Replace("resid_post", layer, values=vals, index=index)

        def fn(x):
            x = x.clone()
            for b in range(len(ids)):
                for j in range(2):
                    x[b, index[b, j]] = vals[b, j]
            return x

    with torch.no_grad(), hooks(lm.adapter, None, [iv]):
        got = lm.model(**inputs, use_cache=False).logits
    want = _hand_logits(lm, inputs, layer, fn)
    with torch.no_grad():
        plain = lm.model(**inputs, use_cache=False).logits
    mask = inputs["attention_mask"].bool()
    torch.testing.assert_close(got[mask], want[mask], atol=1e-5, rtol=1e-5)
    assert (got[mask] - plain[mask]).abs().max() > 1e-3  # the intervention did something


def test_add_at_selected_positions_only(tiny_llama):
    lm = tiny_llama
    ids, inputs = _batch(lm)
    index = gather_index(inputs["attention_mask"], torch.ones(len(ids), dtype=torch.long), 1)
    v = torch.randn(lm.adapter.d_model)
    iv = Add("mlp_out", 0, v, index=index)
    cap_a = Capture(("mlp_out",), (0,))
    with torch.no_grad(), hooks(lm.adapter, cap_a, [iv]):
        lm.model(**inputs, use_cache=False)
    cap_b = Capture(("mlp_out",), (0,))
    with torch.no_grad(), hooks(lm.adapter, cap_b):
        lm.model(**inputs, use_cache=False)
    diff = cap_a.acts[("mlp_out", 0)] - cap_b.acts[("mlp_out", 0)]
    changed = diff.abs().sum(-1) > 0
    expect = torch.zeros_like(changed)
    expect[torch.arange(len(ids)), index[:, 0]] = True
    assert torch.equal(changed, expect)


def test_mlp_act_intervention_matches_hand_modified_down_proj(tiny_llama):
    """Ablating a direction in neuron space = a down projection fed the ablated activations."""
    lm = tiny_llama
    _, inputs = _batch(lm)
    u = torch.zeros(lm.adapter.d_mlp)
    u[5] = 1.0  # zero-ablate neuron 5
    iv = ProjectOut("mlp_act", 2, u)
    with torch.no_grad(), hooks(lm.adapter, None, [iv]):
        got = lm.model(**inputs, use_cache=False).logits
    dp = lm.adapter.down_proj(2)
    saved = dp.weight.data[:, 5].clone()
    dp.weight.data[:, 5] = 0
    try:
        with torch.no_grad():
            want = lm.model(**inputs, use_cache=False).logits
    finally:
        dp.weight.data[:, 5] = saved
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_hooks_removed_on_exception(tiny_llama):
    lm = tiny_llama
    a = lm.adapter
    modules = [m for l in range(a.n_layers) for m in (a.layer(l), a.down_proj(l), a.attn_out_module(l), a.mlp_out_module(l))]
    # HF installs output-recording hooks of its own; ours must leave exactly those behind.
    before = [(dict(m._forward_hooks), dict(m._forward_pre_hooks)) for m in modules]
    cap = Capture(("resid_post", "mlp_act", "attn_out", "mlp_out", "resid_pre"), tuple(range(a.n_layers)))
    with pytest.raises(RuntimeError, match="boom"):
        with hooks(a, cap, [Add("resid_post", 0, torch.ones(a.d_model))]):
            assert any(len(m._forward_hooks) + len(m._forward_pre_hooks) > len(b[0]) + len(b[1]) for m, b in zip(modules, before))
            raise RuntimeError("boom")
    assert [(dict(m._forward_hooks), dict(m._forward_pre_hooks)) for m in modules] == before


def test_captured_tensors_do_not_alias_later_passes(tiny_llama):
    lm = tiny_llama
    ids, inputs = _batch(lm)
    for index in (None, gather_index(inputs["attention_mask"], torch.full((len(ids),), 2), 2)):
        cap = Capture(("resid_post", "mlp_act"), (0, 1, 2), index=index)
        with torch.no_grad(), hooks(lm.adapter, cap):
            lm.model(**inputs, use_cache=False)
        snapshot = {k: v.clone() for k, v in cap.acts.items()}
        other = dict(inputs, input_ids=(inputs["input_ids"] * 7 + 11) % 500)
        with torch.no_grad():
            for _ in range(2):
                lm.model(**other, use_cache=False)
        for k in snapshot:
            assert torch.equal(snapshot[k], cap.acts[k])


def test_bad_sites_layers_positions(tiny_llama):
    with pytest.raises(SiteError, match="unknown site 'resid_mid'"):
        with hooks(tiny_llama.adapter, Capture(("resid_mid",), (0,))):
            pass
    with pytest.raises(SiteError, match="out of range: the model has 3 layers"):
        parse_layers("0,7", 3)
    assert parse_layers("all", 3) == (0, 1, 2)
    assert parse_layers("-1", 3) == (2,)
    assert parse_layers("1:", 3) == (1, 2)
    with pytest.raises(PositionError, match="unknown positions"):
        Positions.parse("first")
    with pytest.raises(PositionError, match="not found"):
        Positions.parse("from:w9").counts([[1, 5, 6]], [999])
    assert Positions.parse("from:x").counts([[1, 5, 6, 7, 5, 6, 9]], [5, 6]) == [3]


def test_interventions_are_an_open_family(tiny_llama):
    """A new kind is a subclass saying what it does; the hooks need nothing else. Bad arguments fail when made."""
    lm = tiny_llama
    _, inputs = _batch(lm)

    class Scale(Intervention):
        def apply(self, x):
            return 2.0 * x

    with torch.no_grad(), hooks(lm.adapter, None, [Scale("resid_post", 1)]):
        got = lm.model(**inputs, use_cache=False).logits
    torch.testing.assert_close(got, _hand_logits(lm, inputs, 1, lambda x: 2.0 * x), atol=1e-5, rtol=1e-5)
    assert Scale("resid_post", 0).every_position and not Replace("resid_post", 0, values=torch.zeros(1, 1, 2),
                                                                  index=torch.zeros(1, 1, dtype=torch.long)).every_position
    with pytest.raises(SiteError, match="unknown site"):
        Add("resid", 0, torch.ones(2))
    with pytest.raises(ValueError, match="needs a vector"):
        ProjectOut("resid_post", 0)
    with pytest.raises(ValueError, match="3 units but a mean of shape"):
        MeanAblate("mlp_act", 0, mean=torch.zeros(2), units=[1, 2, 3])
    with pytest.raises(ValueError, match="rows"):
        Add("resid_post", 0, torch.ones(2), rows=slice(3, 1))


def test_captures_are_gathered_onto_the_output_device():
    """Layers of a split model live on different devices: each capture moves to the output device, and a stack
    over layers gathers them onto one (here the second device is ``meta``, which a CPU-only machine has)."""
    x = torch.randn(2, 5, 4)
    index = torch.tensor([[3, 4], [-1, 4]])
    cap = Capture(("resid_post",), (0, 1), index=index, dtype=torch.float16, to_device="meta")
    cap.take("resid_post", 0, x)
    cap.take("resid_post", 1, x.to("meta"))  # computed on the other device
    assert {t.device.type for t in cap.acts.values()} == {"meta"}
    assert cap.stacked("resid_post").shape == (2, 2, 2, 4) and cap.stacked("resid_post").device.type == "meta"
    # no output device: the stack lands on the first layer's device, the values sliced and cast where computed
    here = Capture(("resid_post",), (0, 1), index=index, dtype=torch.float16)
    here.take("resid_post", 0, x)
    here.take("resid_post", 1, 2 * x)
    got = here.stacked("resid_post")
    assert got.device.type == "cpu" and got.dtype == torch.float16
    want = torch.stack([x, 2 * x], 1).half()
    torch.testing.assert_close(got[0], want[0, :, 3:5])
    assert torch.isnan(got[1, :, 0]).all() and torch.equal(got[1, :, 1], want[1, :, 4])
    here.wait()  # nothing pinned: returns at once


def test_a_model_placed_by_device_map_captures_what_the_plain_model_does(tiny_dir, tmp_path):
    """A model dispatched layer by layer (``device_map``, each module placed explicitly) is extracted like one on
    a single device: the same values, every capture on the host."""
    from mechdiff.engine.capture import CaptureSpec
    from mechdiff.engine.data import PromptSet
    from mechdiff.engine.extract import forward_capture, prepare

    path = tiny_dir("llama", n_layers=3)
    plain = load_model(path)
    placed = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu",
              **{f"model.layers.{i}": "cpu" for i in range(3)}}
    split = load_model(path, device_map=placed)
    assert split.device_map == placed
    ps = PromptSet.from_texts(["w1 w2 w3", "w4 w5", "w6 w7 w8 w9"])
    spec = CaptureSpec(sites="resid_post,mlp_out", layers="all", positions="last:2")
    a = forward_capture(plain, prepare(plain, ps, spec), [0, 1, 2])
    b = forward_capture(split, prepare(split, ps, spec), [0, 1, 2])
    for site in a:
        np.testing.assert_array_equal(a[site], b[site])
