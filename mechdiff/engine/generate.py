"""Generation with hooks: greedy completions under interventions (refusal studies score these).

``HFGenerator`` (transformers ``generate``, batched, left-padded) is the default and runs anywhere.
``VLLMGenerator`` is for GPU clusters with the ``vllm`` extra; it needs CUDA and says so when absent.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Protocol, Sequence

import torch

from mechdiff.engine.batching import PromptTemplate, pad_batch, tokenize
from mechdiff.engine.models import LoadedModel
from mechdiff.engine.sites import Intervention, hooks
from mechdiff.engine.vllm_backend import vllm_available

__all__ = ["Generator", "HFGenerator", "VLLMGenerator", "vllm_available", "contains_refusal", "generate_each",
           "stacked", "stack_groups", "STACK_BYTES", "faster_threads", "intra_op_threads"]

#: What the rows of conditions stacked into one batch may hold: their KV cache (or, without a cache, about as much
#: activation memory), at most this many bytes.
STACK_BYTES = 1 << 30


class Generator(Protocol):
    def generate(
        self, texts: Sequence[str], *, max_new_tokens: int = 32, interventions: Sequence[Intervention] = ()
    ) -> list[str]:
        """Greedy completions of ``texts`` (templated by the generator) with ``interventions`` active."""
        ...


def contains_refusal(completion: str, phrases: Sequence[str]) -> bool:
    low = completion.lower()
    return any(p.lower() in low for p in phrases)


@contextlib.contextmanager
def intra_op_threads(n: int) -> Iterator[None]:
    """torch's intra-op thread count set to ``n`` for the block, restored after."""
    before = torch.get_num_threads()
    if n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


_FASTER: "weakref.WeakKeyDictionary[torch.nn.Module, dict[tuple[int, int], int]]" = weakref.WeakKeyDictionary()
#: The largest forward pass timed to choose a thread count (tokens): a small sample of the work, so that timing
#: it four times costs little next to the work (a 135M-parameter model runs 128 tokens in well under a second).
_SAMPLE_TOKENS = 128


@torch.inference_mode()
def faster_threads(lm: LoadedModel, rows: int, width: int = 1) -> int:
    """The intra-op thread count (torch's current one, or one) under which a forward pass of ``rows`` x ``width``
    tokens runs faster on this CPU (``width`` 1: a decode step). Measured once per model and power-of-two shape
    (up to two timed passes each way, interleaved, the faster of each kept; at most ``_SAMPLE_TOKENS`` tokens, rows
    cut to fit) and remembered.

    A forward pass is a few hundred kernels: when the cores are not free for this process alone, threads that
    must meet after each kernel wait for one another (measured here, on a busy 2-core machine: one thread
    generated 32 rows 40x faster than two, and extracted 3x faster). The CPU kernels split rows and columns of
    their outputs among threads, not a row's sums, so results do not depend on the count (the tests compare
    them). On a GPU it returns torch's setting."""
    now = torch.get_num_threads()
    if lm.device.type != "cpu" or now == 1:
        return now
    w = 1 << max(0, int(width) - 1).bit_length()
    r = min(1 << max(0, int(rows) - 1).bit_length(), max(1, _SAMPLE_TOKENS // w))
    seen = _FASTER.setdefault(lm.model, {})
    if (r, w) not in seen:
        x = torch.zeros((r, w), dtype=torch.long, device=lm.device)
        best = {now: math.inf, 1: math.inf}
        for _ in range(2):
            for n in (1, now):
                with intra_op_threads(n):
                    t = time.perf_counter()
                    _forward_last(lm, x)
                    best[n] = min(best[n], time.perf_counter() - t)
            if max(best.values()) > 2 * min(best.values()):  # clear after one pass each: the slow one costs most
                break
        seen[(r, w)] = 1 if best[1] < best[now] else now
    return seen[(r, w)]


def _forward_last(lm: LoadedModel, x: torch.Tensor) -> None:
    try:  # the last position's logits only, as generation and scoring compute them
        lm.model(input_ids=x, use_cache=False, logits_to_keep=1)
    except TypeError:
        lm.model(input_ids=x, use_cache=False)


def stacked(conditions: Sequence[Sequence[Intervention]], rows: int) -> list[Intervention]:
    """The interventions of ``conditions`` for a batch that repeats one ``rows``-row batch once per condition:
    condition k acts on rows ``k * rows`` to ``(k + 1) * rows`` only (an empty condition: those rows run plain)."""
    return [dataclasses.replace(iv, rows=slice(k * rows, (k + 1) * rows))
            for k, ivs in enumerate(conditions) for iv in ivs]


def stack_groups(n_conditions: int, rows: int, tokens_per_row: int, lm: LoadedModel,
                 max_bytes: int = STACK_BYTES) -> Iterator[range]:
    """Consecutive ranges of condition indices to stack into one batch of ``rows`` rows per condition, each row
    ``tokens_per_row`` long: as many as fit in ``max_bytes`` of KV cache (keys and values of every layer), at least
    one. Stacking runs the same kernels on one larger batch: on a CPU, where small batches are bound by per-op
    overhead, k conditions then cost about what one does."""
    p = next(lm.model.parameters())
    per_row = 2 * lm.adapter.n_layers * lm.adapter.d_model * p.element_size() * max(1, tokens_per_row)
    k = max(1, int(max_bytes // (per_row * max(1, rows))))
    for s in range(0, n_conditions, k):
        yield range(s, min(s + k, n_conditions))


@dataclass
class HFGenerator:
    """Greedy generation with transformers ``generate``, in batches of ``batch_size`` prompts sorted by length.
    ``threads``: intra-op threads while generating; ``"auto"``: whichever of torch's setting and one makes a
    decode step of the batch faster on this machine (:func:`faster_threads`)."""

    lm: LoadedModel
    template: PromptTemplate = PromptTemplate("none")
    batch_size: int = 32
    threads: int | str = "auto"

    def _threads(self, rows: int) -> int:
        if self.threads == "auto":
            return faster_threads(self.lm, rows)
        if not isinstance(self.threads, int) or self.threads < 1:
            raise ValueError(f"threads={self.threads!r}: a positive number or 'auto'")
        return self.threads

    @torch.inference_mode()
    def _ids_and_eos(self, texts: Sequence[str]) -> tuple[list[list[int]], Any]:
        """The templated prompts' token ids, and the stop tokens: the model's own (a chat model's end-of-turn
        marker among them), else the tokenizer's."""
        tok = self.lm.tokenizer
        prompts = [self.template.apply(t, tok) for t in texts]
        ids = tokenize(tok, prompts, add_special_tokens=self.template.spec != "chat")
        eos = getattr(getattr(self.lm.model, "generation_config", None), "eos_token_id", None)
        return ids, tok.eos_token_id if eos is None else eos

    def generate(
        self, texts: Sequence[str], *, max_new_tokens: int = 32, interventions: Sequence[Intervention] = ()
    ) -> list[str]:
        for iv in interventions:
            if not iv.every_position:
                raise ValueError("generation interventions act on every position: give add/ablate with no index")
        tok = self.lm.tokenizer
        ids, eos = self._ids_and_eos(texts)
        outs: list[str] = [""] * len(ids)
        # Longest first inside length order keeps padding low; results go back to input order.
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        for s in range(0, len(order), self.batch_size):
            chunk = order[s : s + self.batch_size]
            inputs = pad_batch([ids[i] for i in chunk], tok.pad_token_id, side="left", device=self.lm.device)
            inputs.pop("position_ids")  # generate derives them from the mask, step by step
            if inputs["input_ids"].shape[1] < 2 and any(iv.prompt_only for iv in interventions):
                raise ValueError("prompt_only interventions need prompts of at least 2 tokens: a 1-token "
                                 "prompt's forward pass looks like a decode step")
            threads = self._threads(len(chunk))  # timed before the hooks go in
            with hooks(self.lm.adapter, None, interventions), intra_op_threads(threads):
                gen = self.lm.model.generate(
                    **inputs,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=tok.pad_token_id,
                    eos_token_id=eos,
                    use_cache=True,  # prompt_only interventions rely on single-token decode steps
                )
            new = gen[:, inputs["input_ids"].shape[1] :]
            for row, i in enumerate(chunk):
                outs[i] = tok.decode(new[row], skip_special_tokens=True).strip()
        return outs

    @torch.inference_mode()
    def generate_many(
        self,
        texts: Sequence[str],
        conditions: Sequence[Sequence[Intervention]],
        *,
        max_new_tokens: int = 32,
        stop: Callable[[str], bool] | None = None,
        max_bytes: int = STACK_BYTES,
    ) -> list[list[str]]:
        """Greedy completions of ``texts`` under each of ``conditions`` (intervention lists; ``[]``: none):
        ``[condition][text]``, each equal to :meth:`generate` with that condition's interventions.

        Every batch of prompts (the batches :meth:`generate` makes, so the padding is the same) runs once for
        several conditions, repeated along the batch with each condition acting on its own rows
        (:func:`stacked`, :func:`stack_groups`): the rows of a forward pass do not interact (bit for bit where the
        BLAS runs one kernel whatever the row count; a near-tie could else differ by float32 rounding). ``stop``: a test
        on a completion's text so far that is True once what the caller reads from it can no longer change
        (e.g. a refusal phrase seen); such a row ends there, with its completion cut, and the batch ends when
        every row has ended."""
        for ivs in conditions:
            for iv in ivs:
                if not iv.every_position or iv.rows is not None:
                    raise ValueError("generation interventions act on every position and row: give add/ablate "
                                     "with no index and no rows")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens}: at least 1")
        tok = self.lm.tokenizer
        ids, eos = self._ids_and_eos(texts)
        outs: list[list[str]] = [[""] * len(ids) for _ in conditions]
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        for s in range(0, len(order), self.batch_size):
            chunk = order[s : s + self.batch_size]
            inputs = pad_batch([ids[i] for i in chunk], tok.pad_token_id, side="left", device=self.lm.device)
            inputs.pop("position_ids")
            width, n = inputs["input_ids"].shape[1], len(chunk)
            if width < 2 and any(iv.prompt_only for ivs in conditions for iv in ivs):
                raise ValueError("prompt_only interventions need prompts of at least 2 tokens: a 1-token "
                                 "prompt's forward pass looks like a decode step")
            for group in stack_groups(len(conditions), n, width + max_new_tokens, self.lm, max_bytes):
                k = len(group)
                batch = {key: v.repeat(k, *([1] * (v.dim() - 1))) for key, v in inputs.items()}
                extra = {}
                if stop is not None:
                    from transformers import StoppingCriteriaList

                    extra["stopping_criteria"] = StoppingCriteriaList([_StopWhen(tok, width, stop, k * n)])
                threads = self._threads(k * n)  # timed before the hooks go in
                with hooks(self.lm.adapter, None, stacked([conditions[c] for c in group], n)), \
                        intra_op_threads(threads):
                    gen = self.lm.model.generate(
                        **batch,
                        max_new_tokens=max_new_tokens,
                        do_sample=False,
                        pad_token_id=tok.pad_token_id,
                        eos_token_id=eos,
                        use_cache=True,
                        **extra,
                    )
                texts_out = tok.batch_decode(gen[:, width:], skip_special_tokens=True)
                for g, c in enumerate(group):
                    for row, i in enumerate(chunk):
                        outs[c][i] = texts_out[g * n + row].strip()
        return outs


class _StopWhen:
    """A ``generate`` stopping criterion: a row is done once ``stop`` holds for its completion so far (stripped,
    as completions are returned)."""

    def __init__(self, tok, start: int, stop: Callable[[str], bool], rows: int):
        self.tok, self.start, self.stop = tok, start, stop
        self.done = torch.zeros(rows, dtype=torch.bool)

    def __call__(self, input_ids: torch.Tensor, scores=None, **kwargs) -> torch.Tensor:
        todo = (~self.done).nonzero().flatten().tolist()
        if todo:
            texts = self.tok.batch_decode(input_ids[todo, self.start :], skip_special_tokens=True)
            for r, t in zip(todo, texts):
                if self.stop(t.strip()):
                    self.done[r] = True
        return self.done.to(input_ids.device)


def generate_each(
    generator: "Generator",
    texts: Sequence[str],
    conditions: Sequence[Sequence[Intervention]],
    *,
    max_new_tokens: int = 32,
    stop: Callable[[str], bool] | None = None,
) -> list[list[str]]:
    """Completions of ``texts`` under each condition: stacked by generators that can (``generate_many``), one
    ``generate`` call per condition by the others (their completions are then never cut by ``stop``)."""
    many = getattr(generator, "generate_many", None)
    if many is not None:
        return many(texts, conditions, max_new_tokens=max_new_tokens, stop=stop)
    return [generator.generate(list(texts), max_new_tokens=max_new_tokens, interventions=list(ivs))
            for ivs in conditions]


class VLLMGenerator:
    """vLLM-backed greedy generation for GPU clusters, with the same intervention hooks.

    The engine is built for hooks (:func:`~mechdiff.engine.vllm_backend.engine_kwargs`): ``enforce_eager=True``
    (a compiled model with CUDA graphs never runs hooks added after start-up; an explicit ``enforce_eager=False``
    is refused, since interventions would silently do nothing), prefix caching off, the engine core in this process,
    ``tensor_parallel_size`` passed to vLLM. Hooks are installed on every worker through ``LLM.apply_model`` and
    the decoder layers are found per family (:func:`~mechdiff.engine.vllm_backend.decoder_layers`); each hooked
    call raises :class:`~mechdiff.engine.vllm_backend.HookNeverFiredError` if an installed hook never ran.
    ``release``: HF models (``LoadedModel`` or ``nn.Module``) whose GPU memory is freed before the engine starts
    (they are unusable afterwards). Prompts are templated and tokenized as :class:`HFGenerator` does them (the
    model's own tokenizer, no second BOS after a chat template), so both generators see the same token ids.
    """

    def __init__(self, model_path: str, template: PromptTemplate = PromptTemplate("none"), *,
                 tensor_parallel_size: int = 1, gpu_memory_utilization: float | None = None,
                 release: Sequence[Any] = (), tokenizer: Any = None, **llm_kwargs):
        from mechdiff.engine import vllm_backend as vb

        vb.require_vllm()
        kw = vb.engine_kwargs(llm_kwargs, hooks=True, tensor_parallel_size=tensor_parallel_size,
                              gpu_memory_utilization=gpu_memory_utilization)
        vb.set_inprocess_env()
        vb.release_cuda(*release)
        if tokenizer is None:
            from mechdiff.engine.models import load_tokenizer

            tokenizer = load_tokenizer(model_path, revision=kw.get("revision"),
                                       trust_remote_code=bool(kw.get("trust_remote_code", False)))
        from vllm import LLM

        self._init(vb.HookedLLM(LLM(model=model_path, **kw)), template, tokenizer)

    def _init(self, hooked: Any, template: PromptTemplate, tokenizer: Any) -> None:
        self.hooked, self.llm, self.template, self.tokenizer = hooked, hooked.llm, template, tokenizer

    @classmethod
    def from_llm(cls, llm: Any, tokenizer: Any, template: PromptTemplate = PromptTemplate("none"), *,
                 sampling: Callable[[int], Any] | None = None, arch: str | None = None) -> "VLLMGenerator":
        """A generator on an engine built elsewhere (it must run eagerly for interventions: checked where the
        engine says, and by the hooks' firing counts in any case). ``sampling``: max_tokens -> sampling params
        (default vLLM's greedy ``SamplingParams``)."""
        from mechdiff.engine.vllm_backend import HookedLLM

        gen = cls.__new__(cls)
        gen._init(HookedLLM(llm, sampling, arch), template, tokenizer)
        return gen

    def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        prompts = [self.template.apply(t, self.tokenizer) for t in texts]
        return tokenize(self.tokenizer, prompts, add_special_tokens=self.template.spec != "chat")

    def generate(
        self, texts: Sequence[str], *, max_new_tokens: int = 32, interventions: Sequence[Intervention] = ()
    ) -> list[str]:
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens}: at least 1")
        self.hooked.check_interventions(interventions)  # before any tokenizing or engine work
        outs, _ = self.hooked.run(self.token_ids(texts), max_new_tokens, interventions)
        return [self.tokenizer.decode(list(r.outputs[0].token_ids), skip_special_tokens=True).strip() for r in outs]
