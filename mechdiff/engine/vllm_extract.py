"""Extraction on vLLM's prefill path: resid_post at chosen layers and positions, into the store the HF path writes.

Each batch of prompts runs as a one-token greedy generation (``max_tokens=1``: the prefill, then the request is
done) with capture hooks on the decoder layers (:class:`~mechdiff.engine.vllm_backend.HookedLLM`); the rows of
vLLM's flat token batch are mapped back to requests by their token ids and positions, and every prompt must be
seen whole (else :class:`~mechdiff.engine.vllm_backend.PrefillSplitError`). Preparation needs no HF weights: the
tokenizer, and the model's module layout built on the meta device (no memory) for the same ``architecture``
provenance. Arrays, coordinates and provenance are made by :func:`~mechdiff.engine.extract.prepare`, so the
store is the one ``extract`` writes: ``open_store``, resume and the studies read it unchanged, and a store begun
on one backend resumes on the other (identity: weights, tokenizer, dataset and capture).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from mechdiff.engine.adapter import ArchAdapter
from mechdiff.engine.capture import CaptureSpec
from mechdiff.engine.data import PromptSet
from mechdiff.engine.extract import ExtractReport, PreparedExtraction, ShardWriter, default_group, fill_shard, prepare
from mechdiff.engine.groups import open_group
from mechdiff.engine.tokenization import Tokenization
from mechdiff.engine.models import LoadedModel, ModelLoadError, gguf_source, load_tokenizer, local_weights_hash, resolve_dtype, tokenizer_hash
from mechdiff.engine.store import ActivationStore
from mechdiff.engine.vllm_backend import (HookedLLM, engine_kwargs, require_vllm, set_inprocess_env, vllm_version)

__all__ = ["VLLM_SITES", "VLLMPlan", "plan_vllm_extraction", "extract_vllm", "build_engine", "token_batches"]

#: What the vLLM backend captures.
VLLM_SITES = ("resid_post",)
#: Default tokens per batch (real tokens: vLLM does not pad), also the engine's ``max_num_batched_tokens``.
DEFAULT_TOKEN_BUDGET = 8192


@dataclass
class VLLMPlan:
    """An extraction resolved before the engine starts: the prepared capture, the store, the shards to do."""

    model: str
    prep: PreparedExtraction
    store: ActivationStore
    todo: list[int]
    skipped: int
    token_budget: int
    dtype: str
    longest: int


def weightless_model(path_or_id: str, *, revision: str | None = None, trust_remote_code: bool = False,
                     dtype: str | torch.dtype = "auto", extra: dict | None = None) -> LoadedModel:
    """A :class:`LoadedModel` without weights: the tokenizer :func:`load_model` would give, and the HF module
    tree on the meta device (so the adapter, and so the ``architecture`` provenance, are the HF path's)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if gguf_source(path_or_id) is not None:
        raise ModelLoadError(f"{path_or_id}: the vLLM backend takes a safetensors directory or a hub id, not GGUF")
    local = Path(path_or_id).expanduser()
    is_local = local.exists()
    tok = load_tokenizer(path_or_id, revision=revision, trust_remote_code=trust_remote_code)
    kw: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if revision is not None and not is_local:
        kw["revision"] = revision
    try:
        cfg = AutoConfig.from_pretrained(str(local) if is_local else path_or_id, **kw)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"could not read the config of {path_or_id!r}: {e}") from e
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, trust_remote_code=trust_remote_code)
    if is_local:
        weights_hash = local_weights_hash(path_or_id)
    else:
        from mechdiff.engine.models import _hub_commit

        commit = _hub_commit(path_or_id, revision)
        weights_hash = f"git:{commit}" if commit else f"unresolved:{revision or 'main'}"
    return LoadedModel(model=model, tokenizer=tok, adapter=ArchAdapter(model), model_id=str(path_or_id),
                       revision=revision, weights_hash=weights_hash, tokenizer_hash=tokenizer_hash(tok),
                       dtype=resolve_dtype(dtype, "cuda"), device=torch.device("cuda"), is_local=is_local,
                       extra=dict(extra or {}))


def plan_vllm_extraction(
    model: str,
    prompts: PromptSet,
    spec: CaptureSpec,
    out: str,
    group: str | None = None,
    *,
    token_budget: int = DEFAULT_TOKEN_BUDGET,
    shard_size: int = 256,
    max_length: int | None = None,
    truncate: bool = False,
    shards: Sequence[int] | None = None,
    dtype: str = "auto",
    revision: str | None = None,
    trust_remote_code: bool = False,
    storage_options: dict | None = None,
    tensor_parallel_size: int = 1,
    append: bool = False,
    reuse: Mapping[str, Tokenization] | None = None,
) -> VLLMPlan:
    """Validate and resolve, then create or open the store (no engine, no weights): raises on sites other than
    resid_post, a bad token budget, layers, positions, over-long prompts, a store made by another model / spec /
    dataset, or too little disk room. ``append`` and ``reuse``: as :func:`~mechdiff.engine.extract.extract`'s."""
    bad = [s for s in spec.sites if s not in VLLM_SITES]
    if bad:
        raise ValueError(f"the vLLM backend captures {', '.join(VLLM_SITES)} only, not {', '.join(bad)}: "
                         "use the hf backend for other sites")
    if isinstance(token_budget, bool) or not isinstance(token_budget, int) or token_budget < 1:
        raise ValueError(f"token budget {token_budget!r}: a whole number of tokens per batch, at least 1")
    out = str(out)
    lm = weightless_model(model, revision=revision, trust_remote_code=trust_remote_code, dtype=dtype,
                          extra={"backend": "vllm", "vllm_version": vllm_version(),
                                 "tensor_parallel_size": tensor_parallel_size})
    prep = prepare(lm, prompts, spec, max_length=max_length, truncate=truncate, reuse=reuse)
    longest = max(len(x) for x in prep.token_ids)
    group = group or default_group(lm.model_id, prompts.source)
    store, todo, skipped = open_group(prep, prompts, out, group, shard_size=shard_size,
                                      storage_options=storage_options, append=append, shards=shards)
    return VLLMPlan(model, prep, store, todo, skipped, max(token_budget, longest),
                    str(lm.dtype).removeprefix("torch."), longest)


def token_batches(lengths: Sequence[int], indices: Sequence[int], token_budget: int) -> list[list[int]]:
    """``indices`` grouped, by length, into batches of at most ``token_budget`` real tokens (a longer prompt
    alone): vLLM packs tokens without padding, and a batch within the engine's ``max_num_batched_tokens``
    prefills in one step, so no prompt is split."""
    out: list[list[int]] = []
    cur: list[int] = []
    used = 0
    for i in sorted(indices, key=lambda i: (lengths[i], i)):
        if cur and used + lengths[i] > token_budget:
            out.append(cur)
            cur, used = [], 0
        cur.append(i)
        used += lengths[i]
    if cur:
        out.append(cur)
    return out


def build_engine(model: str, *, dtype: str, token_budget: int, longest: int, tensor_parallel_size: int = 1,
                 gpu_memory_utilization: float | None = None, revision: str | None = None,
                 trust_remote_code: bool = False, **llm_kwargs) -> HookedLLM:
    """A vLLM engine for hooked prefill: eager, no prefix caching, ``max_num_batched_tokens`` = the batch budget
    (a batch then prefills in one step), context long enough for the longest prompt plus its one new token."""
    require_vllm()
    kw = engine_kwargs(llm_kwargs, hooks=True, tensor_parallel_size=tensor_parallel_size,
                       gpu_memory_utilization=gpu_memory_utilization)
    kw.setdefault("max_num_batched_tokens", token_budget)
    kw.setdefault("max_model_len", longest + 1)
    if revision is not None:
        kw.setdefault("revision", revision)
    set_inprocess_env()
    from vllm import LLM

    return HookedLLM(LLM(model=model, dtype=dtype, trust_remote_code=trust_remote_code, **kw))


def capture_batch(engine: HookedLLM, prep: PreparedExtraction, batch: Sequence[int]) -> np.ndarray:
    """resid_post of examples ``batch``: ``[batch, layer, width, d]`` float32 (NaN in unfilled slots)."""
    _, cap = engine.run([prep.token_ids[i] for i in batch], 1, capture_layers=prep.layers,
                        counts=[prep.counts[i] for i in batch], width=prep.width)
    assert cap is not None
    return cap.acts


def run_vllm_shards(engine: HookedLLM, plan: VLLMPlan, on_batch: Callable[[int, int], None] | None = None) -> tuple[int, int]:
    """The plan's shards through ``engine`` into its store, writes overlapping the next shard's prefill.
    Returns (shards written, tokens)."""
    prep, store = plan.prep, plan.store
    keep_pos = prep.positions.keeps_position_dim
    (name,) = [a.name for a in prep.arrays]  # resid_post only

    def capture(batch: Sequence[int]) -> dict[str, np.ndarray]:
        acts = capture_batch(engine, prep, batch)
        return {name: acts if keep_pos else acts[:, :, 0, :]}

    writer = ShardWriter(store)
    tokens = 0
    try:
        for s in plan.todo:
            rng = store.shard_range(s)
            lengths = {i: len(prep.token_ids[i]) for i in rng}
            bufs, n = fill_shard(prep, rng, token_batches(lengths, list(rng), plan.token_budget), capture, on_batch)
            tokens += n
            writer.put(s, bufs)
    finally:
        writer.close()
    return len(writer.written), tokens


def extract_vllm(
    model: str,
    prompts: PromptSet,
    spec: CaptureSpec,
    out: str,
    group: str | None = None,
    *,
    token_budget: int = DEFAULT_TOKEN_BUDGET,
    shard_size: int = 256,
    max_length: int | None = None,
    truncate: bool = False,
    shards: Sequence[int] | None = None,
    dtype: str = "auto",
    tensor_parallel_size: int = 1,
    gpu_memory_utilization: float | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
    progress: bool = True,
    storage_options: dict | None = None,
    engine: HookedLLM | None = None,
    llm_kwargs: dict | None = None,
    append: bool = False,
    reuse: Mapping[str, Tokenization] | None = None,
) -> ExtractReport:
    """``extract`` on vLLM: capture ``spec`` (resid_post; any layers; positions ``last``, ``last:k``, ``all``,
    ``from:``/``post_instruction``) for every prompt of ``model`` (a local safetensors directory or hub id) into
    the store at ``out``, resuming if it exists. ``token_budget``: real tokens per batch (and the engine's
    ``max_num_batched_tokens``; raised to the longest prompt). ``dtype``: the model's, ``auto`` = bfloat16 on a
    GPU that has it. ``tensor_parallel_size``: GPUs per model, through vLLM. ``engine``: an engine to reuse (made
    by :func:`build_engine`); else one is built once the store is ready, only when shards are left.

    Raises :class:`~mechdiff.engine.vllm_backend.VLLMUnavailableError` without vLLM or a GPU, before the store is
    touched (unless ``engine`` is given), and everything :func:`plan_vllm_extraction` raises before the engine
    starts."""
    if engine is None:
        require_vllm()
    plan = plan_vllm_extraction(model, prompts, spec, out, group, token_budget=token_budget, shard_size=shard_size,
                                max_length=max_length, truncate=truncate, shards=shards, dtype=dtype,
                                revision=revision, trust_remote_code=trust_remote_code,
                                storage_options=storage_options, tensor_parallel_size=tensor_parallel_size,
                                append=append, reuse=reuse)
    store, t0 = plan.store, time.perf_counter()
    written = tokens = 0
    if plan.todo:
        if engine is None:
            engine = build_engine(model, dtype=plan.dtype, token_budget=plan.token_budget, longest=plan.longest,
                                  tensor_parallel_size=tensor_parallel_size,
                                  gpu_memory_utilization=gpu_memory_utilization, revision=revision,
                                  trust_remote_code=trust_remote_code, **(llm_kwargs or {}))
        total = sum(len(plan.prep.token_ids[i]) for s in plan.todo for i in store.shard_range(s))
        if progress:
            from mechdiff.engine.progress import token_progress

            with token_progress(f"extract {store.group} (vllm)", total) as advance:
                written, tokens = run_vllm_shards(engine, plan, on_batch=lambda n, b: advance(n))
        else:
            written, tokens = run_vllm_shards(engine, plan)
    store.finish()
    return ExtractReport(str(out), store.group, len(prompts), store.n_shards, written, plan.skipped, tokens,
                         time.perf_counter() - t0)
