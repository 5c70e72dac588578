"""A dataset tokenized once for every model with the same tokenizer: the key, the reuse and its spot check."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from mechdiff.engine import tokenization
from mechdiff.engine.batching import tokenize
from mechdiff.engine.capture import CaptureSpec
from mechdiff.engine.data import PromptSet
from mechdiff.engine.extract import prepare
from mechdiff.engine.models import load_model
from mechdiff.engine.tiny import build_tiny_model, random_prompts
from mechdiff.engine.tokenization import SPOT_CHECK_ROWS, Tokenization, spot_rows, tokenization_key


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tok")
    out = {
        "base": build_tiny_model(root / "base", "llama", n_layers=2, seed=0),
        "post": build_tiny_model(root / "post", "llama", n_layers=3, seed=1),  # other weights and depth
        "other": build_tiny_model(root / "other", "llama", n_layers=2, vocab_size=300, seed=2),  # other vocabulary
    }
    # a post-trained model's own chat template: the same tokenizer, another chat format
    out["chat"] = build_tiny_model(root / "chat", "llama", n_layers=2, seed=3)
    (root / "chat" / "chat_template.jinja").write_text(
        "{% for m in messages %}<|user|>{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}<|bot|>{% endif %}")
    return out


@pytest.fixture(scope="module")
def lms(models):
    return {k: load_model(str(p)) for k, p in models.items()}


PROMPTS = PromptSet(random_prompts(100, 3, 30, vocab_size=300, seed=4), source="probe.csv")
SPEC = CaptureSpec(sites=("resid_post",), layers="all", positions="last:2")


def _key(lm, spec=SPEC, prompts=PROMPTS, max_length=None, truncate=False) -> str:
    return tokenization_key(lm.tokenizer, prompts, spec.positions, spec.template,
                            max_length=max_length or lm.adapter.max_positions, truncate=truncate)


def test_the_key_is_equal_only_where_the_ids_are(lms):
    base, post, other, chat = lms["base"], lms["post"], lms["other"], lms["chat"]
    assert _key(base) == _key(post) == _key(chat)  # one tokenizer; weights, depth and chat template aside
    assert _key(base) != _key(other)  # another vocabulary
    chat_spec = CaptureSpec(sites=("resid_post",), layers="all", positions="last:2", template="chat")
    assert _key(base, chat_spec) != _key(chat, chat_spec)  # a chat prompt reads the chat template
    assert _key(base, chat_spec) == _key(post, chat_spec)
    assert _key(base) != _key(base, CaptureSpec(sites=("resid_post",), layers="all", positions="last:3"))
    assert _key(base) != _key(base, CaptureSpec(sites=("resid_post",), layers="all", positions="last:2",
                                               template="Q: {text}"))
    assert _key(base) != _key(base, max_length=20, truncate=True)
    assert _key(base) != _key(base, prompts=PromptSet(PROMPTS.texts[:-1], source="probe.csv"))
    assert _key(base) == _key(base, prompts=PromptSet(PROMPTS.texts, source="elsewhere/probe.csv"))


def test_a_reused_tokenization_equals_a_fresh_one_and_skips_the_dataset(lms, monkeypatch):
    base, post = lms["base"], lms["post"]
    first = prepare(base, PROMPTS, SPEC)
    assert not first.reused_tokens and first.tokenization_key == _key(base)
    fresh = prepare(post, PROMPTS, SPEC)
    encoded = []

    def counting(tokenizer, texts, **kw):
        encoded.extend(texts)
        return tokenize(tokenizer, texts, **kw)

    monkeypatch.setattr(tokenization, "tokenize", counting)
    got = prepare(post, PROMPTS, SPEC, reuse={first.tokenization_key: first.tokenization()})
    monkeypatch.undo()
    assert got.reused_tokens
    # the spot check only, not the 100 rows
    assert len(encoded) == len(spot_rows(100, [len(x) for x in first.token_ids])) <= SPOT_CHECK_ROWS
    assert got.token_ids == fresh.token_ids and got.counts == fresh.counts
    assert got.layers == fresh.layers == (0, 1, 2)  # the model's own depth, not the lender's
    assert got.provenance == fresh.provenance and got.arrays == fresh.arrays
    for k in fresh.coords:
        assert list(got.coords[k]) == list(fresh.coords[k])


def test_a_tokenization_under_another_key_is_not_taken(lms):
    base, other = lms["base"], lms["other"]
    first = prepare(base, PROMPTS, SPEC)
    got = prepare(other, PROMPTS, SPEC, reuse={first.tokenization_key: first.tokenization()})
    assert not got.reused_tokens
    assert got.token_ids == prepare(other, PROMPTS, SPEC).token_ids


def test_ids_the_spot_check_disproves_are_tokenized_again(lms):
    base, post = lms["base"], lms["post"]
    first = prepare(base, PROMPTS, SPEC)
    ids = [list(x) for x in first.token_ids]
    longest = max(range(len(ids)), key=lambda i: len(ids[i]))
    ids[longest][1] += 1  # one wrong id, in a row the check always reads
    forged = Tokenization(first.tokenization_key, ids, list(first.counts))
    with pytest.warns(UserWarning, match=f"example {longest} tokenizes to other ids"):
        got = prepare(post, PROMPTS, SPEC, reuse={forged.key: forged})
    assert not got.reused_tokens
    assert got.token_ids == first.token_ids
    short = Tokenization(first.tokenization_key, first.token_ids[:-1], first.counts[:-1])
    with pytest.warns(UserWarning, match="99 rows for a dataset of 100"):
        assert not prepare(post, PROMPTS, SPEC, reuse={short.key: short}).reused_tokens
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert prepare(post, PROMPTS, SPEC, reuse={first.tokenization_key: first.tokenization()}).reused_tokens


def test_spot_rows_cover_both_ends_and_the_longest():
    lengths = [5] * 1000
    lengths[637] = 90
    rows = spot_rows(1000, lengths)
    assert {0, 999, 637} <= set(rows) and len(rows) <= SPOT_CHECK_ROWS + 1
    assert rows == sorted(set(rows))
    assert spot_rows(10, [1] * 10) == list(range(10))
