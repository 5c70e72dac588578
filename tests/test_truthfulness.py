"""Truthfulness study: probes and transfer on stores with a planted direction (numpy references), the
intervention against a hand-modified forward, store requirements, and the whole study + CLI on tiny models."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import xarray as xr

from mechdiff.analyses.common import ModelGroup, StoreRequirementError
from mechdiff.analyses.directions import best_threshold
from mechdiff.analyses.truthfulness import (
    TruthSettings,
    TruthSettingsError,
    accuracy_interval,
    direction_controls,
    truth_verdict,
    check_truth_store,
    intervention_analysis,
    probe_analysis,
    run_truthfulness,
    statement_end_positions,
    truth_logits,
    truth_margins,
    truth_prompts,
    truthfulness_study,
)
from mechdiff.engine.sites import hidden_from_output, replace_hidden_in_output
from mechdiff.engine.store import ActivationStore, ArraySpec, open_store
from mechdiff.errors import MechdiffError
from mechdiff.analyses.plotting import FigureInputError, pca_figure, pca_projection

pytestmark = pytest.mark.usefixtures("one_thread")

# The tiny models' word-level tokenizer knows only w0..wN: label words and suffix are made of those.
TINY = TruthSettings(label_words=("w1", "w2"), suffix=" w3 w4 w5", n_shots=2, n_intervene=6, token_budget=64)


def _store(path, X, coords, *, positions="last:2", template="none", name="resid_post"):
    n = X.shape[0]
    spec = ArraySpec(name, "resid_post", tuple(range(X.shape[1])), X.shape[2] if X.ndim == 4 else None, X.shape[-1], "hidden", "float32")
    st = ActivationStore.create_or_open(
        str(path), "g", n_examples=n, shard_size=64, arrays=[spec], coords=coords,
        token_ids=np.ones((n, 2), np.int32), provenance={"model_id": str(path), "positions": positions, "template": template},
    )
    for i in range(st.n_shards):
        r = st.shard_range(i)
        st.write_shard(i, {name: X[r.start:r.stop]})
    return open_store(str(path), "g")


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """Two 'models' whose layer 2 carries a truth direction (model b's is a rotated copy of a's); layer 0 has
    none. Three topics with different offsets; train/test split per row."""
    rng = np.random.default_rng(0)
    n_t, L, P, W = 90, 4, 2, 16
    topics = np.repeat(np.array(["cities", "numbers", "words"], dtype=object), n_t)
    n = len(topics)
    y = np.tile(np.arange(n_t) % 2, 3)
    split = np.where(np.tile(np.arange(n_t), 3) % 4 == 3, "test", "train").astype(object)
    v = rng.normal(size=W)
    v /= np.linalg.norm(v)
    r = rng.normal(size=W)
    r -= (r @ v) * v
    v_b = 0.8 * v + 0.6 * r / np.linalg.norm(r)  # cosine 0.8 with v
    stores, Xs = {}, {}
    d = tmp_path_factory.mktemp("planted")
    for name, vec in (("a", v), ("b", v_b)):
        X = rng.normal(size=(n, L, P, W))
        X[:, 2] += (2 * y - 1)[:, None, None] * 2.5 * vec  # a strong direction at layer 2
        X[:, 1] += (2 * y - 1)[:, None, None] * 0.5 * vec  # a weak one at layer 1
        X += (topics == "numbers")[:, None, None, None] * 1.5
        X = X.astype(np.float32)
        Xs[name] = X.astype(np.float64)
        stores[name] = _store(d / f"{name}.zarr", X, {"label": y, "topic": topics, "split": split, "text": np.array([f"s{i}" for i in range(n)], dtype=object)})
    return stores, Xs, y, topics, split == "train"


def test_probe_analysis_against_numpy(planted):
    stores, Xs, y, topics, fit = planted
    res, data = probe_analysis(stores, TruthSettings(intervene=False, probe_position=-1))
    assert list(res["fold"].values) == ["cities", "numbers", "words"]
    assert res["best_layer"].values.tolist() == [2, 2]  # chosen by validation accuracy, not given
    acc = res["transfer_acc"].mean("fold")
    assert float(acc.sel(source="a", target="a", layer=2, mode="unrefit")) > 0.9  # the "numbers" offset costs a little
    assert float(acc.sel(source="a", target="a", layer=0, mode="unrefit")) < 0.75
    # cosine of the full directions = numpy cosine of the class-mean differences over the fit rows
    for pos_i, pos in enumerate((-2, -1)):
        for l in range(4):
            da, db = ([Xs[m][fit & (y == 1), l, pos_i].mean(0) - Xs[m][fit & (y == 0), l, pos_i].mean(0) for m in ("a", "b")])
            want = da @ db / np.linalg.norm(da) / np.linalg.norm(db)
            assert float(res["cosine"].sel(pair="a_vs_b", layer=l, position=pos)) == pytest.approx(want, rel=1e-9)
    assert float(res["cosine"].sel(pair="a_vs_b", layer=2, position=-1)) == pytest.approx(0.8, abs=0.08)
    # shuffled labels: the models' noise is independent here, so the null cosine is far below the real one
    assert float(res["null_cosine"].sel(pair="a_vs_b", layer=2)) < 0.4
    # one transfer cell by hand: fold "words", layer 2, a's direction on b's activations
    h, l = "words", 2
    train = fit & (topics != h)
    da = Xs["a"][train & (y == 1), l, 1].mean(0) - Xs["a"][train & (y == 0), l, 1].mean(0)
    np.testing.assert_allclose(res["fold_direction"].sel(model="a", fold=h, layer=l).values, da, rtol=1e-9)
    t_a = float(res["threshold"].sel(model="a", fold=h, layer=l))
    s_a, s_b = Xs["a"][:, l, 1] @ da, Xs["b"][:, l, 1] @ da
    # the threshold is optimal on a's training rows (brute force over every cut)
    brute = max(np.mean((s_a[train] > c) == (y[train] == 1)) for c in np.concatenate([[-np.inf], s_a[train]]))
    assert np.mean((s_a[train] > t_a) == (y[train] == 1)) == pytest.approx(brute)
    test = topics == h
    unrefit = np.mean((s_b[test] > t_a) == (y[test] == 1))
    assert float(res["transfer_acc"].sel(source="a", target="b", fold=h, layer=l, mode="unrefit")) == pytest.approx(unrefit)
    t_b, _ = best_threshold(s_b[train], y[train])
    assert float(res["transfer_acc"].sel(source="a", target="b", fold=h, layer=l, mode="refit")) == pytest.approx(np.mean((s_b[test] > t_b) == (y[test] == 1)))
    # validation rows: training topics' test split
    val = ~fit & (topics != h)
    assert float(res["val_acc"].sel(model="a", fold=h, layer=l)) == pytest.approx(np.mean((s_a[val] > t_a) == (y[val] == 1)))


def test_probe_position_is_chosen_on_validation(tmp_path):
    """Truth written on the token before the period only: the automatic choice finds it there."""
    rng = np.random.default_rng(3)
    n, L, W = 240, 3, 12
    topics = np.repeat(np.array(["t1", "t2", "t3"], dtype=object), n // 3)
    y = np.arange(n) % 2
    v = rng.normal(size=W)
    stores = {}
    for name in ("a", "b"):
        X = rng.normal(size=(n, L, 2, W))
        X[:, 1:, 0] += (2 * y - 1)[:, None, None] * 2.0 * v / np.linalg.norm(v)  # position -2 only
        coords = {"label": y, "topic": topics, "text": np.array([f"s{i}" for i in range(n)], dtype=object)}
        stores[name] = _store(tmp_path / f"{name}.zarr", X.astype(np.float32), coords)
    res, _ = probe_analysis(stores, TruthSettings(intervene=False))
    assert res.attrs["probe_position"] == -2
    tried = json.loads(res.attrs["probe_position_val_acc"])
    assert set(tried) == {"-1", "-2"} and tried["-2"] > 0.9 > 0.65 > tried["-1"]
    assert float(res["transfer_acc"].sel(source="a", target="a", layer=2, mode="unrefit").mean()) > 0.9
    alone, _ = probe_analysis(stores, TruthSettings(intervene=False, probe_position=-2))  # no shared class sums
    for v in ("direction", "null_cosine", "val_acc", "transfer_acc", "fold_direction"):
        np.testing.assert_array_equal(res[v].values, alone[v].values, err_msg=v)
    fixed, _ = probe_analysis(stores, TruthSettings(intervene=False, probe_position=-1))
    assert fixed.attrs["probe_position"] == -1 and list(json.loads(fixed.attrs["probe_position_val_acc"])) == ["-1"]
    with pytest.raises(ValueError, match="probe_position"):
        TruthSettings(probe_position=-3)


def test_findings_from_stores_alone(planted, tmp_path):
    stores, Xs, y, topics, fit = planted
    res = truthfulness_study(stores, None, tmp_path, settings=TruthSettings(intervene=False))
    (f,) = res.findings
    # planted rotated copy: cosine 0.8, far above the shuffled-label null but well below the split-half ceiling
    # (~0.99 for directions this strong): partly shared, so neither agrees nor disagrees
    assert f.pair == "a vs b" and f.verdict == "inconclusive" and not f.agrees, f.detail
    assert "ceiling" in f.reason and f.interval[0] > f.controls["cosine_null_upper"]
    assert f.controls["cosine_ceiling"] > 0.95 and f.interval[0] <= f.figures["cosine_at_best_layer"] <= f.interval[1]
    # the same stores with b an exact copy of a: agrees
    (same,) = truthfulness_study({"a": stores["a"], "b": stores["a"]}, None, tmp_path / "same",
                                 settings=TruthSettings(intervene=False)).findings
    assert same.verdict == "agrees" and same.agrees, same.detail
    assert f.figures["cosine_at_best_layer"] == pytest.approx(float(res.data["cosine"].sel(pair="a_vs_b", layer=2, position=-1)))
    assert (tmp_path / "truthfulness" / "summary.json").exists() and "nie_table" not in res.figures
    # the same stores with the labels shuffled: no truth direction, so nothing is claimed to be shared
    rng = np.random.default_rng(5)
    noise = {}
    for m in ("a", "b"):
        ds = stores[m].copy()
        noise[m] = ds.assign_coords(label=("example", rng.permutation(y)))
    noise["b"] = noise["b"].assign_coords(label=noise["a"]["label"])
    (g,) = truthfulness_study(noise, None, tmp_path / "noise", settings=TruthSettings(intervene=False)).findings
    assert g.verdict == "inconclusive" and not g.agrees and "no truth direction" in g.reason


def _planted_activations(rng, n=400, W=32, strength=2.0, cos_ab=1.0, shuffle=False):
    """Statements in two models with a planted truth direction each (cosine ``cos_ab`` between them)."""
    y = np.arange(n) % 2
    v = rng.normal(size=W)
    v /= np.linalg.norm(v)
    r = rng.normal(size=W)
    r -= (r @ v) * v
    r /= np.linalg.norm(r)
    v_b = cos_ab * v + math.sqrt(max(0.0, 1 - cos_ab**2)) * r
    base = rng.normal(size=(n, W))
    Xa = base + (2 * y - 1)[:, None] * strength * v
    Xb = (base if cos_ab == 1.0 else rng.normal(size=(n, W))) + (2 * y - 1)[:, None] * strength * v_b
    labels = rng.permutation(y) if shuffle else y  # shuffled: labels independent of the statements
    return Xa, Xb, labels


def _heldout_accuracy(X, y, rng, n_bootstrap=200):
    """Difference-of-means probe fitted on a random half, tested on the other: (accuracy, low, high)."""
    test = np.zeros(len(y), dtype=bool)
    test[rng.permutation(len(y))[: len(y) // 2]] = True
    d = X[~test & (y == 1)].mean(0) - X[~test & (y == 0)].mean(0)
    t, _ = best_threshold(X[~test] @ d, y[~test])
    correct = np.full(len(y), np.nan)
    correct[test] = (X[test] @ d > t) == (y[test] == 1)
    return accuracy_interval(correct[None], n_bootstrap=n_bootstrap)


def _planted_verdict(Xa, Xb, y, rng, settings=TruthSettings()):
    c = direction_controls(Xa, Xb, y, n_null=settings.n_null, n_splits=settings.n_splits, n_bootstrap=settings.n_bootstrap)
    acc = {"a": _heldout_accuracy(Xa, y, rng), "b": _heldout_accuracy(Xb, y, rng)}
    return truth_verdict(c["cosine"], c["interval"], c["null_upper"], c["ceiling"], acc, settings), c


def test_verdict_on_planted_activations():
    """Answers known by construction, decided by the pure verdict function against its controls."""
    rng = np.random.default_rng(0)
    # identical models: the same direction, cosine 1 -> agrees
    Xa, Xb, y = _planted_activations(rng)
    (verdict, reason), c = _planted_verdict(Xa, Xb, y, rng)
    assert verdict == "agrees", reason
    assert c["cosine"] == pytest.approx(1.0) and c["interval"][0] > c["null_upper"] and c["ceiling"] > 0.9
    assert len(c["null"]) == 20 and c["null_upper"] < 0.6 and "ceiling" in reason
    # labels independent of the statements: no direction -> inconclusive (even for identical models)
    Xa, Xb, y = _planted_activations(rng, shuffle=True)
    (verdict, reason), _ = _planted_verdict(Xa, Xb, y, rng)
    assert verdict == "inconclusive" and "no truth direction" in reason, reason
    # orthogonal directions, both real: the cosine sits below the null's upper bound -> disagrees
    Xa, Xb, y = _planted_activations(rng, cos_ab=0.0)
    (verdict, reason), c = _planted_verdict(Xa, Xb, y, rng)
    assert verdict == "disagrees", reason
    assert c["interval"][1] < c["null_upper"]
    # half shared (cosine 0.5): above the null, far below the ceiling -> inconclusive
    Xa, Xb, y = _planted_activations(rng, cos_ab=0.5)
    (verdict, reason), c = _planted_verdict(Xa, Xb, y, rng)
    assert verdict == "inconclusive" and "ceiling" in reason, reason
    # seeded: the same inputs give the same controls
    again = direction_controls(Xa, Xb, y)
    np.testing.assert_array_equal(again["null"], direction_controls(Xa, Xb, y)["null"])
    assert direction_controls(Xa, Xb, y, n_bootstrap=50)["bootstrap"].shape == (50,)


def test_verdict_rule_thresholds_are_settings():
    acc = {"a": (0.9, 0.85, 0.95), "b": (0.9, 0.85, 0.95)}
    s = TruthSettings()
    assert truth_verdict(0.8, (0.7, 0.9), 0.3, 0.95, acc, s)[0] == "inconclusive"  # 0.8 < 0.95 - 0.1
    assert truth_verdict(0.8, (0.7, 0.9), 0.3, 0.95, acc, replace(s, ceiling_tolerance=0.2))[0] == "agrees"
    assert truth_verdict(0.1, (0.0, 0.2), 0.3, 0.95, acc, s)[0] == "disagrees"
    assert truth_verdict(0.3, (0.2, 0.4), 0.3, 0.95, acc, s)[0] == "inconclusive"
    weak = {"a": (0.62, 0.54, 0.7), "b": acc["b"]}
    v, why = truth_verdict(0.99, (0.98, 1.0), 0.3, 0.95, weak, s)
    assert v == "inconclusive" and "no truth direction in a" in why
    assert truth_verdict(0.99, (0.98, 1.0), 0.3, 0.95, weak, replace(s, chance_margin=0.0))[0] == "agrees"
    with pytest.raises(ValueError, match="n_null"):
        TruthSettings(n_null=0)


def _centred(X, topics, rows=None):
    """``X`` with each topic's mean over ``rows`` of it (default: all its statements) subtracted: numpy reference."""
    X = X.copy()
    rows = np.ones(len(topics), dtype=bool) if rows is None else rows
    for t in set(topics.tolist()):
        X[topics == t] -= X[rows & (topics == t)].mean(0)
    return X


def test_centring_by_topic_uses_each_topics_own_mean(planted):
    stores, Xs, y, topics, fit = planted
    res, _ = probe_analysis(stores, TruthSettings(center_by_topic=True, heldout_topics=("words",), probe_position=-1))
    keep = fit & (topics != "words")
    X = _centred(Xs["a"][:, 2, 1], topics)
    want = X[keep & (y == 1)].mean(0) - X[keep & (y == 0)].mean(0)
    np.testing.assert_allclose(res["fold_direction"].sel(model="a", fold="words", layer=2).values, want, rtol=1e-9, atol=1e-12)
    # the probe scores are of centred activations too: the threshold is fitted on centred training rows, and the
    # held-out topic is centred on its own mean
    t = float(res["threshold"].sel(model="a", fold="words", layer=2))
    assert t == pytest.approx(best_threshold((X @ want)[keep], y[keep])[0], rel=1e-9, abs=1e-9)
    test = topics == "words"
    assert float(res["transfer_acc"].sel(source="a", target="a", fold="words", layer=2, mode="unrefit")) == pytest.approx(
        np.mean(((X @ want) > t)[test] == (y[test] == 1)))


def test_fixed_probe_layer_is_used_for_every_model(planted, tmp_path):
    """The paper's protocol: one probe layer for every model and topic, even where validation would choose another."""
    stores, Xs, y, topics, fit = planted
    s = TruthSettings(intervene=False, probe_position=-1, probe_layer=1)
    res = truthfulness_study(stores, None, tmp_path, settings=s)  # validation alone chooses layer 2 (test above)
    d, summ = res.data, res.summary
    assert d["best_layer"].values.tolist() == [1, 1] and d.attrs["layer_choice"] == "fixed"
    # each model's own probe at layer 1, by hand for one fold: direction and threshold from layer-1 training rows
    h = "words"
    train, test = fit & (topics != h), topics == h
    for m in ("a", "b"):
        X = Xs[m][:, 1, 1]
        dm = X[train & (y == 1)].mean(0) - X[train & (y == 0)].mean(0)
        t, _ = best_threshold(X[train] @ dm, y[train])
        assert summ["probe_acc_by_fold_best"][m][h] == pytest.approx(np.mean((X[test] @ dm > t) == (y[test] == 1)))
    (f,) = res.findings
    assert f.figures["best_layer_a"] == f.figures["best_layer_b"] == 1 and summ["controls"]["a_vs_b"]["layer"] == 1
    assert f.figures["cosine_at_best_layer"] == pytest.approx(float(d["cosine"].sel(pair="a_vs_b", layer=1, position=-1)))
    assert "fixed probe layer 1" in f.detail and "layer 1" in res.notes["pca"] and res.figures["pca"].stat().st_size > 1000
    with pytest.raises(TruthSettingsError, match="probe_layer 7 is not among the stored layers"):
        probe_analysis(stores, replace(s, probe_layer=7))
    with pytest.raises(MechdiffError, match="probe_layer"):
        TruthSettings(probe_layer=-1)


def _two_datasets(tmp_path, rng, n_d=80, W=8):
    """Two datasets whose labels are balanced within each and whose means differ by a large offset; the train split
    is imbalanced the opposite way in each (75% of d1's true and 45% of its false statements, the reverse in d2).
    Layer 0: no truth signal at all, d2 offset by 10 u in both models. Layer 1: a truth direction v in both models
    (+-2 v), and d2 offset by 4 v + 6 u."""
    topics = np.repeat(np.array(["d1", "d2"], dtype=object), n_d)
    y = np.tile(np.arange(n_d) % 2, 2)
    split = np.full(2 * n_d, "test", dtype=object)
    for t, p_true, p_false in (("d1", 0.75, 0.45), ("d2", 0.45, 0.75)):
        for label, p in ((1, p_true), (0, p_false)):
            idx = np.flatnonzero((topics == t) & (y == label))
            split[rng.choice(idx, int(p * idx.size), replace=False)] = "train"
    v, u = np.eye(W)[0], np.eye(W)[1]
    in_d2 = (topics == "d2")[:, None, None]
    stores, Xs = {}, {}
    for name in ("a", "b"):
        X = rng.normal(size=(2 * n_d, 2, 2, W))
        X[:, 0] += in_d2 * 10.0 * u
        X[:, 1] += (2 * y - 1)[:, None, None] * 2.0 * v + in_d2 * (4.0 * v + 6.0 * u)
        Xs[name] = X.astype(np.float32).astype(np.float64)
        coords = {"label": y, "topic": topics, "split": split, "text": np.array([f"s{i}" for i in range(2 * n_d)], dtype=object)}
        stores[name] = _store(tmp_path / f"{name}.zarr", X.astype(np.float32), coords)
    return stores, Xs, y, topics, split == "train", u


def test_centring_per_dataset_removes_an_offset(tmp_path):
    """The paper's per-dataset centring: a dataset offset neither fakes a shared direction nor breaks a probe."""
    stores, Xs, y, topics, fit, u = _two_datasets(tmp_path, np.random.default_rng(2))
    s = TruthSettings(intervene=False, probe_position=-1, heldout_topics=("d2",))
    raw, _ = probe_analysis(stores, s)
    cen, _ = probe_analysis(stores, replace(s, center_by_topic=True))
    # layer 0 has no truth signal: uncentred, the unequal train-split mix of the two datasets turns their offset
    # into a "truth direction" both models share, far above the shuffled-label null; centred, it is gone
    d_raw, d_cen = (r["direction"].sel(layer=0, position=-1) for r in (raw, cen))
    assert abs(d_raw.sel(model="a").values @ u) > 2.0 and abs(d_cen.sel(model="a").values @ u) < 0.5
    assert float(raw["cosine"].sel(pair="a_vs_b", layer=0, position=-1)) > 0.9 > float(raw["null_cosine"].sel(pair="a_vs_b", layer=0))
    assert float(cen["cosine"].sel(pair="a_vs_b", layer=0, position=-1)) < 0.6
    # numpy reference: the difference of means of the training rows after subtracting each dataset's mean over all
    # its statements (at layer 1 the imbalanced train split makes that differ from centring on the training rows)
    for layer in (0, 1):
        X = _centred(Xs["a"][:, layer, 1], topics)
        want = X[fit & (y == 1)].mean(0) - X[fit & (y == 0)].mean(0)
        np.testing.assert_allclose(cen["direction"].sel(model="a", layer=layer, position=-1).values, want, rtol=1e-9, atol=1e-12)
    X = _centred(Xs["a"][:, 1, 1], topics, fit)
    assert np.abs(want - (X[fit & (y == 1)].mean(0) - X[fit & (y == 0)].mean(0))).max() > 0.1
    # layer 1: a real direction, trained on d1, tested on d2 whose offset has a component along it; uncentred every d2
    # statement lands on one side of d1's threshold, centred on d2's own mean the probe and its transfer work
    acc_raw, acc_cen = (r["transfer_acc"].sel(fold="d2", layer=1, mode="unrefit") for r in (raw, cen))
    for src, tgt in (("a", "a"), ("a", "b"), ("b", "a")):
        assert float(acc_raw.sel(source=src, target=tgt)) < 0.6 < 0.9 < float(acc_cen.sel(source=src, target=tgt))  # Bayes: 0.98


def test_store_requirements_name_what_to_extract(tmp_path, planted):
    stores, Xs, y, topics, fit = planted
    X = Xs["a"].astype(np.float32)
    base = {"label": y, "topic": topics, "text": np.array([f"s{i}" for i in range(len(y))], dtype=object)}
    last = _store(tmp_path / "last.zarr", X[:, :, 1], base, positions="last")
    with pytest.raises(StoreRequirementError, match=r"1 position\(s\), 2 needed; extract with --sites resid_post"):
        check_truth_store(last)
    other = _store(tmp_path / "mlp.zarr", X, base, name="mlp_out")
    with pytest.raises(StoreRequirementError, match="no 'resid_post' activations.*--sites resid_post"):
        check_truth_store(other)
    notopic = _store(tmp_path / "nt.zarr", X, {"label": y, "text": base["text"]})
    with pytest.raises(StoreRequirementError, match="no 'topic' column"):
        check_truth_store(notopic)
    nolabel = _store(tmp_path / "nl.zarr", X, {"topic": topics, "text": base["text"]})
    with pytest.raises(StoreRequirementError, match="no 'label' column"):
        probe_analysis({"a": nolabel})
    chat = _store(tmp_path / "chat.zarr", X, base, template="chat")
    with pytest.raises(StoreRequirementError, match="template 'chat'.*--positions last:2 --template none"):
        check_truth_store(chat)
    with pytest.raises(ValueError, match="held-out topics \\['moon'\\]"):
        probe_analysis(stores, TruthSettings(heldout_topics=("moon",)))


class _Wrapped(torch.nn.Module):
    """The hand-modified forward: a decoder block whose output a plain function rewrites."""

    def __init__(self, inner, fn):
        super().__init__()
        self.inner, self.fn = inner, fn

    def forward(self, *args, **kwargs):
        out = self.inner(*args, **kwargs)
        return replace_hidden_in_output(out, self.fn(hidden_from_output(out)))


def _statements(rng, n, lo=2, hi=7):
    return [" ".join(f"w{x}" for x in rng.integers(10, 200, int(rng.integers(lo, hi)))) for _ in range(n)]


def test_intervention_equals_hand_modified_forward(tiny_llama):
    lm = tiny_llama
    rng = np.random.default_rng(0)
    stmts = _statements(rng, 7)
    shots = [("w20 w21 w22", 1), ("w30 w31", 0)]
    prompts = truth_prompts(stmts, shots, TINY)
    # positions by word count (the tiny tokenizer is one token per word, after <bos>)
    head_words = sum(len(s.split()) + 4 for s, _ in shots)  # statement + 3 suffix words + label word
    ids, ends = statement_end_positions(lm.tokenizer, prompts)
    for i, s in enumerate(stmts):
        end = 1 + head_words + len(s.split())
        assert ends[i].tolist() == [end - 2, end - 1]
        assert lm.tokenizer.convert_ids_to_tokens(ids[i][end - 2:end]) == s.split()[-2:]
    g = torch.Generator().manual_seed(0)
    vecs = {0: torch.randn(lm.adapter.d_model, generator=g).numpy() * 2, 2: torch.randn(lm.adapter.d_model, generator=g).numpy()}
    signs = np.array([1, -1, 0, 1, -1, -1, 1], dtype=float)
    coef = 1.7
    got = truth_logits(lm, prompts, settings=TINY, vectors=vecs, signs=signs, coef=coef)  # batched, left-padded
    clean = truth_logits(lm, prompts, settings=TINY)
    pd = truth_margins(lm, prompts, settings=TINY, vectors=vecs, signs=signs, coef=coef)
    t_id, f_id = lm.tokenizer.convert_tokens_to_ids(["w2", "w1"])
    layers = lm.adapter.layers
    want = np.zeros_like(got)
    for i in range(len(stmts)):
        pos = ends[i]

        def make(v, sgn=signs[i]):
            def fn(x):
                x = x.clone()
                x[0, pos] += torch.as_tensor(sgn * coef * v, dtype=x.dtype)
                return x
            return fn

        orig = {l: layers[l] for l in vecs}
        for l, v in vecs.items():
            layers[l] = _Wrapped(orig[l], make(v))
        try:
            with torch.no_grad():  # one prompt alone: no padding, no hooks
                want[i] = lm.model(input_ids=torch.tensor([ids[i]])).logits[0, -1].numpy()
        finally:
            for l in vecs:
                layers[l] = orig[l]
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)
    assert np.abs(got - clean).max(axis=-1)[signs != 0].min() > 1e-2  # the intervention did something
    np.testing.assert_allclose(got[signs == 0], clean[signs == 0], atol=2e-5)
    p = torch.softmax(torch.as_tensor(want, dtype=torch.float64), -1).numpy()
    np.testing.assert_allclose(pd, p[:, t_id] - p[:, f_id], atol=1e-7)


def _byte_level_bpe():
    """A GPT-2-style tokenizer (byte-level BPE), trained here on a few sentences: words merge with the space
    before them, and "..." with a statement's final period."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    texts = ["The city of Paris is in France... This statement is: TRUE", "Two is larger than three.. FALSE",
             "The city of Rome is in Spain... This statement is: FALSE", "Wait... TRUE or FALSE?"] * 20
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


@pytest.mark.parametrize("suffix", [" This statement is:", ".. This statement is:"])
def test_statement_and_label_tokens_on_a_bpe_tokenizer(suffix):
    """Byte-level BPE: the statement's last tokens are the last ones wholly inside its text (with ".." the final
    period merges into the suffix's "...", so character offsets decide), and the label tokens are the ones the
    tokenizer gives " TRUE" / " FALSE" after the prompt."""
    from mechdiff.analyses.truthfulness import _label_token_ids

    tok = _byte_level_bpe()
    settings = replace(TruthSettings(), suffix=suffix)
    prompts = truth_prompts(["The city of Paris is in France.", "The city of Rome is in Spain."],
                            [("The city of Rome is in France.", 0)], settings)
    ids, ends = statement_end_positions(tok, prompts)
    merged = False
    for (p, q), x, (a, b) in zip(prompts, ids, ends):
        assert b == a + 1 and tok.decode(x) == p
        assert q.startswith(tok.decode(x[: b + 1])) and not q.startswith(tok.decode(x[: b + 2]))
        merged |= tok.decode(x[: b + 1]) != q
    assert merged == suffix.startswith(".")  # the offsets route was taken exactly when the period merged
    f_id, t_id = _label_token_ids(tok, prompts[0][0], settings.label_words)
    for w, i in (("FALSE", f_id), ("TRUE", t_id)):
        full = tok(prompts[0][0] + " " + w)["input_ids"]
        assert full[: len(ids[0])] == ids[0] and full[len(ids[0])] == i and (" " + w).startswith(tok.decode([i]))
    assert f_id != t_id


def _write_statements(d, rng, topics=("t1", "t2", "t3"), n=24):
    for t in topics:
        with open(d / f"truth_{t}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["statement", "label", "topic", "split"])
            for i, s in enumerate(_statements(rng, n)):
                w.writerow([s, i % 2, t, "test" if (i // 2) % 4 == 3 else "train"])


@pytest.fixture(scope="module")
def tiny_pair(tiny_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("truth_data")
    _write_statements(d, np.random.default_rng(1))
    return ModelGroup("tiny", str(tiny_dir("llama", n_layers=3)), (str(tiny_dir("llama", n_layers=3, seed=1)),)), d


def test_run_truthfulness_end_to_end(tiny_pair, tmp_path):
    group, data = tiny_pair
    out = tmp_path / "out"
    res = run_truthfulness(group, data, out, settings=TINY)
    d = out / "truthfulness"
    summary = json.loads((d / "summary.json").read_text())
    assert set(summary["summary"]["best_layer"]) == {"base", "post"}
    for name in ("cosine_by_layer", "probe_accuracy", "transfer_table", "nie_table", "pca"):
        assert res.figures[name].exists() and res.figures[name].stat().st_size > 1000
    assert f"layer {summary['summary']['best_layer']['base']} " in summary["notes"]["pca"]
    saved = xr.open_zarr(d / "results.zarr", consolidated=False)
    assert saved["nie"].dims == ("target", "source", "fold", "kind") and saved.sizes["layer"] == 3
    np.testing.assert_allclose(saved["cosine"].values, res.data["cosine"].values)
    # the store holds what the study needs, one group per model
    st = open_store(out / "store.zarr", "post/truth")
    cap = st.attrs["capture"]
    assert str(cap.positions) == "last:2" and cap.template.spec == "none" and cap.layers == (0, 1, 2)
    assert st["resid_post"].dims == ("example", "layer", "position", "hidden")
    check_truth_store(st)
    # NIE is the shift of each label's mean P(TRUE)-P(FALSE) over the clean gap
    iv = res.data
    gap = iv["pd_clean"].sel(statement_label=1) - iv["pd_clean"].sel(statement_label=0)
    f2t = (iv["pd_intervened"].sel(statement_label=0) - iv["pd_clean"].sel(statement_label=0)) / gap
    np.testing.assert_allclose(iv["nie"].sel(kind="false_to_true").values, f2t.transpose("target", "source", "fold").values)
    f = res.findings[0]
    assert f.pair == "base vs post" and "cosine_at_best_layer" in f.figures and "nie_post_with_base_dir" in f.figures
    assert summary["findings"][0]["agrees"] == f.agrees
    # the verdict, its reason, the headline interval and the controls it was decided against are recorded
    sf = summary["findings"][0]
    assert f.verdict in ("agrees", "disagrees", "inconclusive") and sf["verdict"] == f.verdict
    assert sf["reason"] == f.reason and f.reason and sf["interval"] == pytest.approx(list(f.interval))
    assert set(sf["controls"]) >= {"cosine_null_upper", "cosine_ceiling", "split_half_base", "split_half_post"}
    assert summary["summary"]["controls"]["base_vs_post"]["layer"] == f.figures["best_layer_base"]
    assert saved["null_cosine_samples"].shape == (1, TINY.n_null) and saved["bootstrap_cosine"].shape == (1, TINY.n_bootstrap)
    # coef 0: the hooks run and change nothing, so NIE is exactly 0
    stores = {k: open_store(out / "store.zarr", f"{k}/truth") for k in ("base", "post")}
    pr, tdata = probe_analysis(stores, TINY)
    from mechdiff.engine.models import load_model

    zero = intervention_analysis({"base": load_model(group.base), "post": load_model(group.post[0])}, pr, tdata, replace(TINY, coef=0.0))
    assert np.all(zero["nie"].values == 0.0)


def test_cli_truthfulness(tiny_pair, tmp_path):
    from typer.testing import CliRunner

    from mechdiff.cli import app

    group, data = tiny_pair
    runner = CliRunner()
    h = runner.invoke(app, ["analyze", "truthfulness", "--help"], env={"COLUMNS": "120"})
    assert h.exit_code == 0 and "DESCRIPTION" in h.output and "--heldout-topic" in h.output
    common = ["analyze", "truthfulness", "--base", group.base, "--post", group.post[0], "--data", str(data), "--out", str(tmp_path),
              "--label-words", "w1,w2", "--suffix", " w3 w4 w5", "--n-shots", "2", "--n-intervene", "4"]
    bad = runner.invoke(app, common + ["--heldout-topic", "moon"])
    assert bad.exit_code == 2 and "moon" in bad.output and not (tmp_path / "store.zarr").exists()
    bad = runner.invoke(app, common + ["--iv-layers", "7:9"])
    assert bad.exit_code == 2 and "iv_layers: layer 7 is out of range" in bad.output
    bad = runner.invoke(app, common + ["--probe-layer", "3"])
    assert bad.exit_code == 2 and "probe_layer 3: model" in bad.output and not (tmp_path / "store.zarr").exists()
    ok = runner.invoke(app, common + ["--heldout-topic", "t2", "--iv-layers", "0:2", "--coef", "2", "--probe-layer", "1",
                                      "--center-by-topic"])
    assert ok.exit_code == 0, ok.output
    s = json.loads((tmp_path / "truthfulness" / "summary.json").read_text())["summary"]
    assert s["folds"] == ["t2"] and s["intervention"]["layers"] == {"base": [0, 1], "post": [0, 1]}
    assert s["settings"]["coef"] == 2.0 and s["best_layer"] == {"base": 1, "post": 1} and s["settings"]["center_by_topic"]


def test_pca_projection_against_covariance_eigenvectors(tmp_path):
    """Planted data with two dominant axes: the projection equals the one onto the covariance's top eigenvectors
    (numpy eigh, an independent route to the same components), up to each component's sign."""
    rng = np.random.default_rng(0)
    n, W = 300, 10
    basis = np.linalg.qr(rng.normal(size=(W, W)))[0]
    X = 5.0 + (rng.normal(size=(n, W)) * np.array([6.0, 3.0] + [0.3] * (W - 2))) @ basis.T
    coords, comps, explained = pca_projection(X)
    Xc = X - X.mean(0)
    evals, evecs = np.linalg.eigh(Xc.T @ Xc / (n - 1))
    top = evecs[:, ::-1][:, :2]
    signs = np.sign(np.sum(comps * top.T, axis=1))
    np.testing.assert_allclose(coords, (Xc @ top) * signs, rtol=1e-8, atol=1e-8)
    np.testing.assert_allclose(explained, evals[::-1][:2] / evals.sum(), rtol=1e-8)
    assert np.abs(np.abs(comps @ basis[:, :2]) - np.eye(2)).max() < 0.05  # the planted axes, in order
    # the sign convention: each component's largest loading is positive
    assert all(c[np.argmax(np.abs(c))] > 0 for c in comps)
    y = (Xc @ basis[:, 1] > 0).astype(int)
    path = pca_figure({"base": X, "post": X[:, ::-1]}, y, tmp_path / "pca.png", title="planted",
                      directions={"post": basis[:, 0]})
    assert path == tmp_path / "pca.png" and path.stat().st_size > 1000
    with pytest.raises(FigureInputError, match=r"direction of 'post' has shape \(10,\); expected \(9,\)"):
        pca_figure({"base": X, "post": X[:, 1:]}, y, tmp_path / "x.png", title="t", directions={"post": basis[:, 0]})
    with pytest.raises(FigureInputError, match="299 rows"):
        pca_figure({"base": X}, y[:299], tmp_path / "x.png", title="t")
    with pytest.raises(FigureInputError, match="0/1"):
        pca_figure({"base": X}, y + 1, tmp_path / "x.png", title="t")
    assert not (tmp_path / "x.png").exists()


def test_random_init_model_has_no_truth_direction(tmp_path):
    """The issue's must-show: the embedded base against a random-init model of its own architecture (and its
    tokenizer), on the embedded statements, through the study's entry point. The base has a truth direction, the
    random model none, so nothing can be shared: inconclusive, naming the random model."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from mechdiff.zoo.paths import zoo_path

    base, rand, data = zoo_path("base"), tmp_path / "random", tmp_path / "data"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base)).save_pretrained(rand)
    AutoTokenizer.from_pretrained(base).save_pretrained(rand)
    data.mkdir()
    for t in ("cities", "translations", "larger_than"):
        with open(zoo_path("data") / f"truth_{t}.csv", newline="") as f:
            rows = list(csv.reader(f))
        with open(data / f"truth_{t}.csv", "w", newline="") as f:
            csv.writer(f).writerows(rows[:61])  # the header and 30 subjects, each with a true and a false statement
    group = ModelGroup("random", str(base), (str(rand),), ("base", "random"))
    (f,) = run_truthfulness(group, data, tmp_path / "out", settings=TruthSettings(intervene=False)).findings
    assert f.verdict == "inconclusive" and not f.agrees, f.reason
    assert "no truth direction in random" in f.reason and "base (" not in f.reason, f.reason
    assert f.controls["acc_base_own_low"] > 0.55 and f.controls["acc_random_own_low"] < 0.55
