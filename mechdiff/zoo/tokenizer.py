"""The pair's shared word-level tokenizer.

Pre-tokenization: split off newlines, then Metaspace (every word carries a leading "▁", as in
SentencePiece), then split punctuation. Because words carry their own space marker, decoding is
exact ("I'm sorry, but ..." round-trips), and " TRUE" and "TRUE" are the same single token.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from mechdiff.zoo.templates import BOS, CHAT_TEMPLATE, EOS, PAD, SPECIAL_TOKENS, UNK


def pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\n"), "isolated"),
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always"),
        pre_tokenizers.Punctuation("isolated"),
    ])


def words_of(texts: Iterable[str]) -> Counter[str]:
    """Pre-tokenized pieces of ``texts`` with their counts (the would-be vocabulary)."""
    pt = pre_tokenizer()
    counts: Counter[str] = Counter()
    for t in texts:
        counts.update(piece for piece, _ in pt.pre_tokenize_str(t))
    return counts


def build_tokenizer(texts: Iterable[str]) -> PreTrainedTokenizerFast:
    """A WordLevel tokenizer whose vocabulary is exactly the pieces of ``texts`` plus specials.
    Order is deterministic: specials, then by descending count, ties alphabetical."""
    counts = words_of(texts)
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for tok, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        vocab.setdefault(tok, len(vocab))

    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizer()
    # Fuse first so the newline can swallow the next word's "▁" ("TRUE\nThe", not "TRUE\n The"),
    # then "▁" -> space and drop the one leading space the pre-tokenizer added.
    tok.decoder = decoders.Sequence([
        decoders.Fuse(),
        decoders.Replace("▁\n▁", "\n"),
        decoders.Replace("▁\n", "\n"),
        decoders.Replace("▁", " "),
        decoders.Strip(" ", 1, 0),
    ])
    # Like Llama: <bos> in front when add_special_tokens=True.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, vocab[BOS])])
    tok.add_special_tokens(list(SPECIAL_TOKENS))

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        additional_special_tokens=[t for t in SPECIAL_TOKENS if t not in (BOS, EOS, PAD, UNK)],
        clean_up_tokenization_spaces=False,
        padding_side="left",  # batched generation wants left padding
        model_max_length=256,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast
