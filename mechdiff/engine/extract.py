"""From a prompt set to an activation store: batched, hooked forward passes with a background writer.

Work is done shard by shard (a shard = a contiguous range of examples, aligned to the store's chunks).
Inside a shard, examples are batched by token length under a token budget; the shard is handed to a
writer thread whole, and the store marks it done only after its data is written. Re-running skips done
shards, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import contextlib
import queue
from concurrent.futures import Future
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

import mechdiff
from mechdiff.engine.batching import length_batches, pad_batch, resolve_token_budget
from mechdiff.engine.capture import CaptureSpec
from mechdiff.engine.data import PromptSet
from mechdiff.engine.host_memory import retain_freed_memory
from mechdiff.engine.models import LoadedModel, resolve_dtype
from mechdiff.engine.positions import Positions, gather_index
from mechdiff.engine.sites import Capture, hooks, mlp_only_at, site_width
from mechdiff.engine.groups import open_group
from mechdiff.engine.store import ActivationStore, ArraySpec, cast_to_spec
from mechdiff.engine.tokenization import Tokenization, ids_and_counts, spot_check, tokenization_key

__all__ = ["CaptureSpec", "ExtractReport", "PreparedExtraction", "tokenize_prompts", "prepare", "extract", "run_shards",
           "capture_shard", "fill_shard", "ShardWriter"]


@dataclass
class ExtractReport:
    url: str
    group: str
    n_examples: int
    shards_total: int
    shards_written: int
    shards_skipped: int
    tokens: int
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("nan")


@dataclass
class PreparedExtraction:
    """Everything resolved before any forward pass: token ids, positions, array specs, provenance."""

    spec: CaptureSpec
    layers: tuple[int, ...]
    positions: Positions
    token_ids: list[list[int]]
    counts: list[int]  # kept positions per example
    width: int  # kept positions after padding to a common width (1 for `last`)
    arrays: list[ArraySpec]
    coords: dict[str, np.ndarray]
    provenance: dict
    # what the ids were made under (tokenization_key), and whether they were reused from another target
    tokenization_key: str = ""
    reused_tokens: bool = False
    max_layer: int = field(init=False)

    def __post_init__(self) -> None:
        self.max_layer = max(self.layers)

    def token_id_matrix(self) -> np.ndarray:
        """``[example, tok]`` int32, right-aligned, -1 padded: positions counted from each end."""
        t = max(len(x) for x in self.token_ids)
        out = np.full((len(self.token_ids), t), -1, dtype=np.int32)
        for i, ids in enumerate(self.token_ids):
            out[i, t - len(ids) :] = ids
        return out

    def tokenization(self) -> Tokenization:
        """The ids and counts, for another target of this dataset to reuse (``prepare(..., reuse=...)``)."""
        return Tokenization(self.tokenization_key, self.token_ids, self.counts)


def default_group(model_id: str, dataset_source: str) -> str:
    def clean(s: str) -> str:
        name = Path(s.rstrip("/")).name or s
        for suffix in (".csv", ".jsonl", ".json"):
            name = name.removesuffix(suffix)
        return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)

    return f"{clean(model_id)}/{clean(dataset_source)}"


def tokenize_prompts(
    tokenizer,
    n_layers: int,
    max_positions: int | None,
    prompts: PromptSet,
    spec: CaptureSpec,
    *,
    max_length: int | None = None,
    truncate: bool = False,
) -> tuple[tuple[int, ...], Positions, list[list[int]], list[int]]:
    """The part of :func:`prepare` that needs only the tokenizer and the config (so it also runs before the
    weights load): the layers, the positions, each prompt's token ids and its kept-position count. Raises on
    an empty dataset, bad layers or positions, prompts longer than the context (unless ``truncate``) or a
    missing position marker."""
    if len(prompts) == 0:
        raise ValueError(f"dataset {prompts.source} is empty")
    layers = spec.resolve_layers(n_layers)
    ids, counts = ids_and_counts(tokenizer, prompts.texts, spec.positions, spec.template,
                                 max_length=max_length or max_positions, truncate=truncate)
    return layers, spec.positions, ids, counts


def prepare(
    lm: LoadedModel,
    prompts: PromptSet,
    spec: CaptureSpec,
    *,
    max_length: int | None = None,
    truncate: bool = False,
    reuse: Mapping[str, Tokenization] | None = None,
) -> PreparedExtraction:
    """Validate and resolve a capture before touching any store: raises on bad layers, sites, positions or
    prompts that do not fit the model.

    ``reuse``: other targets' tokenizations, by :func:`~mechdiff.engine.tokenization.tokenization_key`
    (models with the same tokenizer). The one under this model's key lends its ids when a re-tokenized
    sample of rows agrees; otherwise the dataset is tokenized here."""
    adapter = lm.adapter
    limit = max_length or adapter.max_positions
    key = tokenization_key(lm.tokenizer, prompts, spec.positions, spec.template, max_length=limit, truncate=truncate,
                           definition=lm.tokenizer_hash)
    reused = False
    if reuse and key in reuse and len(prompts) > 0:
        given = reuse[key]
        differs = spot_check(given, lm.tokenizer, prompts, spec.positions, spec.template, max_length=limit,
                             truncate=truncate)
        if differs is None:
            layers, pos = spec.resolve_layers(adapter.n_layers), spec.positions
            ids, counts, reused = given.token_ids, given.counts, True
        else:
            warnings.warn(f"{lm.model_id}: the shared tokenization of {prompts.source} does not hold ({differs}); "
                          "tokenizing it again", stacklevel=2)
    if not reused:
        layers, pos, ids, counts = tokenize_prompts(lm.tokenizer, adapter.n_layers, adapter.max_positions, prompts,
                                                    spec, max_length=max_length, truncate=truncate)
    width = max(counts)
    n_pos = width if pos.keeps_position_dim else None
    arrays = [
        ArraySpec(
            name=site,
            site=site,
            layers=layers,
            n_positions=n_pos,
            width=site_width(adapter, site),
            dim="neuron" if site == "mlp_act" else "hidden",
            dtype=spec.dtype,
            compression=spec.compression,
        )
        for site in spec.sites
    ]
    coords: dict[str, np.ndarray] = {
        "text": np.asarray(prompts.texts, dtype=object),
        "n_tokens": np.asarray([len(x) for x in ids], dtype=np.int32),
        "n_positions": np.asarray(counts, dtype=np.int32),
    }
    for k, v in prompts.columns.items():
        coords[k] = np.asarray(v)
    provenance = {
        **lm.provenance(),
        "dataset": prompts.source,
        "dataset_hash": prompts.hash,
        "capture": spec.resolve(adapter.n_layers).to_json(),
        "mechdiff_version": mechdiff.__version__,
    }
    return PreparedExtraction(spec, layers, pos, ids, counts, width, arrays, coords, provenance, key, reused)


class _StopForward(Exception):
    """Raised after the deepest needed layer: the layers above it would be wasted work."""


class ShardWriter:
    """Writes finished shards on a background thread so compression and I/O overlap the next forward pass.

    Made for one store (``ShardWriter(store)``), the first failed write stops it and is raised by the next
    ``put`` or by ``close``. Made without one, it is a long-lived writer (one per pool actor) for shards of any
    store: each ``put`` names its store, and a failed write fails only its own future. ``put`` blocks while
    ``depth`` shards wait, which bounds the memory of shards computed ahead of their writes."""

    def __init__(self, store: ActivationStore | None = None, depth: int = 2):
        self.store = store
        self.q: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.written: list[int] = []
        self.thread = threading.Thread(target=self._run, name="mechdiff-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            item = self.q.get()
            if item is None:
                return
            i, data, store, done = item
            if self.error is not None:
                done.set_exception(self.error)
                continue
            try:
                store.write_shard(i, data)
                self.written.append(i)
                done.set_result(i)
            except BaseException as e:  # surfaced to the caller on the next put or at close (one store), or by its future
                if self.store is not None:
                    self.error = e
                done.set_exception(e)

    def put(self, i: int, data: dict[str, np.ndarray], store: ActivationStore | None = None) -> Future:
        """Queue shard ``i`` of ``store`` (default: the writer's); the future is set once it is written and flagged."""
        if self.error is not None:
            raise self.error
        target = store if store is not None else self.store
        if target is None:
            raise ValueError("this writer has no store of its own: name the shard's store")
        done: Future = Future()
        self.q.put((i, data, target, done))
        return done

    def close(self) -> None:
        self.q.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error


@torch.inference_mode()
def forward_capture(
    lm: LoadedModel,
    prep: PreparedExtraction,
    batch: Sequence[int],
    *,
    padding_side: str = "right",
    stored: bool = False,
) -> dict[str, np.ndarray]:
    """One batched forward pass; returns ``{site: [batch, layer(, position), width]}`` float32 arrays, or with
    ``stored`` in the store's dtype (bfloat16 as its uint16 bits), sliced and cast on the model's device so
    only the stored bytes cross to the host. A float16 overflow there is not decided on the device: the batch
    is then captured again in float32, for :func:`~mechdiff.engine.store.cast_to_spec` to name the value."""
    dtype = resolve_dtype(prep.spec.dtype) if stored else torch.float32
    ids = [prep.token_ids[i] for i in batch]
    inputs = pad_batch(ids, lm.tokenizer.pad_token_id, side=padding_side, device=lm.device)
    counts = torch.as_tensor([prep.counts[i] for i in batch], device=lm.device)
    index = gather_index(inputs["attention_mask"], counts, prep.width)
    cap = Capture(prep.spec.sites, prep.layers, index=index, dtype=dtype, to_device="cpu")
    stop_layer = lm.adapter.layer(prep.max_layer)

    def stop(module, args, output):
        raise _StopForward

    # The deepest block is read at the captured positions only: its MLP need not run anywhere else (unless
    # the MLP itself is captured). Worth it when they are few of the sequence's positions.
    few = index.shape[1] * 2 <= inputs["input_ids"].shape[1] and not {"mlp_out", "mlp_act"} & set(prep.spec.sites)
    with hooks(lm.adapter, cap), (mlp_only_at(lm.adapter, prep.max_layer, index) if few else contextlib.nullcontext()):
        # Registered after the capture hooks, so it fires after they have taken the deepest layer.
        h = stop_layer.register_forward_hook(stop)
        try:
            lm.model(**inputs, use_cache=False)
        except _StopForward:
            pass
        finally:
            h.remove()
    cap.wait()
    if dtype == torch.float16 and any(bool(torch.isinf(t).any()) for t in cap.acts.values()):
        return forward_capture(lm, prep, batch, padding_side=padding_side)  # rare: the exact check on the host
    out = {}
    for site in prep.spec.sites:
        t = cap.stacked(site)  # [B, L, P, W]
        a = t.view(torch.int16).numpy().view(np.uint16) if t.dtype == torch.bfloat16 else t.numpy()
        out[site] = a if prep.positions.keeps_position_dim else a[:, :, 0, :]
    return out


def run_shards(
    lm: LoadedModel,
    prep: PreparedExtraction,
    store: ActivationStore,
    shards: Sequence[int],
    *,
    token_budget: int | None = None,
    padding_side: str = "right",
    on_batch: Callable[[int, int], None] | None = None,
) -> tuple[int, int]:
    """Extract the given shards into ``store``. Returns (shards written, real tokens processed).

    ``token_budget``: padded tokens per batch; None takes the model's device's default
    (:func:`~mechdiff.engine.batching.default_token_budget`)."""
    budget = resolve_token_budget(token_budget, lm.device)
    writer = ShardWriter(store)
    tokens = 0
    try:
        for s in shards:
            bufs, n = capture_shard(lm, prep, store.shard_range(s), token_budget=budget, padding_side=padding_side,
                                    on_batch=on_batch)
            tokens += n
            writer.put(s, bufs)
    finally:
        writer.close()
    return len(writer.written), tokens


def capture_shard(
    lm: LoadedModel,
    prep: PreparedExtraction,
    rng: range,
    *,
    token_budget: int,
    padding_side: str = "right",
    on_batch: Callable[[int, int], None] | None = None,
) -> tuple[dict[str, np.ndarray], int]:
    """The forward passes of one shard (examples ``rng``): its arrays in the stored dtype, and its real tokens."""
    if lm.device.type == "cpu":
        retain_freed_memory()  # CPU activations reuse freed pages instead of faulting in fresh ones (host_memory)
    lengths = {i: len(prep.token_ids[i]) for i in rng}  # this shard's only: a shard costs its size, not the dataset's
    return fill_shard(prep, rng, length_batches(lengths, list(rng), token_budget),
                      lambda batch: forward_capture(lm, prep, batch, padding_side=padding_side, stored=True), on_batch)


def fill_shard(
    prep: PreparedExtraction,
    rng: range,
    batches: Sequence[Sequence[int]],
    capture: Callable[[Sequence[int]], dict[str, np.ndarray]],
    on_batch: Callable[[int, int], None] | None = None,
) -> tuple[dict[str, np.ndarray], int]:
    """One shard's buffers filled batch by batch from ``capture(batch) -> {array: values}`` (any backend), and
    its real tokens. Each batch is cast to the stored dtype as it arrives, so no float32 copy of a shard is held."""
    specs = {a.name: a for a in prep.arrays}
    bufs = {a.name: np.empty(a.shard_shape(len(rng)), a.storage_dtype) for a in prep.arrays}  # bf16: uint16 bits
    tokens = 0
    for batch in batches:
        rows = np.asarray(batch) - rng.start
        for name, a in capture(batch).items():
            bufs[name][rows] = cast_to_spec(specs[name], a, batch)
        n = sum(len(prep.token_ids[i]) for i in batch)
        tokens += n
        if on_batch is not None:
            on_batch(n, len(batch))
    return bufs, tokens


def extract(
    lm: LoadedModel,
    prompts: PromptSet,
    spec: CaptureSpec,
    out: str,
    group: str | None = None,
    *,
    token_budget: int | None = None,
    shard_size: int = 256,
    max_length: int | None = None,
    truncate: bool = False,
    shards: Sequence[int] | None = None,
    padding_side: str = "right",
    progress: bool = True,
    storage_options: dict | None = None,
    append: bool = False,
    reuse: Mapping[str, Tokenization] | None = None,
) -> ExtractReport:
    """Capture ``spec`` for every prompt into the store at ``out`` (group ``group``), resuming if it exists.

    ``append``: the dataset has grown at its end since the group was made (a streamed dataset): the group grows
    by the new examples (whole work shards; its stored examples must be the dataset's first rows), and only
    they are extracted. Interrupted, the same call finishes the growth and resumes.

    ``reuse``: tokenizations of the dataset made earlier (by key, e.g. the CLI's checks before the weights
    load), taken as :func:`prepare` takes them.

    ``token_budget``: padded tokens per batch (rows x longest prompt); None takes the device's default
    (:func:`~mechdiff.engine.batching.default_token_budget`: smaller batches on CPU, where they are faster).

    Raises before any forward pass (and before the store is touched) on a bad token budget, layers, sites,
    positions, over-long prompts, a store made by another model / spec / dataset, or too little disk room.
    """
    out = str(out)
    token_budget = resolve_token_budget(token_budget, lm.device)
    group = group or default_group(lm.model_id, prompts.source)
    prep = prepare(lm, prompts, spec, max_length=max_length, truncate=truncate, reuse=reuse)
    store, todo, skipped = open_group(prep, prompts, out, group, shard_size=shard_size,
                                      storage_options=storage_options, append=append, shards=shards)
    total_tokens = sum(len(prep.token_ids[i]) for s in todo for i in store.shard_range(s))
    t0 = time.perf_counter()
    if progress and todo:
        from mechdiff.engine.progress import token_progress

        with token_progress(f"extract {group}", total_tokens) as advance:
            written, tokens = run_shards(
                lm, prep, store, todo, token_budget=token_budget, padding_side=padding_side,
                on_batch=lambda n, b: advance(n),
            )
    else:
        written, tokens = run_shards(lm, prep, store, todo, token_budget=token_budget, padding_side=padding_side)
    store.finish()  # the root's metadata, consolidated once at the end of the run
    return ExtractReport(out, group, len(prompts), store.n_shards, written, skipped, tokens, time.perf_counter() - t0)
