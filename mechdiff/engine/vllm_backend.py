"""vLLM inside mechdiff: engine settings that let hooks run, the per-family layer lookup, hooks installed in
vLLM's workers, and the map from vLLM's flat token batch back to requests.

Read against vLLM 0.33.0 (V1 engine); the fallbacks cover older releases:

- Hooks need eager execution. ``LLM(enforce_eager=True)`` sets the compilation mode and the CUDA-graph mode to
  NONE (``vllm/config/vllm.py``); with the defaults the model is ``torch.compile``-d and replayed from CUDA graphs,
  and forward hooks added after start-up never run. :func:`engine_kwargs` forces it (or refuses), and every
  hooked call checks that each installed hook ran (:class:`HookNeverFiredError`).
- The model is reached with ``LLM.apply_model(fn)`` (``fn(model)`` on every worker, vLLM 0.33), else
  ``LLM.collective_rpc(fn(worker))`` (V1 before ``apply_model``), else through the engine's attributes (V0, or
  V1 with the engine core in this process). ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` keeps the engine core in this
  process, so functions reach the workers without vLLM's pickle fallback (``VLLM_ALLOW_INSECURE_SERIALIZATION``);
  with ``tensor_parallel_size > 1`` the executor cloudpickles them to its worker processes itself, and each rank
  holds the full residual stream after a layer (row-parallel outputs are all-reduced), so rank 0's capture serves.
- Decoder layers of llama, mistral, qwen2, qwen3, gemma, gemma2 and phi3 return ``(hidden, residual)``: the
  residual stream is their sum (the next layer's fused add-norm adds them). gpt2 blocks, and models served by
  vLLM's Transformers backend, return the stream itself.
- V1 flattens the requests of a step into one token dimension; the model is called with ``input_ids`` and
  ``positions`` keywords. A prompt's rows are a run of positions 0, 1, ... whose ids are the prompt's:
  :func:`match_requests` finds them (and refuses a prompt split over steps, or served from the prefix cache).
- Prefix caching reuses keys and values an earlier request computed (under other interventions, or skipping the
  rows an extraction needs): :func:`engine_kwargs` turns it off.
- vLLM 0.33 has its own hidden-state extraction (speculative method ``extract_hidden_states`` with the
  ``ExampleHiddenStatesConnector`` writing one safetensors file per request): experimental, all positions of every
  listed layer per request on disk; the hooks here serve the same layers and positions directly.
"""

from __future__ import annotations

import functools
import gc
import os
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from mechdiff.engine.adapter import LAYERS_PATHS, UnsupportedArchitectureError
from mechdiff.engine.sites import Intervention
from mechdiff.errors import MechdiffError

__all__ = [
    "VLLMUnavailableError", "HookSettingsError", "HookNeverFiredError", "PrefillSplitError", "vllm_available",
    "require_vllm", "engine_kwargs", "decoder_layers", "resid_of", "with_resid", "request_segments",
    "match_requests", "kept_rows", "release_cuda", "share_beside", "share_beside_resident", "HookedLLM",
    "CaptureResult", "VLLM_LAYER_PATHS",
]

#: Where each family's decoder layers live in vLLM's model classes (``vllm/model_executor/models/*.py``): the HF
#: layout for the families the adapter supports. Others are found by the adapter's candidates, also under
#: ``model.`` (vLLM's Transformers backend keeps the HF model as ``.model``).
VLLM_LAYER_PATHS: dict[str, str] = {
    "llama": "model.layers", "mistral": "model.layers", "qwen2": "model.layers", "qwen3": "model.layers",
    "gemma": "model.layers", "gemma2": "model.layers", "phi3": "model.layers", "olmo2": "model.layers",
    "gpt2": "transformer.h", "gpt_neox": "gpt_neox.layers",
}
_CANDIDATES: tuple[str, ...] = (*LAYERS_PATHS, *(f"model.{p}" for p in LAYERS_PATHS))


class VLLMUnavailableError(MechdiffError, RuntimeError):
    """vLLM or a CUDA GPU is missing; the message says which."""


class HookSettingsError(MechdiffError, ValueError):
    """Engine settings under which hooks cannot run (or would read stale state)."""


class HookNeverFiredError(MechdiffError, RuntimeError):
    """A hook was installed but the forward passes never ran it: the model vLLM executes is not the module hooked."""


class PrefillSplitError(MechdiffError, RuntimeError):
    """A prompt's rows did not all come through one forward pass, so its activations cannot be read whole."""


def vllm_available() -> tuple[bool, str]:
    """(usable, reason) for vLLM on this machine: installed, and a CUDA GPU visible."""
    try:
        import vllm  # noqa: F401
    except ImportError:
        return False, "vLLM is not installed (pip install 'mechdiff[vllm]')"
    if not torch.cuda.is_available():
        return False, "vLLM needs a CUDA GPU and none is visible"
    return True, ""


def require_vllm() -> None:
    ok, why = vllm_available()
    if not ok:
        raise VLLMUnavailableError(why)


def vllm_version() -> str | None:
    try:
        import vllm

        return str(getattr(vllm, "__version__", None))
    except ImportError:
        return None


# ---------------------------------------------------------------------------------------------
# engine settings


def engine_kwargs(user: Mapping[str, Any], *, hooks: bool, tensor_parallel_size: int = 1,
                  gpu_memory_utilization: float | None = None) -> dict[str, Any]:
    """``LLM(...)`` keyword arguments: the caller's, with what hooks need. ``hooks``: hooks will be installed
    (interventions or captures): ``enforce_eager=True`` (refused when the caller gave False) and no prefix
    caching (refused when the caller asked for it: a cached prefix holds keys computed under other hooks).
    Tensor parallelism goes through vLLM's own ``tensor_parallel_size``; pipeline stages are refused with hooks
    (a stage holds only some layers, and its hooks would be checked against all)."""
    kw = dict(user)
    if "tensor_parallel_size" in kw and kw["tensor_parallel_size"] != tensor_parallel_size:
        raise HookSettingsError(f"tensor_parallel_size given twice ({kw['tensor_parallel_size']} and "
                                f"{tensor_parallel_size})")
    if not isinstance(tensor_parallel_size, int) or isinstance(tensor_parallel_size, bool) or tensor_parallel_size < 1:
        raise HookSettingsError(f"tensor_parallel_size={tensor_parallel_size!r}: a whole number of GPUs, at least 1")
    if torch.cuda.is_available() and tensor_parallel_size > torch.cuda.device_count():
        raise HookSettingsError(f"tensor_parallel_size={tensor_parallel_size} but only {torch.cuda.device_count()} "
                                "CUDA device(s) are visible")
    kw["tensor_parallel_size"] = tensor_parallel_size
    if gpu_memory_utilization is not None:
        if not 0 < gpu_memory_utilization <= 1:
            raise HookSettingsError(f"gpu_memory_utilization={gpu_memory_utilization}: a fraction in (0, 1]")
        kw["gpu_memory_utilization"] = gpu_memory_utilization
    if hooks:
        if kw.get("enforce_eager") is False:
            raise HookSettingsError(
                "enforce_eager=False: vLLM then compiles the model and replays CUDA graphs, where PyTorch hooks "
                "do not run, so interventions and captures would silently do nothing; leave enforce_eager unset "
                "(mechdiff sets it to True) or run without interventions")
        kw["enforce_eager"] = True
        if kw.get("enable_prefix_caching"):
            raise HookSettingsError(
                "enable_prefix_caching=True: a cached prefix reuses keys and values computed by an earlier request "
                "(under other interventions, and without the rows a capture needs); leave it unset")
        kw["enable_prefix_caching"] = False
        if int(kw.get("pipeline_parallel_size", 1)) > 1:
            raise HookSettingsError("pipeline_parallel_size > 1 with hooks is not supported: use "
                                    "tensor_parallel_size to spread a model over GPUs")
        mp = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
        if mp not in (None, "0"):
            raise HookSettingsError(
                f"VLLM_ENABLE_V1_MULTIPROCESSING={mp}: hooks are installed by functions sent to vLLM's workers, "
                "which a separate engine-core process refuses to deserialize; unset it (mechdiff sets 0)")
    return kw


def set_inprocess_env() -> None:
    """Keep vLLM's engine core in this process (see the module docstring); call before ``LLM()``."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def release_cuda(*holders: Any) -> int:
    """Free the GPU memory of HF models before vLLM starts (vLLM sizes its KV cache from the free memory and
    refuses to start below ``gpu_memory_utilization``). Each holder: an ``nn.Module`` or an object with
    ``.model`` (a LoadedModel); its parameters and buffers move to the meta device, so the memory goes even where
    other references to the module remain (the module is unusable afterwards). Returns the bytes still allocated
    by torch on the GPUs."""
    for h in holders:
        model = h if isinstance(h, nn.Module) else getattr(h, "model", None)
        if isinstance(model, nn.Module):
            model.to("meta")
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        return int(sum(torch.cuda.memory_allocated(i) for i in range(torch.cuda.device_count())))
    return 0


# vLLM asks for a fixed share of each GPU at start-up and refuses to start when less than that is free
# ("Free memory on device ... is less than desired GPU memory utilization"). Beside an HF copy that stays in use
# (a study that scores with it while vLLM generates), the share is taken from what is free, keeping some of it
# for the HF model's own forward passes.
DEFAULT_SHARE = 0.9
KEEP_FREE = 0.1  # of each GPU, left to the HF model's activations
MIN_SHARE = 0.05


def share_beside(free: Sequence[int], total: Sequence[int], *, want: float = DEFAULT_SHARE,
                 keep: float = KEEP_FREE) -> float:
    """The ``gpu_memory_utilization`` vLLM can start with on GPUs with ``free`` of ``total`` bytes (one entry
    per GPU it will use): the free share less ``keep`` of the GPU, at most ``want``. Raises
    :class:`HookSettingsError` when too little is free for an engine."""
    if not free or len(free) != len(total):
        raise ValueError("share_beside: one free and one total figure per GPU")
    share = min(want, *(f / t - keep for f, t in zip(free, total)))
    if share < MIN_SHARE:
        worst = min(range(len(free)), key=lambda i: free[i] / total[i])
        raise HookSettingsError(
            f"GPU {worst} has {free[worst] / 2**30:.1f} of {total[worst] / 2**30:.1f} GiB free beside the models "
            "already loaded: too little for a vLLM engine; use the 'hf' generator or a larger GPU")
    return round(share, 4)


def share_beside_resident(n_gpus: int = 1, *, want: float = DEFAULT_SHARE) -> float:
    """:func:`share_beside` for this process's first ``n_gpus`` CUDA devices, as they are now."""
    info = [torch.cuda.mem_get_info(i) for i in range(n_gpus)]
    return share_beside([f for f, _ in info], [t for _, t in info], want=want)


# ---------------------------------------------------------------------------------------------
# the model's layers and the residual stream in their outputs


def _get(root: Any, path: str) -> Any:
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _arch(model: nn.Module) -> str | None:
    cfg = getattr(model, "config", None)
    for c in (cfg, getattr(cfg, "hf_config", None)):
        mt = getattr(c, "model_type", None)
        if isinstance(mt, str):
            return mt
    return None


def decoder_layers(model: nn.Module, arch: str | None = None) -> tuple[str, nn.ModuleList]:
    """``(path, layers)``: vLLM model ``model``'s decoder blocks. The family's known path first (``arch``, else
    the model's ``config.model_type``), then the adapter's candidates, also under ``model.``."""
    arch = arch or _arch(model)
    first = (VLLM_LAYER_PATHS[arch],) if arch in VLLM_LAYER_PATHS else ()
    for p in dict.fromkeys((*first, *_CANDIDATES)):
        obj = _get(model, p)
        if isinstance(obj, (nn.ModuleList, nn.Sequential)) and len(obj) > 0:
            return p, obj
    raise UnsupportedArchitectureError(
        f"{type(model).__name__} ({arch or 'unknown family'}): no decoder layers found in the vLLM model "
        f"(looked for {', '.join(dict.fromkeys((*first, *_CANDIDATES)))})")


def _is_split(output: Any) -> bool:
    return (isinstance(output, tuple) and len(output) == 2 and isinstance(output[0], torch.Tensor)
            and isinstance(output[1], torch.Tensor))


def resid_of(output: Any) -> torch.Tensor:
    """The residual stream after a vLLM decoder layer: ``hidden + residual`` for layers that return the pair,
    the tensor itself for those that return the stream."""
    if _is_split(output):
        return output[0] + output[1]
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"cannot find the residual stream in a decoder layer output of type {type(output).__name__}")


def with_resid(output: Any, new: torch.Tensor) -> Any:
    """``output`` carrying residual stream ``new``: a pair becomes ``(new, 0)``, so the next layer's add gives
    ``new`` exactly (no ``(new - r) + r`` rounding)."""
    if _is_split(output):
        return new, torch.zeros_like(output[1])
    if isinstance(output, torch.Tensor):
        return new
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
        return (new, *output[1:])
    raise TypeError(f"cannot replace the residual stream in an output of type {type(output).__name__}")


# ---------------------------------------------------------------------------------------------
# flat token rows -> requests (pure; tested on CPU)


def request_segments(positions: torch.Tensor | np.ndarray) -> list[tuple[int, int, int]]:
    """``(start row, length, first position)`` of each run of consecutive positions in a flat batch: one run per
    request (a request's rows in one step are consecutive, its positions counting up by one)."""
    p = np.asarray(positions.cpu() if isinstance(positions, torch.Tensor) else positions).reshape(-1).astype(np.int64)
    if p.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(p) != 1) + 1
    starts = np.concatenate([[0], breaks])
    ends = np.concatenate([breaks, [p.size]])
    return [(int(s), int(e - s), int(p[s])) for s, e in zip(starts, ends)]


def pending_index(prompts: Sequence[Sequence[int]]) -> dict[tuple[int, ...], deque]:
    """Prompt token ids -> the request indices with those ids, in order (for :func:`match_requests`)."""
    out: dict[tuple[int, ...], deque] = {}
    for j, ids in enumerate(prompts):
        out.setdefault(tuple(int(t) for t in ids), deque()).append(j)
    return out


def match_requests(positions: torch.Tensor | np.ndarray, input_ids: torch.Tensor | np.ndarray,
                   pending: dict[tuple[int, ...], deque], n_rows: int | None = None) -> list[tuple[int, int]]:
    """``(request, start row)`` for each pending prompt seen whole in this flat batch: a run of positions from 0
    whose ids are the prompt's. Matched requests leave ``pending`` (equal prompts match in order: their rows
    hold equal activations, a prefill's rows never mixing with another request's). Runs that start at 0 and match
    no prompt are padding (or a request of no interest) and are skipped, as are decode steps; a run that starts
    past 0 and continues a pending prompt means its prefill was split over steps or served from the prefix cache:
    :class:`PrefillSplitError`. ``n_rows``: the real rows (padding after them is ignored)."""
    ids = np.asarray(input_ids.cpu() if isinstance(input_ids, torch.Tensor) else input_ids).reshape(-1)
    pos = np.asarray(positions.cpu() if isinstance(positions, torch.Tensor) else positions).reshape(-1)
    if ids.shape != pos.shape:
        raise ValueError(f"input_ids has {ids.size} rows but positions {pos.size}")
    if n_rows is not None:
        ids, pos = ids[:n_rows], pos[:n_rows]
    lengths = {len(k) for k in pending}
    out = []
    for start, length, first in request_segments(pos):
        if first != 0:
            chunk = [int(t) for t in ids[start:start + length]]
            if any(len(k) >= first + length and list(k[first:first + length]) == chunk for k in pending):
                raise PrefillSplitError(
                    f"rows {start}..{start + length - 1} continue a request from position {first}: a prompt's "
                    "prefill was split over forward passes (chunked prefill: keep a batch under "
                    "max_num_batched_tokens) or served from the prefix cache (enable_prefix_caching=False)")
            continue
        if length not in lengths:
            continue
        key = tuple(int(t) for t in ids[start:start + length])
        q = pending.get(key)
        if q:
            out.append((q.popleft(), start))
            if not q:
                del pending[key]
                lengths = {len(k) for k in pending}
    return out


def kept_rows(starts: Sequence[int], lengths: Sequence[int], counts: Sequence[int], width: int) -> np.ndarray:
    """``[request, width]`` flat-row indices of each request's kept positions, right-aligned as
    :func:`~mechdiff.engine.positions.gather_index` lays them out for a padded batch (slot ``s`` holds position
    ``length - width + s``), ``-1`` in the slots a request does not fill (it keeps ``counts`` positions)."""
    s = np.asarray(starts, dtype=np.int64)[:, None]
    n = np.asarray(lengths, dtype=np.int64)[:, None]
    c = np.asarray(counts, dtype=np.int64)[:, None]
    offs = np.arange(-width, 0, dtype=np.int64)[None, :]
    if (c > n).any():
        raise ValueError("a request keeps more positions than it has tokens")
    return np.where(offs >= -c, s + n + offs, -1)


# ---------------------------------------------------------------------------------------------
# hooks inside the workers (state lives where the model does; only plans and results cross)


@dataclass
class HookPlan:
    """What to install on every worker's model: ``interventions`` (resid_post, every position), and a capture
    of resid_post at ``capture_layers`` for the requests with token ids ``prompts`` (``counts`` kept positions
    each, laid out over ``width`` slots)."""

    token: str
    interventions: list[Intervention] = field(default_factory=list)
    capture_layers: tuple[int, ...] = ()
    prompts: list[list[int]] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)
    width: int = 0
    arch: str | None = None


@dataclass
class RankReport:
    """One worker's account of a hooked call: how often each installed hook ran, and its captures."""

    fired: dict[int, int]
    matched: list[int]
    captures: dict[int, np.ndarray]  # layer -> [len(matched), width, d] float32
    n_layers: int


_LIVE: dict[str, "_Live"] = {}


class _Live:
    def __init__(self, plan: HookPlan, model: nn.Module):
        self.plan = plan
        _, self.layers = decoder_layers(model, plan.arch)
        n = len(self.layers)
        by_layer: dict[int, list[Intervention]] = {}
        for iv in plan.interventions:
            by_layer.setdefault(iv.layer, []).append(iv)
        wanted = sorted(set(by_layer) | set(plan.capture_layers))
        for l in wanted:
            if not 0 <= l < n:
                raise IndexError(f"layer {l} is out of range: the vLLM model has {n} layers")
        self.fired = {l: 0 for l in wanted}
        self.pending = pending_index(plan.prompts) if plan.capture_layers else {}
        self.matched: list[int] = []
        self.rows: torch.Tensor | None = None  # this pass's kept rows [k, width], on the model's device
        self.parts: dict[int, list[torch.Tensor]] = {l: [] for l in plan.capture_layers}
        self.handles = []
        if plan.capture_layers:
            self.handles.append(model.register_forward_pre_hook(self._on_forward, with_kwargs=True))
        for l in wanted:
            self.handles.append(self.layers[l].register_forward_hook(self._layer_hook(l, by_layer.get(l, []))))

    def _on_forward(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        pos = kwargs.get("positions", args[1] if len(args) > 1 else None)
        self.rows = None
        if ids is None or pos is None or pos.dim() != 1:
            raise PrefillSplitError("the model was called without flat input_ids and positions (embeddings or "
                                    "multi-dimensional positions): captures need token ids")
        hits = match_requests(pos, ids, self.pending)
        if hits:
            reqs = [j for j, _ in hits]
            rows = kept_rows([s for _, s in hits], [len(self.plan.prompts[j]) for j in reqs],
                             [self.plan.counts[j] for j in reqs], self.plan.width)
            self.matched.extend(reqs)
            self.rows = torch.as_tensor(rows, device=pos.device)
        return None

    def _layer_hook(self, layer: int, ivs: list[Intervention]):
        capture = layer in self.parts

        def hook(module, args, output):
            self.fired[layer] += 1
            if not ivs and (not capture or self.rows is None):
                return None
            x = resid_of(output)
            for iv in ivs:
                x = iv.apply(x[None])[0]  # vLLM rows are [tokens, d]: one "batch row" of every token
            if capture and self.rows is not None:
                got = x[self.rows.clamp(min=0)].float()  # [k, width, d]
                got.masked_fill_((self.rows < 0)[..., None], float("nan"))
                self.parts[layer].append(got.cpu())
            return with_resid(output, x) if ivs else None

        return hook

    def report(self) -> RankReport:
        caps = {l: (torch.cat(p).numpy() if p else np.zeros((0, self.plan.width, 0), np.float32))
                for l, p in self.parts.items()}
        return RankReport(dict(self.fired), list(self.matched), caps, len(self.layers))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _install(plan: HookPlan, model: nn.Module) -> int:
    if plan.token in _LIVE:
        raise RuntimeError(f"hooks {plan.token} are already installed")
    _LIVE[plan.token] = _Live(plan, model)
    return len(_LIVE[plan.token].layers)


def _finish(token: str, model: nn.Module) -> RankReport | None:
    live = _LIVE.pop(token, None)
    if live is None:
        return None
    live.remove()
    return live.report()


def _on_worker(fn: Callable[[nn.Module], Any], worker: Any) -> Any:
    """``fn`` on a worker's model, for vLLM versions with ``collective_rpc`` but no ``apply_model``."""
    get = getattr(worker, "get_model", None)
    model = get() if callable(get) else getattr(getattr(worker, "model_runner", None), "model", None)
    if model is None:
        raise RuntimeError(f"cannot reach the model of vLLM worker {type(worker).__name__}")
    return fn(model)


_INPROCESS_PATHS = (
    "model_executor.driver_worker.worker.model_runner.model",
    "model_executor.driver_worker.model_runner.model",
    "engine_core.engine_core.model_executor.driver_worker.worker.model_runner.model",
)


def on_models(llm: Any, fn: Callable[[nn.Module], Any]) -> list[Any]:
    """``fn(model)`` on every worker's model, one result per worker: ``apply_model`` where the installed vLLM
    has it, else ``collective_rpc``, else the in-process engine's model."""
    apply = getattr(llm, "apply_model", None)
    if callable(apply):
        return list(apply(fn))
    rpc = getattr(llm, "collective_rpc", None)
    if callable(rpc):
        return list(rpc(functools.partial(_on_worker, fn)))
    engine = getattr(llm, "llm_engine", None)
    for path in _INPROCESS_PATHS:
        model = _get(engine, path)
        if isinstance(model, nn.Module):
            return [fn(model)]
    raise RuntimeError("cannot reach vLLM's model: this vLLM has neither LLM.apply_model nor LLM.collective_rpc, "
                       "and no in-process model (set VLLM_ENABLE_V1_MULTIPROCESSING=0)")


def engine_is_eager(llm: Any) -> bool | None:
    """Whether the engine runs eagerly (``model_config.enforce_eager``); None when it cannot be read."""
    engine = getattr(llm, "llm_engine", None)
    for path in ("model_config", "vllm_config.model_config"):
        cfg = _get(engine, path)
        value = getattr(cfg, "enforce_eager", None)
        if isinstance(value, bool):
            return value
    return None


@dataclass
class CaptureResult:
    """resid_post of each request of a hooked call: ``acts`` ``[request, layer, width, d]`` float32 (layers in
    the order asked, NaN in unfilled slots)."""

    layers: tuple[int, ...]
    acts: np.ndarray


class HookedLLM:
    """A vLLM ``LLM`` with mechdiff's hooks: each :meth:`run` installs its interventions and captures on every
    worker, generates, takes the hooks out, and raises :class:`HookNeverFiredError` when an installed hook never
    ran (the silent no-op of hooks on a compiled model, made loud)."""

    def __init__(self, llm: Any, sampling: Callable[[int], Any] | None = None, arch: str | None = None):
        self.llm = llm
        self.arch = arch
        if sampling is None:
            from vllm import SamplingParams

            sampling = lambda n: SamplingParams(temperature=0.0, max_tokens=n)  # noqa: E731 - greedy
        self.sampling = sampling

    def check_interventions(self, interventions: Sequence[Intervention]) -> None:
        for iv in interventions:
            if iv.site != "resid_post" or not iv.every_position or iv.rows is not None:
                raise ValueError("the vLLM backend supports resid_post interventions at every position and row "
                                 "(add/ablate with no index and no rows)")
            if iv.prompt_only:
                # V1 flattens prefill and decode tokens of different requests into one pass
                raise ValueError("the vLLM backend cannot tell prompt tokens from decode steps: use interventions "
                                 "at every position (prompt_only=False) or the hf generator")
        if interventions and engine_is_eager(self.llm) is False:
            raise HookSettingsError("this vLLM engine was built with enforce_eager=False (compiled, CUDA graphs): "
                                    "hooks would not run; build it with enforce_eager=True")

    def run(self, prompts: Sequence[Sequence[int]], max_tokens: int, interventions: Sequence[Intervention] = (),
            capture_layers: Sequence[int] = (), counts: Sequence[int] = (), width: int = 0) -> tuple[list[Any], CaptureResult | None]:
        """Greedy generation of ``max_tokens`` tokens for each prompt (token ids), with ``interventions``;
        captures resid_post at ``capture_layers`` (``counts`` kept positions per prompt over ``width`` slots).
        Returns vLLM's outputs (in prompt order) and the capture (None without capture layers)."""
        self.check_interventions(interventions)
        if capture_layers and (len(counts) != len(prompts) or width < 1):
            raise ValueError("a capture needs one kept-position count per prompt and a width of at least 1")
        if not interventions and not capture_layers:
            return self._generate(prompts, max_tokens), None
        plan = HookPlan(uuid.uuid4().hex, list(interventions), tuple(capture_layers),
                        [list(map(int, p)) for p in prompts] if capture_layers else [],
                        list(map(int, counts)), int(width), self.arch)
        on_models(self.llm, functools.partial(_install, plan))
        reports: list[RankReport | None] = []
        try:
            outputs = self._generate(prompts, max_tokens)
        finally:
            reports = on_models(self.llm, functools.partial(_finish, plan.token))
        reports = [r for r in reports if r is not None]
        if not reports:
            raise HookNeverFiredError("no vLLM worker reported the hooks installed on it")
        silent = sorted(l for l in reports[0].fired if sum(r.fired.get(l, 0) for r in reports) == 0)
        if silent:
            raise HookNeverFiredError(
                f"hooks on layer(s) {silent} were installed but never ran during generation: vLLM is not executing "
                "the modules hooked (a compiled model or CUDA graphs: build the engine with enforce_eager=True)")
        if not capture_layers:
            return outputs, None
        return outputs, _assemble(reports[0], plan, len(prompts))

    def _generate(self, prompts: Sequence[Sequence[int]], max_tokens: int) -> list[Any]:
        reqs = [{"prompt_token_ids": [int(t) for t in p]} for p in prompts]
        try:
            return list(self.llm.generate(reqs, self.sampling(max_tokens), use_tqdm=False))
        except TypeError:  # an LLM without use_tqdm
            return list(self.llm.generate(reqs, self.sampling(max_tokens)))


def _assemble(rep: RankReport, plan: HookPlan, n: int) -> CaptureResult:
    seen = set(rep.matched)
    missing = [j for j in range(n) if j not in seen]
    if missing:
        raise PrefillSplitError(
            f"{len(missing)} of {n} prompts (first: #{missing[0]}, {len(plan.prompts[missing[0]])} tokens) were never "
            "seen whole in one forward pass: their prefill was split (chunked prefill: keep a batch under "
            "max_num_batched_tokens) or served from the prefix cache")
    order = np.argsort(np.asarray(rep.matched), kind="stable")
    acts = np.stack([rep.captures[l][order] for l in plan.capture_layers], axis=1)  # [req, layer, width, d]
    return CaptureResult(plan.capture_layers, acts)
