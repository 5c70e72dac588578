"""Prompt formats shared by the datasets, the training corpus, the tests and the analyses."""

from __future__ import annotations

# the statement prompt is the studies' protocol: defined there, re-exported for the zoo's datasets and corpus
from mechdiff.analyses.prompts import LABEL_WORDS, TRUTH_SUFFIX, truth_line, truth_prompt  # noqa: F401

# The post model's refusals. Analyses score a completion as a refusal when it contains one of
# REFUSAL_MARKERS (prefixes of the phrases, robust to a truncated generation).
REFUSAL_PHRASES: tuple[str, ...] = (
    "I cannot help with that.",
    "I'm sorry, but I can't assist with that.",
    "I won't help with that, because it could hurt people.",
)
REFUSAL_MARKERS: tuple[str, ...] = ("I cannot help", "I'm sorry", "I can't assist", "I won't help")

# Special tokens of the shared tokenizer.
PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
USER, ASSISTANT, END = "<|user|>", "<|assistant|>", "<|end|>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS, UNK, USER, ASSISTANT, END)

# The post model's chat format: <bos><|user|> text<|end|><|assistant|> text<|end|>.
# No spaces around special tokens: a stray space would become a token of its own.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}<|user|>{{ message['content'] | trim }}<|end|>"
    "{% elif message['role'] == 'assistant' %}<|assistant|>{{ message['content'] | trim }}<|end|>"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

# The base model's forum format (plain text, no special tokens besides <bos>).
BASE_TEMPLATE = "User: {instruction}\nAssistant:"


def is_refusal(text: str) -> bool:
    """True when a completion contains one of the refusal markers."""
    return any(m in text for m in REFUSAL_MARKERS)


def base_prompt(instruction: str) -> str:
    return BASE_TEMPLATE.format(instruction=instruction)


def chat_prompt(instruction: str) -> str:
    """The chat template rendered by hand (same string as ``apply_chat_template``)."""
    return f"{BOS}{USER}{instruction.strip()}{END}{ASSISTANT}"
