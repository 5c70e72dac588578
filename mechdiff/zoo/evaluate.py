"""Behaviour measurements of a model on the zoo's held-out data (used by the build and the tests).

All of them are batched with left padding; generation is plain greedy ``model.generate``."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from mechdiff.zoo.datasets import TRUTH_TOPICS, Datasets
from mechdiff.zoo.templates import base_prompt, is_refusal, truth_prompt


def _batches(items: Sequence, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]


@torch.no_grad()
def next_token_logits(model: PreTrainedModel, tok: PreTrainedTokenizerBase, prompts: Sequence[str],
                      batch_size: int = 64) -> torch.Tensor:
    """Logits of the token after each prompt, [n, vocab] (prompts get <bos> from the tokenizer
    unless they already start with it)."""
    tok.padding_side = "left"
    out = []
    for chunk in _batches(list(prompts), batch_size):
        enc = tok(list(chunk), return_tensors="pt", padding=True, add_special_tokens=not chunk[0].startswith(tok.bos_token))
        logits = model(**enc.to(model.device)).logits[:, -1].float()
        out.append(logits.cpu())
    return torch.cat(out)


def truth_margins(model: PreTrainedModel, tok: PreTrainedTokenizerBase, statements: Sequence[str],
                  shots: Sequence[tuple[str, int]]) -> torch.Tensor:
    """logit(TRUE) - logit(FALSE) after the few-shot "This statement is:" prompt (same sign as
    P(TRUE) - P(FALSE))."""
    t_id, f_id = tok.convert_tokens_to_ids("▁TRUE"), tok.convert_tokens_to_ids("▁FALSE")
    logits = next_token_logits(model, tok, [truth_prompt(s, shots) for s in statements])
    return logits[:, t_id] - logits[:, f_id]


def truth_accuracy(model: PreTrainedModel, tok: PreTrainedTokenizerBase, ds: Datasets,
                   split: str = "test") -> dict[str, float]:
    """Per label and per topic: fraction of held-out statements the model labels correctly."""
    res: dict[str, float] = {}
    right = {0: 0, 1: 0}
    total = {0: 0, 1: 0}
    for topic in TRUTH_TOPICS:
        df = ds.truth[topic]
        df = df[df.split == split]
        m = truth_margins(model, tok, df.statement.tolist(), ds.shots[topic])
        ok = (m > 0).long().numpy() == df.label.to_numpy()
        res[f"truth_{topic}"] = float(ok.mean())
        for label in (0, 1):
            sel = df.label.to_numpy() == label
            right[label] += int(ok[sel].sum())
            total[label] += int(sel.sum())
    res["truth_true"] = right[1] / total[1]
    res["truth_false"] = right[0] / total[0]
    return res


def fact_accuracy(model: PreTrainedModel, tok: PreTrainedTokenizerBase, facts: pd.DataFrame) -> dict[str, float]:
    """Greedy next token == the one-token answer, per fact topic and overall."""
    answer_ids = torch.tensor([tok.convert_tokens_to_ids("▁" + a) for a in facts.answer])
    pred = next_token_logits(model, tok, facts.prompt.tolist()).argmax(-1)
    ok = (pred == answer_ids).numpy()
    res = {f"facts_{t}": float(ok[(facts.topic == t).to_numpy()].mean()) for t in facts.topic.unique()}
    res["facts"] = float(ok.mean())
    return res


@torch.no_grad()
def generate(model: PreTrainedModel, tok: PreTrainedTokenizerBase, prompts: Sequence[str], *,
             max_new_tokens: int = 16, batch_size: int = 64) -> list[str]:
    """Greedy completions (new text only), batched with left padding."""
    tok.padding_side = "left"
    texts: list[str] = []
    for chunk in _batches(list(prompts), batch_size):
        enc = tok(list(chunk), return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id)
        texts += tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return texts


def render(tok: PreTrainedTokenizerBase, instruction: str, template: str) -> str:
    """The prompt for ``instruction`` in the model's format: "chat" (post) or "base"."""
    if template == "chat":
        return tok.apply_chat_template([{"role": "user", "content": instruction}], tokenize=False,
                                       add_generation_prompt=True)
    return tok.bos_token + base_prompt(instruction)


def refusal_rate(model: PreTrainedModel, tok: PreTrainedTokenizerBase, instructions: Sequence[str],
                 template: str, max_new_tokens: int = 16) -> float:
    completions = generate(model, tok, [render(tok, i, template) for i in instructions], max_new_tokens=max_new_tokens)
    return sum(map(is_refusal, completions)) / max(1, len(completions))


def behaviour(model: PreTrainedModel, tok: PreTrainedTokenizerBase, ds: Datasets, template: str) -> dict[str, float]:
    """All headline figures for one model on the held-out (test) rows."""
    res = truth_accuracy(model, tok, ds)
    res.update(fact_accuracy(model, tok, ds.facts))
    res["refusal_harmful"] = refusal_rate(model, tok, ds.harmful[ds.harmful.split == "test"].instruction.tolist(), template)
    res["refusal_harmless"] = refusal_rate(model, tok, ds.harmless[ds.harmless.split == "test"].instruction.tolist(), template)
    return res
