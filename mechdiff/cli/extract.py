"""``mechdiff extract``: activations of one model on one dataset into a Zarr store."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from mechdiff.cli.common import (
    EXPECTED, LAYERS_HELP, check_output_dir, fail, man_help, opt_device, opt_layers, opt_model_dtype, opt_progress, out,
)

__all__ = ["extract", "config_layers", "precheck"]


def extract(
    model: str = typer.Option(..., "--model", "-m", help="Local model directory, a .gguf file or a hub id (AutoModelForCausalLM)."),
    data: Path = typer.Option(..., "--data", "-d", help="CSV, JSON or JSONL with a text, statement, instruction or goal column; other columns become coords."),
    gguf_file: Optional[str] = typer.Option(None, "--gguf-file", help="A GGUF file inside the --model directory (or hub repo). GGUF loads through transformers, dequantized to --model-dtype; needs `pip install mechdiff[gguf]`, and no --allow-pickle: GGUF is not pickle."),
    out_store: str = typer.Option(..., "--out", "-o", help="Store root: a local path or an fsspec URL (s3://, gs://)."),
    sites: str = typer.Option("resid_post", help="Comma-separated: resid_pre, resid_post, attn_out, mlp_out, mlp_act."),
    layers: str = opt_layers("all", LAYERS_HELP),
    positions: str = typer.Option("last", help="last, last:k, all, from:MARKER, or post_instruction (from the chat template)."),
    template: str = typer.Option("none", help="none, chat (the tokenizer's chat template), or a format string with {text}."),
    group: Optional[str] = typer.Option(None, help="Group inside the store \\[default: MODEL/DATASET]."),
    text_column: Optional[str] = typer.Option(None, help="Column holding the prompt text, if not one of the usual names."),
    store_dtype: str = typer.Option("float16", "--store-dtype", "--dtype", help="Stored dtype: float16 (fails loudly on overflow), bfloat16 (float32's range; read back as float32) or float32."),
    backend: str = typer.Option("hf", "--backend", help="hf (transformers forward hooks, any site, CPU or GPU) or vllm (vLLM's prefill on GPUs, resid_post only, --tensor-parallel-size for big models)."),
    tensor_parallel_size: int = typer.Option(1, "--tensor-parallel-size", help="vLLM backend: GPUs one model is split over."),
    model_dtype: str = opt_model_dtype(),
    device: str = opt_device(),
    token_budget: Optional[int] = typer.Option(None, help="Padded tokens per batch (rows x longest prompt) \\[default: by device type: smaller batches on CPU, where they run faster per token]."),
    shard_size: int = typer.Option(256, help="Examples per shard: the unit of resumption and of chunking."),
    truncate: bool = typer.Option(False, help="Keep the last tokens of prompts longer than the context instead of refusing."),
    append: bool = typer.Option(False, "--append", help="DATA grew at its end since --group was made (a streamed dataset): grow the group by the new examples and extract only them; the stored examples must be DATA's first rows."),
    compression: str = typer.Option("zstd", help="zstd or none."),
    allow_pickle: bool = typer.Option(False, help="Allow pickle weights (.bin/.pt: runs pickled code); safetensors and GGUF need no opt-in."),
    trust_remote_code: bool = typer.Option(False, help="Allow model code from the model's repository."),
    progress: bool = opt_progress(),
) -> None:
    from mechdiff.engine import models
    from mechdiff.engine.data import load_prompts
    from mechdiff.engine.extract import CaptureSpec, default_group, extract as run_extract

    try:
        gg = models.gguf_source(model, gguf_file)
        if gg is not None and gg.is_local:
            model, gguf_file = gg.model_id, None  # one path names the file from here on (and in provenance)
        group = group or default_group(model, str(data))
        prompts = load_prompts(data, text_column=text_column)
        spec = CaptureSpec(
            sites=sites, layers=layers, positions=positions, template=template, dtype=store_dtype,
            compression=None if compression == "none" else compression,
        )
        if token_budget is not None:
            from mechdiff.engine.batching import resolve_token_budget

            resolve_token_budget(token_budget, device)  # a budget below one token is refused before any loading
        check_output_dir(out_store)
        tokens = precheck(model, prompts, spec, out_store, group, shard_size=shard_size, truncate=truncate,
                          allow_pickle=allow_pickle, trust_remote_code=trust_remote_code, gguf_file=gguf_file,
                          append=append)
        reuse = {tokens.key: tokens}  # the precheck's tokenization, not a second one
        if backend not in ("hf", "vllm"):
            raise ValueError(f"--backend {backend!r}: hf or vllm")
        if backend == "vllm" and (gguf_file is not None or gg is not None or allow_pickle):
            raise ValueError("--backend vllm reads safetensors models only: no --gguf-file, no --allow-pickle")
    except EXPECTED as e:
        fail(e)
    if backend == "vllm":
        from mechdiff.engine.vllm_extract import extract_vllm

        try:
            rep = extract_vllm(model, prompts, spec, out_store, group, token_budget=token_budget or 8192,
                               shard_size=shard_size, truncate=truncate, dtype=model_dtype,
                               tensor_parallel_size=tensor_parallel_size, trust_remote_code=trust_remote_code,
                               progress=progress, append=append, reuse=reuse)
        except EXPECTED as e:
            fail(e)
        _report(rep)
        return
    try:
        lm = models.load_model(model, dtype=model_dtype, device=device, allow_pickle=allow_pickle,
                               trust_remote_code=trust_remote_code, gguf_file=gguf_file)
        rep = run_extract(lm, prompts, spec, out_store, group, token_budget=token_budget, shard_size=shard_size,
                          truncate=truncate, progress=progress, append=append, reuse=reuse)
    except EXPECTED as e:
        fail(e)
    _report(rep)


def _report(rep) -> None:
    out.print(
        f"{rep.group}: {rep.n_examples} examples, {rep.shards_written} shards written, "
        f"{rep.shards_skipped} already done, {rep.tokens:,} tokens in {rep.seconds:.1f}s "
        f"({rep.tokens_per_s:,.0f} tok/s) -> {rep.url}"
    )


extract.__doc__ = man_help("""Capture activations of MODEL on DATA into a Zarr store; re-running resumes where it stopped.

    DESCRIPTION

    Every prompt of DATA is run through MODEL once, in batches of about --token-budget padded tokens, and the
    activations at each of --sites, --layers and --positions are written to the group --group of the store
    --out, one shard of --shard-size examples at a time: an interrupted run resumes at the first unfinished
    shard. Every input is checked before the model loads (layers against the model's config, prompt lengths
    against its context, an existing group against this run's model, tokenizer, dataset and capture spec), and
    the store is left untouched on an error.

    INPUTS

    MODEL  a local directory, a .gguf file, or a hub id
    DATA   CSV / JSON / JSONL, one prompt per row; the other columns are kept as coordinates

    OUTPUTS

    OUT/GROUP/<site>   (example, layer, position, hidden) activations in --store-dtype, with provenance
                       (model, weights hash, tokenizer, dataset hash, capture spec) in the group's attributes

    EXAMPLE

      mechdiff extract --model meta-llama/Llama-3.1-8B --data cities.csv --sites resid_post,mlp_act \\
          --layers all --positions last:2 --out acts.zarr

    EXIT STATUS

    0 on success, 2 on bad input (one line on stderr).
    """)


def config_layers(model: str, trust_remote_code: bool = False) -> int:
    """The model's layer count from its config alone, so layer ranges are checked before weights load."""
    from mechdiff.engine.precheck import config_n_layers, read_config

    return config_n_layers(read_config(model, trust_remote_code=trust_remote_code), model)


def precheck(
    model: str, prompts, spec, url: str, group: str, *, shard_size: int, truncate: bool, allow_pickle: bool,
    trust_remote_code: bool, gguf_file: str | None = None, append: bool = False,
):
    """What ``extract`` would refuse after loading the weights, refused before: layers out of range, prompts
    longer than the context, and an existing group made by another model, tokenizer, dataset or spec. Returns
    the dataset's tokenization, for the extraction to reuse (checked by its key) instead of a second one."""
    from mechdiff.engine.models import load_tokenizer, local_weights_hash, tokenizer_hash
    from mechdiff.engine.precheck import (check_store_group, config_max_positions, config_n_layers, early_provenance,
                                          early_tokenization, read_config)

    cfg = read_config(model, trust_remote_code=trust_remote_code, gguf_file=gguf_file)
    n_layers = config_n_layers(cfg, model)
    spec.resolve_layers(n_layers)  # a bad --layers fails before the tokenizer loads
    tok = load_tokenizer(model, trust_remote_code=trust_remote_code, gguf_file=gguf_file)
    digest = tokenizer_hash(tok)  # once: it serialises the whole vocabulary
    tokens = early_tokenization(tok, n_layers, config_max_positions(cfg), prompts, spec, truncate=truncate,
                                definition=digest)
    early = early_provenance(digest, n_layers, prompts, spec)
    if "://" not in url and not Path(url).exists():
        return tokens  # opening would create the directory; a new store has nothing to compare
    early["model_id"] = model
    weights = local_weights_hash(model, allow_pickle=allow_pickle, gguf_file=gguf_file)  # None for a hub id; cached for load_model
    if weights is not None:
        early["weights_hash"] = weights
    check_store_group(url, group, early, shard_size=shard_size, append=append)
    return tokens
