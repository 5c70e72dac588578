"""Generation with hooks: greedy completions under interventions (refusal studies score these).

``HFGenerator`` (transformers ``generate``, batched, left-padded) is the default and runs anywhere.
``VLLMGenerator`` is for GPU clusters with the ``vllm`` extra; it needs CUDA and says so when absent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import torch

from mechdiff.engine.batching import PromptTemplate, pad_batch, tokenize
from mechdiff.engine.models import LoadedModel
from mechdiff.engine.sites import Intervention, hooks

__all__ = ["Generator", "HFGenerator", "VLLMGenerator", "vllm_available", "contains_refusal"]


class Generator(Protocol):
    def generate(
        self, texts: Sequence[str], *, max_new_tokens: int = 32, interventions: Sequence[Intervention] = ()
    ) -> list[str]:
        """Greedy completions of ``texts`` (templated by the generator) with ``interventions`` active."""
        ...


def contains_refusal(completion: str, phrases: Sequence[str]) -> bool:
    low = completion.lower()
    return any(p.lower() in low for p in phrases)


@dataclass
class HFGenerator:
    lm: LoadedModel
    template: PromptTemplate = PromptTemplate("none")
    batch_size: int = 32

    @torch.inference_mode()
    def generate(
        self, texts: Sequence[str], *, max_new_tokens: int = 32, interventions: Sequence[Intervention] = ()
    ) -> list[str]:
        for iv in interventions:
            if iv.index is not None or iv.kind == "replace":
                raise ValueError("generation interventions act on every position: give add/ablate with no index")
        tok = self.lm.tokenizer
        prompts = [self.template.apply(t, tok) for t in texts]
        ids = tokenize(tok, prompts, add_special_tokens=self.template.spec != "chat")
        # the model's own stop tokens (a chat model's end-of-turn marker among them), else the tokenizer's
        eos = getattr(getattr(self.lm.model, "generation_config", None), "eos_token_id", None)
        if eos is None:
            eos = tok.eos_token_id
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
            with hooks(self.lm.adapter, None, interventions):
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


def vllm_available() -> tuple[bool, str]:
    """(usable, reason) for the vLLM generator on this machine."""
    try:
        import vllm  # noqa: F401
    except ImportError:
        return False, "vLLM is not installed (pip install 'mechdiff[vllm]')"
    if not torch.cuda.is_available():
        return False, "vLLM needs a CUDA GPU and none is visible"
    return True, ""


class VLLMGenerator:
    """vLLM-backed greedy generation for GPU clusters, with the same intervention hooks.

    Hooks are PyTorch forward hooks on vLLM's in-process model, so the engine must run in-process
    (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), which this class sets. Module names follow vLLM's model
    definitions (``model.layers[i]``), which match the HF layout for the supported decoder families.
    """

    def __init__(self, model_path: str, template: PromptTemplate = PromptTemplate("none"), **llm_kwargs):
        ok, why = vllm_available()
        if not ok:
            raise RuntimeError(why)
        import os

        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM

        self.llm = LLM(model=model_path, **llm_kwargs)
        self.template = template
        self.tokenizer = self.llm.get_tokenizer()

    def _torch_model(self) -> torch.nn.Module:
        engine = self.llm.llm_engine
        for path in (
            "model_executor.driver_worker.worker.model_runner.model",
            "model_executor.driver_worker.model_runner.model",
            "engine_core.engine_core.model_executor.driver_worker.worker.model_runner.model",
        ):
            obj = engine
            try:
                for part in path.split("."):
                    obj = getattr(obj, part)
                return obj
            except AttributeError:
                continue
        raise RuntimeError("could not reach vLLM's in-process torch model to install hooks")

    def generate(
        self, texts: Sequence[str], *, max_new_tokens: int = 32, interventions: Sequence[Intervention] = ()
    ) -> list[str]:
        from vllm import SamplingParams

        model = self._torch_model()
        layers = model.model.layers
        handles = []
        for iv in interventions:
            if iv.site != "resid_post" or iv.index is not None:
                raise ValueError("the vLLM generator supports resid_post add/ablate at every position")
            if iv.prompt_only:
                # vLLM batches prefill and decode tokens of different requests into one flat forward pass
                raise ValueError("the vLLM generator cannot tell prompt tokens from decode steps: "
                                 "use interventions at every position (prompt_only=False) or the hf generator")

            def hook(module, args, output, iv=iv):
                # vLLM layers return (hidden, residual); the residual stream is their sum.
                if isinstance(output, tuple) and len(output) == 2:
                    h, r = output
                    full = h + r
                    return (iv.apply(full[None])[0] - r, r)
                return iv.apply(output[None])[0]

            handles.append(layers[iv.layer].register_forward_hook(hook))
        try:
            prompts = [self.template.apply(t, self.tokenizer) for t in texts]
            res = self.llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_new_tokens))
        finally:
            for h in handles:
                h.remove()
        return [r.outputs[0].text.strip() for r in res]
