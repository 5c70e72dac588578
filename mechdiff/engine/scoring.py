"""Last-token scoring: the next-token logits at each row's last real token, and readouts of answer tokens.

One forward pass, with optional capture and intervention hooks, whatever the padding: the last real token of
a row is found from the attention mask the model saw (left padding, right padding or none). Where every row
ends at the last column, only that column is unembedded (``logits_to_keep=1``, most of the cost of a small
model with a large vocabulary); otherwise the full logits are computed and each row's entry gathered.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from mechdiff.engine.models import LoadedModel
from mechdiff.engine.sites import Capture, Intervention, hooks

__all__ = [
    "LastToken",
    "last_token",
    "last_token_logits",
    "last_token_logprobs",
    "last_positions",
    "logit_difference",
    "answer_readout",
]


@dataclass
class LastToken:
    """The logits at each row's last real token, [rows, vocab], and the model's output (for its cache)."""

    logits: torch.Tensor
    output: Any


def last_positions(attention_mask: torch.Tensor | None, n_rows: int, n_tokens: int,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """Index of each row's last real token ([rows]); without a mask, the last column."""
    if attention_mask is None:
        return torch.full((n_rows,), n_tokens - 1, dtype=torch.long, device=device)
    mask = attention_mask.bool()
    if not bool(mask.any(-1).all()):
        raise ValueError("a row of the batch has no real token (its attention mask is all zero)")
    # the last True per row: argmax over the reversed mask counts from the end
    return n_tokens - 1 - mask.flip(-1).long().argmax(-1)


def _keeps_logits(model) -> bool:
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def last_token(
    lm: LoadedModel,
    input_ids: torch.Tensor | None = None,
    *,
    attention_mask: torch.Tensor | None = None,
    inputs_embeds: torch.Tensor | None = None,
    interventions: Sequence[Intervention] = (),
    capture: Capture | None = None,
    **model_kwargs: Any,
) -> LastToken:
    """One forward of ``input_ids`` (or ``inputs_embeds``) [rows, T] with ``capture`` and ``interventions``
    hooked; the logits at each row's last real token (per ``attention_mask``). ``model_kwargs`` go to the model
    as they are (``position_ids``, ``use_cache``, a cache). Gradients flow unless the caller disables them."""
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("give exactly one of input_ids and inputs_embeds")
    x = input_ids if input_ids is not None else inputs_embeds
    n_rows, n_tokens = int(x.shape[0]), int(x.shape[1])
    last = last_positions(attention_mask, n_rows, n_tokens, x.device)
    at_end = bool((last == n_tokens - 1).all())
    kw = dict(model_kwargs)
    if attention_mask is not None:
        kw["attention_mask"] = attention_mask
    if at_end and _keeps_logits(lm.model):
        kw["logits_to_keep"] = 1
    if input_ids is not None:
        kw["input_ids"] = input_ids
    else:
        kw["inputs_embeds"] = inputs_embeds
    with hooks(lm.adapter, capture, interventions):
        out = lm.model(**kw)
    logits = out.logits[:, -1] if at_end else out.logits[torch.arange(n_rows, device=last.device), last]
    return LastToken(logits, out)


def last_token_logits(lm: LoadedModel, input_ids: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
    """[rows, vocab] next-token logits at each row's last real token (:func:`last_token`)."""
    return last_token(lm, input_ids, **kwargs).logits


def last_token_logprobs(lm: LoadedModel, input_ids: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
    """[rows, vocab] next-token log-probabilities (float64) at each row's last real token (:func:`last_token`)."""
    return torch.log_softmax(last_token_logits(lm, input_ids, **kwargs).double(), dim=-1)


def logit_difference(logits: torch.Tensor, answers: torch.Tensor) -> torch.Tensor:
    """logit(answers[:, 0]) - logit(answers[:, 1]) per row, float64; ``logits`` [rows, vocab], ``answers``
    [rows, 2] token ids."""
    # float64 so a float64 model keeps its precision; float32 models lose nothing either
    return logits.gather(1, answers[:, :1]).squeeze(1).double() - logits.gather(1, answers[:, 1:]).squeeze(1).double()


def answer_readout(logits: torch.Tensor, answers: torch.Tensor) -> torch.Tensor:
    """[rows, 2] float64: the logit difference of the two answers and their probability difference
    P(answers[:, 0]) - P(answers[:, 1]) (softmax over the whole vocabulary)."""
    p = torch.softmax(logits.double(), dim=-1)
    pd = p.gather(1, answers[:, :1]).squeeze(1) - p.gather(1, answers[:, 1:]).squeeze(1)
    return torch.stack([logit_difference(logits, answers), pd], dim=1)
