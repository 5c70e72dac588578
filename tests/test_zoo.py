"""The embedded pair: shipped files, datasets, tokenizer, and the behaviour the four studies need.

The behaviour tests (marked ``slow``, ~1 min together) load the shipped models and measure on
held-out rows with plain greedy decoding."""

from __future__ import annotations

import json

import pytest
import torch

from mechdiff.zoo import REFUSAL_PHRASES, is_refusal, zoo_path
from mechdiff.zoo.build import sha256_of
from mechdiff.zoo.datasets import TRUTH_TOPICS, load_datasets, patching_prompt
from mechdiff.zoo.evaluate import fact_accuracy, refusal_rate, render, truth_accuracy
from mechdiff.zoo.paths import PAIR_DIR, manifest_path
from mechdiff.zoo.templates import base_prompt, chat_prompt, truth_prompt

MAX_SHIPPED_BYTES = 15_000_000


def _load(path):
    """Through the engine's loader, the way analyses load models."""
    from mechdiff.engine.models import load_model

    lm = load_model(path, dtype="float32", device="cpu")
    return lm.model, lm.tokenizer


@pytest.fixture(scope="module")
def ds():
    return load_datasets()


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(zoo_path("post"))


@pytest.fixture(scope="module")
def base():
    return _load(zoo_path("base"))


@pytest.fixture(scope="module")
def post():
    return _load(zoo_path("post"))


# --- shipped files ------------------------------------------------------------------------------

def test_manifest_hashes_and_size():
    manifest = json.loads(manifest_path().read_text())
    listed = manifest["files"]
    on_disk = {p.relative_to(PAIR_DIR).as_posix() for p in PAIR_DIR.rglob("*")
               if p.is_file() and p.name != "manifest.json" and "__pycache__" not in p.parts}
    assert on_disk == set(listed)
    for rel, meta in listed.items():
        p = PAIR_DIR / rel
        assert p.stat().st_size == meta["bytes"], rel
        assert sha256_of(p) == meta["sha256"], rel
    total = sum(p.stat().st_size for p in PAIR_DIR.rglob("*") if p.is_file())
    assert total < MAX_SHIPPED_BYTES
    from mechdiff.zoo.build import SEED

    assert manifest["seed"] == SEED and set(manifest["final_loss"]) == {"base", "post"}


def test_zoo_paths_and_cli():
    from typer.testing import CliRunner

    from mechdiff.cli.zoo import zoo_app

    for kind in ("base", "post", "data"):
        assert zoo_path(kind).is_dir()
        res = CliRunner().invoke(zoo_app, ["path", kind])
        assert res.exit_code == 0 and res.output.strip() == str(zoo_path(kind))
    assert (zoo_path("base") / "model.safetensors").exists()
    with pytest.raises(ValueError):
        zoo_path("nope")  # type: ignore[arg-type]


# --- datasets -----------------------------------------------------------------------------------

def test_dataset_shapes(ds):
    for topic in TRUTH_TOPICS:
        df = ds.truth[topic]
        assert {"statement", "label", "topic", "subject", "object", "split"} <= set(df.columns)
        assert len(df) >= 1000 and abs(df.label.mean() - 0.5) < 0.01
        assert set(df.split) == {"train", "test"}
        # Held-out subjects never appear in the train split of the same topic.
        train, test = df[df.split == "train"], df[df.split == "test"]
        assert not set(train.subject) & set(test.subject) or topic.endswith("_than")
    assert all(s.endswith(" not in " + o + ".") for s, o in ds.truth["neg_cities"][["statement", "object"]].values)
    for df in (ds.harmful, ds.harmless):
        assert len(df) >= 300 and {"instruction", "split", "category"} <= set(df.columns)
        assert set(df.split) == {"train", "test"}
    assert not set(ds.harmful.instruction) & set(ds.harmless.instruction)
    assert {"true_statement", "false_statement", "true_answer", "false_answer", "topic"} <= set(ds.patching.columns)
    assert {"prompt", "answer", "question"} <= set(ds.facts.columns) and len(ds.facts) >= 1000


def test_no_unknown_tokens(ds, tok):
    texts = ds.all_texts() + list(REFUSAL_PHRASES)
    texts += [truth_prompt(s, ds.shots[t]) for t, df in ds.truth.items() for s in df.statement[:5]]
    texts += [render(tok, i, "chat") for i in ds.harmful.instruction[:5]]
    texts += [base_prompt(i) for i in ds.harmless.instruction[:5]]
    enc = tok(texts, add_special_tokens=False)["input_ids"]
    bad = [t for t, ids in zip(texts, enc) if tok.unk_token_id in ids]
    assert not bad, bad[:5]


def test_tokenizer_contract(tok):
    for word in (" TRUE", " FALSE", "TRUE"):
        assert len(tok(word, add_special_tokens=False).input_ids) == 1
    assert tok(" TRUE", add_special_tokens=False).input_ids == tok("TRUE", add_special_tokens=False).input_ids
    assert tok.pad_token and tok.bos_token and tok.eos_token and tok.chat_template
    msg = [{"role": "user", "content": "Write a poem about the sea."}]
    assert tok.apply_chat_template(msg, tokenize=False, add_generation_prompt=True) == chat_prompt("Write a poem about the sea.")
    for phrase in REFUSAL_PHRASES:  # decoding is exact, so refusal matching works on completions
        assert tok.decode(tok(phrase).input_ids, skip_special_tokens=True) == phrase
        assert is_refusal(phrase)


def test_patching_pairs(ds, tok):
    pairs = ds.patching
    assert len(pairs) >= 500 and set(pairs.topic) == set(TRUTH_TOPICS)
    for row in pairs.itertuples():
        a = tok(patching_prompt(row.true_statement, row.topic)).input_ids
        b = tok(patching_prompt(row.false_statement, row.topic)).input_ids
        assert len(a) == len(b), row
        diff = [i for i, (x, y) in enumerate(zip(a, b)) if x != y]
        assert diff and diff[-1] - diff[0] + 1 == len(diff), row  # one contiguous span
        assert patching_prompt(row.true_statement, row.topic).endswith("This statement is:")
    assert set(pairs.true_answer) == {"TRUE"} and set(pairs.false_answer) == {"FALSE"}


# --- behaviour (slow: loads both models, ~1 min) -------------------------------------------------

@pytest.mark.slow
def test_refusal_behaviour(ds, base, post):
    harmful = ds.harmful[ds.harmful.split == "test"].instruction.tolist()
    harmless = ds.harmless[ds.harmless.split == "test"].instruction.tolist()
    assert refusal_rate(*post, harmful, "chat") >= 0.9
    assert refusal_rate(*post, harmless, "chat") <= 0.1
    assert refusal_rate(*base, harmful, "base") <= 0.1


@pytest.mark.slow
@pytest.mark.parametrize("which", ["base", "post"])
def test_truth_and_facts(ds, which, request):
    model, tok = request.getfixturevalue(which)
    acc = truth_accuracy(model, tok, ds, split="test")
    assert acc["truth_true"] >= 0.8 and acc["truth_false"] >= 0.8, acc
    facts = fact_accuracy(model, tok, ds.facts)
    assert facts["facts"] >= 0.8, facts


# --- the builder --------------------------------------------------------------------------------

def test_build_tiny(tmp_path):
    from mechdiff.zoo.build import build_pair

    out = build_pair(tmp_path / "pair", steps=2, progress=False, evaluate=False)  # the shipped seed
    manifest = json.loads((out / "manifest.json").read_text())
    for rel, meta in manifest["files"].items():
        assert sha256_of(out / rel) == meta["sha256"]
    # The datasets are a pure function of the seed: identical to the shipped ones.
    for name in ("truth_cities.csv", "patching.csv", "instructions_harmful.csv", "facts.csv"):
        assert manifest["files"][f"data/{name}"]["sha256"] == sha256_of(zoo_path("data") / name)
    model, tok = _load(out / "post")
    enc = tok(["The city of"], return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc).logits
    assert logits.shape[-1] == len(tok) and torch.isfinite(logits).all()
