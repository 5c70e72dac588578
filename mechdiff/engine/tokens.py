"""Locating text in token sequences: the token an answer starts with, character offsets of tokens, the first
token of a substring, the tokens of a whole word.

Every function takes the tokenizer and the prompt's own token ids, so what it finds follows the tokenizer's
word-boundary handling rather than a guess about it. Tokenizers without character offsets (slow ones) are
answered where that is possible without offsets, and said so (``None``) where it is not.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import numpy as np

from mechdiff.errors import MechdiffError

__all__ = ["TokenError", "answer_token", "char_offsets", "first_token_of", "find_word", "word_tokens"]


class TokenError(MechdiffError, ValueError):
    """Text that cannot be located in tokens (an answer that tokenizes to nothing or to the unknown token)."""


def answer_token(tokenizer: Any, prompt: str, prompt_ids: Sequence[int], answer: str) -> int:
    """The first token ``answer`` adds when it follows ``prompt`` after a space (``prompt_ids``: the prompt's
    tokens); where the joined text does not extend the prompt's tokens, the first token of ``" " + answer``."""
    prompt_ids = list(prompt_ids)
    full = tokenizer(prompt + " " + answer)["input_ids"]
    if len(full) > len(prompt_ids) and full[: len(prompt_ids)] == prompt_ids:
        tok = full[len(prompt_ids)]
    else:
        ids = tokenizer(" " + answer, add_special_tokens=False)["input_ids"]
        if not ids:
            raise TokenError(f"answer {answer!r} tokenizes to nothing")
        tok = ids[0]
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is not None and tok == unk:
        raise TokenError(f"answer {answer!r} is not in the tokenizer's vocabulary (it maps to the unknown token)")
    return int(tok)


def char_offsets(tokenizer: Any, text: str, ids: Sequence[int]) -> list[tuple[int, int]] | None:
    """Character span of each token of ``text`` (whose tokens are ``ids``); None for tokenizers that cannot say."""
    try:
        offsets = tokenizer(text, return_offsets_mapping=True)["offset_mapping"]
    except (NotImplementedError, ValueError, KeyError, TypeError):
        return None
    return offsets if offsets is not None and len(offsets) == len(ids) else None


def first_token_of(tokenizer: Any, prompt: str, text: str, ids: Sequence[int]) -> int:
    """Index of the first token of the last occurrence of ``text`` in ``prompt`` (tokens ``ids``); 0 if absent."""
    char = prompt.rfind(text)
    if char < 0:
        return 0
    offsets = char_offsets(tokenizer, prompt, ids)
    if offsets is not None:
        for t, (a, b) in enumerate(offsets):
            if b > a and b > char:
                return t
        return len(ids)
    # no offsets: count the tokens of the text before it
    return len(tokenizer(prompt[:char].rstrip())["input_ids"]) if char else 0


def find_word(text: str, word: str, last: bool = False) -> int:
    """Character index of ``word`` in ``text`` (not inside a longer word), its first or last occurrence; -1."""
    hits = [m.start() for m in re.finditer(rf"(?<!\w){re.escape(word)}(?!\w)", text)]
    return (hits[-1] if last else hits[0]) if hits else -1


def word_tokens(tokenizer: Any, prompt: str, ids: Sequence[int], word: str, *, within: str | None = None,
                last: bool = False) -> np.ndarray | None:
    """Token indices covering ``word`` (a whole word; its first or ``last`` occurrence) inside the last
    occurrence of ``within`` in ``prompt`` (default: the whole prompt). Empty where it is not found; None where
    the tokenizer gives no character offsets."""
    within = prompt if within is None else within
    c0, at = prompt.rfind(within), find_word(within, word, last)
    if c0 < 0 or at < 0:
        return np.zeros(0, dtype=np.int64)
    offsets = char_offsets(tokenizer, prompt, ids)
    if offsets is None:
        return None
    a, b = c0 + at, c0 + at + len(word)
    return np.asarray([t for t, (s, e) in enumerate(offsets) if e > s and s < b and e > a], dtype=np.int64)
