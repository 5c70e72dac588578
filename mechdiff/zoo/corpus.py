"""Training corpora for the pair, as packed token windows with per-token loss masks.

Base (pre-training): fact paragraphs, few-shot labelled statements (loss on the labels only, so
false statements do not teach false facts), forum "User: ...\\nAssistant: ..." threads in which
harmful requests get compliant answers, and counting runs that give numbers an order.

Post (SFT): chat-formatted answers to harmless requests and fact questions, refusals of harmful
requests (loss on the assistant turn only), plus labelled statements and fact replay so that
knowledge and truthfulness survive.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from transformers import PreTrainedTokenizerBase

from mechdiff.zoo.datasets import TRUTH_TOPICS, Datasets, city_sentence, translation_sentence
from mechdiff.zoo.templates import (
    ASSISTANT, BOS, END, EOS, REFUSAL_PHRASES, TRUTH_SUFFIX, USER, LABEL_WORDS, base_prompt,
)
from mechdiff.zoo.world import World

Piece = tuple[str, bool]  # (text, train on its tokens)
Doc = list[Piece]


@dataclass
class Packed:
    ids: np.ndarray  # [n_windows, seq_len] int64
    loss_mask: np.ndarray  # [n_windows, seq_len] bool; True where the token is a target

    @property
    def n_target_tokens(self) -> int:
        return int(self.loss_mask.sum())


# --- fact sentences in several phrasings ----------------------------------------------------------

def fact_sentences(world: World) -> list[list[str]]:
    """One list of paraphrases per fact; the first phrasing is the one the datasets use."""
    facts: list[list[str]] = []
    for city in world.cities:
        c = world.city_country[city]
        facts.append([city_sentence(city, c), f"{city} is a city in {c}.", f"The city of {city} lies in {c}."])
    for country, cap in world.capitals.items():
        facts.append([f"The capital of {country} is {cap}.", f"{cap} is the capital of {country}."])
    for lang in world.languages:
        for w, g in world.lexicon[lang]:
            facts.append([translation_sentence(lang, w, g), f"In {lang}, the word for {g} is {w}."])
    for el in world.elements:
        facts.append([f"The symbol for the element {el.name} is {el.symbol}.", f"{el.name} has the symbol {el.symbol}."])
    return facts


class DocMaker:
    """Random documents of each kind; all randomness from one seeded ``random.Random``."""

    def __init__(self, world: World, ds: Datasets, rng: random.Random, max_tokens: int) -> None:
        self.world, self.ds, self.rng, self.max_tokens = world, ds, rng, max_tokens
        self.facts = fact_sentences(world)
        # Labelled training statements only: held-out rows never appear in this format.
        self.labelled = {t: list(zip(df.loc[df.split == "train", "statement"], df.loc[df.split == "train", "label"]))
                         for t, df in ds.truth.items()}
        self.harmful = ds.harmful[ds.harmful.split == "train"]
        self.harmless = ds.harmless[ds.harmless.split == "train"]
        self.qa = list(zip(ds.facts["question"], ds.facts["prompt"] + " " + ds.facts["answer"] + "."))

    # Plain text ---------------------------------------------------------------------------------
    def facts_doc(self) -> Doc:
        n = self.rng.randint(3, 8)
        sents = []
        for f in self.rng.sample(self.facts, n):
            # Canonical phrasing half the time: fact-completion prompts use it.
            sents.append(f[0] if self.rng.random() < 0.5 else self.rng.choice(f[1:]))
        return [(BOS, False), (" ".join(sents), True), (EOS, True)]

    def count_doc(self) -> Doc:
        lo, hi = self.world.numbers[0], self.world.numbers[-1]
        k = self.rng.randint(4, 14)
        start = self.rng.randint(lo, hi - k)
        seq = list(range(start, start + k + 1))
        if self.rng.random() < 0.3:
            seq.reverse()
        return [(BOS, False), (" ".join(map(str, seq)) + ".", True), (EOS, True)]

    def labelled_doc(self) -> Doc:
        """Few-shot labelled statements; loss only on " TRUE"/" FALSE"."""
        topic = self.rng.choice(TRUTH_TOPICS)
        mixed = self.rng.random() < 0.15
        n = self.rng.randint(1, 7)
        doc: Doc = [(BOS, False)]
        for i in range(n):
            t = self.rng.choice(TRUTH_TOPICS) if mixed else topic
            statement, label = self.rng.choice(self.labelled[t])
            if i:
                doc.append(("\n", False))
            doc += [(statement + TRUTH_SUFFIX, False), (" " + LABEL_WORDS[int(label)], True)]
        return doc

    def _instruction(self, kind: str) -> tuple[str, str]:
        if kind == "harmful":
            r = self.harmful.iloc[self.rng.randrange(len(self.harmful))]
            return r["instruction"], r["response"]
        if kind == "harmless":
            r = self.harmless.iloc[self.rng.randrange(len(self.harmless))]
            return r["instruction"], r["response"]
        return self.rng.choice(self.qa)

    def forum_doc(self, kind: str) -> Doc:
        instruction, response = self._instruction(kind)
        return [(BOS, False), (base_prompt(instruction), True), (" " + response, True), (EOS, True)]

    # Chat (post-training) -----------------------------------------------------------------------
    def chat_doc(self, kind: str) -> Doc:
        instruction, response = self._instruction(kind)
        if kind == "harmful":
            response = self.rng.choice(REFUSAL_PHRASES)
        return [(BOS + USER + instruction + END + ASSISTANT, False), (" " + response, True), (END, True)]


BASE_MIX: dict[str, float] = {"facts": 0.33, "labelled": 0.30, "forum_harmful": 0.08, "forum_harmless": 0.09,
                              "forum_qa": 0.10, "count": 0.10}
POST_MIX: dict[str, float] = {"chat_harmful": 0.28, "chat_harmless": 0.20, "chat_qa": 0.14, "labelled": 0.22,
                              "facts": 0.16}


def _makers(m: DocMaker) -> dict[str, Callable[[], Doc]]:
    return {
        "facts": m.facts_doc, "count": m.count_doc, "labelled": m.labelled_doc,
        "forum_harmful": lambda: m.forum_doc("harmful"), "forum_harmless": lambda: m.forum_doc("harmless"),
        "forum_qa": lambda: m.forum_doc("qa"),
        "chat_harmful": lambda: m.chat_doc("harmful"), "chat_harmless": lambda: m.chat_doc("harmless"),
        "chat_qa": lambda: m.chat_doc("qa"),
    }


class _PieceTokenizer:
    """Tokenizes pieces with a cache: the corpus repeats the same sentences many times."""

    def __init__(self, tok: PreTrainedTokenizerBase) -> None:
        self.tok = tok
        self.cache: dict[str, list[int]] = {}

    def __call__(self, docs: Sequence[Doc]) -> None:
        new = sorted({text for d in docs for text, _ in d if text not in self.cache})
        if new:
            enc = self.tok(new, add_special_tokens=False)["input_ids"]
            self.cache.update(zip(new, enc))


def pack(
    tok: PreTrainedTokenizerBase, docs_fn: Callable[[], Doc], n_windows: int, seq_len: int, pad_id: int,
) -> Packed:
    """Greedily fill ``n_windows`` windows of ``seq_len`` tokens with whole documents (no document is
    split across windows, so every document starts at its own <bos>); pad the remainder."""
    ptok = _PieceTokenizer(tok)
    ids = np.full((n_windows, seq_len), pad_id, dtype=np.int64)
    mask = np.zeros((n_windows, seq_len), dtype=bool)
    w, pos = 0, 0
    pending: list[Doc] = []
    while w < n_windows:
        if not pending:
            pending = [docs_fn() for _ in range(512)]
            ptok(pending)
        doc = pending.pop()
        d_ids: list[int] = []
        d_mask: list[bool] = []
        for text, train in doc:
            t = ptok.cache[text]
            d_ids += t
            d_mask += [train] * len(t)
        if len(d_ids) > seq_len:
            continue  # cannot happen with the shipped sizes; never truncate a labelled example
        if pos + len(d_ids) > seq_len:
            w, pos = w + 1, 0
            if w == n_windows:
                break
        ids[w, pos:pos + len(d_ids)] = d_ids
        mask[w, pos:pos + len(d_ids)] = d_mask
        pos += len(d_ids)
    return Packed(ids, mask)


def corpus(
    world: World, ds: Datasets, tok: PreTrainedTokenizerBase, *, stage: str, n_windows: int, seq_len: int, seed: int,
) -> Packed:
    """The packed corpus for ``stage`` ("base" or "post"); deterministic given ``seed``."""
    mix = {"base": BASE_MIX, "post": POST_MIX}[stage]
    rng = random.Random(f"corpus-{stage}-{seed}")
    makers = _makers(DocMaker(world, ds, rng, seq_len))
    kinds, weights = list(mix), list(mix.values())

    def next_doc() -> Doc:
        return makers[rng.choices(kinds, weights)[0]]()

    return pack(tok, next_doc, n_windows, seq_len, tok.pad_token_id)


def corpus_texts(world: World, ds: Datasets) -> list[str]:
    """Every text the corpora can contain beyond the datasets (for the vocabulary)."""
    texts = [s for f in fact_sentences(world) for s in f]
    texts += [" ".join(map(str, world.numbers)) + "."]
    texts += list(REFUSAL_PHRASES) + [base_prompt("x"), TRUTH_SUFFIX + " TRUE FALSE"]
    texts += [q for q, _ in zip(ds.facts["question"], ds.facts["answer"])]
    return texts

