"""The real-model tier: SmolLM2-135M-Instruct (a Llama-architecture chat model, Q4_1 GGUF dequantized to float32).

Tiny random models prove the engine's plumbing; this file proves it on weights that were trained: massive
residual activations, a real BPE tokenizer and chat template, and facts the model knows. Run with
``pytest -m real_model``; the model comes from ``.ci/fetch-smollm2`` (or ``$MECHDIFF_SMOLLM2_GGUF``), and every
test here skips with that command in its reason when the file is not there. The model loads once per session.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mechdiff import open_store
from mechdiff.engine.batching import PromptTemplate, tokenize
from mechdiff.engine.data import PromptSet
from mechdiff.engine.extract import CaptureSpec, extract
from mechdiff.engine.sites import SITES

pytestmark = pytest.mark.real_model

DATA = Path(__file__).parent / "data"
N_LAYERS, D_MODEL, D_MLP, VOCAB = 30, 576, 1536, 49152
RTOL = 1e-4  # fp32 captures vs HF's own: max |difference| / max |reference|, per site
FP16_EPS = 2.0 ** -11  # fp16 rounding: half an ulp relative to the value

# user turns of mixed lengths (the chat template adds ~27 tokens around each)
PROMPTS = [
    "Hi!",
    "What is the capital of France?\nAnswer briefly.",
    "Name three primary colours.",
    "Write a haiku about autumn leaves falling on a quiet river at dusk, and explain its imagery in one sentence.",
    "Is 17 a prime number?",
    "Translate 'good morning' into Spanish, French and German, then say which of the three you find easiest to "
    "pronounce and why, in no more than two sentences.",
]


# -- references: HF's own forward, one unpadded example at a time ----------------------------------------


def _reference(lm, ids: list[int]) -> dict[str, torch.Tensor]:
    """{site: [layer, seq, width]} from hooks installed here by hand on the HF modules, plus ``hidden``
    (HF's ``output_hidden_states``, [layer + 1, seq, d])."""
    model = lm.model
    layers = model.model.layers
    got: dict[tuple[str, int], torch.Tensor] = {}
    handles = []

    def first(x):
        return x[0] if isinstance(x, tuple) else x

    for l, layer in enumerate(layers):
        def pre(mod, args, kwargs, l=l):
            got[("resid_pre", l)] = (args[0] if args else kwargs["hidden_states"])[0].detach().clone()

        handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(layer.register_forward_hook(lambda m, a, o, l=l: got.__setitem__(("resid_post", l), first(o)[0].clone())))
        handles.append(layer.self_attn.register_forward_hook(lambda m, a, o, l=l: got.__setitem__(("attn_out", l), first(o)[0].clone())))
        handles.append(layer.mlp.register_forward_hook(lambda m, a, o, l=l: got.__setitem__(("mlp_out", l), first(o)[0].clone())))
        handles.append(layer.mlp.down_proj.register_forward_pre_hook(lambda m, a, l=l: got.__setitem__(("mlp_act", l), a[0][0].clone())))
    try:
        with torch.no_grad():
            out = model(input_ids=torch.tensor([ids]), output_hidden_states=True, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    ref = {s: torch.stack([got[(s, l)] for l in range(len(layers))]) for s in SITES}
    ref["hidden"] = torch.stack(out.hidden_states)[:, 0]
    ref["logits"] = out.logits[0]
    return ref


@pytest.fixture(scope="module")
def chat_ids(smollm2):
    template = PromptTemplate("chat")
    return tokenize(smollm2.tokenizer, [template.apply(p, smollm2.tokenizer) for p in PROMPTS], add_special_tokens=False)


@pytest.fixture(scope="module")
def references(smollm2, chat_ids):
    return [_reference(smollm2, ids) for ids in chat_ids]


def test_the_gguf_loads_as_the_model_it_is(smollm2, smollm2_gguf):
    lm = smollm2
    a = lm.adapter
    assert (a.arch, a.n_layers, a.d_model, a.d_mlp, a.vocab_size) == ("llama", N_LAYERS, D_MODEL, D_MLP, VOCAB)
    prov = lm.provenance()
    import hashlib

    h = hashlib.sha256(smollm2_gguf.read_bytes()).hexdigest()
    assert prov["weights_hash"] == f"sha256:{h}"  # the file's own sha256 (what sha256sum prints)
    assert prov["gguf_quantization"] == "Q4_1" and prov["gguf_file"] == smollm2_gguf.name and prov["format"] == "gguf"
    assert prov["dtype"] == "float32" and all(p.dtype == torch.float32 for p in lm.model.parameters())
    # dequantized into plain Linear weights: what hooks, weight reads and interventions work on
    assert type(lm.model.model.layers[0].mlp.down_proj) is torch.nn.Linear
    # it is the trained model: it knows a capital
    ids = lm.tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        nxt = lm.model(**ids).logits[0, -1].argmax()
    assert lm.tokenizer.decode(nxt).strip() == "Paris"


def test_reference_hooks_agree_with_hf_hidden_states(references):
    # the hand-installed hooks read what HF reports: resid_pre[l] = hidden_states[l], resid_post[l] =
    # hidden_states[l + 1] for all but the last layer, and the residual adds up inside each block
    for ref in references:
        torch.testing.assert_close(ref["resid_pre"], ref["hidden"][:-1], rtol=0, atol=0)
        torch.testing.assert_close(ref["resid_post"][:-1], ref["hidden"][1:-1], rtol=0, atol=0)
        recon = ref["resid_pre"] + ref["attn_out"] + ref["mlp_out"]
        scale = ref["resid_post"].abs().max()
        assert float((recon - ref["resid_post"]).abs().max() / scale) < 1e-5


def _store_vs_reference(ds, chat_ids, references):
    """Per site: (max |store - reference|, that over max |reference|, and the worst fp16-rounding ratio)."""
    out = {}
    width = ds.sizes["position"]
    longest = max(len(x) for x in chat_ids)
    assert list(ds["n_tokens"].values) == [len(x) for x in chat_ids]
    for site in SITES:
        arr = ds[site].values  # [example, layer, position, width]
        m = {"abs": 0.0, "rel": 0.0, "tok_rel": 0.0, "padded_rel": 0.0, "fp16_ulp": 0.0}
        for i, ids in enumerate(chat_ids):
            n = len(ids)
            got = arr[i, :, width - n:, :].astype(np.float64)  # positions are counted from each example's end
            assert np.isnan(arr[i, :, : width - n]).all()  # the slots before a shorter example's start
            ref = references[i][site].double().numpy()
            diff = np.abs(got - ref)
            scale = np.abs(ref).max()
            m["abs"] = max(m["abs"], float(diff.max()))
            m["rel"] = max(m["rel"], float(diff.max() / scale))
            # against each token's own vector (massive activations do not hide the quiet tokens' errors)
            tok_scale = np.abs(ref).max(axis=-1, keepdims=True)
            m["tok_rel"] = max(m["tok_rel"], float((diff / tok_scale).max()))
            if n < longest:  # the rows that really were padded
                m["padded_rel"] = max(m["padded_rel"], float(diff.max() / scale))
            # fp16 rounding: within half an ulp of the value (plus the fp32 noise of the batched forward)
            m["fp16_ulp"] = max(m["fp16_ulp"], float((diff / (np.abs(ref) * FP16_EPS + RTOL * tok_scale)).max()))
        out[site] = m
    return out


@pytest.mark.parametrize("side", ["left", "right"])
def test_captures_at_every_site_equal_hf_with_padding(smollm2, chat_ids, references, side, tmp_path, record_property):
    lm = smollm2
    ps = PromptSet.from_texts(PROMPTS)
    results = {}
    # the fp16 store once (left padding, the harder case): each extraction is a forward pass, and this tier has a budget
    for dtype in ("float32", "float16") if side == "left" else ("float32",):
        spec = CaptureSpec(sites=SITES, layers="all", positions="all", template="chat", dtype=dtype, compression=None)
        url = str(tmp_path / f"{dtype}.zarr")
        # one batch holding every prompt: the short ones padded (on `side`) up to the longest
        extract(lm, ps, spec, url, "m/d", token_budget=1 << 16, shard_size=len(PROMPTS), padding_side=side, progress=False)
        ds = open_store(url, "m/d")
        assert ds.attrs["capture"].template.spec == "chat" and str(ds.attrs["capture"].positions) == "all"
        results[dtype] = _store_vs_reference(ds, chat_ids, references)
    line = {s: {"fp32_abs": results["float32"][s]["abs"], "fp32_rel": results["float32"][s]["rel"],
                "fp32_token_rel": results["float32"][s]["tok_rel"], "fp32_padded_rows_rel": results["float32"][s]["padded_rel"]}
            for s in SITES}
    if "float16" in results:
        for s in SITES:
            f16 = results["float16"][s]
            line[s].update(fp16_abs=f16["abs"], fp16_rel=f16["rel"], fp16_half_ulp_ratio=f16["fp16_ulp"])
    record_property("captures", json.dumps(line))
    print(f"\npadding {side}: " + json.dumps(line))
    for s in SITES:
        f32 = results["float32"][s]
        assert f32["rel"] < RTOL and f32["tok_rel"] < RTOL, (side, s, f32)
        if "float16" in results:  # the fp16 store: the fp32 value rounded, nothing more
            assert results["float16"][s]["fp16_ulp"] <= 1.0, (side, s, results["float16"][s])


def test_last_layer_resid_post_is_the_block_output_before_the_final_norm(smollm2, references):
    # HF's last hidden state has the final norm applied; the captured (and reference) last resid_post is the raw
    # output of the last block, and the final norm of it is HF's last hidden state and gives its logits
    lm = smollm2
    for ref in references:
        last = ref["resid_post"][-1]
        assert float((last - ref["hidden"][-1]).abs().max()) > 1.0  # they really differ
        normed = lm.adapter.final_norm(last[None])[0]
        torch.testing.assert_close(normed, ref["hidden"][-1], rtol=1e-5, atol=1e-5)
        with torch.no_grad():
            logits = lm.model.lm_head(normed[None])[0]
        torch.testing.assert_close(logits, ref["logits"], rtol=1e-4, atol=1e-4)


# -- positions: the tokens a person would point at ----------------------------------------------------------

POSITION_PROMPTS = [
    "Question: Is 17 a prime number?\nAnswer with one word.",
    "Question: Which is heavier, a kilogram of feathers or a kilogram of iron?\nAnswer with one word.",
    "Question: What colour is the sky?\nAnswer with one word.",
]
# SmolLM2's template after the user's text: "<|im_end|>\n<|im_start|>assistant\n" ("assistant" is two BPE tokens)
POST_INSTRUCTION = ["<|im_end|>", "\n", "<|im_start|>", "ass", "istant", "\n"]
FROM_ANSWER = ["Answer", " with", " one", " word", "."] + POST_INSTRUCTION


@pytest.fixture(scope="module")
def position_refs(smollm2):
    """resid_post at layers 0, 14 and 29 of each position prompt, by HF's own forward (one each, shared)."""
    template = PromptTemplate("chat")
    texts = [template.apply(p, smollm2.tokenizer) for p in POSITION_PROMPTS]
    ids = tokenize(smollm2.tokenizer, texts, add_special_tokens=False)
    return ids, [_reference(smollm2, row)["resid_post"][[0, 14, 29]] for row in ids]


@pytest.mark.parametrize(
    "positions, expected",
    [("post_instruction", POST_INSTRUCTION), ("from:Answer", FROM_ANSWER), ("from:<|im_start|>assistant", POST_INSTRUCTION[2:])],
    ids=["post_instruction", "from_Answer", "from_assistant_header"],
)
def test_positions_land_on_the_template_tokens(smollm2, position_refs, positions, expected, tmp_path, record_property):
    lm = smollm2
    tok = lm.tokenizer
    spec = CaptureSpec(sites=("resid_post",), layers=(0, 14, 29), positions=positions, template="chat", dtype="float32")
    url = str(tmp_path / "p.zarr")
    extract(lm, PromptSet.from_texts(POSITION_PROMPTS), spec, url, "m/d", shard_size=8, padding_side="left", progress=False)
    ds = open_store(url, "m/d")
    ids = ds["token_ids"].values
    assert list(ds["n_positions"].values) == [len(expected)] * len(POSITION_PROMPTS)
    template = PromptTemplate("chat")
    for i, text in enumerate(POSITION_PROMPTS):
        row = [int(t) for t in ids[i] if t >= 0]
        kept = row[len(row) - len(expected):]
        decoded = [tok.decode([t]) for t in kept]
        record_property(f"{positions}[{i}]", json.dumps(decoded))
        assert decoded == expected, (positions, i, decoded)
        # and the activations stored there are the model's at those tokens (layers 0, 14 and the last)
        assert row == position_refs[0][i]
        ref = position_refs[1][i][:, len(row) - len(expected):]
        got = torch.from_numpy(ds["resid_post"].values[i])
        assert float((got - ref).abs().max() / ref.abs().max()) < RTOL
        # the kept text is the end of the rendered template, character for character
        assert template.apply(text, tok).endswith("".join(decoded))
    print(f"\n{positions}: {json.dumps(expected)}")


# -- a truth direction in real statements -----------------------------------------------------------------


def _split(countries: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Deterministic splits by country (a country's true and false statement stay together): every fourth
    country is held out; of the rest, every third is the validation fold that picks the layer."""
    names = list(dict.fromkeys(countries.tolist()))  # in file order
    k = np.asarray([names.index(c) for c in countries])
    held = k % 4 == 3
    val = ~held & (k % 3 == 0)
    return ~held & ~val, val, held


def test_truth_direction_in_capital_statements(smollm2, tmp_path, record_property):
    from mechdiff.analyses.directions import Probe, mean_diff_sums
    from mechdiff.engine.data import load_prompts

    lm = smollm2
    ps = load_prompts(DATA / "capitals.csv")
    assert len(ps) >= 100
    spec = CaptureSpec(sites=("resid_post",), layers="all", positions="last:2", template="none", dtype="float16")
    url = str(tmp_path / "truth.zarr")
    extract(lm, ps, spec, url, "m/capitals", shard_size=64, progress=False)
    ds = open_store(url, "m/capitals")
    y = ds["label"].values.astype(bool)
    assert y.sum() == (~y).sum()
    train, val, held = _split(ds["country"].values)
    assert not (train & held).any() and not (val & held).any() and held.sum() >= 30

    def probe_accuracies(fit_rows, eval_rows):
        """Held-out accuracy per (layer, position) of the difference-of-means probe fitted on ``fit_rows``."""
        sums = mean_diff_sums(ds, "resid_post", "label", rows=fit_rows)
        direction = sums.diff  # [layer, position, hidden]
        X = ds["resid_post"].values.astype(np.float64)  # [example, layer, position, hidden]
        acc = np.zeros(direction.shape[:2])
        for l in range(direction.shape[0]):
            for p in range(direction.shape[1]):
                probe = Probe.fit(X[fit_rows, l, p], y[fit_rows], direction[l, p])
                acc[l, p] = probe.accuracy(X[eval_rows, l, p], y[eval_rows])
        return acc

    val_acc = probe_accuracies(train, val)
    # the layer and position are chosen on the validation fold; the held-out countries are read once, after
    l, p = np.unravel_index(np.argmax(val_acc), val_acc.shape)
    fit = train | val
    held_acc = probe_accuracies(fit, held)
    positions = [int(x) for x in ds["position"].values]
    record_property("truth_held_out_acc_by_layer", json.dumps({str(pos): [round(a, 3) for a in held_acc[:, j]] for j, pos in enumerate(positions)}))
    record_property("truth_val_acc_by_layer", json.dumps({str(pos): [round(a, 3) for a in val_acc[:, j]] for j, pos in enumerate(positions)}))
    print(f"\nval acc by layer (position {positions}):\n{np.round(val_acc.T, 2)}\nheld-out:\n{np.round(held_acc.T, 2)}"
          f"\nbest layer {l} position {positions[p]}: val {val_acc[l, p]:.3f}, held-out {held_acc[l, p]:.3f} "
          f"({int(held.sum())} held-out statements, {int(fit.sum())} fitted)")
    assert held_acc[l, p] >= 0.85
    # a direction, not an artefact: with shuffled labels the same probe is at chance on the held-out rows
    rng = np.random.default_rng(0)
    y_true = y.copy()
    y[:] = rng.permutation(y_true)
    try:
        null = probe_accuracies(fit, held)[l, p]
    finally:
        y[:] = y_true
    assert null < 0.75


def test_cli_checks_a_gguf_model_before_its_weights_load(smollm2_gguf, tmp_path):
    # --model DIR --gguf-file NAME: the config and tokenizer come from the GGUF header, so a bad layer range or
    # a missing marker is refused in seconds, before the weights are dequantized
    from typer.testing import CliRunner

    from mechdiff.cli import app

    data = tmp_path / "d.csv"
    data.write_text("text\nHello there.\nGood morning.\n")
    base = ["extract", "--model", str(smollm2_gguf.parent), "--gguf-file", smollm2_gguf.name, "--data", str(data),
            "--out", str(tmp_path / "s.zarr")]
    r = CliRunner().invoke(app, base + ["--layers", "0,30"])
    assert r.exit_code == 2 and "30" in r.output and "layer" in r.output.lower(), r.output
    r = CliRunner().invoke(app, base + ["--positions", "from:Answer"])
    assert r.exit_code == 2 and "Answer" in r.output and "not found" in r.output, r.output
    assert not (tmp_path / "s.zarr").exists()


# -- knowledge patching on real statements: where the fact sits, layer by layer ---------------------------

# Few-shot labelling prompt as the zoo's truth_prompt builds it ("<statement> This statement is: <label>" per
# shot, then the statement), but with lower-case labels: SmolLM2's tokenizer splits " TRUE" / " FALSE" into
# " TR" + "UE" / " F" + "AL" + "SE", and with those first tokens its TRUE - FALSE margin is noise (measured:
# mean -0.05 logits over 24 pairs, half of them the wrong sign); " true" / " false" are one token each.
KNOWLEDGE_SHOTS = [
    ("The city of Berlin is in Germany.", 1), ("The city of Madrid is in Brazil.", 0),
    ("The city of Cairo is in Egypt.", 1), ("The city of Toronto is in Italy.", 0),
    ("The city of Lisbon is in Portugal.", 1), ("The city of Athens is in Sweden.", 0),
    ("The city of Dublin is in Ireland.", 1), ("The city of Vienna is in Japan.", 0),
]
KNOWLEDGE_MIN_GAP = 0.3  # logits, ld_true - ld_false: the pairs the model separates (the study's min_gap idea)
KNOWLEDGE_SWEEP = 4  # pairs in the layer x position sweep (the best separated): each is ~225 resumed variants


def _knowledge_prompt(statement: str, topic: str) -> str:
    from mechdiff.zoo.templates import TRUTH_SUFFIX

    lines = [f"{s}{TRUTH_SUFFIX} {('false', 'true')[label]}" for s, label in KNOWLEDGE_SHOTS]
    return "\n".join(lines + [statement + TRUTH_SUFFIX])


def test_knowledge_patching_moves_from_changed_to_final_tokens(smollm2, record_property):
    """Du et al. 2025 (after Marks & Tegmark): patching the true statement's residual stream into the false
    run matters at the changed (subject / object) token in early and middle layers, and at the final tokens in
    late layers; tokens that are neither carry (almost) nothing."""
    import time

    from mechdiff.analyses.knowledge import ROLES, PairError, load_pairs, prepare_pairs
    from mechdiff.engine.patching import exact_patching

    lm = smollm2
    t0 = time.perf_counter()
    df = load_pairs(DATA / "knowledge_cities.csv")
    keep = []
    for i in range(len(df)):  # equal token length under this tokenizer, pair by pair
        try:
            prepare_pairs(lm.tokenizer, df.iloc[[i]], prompt=_knowledge_prompt)
            keep.append(i)
        except PairError:
            pass
    assert len(df) - len(keep) >= 1  # the file's one unequal pair (" Osaka" is two tokens) is refused
    assert len(keep) >= 12, f"only {len(keep)} of {len(df)} pairs have equal token lengths"
    df = df.iloc[keep].reset_index(drop=True)
    pairs = prepare_pairs(lm.tokenizer, df, prompt=_knowledge_prompt, tokenizer_hash=lm.tokenizer_hash)
    assert [lm.tokenizer.decode([int(a)]) for a in pairs.answers[0]] == [" true", " false"]

    # the readout first: the model's own logit(true) - logit(false) on the true and the false statements
    # (exact patching's clean and corrupted runs; patching only the last layer makes that nearly free)
    screen = exact_patching(lm, None, pairs, sites="resid_post", layers=[N_LAYERS - 1], mask=pairs.mask("statement"))
    gap = screen["ld_true"].values - screen["ld_false"].values
    separated = np.nonzero(gap > KNOWLEDGE_MIN_GAP)[0]
    readout = {"mean_gap": float(gap.mean()), "frac_positive": float((gap > 0).mean()),
               "n_separated": int(len(separated)), "gaps": [round(float(g), 3) for g in gap]}
    record_property("knowledge_readout", json.dumps(readout))
    print(f"\nreadout: {json.dumps(readout)}")
    # a weak readout (a 135M model, gaps under a logit) but not noise: most pairs ordered the right way
    assert readout["frac_positive"] >= 0.7 and readout["mean_gap"] > 0.1, readout
    assert len(separated) >= KNOWLEDGE_SWEEP, readout

    sweep_idx = separated[np.argsort(-gap[separated], kind="stable")][:KNOWLEDGE_SWEEP]
    sub = pairs.subset(sweep_idx)
    ds = exact_patching(lm, None, sub, sites="resid_post", layers="all", mask=sub.mask("statement"))
    eff = ds["effect"].sel(site="resid_post").values  # [pair, layer, position], 0 = false run, 1 = true run
    role = ds["role"].values  # [pair, position]
    n_pair, n_layer, _ = eff.shape
    changed = role == ROLES.index("object")  # the differing span (the city in subject pairs, the country else)
    final = np.zeros_like(changed)
    final[:, -3:] = True
    statement = role != ROLES.index("context")
    first = np.zeros_like(changed)  # the statement's first tokens ("The city of"): before any change
    downstream = np.zeros_like(changed)  # after the first changed token, neither changed nor final
    for i in range(n_pair):
        s = np.nonzero(statement[i])[0]
        first[i, s[:3]] = True
        lo = int(np.nonzero(changed[i])[0].min())
        downstream[i, lo:] = ~changed[i, lo:] & ~final[i, lo:]
    assert not (first & (changed | final)).any() and downstream.any(axis=1).all()

    def profile(mask: np.ndarray) -> np.ndarray:
        """Per layer: the largest effect over the group's tokens, averaged over pairs."""
        return np.array([np.mean([np.max(eff[i, l, mask[i]]) for i in range(n_pair)]) for l in range(n_layer)])

    prof = {name: profile(m) for name, m in
            (("changed", changed), ("final", final), ("first", first), ("downstream", downstream))}
    peak = {name: int(np.argmax(p)) for name, p in prof.items()}
    top = {name: float(np.max(p)) for name, p in prof.items()}
    wall = time.perf_counter() - t0
    result = {"pairs": [f"{sub.true_prompts[i].splitlines()[-1]} | {sub.false_prompts[i].splitlines()[-1]}"
                        for i in range(n_pair)],
              "peak_layer": peak, "peak_effect": {k: round(v, 3) for k, v in top.items()},
              "profiles": {k: [round(float(x), 3) for x in p] for k, p in prof.items()},
              "patching_s": round(float(ds.attrs["seconds"]), 1), "test_s": round(wall, 1),
              "execution": ds.attrs["execution"]}
    record_property("knowledge_patching", json.dumps(result))
    print(f"knowledge patching: {json.dumps(result)}")
    assert np.isfinite(eff[statement.reshape(n_pair, 1, -1).repeat(n_layer, 1)]).all()
    # clearly non-zero: patching the changed token at the first layers restores most of the true run, and
    # the last token at the last layer restores it all (the metric is read there)
    assert top["changed"] > 0.5 and top["final"] > 0.5, top
    # the ordering: the changed tokens peak early, the final tokens late
    assert peak["changed"] < peak["final"], peak
    assert prof["changed"][: n_layer // 3].mean() > prof["final"][: n_layer // 3].mean()
    assert prof["final"][-n_layer // 3:].mean() > prof["changed"][-n_layer // 3:].mean()
    # controls, same sweep: tokens before the change (identical in both runs: exactly no effect) and the tokens
    # after it that are neither changed nor final carry much less than either group
    assert top["first"] < 0.05 and top["downstream"] < 0.5 * min(top["changed"], top["final"]), top


def test_refusal_on_a_model_that_does_not_refuse_is_inconclusive(smollm2, tmp_path, record_property):
    """SmolLM2-135M-Instruct answers harmful requests like harmless ones: there is no refusal to find a direction
    for, so the refusal study must end "inconclusive" (and spend no time searching), whatever the cosines say.
    The model is its own partner here, under the plain template and under its chat template: the
    template-matched comparison of a model with itself reaches cosine 1, the template alone moves it."""
    import time

    from mechdiff.analyses.common import ModelGroup
    from mechdiff.analyses.refusal import run_refusal

    t0 = time.perf_counter()
    path = smollm2.model_id
    group = ModelGroup("smol", path, (path,))
    res = run_refusal(group, DATA / "refusal_harmful.csv", DATA / "refusal_harmless.csv", tmp_path,
                      n_val=4, n_eval=8, max_new_tokens=8, store_dtype="float32", n_bootstrap=300,
                      lms={"base": smollm2, "post": smollm2})
    (f,) = res.findings
    s = res.summary
    result = {"verdict": f.verdict, "reason": f.reason, "refuses": s["refuses"],
              "cosines": {k: round(c["cosine"], 3) for k, c in s["comparisons"]["base vs post"].items()},
              "test_s": round(time.perf_counter() - t0, 1)}
    record_property("refusal", json.dumps(result))
    print(f"\nrefusal: {json.dumps(result)}")
    assert f.verdict == "inconclusive" and "no refusal to compare" in f.reason, f.reason
    assert all(r["low"] <= 0.0 for r in s["refuses"].values()), s["refuses"]
    assert not any(c["selected"] for c in s["chosen"].values())  # nothing searched, nothing steered
    comps = s["comparisons"]["base vs post"]
    assert comps["under base's template"]["cosine"] == pytest.approx(1.0)
    assert comps["under post's template"]["cosine"] == pytest.approx(1.0)
    # harmful completions are answers, kept for inspection with their prompts
    harmful = s["completions"]["post"]["harmful"]
    assert len(harmful) == 8 and all(c["completion"].strip() for c in harmful)
    assert sum(c["refusal"] for c in harmful) <= 2  # a stray "I'm sorry for your loss" may match a phrase
