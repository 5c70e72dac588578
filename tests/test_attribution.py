"""Attribution patching (AtP), its AtP* corrections, integrated gradients, and their agreement with exact patching.

Tiny random-weight Llamas (tests/conftest.py); the references are computed here by hand (hooks and autograd)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch
import xarray as xr

from mechdiff.analyses.attribution import attribution_agreement
from mechdiff.analyses.knowledge import prepare_pairs
from mechdiff.engine import patching as atm
from mechdiff.engine.adapter import ArchAdapter, hidden_from_output, replace_hidden_in_output
from mechdiff.engine.models import load_model
from mechdiff.engine.patching import ATTRIBUTION_METHODS as METHODS
from mechdiff.engine.patching import AttributionError, attribution_patching, exact_patching
from mechdiff.engine.sites import Replace, hooks
from mechdiff.errors import MechdiffError


pytestmark = pytest.mark.usefixtures("one_thread")


def _pairs(lm, n: int, seed: int, n_words: int = 10, context: str = ""):
    """Random prompts of ``n_words`` words (after a ``context`` the same in every prompt); the false one differs in
    one word (not the first)."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        w = [f"w{x}" for x in rng.integers(10, 400, n_words)]
        f = list(w)
        k = int(rng.integers(1, n_words))
        while f[k] == w[k]:
            f[k] = f"w{int(rng.integers(10, 400))}"
        rows.append(dict(true_statement=" ".join(w), false_statement=" ".join(f), true_answer="w1",
                         false_answer="w2", topic="t"))
    return prepare_pairs(lm.tokenizer, pd.DataFrame(rows), prompt=lambda s, t: f"{context} {s}".strip(),
                         tokenizer_hash=lm.tokenizer_hash)


def _delta(ds: xr.Dataset, site: str) -> np.ndarray:
    """[pair, layer, position]: the (estimated) change of the logit difference."""
    return (ds["patched"] - ds["ld_false"]).sel(site=site).transpose("pair", "layer", "position").values


def _metric_grad(lm, ids: torch.Tensor, answers, block: int, drop: int | None = None):
    """Hand-written reference: resid_post of ``block`` as a leaf, the logit difference, its gradient there. With
    ``drop``, that block's contribution to the residual stream is detached (the gradient takes the skip only)."""
    store = {}

    def leaf(mod, args, out):
        x = hidden_from_output(out).detach().requires_grad_(True)
        store["x"] = x
        return replace_hidden_in_output(out, x)

    def detach(mod, args, kwargs, out):
        inp = args[0] if args else kwargs["hidden_states"]
        h = hidden_from_output(out)
        return replace_hidden_in_output(out, inp + (h - inp).detach())

    handles = [lm.adapter.layer(block).register_forward_hook(leaf)]
    if drop is not None:
        handles.append(lm.adapter.layer(drop).register_forward_hook(detach, with_kwargs=True))
    try:
        logits = lm.model(input_ids=ids, use_cache=False).logits[:, -1].double()
        m = logits[:, answers[0]] - logits[:, answers[1]]
        (grad,) = torch.autograd.grad(m.sum(), store["x"])
    finally:
        for h in handles:
            h.remove()
    return store["x"].detach(), grad


# ---------------------------------------------------------------------------------------------
# the estimates against references


def test_plain_atp_is_the_gradient_times_the_activation_difference(tiny_llama):
    pairs = _pairs(tiny_llama, 3, seed=1)
    ds = attribution_patching(tiny_llama, None, pairs, sites="resid_post", layers=[1], method="atp")
    assert ds.attrs["estimate"] == "atp" and ds.attrs["signed"] is True
    got = _delta(ds, "resid_post")[:, 0]
    for i in range(len(pairs)):
        answers = [int(a) for a in pairs.answers[i]]
        x_true, _ = _metric_grad(tiny_llama, torch.tensor([pairs.true_ids[i]]), answers, block=1)
        x_false, grad = _metric_grad(tiny_llama, torch.tensor([pairs.false_ids[i]]), answers, block=1)
        want = ((x_true - x_false).double() * grad).sum(-1)[0].numpy()
        np.testing.assert_allclose(got[i], want, rtol=1e-5, atol=1e-6)
    # the positions before the first differing token are exact no-ops: estimated 0, not merely small
    first = int(np.argmax(np.asarray(pairs.true_ids[0]) != np.asarray(pairs.false_ids[0])))
    assert np.all(got[0, :first] == 0) and np.any(got[0, first:] != 0)


def test_graddrop_is_the_mean_absolute_estimate_over_dropped_layers(tiny_llama):
    """At resid_post of layer 0 (3 layers): dropping layer 0 leaves its gradient alone, dropping layer 1 or 2
    detaches that block's contribution; a residual site averages all 3."""
    pairs = _pairs(tiny_llama, 2, seed=2)
    ds = attribution_patching(tiny_llama, None, pairs, sites="resid_post", layers=[0], method="atp+gd")
    assert ds.attrs["signed"] is False
    got = _delta(ds, "resid_post")[:, 0]
    for i in range(len(pairs)):
        answers = [int(a) for a in pairs.answers[i]]
        x_true, _ = _metric_grad(tiny_llama, torch.tensor([pairs.true_ids[i]]), answers, block=0)
        per_layer = []
        for drop in (None, 1, 2):
            x_false, grad = _metric_grad(tiny_llama, torch.tensor([pairs.false_ids[i]]), answers, 0, drop)
            per_layer.append(((x_true - x_false).double() * grad).sum(-1)[0].abs())
        want = ((per_layer[0] + per_layer[1] + per_layer[2]) / 3).numpy()  # dropping layer 0 = no drop here
        np.testing.assert_allclose(got[i], want, rtol=1e-5, atol=1e-6)


@pytest.fixture()
def linear_readout(tiny_dir):
    """A tiny Llama whose final norm is the identity: the logit difference is linear in the last resid_post
    (the unembedding scaled up, so that the un-normalised residual stream still moves the logits visibly)."""
    lm = load_model(tiny_dir("llama", n_layers=3))
    lm.model.model.norm = torch.nn.Identity()
    with torch.no_grad():
        lm.model.lm_head.weight *= 1000
    return dataclasses.replace(lm, adapter=ArchAdapter(lm.model))


def test_atp_star_is_exact_where_the_readout_is_linear(linear_readout):
    """Last layer, linear read-out: AtP is exact, and AtP* is |exact| -- no attention after the patch, and every
    GradDrop variant equals AtP there, so the mean must divide by the number of variants it sums (L for a
    residual site, L - 1 for mlp_out, whose own layer's variant is structurally 0)."""
    lm = linear_readout
    pairs = _pairs(lm, 4, seed=3)
    kw = dict(sites=("resid_post", "mlp_out"), layers=[-1])
    exact = exact_patching(lm, None, pairs, **kw)
    for site in ("resid_post", "mlp_out"):
        want = _delta(exact, site)
        assert np.nanmax(np.abs(want)) > 0.05  # the patches do change the logit difference
        np.testing.assert_allclose(_delta(attribution_patching(lm, None, pairs, method="atp", **kw), site), want,
                                   rtol=1e-3, atol=1e-4)
        np.testing.assert_allclose(_delta(attribution_patching(lm, None, pairs, method="atp*", **kw), site),
                                   np.abs(want), rtol=1e-3, atol=1e-4)


def test_qk_fix_replaces_the_linearised_softmax_by_the_recomputed_pattern(tiny_dir):
    """AtP+QK at resid_post of layer 0 (entry layer 1), by hand: AtP, minus the linearised path through layer 1's
    attention probabilities (the vector-Jacobian product of their gradient), plus their real change under each
    patch (read from patched forward passes) contracted with the same gradient."""
    lm = load_model(tiny_dir("llama", n_layers=2))
    with torch.no_grad():  # sharpen layer 1's attention, where linearising the softmax is worst
        lm.adapter.attn_module(1).q_proj.weight *= 8
    pairs = _pairs(lm, 3, seed=4)
    t_ids, f_ids = torch.tensor(pairs.true_ids), torch.tensor(pairs.false_ids)
    answers = torch.as_tensor(pairs.answers)

    def probs(ids, ivs=(), leaf=False):
        """Layer 1's attention probabilities (and the metric, and resid_post 0 as a leaf) of a forward pass."""
        store = {}

        def hook(mod, args, out):
            store["x"] = hidden_from_output(out).detach().requires_grad_(leaf)
            return replace_hidden_in_output(out, store["x"])

        rec = atm._AttnRecorder({id(lm.adapter.attn_module(1)): 1})
        h = lm.adapter.layer(0).register_forward_hook(hook)
        try:
            with torch.set_grad_enabled(leaf), atm._recording(lm, rec), hooks(lm.adapter, None, ivs):
                logits = lm.model(input_ids=ids, use_cache=False).logits[:, -1].double()
        finally:
            h.remove()
        m = logits.gather(1, answers[:, :1]).squeeze(1) - logits.gather(1, answers[:, 1:]).squeeze(1)
        return rec.calls[1].weights, m, store["x"]

    x_true = probs(t_ids)[2]
    a_false, m, x_false = probs(f_ids, leaf=True)
    g_x, g_a = torch.autograd.grad(m.sum(), [x_false, a_false], retain_graph=True)
    (linear,) = torch.autograd.grad(a_false, x_false, grad_outputs=g_a)
    delta = (x_true - x_false.detach()).double()
    want = (delta * (g_x - linear).double()).sum(-1)  # AtP minus the linearised softmax path
    for p in range(f_ids.shape[1]):
        iv = Replace("resid_post", 0, values=x_true[:, p : p + 1], index=torch.full((len(pairs), 1), p))
        a_patched = probs(f_ids, [iv])[0]
        want[:, p] += (g_a.double() * (a_patched.double() - a_false.detach().double())).sum((1, 2, 3))
    got = _delta(attribution_patching(lm, None, pairs, sites="resid_post", layers=[0], method="atp+qk"),
                 "resid_post")[:, 0]
    atp = _delta(attribution_patching(lm, None, pairs, sites="resid_post", layers=[0], method="atp"),
                 "resid_post")[:, 0]
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-5)
    assert np.abs(got - atp).max() > 0.05 * np.abs(atp).max()  # the fix does change the estimate here


def _patterns(q: torch.Tensor, k: torch.Tensor, start: int, softcap: float | None) -> torch.Tensor:
    """Causal attention probabilities of one sequence (q [H, Ts, hd] after a prefix of ``start``, k [H, Tk, hd])."""
    z = torch.einsum("hid,hjd->hij", q, k)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    allowed = torch.arange(k.shape[1])[None, :] <= torch.arange(q.shape[1])[:, None] + start
    return torch.softmax(z.masked_fill(~allowed, -torch.inf), dim=-1)


@pytest.mark.parametrize("saturated", [False, True])
@pytest.mark.parametrize("softcap", [None, 5.0])
def test_qk_term_matches_the_softmax_recomputed_for_each_patch(saturated, softcap):
    """The plan's closed form (row of the patched query, renormalised later rows) against brute force: for each
    single-position patch, the whole pattern recomputed from the patched query and key. Saturated: the later rows
    put all but ~1e-30 of their attention on one key and the patch flips that key (1 - A is 0 in floating point
    there, so the rest must come from the other keys' logits)."""
    g = torch.Generator().manual_seed(0)
    n_pairs, heads, kv_heads, ts, hd, start = 2, 4, 2, 6, 8, 3  # grouped-query attention, a prefix of 3
    q = torch.randn(n_pairs, heads, ts, hd, generator=g, dtype=torch.float64)
    k = torch.randn(n_pairs, kv_heads, start + ts, hd, generator=g, dtype=torch.float64)
    q_new = q + 0.5 * torch.randn(q.shape, generator=g, dtype=torch.float64)
    k_new = k[:, :, start:] + 0.5 * torch.randn(n_pairs, kv_heads, ts, hd, generator=g, dtype=torch.float64)
    if saturated:
        k[:, :, start + 1] *= 10
        key = k[:, :, start + 1]  # [pair, kv head, hd]
        q[:, :, 2:] = 40 * (key / key.norm(dim=-1, keepdim=True)).repeat_interleave(heads // kv_heads, 1)[:, :, None]
        k_new[:, :, 1] = -key
    pair = torch.tensor([0, 1, 1, 0])  # variant rows -> pairs
    call = atm._AttnCall(q, k, None, 1.0, softcap, None)
    new = atm._AttnCall(q_new[pair], torch.cat([k[:, :, :start], k_new], 2)[pair], None, 1.0, softcap, None)
    grad = torch.randn(n_pairs, heads, ts, start + ts, generator=g, dtype=torch.float64)
    got = atm._qk_plan(call, new, pair, start).term(grad)
    kr = atm._repeat_kv(k, heads)
    if saturated and softcap is None:
        assert float(_patterns(q[0], kr[0], start, None)[:, 2:, start + 1].min()) > 1 - 1e-15
    for r, p in enumerate(pair.tolist()):
        before = _patterns(q[p], kr[p], start, softcap)
        for i in range(ts):
            qi, ki = q[p].clone(), kr[p].clone()
            qi[:, i] = new.query[r][:, i]
            ki[:, start + i] = atm._repeat_kv(new.key, heads)[r][:, start + i]
            want = float((grad[p] * (_patterns(qi, ki, start, softcap) - before)).sum())
            assert float(got[r, i]) == pytest.approx(want, abs=1e-9)


def test_atp_star_tracks_exact_patching_better_under_saturated_attention(tiny_dir):
    """Layer 1's queries and keys scaled up until its attention is saturated (the failure the QK fix is for):
    AtP* follows the size of exact patching effects at the resid_post patches that feed it better than AtP does
    (magnitudes on both sides: AtP* estimates |effect|)."""
    lm = load_model(tiny_dir("llama", n_layers=2))
    with torch.no_grad():
        attn = lm.adapter.attn_module(1)
        attn.q_proj.weight *= 16
        attn.k_proj.weight *= 16
    pairs = _pairs(lm, 24, seed=0, n_words=11)
    rec = atm._AttnRecorder({id(attn): 1})
    with torch.no_grad(), atm._recording(lm, rec):
        lm.model(input_ids=torch.tensor(pairs.false_ids), use_cache=False)
    assert float(rec.calls[1].weights.max(-1).values.mean()) > 0.8  # saturated: most rows on one key
    kw = dict(sites="resid_post", layers=[0])
    exact = exact_patching(lm, None, pairs, **kw)
    atp = attribution_patching(lm, None, pairs, method="atp", **kw)
    star = attribution_patching(lm, None, pairs, method="atp*", **kw)
    r_atp = attribution_agreement(exact, atp, quantity="delta", signed=False, n_bootstrap=0).per_site["resid_post"]
    r_star = attribution_agreement(exact, star, quantity="delta", n_bootstrap=0).per_site["resid_post"]
    assert r_star.r > r_atp.r + 0.05


def test_every_method_keeps_the_exact_patching_layout_and_prefix_reuse_changes_nothing(tiny_dir, tiny_llama):
    """Same dimensions, coordinates, false-run readout and NaN pattern as exact patching, within one model and
    across two (another random Llama with the same tokenizer); running the shared prefix once (the context the
    statement positions leave out; within a model, everything before the first differing token) gives the same
    estimates as running every position."""
    other = load_model(tiny_dir("llama", n_layers=3, seed=1))
    other.tokenizer_hash = tiny_llama.tokenizer_hash
    pairs = _pairs(tiny_llama, 2, seed=5, n_words=6, context="w5 w6 w7 w8")
    kw = dict(sites=("resid_pre", "resid_post", "attn_out", "mlp_out", "mlp_act"), layers="all",
              mask=pairs.mask("statement"))
    for source, target in ((tiny_llama, None), (other, tiny_llama)):
        exact = exact_patching(source, target, pairs, **kw)
        for m in METHODS:
            ds = attribution_patching(source, target, pairs, method=m, ig_steps=2, **kw)
            full = attribution_patching(source, target, pairs, method=m, ig_steps=2, reuse_prefix=False, **kw)
            assert ds.attrs["prefix_tokens_shared"] >= 2 * 5 and full.attrs["prefix_tokens_shared"] == 0
            np.testing.assert_allclose(ds["patched"], full["patched"], rtol=1e-4, atol=1e-5)
            assert ds["patched"].dims == exact["patched"].dims
            for c in ("site", "pair", "layer", "position"):
                assert np.array_equal(ds[c].values, exact[c].values)
            np.testing.assert_allclose(ds["ld_false"], exact["ld_false"], atol=1e-4)
            np.testing.assert_allclose(ds["ld_true"], exact["ld_true"], atol=1e-4)
            assert np.array_equal(np.isnan(ds["patched"].values), np.isnan(exact["patched"].values))
            assert np.isnan(ds["patched"].values).any()  # the context: not patched, not estimated
            assert ds.attrs["estimate"] == m and ds.attrs["signed"] == (m not in ("atp+gd", "atp*"))


def test_integrated_gradients_with_one_step_is_the_midpoint_gradient(tiny_llama):
    """ig with one step: delta . the gradient of the run on the midpoint of the two prompts' input embeddings."""
    pairs = _pairs(tiny_llama, 2, seed=6)
    got = _delta(attribution_patching(tiny_llama, None, pairs, sites="resid_post", layers=[1], method="ig",
                                      ig_steps=1), "resid_post")[:, 0]
    for i in range(len(pairs)):
        answers = [int(a) for a in pairs.answers[i]]
        t_ids, f_ids = torch.tensor([pairs.true_ids[i]]), torch.tensor([pairs.false_ids[i]])
        x_true, _ = _metric_grad(tiny_llama, t_ids, answers, block=1)
        x_false, _ = _metric_grad(tiny_llama, f_ids, answers, block=1)
        emb = tiny_llama.adapter.embed
        store = {}

        def leaf(mod, args, out):
            store["x"] = hidden_from_output(out).detach().requires_grad_(True)
            return replace_hidden_in_output(out, store["x"])

        h = tiny_llama.adapter.layer(1).register_forward_hook(leaf)
        try:
            logits = tiny_llama.model(inputs_embeds=(emb(t_ids) + emb(f_ids)).detach() / 2,
                                      use_cache=False).logits[:, -1].double()
            (grad,) = torch.autograd.grad(logits[0, answers[0]] - logits[0, answers[1]], store["x"])
        finally:
            h.remove()
        want = ((x_true - x_false).double() * grad).sum(-1)[0].numpy()
        np.testing.assert_allclose(got[i], want, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# agreement with exact patching


def _fake(values: np.ndarray, ld_false: np.ndarray, runs=("a", "b"), **attrs) -> xr.Dataset:
    """A dataset in the exact-patching layout with a run dimension; ``values``: [run, site, pair, layer, pos]."""
    dims = ("run", "site", "pair", "layer", "position")
    coords = {"run": list(runs), "site": ["resid_post", "mlp_out"], "pair": np.arange(values.shape[2]),
              "layer": np.arange(values.shape[3]), "position": np.arange(-values.shape[4], 0)}
    lf = xr.DataArray(ld_false, dims=("run", "pair"), coords={"run": list(runs), "pair": coords["pair"]})
    patched = xr.DataArray(values, dims=dims, coords=coords) + lf
    return xr.Dataset({"patched": patched, "effect": patched - lf, "ld_false": lf}, attrs=attrs)


def test_agreement_is_numpy_corrcoef_per_site_and_run():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 2, 6, 3, 4))
    y = x + rng.normal(scale=[[[[[0.2]]], [[[2.0]]]]], size=x.shape)  # resid_post close, mlp_out noisy
    x[0, :, 0, :, :2] = np.nan  # a pair's unpatched positions
    lf = rng.normal(size=(2, 6))
    ag = attribution_agreement(_fake(x, lf), _fake(y, lf), quantity="delta", n_bootstrap=50, seed=3)

    def corr(a, b):
        a, b = a.ravel(), b.ravel()
        ok = np.isfinite(a) & np.isfinite(b)
        return np.corrcoef(a[ok], b[ok])[0, 1]

    for i, run in enumerate(("a", "b")):
        for j, site in enumerate(("resid_post", "mlp_out")):
            a = ag.per_run[run][site]
            assert a.r == pytest.approx(corr(x[i, j], y[i, j]), abs=1e-12)
            assert a.reliable == (a.r >= 0.8) and a.n_pairs == 6
            assert a.interval[0] <= a.interval[1]
    for j, site in enumerate(("resid_post", "mlp_out")):
        assert ag.per_site[site].r == pytest.approx(corr(x[:, j], y[:, j]), abs=1e-12)
    assert ag.per_site["resid_post"].reliable and not ag.per_site["mlp_out"].reliable and not ag.reliable
    line = ag.message()
    assert line.startswith("attribution estimate (attribution) unreliable here:")
    assert f"mlp_out r = {ag.per_site['mlp_out'].r:.2f}" in line
    # seeded: the same intervals again; ``keep`` drops pairs; magnitudes when the estimate is unsigned
    assert attribution_agreement(_fake(x, lf), _fake(y, lf), quantity="delta", n_bootstrap=50,
                                 seed=3).per_site["mlp_out"].interval == ag.per_site["mlp_out"].interval
    keep = xr.DataArray(np.arange(6) >= 2, dims="pair")
    kept = attribution_agreement(_fake(x, lf), _fake(y, lf), quantity="delta", keep=keep, n_bootstrap=0)
    assert kept.per_run["b"]["mlp_out"].r == pytest.approx(corr(x[1, 1, 2:], y[1, 1, 2:]), abs=1e-12)
    assert kept.per_run["b"]["mlp_out"].n_pairs == 4 and np.isnan(kept.per_run["b"]["mlp_out"].interval[0])
    mag = attribution_agreement(_fake(x, lf), _fake(np.abs(y), lf, signed=False, estimate="atp*"), quantity="delta",
                                n_bootstrap=0)
    assert not mag.signed and mag.per_site["mlp_out"].r == pytest.approx(corr(np.abs(x[:, 1]), np.abs(y[:, 1])))
    assert "atp*" in mag.message() and "|estimate| against |exact|" in mag.message()


def test_agreement_cannot_judge_constant_or_empty_data():
    x = np.zeros((2, 2, 3, 2, 2))
    ag = attribution_agreement(_fake(x, np.zeros((2, 3))), _fake(x + 1, np.zeros((2, 3))), n_bootstrap=10)
    assert np.isnan(ag.per_site["resid_post"].r) and not ag.reliable
    assert "cannot be judged" in ag.message()


# ---------------------------------------------------------------------------------------------
# bad input: a specific error before any work


@pytest.mark.parametrize("kw, match", [
    (dict(method="atp**"), "method 'atp\\*\\*'"),
    (dict(method="ig", ig_steps=0), "ig_steps"),
    (dict(method="ig", ig_steps=2.5), "ig_steps"),
])
def test_bad_options_fail_before_any_model_runs(kw, match):
    # no models, no pairs: the option is checked first
    with pytest.raises(AttributionError, match=match) as e:
        attribution_patching(None, None, None, **kw)
    assert isinstance(e.value, MechdiffError) and isinstance(e.value, ValueError)


def test_agreement_refuses_mismatched_datasets():
    x = np.zeros((2, 2, 3, 2, 2))
    a = _fake(x, np.zeros((2, 3)))
    with pytest.raises(AttributionError, match="quantity"):
        attribution_agreement(a, a, quantity="logits")
    with pytest.raises(AttributionError, match="threshold"):
        attribution_agreement(a, a, threshold=80)
    with pytest.raises(AttributionError, match="n_bootstrap"):
        attribution_agreement(a, a, n_bootstrap=-1)
    with pytest.raises(AttributionError, match="'layer' coordinate"):
        attribution_agreement(a, a.assign_coords(layer=[4, 5]))
    with pytest.raises(AttributionError, match="has no"):
        attribution_agreement(a, a.drop_vars("patched"))
