"""Knowledge study: the heatmap controls (bootstrap interval, permuted null, split-half ceiling, control model),
the paper's binned difference heatmap and the verdict rule, on planted maps and on the embedded pair."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
import torch

from mechdiff.analyses import knowledge as kn
from mechdiff.analyses import knowledge_maps as km
from mechdiff.analyses.common import ModelGroup

ROLES = ["context", "subject", "subject", "object", "object", "final", "final", "final"]


pytestmark = pytest.mark.usefixtures("one_thread")


def structure(n_layer: int = 6) -> np.ndarray:
    """A map like the paper's: the object matters in early layers, the final tokens in late ones."""
    depth = np.linspace(0, 1, n_layer)[:, None]
    m = np.zeros((n_layer, len(ROLES)))
    m[:, 1:3] = 0.2 * (1 - depth)
    m[:, 3:5] = (1 - depth) * np.array([1.0, 0.6])
    m[:, 5:] = depth * np.array([0.3, 0.6, 1.0])
    m[:, 0] = np.nan  # the unpatched context
    return m


def planted(signal: np.ndarray, n_pairs: int = 24, noise: float = 0.3, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return signal[None] + noise * rng.normal(size=(n_pairs, *signal.shape))


TOPICS = np.array(["a", "b", "c"] * 8)
KEEP = np.ones(24, dtype=bool)


def sep(n_kept: int = 24, lo: float = 1.0) -> km.Separation:
    return km.Separation(24, n_kept, lo + 1, (lo, lo + 2))


# ---------------------------------------------------------------------------------------------- numbers by hand


def test_pearson_and_mean_maps_by_hand():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=30), rng.normal(size=30)
    a[[2, 5]] = np.nan
    ok = np.isfinite(a)
    assert km.pearson(a, b) == pytest.approx(np.corrcoef(a[ok], b[ok])[0, 1])
    assert math.isnan(km.pearson([1, 2], [3, 4])) and math.isnan(km.pearson([1, 1, 1], [1, 2, 3]))
    x = planted(structure(), n_pairs=5)
    x[..., 0] = 0.1
    x[1, :, 3] = np.nan
    keep = np.array([True, True, False, True, True])
    np.testing.assert_allclose(km.mean_maps(x, keep)[0], np.nanmean(x[keep], axis=0))
    counts = np.array([[2, 0, 5, 1, 0]])  # pair 0 twice, pair 3 once; pair 2 is not kept
    np.testing.assert_allclose(km.mean_maps(x, keep, counts)[0], (2 * x[0] + x[3]) / 3)
    with pytest.raises(km.MapError, match=r"\[pair, layer, slot\]"):
        km.mean_maps(x[0], keep)


def test_binned_difference_and_max_per_group_by_hand():
    a = np.array([[0.0, 0.5], [1.0, np.nan]])
    b = np.array([[0.0, 0.26], [0.5, np.nan]])  # rescaled: 0, 0.52, 1
    np.testing.assert_allclose(km.binned_map(a, 20), [[0.025, 0.525], [0.975, np.nan]])
    np.testing.assert_allclose(km.binned_map(b, 20), [[0.025, 0.525], [0.975, np.nan]])
    np.testing.assert_allclose(km.binned_map(b, 4), [[0.125, 0.625], [0.875, np.nan]])
    d = km.binned_difference(a, np.array([[0.0, 0.1], [1.0, 0.3]]), 20)  # b rescaled: 0, 0.1, 1, 0.3
    np.testing.assert_allclose(d, [[0.0, 0.125 - 0.525], [0.0, np.nan]])
    got = km.max_abs_by_role(d, ["subject", "object"])
    assert got["subject"] == 0.0 and got["object"] == pytest.approx(0.4)
    assert math.isnan(km.max_abs_by_role(np.full((2, 1), np.nan), ["context"])["context"])


# ---------------------------------------------------------------------------------------------- controls, planted


def test_permutation_null_keeps_each_role_and_breaks_depth():
    # a map that depends on the role only is unchanged by every permutation: the null is the correlation itself
    flat = np.tile(np.array([np.nan, 1, 1, 3, 3, 2, 2, 2]), (6, 1))
    other = flat + np.random.default_rng(0).normal(size=flat.shape)
    null = km.permutation_null(other, flat, ROLES, 50, np.random.default_rng(0))
    assert np.allclose(null, km.pearson(other, flat))
    # a map with depth structure: the permuted maps correlate far less than the map with itself
    s = structure()
    null = km.permutation_null(s, s, ROLES, 200, np.random.default_rng(0))
    assert null.shape == (200,) and np.quantile(null, 0.95) < 0.9 and null.mean() < 0.6
    with pytest.raises(km.MapError, match="do not match"):
        km.permutation_null(s, s, ROLES[:-1], 5, np.random.default_rng(0))


def test_same_structure_agrees_other_structure_disagrees_noise_inconclusive():
    s = structure()
    same = km.compare_maps(planted(s, seed=1), KEEP, planted(s, seed=2), KEEP, ROLES, TOPICS)
    # the permuted null lies below the real correlation of two maps with structure
    assert same.null_upper < same.interval[0] < same.correlation < 1
    assert min(same.reliability) > same.null_upper and same.ceiling == pytest.approx(math.sqrt(np.prod(same.reliability)))
    v, why = km.knowledge_verdict(same, separated={"base": sep(), "post": sep()})
    assert v == "agrees", why

    moved = km.compare_maps(planted(s, seed=1), KEEP, planted(s[::-1], seed=2), KEEP, ROLES, TOPICS)  # layers reversed
    assert moved.interval[1] < same.interval[0]
    v, why = km.knowledge_verdict(moved, separated={"base": sep(), "post": sep()})
    assert v == "disagrees" and "storage moved" in why, why

    noise = km.compare_maps(planted(s, seed=1), KEEP, planted(0 * s, seed=2), KEEP, ROLES, TOPICS)
    assert noise.reliability[1] < noise.null_upper
    v, why = km.knowledge_verdict(noise, separated={"base": sep(), "post": sep()})
    assert v == "inconclusive" and "no signal" in why, why

    # seeded: the same controls again, other ones with another seed
    again = km.compare_maps(planted(s, seed=1), KEEP, planted(s, seed=2), KEEP, ROLES, TOPICS)
    assert again == same
    other = km.compare_maps(planted(s, seed=1), KEEP, planted(s, seed=2), KEEP, ROLES, TOPICS,
                            km.KnowledgeControls(seed=5))
    assert other.correlation == same.correlation and other.interval != same.interval


def test_transfer_check_and_separation():
    s = structure()
    own = planted(s, seed=3)
    half = km.transfer_check(0.5 * own, KEEP, own, KEEP, ROLES, TOPICS)
    assert half.transfer == pytest.approx(0.5) and half.transfer_interval == pytest.approx((0.5, 0.5))
    assert half.comparison.correlation == pytest.approx(1.0)
    gap = np.random.default_rng(0).normal(size=24)
    got = km.separation(gap, gap > 0, TOPICS)
    assert got.n_kept == int((gap > 0).sum()) and got.mean_gap == pytest.approx(gap.mean())
    assert got.interval[0] < gap.mean() < got.interval[1]


def comparison(r=0.95, ci=(0.92, 0.97), null=0.6, rel=(0.96, 0.97)) -> km.MapComparison:
    return km.MapComparison(r, ci, null, 0.2, rel, math.sqrt(rel[0] * rel[1]), (24, 24))


def cross(r=0.9, ci=(0.85, 0.95), null=0.6, t=0.9, tci=(0.8, 1.0)) -> km.CrossCheck:
    return km.CrossCheck(comparison(r, ci, null), t, tci)


@pytest.mark.parametrize(
    "kwargs, verdict, words",
    [
        ({}, "agrees", "within 0.1 of the split-half ceiling"),
        ({"separated": {"base": sep(), "post": sep(n_kept=3)}}, "inconclusive", "does not tell the pairs apart"),
        ({"separated": {"base": sep(), "post": sep(lo=-0.1)}}, "inconclusive", "does not tell the pairs apart"),
        ({"comparison": comparison(rel=(0.96, 0.5))}, "inconclusive", "post 0.50 map not above"),
        ({"comparison": comparison(r=0.6, ci=(0.5, 0.7))}, "disagrees", "storage moved"),
        ({"comparison": comparison(r=0.86, ci=(0.8, 0.9))}, "inconclusive", "partly moved"),
        ({"comparison": comparison(ci=(0.55, 0.97))}, "inconclusive", "overlaps the permuted-map null"),
        ({"control": 0.95}, "inconclusive", "not above the unrelated control"),
        ({"control": 0.5}, "agrees", "above the control model's 0.500"),
        ({"control": float("nan")}, "inconclusive", "undefined"),
        ({"comparison": comparison(r=float("nan"))}, "inconclusive", "undefined"),
        ({"cross": {"base->post": cross(tci=(0.1, 0.3), t=0.2)}}, "disagrees", "cross-model patching base->post fails"),
        ({"cross": {"base->post": cross(ci=(0.2, 0.5))}}, "disagrees", "cross-model patching base->post fails"),
        ({"cross": {"base->post": cross(t=0.4, tci=(0.3, 0.7))}}, "inconclusive", "unclear"),
        ({"cross": {"base->post": cross(), "post->base": cross()}}, "agrees", "post->base correlation 0.90"),
    ],
)
def test_verdict_rule(kwargs, verdict, words):
    kw = {"separated": {"base": sep(), "post": sep()}, **kwargs}
    comp = kw.pop("comparison", comparison())
    got, why = km.knowledge_verdict(comp, **kw)
    assert got == verdict and words in why, why


def test_controls_settings_errors():
    with pytest.raises(km.MapError, match="min_pairs"):
        km.KnowledgeControls(min_pairs=2)
    with pytest.raises(km.MapError, match="null_quantile"):
        km.KnowledgeControls(null_quantile=1.0)
    with pytest.raises(ValueError, match="n_permutations"):  # also a ValueError
        km.KnowledgeControls(n_permutations=0)


# ---------------------------------------------------------------------------------------------- the embedded pair

QUICK = dict(limit=12, sites=("resid_post",), attribution=False)


@pytest.fixture(scope="module")
def zoo():
    from mechdiff.engine.models import load_model
    from mechdiff.zoo.paths import zoo_path

    paths = {k: str(zoo_path(k)) for k in ("base", "post")} | {"pairs": str(zoo_path("data") / "patching.csv")}
    return paths, {k: load_model(zoo_path(k)) for k in ("base", "post")}


@pytest.fixture(scope="module")
def random_post(tmp_path_factory, zoo):
    """A random-init model of the post model's architecture and tokenizer: no knowledge at all."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from mechdiff.engine.models import load_model

    paths, _ = zoo
    out = tmp_path_factory.mktemp("random_post")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(paths["post"])).save_pretrained(out)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(f"{paths['post']}/{f}", out / f)
    return load_model(out)


def test_identical_models_agree_paper_normalisation(zoo, tmp_path):
    paths, lms = zoo
    res = kn.run_knowledge(ModelGroup("same", paths["base"], (paths["base"],)), paths["pairs"], tmp_path, **QUICK,
                           models={"base": lms["base"], "post": lms["base"]}, normalisation="paper")
    (f,) = res.findings
    assert f.verdict == "agrees", f.reason
    assert f.figures["heatmap_correlation"] == pytest.approx(1.0) and f.figures["cross_transfer"] == pytest.approx(1.0)
    assert f.figures["max_abs_binned_diff"] == 0.0
    assert f.controls["null_upper"] < f.interval[0] and f.controls["ceiling"] > f.controls["null_upper"]
    eff = res.data["effect"].sel(run="base", site="resid_post")
    want = kn.paper_nie(res.data["patched_pd"].sel(run="base", site="resid_post"), res.data["pd_false"].sel(run="base"))
    np.testing.assert_allclose(eff.values, want.values)
    assert res.summary["normalisation"] == "paper"


def test_random_init_post_is_inconclusive(zoo, random_post, tmp_path):
    paths, lms = zoo
    res = kn.run_knowledge(ModelGroup("random", paths["base"], ("random",)), paths["pairs"], tmp_path, **QUICK,
                           models={"base": lms["base"], "post": random_post})
    (f,) = res.findings
    assert f.verdict == "inconclusive" and "does not tell the pairs apart" in f.reason, f.reason
    # keeping every pair (min_gap=None) would not help: the random model's gap is zero within its interval
    gap = (res.data["ld_true"] - res.data["ld_false"]).sel(run="post").values
    s = km.separation(gap, np.ones_like(gap, bool), res.data["topic"].values)
    assert s.interval[0] <= 0 <= s.interval[1] and abs(s.mean_gap) < 0.01


def test_base_vs_post_against_a_control_model(zoo, tmp_path):
    """A control model as similar to base as post is (a copy of base) leaves "storage unchanged" undecided:
    the claim must clear the control. Same-run numbers of the real pair: the permuted null below the correlation."""
    paths, lms = zoo
    copy = tmp_path / "copy_of_base"
    shutil.copytree(paths["base"], copy)
    group = ModelGroup("zoo", paths["base"], (paths["post"],))
    res = kn.run_knowledge(group, paths["pairs"], tmp_path / "out", **QUICK, models=dict(lms), control_model=str(copy))
    (f,) = res.findings
    assert list(res.data["run"].values) == ["base", "post", "control", "base->post", "post->base"]
    assert f.controls["control_correlation"] == pytest.approx(1.0)
    assert f.verdict == "inconclusive" and "not above the unrelated control" in f.reason, f.reason
    assert f.controls["null_upper"] < f.figures["heatmap_correlation"]
    comp = res.summary["comparisons"]["base vs post"]["resid_post"]
    assert set(comp["max_abs_diff"]["binned"]) == {"context", "other", "subject", "object", "final"}
    assert set(comp["controls"]["by_design"]) == {"object", "subject"}  # both pair designs in the quick sample
    assert res.figures["heatmap_resid_post"].stat().st_size > 1000


def test_control_model_errors_before_patching(zoo, tmp_path, tiny_dir, monkeypatch):
    paths, lms = zoo
    monkeypatch.setattr(kn, "exact_patching", lambda *a, **k: pytest.fail("patched before the check"))
    group = ModelGroup("zoo", paths["base"], (paths["post"],))
    with pytest.raises(kn.KnowledgeOptionError, match="is a model of the group"):
        kn.run_knowledge(group, paths["pairs"], tmp_path, **QUICK, models=dict(lms), control_model=paths["post"])
    with pytest.raises(kn.ModelMismatchError, match="another tokenizer"):
        kn.run_knowledge(group, paths["pairs"], tmp_path, **QUICK, models=dict(lms), control_model=str(tiny_dir("llama", n_layers=2)))
    with pytest.raises(kn.KnowledgeOptionError, match="normalisation 'nie'"):
        kn.run_knowledge(ModelGroup("g", "/no/such/base", ("/no/such/post",)), paths["pairs"], tmp_path, normalisation="nie")
