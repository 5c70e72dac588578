"""Knowledge study: exact patching against a naive reference, cross-model patching, attribution, statistics."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
import xarray as xr

from mechdiff.analyses import knowledge as kn
from mechdiff.analyses.knowledge import PairError, prepare_pairs
from mechdiff.engine import patching
from mechdiff.engine.models import load_model
from mechdiff.engine.patching import ModelMismatchError, attribution_patching, exact_patching, naive_patching


pytestmark = pytest.mark.usefixtures("one_thread")


def prompt(statement: str, topic: str) -> str:
    # context words, the statement, then a fixed suffix (the tiny vocabulary has only w<i> words and ":")
    return f"w5 w6 {statement} w7 :"


def make_pairs(words: list[int], seed: int = 0, changed: list[int] | None = None) -> pd.DataFrame:
    """One pair per entry: a statement of that many random words, one word changed."""
    rng = np.random.default_rng(seed)
    rows = []
    for i, n in enumerate(words):
        w = [f"w{x}" for x in rng.integers(10, 400, n)]
        f = list(w)
        k = changed[i] if changed else int(rng.integers(1, n))
        f[k] = f"w{(int(w[k][1:]) + 7) % 400 + 10}"
        rows.append(dict(true_statement=" ".join(w), false_statement=" ".join(f), true_answer="w1",
                         false_answer="w2", topic=f"t{i % 2}"))
    return pd.DataFrame(rows)


def prepared(lm, df: pd.DataFrame, answers_from=None):
    """Tokenised pairs whose answers are the words the model's true and false runs separate most, so the
    normalisation divides by a gap well above fp32 rounding (random tiny models barely separate others)."""
    ref = answers_from or lm
    df = df.copy()
    for i in range(len(df)):
        with torch.no_grad():
            lg = [ref.model(**ref.tokenizer(prompt(df[c][i], "t"), return_tensors="pt")).logits[0, -1]
                  for c in ("true_statement", "false_statement")]
        d = (lg[0] - lg[1])[4:400]  # w0..w395
        df.loc[i, "true_answer"] = f"w{int(d.argmax())}"
        df.loc[i, "false_answer"] = f"w{int(d.argmin())}"
    return prepare_pairs(lm.tokenizer, df, prompt=prompt, tokenizer_hash=lm.tokenizer_hash)


@pytest.fixture(scope="module")
def models(tiny_dir):
    return {
        "llama": load_model(tiny_dir("llama", n_layers=3)),
        "llama2": load_model(tiny_dir("llama", n_layers=2)),
        "gpt2": load_model(tiny_dir("gpt2", n_layers=2)),
        "gpt_neox": load_model(tiny_dir("gpt_neox", n_layers=2)),
        "gemma2": load_model(tiny_dir("gemma2", n_layers=2)),
    }


PATCHABLE = ("resid_pre", "resid_post", "attn_out", "mlp_out", "mlp_act")


def assert_same(a: xr.Dataset, b: xr.Dataset, atol: float = 1e-5) -> None:
    """Raw patched logit differences to ``atol``; normalised effects to ``atol`` wherever the pair's
    true-false gap is large enough for the normalisation not to amplify fp32 rounding beyond it."""
    assert a["patched"].shape == b["patched"].shape
    np.testing.assert_array_equal(np.isnan(a["patched"].values), np.isnan(b["patched"].values))
    np.testing.assert_allclose(a["patched"].values, b["patched"].values, atol=atol, rtol=0)
    np.testing.assert_allclose(a["ld_true"].values, b["ld_true"].values, atol=atol, rtol=0)
    np.testing.assert_allclose(a["ld_false"].values, b["ld_false"].values, atol=atol, rtol=0)
    gap = np.abs(b["ld_true"] - b["ld_false"]).values
    ok = gap > 0.05
    assert ok.any()
    np.testing.assert_allclose(a["effect"].values[:, ok], b["effect"].values[:, ok], atol=atol, rtol=0)


# ---------------------------------------------------------------------------------------------- inputs


def test_prepare_pairs_roles_answers_tiny(models):
    lm = models["llama"]
    df = make_pairs([4], changed=[2])
    pp = prepare_pairs(lm.tokenizer, df, prompt=prompt)
    tok = lm.tokenizer
    ids = tok(prompt(df["true_statement"][0], "t"))["input_ids"]
    assert pp.true_ids[0] == ids and len(pp.false_ids[0]) == len(ids)
    # <bos> w5 w6 | s0 s1 | s2 (changed) | s3 w7 :
    want = ["context"] * 3 + ["subject"] * 2 + ["object"] + ["final"] * 3
    assert [kn.ROLES[r] for r in pp.roles[0]] == want
    assert pp.answers.tolist() == [[tok.convert_tokens_to_ids("w1"), tok.convert_tokens_to_ids("w2")]]
    # right-aligned role matrix
    assert pp.role_matrix().shape == (1, len(ids))


def test_prepare_pairs_roles_zoo_tokenizer():
    from mechdiff.zoo.templates import truth_prompt
    from mechdiff.zoo.tokenizer import build_tokenizer

    shots = {"cities": [("The city of Oslo is in Norway.", 1), ("The city of Rome is in Peru.", 0)]}
    t, f = "The city of Lyon is in France.", "The city of Lyon is in Spain."
    tok = build_tokenizer([truth_prompt(t, shots["cities"]), truth_prompt(f, shots["cities"]) + " TRUE FALSE"])
    df = pd.DataFrame([dict(true_statement=t, false_statement=f, true_answer="TRUE", false_answer="FALSE", topic="cities")])
    pp = prepare_pairs(tok, df, shots=shots)
    assert pp.true_prompts[0] == truth_prompt(t, shots["cities"])
    toks = tok.convert_ids_to_tokens(pp.true_ids[0])
    roles = [kn.ROLES[r] for r in pp.roles[0]]
    start = len(toks) - 1 - toks[::-1].index("▁The")  # the statement's first token (after the shots)
    obj = toks.index("▁France")
    assert roles[:start] == ["context"] * start
    assert roles[start:obj] == ["subject"] * (obj - start)  # The city of Lyon is in
    assert roles[obj] == "object" and roles[obj + 1 :] == ["final"] * (len(toks) - obj - 1)  # . This statement is :
    assert toks[obj + 1 :] == [".", "▁This", "▁statement", "▁is", ":"]
    assert pp.answers[0].tolist() == tok.convert_tokens_to_ids(["▁TRUE", "▁FALSE"])


def test_roles_from_span_columns(models):
    """A pairs file that names the spans gives the roles by span: the subject, the object, the tokens after the
    object (final) and the statement's other tokens, whichever span the pair changes (the paper's design changes
    the subject)."""
    lm = models["llama"]
    df = pd.DataFrame([
        dict(true_statement="w10 w11 w12 w13", false_statement="w10 w11 w12 w14", subject="w11", true_object="w13",
             false_object="w14"),  # object changed
        dict(true_statement="w10 w11 w12 w13", false_statement="w10 w20 w12 w13", subject="w11", true_object="w13",
             false_object="w13"),  # subject changed, same object
        dict(true_statement="w10 w21 w12 w13", false_statement="w10 w11 w12 w13", subject="w11", true_object="w13",
             false_object="w13"),  # the subject column names the false statement's subject
    ]).assign(true_answer="w1", false_answer="w2", topic="t")
    pp = prepare_pairs(lm.tokenizer, df, prompt=prompt)
    # <bos> w5 w6 | w10 w11 w12 w13 | w7 :
    want = ["context"] * 3 + ["other", "subject", "other", "object"] + ["final"] * 2
    for r in pp.roles:
        assert [kn.ROLES[x] for x in r] == want
    assert pp.changed.tolist() == ["object", "subject", "subject"]  # no changed column: from the spans
    # without the span columns: derived from the differing span, as before
    derived = prepare_pairs(lm.tokenizer, df.drop(columns=["subject", "true_object", "false_object"]), prompt=prompt)
    assert [kn.ROLES[x] for x in derived.roles[1]] == ["context"] * 3 + ["subject", "object"] + ["final"] * 4
    with pytest.raises(PairError, match=r"pair row 2: no subject span \('w99'"):
        prepare_pairs(lm.tokenizer, df.assign(subject=["w11", "w99", "w11"]), prompt=prompt)
    with pytest.raises(PairError, match="overlap"):
        prepare_pairs(lm.tokenizer, df.assign(true_object="w11", false_object="w11"), prompt=prompt)


def test_limit_takes_turns_over_topics_and_designs():
    rows = [dict(true_statement=f"s{t}{c}{i}", false_statement="x", true_answer="a", false_answer="b", topic=t,
                 changed=c) for t in ("t1", "t2") for c in ("object", "subject") for i in range(3)]
    got = kn.load_pairs(pd.DataFrame(rows), limit=4)
    assert sorted(zip(got["topic"], got["changed"])) == [("t1", "object"), ("t1", "subject"), ("t2", "object"),
                                                         ("t2", "subject")]
    got = kn.load_pairs(pd.DataFrame(rows).drop(columns="changed"), limit=4)  # topics only, file order
    assert got["true_statement"].tolist() == ["st1object0", "st1object1", "st2object0", "st2object1"]


def test_unequal_token_lengths_error(models):
    lm = models["llama"]
    df = pd.DataFrame([
        dict(true_statement="w10 w11", false_statement="w10 w12", true_answer="w1", false_answer="w2", topic="t"),
        dict(true_statement="w10 w11 w12", false_statement="w10 w11", true_answer="w1", false_answer="w2", topic="t"),
    ])
    with pytest.raises(PairError, match=r"pair row 2: the true prompt has 8 tokens, the false prompt 7"):
        prepare_pairs(lm.tokenizer, df, prompt=prompt)
    same = df.iloc[:1].assign(false_statement="w10 w11")
    with pytest.raises(PairError, match="tokenize identically"):
        prepare_pairs(lm.tokenizer, same, prompt=prompt)
    with pytest.raises(PairError, match="same token"):
        prepare_pairs(lm.tokenizer, df.iloc[:1].assign(false_answer="w1"), prompt=prompt)
    with pytest.raises(PairError, match="missing column"):
        kn.load_pairs(df.drop(columns="topic"))


def test_unusable_answers_and_engine_inputs_error(models):
    lm = models["llama"]
    df = make_pairs([3])
    with pytest.raises(PairError, match="pair row 1: answer 'zzz' is not in the tokenizer's vocabulary"):
        prepare_pairs(lm.tokenizer, df.assign(true_answer="zzz"), prompt=prompt)
    pp = prepare_pairs(lm.tokenizer, df, prompt=prompt)
    with pytest.raises(kn.KnowledgeOptionError, match="positions 'context'"):
        pp.mask("context")
    # the engine's own pairs and masks are checked before any model runs
    with pytest.raises(patching.PatchingError, match="pair 0: the true prompt has 3 tokens, the false prompt 2"):
        patching.PatchPairs([[1, 2, 3]], [[1, 2]], [[4, 5]])
    with pytest.raises(patching.PatchingError, match="two answers per pair"):
        patching.PatchPairs([[1, 2]], [[1, 3]], [4, 5])
    with pytest.raises(patching.PatchingError, match="mask of pair 0 has shape"):
        exact_patching(lm, None, pp, mask=[np.ones(2, bool)])
    with pytest.raises(patching.PatchingError, match="outside"):
        exact_patching(lm, None, patching.PatchPairs(pp.true_ids, pp.false_ids, [[1, lm.adapter.vocab_size]]))


def test_token_helpers_find_words_by_offsets(models):
    from mechdiff.engine import tokens

    tok = models["llama"].tokenizer
    text = "w5 w6 w10 w11 w10 w7 :"
    ids = tok(text)["input_ids"]
    pieces = tok.convert_ids_to_tokens(ids)
    assert tokens.find_word(text, "w10") == 6 and tokens.find_word(text, "w10", last=True) == 14
    assert tokens.find_word(text, "w1") == -1  # not inside a longer word
    last = tokens.word_tokens(tok, text, ids, "w10", last=True)
    first = tokens.word_tokens(tok, text, ids, "w10")
    assert [pieces[i].lstrip("\u2581") for i in last] == ["w10"] and last[0] > first[0]
    assert tokens.word_tokens(tok, text, ids, "w99").size == 0
    within = tokens.word_tokens(tok, text, ids, "w10", within="w11 w10 w7")  # the w10 after w11
    assert within.tolist() == last.tolist()
    assert pieces[tokens.first_token_of(tok, text, "w11 w10", ids)].lstrip("\u2581") == "w11"
    with pytest.raises(tokens.TokenError, match="tokenizes to nothing|vocabulary"):
        tokens.answer_token(tok, text, ids, "zzz")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_last_token_scoring_under_padding_equals_unpadded_forwards(models, arch):
    """Left- and right-padded batches give each row the logits of its own unpadded forward at its last token,
    with and without an intervention (GPT-2: absolute positions, so the position ids must count real tokens)."""
    from mechdiff.engine.batching import pad_batch
    from mechdiff.engine.scoring import answer_readout, last_token_logits, last_token_logprobs, logit_difference
    from mechdiff.engine.sites import Add, hooks

    lm = models[arch]
    rows = [[5, 17, 40, 9, 33], [8, 2, 77], [61, 12, 3, 30]]
    vec = torch.randn(lm.adapter.d_model, generator=torch.Generator().manual_seed(0))
    for ivs in ([], [Add("resid_post", 0, vec, 2.0)]):
        with torch.no_grad(), hooks(lm.adapter, None, ivs):
            want = torch.stack([lm.model(input_ids=torch.tensor([r])).logits[0, -1] for r in rows])
        for side in ("left", "right"):
            batch = pad_batch(rows, 0, side=side)
            with torch.no_grad():
                got = last_token_logits(lm, batch["input_ids"], attention_mask=batch["attention_mask"],
                                        position_ids=batch["position_ids"], interventions=ivs)
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        lp = last_token_logprobs(lm, torch.tensor(rows[:1]))
    torch.testing.assert_close(lp.exp().sum(-1), torch.ones(1, dtype=torch.float64))
    answers = torch.tensor([[1, 2]] * len(rows))
    readout = answer_readout(want, answers)
    p = torch.softmax(want.double(), -1)
    torch.testing.assert_close(readout[:, 0], (want[:, 1] - want[:, 2]).double())
    torch.testing.assert_close(readout[:, 0], logit_difference(want, answers))
    torch.testing.assert_close(readout[:, 1], p[:, 1] - p[:, 2])


def test_engine_modules_import_no_study_code():
    """The patching, token and scoring engine modules stand alone: importing them loads nothing of the studies,
    the cluster, the report, the zoo or the command line."""
    import subprocess
    import sys

    code = ("import sys, mechdiff.engine.patching, mechdiff.engine.tokens, mechdiff.engine.scoring; "
            "print(sorted(m for m in sys.modules if m.split('.')[:2] in ([\"mechdiff\", p] for p in "
            "(\"analyses\", \"cluster\", \"report\", \"zoo\", \"cli\", \"pipeline\"))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


# ---------------------------------------------------------------------------------------------- exact


@pytest.mark.parametrize(
    "arch,sites",
    [
        ("llama", PATCHABLE),
        ("gpt2", PATCHABLE),  # learned absolute positions, Conv1D, tuple outputs
        ("gpt_neox", PATCHABLE),  # parallel residual, partial rotary
        ("gemma2", PATCHABLE),  # post-norm blocks, eager attention, sliding-window masks per layer
    ],
)
def test_exact_equals_naive(models, arch, sites):
    lm = models[arch]
    pp = prepared(lm, make_pairs([2, 3, 3], seed=1))  # two lengths: two groups
    naive = naive_patching(lm, None, pp, sites=sites)
    exact = exact_patching(lm, None, pp, sites=sites, token_budget=64)  # small budget: several chunks
    assert exact.attrs["execution"] == "resume"  # the resumed path was validated and used, no fallback
    assert exact.attrs["variants_skipped"] > 0  # positions before the changed word are answered without running
    assert_same(exact, naive)
    everything = exact_patching(lm, None, pp, sites=sites, skip_unchanged=False)
    assert everything.attrs["variants_skipped"] == 0
    assert_same(everything, naive)
    whole = exact_patching(lm, None, pp, sites=sites, skip_unchanged=False, reuse_prefix=False)  # every position
    assert_same(whole, naive)
    hooked = exact_patching(lm, None, pp, sites=sites, method="hooked")
    assert hooked.attrs["execution"] == "hooked"
    assert_same(hooked, naive)
    # sanity of the normalisation itself: patching the last layer's output at the last position is the true run
    last = exact["effect"].sel(site="resid_post", layer=lm.adapter.n_layers - 1, position=-1).values
    np.testing.assert_allclose(last, 1.0, atol=1e-4)


def test_paper_normalisation_by_hand(tiny_dir):
    """normalisation="paper": (PD_patched - PD_false) / (1 - PD_false), PD = P(TRUE) - P(FALSE) at the last token,
    against probabilities computed by hand from the true, false and hand-patched runs; the default stays
    (LD_patched - LD_false) / (LD_true - LD_false) on logit differences."""
    from mechdiff.engine.sites import Capture, hooks

    lm = load_model(tiny_dir("llama", n_layers=3), dtype=torch.float64)
    pp = prepared(lm, make_pairs([4, 5], seed=12))
    sites = ("resid_post", "mlp_out")
    paper = kn.normalise(exact_patching(lm, None, pp, sites=sites), "paper")
    logit = exact_patching(lm, None, pp, sites=sites)
    assert paper.attrs["normalisation"] == "paper" and logit.attrs["normalisation"] == "logit"
    naive = kn.normalise(naive_patching(lm, None, pp, sites=sites), "paper")
    np.testing.assert_allclose(paper["patched_pd"].values, naive["patched_pd"].values, atol=1e-12)
    np.testing.assert_allclose(paper["effect"].values, naive["effect"].values, atol=1e-9)

    def readout(ids, hook=None):
        with torch.no_grad():
            lg = lm.model(input_ids=torch.tensor([ids])).logits[0, -1]
        p = torch.softmax(lg, -1)
        return float(p[a_t] - p[a_f]), float(lg[a_t] - lg[a_f])

    for i, site, layer, p in [(0, "resid_post", 0, 5), (0, "mlp_out", 2, 7), (1, "resid_post", 1, 6), (1, "mlp_out", 0, 8)]:
        a_t, a_f = (int(x) for x in pp.answers[i])
        t_ids, f_ids = pp.true_ids[i], pp.false_ids[i]
        cap = Capture((site,), (layer,))
        with torch.no_grad(), hooks(lm.adapter, cap):
            lm.model(input_ids=torch.tensor([t_ids]))
        h = patching._hand_hook(lm.adapter, site, layer, p, cap.acts[(site, layer)][0, p])
        try:
            pd_p, ld_p = readout(f_ids)
        finally:
            h.remove()
        (pd_t, ld_t), (pd_f, ld_f) = readout(t_ids), readout(f_ids)
        at = dict(site=site, pair=i, layer=layer, position=p - len(t_ids))
        assert float(paper["effect"].sel(**at)) == pytest.approx((pd_p - pd_f) / (1 - pd_f), rel=1e-7, abs=1e-12)
        assert float(paper["pd_false"][i]) == pytest.approx(pd_f, rel=1e-9, abs=1e-15)
        assert float(paper["pd_true"][i]) == pytest.approx(pd_t, rel=1e-9, abs=1e-15)
        assert float(logit["effect"].sel(**at)) == pytest.approx((ld_p - ld_f) / (ld_t - ld_f), rel=1e-7)
    # the mirror, for false activations patched into the true run: (PD_patched - PD_true) / (-1 - PD_true)
    assert kn.paper_nie(0.1, 0.6, into="true") == pytest.approx((0.1 - 0.6) / (-1 - 0.6))
    assert kn.paper_nie(0.1, -0.6) == pytest.approx((0.1 + 0.6) / (1 + 0.6))
    with pytest.raises(kn.KnowledgeOptionError, match="normalisation 'nie'"):
        kn.normalise(logit, "nie")
    with pytest.raises(kn.KnowledgeOptionError, match="no probability readout"):
        kn.normalise(attribution_patching(lm, None, pp, sites=sites), "paper")


def test_layer_subset_in_any_order(models):
    lm = models["llama"]
    pp = prepared(lm, make_pairs([3, 4], seed=10))
    sites, layers = ("mlp_out", "resid_pre"), (2, 0)
    exact = exact_patching(lm, None, pp, sites=sites, layers=layers)
    assert exact["layer"].values.tolist() == [2, 0] and exact["site"].values.tolist() == list(sites)
    assert_same(exact, naive_patching(lm, None, pp, sites=sites, layers=layers))


def test_statement_positions_only(models, tiny_dir):
    a = models["llama2"]
    b = load_model(tiny_dir("llama", n_layers=2, seed=1))
    pp = prepared(a, make_pairs([3, 4], seed=11), answers_from=b)
    sites = ("resid_post", "attn_out")
    exact = exact_patching(a, b, pp, sites=sites, mask=pp.mask("statement"))
    assert_same(exact, naive_patching(a, b, pp, sites=sites, mask=pp.mask("statement")))
    full = exact_patching(a, b, pp, sites=sites)
    context = (exact["role"] == kn.ROLES.index("context")).values  # [pair, position]
    assert context.sum() == 2 * 3  # <bos> w5 w6 in each pair
    order = ("site", "layer", "pair", "position")
    e, f = exact["patched"].transpose(*order).values, full["patched"].transpose(*order).values
    assert np.isnan(e[..., context]).all() and np.isfinite(f[..., context]).all()
    statement = (exact["role"] >= 1).values
    np.testing.assert_allclose(e[..., statement], f[..., statement], atol=1e-6)
    att = attribution_patching(a, b, pp, sites=sites, mask=pp.mask("statement"))
    assert np.isnan(att["patched"].transpose(*order).values[..., context]).all()


def test_fallback_when_resume_fails(models, monkeypatch):
    lm = models["llama"]
    pp = prepared(lm, make_pairs([3], seed=2))
    naive = naive_patching(lm, None, pp, sites=("resid_post", "mlp_out"))

    def broken(target, grp):
        raise patching._ResumeFailed("simulated")

    monkeypatch.setattr(patching, "_validate", broken)
    auto = exact_patching(lm, None, pp, sites=("resid_post", "mlp_out"))
    assert auto.attrs["execution"] == "hooked"
    assert_same(auto, naive)
    with pytest.raises(RuntimeError, match="cannot resume"):
        exact_patching(lm, None, pp, method="resume")


def test_segments_cover_every_row_once():
    pos = torch.tensor([9, 3, 3, 7, 15, 0, 15, 12, 3])
    z = torch.zeros_like(pos)
    rows = patching._Rows(z, z, z, pos, torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 4]))
    segs = patching._segments(rows, 16, 2, 4, True)
    assert len(segs) > 1  # the late positions are worth their own pass
    seen = torch.cat([s for _, s in segs]).sort().values
    assert seen.tolist() == list(range(len(pos)))
    for start, sel in segs:
        assert int(pos[sel].min()) == start


# ---------------------------------------------------------------------------------------------- cross-model


def test_cross_model_same_weights_equals_within(models, tiny_dir):
    a = models["llama"]
    b = load_model(tiny_dir("llama", n_layers=3))  # another LoadedModel with the same weights: the cross path
    assert a is not b
    pp = prepared(a, make_pairs([3, 4], seed=3))
    sites = ("resid_post", "attn_out", "mlp_out")
    within = exact_patching(a, None, pp, sites=sites)
    cross = exact_patching(a, b, pp, sites=sites)
    assert cross.attrs["source"] == cross.attrs["target"] == a.model_id
    assert_same(cross, within, atol=1e-6)
    aw = attribution_patching(a, None, pp, sites=sites)
    ac = attribution_patching(a, b, pp, sites=sites)
    np.testing.assert_allclose(ac["patched"].values, aw["patched"].values, atol=1e-6)


def test_cross_model_equals_naive(models, tiny_dir):
    a = models["llama2"]
    b = load_model(tiny_dir("llama", n_layers=2, seed=1))  # other weights, same tokenizer
    pp = prepared(a, make_pairs([3, 4], seed=4), answers_from=b)
    sites = ("resid_post", "mlp_out")
    naive = naive_patching(a, b, pp, sites=sites)
    exact = exact_patching(a, b, pp, sites=sites)
    assert exact.attrs["execution"] == "resume"
    assert_same(exact, naive)
    # B's own true and false runs normalise the effect, not A's
    np.testing.assert_allclose(exact["ld_true"].values, exact_patching(b, None, pp, sites=sites)["ld_true"].values, atol=1e-6)


def test_cross_model_errors(models, tiny_dir):
    a = models["llama"]
    pp = prepared(a, make_pairs([3], seed=5))
    other_tok = load_model(tiny_dir("llama", n_layers=3, vocab_size=600))
    with pytest.raises(ModelMismatchError, match="different tokenizers"):
        exact_patching(a, other_tok, pp)
    with pytest.raises(ModelMismatchError, match="different tokenizers"):
        attribution_patching(a, other_tok, pp)
    deeper = load_model(tiny_dir("llama", n_layers=4))
    with pytest.raises(ModelMismatchError, match="n_layers=3"):
        exact_patching(a, deeper, pp)
    with pytest.raises(ModelMismatchError, match="another tokenizer"):
        exact_patching(other_tok, None, pp)  # pairs tokenised for a different tokenizer


# ---------------------------------------------------------------------------------------------- attribution


def test_attribution_is_gradient_times_difference(tiny_dir):
    """The estimate for one (site, layer, position) is (x_true - x_false) . d metric / d x at the false run: checked
    against autograd through a hand-written hook, and against central differences of hand-patched forwards
    (eps = 1e-3; Llama's RMSNorm computes in float32 even in a float64 model, which bounds the difference)."""
    lm = load_model(tiny_dir("llama", n_layers=3), dtype=torch.float64)
    pp = prepared(lm, make_pairs([4], seed=6))
    att = attribution_patching(lm, None, pp, sites=("resid_post", "attn_out"))
    t_ids = torch.tensor([pp.true_ids[0]])
    f_ids = torch.tensor([pp.false_ids[0]])
    a_t, a_f = pp.answers[0]
    from mechdiff.engine.sites import Capture, hooks

    for site, layer, p in [("resid_post", 0, 5), ("resid_post", 1, 6), ("attn_out", 2, 8), ("attn_out", 1, 5)]:
        caps = {}
        for name, ids in (("true", t_ids), ("false", f_ids)):
            cap = Capture((site,), (layer,))
            with torch.no_grad(), hooks(lm.adapter, cap):
                lm.model(input_ids=ids)
            caps[name] = cap.acts[(site, layer)][0, p]
        delta = caps["true"] - caps["false"]

        def metric(eps: float) -> float:
            h = patching._hand_hook(lm.adapter, site, layer, p, caps["false"] + eps * delta)
            try:
                with torch.no_grad():
                    lg = lm.model(input_ids=f_ids).logits[0, -1]
            finally:
                h.remove()
            return float(lg[a_t] - lg[a_f])

        kept = {}
        module = lm.adapter.layer(layer) if site == "resid_post" else lm.adapter.attn_out_module(layer)

        def keep(m, a, o):
            kept["x"] = o if torch.is_tensor(o) else o[0]

        h = module.register_forward_hook(keep)
        try:
            lg = lm.model(input_ids=f_ids).logits[0, -1]
        finally:
            h.remove()
        (grad,) = torch.autograd.grad(lg[a_t] - lg[a_f], kept["x"])
        by_hand = float((grad[0, p] * delta).sum())
        pos = p - len(pp.true_ids[0])
        est = float(att["patched"].sel(site=site, pair=0, layer=layer, position=pos) - att["ld_false"].sel(pair=0))
        assert est == pytest.approx(by_hand, rel=1e-9, abs=1e-12), (site, layer, p)
        fd = (metric(1e-3) - metric(-1e-3)) / 2e-3
        assert est == pytest.approx(fd, rel=1e-3, abs=1e-6), (site, layer, p, fd, est)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox", "gemma2"])
def test_attribution_from_a_shared_prefix_equals_full_prompts(models, arch):
    """Running only the tokens after a batch's first difference (from the prefix's cached keys/values) gives the
    full-prompt estimates: exactly 0 before the difference, the same values after it."""
    lm = models[arch]
    # equal lengths, so the pairs share one batch; changed words 2 and 4: the prefix ends at the earlier one
    pp = prepared(lm, make_pairs([5, 5, 5], seed=8, changed=[2, 4, 3]))
    sites = ("resid_post", "attn_out", "mlp_out")
    full = attribution_patching(lm, None, pp, sites=sites, reuse_prefix=False)
    cut = attribution_patching(lm, None, pp, sites=sites)
    assert full.attrs["prefix_tokens_shared"] == 0
    first = min(int(np.argmax(np.asarray(t) != np.asarray(f))) for t, f in zip(pp.true_ids, pp.false_ids))
    assert first >= 4  # w5 w6 + the two unchanged words of the earliest change
    assert cut.attrs["prefix_tokens_shared"] == 3 * first
    np.testing.assert_allclose(cut["patched"].values, full["patched"].values, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(cut["ld_true"].values, full["ld_true"].values, atol=1e-5)
    est = (full["patched"] - full["ld_false"]).isel(position=slice(0, first))  # before any change
    assert float(np.abs(est).max()) < 1e-6


def test_attribution_correlates_with_exact(models):
    lm = models["llama"]
    pp = prepared(lm, make_pairs([4, 5, 5, 6], seed=7))
    sites = ("resid_post", "attn_out", "mlp_out")
    ex = exact_patching(lm, None, pp, sites=sites)
    at = attribution_patching(lm, None, pp, sites=sites)
    for s in sites:
        r = kn.pearson(ex["patched"].sel(site=s) - ex["ld_false"], at["patched"].sel(site=s) - at["ld_false"])
        assert r > 0.8, (s, r)


# ---------------------------------------------------------------------------------------------- statistics


def _toy_effect() -> xr.DataArray:
    roles = np.array([
        [-1, 0, 0, 1, 1, 2, 3, 3],  # 7 tokens, right-aligned: pad, context x2, subject x2, object, final x2
        [0, 1, 1, 1, 2, 2, 3, 3],
    ], dtype=np.int8)
    rng = np.random.default_rng(0)
    v = rng.normal(size=(2, 3, 8))  # pair, layer, position
    v[0, :, 0] = np.nan
    return xr.DataArray(v, dims=("pair", "layer", "position"),
                        coords={"pair": [0, 1], "layer": [0, 1, 2], "position": np.arange(-8, 0),
                                "role": (("pair", "position"), roles)})


def test_slot_heatmaps_and_stats_by_hand():
    eff = _toy_effect()
    v = eff.values
    slots = kn.slot_heatmaps(eff, n_subject=2, n_object=2, n_final=2)
    assert list(slots["slot"].values) == ["context", "subject[-2]", "subject[-1]", "object[0]", "object[1]",
                                          "final[-2]", "final[-1]"]
    want = np.full((2, 3, 7), np.nan)
    want[0, :, 0] = v[0, :, 1:3].mean(-1)
    want[0, :, 1], want[0, :, 2] = v[0, :, 3], v[0, :, 4]
    want[0, :, 3] = v[0, :, 5]  # one object token: object[1] stays NaN
    want[0, :, 5], want[0, :, 6] = v[0, :, 6], v[0, :, 7]
    want[1, :, 0] = v[1, :, 0]
    want[1, :, 1], want[1, :, 2] = v[1, :, 2], v[1, :, 3]
    want[1, :, 3], want[1, :, 4] = v[1, :, 4], v[1, :, 5]
    want[1, :, 5], want[1, :, 6] = v[1, :, 6], v[1, :, 7]
    np.testing.assert_allclose(slots.values, want)
    st = kn.heatmap_stats(slots)
    np.testing.assert_allclose(st["mean"].values, np.nanmean(want, axis=0))
    np.testing.assert_allclose(st["std"].values, np.nanstd(want, axis=0))
    assert st["count"].values[:, 4].tolist() == [1, 1, 1]
    kept = kn.heatmap_stats(slots, np.array([False, True]))
    np.testing.assert_allclose(kept["mean"].values, want[1])
    # comparisons: correlation and peak layer per role, by hand
    a, b = st["mean"], kept["mean"]
    c = kn.compare_heatmaps(a, b)
    m = np.isfinite(a.values) & np.isfinite(b.values)
    assert c["correlation"] == pytest.approx(np.corrcoef(a.values[m], b.values[m])[0, 1])
    assert c["peak_layer_b"]["final"] == int(np.argmax(want[1][:, 5:].mean(-1)))
    np.testing.assert_allclose(c["difference"].values, b.values - a.values)


# ---------------------------------------------------------------------------------------------- the study


@pytest.fixture(scope="module")
def group_dirs(tiny_dir):
    return tiny_dir("llama", n_layers=2), tiny_dir("llama", n_layers=2, seed=1)


def test_pairs_are_the_callers_to_give(tmp_path):
    """No default dataset in the study: None is an error before any model loads (the paths do not exist); the
    CLI's default is the embedded patching.csv, whose shots.json "auto" finds beside it."""
    from mechdiff.analyses.common import ModelGroup
    from mechdiff.cli.analyze import embedded_pairs
    from mechdiff.zoo.paths import zoo_path

    with pytest.raises(PairError, match="give pairs"):
        kn.run_knowledge(ModelGroup("g", "/no/such/base", ("/no/such/post",)), None, tmp_path)
    assert not (tmp_path / "knowledge").exists()
    path = embedded_pairs()
    assert path == zoo_path("data") / "patching.csv" and (path.parent / "shots.json").is_file()
    assert len(kn.load_pairs(path)) == 1050


def test_run_knowledge_end_to_end(group_dirs, tmp_path):
    from mechdiff.analyses.common import ModelGroup

    base, post = group_dirs
    df = make_pairs([3, 4, 4], seed=8)
    csv = tmp_path / "pairs.csv"
    df.to_csv(csv, index=False)
    res = kn.run_knowledge(ModelGroup("g", str(base), (str(post),)), csv, tmp_path / "out", shots=None,
                           min_gap=None)
    d = tmp_path / "out" / "knowledge"
    summary = json.loads((d / "summary.json").read_text())
    comp = summary["summary"]["comparisons"]["base vs post"]["resid_post"]
    ds = xr.open_zarr(d / "results.zarr", consolidated=False)
    assert list(ds["run"].values) == ["base", "post", "base->post", "post->base"]
    # the reported correlation is that of the stored mean heatmaps
    a = ds["mean"].sel(run="base", site="resid_post").values
    b = ds["mean"].sel(run="post", site="resid_post").values
    assert comp["correlation"] == pytest.approx(kn.pearson(a, b))
    # the cross run equals exact patching done directly
    lm_b, lm_p = load_model(base), load_model(post)
    pp = kn.prepare_pairs(lm_b.tokenizer, df, tokenizer_hash=lm_b.tokenizer_hash)
    direct = exact_patching(lm_b, lm_p, pp, sites=("resid_post",), mask=pp.mask("statement"))
    np.testing.assert_allclose(ds["patched"].sel(run="base->post", site="resid_post").values,
                               direct["patched"].sel(site="resid_post").values, atol=1e-6)
    # and the other direction: the post model's activations into the base model's false runs
    back = exact_patching(lm_p, lm_b, pp, sites=("resid_post",), mask=pp.mask("statement"))
    np.testing.assert_allclose(ds["patched"].sel(run="post->base", site="resid_post").values,
                               back["patched"].sel(site="resid_post").values, atol=1e-6)
    assert [f.finding for f in res.findings] == ["knowledge storage unchanged"]
    f = res.findings[0]
    assert set(f.figures) == {"heatmap_correlation", "cross_correlation", "cross_transfer", "reverse_cross_correlation",
                              "reverse_cross_transfer", "delta_correlation", "max_abs_binned_diff"}
    # three pairs: fewer than the verdict's minimum, whatever the numbers say
    assert f.verdict == "inconclusive" and "kept pairs" in f.reason
    assert f.interval is not None and {"null_upper", "ceiling", "reliability_base", "reliability_post"} <= set(f.controls)
    assert comp["controls"]["maps"]["correlation"] == pytest.approx(comp["correlation"])
    # the binned difference heatmap is stored, and its largest change per token group is summarised
    binned = ds["binned_difference_post_base_resid_post"].values
    assert np.nanmax(np.abs(binned)) == pytest.approx(f.figures["max_abs_binned_diff"])
    for key in ("heatmap_resid_post", "heatmap_attn_out", "heatmap_mlp_out", "attribution"):
        assert res.figures[key].stat().st_size > 1000
    assert set(summary["summary"]["attribution_correlation"]) == {"base", "post", "base->post", "post->base"}
    raw = summary["summary"]["attribution_correlation_raw"]["post"]["resid_post"]
    assert raw is not None and raw > 0.5


def test_the_study_prompts_zero_shot_when_few_shot_is_off(monkeypatch, tmp_path):
    from types import SimpleNamespace

    seen = []
    monkeypatch.setattr(kn, "run_knowledge", lambda *a, **kw: seen.append(kw["shots"]))

    def ctx(shots):
        return SimpleNamespace(group=None, dataset=lambda role, study: tmp_path / "pairs.csv", out=tmp_path,
                               datasets={"shots": shots}, device="cpu", all_models=lambda: {})

    given = tmp_path / "shots.json"
    kn._run_study(ctx(None), kn.KnowledgeConfig())
    kn._run_study(ctx(given), kn.KnowledgeConfig())
    kn._run_study(ctx(None), kn.KnowledgeConfig(few_shot=False))
    assert seen == ["auto", given, None]


def test_cli_knowledge(group_dirs, tmp_path, tiny_dir):
    from typer.testing import CliRunner

    from mechdiff.cli import app

    runner = CliRunner()
    r = runner.invoke(app, ["analyze", "knowledge", "--help"])
    assert r.exit_code == 0 and "DESCRIPTION" in r.output and "EXAMPLES" in r.output
    assert "--normalisation" in r.output and "--control-model" in r.output
    base, post = group_dirs
    csv = tmp_path / "pairs.csv"
    make_pairs([3, 3], seed=9).to_csv(csv, index=False)
    out = tmp_path / "out"
    args = ["analyze", "knowledge", "--base", str(base), "--post", str(post), "--pairs", str(csv), "--out", str(out),
            "--sites", "resid_post", "--no-attribution"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "findings" in r.output and "results:" in r.output
    saved = json.loads((out / "knowledge" / "summary.json").read_text())
    assert [f["finding"] for f in saved["findings"]] == ["knowledge storage unchanged"]
    # bad input: a clear message, exit code 2, nothing written
    other = tiny_dir("llama", n_layers=2, vocab_size=600)
    r = runner.invoke(app, args[:5] + [str(other)] + args[6:] + ["--out", str(tmp_path / "bad")])
    assert r.exit_code == 2 and "different tokenizers" in r.output
    assert not (tmp_path / "bad").exists()
    bad = tmp_path / "bad.csv"
    make_pairs([3], seed=9).assign(false_statement="w10").to_csv(bad, index=False)
    r = runner.invoke(app, args[:7] + [str(bad)] + args[8:])
    assert r.exit_code == 2 and "equal token length" in r.output
    r = runner.invoke(app, args + ["--normalisation", "nie", "--out", str(tmp_path / "bad2")])
    assert r.exit_code == 2 and "normalisation 'nie'" in r.output and not (tmp_path / "bad2").exists()
    r = runner.invoke(app, args + ["--n-bootstrap", "0", "--out", str(tmp_path / "bad3")])
    assert r.exit_code == 2 and "n_bootstrap must be at least 1" in r.output
