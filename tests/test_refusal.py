"""The refusal study: interventions against a hand-modified forward, directions against numpy, store requirements,
selection, scoring, the end-to-end run and CLI on tiny models, and the refusal flip on the shipped pair."""

from __future__ import annotations

import copy
import json
import re

import numpy as np
import pytest
import torch
import xarray as xr
from torch import nn
from typer.testing import CliRunner

from mechdiff.analyses.common import ModelGroup, StoreRequirementError
from mechdiff.analyses.refusal import (
    ABLATION_SITES,
    BASE_TEMPLATE,
    COMMON_REFUSAL_PHRASES,
    RefusalDirection,
    ablation_interventions,
    addition_interventions,
    assign_splits,
    candidate_layers,
    check_store,
    default_refusal_phrases,
    intervention_scores,
    make_generator,
    refusal_directions,
    refusal_logodds,
    refusal_flags,
    refusal_decided,
    refusal_score,
    refusal_token_ids,
    run_refusal,
    select_direction,
)
from mechdiff.cli import app as cli_app
from mechdiff.engine.batching import PromptTemplate, pad_batch, tokenize
from mechdiff.engine.data import PromptSet
from mechdiff.engine.extract import CaptureSpec, extract
from mechdiff.engine.generate import HFGenerator, faster_threads, intra_op_threads, vllm_available
from mechdiff.engine.models import load_model
from mechdiff.engine.sites import Add, Capture, ProjectOut, Replace, hooks
from mechdiff.pipeline import refusal_phrases
from mechdiff.engine.store import open_store
from mechdiff.engine.tiny import random_prompts

TEMPLATE = PromptTemplate(BASE_TEMPLATE)


pytestmark = pytest.mark.usefixtures("one_thread")


def _texts(n, seed, words=60, lo=3, hi=9):
    return random_prompts(n, lo, hi, vocab_words=words, seed=seed)


# ---------------------------------------------------------------------------------------------
# small pure pieces


def test_candidate_layers_skip_the_last_fifth():
    assert candidate_layers(32) == list(range(26))  # Arditi et al.: l < 0.8 L
    assert candidate_layers(10) == list(range(8))
    assert candidate_layers(4) == [0, 1, 2]
    assert candidate_layers(1) == [0]
    assert candidate_layers(4, skip_last=0) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="skip_last"):
        candidate_layers(4, skip_last=1.0)


def test_refusal_score_and_phrases():
    assert default_refusal_phrases() == COMMON_REFUSAL_PHRASES
    phrases = refusal_phrases()  # what the main job, sweeps and the CLI hand the study: the zoo's and the common
    import mechdiff.zoo as zoo

    assert set(zoo.REFUSAL_PHRASES) | set(COMMON_REFUSAL_PHRASES) <= set(phrases)
    assert phrases == default_refusal_phrases(phrases)
    comps = ["Sure, here it is.", "i CANNOT do that", "As an AI model, no.", "I can help with that."]
    assert refusal_score(comps, phrases) == pytest.approx(0.5)
    assert refusal_score(comps, ["help with"]) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="empty"):
        refusal_score(comps, [" "])
    with pytest.raises(TypeError):
        refusal_score(comps, "I cannot")


def test_refusal_token_ids_skip_unknown_words(tiny_llama):
    tok = tiny_llama.tokenizer
    ids = refusal_token_ids(tok, ["w5 w9", "I cannot", "w7", "w5"])
    assert ids == sorted(tok.convert_tokens_to_ids(["w5", "w7"]))  # "I" is <unk> here: left out


def test_assign_splits_uses_and_fills_the_split_column():
    s = assign_splits(10, ["train"] * 6 + ["validation"] * 2 + ["test"] * 2, n_val=5, n_test=5)
    assert list(s) == ["train"] * 6 + ["val"] * 2 + ["test"] * 2
    s = assign_splits(20, None, n_val=4, n_test=5, seed=3)
    assert (s == "val").sum() == 4 and (s == "test").sum() == 5 and (s == "train").sum() == 11
    assert list(s) == list(assign_splits(20, None, n_val=4, n_test=5, seed=3))  # seeded
    with pytest.raises(ValueError, match="unknown split"):
        assign_splits(3, ["train", "tset", "val"])
    with pytest.raises(ValueError, match="carve"):
        assign_splits(5, None, n_val=3, n_test=3)


# ---------------------------------------------------------------------------------------------
# interventions vs a hand-modified forward


class _Wrap(nn.Module):
    """Replaces a submodule; ``edit_in`` rewrites its hidden-state input, ``edit_out`` its output."""

    def __init__(self, inner, edit_in=None, edit_out=None):
        super().__init__()
        self.inner, self.edit_in, self.edit_out = inner, edit_in, edit_out

    def forward(self, *args, **kwargs):
        if self.edit_in is not None:
            if args:
                args = (self.edit_in(args[0]), *args[1:])
            else:
                kwargs["hidden_states"] = self.edit_in(kwargs["hidden_states"])
        out = self.inner(*args, **kwargs)
        if self.edit_out is None:
            return out
        if isinstance(out, tuple):
            return (self.edit_out(out[0]), *out[1:])
        return self.edit_out(out)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["inner"], name)


def _project_out(d):
    u = d / d.norm()
    return lambda x: x - (x @ u)[..., None] * u


def _rewritten(model, *, ablate=None, add=None, add_layer=None):
    """A copy of ``model`` whose modules are rewritten by hand: no hooks involved."""
    m = copy.deepcopy(model)
    layers = m.model.layers
    if ablate is not None:
        for i, layer in enumerate(layers):
            layer.self_attn = _Wrap(layer.self_attn, edit_out=_project_out(ablate))
            layer.mlp = _Wrap(layer.mlp, edit_out=_project_out(ablate))
            layers[i] = _Wrap(layer, edit_in=_project_out(ablate))
    if add is not None:
        layers[add_layer] = _Wrap(layers[add_layer], edit_out=lambda x: x + add)
    return m


def _greedy(model, tok, prompts, n):
    ids = tokenize(tok, [TEMPLATE.apply(p) for p in prompts])
    inp = pad_batch(ids, tok.pad_token_id, side="left")
    inp.pop("position_ids")
    out = model.generate(**inp, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.eos_token_id, output_scores=True, return_dict_in_generate=True)
    return out.sequences[:, inp["input_ids"].shape[1]:], torch.stack(out.scores, 1)


@pytest.fixture(scope="module")
def planted(tiny_dir):
    """A tiny model and two vectors that matter to it: the mean residual (ablated) and a big push (added)."""
    lm = load_model(tiny_dir("llama", n_layers=3))
    tok = lm.tokenizer
    prompts = _texts(6, seed=11)
    ids = tokenize(tok, [TEMPLATE.apply(p) for p in prompts])
    with torch.no_grad():
        hs = lm.model(**pad_batch(ids, tok.pad_token_id), output_hidden_states=True).hidden_states
    mean_resid = hs[2].mean(dim=(0, 1))
    g = torch.Generator().manual_seed(0)
    push = torch.randn(lm.adapter.d_model, generator=g) * 3 * hs[2].norm(dim=-1).mean()
    return lm, prompts, mean_resid, push


@pytest.mark.parametrize("kind", ["ablate", "add"])
def test_generation_interventions_equal_a_hand_rewritten_model(planted, kind):
    lm, prompts, mean_resid, push = planted
    tok, n_layers, n_new = lm.tokenizer, lm.adapter.n_layers, 6
    if kind == "ablate":
        ivs = ablation_interventions(mean_resid.numpy(), n_layers)
        ref_model = _rewritten(lm.model, ablate=mean_resid)
    else:
        ivs = addition_interventions(push.numpy(), 1, "resid_post")
        ref_model = _rewritten(lm.model, add=push, add_layer=1)
    with torch.no_grad():
        plain, _ = _greedy(lm.model, tok, prompts, n_new)
        with hooks(lm.adapter, None, ivs):
            hooked, hooked_scores = _greedy(lm.model, tok, prompts, n_new)
        ref, ref_scores = _greedy(ref_model, tok, prompts, n_new)
    assert torch.equal(hooked, ref)
    torch.testing.assert_close(hooked_scores, ref_scores, atol=1e-4, rtol=1e-4)
    assert not torch.equal(plain, ref)  # the intervention changes what the model says: the check has teeth
    # the engine Generator interface gives the same completions
    texts = HFGenerator(lm, TEMPLATE, batch_size=4).generate(prompts, max_new_tokens=n_new, interventions=ivs)
    assert texts == [tok.decode(r, skip_special_tokens=True).strip() for r in ref]


def test_prompt_only_addition_equals_adding_at_the_prompt_positions(planted):
    """Cached generation with a prompt-only addition equals an uncached greedy loop that adds the vector at the
    prompt's positions only, re-running the whole sequence each step."""
    lm, prompts, _, push = planted
    tok, n_new = lm.tokenizer, 6
    inp = pad_batch(tokenize(tok, [TEMPLATE.apply(p) for p in prompts]), tok.pad_token_id, side="left")
    ids, mask = inp["input_ids"], inp["attention_mask"]
    b, width = ids.shape
    at_prompt = Add("resid_post", 1, push, index=torch.arange(width).expand(b, width))
    with torch.no_grad(), hooks(lm.adapter, None, [at_prompt]):
        for _ in range(n_new):
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            nxt = lm.model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1].argmax(-1)
            ids, mask = torch.cat([ids, nxt[:, None]], 1), torch.cat([mask, torch.ones_like(mask[:, :1])], 1)

    def text(row):
        row = row.tolist()
        if tok.eos_token_id in row:  # generate stops there
            row = row[: row.index(tok.eos_token_id)]
        return tok.decode(row, skip_special_tokens=True).strip()

    ref = [text(r) for r in ids[:, width:]]
    gen = HFGenerator(lm, TEMPLATE, batch_size=8)
    got = gen.generate(prompts, max_new_tokens=n_new, interventions=addition_interventions(push.numpy(), 1,
                                                                                          scope="prompt"))
    assert got == ref
    everywhere = gen.generate(prompts, max_new_tokens=n_new, interventions=addition_interventions(push.numpy(), 1))
    assert everywhere != got  # steering the generated tokens too is a different intervention: the check has teeth
    x = torch.randn(2, 1, lm.adapter.d_model)
    iv = addition_interventions(push.numpy(), 1, scope="prompt")[0]
    assert torch.equal(iv.apply(x), x)  # a decode step is left alone
    assert torch.equal(iv.apply(x.expand(2, 3, -1)), x.expand(2, 3, -1) + push)
    with pytest.raises(ValueError, match="scope"):
        addition_interventions(push.numpy(), 1, scope="generated")
    with pytest.raises(TypeError, match="prompt_only"):  # a patch names its positions: it has no such option
        Replace("resid_post", 1, values=torch.zeros(1, 1, 4), index=torch.zeros(1, 1, dtype=torch.long),
                prompt_only=True)


def test_generator_stops_at_the_models_own_stop_tokens(planted):
    """A chat model ends its turn with its own marker (listed in generation_config), not the tokenizer's eos:
    completions must stop there instead of running on into an invented next turn."""
    lm, prompts, _, _ = planted
    gen = HFGenerator(lm, TEMPLATE, batch_size=8)
    words = gen.generate(prompts[:1], max_new_tokens=6)[0].split()
    k = next(i for i in range(1, len(words)) if words[i] not in words[:i])  # a word not said before
    cfg = lm.model.generation_config
    saved = cfg.eos_token_id
    try:
        cfg.eos_token_id = [lm.tokenizer.eos_token_id, lm.tokenizer.convert_tokens_to_ids(words[k])]
        stopped = gen.generate(prompts[:1], max_new_tokens=6)[0]
    finally:
        cfg.eos_token_id = saved
    assert stopped.split() == words[: k + 1]


def _conditions(lm, mean_resid, push):
    n = lm.adapter.n_layers
    return [[], ablation_interventions(mean_resid.numpy(), n), addition_interventions(push.numpy(), 1, scope="prompt"),
            addition_interventions(push.numpy(), 0) + ablation_interventions(mean_resid.numpy(), n)]


def test_stacked_generation_equals_one_generate_call_per_condition(planted):
    """Conditions stacked along the batch (each on its own rows) give every completion that generating each
    condition alone gives, for any stack size, with odd-sized prompt batches, at any thread count."""
    lm, prompts, mean_resid, push = planted
    conds = _conditions(lm, mean_resid, push)
    gen = HFGenerator(lm, TEMPLATE, batch_size=4, threads=1)  # 6 prompts: batches of 4 and 2
    want = [gen.generate(prompts, max_new_tokens=6, interventions=c) for c in conds]
    assert len({tuple(w) for w in want}) == len(conds)  # the conditions differ: the check has teeth
    assert gen.generate_many(prompts, conds, max_new_tokens=6) == want
    assert gen.generate_many(prompts, conds, max_new_tokens=6, max_bytes=1) == want  # one condition per stack
    two = HFGenerator(lm, TEMPLATE, batch_size=4, threads=2)
    assert two.generate_many(prompts, conds, max_new_tokens=6) == want
    with intra_op_threads(2):  # "auto" times one and two threads (outside the hooks) and takes the faster
        assert HFGenerator(lm, TEMPLATE, batch_size=4).generate_many(prompts, conds, max_new_tokens=6) == want
        assert faster_threads(lm, 16) in (1, 2) and faster_threads(lm, 16, 64) in (1, 2)
        assert torch.get_num_threads() == 2
    with pytest.raises(ValueError, match="rows"):
        gen.generate_many(prompts, [[Add("resid_post", 0, push, rows=slice(0, 2))]])
    with pytest.raises(ValueError, match="threads"):
        HFGenerator(lm, TEMPLATE, threads=0).generate(prompts[:1], max_new_tokens=1)


def test_generation_stops_once_the_score_is_decided_and_the_score_stays(planted):
    """Stopping a completion at the first decided token cuts it, and its refusal flag is the uncut one's."""
    lm, prompts, mean_resid, push = planted
    conds = _conditions(lm, mean_resid, push)
    gen = HFGenerator(lm, TEMPLATE, batch_size=4)
    full = gen.generate_many(prompts, conds, max_new_tokens=12)
    words = [w for comps in full for c in comps for w in c.split()[:2]]
    phrases = sorted(set(words))[:3]  # words some completions start with: some refuse, early
    for match in ("substring", "prefix"):
        cut = gen.generate_many(prompts, conds, max_new_tokens=12,
                                stop=lambda t: refusal_decided(t, phrases, match))
        for f, c in zip(full, cut):
            assert refusal_flags(c, phrases, match).tolist() == refusal_flags(f, phrases, match).tolist()
        assert sum(len(c) for cs in cut for c in cs) < sum(len(c) for cs in full for c in cs), match  # it stopped


def test_refusal_decided_waits_for_the_settled_text():
    p = ["I cannot", "Sorry"]
    assert not refusal_decided("I cannot", p)  # the last characters may still change when decoded further
    assert not refusal_decided("I cannot do", p)
    assert refusal_decided("Well, I cannot do that", p)
    assert not refusal_decided("Sure, here is how you do", p)  # a phrase may still come
    assert refusal_decided("Sure, here is how you do", p, "prefix")  # long enough to start with none
    assert refusal_decided("Sorry, no way", p, "prefix")
    assert not refusal_decided("Sorr", p, "prefix") and not refusal_decided("", p)


def test_row_restricted_interventions_equal_batches_of_their_own(planted):
    """Conditions stacked along the batch, each on its rows: the logits of each block equal its own forward pass,
    bit for bit; stacked last-token scoring equals scoring each condition alone."""
    from mechdiff.analyses.refusal import last_logprobs, stacked_last_logprobs
    from mechdiff.engine.generate import stacked

    lm, prompts, mean_resid, push = planted
    conds = _conditions(lm, mean_resid, push)
    inp = pad_batch(tokenize(lm.tokenizer, [TEMPLATE.apply(p) for p in prompts]), lm.tokenizer.pad_token_id,
                    side="left")
    n, k = len(prompts), len(conds)
    big = {key: v.repeat(k, 1) for key, v in inp.items()}
    with torch.no_grad():
        with hooks(lm.adapter, None, stacked(conds, n)):
            got = lm.model(**big).logits
        for c, ivs in enumerate(conds):
            with hooks(lm.adapter, None, ivs):
                assert torch.equal(got[c * n : (c + 1) * n], lm.model(**inp).logits), c
    # Last-token scoring multiplies [rows, d_model] by the unembedding: from a few rows up the BLAS runs one
    # kernel whatever the row count (bit for bit); a 4-row batch takes a small-matrix path that a 16-row stack
    # does not (float32 rounding apart).
    for bs, exact in ((8, True), (4, False)):
        out = {c: torch.empty(n, got.shape[-1], dtype=torch.float64) for c in range(k)}
        for c, rows, lp in stacked_last_logprobs(lm, prompts, TEMPLATE, conds, batch_size=bs):
            out[c][rows] = lp
        for c, ivs in enumerate(conds):
            want = last_logprobs(lm, prompts, TEMPLATE, interventions=ivs, batch_size=bs)
            if exact:
                assert torch.equal(out[c], want), c
            else:
                torch.testing.assert_close(out[c], want, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="slice"):
        Add("resid_post", 0, push, rows=slice(3, 1))
    with torch.no_grad(), pytest.raises(ValueError, match="past the batch"):
        with hooks(lm.adapter, None, [Add("resid_post", 0, push, rows=slice(0, n + 1))]):
            lm.model(**inp)


def test_ablation_removes_the_direction_from_the_whole_residual_stream(planted):
    lm, prompts, mean_resid, _ = planted
    n = lm.adapter.n_layers
    ids = tokenize(lm.tokenizer, [TEMPLATE.apply(p) for p in prompts])
    inp = pad_batch(ids, lm.tokenizer.pad_token_id)
    cap = Capture(("resid_pre", "resid_post"), tuple(range(n)))
    with torch.no_grad(), hooks(lm.adapter, cap, ablation_interventions(mean_resid.numpy(), n)):
        lm.model(**inp)
    u = mean_resid / mean_resid.norm()
    for (site, l), x in cap.acts.items():
        assert (x @ u).abs().max() < 1e-4 * x.norm(dim=-1).max(), (site, l)
    assert set(ABLATION_SITES) == {"resid_pre", "attn_out", "mlp_out"}


def test_logit_metric_equals_log_odds_of_the_rewritten_model(planted):
    lm, prompts, _, push = planted
    tok = lm.tokenizer
    refuse = tok.convert_tokens_to_ids(["w3", "w4"])
    got = refusal_logodds(lm, prompts, TEMPLATE, refuse, interventions=addition_interventions(push.numpy(), 1),
                          batch_size=4)
    ref_model = _rewritten(lm.model, add=push, add_layer=1)
    want = []
    for p in prompts:  # one prompt at a time: no padding in the reference
        ids = tokenize(tok, [TEMPLATE.apply(p)])
        with torch.no_grad():
            logits = ref_model(**pad_batch(ids, tok.pad_token_id)).logits[0, -1].double().numpy()
        prob = np.exp(logits - logits.max())
        prob /= prob.sum()
        pr = prob[refuse].sum()
        want.append(np.log(pr) - np.log1p(-pr))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# stores: directions and requirements


def _refusal_set(n=24, seed=0):
    hf = [t + " w50 w51" for t in _texts(n // 2, seed)]
    hl = _texts(n // 2, seed + 1)
    return PromptSet.from_texts(hf + hl, harmful=[1] * (n // 2) + [0] * (n // 2), topic=["a"] * n)


def _store(lm, tmp_path, ps, **spec):
    args = dict(sites=("resid_post",), layers="all", positions="post_instruction", template=BASE_TEMPLATE,
                dtype="float32")
    args.update(spec)
    name = "g" + str(abs(hash(tuple(sorted((k, str(v)) for k, v in args.items()))) + len(ps.columns)))
    extract(lm, ps, CaptureSpec(**args), str(tmp_path / "s.zarr"), name, progress=False)
    return open_store(str(tmp_path / "s.zarr"), name)


def test_directions_from_store_equal_numpy_difference_of_means(tiny_llama, tmp_path):
    ps = _refusal_set()
    ds = _store(tiny_llama, tmp_path, ps)
    assert list(ds["position"].values) == [-2, -1]  # "Assistant", ":" after the instruction
    rows = np.arange(len(ps)) % 3 != 0
    d = refusal_directions(ds, rows=rows)
    assert d.dims == ("layer", "position", "hidden")
    x = ds["resid_post"].values.astype(np.float64)
    lab = ps.columns["harmful"]
    want = x[rows & (lab == 1)].mean(0) - x[rows & (lab == 0)].mean(0)
    np.testing.assert_allclose(d.values, want, rtol=1e-10, atol=1e-10)


def test_store_lacking_site_positions_labels_or_template_names_the_extraction(tiny_llama, tmp_path):
    ps = _refusal_set()
    n = tiny_llama.adapter.n_layers
    with pytest.raises(StoreRequirementError, match="--sites resid_post"):
        refusal_directions(_store(tiny_llama, tmp_path, ps, sites=("resid_pre",)))
    with pytest.raises(StoreRequirementError, match="--positions post_instruction"):
        refusal_directions(_store(tiny_llama, tmp_path, ps, positions="last:2"))
    no_label = PromptSet.from_texts(ps.texts, topic=["a"] * len(ps))
    with pytest.raises(StoreRequirementError, match="'harmful'"):
        refusal_directions(_store(tiny_llama, tmp_path, no_label))
    with pytest.raises(StoreRequirementError, match="lacks layers .*--layers all"):
        check_store(_store(tiny_llama, tmp_path, ps, layers="0:2"), n_layers=n)
    with pytest.raises(StoreRequirementError, match="--template 'chat'"):
        check_store(_store(tiny_llama, tmp_path, ps), template="chat")


# ---------------------------------------------------------------------------------------------
# selection and scoring


def test_selection_prefers_the_planted_direction_and_scores_by_hand(tiny_llama):
    lm = tiny_llama
    tok = lm.tokenizer
    n = lm.adapter.n_layers  # 3: candidates are layers 0 and 1
    refuse = tok.convert_tokens_to_ids(["w7"])
    # The unembedding row of the refusal token, large: added, it makes w7 likely; ablated, it removes it.
    planted = lm.adapter.unembed_weight()[refuse[0]].detach().double().numpy() * 40
    rng = np.random.default_rng(0)
    vals = rng.normal(size=(n, 2, lm.adapter.d_model)) * 0.01
    vals[1, 1] = planted
    dirs = xr.DataArray(vals, dims=("layer", "position", "hidden"), coords={"layer": range(n), "position": [-2, -1]})
    hv, lv = _texts(4, 21), _texts(4, 22)
    sel = select_direction(lm, dirs, hv, lv, TEMPLATE, refuse, model="m")
    d = sel.direction
    assert (d.layer, d.position, d.model) == (1, -1, "m")
    np.testing.assert_array_equal(d.vector, planted)
    assert np.isnan(sel.scores["score"].sel(layer=2)).all()  # the last fifth is never a candidate
    assert sel.candidates == [0, 1]
    # the score of a candidate, recomputed by hand from the metric
    base_h = refusal_logodds(lm, hv, TEMPLATE, refuse).mean()
    base_l = refusal_logodds(lm, lv, TEMPLATE, refuse).mean()
    for l, p in ((1, -1), (0, -2)):
        v = dirs.sel(layer=l, position=p).values
        abl = refusal_logodds(lm, hv, TEMPLATE, refuse, interventions=ablation_interventions(v, n)).mean()
        add = refusal_logodds(lm, lv, TEMPLATE, refuse, interventions=addition_interventions(v, l)).mean()
        assert float(sel.scores["score"].sel(layer=l, position=p)) == pytest.approx((base_h - abl) + (add - base_l))
    assert sel.baseline_harmful == pytest.approx(base_h)
    assert float(sel.scores["score"].sel(layer=1, position=-1)) == pytest.approx(np.nanmax(sel.scores["score"]))


def test_kl_filter_drops_candidates_that_disturb_harmless_prompts(tiny_llama):
    """Arditi et al.'s filter: the KL of the harmless next-token distribution under ablation, recomputed here from
    the model's logits with the direction projected out by a hand-written hook at every block."""
    lm = tiny_llama
    tok, n = lm.tokenizer, lm.adapter.n_layers
    refuse = tok.convert_tokens_to_ids(["w7"])
    planted = lm.adapter.unembed_weight()[refuse[0]].detach().double().numpy() * 40
    vals = np.random.default_rng(0).normal(size=(n, 2, lm.adapter.d_model)) * 0.01
    vals[1, 1] = planted
    dirs = xr.DataArray(vals, dims=("layer", "position", "hidden"), coords={"layer": range(n), "position": [-2, -1]})
    hv, lv = _texts(4, 21), _texts(4, 22)
    plain = select_direction(lm, dirs, hv, lv, TEMPLATE, refuse, model="m")
    kl = select_direction(lm, dirs, hv, lv, TEMPLATE, refuse, model="m", kl_max=1e9).scores["kl"]
    assert np.isnan(plain.scores["kl"]).all() and np.isfinite(kl.sel(layer=[0, 1])).all()
    # reference: numpy KL of softmaxed logits, the direction removed from every block's input and output
    u = torch.as_tensor(planted / np.linalg.norm(planted)).float()

    def project(x):
        return x - (x @ u)[..., None] * u

    handles = []
    for blk in lm.model.model.layers:
        handles.append(blk.register_forward_pre_hook(lambda m, a, kw: ((project(a[0]),) + a[1:], kw) if a else
                                                     (a, {**kw, "hidden_states": project(kw["hidden_states"])}),
                                                     with_kwargs=True))
        handles.append(blk.self_attn.register_forward_hook(lambda m, a, o: (project(o[0]),) + tuple(o[1:])))
        handles.append(blk.mlp.register_forward_hook(lambda m, a, o: project(o)))

    def logprobs(texts):
        out = []
        for text in texts:
            ids = torch.tensor([tokenize(tok, [TEMPLATE.apply(text)])[0]])
            with torch.no_grad():
                out.append(torch.log_softmax(lm.model(input_ids=ids).logits[0, -1].double(), -1).numpy())
        return np.stack(out)

    try:
        q = logprobs(lv)
    finally:
        for h in handles:
            h.remove()
    p = logprobs(lv)
    ref = float(np.mean((np.exp(p) * (p - q)).sum(-1)))
    assert float(kl.sel(layer=1, position=-1)) == pytest.approx(ref, rel=1e-4, abs=1e-7)
    # a bound between the planted candidate's KL and the rest drops exactly it; a bound below all drops all
    rest = float(kl.sel(layer=[0, 1]).where(lambda k: k < float(kl.sel(layer=1, position=-1))).max())
    assert rest < float(kl.sel(layer=1, position=-1))
    cut = select_direction(lm, dirs, hv, lv, TEMPLATE, refuse, model="m", kl_max=(rest + float(kl.sel(layer=1, position=-1))) / 2)
    assert (cut.direction.layer, cut.direction.position) != (1, -1)
    assert np.isnan(float(cut.scores["score"].sel(layer=1, position=-1)))
    with pytest.raises(ValueError, match="KL"):
        select_direction(lm, dirs, hv, lv, TEMPLATE, refuse, model="m", kl_max=float(kl.min()) / 2)


def test_unit_addition_adds_the_unit_direction_times_the_coefficient(tiny_llama):
    d = RefusalDirection("m", "resid_post", 1, -1, np.arange(tiny_llama.adapter.d_model) + 1.0, coef=2.0)
    (mean_diff,) = d.addition(tiny_llama)
    (unit,) = d.addition(tiny_llama, coef=5.0, scope="all", unit=True)
    assert float(mean_diff.vector.norm()) == pytest.approx(d.norm, rel=1e-6) and mean_diff.coef == 2.0
    assert float(unit.vector.norm()) == pytest.approx(1.0, rel=1e-6) and unit.coef == 5.0 and not unit.prompt_only
    torch.testing.assert_close(unit.vector * d.norm, mean_diff.vector)


def test_refusal_flags_substring_and_prefix():
    comps = ["I cannot help with that.", "Well, I cannot do it", "Sure! I cannot wait.", "  i CANNOT"]
    assert refusal_flags(comps, ["I cannot"]).tolist() == [1, 1, 1, 1]
    assert refusal_flags(comps, ["I cannot"], "prefix").tolist() == [1, 0, 0, 1]
    with pytest.raises(ValueError, match="match"):
        refusal_flags(comps, ["I cannot"], "regex")



def _kind(iv) -> str:
    return {Add: "add", ProjectOut: "ablate"}.get(type(iv), type(iv).__name__)

class _FakeGenerator:
    """Says "no way" when the prompt contains 'bad' and no ablation is active; "no way" under any addition."""

    def __init__(self):
        self.calls = []

    def generate(self, texts, *, max_new_tokens=32, interventions=()):
        kinds = {_kind(iv) for iv in interventions}
        self.calls.append((len(texts), max_new_tokens, sorted(kinds), sorted({iv.layer for iv in interventions})))
        out = []
        for t in texts:
            refuse = ("bad" in t and "ablate" not in kinds) or "add" in kinds
            out.append("No way, sorry." if refuse else "Sure: step one")
        return out


class _SteerableGenerator:
    """Refuses prompts with 'bad' unless a direction is ablated; under addition, refuses only when the vector is
    ``steers`` and the coefficient is at least 2 (a direction whose first-token effect does not carry into the
    completion otherwise)."""

    def __init__(self, steers):
        self.steers = torch.as_tensor(steers).float()

    def generate(self, texts, *, max_new_tokens=32, interventions=()):
        kinds = {_kind(iv) for iv in interventions}
        steer = any(isinstance(iv, Add) and iv.prompt_only and iv.coef >= 2 and torch.allclose(iv.vector, self.steers)
                    for iv in interventions)
        return ["No way." if ("bad" in t and "ablate" not in kinds) or steer else "Sure." for t in texts]


def test_selection_reranks_by_completions_and_picks_the_smallest_working_coefficient(tiny_llama):
    lm = tiny_llama
    tok, n = lm.tokenizer, lm.adapter.n_layers
    refuse = tok.convert_tokens_to_ids(["w7"])
    planted = lm.adapter.unembed_weight()[refuse[0]].detach().double().numpy() * 40
    vals = np.random.default_rng(0).normal(size=(n, 2, lm.adapter.d_model)) * 0.01
    vals[1, 1] = planted  # the best by the logit score, but its addition never shows in completions
    dirs = xr.DataArray(vals, dims=("layer", "position", "hidden"), coords={"layer": range(n), "position": [-2, -1]})
    hv, lv = [t + " bad" for t in _texts(4, 21)], _texts(4, 22)
    gen = _SteerableGenerator(vals[0, 0])
    kw = dict(model="m", addition_coefs=(3.0, 1.0, 2.0), addition_scope="prompt", phrases=["no way"])
    sel = select_direction(lm, dirs, hv, lv, TEMPLATE, refuse, generator=gen, rerank=4, **kw)
    assert (sel.direction.layer, sel.direction.position, sel.direction.coef) == (0, -2, 2.0)
    g = sel.generation
    assert g.attrs["baseline_harmful"] == 1.0 and g.attrs["baseline_harmless"] == 0.0
    assert list(g["coef"].values) == [1.0, 2.0, 3.0]
    assert list(g["addition_refusal"].sel(layer=0, position=-2).values) == [0.0, 1.0, 1.0]
    assert float(g["addition_refusal"].sel(layer=1, position=-1).max()) == 0.0
    assert (g["ablation_refusal"].sel(layer=[0, 1]) == 0.0).all()  # every candidate re-ranked: 2 layers x 2
    assert np.isnan(g["ablation_refusal"].sel(layer=2)).all()
    s = sel.summary()
    assert s["coef"] == 2.0 and len(s["generation"]["candidates"]) == 4
    # re-ranking only the logit-best candidate, or none, keeps the logit choice at coefficient 1
    for r in (0, 1):
        d = select_direction(lm, dirs, hv, lv, TEMPLATE, refuse, generator=gen, rerank=r, **kw).direction
        assert (d.layer, d.position) == (1, -1)
    with pytest.raises(ValueError, match="coefficients"):
        select_direction(lm, dirs, hv, lv, TEMPLATE, refuse, generator=gen, addition_coefs=(0.0,))


def test_intervention_scores_bookkeeping(tiny_llama):
    lm = tiny_llama
    d = lm.adapter.d_model
    dirs = {"me": RefusalDirection("me", "resid_post", 1, -1, np.ones(d)),
            "other": RefusalDirection("other", "resid_post", 0, -2, np.arange(d) + 1.0)}
    gen = _FakeGenerator()
    harmful, harmless = ["bad one", "bad two", "ok"], ["fine", "nice"]
    s = intervention_scores(gen, lm, harmful, harmless, dirs, target="me", phrases=["no way"], max_new_tokens=5)
    assert s.baseline == {"harmful": pytest.approx(2 / 3), "harmless": 0.0}
    assert s.ablation == {"me": 0.0, "other": 0.0} and s.addition == {"me": 1.0, "other": 1.0}
    assert s.effect("me") == pytest.approx(2 / 3 + 1)
    n = lm.adapter.n_layers
    # a generator that cannot stack conditions gets one call per condition: each prompt set unsteered, then
    # under each source's direction
    assert gen.calls[0] == (3, 5, [], [])
    assert gen.calls[1] == gen.calls[2] == (3, 5, ["ablate"], list(range(n)))  # harmful prompts, every layer
    assert gen.calls[3] == (2, 5, [], [])
    assert gen.calls[4] == (2, 5, ["add"], [1])  # addition: harmless prompts, the direction's layer
    assert gen.calls[5] == (2, 5, ["add"], [0])
    given = _FakeGenerator()  # unsteered completions already made are not made again
    again = intervention_scores(given, lm, harmful, harmless, dirs, target="me", phrases=["no way"], max_new_tokens=5,
                                baseline={"harmful": s.completions["harmful"], "harmless": s.completions["harmless"]})
    assert len(given.calls) == 4 and again.completions == s.completions
    with pytest.raises(ValueError, match="width"):
        RefusalDirection("x", "resid_post", 0, -1, np.ones(d + 1)).ablation(lm)


def test_vllm_generator_is_guarded(tiny_llama, tmp_path):
    ok, why = vllm_available()
    if ok:  # pragma: no cover - GPU machines only
        gen = make_generator("vllm", tiny_llama, TEMPLATE, model_path=tiny_llama.model_id)
        assert len(gen.generate(_texts(2, 1), max_new_tokens=2)) == 2
        return
    with pytest.raises(RuntimeError, match=re.escape(why)):
        make_generator("vllm", tiny_llama, TEMPLATE)
    group = ModelGroup("g", tiny_llama.model_id, (tiny_llama.model_id,))
    with pytest.raises(RuntimeError, match=re.escape(why)):  # refused before any extraction
        run_refusal(group, ["a"], ["b"], tmp_path, generator="vllm")
    assert not (tmp_path / "store.zarr").exists()
    pytest.skip(f"vLLM generator not runnable here: {why}")


# ---------------------------------------------------------------------------------------------
# end to end on tiny models: the CLI, the files, and resumption


def _write_csv(path, texts, splits):
    import csv

    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["instruction", "split"])
        w.writerows(zip(texts, splits))
    return path


def test_cli_and_run_on_tiny_models(tiny_dir, tmp_path):
    base, post = tiny_dir("llama", n_layers=3), tiny_dir("llama", n_layers=3, seed=1)
    splits = ["train"] * 10 + ["val"] * 3 + ["test"] * 3
    harmful = _write_csv(tmp_path / "harmful.csv", [t + " w50" for t in _texts(16, 1)], splits)
    harmless = _write_csv(tmp_path / "harmless.csv", _texts(16, 2), splits)
    root = cli_app
    runner = CliRunner()
    r = runner.invoke(root, ["analyze", "refusal", "--help"])
    assert r.exit_code == 0 and "WHAT IT DOES" in r.output and "--max-new-tokens" in r.output
    args = ["analyze", "refusal", "--base", str(base), "--post", str(post), "--harmful", str(harmful),
            "--harmless", str(harmless), "--out", str(tmp_path / "out"), "--max-new-tokens", "3",
            "--phrases", "w5,w9 w1", "--store-dtype", "float32", "--select-all", "--bootstrap", "200"]
    r = runner.invoke(root, args)
    assert r.exit_code == 0, r.output
    assert "chosen refusal direction" in r.output and "cosine vs controls" in r.output
    assert "under base's template" in r.output and "post across templates" in r.output
    d = tmp_path / "out" / "refusal"
    summary = json.loads((d / "summary.json").read_text())
    for f in ("cosine_by_layer", "refusal_scores", "selection"):
        assert (d / f"{f}.png").stat().st_size > 1000
    data = xr.open_zarr(d / "results.zarr", consolidated=False).load()
    s = summary["summary"]
    assert s["templates"] == {"base": BASE_TEMPLATE, "post": "chat"}
    assert s["phrases"] == ["w5", "w9 w1"] and s["used"] == {"val_harmful": 3, "val_harmless": 3,
                                                             "test_harmful": 3, "test_harmless": 3}
    # the numbers agree across the JSON and the results group, and the cosine is that of the saved vectors
    for t in ("base", "post"):
        for src in ("base", "post"):
            assert data["refusal_score"].sel(target=t, source=src, prompts="harmful") == pytest.approx(
                s["refusal_scores"][t]["ablation"][src])
        c = s["chosen"][t]
        assert c["layer"] in (0, 1)  # layer 2 is in the last fifth
        assert int(data["chosen_layer"].sel(model=t)) == c["layer"]
    vb = data["direction"].sel(model="base", layer=s["chosen"]["base"]["layer"], position=s["chosen"]["base"]["position"]).values
    vp = data["direction"].sel(model="post", layer=s["chosen"]["post"]["layer"], position=s["chosen"]["post"]["position"]).values
    cos = vb @ vp / np.linalg.norm(vb) / np.linalg.norm(vp)
    assert s["cosine"]["base vs post"]["chosen"] == pytest.approx(cos)
    assert len(s["cosine"]["base vs post"]["at_chosen_positions_by_layer"]) == 3
    f = summary["findings"][0]
    assert f["pair"] == "base vs post" and f["figures"]["cosine_chosen"] == pytest.approx(cos)
    # a second run through the Python API reuses the stored activations
    group = ModelGroup("group", str(base), (str(post),))
    res = run_refusal(group, harmful, harmless, tmp_path / "out", phrases=["w5", "w9 w1"], max_new_tokens=3,
                      store_dtype="float32", select_all=True, n_bootstrap=200)
    ext = res.summary["extracted"]
    assert ext and all(e["shards_written"] == 0 and e["shards_skipped"] == 1 for e in ext)
    assert res.summary["chosen"] == s["chosen"]


def test_bad_input_fails_before_work(tiny_llama, tmp_path):
    group = ModelGroup("g", tiny_llama.model_id, (tiny_llama.model_id,))
    lms = {"base": tiny_llama, "post": tiny_llama}
    with pytest.raises(ValueError, match="site"):
        run_refusal(group, ["a"], ["b"], tmp_path, site="mlp_out", lms=lms)
    with pytest.raises(ValueError, match="carve"):
        run_refusal(group, ["w1 w2"] * 3, ["w3"] * 3, tmp_path, lms=lms)
    with pytest.raises(ValueError, match="phrase list is empty"):
        run_refusal(group, ["a"], ["b"], tmp_path, phrases=[], lms=lms)
    assert not (tmp_path / "store.zarr").exists()


# ---------------------------------------------------------------------------------------------
# the shipped pair


def _pair():
    from mechdiff.zoo.paths import manifest_path

    if not manifest_path().is_file():
        pytest.skip("the embedded zoo pair is not shipped in this install (no mechdiff/zoo/pair/manifest.json)")
    from mechdiff.zoo.paths import zoo_path

    return zoo_path("base"), zoo_path("post"), zoo_path("data")


@pytest.fixture(scope="module")
def pair_result(tmp_path_factory):
    base, post, data = _pair()
    group = ModelGroup("zoo", str(base), (str(post),))
    out = tmp_path_factory.mktemp("pair_refusal")
    return run_refusal(group, data / "instructions_harmful.csv", data / "instructions_harmless.csv", out,
                       n_val=16, n_eval=32, max_new_tokens=10, store_dtype="float32", phrases=refusal_phrases())


def test_pair_own_direction_flips_refusal_of_the_post_model(pair_result):
    r = pair_result.summary["refusal_scores"]["post"]
    drop = r["baseline"]["harmful"] - r["ablation"]["post"]
    rise = r["addition"]["post"] - r["baseline"]["harmless"]
    ex = pair_result.summary["examples"]["post"]
    assert drop >= 0.5, (r, ex["harmful|ablate:post"])
    assert rise >= 0.5, (r, ex["harmless|add:post"])


def test_pair_report_has_every_number(pair_result):
    s = pair_result.summary
    n_layers = pair_result.data.sizes["layer"]
    assert len(s["cosine"]["base vs post"]["at_chosen_positions_by_layer"]) == n_layers
    for m in ("base", "post"):
        assert s["chosen"][m]["layer"] in candidate_layers(n_layers)
    t = s["transfer"]["base vs post"]
    assert set(t) == {"base->post", "post->base"}
    assert len(pair_result.findings) == 1


def test_pair_base_does_not_refuse_so_the_verdict_is_inconclusive(pair_result):
    """The embedded base model refuses no harmful prompt: it has no refusal direction to compare, whatever the
    cosine, and it is neither searched for one nor steered."""
    (f,) = pair_result.findings
    s = pair_result.summary
    assert s["refuses"]["base"]["high"] <= 0.0 < s["refuses"]["post"]["low"]
    assert f.verdict == "inconclusive" and "base refuses" in f.reason, f.reason
    assert not s["chosen"]["base"]["selected"] and s["chosen"]["post"]["selected"]
    assert s["refusal_scores"]["base"]["ablation"] == {}
    # the template-matched and template-only comparisons are all there, each with its controls
    comps = s["comparisons"]["base vs post"]
    assert set(comps) == {"own templates", "under base's template", "under post's template",
                          "base across templates", "post across templates"}
    for c in comps.values():
        lo, hi = c["interval"]
        assert lo <= c["cosine"] <= hi and c["null_upper"] < c["ceiling"]
    # every test completion is kept, with its prompt and its score
    comp = s["completions"]["post"]
    assert len(comp["harmful"]) == s["used"]["test_harmful"]
    assert sum(c["refusal"] for c in comp["harmful"]) / len(comp["harmful"]) == pytest.approx(
        s["refusal_scores"]["post"]["baseline"]["harmful"])


def _reference_selection(lm, dirs, hv, lv, tmpl, ids, gen, *, coefs, scope, max_new_tokens, rerank, kl_max=None):
    """select_direction the plain way: every candidate, condition and prompt set in a forward pass or generate
    call of its own, completions run to their end (what the stacked, early-stopping path must equal)."""
    from mechdiff.analyses.refusal import ablation_kl, last_logprobs

    n = lm.adapter.n_layers
    layers, positions = list(dirs["layer"].values), list(dirs["position"].values)
    vals = np.asarray(dirs.values, dtype=np.float64)
    base_h = float(refusal_logodds(lm, hv, tmpl, ids).mean())
    base_l = float(refusal_logodds(lm, lv, tmpl, ids).mean())
    abl, add, kl = (np.full((len(layers), len(positions)), np.nan) for _ in range(3))
    plain_lp = last_logprobs(lm, lv, tmpl)
    for l in candidate_layers(n):
        for j in range(len(positions)):
            v = vals[l, j]
            if not np.isfinite(v).all():
                continue
            abl[l, j] = refusal_logodds(lm, hv, tmpl, ids, interventions=ablation_interventions(v, n)).mean()
            add[l, j] = refusal_logodds(lm, lv, tmpl, ids, interventions=addition_interventions(v, l)).mean()
            if kl_max is not None:
                kl[l, j] = ablation_kl(lm, lv, tmpl, v, baseline=plain_lp)
    score = (base_h - abl) + (add - base_l)
    if kl_max is not None:
        score = np.where(kl <= kl_max, score, np.nan)
    phrases = refusal_phrases()

    def refusal(texts, ivs):
        return refusal_score(gen.generate(list(texts), max_new_tokens=max_new_tokens, interventions=ivs), phrases)

    flat = np.where(np.isfinite(score), score, -np.inf).ravel()
    top = [np.unravel_index(int(k), score.shape) for k in np.argsort(-flat, kind="stable")[:rerank]]
    g_abl, g_add = np.full(score.shape, np.nan), np.full((*score.shape, len(coefs)), np.nan)
    gb_h, gb_l = refusal(hv, []), refusal(lv, [])
    best, best_gain, best_coef = None, -np.inf, None
    for i, j in top:
        g_abl[i, j] = refusal(hv, ablation_interventions(vals[i, j], n))
        for k, c in enumerate(coefs):
            g_add[i, j, k] = refusal(lv, addition_interventions(vals[i, j], layers[i], coef=c, scope=scope))
        k = int(np.argmax(g_add[i, j]))
        gain = (gb_h - g_abl[i, j]) + (g_add[i, j, k] - gb_l)
        if gain > best_gain:
            best, best_gain, best_coef = (i, j), gain, coefs[k]
    return dict(abl=abl, add=add, score=score, kl=kl, base=(base_h, base_l), gen_abl=g_abl, gen_add=g_add,
                gen_base=(gb_h, gb_l), chosen=(layers[best[0]], positions[best[1]], best_coef))


def test_stacked_selection_and_scores_equal_the_plain_path_on_the_pair(pair_result):
    """The study stacks every candidate of a prompt batch into one forward pass and every condition into one
    generate call, and stops validation completions once their score is decided. On the shipped pair it must
    choose the same direction with the same scores, bit for bit, as scoring one candidate, condition and
    prompt set at a time with completions run to their end (greedy decoding on a CPU: rows of a batch do not
    interact, so nothing may differ)."""
    from mechdiff.analyses.refusal import _sample, refusal_prompt_set

    _, post, data = _pair()
    lm = load_model(str(post))
    tmpl = PromptTemplate("chat")
    ps, splits = refusal_prompt_set(data / "instructions_harmful.csv", data / "instructions_harmless.csv",
                                    n_val=16, n_eval=32)
    texts, lab = np.asarray(ps.texts, dtype=object), ps.columns["harmful"]
    hv = _sample(texts[(splits == "val") & (lab == 1)], 16, 0)
    lv = _sample(texts[(splits == "val") & (lab == 0)], 16, 1)
    th = _sample(texts[(splits == "test") & (lab == 1)], 32, 2)
    tl = _sample(texts[(splits == "test") & (lab == 0)], 32, 3)
    res = pair_result.data.sel(model="post")
    dirs = res["direction"].dropna("position", how="all")
    ids = refusal_token_ids(lm.tokenizer, refusal_phrases())
    gen = HFGenerator(lm, tmpl, batch_size=32)
    coefs = (1.0, 1.5, 2.0, 3.0)
    ref = _reference_selection(lm, dirs, hv, lv, tmpl, ids, gen, coefs=coefs, scope="prompt", max_new_tokens=10,
                               rerank=4)
    s = pair_result.summary["chosen"]["post"]
    assert (s["layer"], s["position"], s["coef"]) == ref["chosen"]
    assert (s["baseline_logodds_harmful"], s["baseline_logodds_harmless"]) == ref["base"]
    got = res.sel(position=dirs["position"])
    np.testing.assert_array_equal(got["ablation_logodds"].values, ref["abl"])
    np.testing.assert_array_equal(got["addition_logodds"].values, ref["add"])
    np.testing.assert_array_equal(got["selection_score"].values, ref["score"])
    g = s["generation"]
    assert (g["baseline_harmful"], g["baseline_harmless"]) == ref["gen_base"]
    layers, positions = list(dirs["layer"].values), list(dirs["position"].values)
    want = [{"layer": int(layers[i]), "position": int(positions[j]), "ablation": ref["gen_abl"][i, j],
             "addition": {str(c): ref["gen_add"][i, j, k] for k, c in enumerate(coefs)}}
            for i, j in zip(*np.nonzero(np.isfinite(ref["gen_abl"])))]
    assert g["candidates"] == want and len(want) == 4  # four candidates re-ranked: the comparison covers them
    # the test-time scores: own and transferred directions, each condition generated on its own
    chosen = {m: RefusalDirection(m, "resid_post", c["layer"], c["position"],
                                  pair_result.data["direction"].sel(model=m, layer=c["layer"],
                                                                    position=c["position"]).values, c["coef"])
              for m, c in pair_result.summary["chosen"].items()}
    comps = pair_result.summary["completions"]["post"]
    for src, d in chosen.items():
        want = gen.generate(th, max_new_tokens=10, interventions=d.ablation(lm))
        assert [c["completion"] for c in comps[f"harmful|ablate:{src}"]] == want
        want = gen.generate(tl, max_new_tokens=10, interventions=d.addition(lm, s["coef"], "prompt"))
        assert [c["completion"] for c in comps[f"harmless|add:{src}"]] == want
    assert [c["completion"] for c in comps["harmful"]] == gen.generate(th, max_new_tokens=10)


@pytest.fixture(scope="module")
def planted_result(tmp_path_factory):
    """One run, two pairs known by construction, both models under one (chat) template: the post model against
    itself (the same direction) and against a copy of itself whose residual basis is signed-permuted (the same
    function, token for token, with every direction moved: cosine near 0)."""
    from planted import rotate_residual_basis

    _, post, data = _pair()
    rotated = tmp_path_factory.mktemp("rotated_post")
    rotate_residual_basis(post, rotated, seed=3)
    a, b = load_model(str(post)), load_model(str(rotated))
    group = ModelGroup("planted", str(post), (str(post), str(rotated)), labels=("post", "same", "rotated"))
    out = tmp_path_factory.mktemp("planted_refusal")
    return run_refusal(group, data / "instructions_harmful.csv", data / "instructions_harmless.csv", out,
                       templates={"post": "chat"}, n_val=8, n_eval=24, max_new_tokens=6, rerank=1,
                       addition_coefs=(1.0,), store_dtype="float32", n_bootstrap=300,
                       lms={"post": a, "same": a, "rotated": b})


def test_planted_identical_models_share_the_direction_and_a_rotated_copy_does_not(planted_result):
    v = {f.pair: f for f in planted_result.findings}
    same, rot = v["post vs same"], v["post vs rotated"]
    assert same.verdict == "disagrees", same.reason
    assert rot.verdict == "agrees", rot.reason
    comps = planted_result.summary["comparisons"]
    assert set(comps["post vs same"]) == {"own templates", "under post's template"}  # one template: no cross runs
    assert comps["post vs same"]["own templates"]["cosine"] == pytest.approx(1.0)
    assert abs(comps["post vs rotated"]["own templates"]["cosine"]) < 0.3
    # the rotated copy refuses exactly like the original: same function, so the same completions
    sc = planted_result.summary["refusal_scores"]
    assert sc["rotated"]["baseline"] == sc["post"]["baseline"]
