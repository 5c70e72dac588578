"""Confidence study controls: weight processing against numpy on the processed matrices; IoU baselines against
their exact expectations; the entropy-neuron gate, the explained fraction and both verdict rules on planted
numbers; and the study's verdicts on tiny models planted so that the right answer is known by construction."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import hypergeom

from mechdiff.analyses import confidence as cf
from mechdiff.analyses import confidence_controls as cc
from mechdiff.analyses.common import ModelGroup
from mechdiff.engine.models import load_model
from mechdiff.engine.tiny import random_prompts

D_MODEL, D_MLP, VOCAB = 64, 128, 512
NULL = 8
S_A = [3, 17, 29, 40, 51, 66, 77, 90, 101, 120]
S_C = [5, 9, 14, 27, 38, 60, 71, 84, 99, 110]  # disjoint from S_A
DECOYS = [11, 22, 33, 44, 55]


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------ weight processing


def numpy_processed(lm, arch: str, mode: str):
    """W_out [d, m] and W_U [vocab, d] processed as TransformerLens does, written out in numpy."""
    w = lm.adapter.down_proj_weight(-1).detach().double().numpy()
    u = lm.adapter.unembed_weight().detach().double().numpy()
    if mode == "none":
        return w, u
    g = lm.adapter.final_norm.weight.detach().double().numpy()
    g = 1.0 + g if arch == "gemma" else g  # Gemma's RMSNorm scales by 1 + weight
    u = u * g[None, :]  # fold_ln
    u = u - u.mean(0, keepdims=True)  # center_unembed: each hidden dim's mean over the vocabulary
    if arch == "gpt2":  # LayerNorm: fold_ln centres W_U over d_model, center_writing_weights centres W_out
        u = u - u.mean(1, keepdims=True)
        w = w - w.mean(0, keepdims=True)
    return w, u


@pytest.mark.parametrize("arch", ["llama", "gemma", "gpt2"])
def test_processed_logit_variance_equals_numpy(tiny_dir, arch):
    lm = load_model(tiny_dir(arch, n_layers=2, d_model=D_MODEL, d_mlp=D_MLP, vocab_size=VOCAB))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a non-trivial gain and an unembedding with a mean, so processing matters
        lm.adapter.final_norm.weight.copy_(torch.rand(D_MODEL, generator=g) * 2 + 0.2)
        lm.adapter.unembed_weight().add_(torch.randn(D_MODEL, generator=g) * 0.05)
    for mode in ("transformer_lens", "none"):
        w, u = numpy_processed(lm, arch, mode)
        np.testing.assert_allclose(cf.processed_unembed(lm, mode).numpy(), u, rtol=1e-5, atol=1e-8)
        un = u / np.linalg.norm(u, axis=1, keepdims=True)
        cos = un @ (w / np.linalg.norm(w, axis=0))
        norm, var = cf.neuron_stats(lm, weight_processing=mode, vocab_chunk=100)  # several chunks
        np.testing.assert_allclose(norm, np.linalg.norm(w, axis=0), rtol=1e-12)
        np.testing.assert_allclose(var, cos.var(axis=0), rtol=1e-5, atol=1e-12)
    en = cf.entropy_neurons(lm)
    assert en.weight_processing == "transformer_lens"
    assert en.norm_kind == ("layernorm" if arch == "gpt2" else "rmsnorm")
    raw = cf.entropy_neurons(lm, weight_processing="none")
    assert not np.allclose(raw.logit_var, en.logit_var)  # the processing changes what is measured


def test_weight_processing_refuses_other_norms(tiny_dir):
    lm = load_model(tiny_dir("llama", n_layers=2, d_model=D_MODEL, d_mlp=D_MLP, vocab_size=VOCAB))
    lm.adapter.final_norm = torch.nn.Identity()  # not a norm: nothing to fold
    with pytest.raises(cf.WeightProcessingError, match="Identity.*weight_processing='none'"):
        cf.neuron_stats(lm)
    assert cf.neuron_stats(lm, weight_processing="none")[0].shape == (D_MLP,)
    with pytest.raises(cf.ConfidenceOptionError, match="weight_processing 'fold'"):
        cf.neuron_stats(lm, weight_processing="fold")


# ------------------------------------------------------------------------------------------ IoU and baselines


def test_iou_baselines_match_exact_expectations():
    rng = np.random.default_rng(0)
    d, n, q = 200, 10, 0.2  # top-norm pool of k = 40
    norm, var = rng.random(d), rng.random(d)
    b = cc.iou_baselines(norm, var, norm, var, q=q, n=n, draws=4000, seed=1)
    assert b.top_norm == 1.0 and b.top_var == 1.0 and b.extreme == 1.0  # identical models: every ranking kept

    def expected(pool: int) -> float:  # overlap of two random n-subsets of one pool is hypergeometric
        k = np.arange(n + 1)
        return float((hypergeom(pool, n, n).pmf(k) * k / (2 * n - k)).sum())

    assert b.random_top_norm_mean == pytest.approx(expected(40), abs=0.01)
    assert b.random_all_mean == pytest.approx(expected(d), abs=0.006)
    assert b.random_top_norm_upper >= b.random_top_norm_mean
    # a second model whose top-norm neurons are others: top-n by norm shares nothing, nor do random draws
    ramp = np.arange(d, dtype=float)
    b2 = cc.iou_baselines(ramp, var, ramp[::-1].copy(), var, q=q, n=n, draws=500, seed=1)
    assert b2.top_norm == 0.0 and b2.top_var == 0.0 and b2.random_top_norm_upper == 0.0
    assert b2.random_all_mean == pytest.approx(expected(d), abs=0.015)  # chance does not look at the norms
    with pytest.raises(cc.ControlInputError, match="one length"):
        cc.iou_baselines(norm, var, norm[:-1], var[:-1], q=q, n=n)


def test_iou_stability_over_q():
    d = 100
    norm = np.linspace(2.0, 1.0, d)  # neuron 0 has the largest norm
    var_a = np.linspace(0.0, 1.0, d)  # lowest variance among the top-norm: the first neurons
    var_b = var_a.copy()
    var_b[5:10] = 2.0  # model b: neurons 5..9 no longer low-variance
    s = cc.iou_stability(norm, var_a, norm, var_b, q=0.2, n=10)
    assert len(s.by_q) == 3  # q/2, q, 1.5q
    # q=0.1: the top-norm pool is exactly neurons 0..9 in both, so the candidates are too
    assert s.by_q[min(s.by_q)] == 1.0
    # q=0.2: b swaps 5..9 for 10..14 -> 5 of 15 shared
    assert s.iou == pytest.approx(5 / 15)
    assert s.low == min(s.by_q.values()) and s.high == 1.0
    assert cc.iou_stability(norm, var_a, norm, var_a, q=0.2, n=10).interval == (1.0, 1.0)


# ------------------------------------------------------------------------------------------ gate and fraction


def test_ablation_gate():
    ctrl = np.linspace(0.01, 0.02, 20)
    assert cc.ablation_gate(0.03, ctrl).beats
    g = cc.ablation_gate(0.019, ctrl)  # the 0.95 quantile is 0.0195
    assert not g.beats and g.control_upper == pytest.approx(np.quantile(ctrl, 0.95)) and g.draws == 20
    assert not cc.ablation_gate(float("nan"), ctrl).beats
    with pytest.raises(cc.ControlInputError):
        cc.ablation_gate(0.1, [])


def test_explained_fraction_recovers_planted_share():
    rng = np.random.default_rng(0)
    text = np.repeat(np.arange(40), 6)
    h_dst = rng.random(text.size) + 1.0
    h_src = h_dst + 0.5 + 0.1 * rng.standard_normal(text.size)
    patched = h_dst + 0.3 * (h_src - h_dst)  # the patched neurons carry 30% of every token's gap
    ctrl = [h_dst + 0.01 * rng.standard_normal(text.size) for _ in range(20)]
    f = cc.explained_fraction(h_dst, h_src, patched, text, h_controls=ctrl, n_bootstrap=300, seed=0)
    assert f.fraction == pytest.approx(0.3, abs=1e-12)
    assert f.low <= 0.3 <= f.high and f.high - f.low < 0.01
    assert f.change == pytest.approx(float((h_src - h_dst).mean()))
    assert f.change_low > 0.4 and abs(f.control_mean) < 0.01 and len(f.control) == 20
    with pytest.raises(cc.ControlInputError, match="one length"):
        cc.explained_fraction(h_dst, h_src, patched[:-1], text)


# ------------------------------------------------------------------------------------------ verdict rules


def gate(effect: float, upper: float = 0.01, draws: int = 20) -> cc.AblationGate:
    return cc.AblationGate(effect, upper / 2, upper, draws, 0.95)


def stab(iou: float, lo: float, hi: float) -> cc.IouStability:
    return cc.IouStability(iou, lo, hi, {0.25: iou})


def baselines(top_norm=0.3, top_var=0.3, null_upper=0.2) -> cc.IouBaselines:
    return cc.IouBaselines(top_norm, top_var, null_upper / 2, null_upper, 0.01, 0.05, 1000, 0.95)


GOOD = {"base": gate(0.05), "post": gate(0.05)}


@pytest.mark.parametrize(
    "iou, base, gates, verdict, words",
    [
        (stab(0.8, 0.7, 0.9), baselines(), GOOD, "agrees", "above the random"),
        (stab(1.0, 1.0, 1.0), baselines(1.0, 1.0), GOOD, "agrees", "above the random"),  # identical models
        # the case: as shared as any extreme-ranked set
        (stab(0.82, 0.82, 0.82), baselines(0.82, 0.82, 0.11), GOOD, "inconclusive", "any extreme-ranked set"),
        (stab(0.82, 0.82, 0.82), baselines(), {"base": gate(0.05), "post": gate(0.005)}, "inconclusive", "not entropy neurons in post"),
        (stab(0.82, 0.82, 0.82), baselines(), {"base": gate(0.05, draws=5), "post": gate(0.05, draws=5)}, "inconclusive", "too few"),
        (stab(0.0, 0.0, 0.0), baselines(null_upper=0.0), GOOD, "disagrees", "no entropy neuron is shared"),
        (stab(0.05, 0.0, 0.1), baselines(), GOOD, "disagrees", "below the random"),
        (stab(0.2, 0.1, 0.3), baselines(), GOOD, "inconclusive", "overlaps"),
        (stab(float("nan"), 0.1, 0.3), baselines(), GOOD, "inconclusive", "undefined"),
    ],
)
def test_confidence_verdict(iou, base, gates, verdict, words):
    v, reason = cc.confidence_verdict(iou, base, gates)
    assert v == verdict and words in reason


def frac(f, lo, hi, ctrl_upper=0.02, change=(-0.1, -0.12, -0.08)) -> cc.ExplainedFraction:
    return cc.ExplainedFraction(f, lo, hi, *change, control=[0.0], control_mean=0.0, control_upper=ctrl_upper)


@pytest.mark.parametrize(
    "fractions, gates, verdict, words",
    [
        ({"a->b": frac(0.01, -0.01, 0.03), "b->a": frac(0.0, -0.02, 0.02)}, GOOD, "agrees", "not above random"),
        ({"a->b": frac(0.9, 0.8, 1.0), "b->a": frac(0.01, 0.0, 0.02)}, GOOD, "disagrees", "carry more than"),
        ({"a->b": frac(0.10, 0.09, 0.11), "b->a": frac(0.01, 0.0, 0.02)}, GOOD, "inconclusive", "neither"),  # above control
        ({"a->b": frac(0.0, 0.0, 0.0, change=(0.0, 0.0, 0.0))}, GOOD, "inconclusive", "no confidence change"),
        ({"a->b": frac(0.9, 0.8, 1.0)}, {"base": gate(0.0), "post": gate(0.05)}, "inconclusive", "not entropy neurons"),
        ({}, GOOD, "inconclusive", "no patching"),
    ],
)
def test_explain_verdict(fractions, gates, verdict, words):
    v, reason = cc.explain_verdict(fractions, gates)
    assert v == verdict and words in reason


def test_rule_checks():
    with pytest.raises(cc.ControlInputError, match="explained_max"):
        cc.ConfidenceRule(explained_max=1.5)
    with pytest.raises(cc.ControlInputError, match="control_quantile"):
        cc.ConfidenceRule(control_quantile=1.0)


# ------------------------------------------------------------------------------------------ planted models


def plant(lm, entropy: list[int] | None, seed: int = 0):
    """Last-layer weights where ``entropy`` (if any) are entropy neurons by construction: unit writes into the
    null space of the (centred) unembedding, with input rows scaled x3 so their activations vary; decoys of larger
    norm aligned with single unembedding vectors; the rest small and random. The final norm's gain x5 makes the
    next-token distribution peaked enough for its scale to matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        lm.adapter.final_norm.weight.mul_(5.0)
        u = lm.adapter.unembed_weight()
        u[:, :NULL] = 0.0
        w = lm.adapter.down_proj(-1).weight
        w.copy_(torch.randn(D_MODEL, D_MLP, generator=g) * 0.02)
        mlp = lm.adapter.mlp_module(-1)
        for j, i in enumerate(entropy or []):
            v = torch.zeros(D_MODEL)
            v[:NULL] = torch.randn(NULL, generator=g)
            v = v / v.norm()
            leak = torch.randn(D_MODEL - NULL, generator=g)
            v[NULL:] = 0.01 * (j + 1) * leak / leak.norm()
            w[:, i] = v
            mlp.up_proj.weight[i] *= 3.0
            mlp.gate_proj.weight[i] *= 3.0
        for j, i in enumerate(DECOYS):
            w[:, i] = 2.0 * u[100 + j] / u[100 + j].norm()
    return lm


@pytest.fixture(scope="module")
def texts():
    return random_prompts(8, 4, 12, vocab_size=VOCAB, seed=4)


@pytest.fixture
def fresh(tiny_dir):
    path = tiny_dir("llama", n_layers=2, d_model=D_MODEL, d_mlp=D_MLP, vocab_size=VOCAB)
    return lambda entropy, seed=0: plant(load_model(path), entropy, seed)


def run(a, b, texts, tmp_path):
    res = cf.run_confidence(ModelGroup("g", "a", ("b",)), texts, tmp_path, models={"base": a, "post": b},
                            iou_draws=300, n_bootstrap=100)
    return {f.finding: f for f in res.findings}, res


def test_identical_planted_models_share_entropy_neurons(fresh, texts, tmp_path):
    f, res = run(fresh(S_A), fresh(S_A), texts, tmp_path)
    shared = f["entropy neurons shared"]
    assert shared.verdict == "agrees", shared.reason
    assert shared.interval == (1.0, 1.0) and shared.controls["iou_random_top_norm_upper"] < 1.0
    assert sorted(res.summary["per_model"]["base"]["candidates"]) == S_A
    # identical models have no confidence change to explain
    explain = f["entropy neurons do not explain the confidence change"]
    assert explain.verdict == "inconclusive" and "no confidence change" in explain.reason
    assert (tmp_path / "confidence" / "candidates_venn.png").stat().st_size > 1000


def test_unplanted_models_are_inconclusive(fresh, texts, tmp_path):
    f, _ = run(fresh(None), fresh(None), texts, tmp_path)
    shared = f["entropy neurons shared"]
    # the same random neurons are picked in both (IoU 1), but nothing says they are entropy neurons
    assert shared.figures["iou"] == 1.0
    assert shared.verdict == "inconclusive" and "not entropy neurons" in shared.reason


def test_different_planted_neurons_disagree(fresh, texts, tmp_path):
    f, res = run(fresh(S_A), fresh(S_C, seed=1), texts, tmp_path)
    shared = f["entropy neurons shared"]
    assert shared.verdict == "disagrees", shared.reason
    assert shared.figures["iou"] == 0.0
    assert sorted(res.summary["per_model"]["post"]["candidates"]) == S_C


def test_confidence_change_outside_the_candidates_agrees(fresh, texts, tmp_path):
    """post = base with a sharper final norm: entropy drops, the last-layer activations are untouched, so patching
    the candidates moves none of the change (and the candidates themselves do not move: the gain cancels)."""
    a, b = fresh(S_A), fresh(S_A)
    with torch.no_grad():
        b.adapter.final_norm.weight.mul_(1.5)
    f, res = run(a, b, texts, tmp_path)
    explain = f["entropy neurons do not explain the confidence change"]
    assert res.summary["per_model"]["post"]["baseline"]["entropy"] < res.summary["per_model"]["base"]["baseline"]["entropy"] - 0.05
    assert explain.verdict == "agrees", explain.reason
    assert abs(explain.figures["explained_base_to_post"]) < 1e-6
    assert f["entropy neurons shared"].verdict == "agrees"


def test_confidence_change_through_the_candidates_disagrees(fresh, texts, tmp_path):
    """post = base with the planted neurons' inputs scaled: they alone change, so patching them back carries the
    whole entropy change."""
    a, b = fresh(S_A), fresh(S_A)
    with torch.no_grad():
        b.adapter.mlp_module(-1).up_proj.weight[S_A] *= 1.5
    f, _ = run(a, b, texts, tmp_path)
    explain = f["entropy neurons do not explain the confidence change"]
    assert explain.verdict == "disagrees", explain.reason
    assert explain.figures["explained_base_to_post"] == pytest.approx(1.0, abs=1e-4)
    assert explain.interval[0] > 0.9 and explain.controls["explained_base_to_post_control_upper"] < 0.25


def test_patching_refuses_different_tokenizations(fresh, texts, monkeypatch):
    a, b = fresh(S_A), fresh(S_A)
    monkeypatch.setattr(cf, "same_tokens", lambda x, y, t: False)
    with pytest.raises(cf.TokenMismatchError, match="tokenize the texts differently"):
        cf.patched_confidence(a, b, texts, [np.array(S_A)])
