"""Loading a causal LM and its tokenizer, with the provenance mechdiff records next to activations."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mechdiff.engine.adapter import ArchAdapter

__all__ = ["LoadedModel", "ModelLoadError", "load_model", "resolve_device", "resolve_dtype", "tokenizer_hash"]


class ModelLoadError(OSError):
    """A model could not be loaded; the message says why and what to do."""


_DTYPE_NAMES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}

_SAFETENSORS_GLOBS = ("*.safetensors",)
_PICKLE_GLOBS = ("*.bin", "*.pt", "*.pth", "*.ckpt")


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPE_NAMES[str(dtype).lower().removeprefix("torch.")]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use float32, float16 or bfloat16") from None


def resolve_device(device: str | torch.device) -> torch.device:
    """'cpu' | 'cuda' | 'cuda:N' | 'auto' (cuda if available, else cpu) -> torch.device; fails clearly without CUDA."""
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelLoadError(
                f"device {str(device)!r} requested but CUDA is not available "
                f"(torch {torch.__version__}); use device='cpu' or 'auto'"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ModelLoadError(f"device {str(device)!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    return dev


# -- hashing -------------------------------------------------------------------------------------

# (resolved path, size, mtime_ns) -> sha256 hex; weights are hashed once per process.
_FILE_HASH_CACHE: dict[tuple[str, int, int], str] = {}


def _file_sha256(path: Path, chunk: int = 1 << 23) -> str:
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _FILE_HASH_CACHE:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(chunk):
                h.update(block)
        _FILE_HASH_CACHE[key] = h.hexdigest()
    return _FILE_HASH_CACHE[key]


def _weight_files(directory: Path, globs: tuple[str, ...]) -> list[Path]:
    return sorted({p for g in globs for p in directory.glob(g) if p.is_file()})


def _weights_hash(files: list[Path]) -> str:
    """sha256 over (name, per-file sha256) pairs, so it is independent of directory location."""
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode())
        h.update(b"\0")
        h.update(_file_sha256(p).encode())
        h.update(b"\n")
    return "sha256:" + h.hexdigest()


def local_weights_hash(path_or_id: str, *, allow_pickle: bool = False) -> str | None:
    """The ``weights_hash`` a local model directory will load with, without loading it (None for hub ids).

    Lets a caller refuse a store made by another model before spending time on loading weights.
    """
    local = Path(path_or_id).expanduser()
    if not local.exists():
        return None
    return _weights_hash(_check_local_dir(local, allow_pickle))


def tokenizer_hash(tokenizer: Any) -> str:
    """sha256 of the tokenizer's full definition (tokenizer.json content for fast tokenizers).

    The JSON is re-serialised with sorted keys so the hash does not depend on formatting.
    Slow tokenizers fall back to the sorted vocabulary plus special tokens.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        canonical = json.dumps(json.loads(backend.to_str()), sort_keys=True, ensure_ascii=False)
    else:
        vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: (kv[1], kv[0]))
        canonical = json.dumps(
            {"vocab": vocab, "special": {k: str(v) for k, v in tokenizer.special_tokens_map.items()}},
            sort_keys=True,
            ensure_ascii=False,
        )
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


def _hub_commit(model_id: str, revision: str | None) -> str | None:
    """The commit a hub id + revision resolved to, from the local HF cache (works offline)."""
    try:
        from transformers.utils.hub import cached_file, extract_commit_hash

        resolved = cached_file(model_id, "config.json", revision=revision)
        return extract_commit_hash(resolved, None)
    except Exception:  # provenance is best effort; loading already succeeded
        return None


# -- the loaded model --------------------------------------------------------------------------


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: Any
    adapter: ArchAdapter
    model_id: str
    revision: str | None
    weights_hash: str
    tokenizer_hash: str
    dtype: torch.dtype
    device: torch.device
    is_local: bool = True
    device_map: Any = None
    extra: dict[str, Any] = field(default_factory=dict)

    def provenance(self) -> dict[str, Any]:
        """JSON-serialisable description of exactly what was loaded."""
        import transformers

        try:
            from mechdiff import __version__ as mechdiff_version
        except Exception:  # pragma: no cover - mechdiff/__init__ is someone else's file
            mechdiff_version = None
        return {
            "model_id": self.model_id,
            "revision": self.revision,
            "source": "local" if self.is_local else "hub",
            "weights_hash": self.weights_hash,
            "tokenizer_hash": self.tokenizer_hash,
            "tokenizer_class": type(self.tokenizer).__name__,
            "dtype": str(self.dtype).removeprefix("torch."),
            "device": str(self.device),
            "device_map": None if self.device_map is None else str(self.device_map),
            "attn_implementation": getattr(getattr(self.model, "config", None), "_attn_implementation", None),
            "architecture": self.adapter.describe(),
            "transformers_version": transformers.__version__,
            "torch_version": torch.__version__,
            "mechdiff_version": mechdiff_version,
            **self.extra,
        }


# -- loading ---------------------------------------------------------------------------------------


def _looks_like_path(s: str) -> bool:
    # Hub ids are "name" or "org/name"; anything else that is not on disk is a path the user meant.
    return s.startswith(("/", "./", "../", "~", ".\\")) or s.count("/") > 1 or (os.sep != "/" and os.sep in s)


def _check_local_dir(path: Path, allow_pickle: bool) -> list[Path]:
    """Validate a local model directory; return the weight files that will be loaded (and hashed)."""
    if not path.is_dir():
        raise ModelLoadError(f"model path {str(path)!r} is not a directory")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"model directory {str(path)!r} has no config.json")
    safetensors = _weight_files(path, _SAFETENSORS_GLOBS)
    if safetensors:
        return safetensors
    pickles = _weight_files(path, _PICKLE_GLOBS)
    if pickles and not allow_pickle:
        raise ModelLoadError(
            f"model directory {str(path)!r} has only pickle weights ({', '.join(p.name for p in pickles[:3])}), "
            "no .safetensors. Pickle files can run arbitrary code when loaded; if you trust them, pass "
            "allow_pickle=True (`--allow-pickle` on the command line), or convert them to safetensors."
        )
    if not pickles:
        raise ModelLoadError(f"model directory {str(path)!r} has no weight files (*.safetensors)")
    return pickles


def load_model(
    path_or_id: str | os.PathLike[str],
    *,
    revision: str | None = None,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    device_map: str | dict[str, Any] | None = None,
    attn_implementation: str | None = None,
    padding_side: str | None = None,
) -> LoadedModel:
    """Load a causal LM + tokenizer from a local directory or a hub id, in eval mode.

    Args:
        path_or_id: a local directory (``save_pretrained`` layout) or a hub id ("org/name").
            With ``HF_HUB_OFFLINE=1`` hub ids resolve from the local cache only.
        revision: hub branch / tag / commit (ignored for local directories, but recorded).
        dtype: "float32" | "float16" | "bfloat16" or a ``torch.dtype``.
        device: "cpu" | "cuda" | "cuda:N" | "auto". Ignored when ``device_map`` is given.
        allow_pickle: permit .bin / .pt weights (arbitrary code on load); safetensors only otherwise.
        trust_remote_code: passed to transformers; off by default.
        device_map: passed to ``from_pretrained`` (e.g. "auto" to shard over GPUs).
        attn_implementation: "eager" | "sdpa" | ...; None keeps the transformers default.
        padding_side: "left" | "right"; None keeps the tokenizer's own.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = resolve_dtype(dtype)
    dev = resolve_device(device) if device_map is None else None
    model_id = os.fspath(path_or_id)
    local = Path(model_id).expanduser()
    is_local = local.exists()
    if not is_local and _looks_like_path(model_id):
        raise ModelLoadError(f"model directory {model_id!r} does not exist")

    weight_files = _check_local_dir(local, allow_pickle) if is_local else []
    source = str(local) if is_local else model_id
    common: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if revision is not None and not is_local:
        common["revision"] = revision

    model_kwargs: dict[str, Any] = {"dtype": torch_dtype, **common}
    if not allow_pickle:
        model_kwargs["use_safetensors"] = True
    if device_map is not None:
        model_kwargs["device_map"] = device_map
    if attn_implementation is not None:
        model_kwargs["attn_implementation"] = attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **model_kwargs)
    except (OSError, ValueError) as e:
        msg = str(e)
        if not allow_pickle and "safetensors" in msg.lower():
            raise ModelLoadError(
                f"could not load {model_id!r}: no safetensors weights (model.safetensors or its index) found. "
                "If it only has pickle weights (.bin) and you trust them, pass allow_pickle=True "
                "(`--allow-pickle` on the command line)."
            ) from e
        raise ModelLoadError(f"could not load model {model_id!r}: {msg}") from e
    if dev is not None:
        model = model.to(dev)
    model.eval()

    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **common)
        tokenizer = _honour_tokenizer_json(tokenizer, source, common)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"could not load the tokenizer of {model_id!r}: {e}") from e
    _ensure_pad_token(tokenizer, model)
    if padding_side is not None:
        tokenizer.padding_side = padding_side

    adapter = ArchAdapter(model)
    if is_local:
        weights_hash = _weights_hash(weight_files)
    else:
        commit = _hub_commit(model_id, revision)
        weights_hash = f"git:{commit}" if commit else f"unresolved:{revision or 'main'}"
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        adapter=adapter,
        model_id=model_id,
        revision=revision,
        weights_hash=weights_hash,
        tokenizer_hash=tokenizer_hash(tokenizer),
        dtype=torch_dtype,
        device=dev if dev is not None else adapter.embed.weight.device,
        is_local=is_local,
        device_map=device_map,
    )


def _backend_model_type(tokenizer: Any) -> str | None:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    return json.loads(backend.to_str()).get("model", {}).get("type")


def _honour_tokenizer_json(tokenizer: Any, source: str, common: dict[str, Any]) -> Any:
    """Undo AutoTokenizer's per-model-type class override when it contradicts tokenizer.json.

    transformers 5.x forces e.g. ``Qwen2Tokenizer`` (a BPE rebuild) for every ``qwen2`` model,
    whatever tokenizer_config.json declares; a word-level tokenizer then maps every word to
    nothing. If the tokenizer.json on disk has a different model type than what was built, load
    the file as it is.
    """
    try:
        from transformers.utils.hub import cached_file

        path = cached_file(
            source, "tokenizer.json", revision=common.get("revision"), _raise_exceptions_for_missing_entries=False
        )
        if path is None:
            return tokenizer
        with open(path, encoding="utf-8") as f:
            file_type = json.load(f).get("model", {}).get("type")
    except (OSError, ValueError):
        return tokenizer
    loaded_type = _backend_model_type(tokenizer)
    if file_type is None or loaded_type is None or file_type == loaded_type:
        return tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(source, **common)


def _ensure_pad_token(tokenizer: Any, model: nn.Module) -> None:
    """Batching needs a pad token. Reuse eos (padded positions are masked, so which id does not
    matter) rather than adding a token, which would change the vocabulary."""
    if tokenizer.pad_token is None:
        for candidate in (tokenizer.eos_token, tokenizer.bos_token, tokenizer.unk_token):
            if candidate is not None:
                tokenizer.pad_token = candidate
                break
        else:
            raise ModelLoadError(
                f"tokenizer {type(tokenizer).__name__} has no pad, eos, bos or unk token to pad batches with"
            )
    gen = getattr(model, "generation_config", None)
    if gen is not None and getattr(gen, "pad_token_id", None) is None:
        gen.pad_token_id = tokenizer.pad_token_id
