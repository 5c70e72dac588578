"""Tokenisation, prompt templates, length-bucketed batches and padded forward inputs."""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Sequence

import torch

from mechdiff.errors import MechdiffError

__all__ = [
    "PromptTemplate", "TokenizeError", "BatchingError", "TOKEN_BUDGETS", "tokenize", "length_batches",
    "default_token_budget", "resolve_token_budget", "pad_batch",
]

#: Padded tokens per batch (rows x longest prompt) by device type, when the caller names no budget. On CPU
#: large batches are slower per token (their activations no longer stay in cache) and hold more memory: on the
#: benchmark Llama (512 prompts of 16-128 tokens, 2 cores) budgets of 512-2,048 ran at the same tokens/s,
#: 4,096 at 0.90 of it and 16,384 at 0.77 (`benchmarks/extract_overhead.py --sweep-budgets`); under load from
#: other processes the smallest ones fell behind, so 2,048. Accelerators keep the large batches that fill
#: them; device types not named get the ``"*"`` entry.
TOKEN_BUDGETS: dict[str, int] = {"cpu": 2048, "*": 16384}


class TokenizeError(MechdiffError, ValueError):
    """A prompt that cannot be fed to the model as asked (e.g. longer than its context)."""


class BatchingError(MechdiffError, ValueError):
    """A batch size that cannot be used (e.g. a token budget below one token)."""


def default_token_budget(device: torch.device | str) -> int:
    """The token budget for ``device`` (``cpu``, ``cuda:1``, a ``torch.device``...) from :data:`TOKEN_BUDGETS`."""
    return TOKEN_BUDGETS.get(torch.device(device).type, TOKEN_BUDGETS["*"])


def resolve_token_budget(token_budget: int | None, device: torch.device | str) -> int:
    """``token_budget`` itself, or the device's default for None; refuses a budget below one token."""
    if token_budget is None:
        return default_token_budget(device)
    if isinstance(token_budget, bool) or not isinstance(token_budget, numbers.Integral) or token_budget < 1:
        raise BatchingError(f"token budget {token_budget!r}: give a whole number of padded tokens per batch, at least 1")
    return int(token_budget)


@dataclass(frozen=True)
class PromptTemplate:
    """How a dataset text becomes the model's input.

    ``none``  the text as it is
    ``chat``  the tokenizer's chat template, one user turn, with the generation prompt
    any other string is a format string with ``{text}``, e.g. ``"User: {text}\\nAssistant:"``
    """

    spec: str = "none"

    def __post_init__(self) -> None:
        if isinstance(self.spec, PromptTemplate):
            object.__setattr__(self, "spec", self.spec.spec)
        if not isinstance(self.spec, str) or self.spec not in ("none", "chat") and "{text}" not in self.spec:
            raise ValueError(f"template {self.spec!r}: use none, chat, or a format string containing {{text}}")

    def __str__(self) -> str:
        return self.spec

    def apply(self, text: str, tokenizer=None) -> str:
        if self.spec == "none":
            return text
        if self.spec == "chat":
            if tokenizer is None or not getattr(tokenizer, "chat_template", None):
                raise ValueError("template 'chat' needs a tokenizer with a chat template")
            return tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
            )
        return self.spec.replace("{text}", text)

    def suffix(self, tokenizer=None) -> str:
        """The template's text after the instruction: the post-instruction tokens' marker."""
        probe = "\x00MECHDIFF\x00"
        full = self.apply(probe, tokenizer)
        return full[full.index(probe) + len(probe) :]


def tokenize(
    tokenizer,
    texts: Sequence[str],
    *,
    max_length: int | None = None,
    truncate: bool = False,
    add_special_tokens: bool = True,
) -> list[list[int]]:
    """Token ids per text. A text longer than ``max_length`` is refused unless ``truncate``, which keeps its
    end (positions are counted from the end, so the end is what studies read)."""
    # Lengths are checked below (refused or truncated); the tokenizer's own warning about them would be a
    # second, vaguer line next to the error. It warns once per tokenizer: mark it as given.
    warned = getattr(tokenizer, "deprecation_warnings", None)
    if isinstance(warned, dict):
        warned.setdefault("sequence-length-is-longer-than-the-specified-maximum", True)
    # Chat-templated texts already carry their special tokens.
    enc = tokenizer(list(texts), add_special_tokens=add_special_tokens)["input_ids"]
    out = []
    for i, ids in enumerate(enc):
        if not ids:
            raise TokenizeError(f"example {i} tokenizes to no tokens")
        if max_length is not None and len(ids) > max_length:
            if not truncate:
                raise TokenizeError(
                    f"example {i} has {len(ids)} tokens, more than the model's context of {max_length}; "
                    "pass --truncate to keep its last tokens"
                )
            ids = ids[-max_length:]
        out.append(list(ids))
    return out


def length_batches(lengths: Sequence[int], indices: Sequence[int], token_budget: int) -> list[list[int]]:
    """Group ``indices`` into batches of similar length whose padded size (rows x longest) stays within
    ``token_budget``. Sorting by length is what keeps padding, and so wasted compute, low."""
    order = sorted(indices, key=lambda i: (lengths[i], i))
    batches: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        longest = max(lengths[i], lengths[cur[-1]] if cur else 0)
        if cur and longest * (len(cur) + 1) > token_budget:
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    return batches


def pad_batch(
    ids: Sequence[Sequence[int]], pad_id: int, *, side: str = "right", device: torch.device | str = "cpu"
) -> dict[str, torch.Tensor]:
    """``input_ids``, ``attention_mask`` and ``position_ids`` for a padded batch; position ids count real
    tokens only, so left padding gives each example the positions it has alone."""
    if side not in ("left", "right"):
        raise ValueError(f"padding side {side!r}: left or right")
    t = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), t), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), t), dtype=torch.long)
    for b, x in enumerate(ids):
        n = len(x)
        sl = slice(t - n, t) if side == "left" else slice(0, n)
        input_ids[b, sl] = torch.as_tensor(x, dtype=torch.long)
        mask[b, sl] = 1
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    return {
        "input_ids": input_ids.to(device),
        "attention_mask": mask.to(device),
        "position_ids": pos.to(device),
    }
