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

from mechdiff.errors import MechdiffError
from mechdiff.engine.adapter import ArchAdapter

__all__ = [
    "GGUF_INSTALL_HINT", "GGUFSource", "LoadedModel", "ModelLoadError", "check_model_path", "gguf_source",
    "load_model", "load_tokenizer", "local_weights_hash", "resolve_device", "resolve_dtype", "tokenizer_hash",
]


class ModelLoadError(MechdiffError, OSError):
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


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device | str | None = None) -> torch.dtype:
    """A dtype name or ``torch.dtype``; ``auto`` (or None): bfloat16 on a GPU that has it (about 10x faster than
    float32 on current GPUs, with float32's range), float32 elsewhere."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or str(dtype).lower() == "auto":
        dev = torch.device(device) if device is not None else torch.device("cpu")
        if dev.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    try:
        return _DTYPE_NAMES[str(dtype).lower().removeprefix("torch.")]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use auto, float32, float16 or bfloat16") from None


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


def local_weights_hash(path_or_id: str, *, allow_pickle: bool = False, gguf_file: str | None = None) -> str | None:
    """The ``weights_hash`` a local model directory or GGUF file will load with, without loading it (None
    for hub ids).

    Lets a caller refuse a store made by another model before spending time on loading weights.
    """
    gg = gguf_source(path_or_id, gguf_file)
    if gg is not None:
        return gg.weights_hash() if gg.is_local else None
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


# -- GGUF checkpoints --------------------------------------------------------------------------------

GGUF_INSTALL_HINT = "pip install mechdiff[gguf]"

# GGUF general.file_type values (llama.cpp's LLAMA_FTYPE_*), the names llama.cpp gives the files
_GGUF_FILE_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K", 11: "Q3_K_S",
    12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K",
    19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS", 23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL",
    26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S", 29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16",
    36: "TQ1_0", 37: "TQ2_0",
}


@dataclass(frozen=True)
class GGUFSource:
    """A GGUF checkpoint: the directory (or hub id) transformers loads from and the file name in it."""

    source: str
    file: str
    is_local: bool

    @property
    def path(self) -> Path:
        return Path(self.source) / self.file

    @property
    def model_id(self) -> str:
        """What provenance records: the file's path (a later run can load it from that alone)."""
        return str(self.path) if self.is_local else f"{self.source}:{self.file}"

    def kwargs(self) -> dict[str, Any]:
        return {"gguf_file": self.file}

    def check(self) -> None:
        """The file exists and the ``gguf`` package transformers reads it with is installed."""
        if self.is_local and not self.path.is_file():
            raise ModelLoadError(f"GGUF file {self.path} does not exist")
        require_gguf(self.model_id)

    def weights_hash(self) -> str:
        """sha256 of the file itself (what ``sha256sum`` prints), so a store made from it is recognised again."""
        return "sha256:" + _file_sha256(self.path)

    def quantization(self) -> str | None:
        """The file's quantization type (general.file_type: Q4_1, Q8_0, F16, ...); None if unreadable."""
        if not self.is_local:
            return None
        try:
            ftype = _gguf_file_type(self.path)
        except (OSError, ValueError):
            return None
        if ftype is None:
            return None
        return _GGUF_FILE_TYPES.get(ftype, f"file_type {ftype}")


def require_gguf(what: str) -> None:
    import importlib.util

    if importlib.util.find_spec("gguf") is None:
        raise ModelLoadError(f"loading the GGUF model {what} needs the gguf package: {GGUF_INSTALL_HINT}")


def gguf_source(path_or_id: str | os.PathLike[str], gguf_file: str | None = None) -> GGUFSource | None:
    """The GGUF checkpoint a model argument names, or None for a safetensors directory / hub id.

    ``path/to/model.gguf`` names a file; a directory (or hub id) plus ``gguf_file`` names the file inside it.
    """
    model_id = os.fspath(path_or_id)
    local = Path(model_id).expanduser()
    if gguf_file:
        name = os.fspath(gguf_file)
        if Path(name).name != name:
            raise ModelLoadError(f"--gguf-file {name!r} must be a file name inside the model directory")
        if local.is_file() and local.name == name:  # the file itself, named twice
            return GGUFSource(str(local.parent), name, True)
        if local.exists() or _looks_like_path(model_id):
            if local.exists() and not local.is_dir():
                raise ModelLoadError(f"model path {model_id!r} is not a directory (with --gguf-file, give its directory)")
            return GGUFSource(str(local), name, True)
        return GGUFSource(model_id, name, False)
    if local.suffix.lower() == ".gguf" and (local.is_file() or not local.exists()):
        return GGUFSource(str(local.parent), local.name, True)
    return None


def _gguf_file_type(path: Path) -> int | None:
    """general.file_type from a GGUF header, read directly (the key-value section only, not the tensors)."""
    import struct

    scalar = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
    with open(path, "rb") as f:
        def read(fmt: str):
            size = struct.calcsize(fmt)
            b = f.read(size)
            if len(b) != size:
                raise ValueError("truncated GGUF header")
            return struct.unpack(fmt, b)[0]

        def skip_value(vtype: int) -> None:
            if vtype in scalar:
                f.seek(struct.calcsize(scalar[vtype]), 1)
            elif vtype == 8:
                f.seek(read("<Q"), 1)
            elif vtype == 9:
                itype, count = read("<I"), read("<Q")
                if itype in scalar:
                    f.seek(struct.calcsize(scalar[itype]) * count, 1)
                else:
                    for _ in range(count):
                        skip_value(itype)
            else:
                raise ValueError(f"unknown GGUF value type {vtype}")

        if f.read(4) != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file")
        version = read("<I")
        if version < 2:
            raise ValueError(f"GGUF version {version} is not supported")
        read("<Q")  # tensor count
        for _ in range(read("<Q")):
            key = f.read(read("<Q")).decode("utf-8", "replace")
            vtype = read("<I")
            if key == "general.file_type" and vtype in scalar:
                return int(read(scalar[vtype]))
            skip_value(vtype)
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
    # Hub ids are "name" or "org/name" and never start with "."; anything else that is not on disk is a
    # path the user meant. (A single "/" is os.sep on POSIX, but "org/name" is how hub ids are written.)
    return s.startswith((".", "/", "~")) or s.count("/") > 1 or (os.sep != "/" and os.sep in s)


def check_model_path(path_or_id: str | os.PathLike[str], gguf_file: str | None = None) -> None:
    """Refuse a model that is meant as a local directory (or GGUF file) but is not there, before anything
    asks the hub (whose message for such a string is about repo-id syntax); a GGUF model also needs the
    ``gguf`` package."""
    model_id = os.fspath(path_or_id)
    gg = gguf_source(model_id, gguf_file)
    if gg is not None:
        gg.check()
        return
    if not Path(model_id).expanduser().exists() and _looks_like_path(model_id):
        raise ModelLoadError(f"model directory {model_id} does not exist")


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
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "cpu",
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    device_map: str | dict[str, Any] | None = None,
    attn_implementation: str | None = None,
    padding_side: str | None = None,
    gguf_file: str | None = None,
) -> LoadedModel:
    """Load a causal LM + tokenizer from a local directory, a GGUF file or a hub id, in eval mode.

    Args:
        path_or_id: a local directory (``save_pretrained`` layout), a ``.gguf`` file or a hub id ("org/name").
            With ``HF_HUB_OFFLINE=1`` hub ids resolve from the local cache only. A GGUF checkpoint loads
            through transformers' GGUF support (the ``gguf`` package: ``pip install mechdiff[gguf]``),
            dequantized to ``dtype``; it is not pickle, so it needs no ``allow_pickle``.
        revision: hub branch / tag / commit (ignored for local directories, but recorded).
        dtype: "auto" (bfloat16 on a GPU, float32 on the CPU) | "float32" | "float16" | "bfloat16" or a
            ``torch.dtype``.
        device: "cpu" | "cuda" | "cuda:N" | "auto". Ignored when ``device_map`` is given. A GPU model is loaded
            straight onto its device (no host copy of the weights first).
        allow_pickle: permit .bin / .pt weights (arbitrary code on load); safetensors only otherwise.
        trust_remote_code: passed to transformers; off by default.
        device_map: passed to ``from_pretrained`` (e.g. "auto" to shard over GPUs).
        attn_implementation: "eager" | "sdpa" | ...; None keeps the transformers default.
        padding_side: "left" | "right"; None keeps the tokenizer's own.
        gguf_file: the GGUF file's name inside ``path_or_id`` (a directory or hub id); not needed when
            ``path_or_id`` is the ``.gguf`` file itself.
    """
    from transformers import AutoModelForCausalLM

    gg = gguf_source(path_or_id, gguf_file)
    if gg is not None:
        return _load_gguf_model(
            gg, revision=revision, dtype=dtype, device=device, trust_remote_code=trust_remote_code,
            device_map=device_map, attn_implementation=attn_implementation, padding_side=padding_side,
        )

    dev = resolve_device(device) if device_map is None else None
    torch_dtype = resolve_dtype(dtype, dev)
    model_id = os.fspath(path_or_id)
    local = Path(model_id).expanduser()
    check_model_path(model_id)
    is_local = local.exists()

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
    elif dev.type != "cpu":
        model_kwargs["device_map"] = {"": str(dev)}  # weights go straight to the device: no host copy per actor
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
    if dev is not None and dev.type == "cpu":
        model = model.to(dev)
    model.eval()

    tokenizer = load_tokenizer(model_id, revision=revision, trust_remote_code=trust_remote_code, padding_side=padding_side)
    _set_generation_pad(tokenizer, model)

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


def _load_gguf_model(
    gg: GGUFSource,
    *,
    revision: str | None,
    dtype: str | torch.dtype,
    device: str | torch.device,
    trust_remote_code: bool,
    device_map: str | dict[str, Any] | None,
    attn_implementation: str | None,
    padding_side: str | None,
) -> LoadedModel:
    """:func:`load_model` for a GGUF checkpoint: transformers dequantizes its tensors to ``dtype``."""
    from transformers import AutoModelForCausalLM

    dev = resolve_device(device) if device_map is None else None
    torch_dtype = resolve_dtype(dtype, dev)
    gg.check()
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code, **gg.kwargs()}
    if revision is not None and not gg.is_local:
        kwargs["revision"] = revision
    if device_map is not None:
        kwargs["device_map"] = device_map
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    dense = _gguf_dequantize_config()
    if dense is not None:
        kwargs["quantization_config"] = dense
    try:
        model = AutoModelForCausalLM.from_pretrained(gg.source, **kwargs)
    except ImportError as e:  # transformers' own check of gguf / accelerate
        raise ModelLoadError(f"could not load the GGUF model {gg.model_id}: {str(e).splitlines()[0]} ({GGUF_INSTALL_HINT})") from e
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ModelLoadError(f"could not load the GGUF model {gg.model_id}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    # dequantized weights come out as float32 whatever was asked; the run's dtype is the one asked for
    model = model.to(dtype=torch_dtype) if device_map is None else model
    if dev is not None:
        model = model.to(dev)
    model.eval()
    tokenizer = load_tokenizer(gg.source, revision=revision, trust_remote_code=trust_remote_code,
                               padding_side=padding_side, gguf_file=gg.file)
    _set_generation_pad(tokenizer, model)
    adapter = ArchAdapter(model)
    weights_hash = gg.weights_hash() if gg.is_local else f"unresolved:{revision or 'main'}:{gg.file}"
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        adapter=adapter,
        model_id=gg.model_id,
        revision=revision,
        weights_hash=weights_hash,
        tokenizer_hash=tokenizer_hash(tokenizer),
        dtype=torch_dtype,
        device=dev if dev is not None else adapter.embed.weight.device,
        is_local=gg.is_local,
        device_map=device_map,
        extra={"format": "gguf", "gguf_file": gg.file, "gguf_quantization": gg.quantization()},
    )


def _gguf_dequantize_config() -> Any:
    """Ask transformers for plain dense weights. Recent transformers can keep GGUF blocks packed behind
    kernel-backed linear modules (when the ``kernels`` package is there); hooks, weight reads and
    interventions need ordinary ``nn.Linear`` weights in the run's dtype. None on a transformers that
    always dequantizes."""
    try:
        from transformers import GgufConfig
    except ImportError:
        return None
    import inspect

    if "dequantize" not in inspect.signature(GgufConfig.__init__).parameters:
        return None
    return GgufConfig(dequantize=True)


def load_tokenizer(
    path_or_id: str | os.PathLike[str],
    *,
    revision: str | None = None,
    trust_remote_code: bool = False,
    padding_side: str | None = None,
    gguf_file: str | None = None,
) -> Any:
    """The tokenizer :func:`load_model` gives a model, without its weights: same class, pad token and so
    ``tokenizer_hash``, so checks against a store's provenance can run before the weights load. A GGUF
    checkpoint (a ``.gguf`` path, or a directory plus ``gguf_file``) carries its tokenizer inside."""
    from transformers import AutoTokenizer

    gg = gguf_source(path_or_id, gguf_file)
    if gg is not None:
        gg.check()
        kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code, **gg.kwargs()}
        if revision is not None and not gg.is_local:
            kwargs["revision"] = revision
        try:
            tokenizer = AutoTokenizer.from_pretrained(gg.source, **kwargs)
        except ImportError as e:
            raise ModelLoadError(f"could not load the tokenizer of {gg.model_id}: {str(e).splitlines()[0]} ({GGUF_INSTALL_HINT})") from e
        except (OSError, ValueError, KeyError) as e:
            raise ModelLoadError(f"could not load the tokenizer of {gg.model_id}: {e}") from e
        _ensure_pad_token(tokenizer)
        if padding_side is not None:
            tokenizer.padding_side = padding_side
        return tokenizer

    model_id = os.fspath(path_or_id)
    check_model_path(model_id)
    local = Path(model_id).expanduser()
    is_local = local.exists()
    source = str(local) if is_local else model_id
    common: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if revision is not None and not is_local:
        common["revision"] = revision
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **common)
        tokenizer = _honour_tokenizer_json(tokenizer, source, common)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"could not load the tokenizer of {model_id!r}: {e}") from e
    _ensure_pad_token(tokenizer)
    if padding_side is not None:
        tokenizer.padding_side = padding_side
    return tokenizer


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


def _ensure_pad_token(tokenizer: Any, model: nn.Module | None = None) -> None:
    """Batching needs a pad token. Reuse eos (padded positions are masked, so which id does not
    matter) rather than adding a token, which would change the vocabulary. With ``model``, its
    generation config pads with it too."""
    if tokenizer.pad_token is None:
        for candidate in (tokenizer.eos_token, tokenizer.bos_token, tokenizer.unk_token):
            if candidate is not None:
                tokenizer.pad_token = candidate
                break
        else:
            raise ModelLoadError(
                f"tokenizer {type(tokenizer).__name__} has no pad, eos, bos or unk token to pad batches with"
            )
    if model is not None:
        _set_generation_pad(tokenizer, model)


def _set_generation_pad(tokenizer: Any, model: nn.Module) -> None:
    gen = getattr(model, "generation_config", None)
    if gen is not None and getattr(gen, "pad_token_id", None) is None:
        gen.pad_token_id = tokenizer.pad_token_id
