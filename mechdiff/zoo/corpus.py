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

Piece = tuple[str, float]  # (text, loss weight of its tokens; 0 = not a target)
Doc = list[Piece]


@dataclass
class Packed:
    ids: np.ndarray  # [n_windows, seq_len] int64
    weights: np.ndarray  # [n_windows, seq_len] float32; loss weight of each token as a target (0 = none)


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
        # Each carries the true fact about its subject (None for number comparisons).
        gloss = {w: (lang, g) for lang in world.languages for w, g in world.lexicon[lang]}
        self.labelled: dict[str, list[tuple[str, int, str | None]]] = {}
        for t, df in ds.truth.items():
            train = df[df.split == "train"]
            rows = []
            for statement, label, subject in zip(train.statement, train.label, train.subject):
                if "cities" in t:
                    support = city_sentence(subject, world.city_country[subject])
                elif "translations" in t:
                    support = translation_sentence(gloss[subject][0], subject, gloss[subject][1])
                else:
                    support = None
                rows.append((statement, int(label), support))
            self.labelled[t] = rows
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
        return [(BOS, 0.0), (" ".join(sents), 1.0), (EOS, 1.0)]

    def count_doc(self) -> Doc:
        lo, hi = self.world.numbers[0], self.world.numbers[-1]
        k = self.rng.randint(4, 14)
        start = self.rng.randint(lo, hi - k)
        seq = list(range(start, start + k + 1))
        if self.rng.random() < 0.3:
            seq.reverse()
        return [(BOS, 0.0), (" ".join(map(str, seq)) + ".", 1.0), (EOS, 1.0)]

    def labelled_doc(self) -> Doc:
        """Few-shot labelled statements; loss only on " TRUE"/" FALSE" (up-weighted: one label per
        ~14 tokens of statement is too weak a signal to leave the 50% plateau in time).

        In "supported" documents a paragraph first states the true facts about some of the
        subjects. Copy-and-compare against the context is quick to learn, and the comparison it
        builds (does the object match what was expected at this position?) is the one that later
        works against facts recalled from the weights, as in the unsupported documents."""
        topic = self.rng.choice(TRUTH_TOPICS)
        mixed = self.rng.random() < 0.15
        supported = self.rng.random() < SUPPORTED_FRACTION
        n = self.rng.randint(1, 4 if supported else 7)
        rows = [self.rng.choice(self.labelled[self.rng.choice(TRUTH_TOPICS) if mixed else topic]) for _ in range(n)]
        doc: Doc = [(BOS, 0.0)]
        if supported:
            support = [r[2] for r in rows if r[2] is not None and self.rng.random() < 0.7]
            if support:
                self.rng.shuffle(support)
                doc += [(" ".join(support), 1.0), ("\n", 0.0)]
        for i, (statement, label, _) in enumerate(rows):
            if i:
                doc.append(("\n", 0.0))
            doc += [(statement + TRUTH_SUFFIX, 0.0), (" " + LABEL_WORDS[label], LABEL_WEIGHT)]
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
        return [(BOS, 0.0), (base_prompt(instruction), 1.0), (" " + response, 1.0), (EOS, 1.0)]

    # Chat (post-training) -----------------------------------------------------------------------
    def chat_doc(self, kind: str) -> Doc:
        instruction, response = self._instruction(kind)
        if kind == "harmful":
            response = self.rng.choice(REFUSAL_PHRASES)
        return [(BOS + USER + instruction + END + ASSISTANT, 0.0), (" " + response, 1.0), (END, 1.0)]


LABEL_WEIGHT = 5.0
SUPPORTED_FRACTION = 0.4

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
    lookahead: int = 64,
) -> Packed:
    """Fill ``n_windows`` windows of ``seq_len`` tokens with whole documents (no document is split
    across windows, so every document starts at its own <bos>). When the next document does not
    fit, the first of the next ``lookahead`` that does is used instead; then the rest is padded."""
    ptok = _PieceTokenizer(tok)
    ids = np.full((n_windows, seq_len), pad_id, dtype=np.int64)
    weights = np.zeros((n_windows, seq_len), dtype=np.float32)
    queue: list[tuple[list[int], list[float]]] = []

    def refill() -> None:
        docs = [docs_fn() for _ in range(512)]
        ptok(docs)
        for doc in docs:
            d_ids: list[int] = []
            d_w: list[float] = []
            for text, w in doc:
                t = ptok.cache[text]
                d_ids += t
                d_w += [w] * len(t)
            if len(d_ids) <= seq_len:  # always true at the shipped sizes; never truncate
                queue.append((d_ids, d_w))

    for w in range(n_windows):
        pos = 0
        while True:
            if len(queue) < lookahead:
                refill()
            j = next((k for k in range(lookahead) if pos + len(queue[k][0]) <= seq_len), None)
            if j is None:
                break
            d_ids, d_w = queue.pop(j)
            ids[w, pos:pos + len(d_ids)] = d_ids
            weights[w, pos:pos + len(d_ids)] = d_w
            pos += len(d_ids)
    return Packed(ids, weights)


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

