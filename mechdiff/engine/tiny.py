"""Tiny random-weight causal LMs and a word-level tokenizer, for tests and the embedded zoo.

Every architecture the adapter supports can be built here, from a config alone (no hub access).
The tokenizer knows the words ``w0 .. wN`` plus the few words its chat template uses, so any
prompt from :func:`random_prompts` and any chat-formatted prompt tokenizes without ``<unk>``.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch

TINY_ARCHS: tuple[str, ...] = (
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma",
    "gemma2",
    "gpt2",
    "gpt_neox",
    "phi3",
    "olmo2",
)

SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<bos>", "<eos>", "<unk>")
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
# Words the chat template emits. They sit at the *end* of the vocabulary so that "w{i}" always
# has id i + len(SPECIAL_TOKENS).
TEMPLATE_WORDS: tuple[str, ...] = ("System", "User", "Assistant", ":")

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}System: {{ message['content'] }}\n"
    "{% elif message['role'] == 'user' %}User: {{ message['content'] }}\n"
    "{% else %}Assistant: {{ message['content'] }}{{ eos_token }}\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)

# No attention kernel is pinned: config.json does not record one, so a loaded model gets the HF
# default (sdpa; eager for Gemma2). Both give last-token states for left/right-padded batches
# within ~2e-6 of single runs in fp32 (tests/test_models.py checks it).

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def n_tiny_words(vocab_size: int) -> int:
    """Number of ``w{i}`` words in a tiny tokenizer of ``vocab_size`` entries."""
    n = vocab_size - len(SPECIAL_TOKENS) - len(TEMPLATE_WORDS)
    if n < 1:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: need at least "
            f"{len(SPECIAL_TOKENS) + len(TEMPLATE_WORDS) + 1}"
        )
    return n


def tiny_vocab(vocab_size: int) -> dict[str, int]:
    """The tiny tokenizer's vocabulary: specials, ``w0..w{n-1}``, then the template words."""
    words = [f"w{i}" for i in range(n_tiny_words(vocab_size))]
    tokens = [*SPECIAL_TOKENS, *words, *TEMPLATE_WORDS]
    assert len(tokens) == vocab_size
    return {t: i for i, t in enumerate(tokens)}


def build_tokenizer(vocab_size: int, *, max_positions: int = 256):
    """A word-level ``PreTrainedTokenizerFast``: whitespace split, ``<bos>`` prepended."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab=tiny_vocab(vocab_size), unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()  # splits "User:" into "User", ":"
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A",
        pair="<bos> $A $B:1",
        special_tokens=[("<bos>", BOS_ID)],
    )
    # WordLevel has no decoder of its own; join words with single spaces.
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        chat_template=CHAT_TEMPLATE,
        model_max_length=max_positions,
        padding_side="left",
    )


def _config(
    arch: str, *, n_layers: int, d_model: int, n_heads: int, d_mlp: int, vocab_size: int, max_positions: int
):
    from transformers import AutoConfig

    if d_model % n_heads:
        raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
    head_dim = d_model // n_heads
    # Grouped-query attention where the architecture has it, so the tiny models exercise it.
    n_kv = n_heads // 2 if n_heads % 2 == 0 else n_heads
    ids: dict[str, Any] = dict(pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID)
    common: dict[str, Any] = dict(
        vocab_size=vocab_size,
        tie_word_embeddings=False,
        **ids,
    )
    llama_like: dict[str, Any] = dict(
        hidden_size=d_model,
        intermediate_size=d_mlp,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv,
        head_dim=head_dim,
        max_position_embeddings=max_positions,
    )
    if arch in ("llama", "mistral", "qwen2", "qwen3", "olmo2", "gemma"):
        kw = dict(llama_like)
    elif arch == "gemma2":
        # query_pre_attn_scalar defaults to 256 (the real model's head_dim); match ours.
        kw = dict(llama_like, query_pre_attn_scalar=head_dim, sliding_window=max_positions)
    elif arch == "phi3":
        kw = dict(llama_like, original_max_position_embeddings=max_positions)
        kw.pop("head_dim")
    elif arch == "gpt_neox":
        kw = dict(llama_like, use_parallel_residual=True)
        for k in ("num_key_value_heads", "head_dim"):
            kw.pop(k)
    elif arch == "gpt2":
        kw = dict(n_embd=d_model, n_layer=n_layers, n_head=n_heads, n_inner=d_mlp, n_positions=max_positions)
    else:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose from {', '.join(TINY_ARCHS)}")
    cfg = AutoConfig.for_model(arch, **common, **kw)
    # Dropout off everywhere, so even a forward in train mode is deterministic.
    for name, value in list(cfg.to_dict().items()):
        if isinstance(value, float) and ("dropout" in name or name.endswith("pdrop")):
            setattr(cfg, name, 0.0)
    return cfg


def build_tiny_model(
    path: str | Path,
    arch: str = "llama",
    *,
    n_layers: int = 2,
    d_model: int = 64,
    n_heads: int = 4,
    d_mlp: int = 128,
    vocab_size: int = 512,
    max_positions: int = 256,
    seed: int = 0,
    dtype: str = "float32",
) -> Path:
    """Write a random-weight ``arch`` model and its tokenizer to ``path`` (safetensors); return ``path``."""
    from transformers import AutoModelForCausalLM

    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = _config(
        arch,
        n_layers=n_layers,
        d_model=d_model,
        n_heads=n_heads,
        d_mlp=d_mlp,
        vocab_size=vocab_size,
        max_positions=max_positions,
    )
    # Seed a private generator state: building a model must not disturb the caller's RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg)
    model = model.to(_DTYPES[dtype]).eval()
    model.save_pretrained(path, safe_serialization=True)
    build_tokenizer(vocab_size, max_positions=max_positions).save_pretrained(path)
    return path


def random_prompts(
    n: int,
    min_tokens: int,
    max_tokens: int,
    *,
    vocab_size: int | None = None,
    seed: int = 0,
    vocab_words: int | None = None,
) -> list[str]:
    """``n`` prompts of random words ``w{i}``, each ``min_tokens..max_tokens`` tokens long (inclusive).

    The token count includes the ``<bos>`` the tokenizer prepends, so a prompt has
    ``tokens - 1`` words. Give ``vocab_size`` (the tokenizer's size) or ``vocab_words``
    (how many ``w{i}`` words to draw from).
    """
    if vocab_words is None:
        if vocab_size is None:
            raise TypeError("random_prompts needs vocab_size or vocab_words")
        vocab_words = n_tiny_words(vocab_size)
    if not 2 <= min_tokens <= max_tokens:
        raise ValueError(f"need 2 <= min_tokens <= max_tokens, got {min_tokens}, {max_tokens}")
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        n_words = rng.randint(min_tokens, max_tokens) - 1
        out.append(" ".join(f"w{rng.randrange(vocab_words)}" for _ in range(n_words)))
    return out
