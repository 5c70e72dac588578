"""A dataset's token ids under one tokenizer, and the key that says when another model may reuse them.

A sweep's base and post-trained models usually share a tokenizer, so their targets of one dataset would
tokenize the same texts to the same ids. :func:`tokenization_key` hashes everything the ids depend on (the
tokenizer's definition and settings, the template, the positions, the length limit, the dataset), so a
target reuses another's :class:`Tokenization` only under an equal key, and :func:`spot_check` re-tokenizes
a sample of rows first, in case the key misses a setting: a reused id that differed would corrupt a store
silently.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Sequence

from mechdiff.engine.batching import PromptTemplate, tokenize
from mechdiff.engine.data import PromptSet
from mechdiff.engine.models import tokenizer_hash
from mechdiff.engine.positions import Positions

__all__ = ["Tokenization", "ids_and_counts", "tokenization_key", "spot_check", "SPOT_CHECK_ROWS"]

SPOT_CHECK_ROWS = 32

# Tokenizer settings that name where it was read from, not how it tokenizes; padding is mechdiff's own.
_LOCATION_KWARGS = frozenset({
    "name_or_path", "vocab_file", "merges_file", "tokenizer_file", "is_local", "local_files_only", "cache_dir",
    "_commit_hash", "revision", "subfolder", "gguf_file", "token", "trust_remote_code", "_from_auto",
    "padding_side", "chat_template",
})


@dataclass(frozen=True)
class Tokenization:
    """Token ids and kept-position counts of a dataset's examples, and the key they were made under."""

    key: str
    token_ids: list[list[int]]
    counts: list[int]


def ids_and_counts(tokenizer: Any, texts: Sequence[str], positions: Positions, template: PromptTemplate, *,
                   max_length: int | None, truncate: bool) -> tuple[list[list[int]], list[int]]:
    """Each text's token ids after the template, and its number of kept positions."""
    applied = [template.apply(t, tokenizer) for t in texts]
    # A chat template already writes the special tokens; adding them again would double the BOS.
    ids = tokenize(tokenizer, applied, max_length=max_length, truncate=truncate,
                   add_special_tokens=template.spec != "chat")
    marker_ids = None
    if positions.kind in ("from", "post_instruction"):
        marker = positions.marker if positions.kind == "from" else template.suffix(tokenizer)
        marker_ids = tokenizer(marker, add_special_tokens=False)["input_ids"]
    return ids, positions.counts(ids, marker_ids)


def tokenization_key(tokenizer: Any, prompts: PromptSet, positions: Positions, template: PromptTemplate, *,
                     max_length: int | None, truncate: bool, definition: str | None = None) -> str:
    """sha256 over what a dataset's token ids and position counts depend on. Two models whose keys are
    equal tokenize the dataset to the same ids; a key never equal across different datasets, templates,
    position selectors or length limits. ``definition``: the tokenizer's :func:`tokenizer_hash` when
    already known (a loaded model's)."""
    settings = {
        k: v if isinstance(v, (str, int, float, bool, type(None))) else repr(v)
        for k, v in sorted(getattr(tokenizer, "init_kwargs", {}).items()) if k not in _LOCATION_KWARGS
    }
    uses_chat = template.spec == "chat"
    record = {
        "v": 1,
        "class": type(tokenizer).__name__,
        "definition": definition or tokenizer_hash(tokenizer),
        "settings": settings,
        "split_special_tokens": getattr(tokenizer, "split_special_tokens", None),
        # a base model's chat template may differ from its post-trained model's; only a chat prompt reads it
        "chat_template": getattr(tokenizer, "chat_template", None) if uses_chat else None,
        "template": template.spec,
        "positions": repr(positions),
        "max_length": max_length,
        "truncate": bool(truncate),
        "dataset": prompts.hash,
        "n": len(prompts),
    }
    return "sha256:" + hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def spot_rows(n: int, lengths: Sequence[int], k: int = SPOT_CHECK_ROWS) -> list[int]:
    """The rows a reuse re-tokenizes: the first, the last, the longest and evenly spaced others."""
    if n <= k:
        return list(range(n))
    longest = max(range(n), key=lambda i: lengths[i])
    step = (n - 1) / (k - 2)
    return sorted({0, n - 1, longest, *(round(i * step) for i in range(k - 2))})


def spot_check(tok: Tokenization, tokenizer: Any, prompts: PromptSet, positions: Positions, template: PromptTemplate,
               *, max_length: int | None, truncate: bool) -> str | None:
    """None when re-tokenizing a sample of ``prompts`` gives ``tok``'s ids and counts; otherwise what differs."""
    if len(tok.token_ids) != len(prompts):
        return f"{len(tok.token_ids)} rows for a dataset of {len(prompts)}"
    rows = spot_rows(len(prompts), [len(x) for x in tok.token_ids])
    ids, counts = ids_and_counts(tokenizer, [prompts.texts[i] for i in rows], positions, template,
                                 max_length=max_length, truncate=truncate)
    for i, a, c in zip(rows, ids, counts):
        if a != tok.token_ids[i] or c != tok.counts[i]:
            return f"example {i} tokenizes to other ids"
    return None
