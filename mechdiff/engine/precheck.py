"""Checks of an extraction that need only the model's config and tokenizer, run before its weights load.

Loading weights is the slow part of a run; a store group made with another capture spec, dataset or
tokenizer, a prompt longer than the context or a missing position marker should be refused before it.
The provenance compared here is computed by the functions :func:`mechdiff.engine.extract.prepare` uses
(``CaptureSpec.resolve``, ``tokenize``, ``Positions.counts``, ``tokenizer_hash``, ``identity_keys``),
from the tokenizer :func:`~mechdiff.engine.models.load_tokenizer` gives and the config's layer count and
context, so the early answer is the one ``extract`` would give after loading.
"""

from __future__ import annotations

import os
from typing import Any

from mechdiff.engine.data import PromptSet
from mechdiff.engine.capture import CaptureSpec, ResolvedCapture, capture_of, describe_differences
from mechdiff.engine.extract import tokenize_prompts
from mechdiff.engine.tokenization import Tokenization, tokenization_key
from mechdiff.engine.groups import identity_keys
from mechdiff.engine.models import GGUF_INSTALL_HINT, ModelLoadError, check_model_path, gguf_source
from mechdiff.engine.store import ActivationStore, StoreMismatchError

__all__ = ["read_config", "config_n_layers", "config_max_positions", "early_tokenization", "early_provenance",
           "check_store_group"]


def read_config(model: str | os.PathLike[str], *, trust_remote_code: bool = False, gguf_file: str | None = None) -> Any:
    """The model's config (the text config of a multimodal one), without its weights; a GGUF checkpoint's
    from its header."""
    from transformers import AutoConfig

    model = os.fspath(model)
    check_model_path(model, gguf_file)
    gg = gguf_source(model, gguf_file)
    source, kwargs = (gg.source, gg.kwargs()) if gg is not None else (model, {})
    try:
        cfg = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code, **kwargs)
    except ImportError as e:  # transformers' check that gguf is installed
        raise ModelLoadError(f"model {model}: cannot read its config ({str(e).splitlines()[0]}; {GGUF_INSTALL_HINT})") from None
    except Exception as e:  # HF raises OSError or ValueError variants; one clear line is what matters
        raise ModelLoadError(f"model {model}: cannot read its config ({str(e).splitlines()[0]})") from None
    return getattr(cfg, "text_config", None) or cfg


def config_n_layers(cfg: Any, model: str) -> int:
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(getattr(cfg, key, None), int):
            return int(getattr(cfg, key))
    raise ValueError(f"model {model}: its config names no layer count")


def config_max_positions(cfg: Any) -> int | None:
    """The context ``ArchAdapter.max_positions`` reads from the same config keys."""
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def early_tokenization(
    tokenizer: Any,
    n_layers: int,
    max_positions: int | None,
    prompts: PromptSet,
    spec: CaptureSpec,
    *,
    max_length: int | None = None,
    truncate: bool = False,
    definition: str | None = None,
) -> Tokenization:
    """The dataset tokenized as ``prepare`` will tokenize it, for ``prepare(..., reuse=...)`` once the weights
    have loaded (it takes the ids only under an equal key, after a spot check); raises as ``prepare`` does on an
    empty dataset, bad layers, prompts longer than the context (unless ``truncate``) or a missing marker.
    ``definition``: the tokenizer's hash, when already computed."""
    _, _, ids, counts = tokenize_prompts(tokenizer, n_layers, max_positions, prompts, spec, max_length=max_length,
                                         truncate=truncate)
    key = tokenization_key(tokenizer, prompts, spec.positions, spec.template, max_length=max_length or max_positions,
                           truncate=truncate, definition=definition)
    return Tokenization(key, ids, counts)


def early_provenance(tokenizer_digest: str, n_layers: int, prompts: PromptSet, spec: CaptureSpec) -> dict[str, Any]:
    """The provenance entries of ``prepare`` that need no weights (after :func:`early_tokenization` has checked
    the dataset against the tokenizer and the config); ``tokenizer_digest``: the tokenizer's
    :func:`~mechdiff.engine.models.tokenizer_hash`."""
    return {
        "tokenizer_hash": tokenizer_digest,
        "dataset": prompts.source,
        "dataset_hash": prompts.hash,
        "capture": spec.resolve(n_layers).to_json(),
    }


def check_store_group(
    url: str,
    group: str,
    early: dict[str, Any],
    *,
    shard_size: int,
    storage_options: dict | None = None,
    append: bool = False,
) -> None:
    """Refuse to append to an existing group that ``extract`` would refuse: another model (``model_id`` /
    ``weights_hash`` in ``early`` where known), tokenizer, dataset, capture spec or shard size.

    A group that does not exist yet passes; one that exists but cannot be opened (incomplete, not a
    mechdiff group) raises what opening it raises.
    """
    try:
        st = ActivationStore.open(url, group, storage_options=storage_options)
    except FileNotFoundError:
        return  # a new group: nothing to compare
    have = st.provenance
    keys = [k for k in identity_keys(early) if k in early and not (append and k == "dataset_hash")]  # append: grows
    if "model_id" in keys and "weights_hash" in keys:
        keys.remove("model_id")  # local weights are known by their hash; the path may have moved
    parts = [_difference(k, have, early) for k in keys if have.get(k) != early.get(k)]
    if st.shard_size != shard_size:
        parts.append(f"shard size differs: stored {st.shard_size}, this run {shard_size} (--shard-size)")
    if parts:
        raise StoreMismatchError(f"store {url} group {group} " + "; ".join(parts) + "; use another --group or remove this one")


def _difference(key: str, have: dict[str, Any], new: dict[str, Any]) -> str:
    old, cur = have.get(key), new.get(key)
    if key in ("model_id", "weights_hash"):
        return (f"was made by model {have.get('model_id')!r}{_hash(have.get('weights_hash'))}, "
                f"this run uses model {new.get('model_id')!r}{_hash(new.get('weights_hash'))}")
    if key == "dataset_hash":
        return (f"was made from another dataset: stored {have.get('dataset')!r}{_hash(old)}, "
                f"this run {new.get('dataset')!r}{_hash(cur)} (if the dataset grew at its end, --append adds the "
                "new examples)")
    if key == "capture":
        return f"was made with another capture spec: {_spec_difference(old, cur)}"
    if key == "tokenizer_hash":
        return f"was made with another tokenizer: stored{_hash(old)}, this run{_hash(cur)}"
    return f"{key} differs: stored {old!r}, this run {cur!r}"


def _spec_difference(old: Any, new: Any) -> str:
    """The capture fields that differ, stored vs this run (both records whole when the stored one is unreadable)."""
    try:
        stored = capture_of({"capture": old}) if old is not None else None
    except ValueError:
        stored = None
    if stored is None:
        return f"stored {old!r}, this run {new!r}"
    return describe_differences(stored.differences(ResolvedCapture.from_json(new)))


def _hash(h: Any) -> str:
    if not h:
        return ""
    h = str(h)
    return f" (hash {h[:16]}{'..' if len(h) > 16 else ''})"
