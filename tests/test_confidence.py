"""Confidence study: entropy-neuron statistics, candidates and IoU by hand on planted weights; mean-ablation
against a hand-modified forward; architecture checks; the study and its CLI end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import xarray as xr

from mechdiff.analyses import confidence as cf
from mechdiff.analyses.common import ModelGroup
from mechdiff.engine.models import load_model
from mechdiff.engine.sites import MeanAblate
from mechdiff.engine.tiny import random_prompts

D_MODEL, D_MLP, VOCAB = 64, 128, 512
NULL = 8  # unembedding dims zeroed: directions in them have cosine 0 with every unembedding vector
S_A = [3, 17, 29, 40, 51, 66, 77, 90, 101, 120]
S_B = [3, 17, 29, 40, 51, 66, 77, 5, 6, 7]  # 7 shared: IoU 7/13
DECOYS = [11, 22, 33, 44, 55]


pytestmark = pytest.mark.usefixtures("one_thread")


def plant(lm, entropy: list[int], seed: int = 0):
    """Last-layer weights where ``entropy`` must be the candidates: large writes into the unembedding's null
    space (tiny, distinct leaks out of it so variances differ), decoys with larger norm aligned with single
    unembedding vectors (high variance), everything else small and random."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        u = lm.adapter.unembed_weight()
        u[:, :NULL] = 0.0
        w = lm.adapter.down_proj(-1).weight  # nn.Linear [d_model, d_mlp]
        w.copy_(torch.randn(D_MODEL, D_MLP, generator=g) * 0.02)
        for j, i in enumerate(entropy):
            v = torch.zeros(D_MODEL)
            v[:NULL] = torch.randn(NULL, generator=g)
            v = v / v.norm()
            leak = torch.randn(D_MODEL - NULL, generator=g)
            v[NULL:] = 0.01 * (j + 1) * leak / leak.norm()
            w[:, i] = v
        for j, i in enumerate(DECOYS):
            w[:, i] = 2.0 * u[100 + j] / u[100 + j].norm()
    return lm


@pytest.fixture
def planted(tiny_dir):
    path = tiny_dir("llama", n_layers=2, d_model=D_MODEL, d_mlp=D_MLP, vocab_size=VOCAB)
    return plant(load_model(path), S_A, 0), plant(load_model(path), S_B, 1)


def by_hand(lm, q: float, n: int, mode: str = "transformer_lens"):
    w = lm.adapter.down_proj_weight(-1).detach().double().numpy()
    u = lm.adapter.unembed_weight().detach().double().numpy()
    if mode == "transformer_lens":  # Llama: an RMS final norm, so fold its gain and centre over the vocabulary
        u = u * lm.adapter.final_norm.weight.detach().double().numpy()
        u = u - u.mean(0)
    norm = np.sqrt((w**2).sum(0))
    un = u / np.maximum(np.linalg.norm(u, axis=1, keepdims=True), 1e-30)
    cos = un @ (w / norm)
    var = cos.var(axis=0)
    k = max(n, int(np.ceil(q * len(norm))))
    top = sorted(range(len(norm)), key=lambda i: (-norm[i], i))[:k]
    cand = sorted(top, key=lambda i: (var[i], i))[:n]
    return norm, var, sorted(top), cand


def test_candidates_and_iou_equal_hand_computation(planted):
    a, b = planted
    for lm, planted_set in ((a, S_A), (b, S_B)):
        en = cf.entropy_neurons(lm)
        norm, var, top, cand = by_hand(lm, 0.25, 10)
        np.testing.assert_allclose(en.norm, norm, rtol=1e-12)
        np.testing.assert_allclose(en.logit_var, var, rtol=1e-7, atol=1e-13)
        raw = cf.entropy_neurons(lm, weight_processing="none")
        np.testing.assert_allclose(raw.logit_var, by_hand(lm, 0.25, 10, "none")[1], rtol=1e-7, atol=1e-13)
        assert en.top_norm.tolist() == top
        assert en.candidates.tolist() == cand
        assert sorted(cand) == sorted(planted_set)  # the construction forces exactly these
        assert set(DECOYS) <= set(top) and not set(DECOYS) & set(cand)  # large norm alone is not enough
        # other settings of q and n, still by hand
        for q, n in ((0.1, 4), (0.5, 12), (1.0, 1)):
            en2 = cf.entropy_neurons(lm, q=q, n=n)
            _, _, top2, cand2 = by_hand(lm, q, n)
            assert en2.top_norm.tolist() == top2 and en2.candidates.tolist() == cand2
    ea, eb = cf.entropy_neurons(a), cf.entropy_neurons(b)
    assert cf.candidate_iou(ea, eb) == pytest.approx(7 / 13)
    assert cf.candidate_iou(ea, ea) == 1.0
    with pytest.raises(ValueError, match="q must be"):
        cf.select_candidates(ea.norm, ea.logit_var, q=0.0)
    with pytest.raises(ValueError, match="n must be"):
        cf.select_candidates(ea.norm, ea.logit_var, n=D_MLP + 1)


def test_norm_matched_controls():
    norm = np.arange(100, dtype=float)
    cand = np.array([10, 50, 90])
    draws = cf.norm_matched_controls(norm, cand, draws=6, nearest=5, seed=3)
    assert len(draws) == 6
    assert len({tuple(d) for d in draws}) > 1  # random
    for d in draws:
        assert len(d) == 3 and len(set(d)) == 3 and not set(d) & set(cand)
        assert np.all(np.abs(np.sort(norm[d]) - norm[cand]) <= 3)  # each within its candidate's 5 nearest


def test_mean_ablation_matches_hand_forward(planted):
    lm, _ = planted
    texts = random_prompts(6, 4, 11, vocab_size=VOCAB, seed=2)
    layer = lm.adapter.n_layers - 1
    down = lm.adapter.down_proj(layer)
    idx = torch.tensor(S_A)

    def hand(means: torch.Tensor | None):
        acts, ent, mx = [], [], []
        for t in texts:
            ids = lm.tokenizer(t, return_tensors="pt")["input_ids"]

            def pre(mod, args):
                x = args[0]
                acts.append(x[0].detach().double())
                if means is None:
                    return None
                x = x.clone()
                x[..., idx] = means.to(x.dtype)
                return (x,)

            h = down.register_forward_pre_hook(pre)
            try:
                with torch.no_grad():
                    logp = torch.log_softmax(lm.model(input_ids=ids).logits[0].double(), -1)
            finally:
                h.remove()
            ent.append(-(logp.exp() * logp).sum(-1))
            mx.append(logp.max(-1).values.exp())
        return torch.cat(acts).mean(0), torch.cat(ent).numpy(), torch.cat(mx).numpy()

    mean_hand, ent0, mx0 = hand(None)
    means = cf.neuron_means(lm, texts, layer=-1, token_budget=20)  # small budget: several padded batches
    np.testing.assert_allclose(means, mean_hand.numpy(), rtol=1e-5, atol=1e-7)
    base = cf.next_token_confidence(lm, texts, token_budget=20)
    np.testing.assert_allclose(base["entropy"], ent0, atol=1e-5)
    np.testing.assert_allclose(base["max_prob"], mx0, atol=1e-6)
    _, ent1, mx1 = hand(torch.as_tensor(means[S_A]).float())
    abl = cf.next_token_confidence(
        lm, texts, token_budget=20, interventions=[MeanAblate("mlp_act", layer, mean=means[S_A], units=S_A)])
    np.testing.assert_allclose(abl["entropy"], ent1, atol=1e-5)
    np.testing.assert_allclose(abl["max_prob"], mx1, atol=1e-6)
    assert np.abs(ent1 - ent0).max() > 1e-3  # the ablation does something, so the comparison can fail


def test_architecture_mismatch(tiny_dir, planted):
    a, _ = planted
    gpt2 = load_model(tiny_dir("gpt2", n_layers=2, d_model=D_MODEL, d_mlp=D_MLP, vocab_size=VOCAB))
    with pytest.raises(cf.ArchitectureMismatchError, match="arch='llama'.*arch='gpt2'"):
        cf.check_same_architecture(a, gpt2)
    wider = load_model(tiny_dir("llama", n_layers=2, d_model=D_MODEL, d_mlp=96, vocab_size=VOCAB))
    with pytest.raises(cf.ArchitectureMismatchError, match="d_mlp=128.*d_mlp=96"):
        cf.check_same_architecture(a, wider)
    with pytest.raises(cf.ArchitectureMismatchError):
        cf.run_confidence(ModelGroup("g", "a", ("b",)), ["w1 w2"], "/nonexistent/out", models={"base": a, "post": gpt2})


def test_texts_are_the_callers_to_give(tmp_path):
    """No default dataset in the study: None is an error before any model loads (the paths do not exist); the
    CLI's default is the embedded facts as sentences, "<prompt> <answer>." per row of facts.csv."""
    import csv

    from mechdiff.cli.analyze import embedded_texts
    from mechdiff.zoo.paths import zoo_path

    with pytest.raises(cf.ConfidenceOptionError, match="give texts"):
        cf.run_confidence(ModelGroup("g", "/no/such/base", ("/no/such/post",)), None, tmp_path)
    assert not (tmp_path / "confidence").exists()
    with open(zoo_path("data") / "facts.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    texts = embedded_texts()
    assert texts == [f"{r['prompt']} {r['answer']}." for r in rows] and len(texts) == 1170
    assert texts[0] == "The city of Quibriav is in Muguxor."


def test_run_confidence_end_to_end(planted, tmp_path):
    a, b = planted
    texts = random_prompts(8, 4, 12, vocab_size=VOCAB, seed=4)
    res = cf.run_confidence(ModelGroup("g", "a", ("b",)), texts, tmp_path, models={"base": a, "post": b}, controls=3)
    s = json.loads((tmp_path / "confidence" / "summary.json").read_text())["summary"]
    assert s["iou"] == {"base vs post": pytest.approx(7 / 13)}
    assert sorted(s["per_model"]["base"]["candidates"]) == sorted(S_A)
    assert sorted(s["per_model"]["post"]["candidates"]) == sorted(S_B)
    # the reported ablation effect is the one measured directly
    means = cf.neuron_means(a, texts)
    layer = a.adapter.n_layers - 1
    cand = np.array(s["per_model"]["base"]["candidates"])
    base = cf.next_token_confidence(a, texts)
    abl = cf.next_token_confidence(a, texts, interventions=[MeanAblate("mlp_act", layer, mean=means[cand], units=cand)])
    got = s["per_model"]["base"]["ablate_candidates"]["delta_entropy"]
    assert got == pytest.approx(float((abl["entropy"] - base["entropy"]).mean()), abs=1e-6)
    ds = xr.open_zarr(tmp_path / "confidence" / "results.zarr", consolidated=False)
    assert ds["is_candidate"].sel(model="base").values.nonzero()[0].tolist() == sorted(S_A)
    assert float(ds["iou"].sel(model="base", model_b="post")) == pytest.approx(7 / 13)
    assert len(s["control_sets"]["base"]) == 3
    assert s["weight_processing"] == "transformer_lens" and s["norm_kind"] == {"base": "rmsnorm", "post": "rmsnorm"}
    assert ds.attrs["weight_processing"] == "transformer_lens"
    f = res.findings[0]
    assert f.finding == "entropy neurons shared" and f.figures["iou"] == pytest.approx(7 / 13)
    # three control draws cannot place a 95% quantile: the verdict says so rather than deciding
    assert f.verdict == "inconclusive" and "too few" in f.reason
    assert f.interval is not None and f.interval[0] <= 7 / 13 <= f.interval[1]
    assert {"iou_top_norm", "iou_top_var", "iou_random_top_norm_upper", "iou_random_all_mean"} <= set(f.controls)
    assert res.findings[1].finding == "entropy neurons do not explain the confidence change"
    assert set(res.figures) == {"scatter", "iou", "venn"}
    for p in res.figures.values():
        assert p.stat().st_size > 1000


def test_cli_confidence(planted, tmp_path, tiny_dir):
    from typer.testing import CliRunner

    from mechdiff.cli import app

    dirs = []
    for i, lm in enumerate(planted):
        d = tmp_path / f"m{i}"
        lm.model.save_pretrained(d)
        lm.tokenizer.save_pretrained(d)
        dirs.append(str(d))
    csv = tmp_path / "texts.csv"
    csv.write_text("text\n" + "\n".join(random_prompts(5, 4, 10, vocab_size=VOCAB, seed=5)) + "\n")
    runner = CliRunner()
    r = runner.invoke(app, ["analyze", "confidence", "--help"])
    assert r.exit_code == 0 and "DESCRIPTION" in r.output
    out = tmp_path / "out"
    args = ["analyze", "confidence", "--base", dirs[0], "--post", dirs[1], "--texts", str(csv), "--out", str(out),
            "--controls", "2"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    s = json.loads((out / "confidence" / "summary.json").read_text())["summary"]
    assert s["iou"]["base vs post"] == pytest.approx(7 / 13)
    gpt2 = tiny_dir("gpt2", n_layers=2, d_model=D_MODEL, d_mlp=D_MLP, vocab_size=VOCAB)
    r = runner.invoke(app, args[:5] + [str(gpt2)] + args[6:8] + ["--out", str(tmp_path / "bad")])
    assert r.exit_code == 2 and "architecture" in r.output
    r = runner.invoke(app, args + ["-q", "1.5"])
    assert r.exit_code == 2 and "q must be a fraction" in r.output
    r = runner.invoke(app, args + ["--weight-processing", "fold", "--out", str(tmp_path / "bad2")])
    assert r.exit_code == 2 and "weight_processing 'fold'" in " ".join(r.output.split())
    r = runner.invoke(app, args + ["--weight-processing", "none", "--no-patch", "--iou-draws", "50", "--out", str(tmp_path / "raw")])
    assert r.exit_code == 0, r.output
    s = json.loads((tmp_path / "raw" / "confidence" / "summary.json").read_text())["summary"]
    assert s["weight_processing"] == "none" and s["explained"]["base vs post"] == "patching not run (patch=False)"
