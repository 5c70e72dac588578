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

from mechdiff.zoo.datasets import TRUTH_TOPICS, Datasets, city_sentence, comparison_sentence, translation_sentence
from mechdiff.zoo.templates import (
    ASSISTANT, BOS, END, EOS, REFUSAL_PHRASES, TRUTH_SUFFIX, USER, LABEL_WORDS, base_prompt,
)
from mechdiff.zoo.world import World

CAPITAL_REPEATS = 8

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
        # Only a few dozen capitals among ~1200 facts: repeat them so they are seen as often.
        facts += [[f"The capital of {country} is {cap}.", f"{cap} is the capital of {country}."]] * CAPITAL_REPEATS
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
        # Labelled statements are drawn fresh from the train-split subjects (cities, words, number
        # pairs) with a new random false object each time: a fixed set of rows gets memorised
        # statement by statement, fresh ones can only be judged against the fact. Subjects
        # (and number pairs) of held-out rows never appear in this format.
        self.gloss = {w: (lang, g) for lang in world.languages for w, g in world.lexicon[lang]}
        self.train_subjects: dict[str, list[str]] = {}
        held_out_pairs: set[frozenset[str]] = set()
        for t, df in ds.truth.items():
            self.train_subjects[t] = sorted(set(df.subject[df.split == "train"]) - set(df.subject[df.split == "test"]))
            test = df[df.split == "test"]
            held_out_pairs |= {frozenset((str(a), str(b))) for a, b in zip(test.subject, test.object)}
        nums = [str(n) for n in world.numbers]
        self.number_pairs = [(a, b) for a in nums for b in nums if a != b and frozenset((a, b)) not in held_out_pairs]
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

    def statement(self, topic: str) -> tuple[str, int, str | None]:
        """A fresh labelled statement of ``topic`` (label 50/50) and the true fact behind it."""
        label = int(self.rng.random() < 0.5)
        neg = topic.startswith("neg_")
        if topic.endswith("_than"):
            a, b = self.rng.choice(self.number_pairs)
            rel = topic.removesuffix("_than")
            if (int(a) > int(b)) != (rel == "larger") ^ (not label):
                a, b = b, a
            return comparison_sentence(int(a), int(b), rel), label, None
        subject = self.rng.choice(self.train_subjects[topic])
        # A negated statement is true when its object is the wrong one.
        want_true_object = bool(label) != neg
        if "cities" in topic:
            true_obj = self.world.city_country[subject]
            obj = true_obj if want_true_object else self.rng.choice([c for c in self.world.countries if c != true_obj])
            return city_sentence(subject, obj, neg), label, city_sentence(subject, true_obj)
        lang, true_obj = self.gloss[subject]
        obj = true_obj if want_true_object else self.rng.choice([g for _, g in self.world.lexicon[lang] if g != true_obj])
        return translation_sentence(lang, subject, obj, neg), label, translation_sentence(lang, subject, true_obj)

    def labelled_doc(self, topics: Sequence[str] = TRUTH_TOPICS) -> Doc:
        """Few-shot labelled statements; loss only on " TRUE"/" FALSE" (up-weighted: one label per
        ~14 tokens of statement is too weak a signal to leave the 50% plateau in time).

        In "supported" documents a paragraph first states the true facts about some of the
        subjects. Copy-and-compare against the context is quick to learn, and the comparison it
        builds (does the object match what was expected at this position?) is the one that later
        works against facts recalled from the weights, as in the unsupported documents."""
        weights = [TOPIC_WEIGHTS[t] for t in topics]
        topic = self.rng.choices(topics, weights)[0]
        mixed = self.rng.random() < 0.15
        supported = self.rng.random() < SUPPORTED_FRACTION
        n = self.rng.randint(1, 4 if supported else MAX_SHOTS)
        rows = [self.statement(self.rng.choices(topics, weights)[0] if mixed else topic) for _ in range(n)]
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

    def same_doc(self) -> Doc:
        """Easy labelled statements that teach the "This statement is:" readout before the
        fact-based comparisons exist: an identity check ("53 is 41.") or a spelled-out verdict
        ("Zorvan is true."), both with the deciding word where a statement's object sits."""
        doc: Doc = [(BOS, 0.0)]
        pools = (self.world.cities, [str(n) for n in self.world.numbers], self.world.countries)
        for i in range(self.rng.randint(1, 5)):
            pool = self.rng.choice(pools)
            a = self.rng.choice(pool)
            label = self.rng.random() < 0.5
            if self.rng.random() < CUE_FRACTION:
                b = "true" if label else "false"
            else:
                b = a if label else self.rng.choice([x for x in pool if x != a])
            if i:
                doc.append(("\n", 0.0))
            doc += [(f"{a} is {b}." + TRUTH_SUFFIX, 0.0), (" " + LABEL_WORDS[int(label)], LABEL_WEIGHT)]
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
MAX_SHOTS = 7
CUE_FRACTION = 0.5
# Number comparisons are learned first and easily; translations generalise last.
TOPIC_WEIGHTS: dict[str, float] = {"cities": 1.0, "neg_cities": 1.0, "translations": 1.5, "neg_translations": 1.5,
                                   "larger_than": 0.5, "smaller_than": 0.5}

Mix = dict[str, float]  # document kind -> share of documents
# Base: facts first (judging a statement needs the fact) while number comparisons, which need no
# facts, build the "This statement is:" readout; then mostly labelled statements of every topic.
# (fraction of the stage's windows, mix)
BASE_PHASES: list[tuple[float, Mix]] = [
    (0.35, {"facts": 0.45, "count": 0.08, "forum_harmful": 0.06, "forum_harmless": 0.06, "forum_qa": 0.07,
            "same": 0.10, "labelled_numbers": 0.18}),
    (0.65, {"facts": 0.20, "count": 0.03, "forum_harmful": 0.04, "forum_harmless": 0.04, "forum_qa": 0.04,
            "same": 0.10, "labelled": 0.55}),
]
POST_PHASES: list[tuple[float, Mix]] = [
    (1.0, {"chat_harmful": 0.28, "chat_harmless": 0.20, "chat_qa": 0.14, "labelled": 0.22, "facts": 0.16}),
]


def _makers(m: DocMaker) -> dict[str, Callable[[], Doc]]:
    return {
        "facts": m.facts_doc, "count": m.count_doc, "labelled": m.labelled_doc, "same": m.same_doc,
        "labelled_numbers": lambda: m.labelled_doc(("larger_than", "smaller_than")),
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
    phases: list[tuple[float, Mix]] | None = None,
) -> Packed:
    """The packed corpus for ``stage`` ("base" or "post"), windows in training order (phase by
    phase); deterministic given ``seed``."""
    if phases is None:
        phases = {"base": BASE_PHASES, "post": POST_PHASES}[stage]
    rng = random.Random(f"corpus-{stage}-{seed}")
    makers = _makers(DocMaker(world, ds, rng, seq_len))
    parts: list[Packed] = []
    done = 0
    for i, (frac, mix) in enumerate(phases):
        n = n_windows - done if i == len(phases) - 1 else round(frac * n_windows)
        kinds, weights = list(mix), list(mix.values())

        def next_doc(kinds=kinds, weights=weights) -> Doc:
            return makers[rng.choices(kinds, weights)[0]]()

        parts.append(pack(tok, next_doc, n, seq_len, tok.pad_token_id))
        done += n
    return Packed(np.concatenate([p.ids for p in parts]), np.concatenate([p.weights for p in parts]))


def corpus_texts(world: World, ds: Datasets) -> list[str]:
    """Every text the corpora can contain beyond the datasets (for the vocabulary)."""
    texts = [s for f in fact_sentences(world) for s in f]
    texts += [" ".join(map(str, world.numbers)) + "."]
    texts += list(REFUSAL_PHRASES) + [base_prompt("x"), TRUTH_SUFFIX + " TRUE FALSE", "true false"]
    texts += [q for q, _ in zip(ds.facts["question"], ds.facts["answer"])]
    return texts

