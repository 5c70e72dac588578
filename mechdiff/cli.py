"""The mechdiff command line."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from mechdiff.cli_common import EXPECTED, ErrorLineGroup, check_output_dir, fail

app = typer.Typer(
    cls=ErrorLineGroup,  # every command ends an error with one line and exit 2
    name="mechdiff",
    help=(
        "Compare a base LLM with its post-trained versions from the inside.\n\n"
        "mechdiff stores activations once, in chunked Zarr stores, and answers four questions about how "
        "post-training reshaped the model: where facts are stored (knowledge), whether truth is a shared linear "
        "direction (truthfulness), whether refusal is (refusal), and what entropy neurons do (confidence).\n\n"
        "Start with `mechdiff run`: every study on the embedded model pair, with an HTML report."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
store_app = typer.Typer(help="Inspect and check activation stores.", no_args_is_help=True)
app.add_typer(store_app, name="store")
analyze_app = typer.Typer(help="Run one study on stores and models (the main job runs all four).", no_args_is_help=True)
app.add_typer(analyze_app, name="analyze")


def _mount() -> None:
    import importlib

    from mechdiff.cluster.cli import register as register_sweep
    from mechdiff.zoo.cli import zoo_app

    app.add_typer(zoo_app, name="zoo")
    for study in ("truthfulness", "refusal", "knowledge", "confidence"):
        importlib.import_module(f"mechdiff.analyses.{study}_cli").register(analyze_app)
    register_sweep(app)


console = Console(stderr=True)
out = Console()


@app.callback()
def _options(
    debug: bool = typer.Option(False, "--debug", help="On an error, show the full traceback instead of one line."),
) -> None:
    # read by ErrorLineGroup from the root context's params; nothing to do here
    pass


@app.command()
def extract(
    model: str = typer.Option(..., "--model", "-m", help="Local model directory, a .gguf file or a hub id (AutoModelForCausalLM)."),
    data: Path = typer.Option(..., "--data", "-d", help="CSV, JSON or JSONL with a text, statement, instruction or goal column; other columns become coords."),
    gguf_file: Optional[str] = typer.Option(None, "--gguf-file", help="A GGUF file inside the --model directory (or hub repo). GGUF loads through transformers, dequantized to --model-dtype; needs `pip install mechdiff[gguf]`, and no --allow-pickle: GGUF is not pickle."),
    out_store: str = typer.Option(..., "--out", "-o", help="Store root: a local path or an fsspec URL (s3://, gs://)."),
    sites: str = typer.Option("resid_post", help="Comma-separated: resid_pre, resid_post, attn_out, mlp_out, mlp_act."),
    layers: str = typer.Option("all", help="all, a list 0,3,5, or a range 2:6 (end exclusive); negatives count from the end."),
    positions: str = typer.Option("last", help="last, last:k, all, from:MARKER, or post_instruction (from the chat template)."),
    template: str = typer.Option("none", help="none, chat (the tokenizer's chat template), or a format string with {text}."),
    group: Optional[str] = typer.Option(None, help="Group inside the store [default: MODEL/DATASET]."),
    text_column: Optional[str] = typer.Option(None, help="Column holding the prompt text, if not one of the usual names."),
    dtype: str = typer.Option("float16", help="Stored dtype: float16 (fails loudly on overflow) or float32."),
    model_dtype: str = typer.Option("float32", help="Dtype the model runs in: float32, bfloat16 or float16."),
    device: str = typer.Option("cpu", help="cpu, cuda, cuda:N or auto."),
    token_budget: Optional[int] = typer.Option(None, help="Padded tokens per batch (rows x longest prompt) [default: by device type: smaller batches on CPU, where they run faster per token]."),
    shard_size: int = typer.Option(256, help="Examples per shard: the unit of resumption and of chunking."),
    truncate: bool = typer.Option(False, help="Keep the last tokens of prompts longer than the context instead of refusing."),
    compression: str = typer.Option("zstd", help="zstd or none."),
    allow_pickle: bool = typer.Option(False, help="Allow pickle weights (.bin/.pt: runs pickled code); safetensors and GGUF need no opt-in."),
    trust_remote_code: bool = typer.Option(False, help="Allow model code from the model's repository."),
) -> None:
    """Capture activations of MODEL on DATA into a Zarr store; re-running resumes where it stopped.

    Every input is checked before the model loads, and the store is left untouched on an error.
    """
    from mechdiff.engine import models
    from mechdiff.engine.data import load_prompts
    from mechdiff.engine.extract import CaptureSpec, default_group, extract as run_extract

    try:
        gg = models.gguf_source(model, gguf_file)
        if gg is not None and gg.is_local:
            model, gguf_file = gg.model_id, None  # one path names the file from here on (and in provenance)
    except EXPECTED as e:
        fail(e)
    group = group or default_group(model, str(data))
    try:
        prompts = load_prompts(data, text_column=text_column)
        spec = CaptureSpec(
            sites=sites, layers=layers, positions=positions, template=template, dtype=dtype,
            compression=None if compression == "none" else compression,
        )
        if token_budget is not None:
            from mechdiff.engine.batching import resolve_token_budget

            resolve_token_budget(token_budget, device)  # a budget below one token is refused before any loading
        check_output_dir(out_store)
        _precheck(model, prompts, spec, out_store, group, shard_size=shard_size, truncate=truncate,
                  allow_pickle=allow_pickle, trust_remote_code=trust_remote_code, gguf_file=gguf_file)
    except EXPECTED as e:
        fail(e)
    try:
        lm = models.load_model(model, dtype=model_dtype, device=device, allow_pickle=allow_pickle,
                               trust_remote_code=trust_remote_code, gguf_file=gguf_file)
        rep = run_extract(lm, prompts, spec, out_store, group, token_budget=token_budget, shard_size=shard_size,
                          truncate=truncate)
    except EXPECTED as e:
        fail(e)
    out.print(
        f"{rep.group}: {rep.n_examples} examples, {rep.shards_written} shards written, "
        f"{rep.shards_skipped} already done, {rep.tokens:,} tokens in {rep.seconds:.1f}s "
        f"({rep.tokens_per_s:,.0f} tok/s) -> {rep.url}"
    )


@app.command()
def run(
    sweep: Optional[Path] = typer.Argument(None, help="A sweep YAML file; without one, the embedded model pair and its datasets."),
    out_dir: Path = typer.Option(Path("mechdiff-out"), "--out", "-o", help="Output directory: store.zarr, results.json, report.html, one folder per study."),
    address: Optional[str] = typer.Option(None, help="Ray cluster address for a sweep: its extraction, its studies (a task per model group, a GPU each where there are GPUs) and their dask graphs run there; OUT must be on storage the workers share (default: a local Ray extracts, the studies run here)."),
    studies: str = typer.Option("knowledge,truthfulness,refusal,confidence", help="Comma-separated studies to run."),
    quick: bool = typer.Option(False, help="Smaller samples everywhere: a smoke run in about a minute."),
    device: str = typer.Option("cpu", help="cpu, cuda or auto."),
) -> None:
    """Run the whole study: extract, the four analyses, results.json and a self-contained report.html.

    Without SWEEP it runs on the embedded base / post-trained pair; with SWEEP it runs that sweep's
    extraction (on Ray, --address for a cluster) and then its studies for each model group. A second
    run reuses the finished parts of the store.
    """
    from mechdiff.pipeline import RunOptions, embedded_job, run_job

    try:
        check_output_dir(out_dir)  # a file or a read-only directory is refused before any study runs
        opts = RunOptions(studies=tuple(s.strip() for s in studies.split(",") if s.strip()), quick=quick, device=device)
        if sweep is None:
            jobs = [embedded_job(out_dir, opts.studies, quick)]
        else:
            from mechdiff.cluster.study_plan import sweep_jobs

            # the sweep's extraction includes every study's captures: the studies then read the pool's stores
            jobs = sweep_jobs(sweep, out_dir, address=address, studies=opts.studies, quick=quick)
        for job in jobs:
            job.inputs.check(job.studies)
    except EXPECTED as e:
        fail(e)
    import time

    t0 = time.perf_counter()
    if sweep is not None and address is not None:
        # on a cluster the studies run there too: one task per group where a model replica fits
        from mechdiff.cluster.study_runner import run_groups_on_cluster
        from mechdiff.cluster.sweep import load_sweep

        console.print(f"studies of {len(jobs)} group(s) run on the Ray cluster at {address}, dask graphs too")
        try:
            runs = run_groups_on_cluster(jobs, opts, address, load_sweep(sweep).resources)
        except Exception as e:  # a failed group: say which error, not a Ray traceback
            fail(f"studies on the cluster failed: {str(e).strip().splitlines()[-1]}")
        for job, r in zip(jobs, runs):
            console.print(f"[bold]{job.group.name}[/]: studies ran on {r.host} (pid {r.pid}) in "
                          + ", ".join(f"{n} {s:.1f}s" for n, s in r.outcome.seconds.items()))
            _print_findings(r.outcome)
            out.print(f"wrote {r.outcome.results_json} and {r.outcome.report}")
    else:
        for job in jobs:
            console.print(f"[bold]{job.group.name}[/]: {', '.join(f'{k} = {v}' for k, v in job.group.models.items())}")
            outcome = run_job(job, opts, on_study=lambda n, s: console.print(f"  {n} done in {s:.1f}s"))
            _print_findings(outcome)
            out.print(f"wrote {outcome.results_json} and {outcome.report}")
    console.print(f"total {time.perf_counter() - t0:.1f}s")


def _print_findings(outcome) -> None:
    t = Table(title="Findings (vs the paper)", title_justify="left")
    # fold, never cut, the figures' names (a truncated name is a number nobody can look up); fits 80 columns
    t.add_column("study: finding", ratio=3, overflow="fold")
    t.add_column("pair", ratio=2, overflow="fold")
    t.add_column("measured", ratio=4, overflow="fold", min_width=22)
    t.add_column("verdict", min_width=7, overflow="fold")
    for name, res in outcome.results.items():
        for f in res.findings:
            # the first figures are the ones a finding rests on; results.json and the report have all
            nums = "\n".join(f"{k} = {v:.3g}" if isinstance(v, float) else f"{k} = {v}" for k, v in list(f.figures.items())[:4])
            colour = {"agrees": "green", "disagrees": "red"}.get(f.verdict, "yellow")
            t.add_row(f"{name}: {f.finding}", f.pair, nums, f"[{colour}]{f.verdict}[/]")
    out.print(t)


def _config_layers(model: str, trust_remote_code: bool) -> int:
    """The model's layer count from its config alone, so layer ranges are checked before weights load."""
    from mechdiff.engine.precheck import config_n_layers, read_config

    return config_n_layers(read_config(model, trust_remote_code=trust_remote_code), model)


def _precheck(
    model: str, prompts, spec, url: str, group: str, *, shard_size: int, truncate: bool, allow_pickle: bool,
    trust_remote_code: bool, gguf_file: str | None = None,
) -> None:
    """What ``extract`` would refuse after loading the weights, refused before: layers out of range, prompts
    longer than the context, and an existing group made by another model, tokenizer, dataset or spec."""
    from mechdiff.engine.models import load_tokenizer, local_weights_hash
    from mechdiff.engine.precheck import check_store_group, config_max_positions, config_n_layers, early_provenance, read_config

    cfg = read_config(model, trust_remote_code=trust_remote_code, gguf_file=gguf_file)
    n_layers = config_n_layers(cfg, model)
    spec.resolve_layers(n_layers)  # a bad --layers fails before the tokenizer loads
    tok = load_tokenizer(model, trust_remote_code=trust_remote_code, gguf_file=gguf_file)
    early = early_provenance(tok, n_layers, config_max_positions(cfg), prompts, spec, truncate=truncate)
    if "://" not in url and not Path(url).exists():
        return  # opening would create the directory; a new store has nothing to compare
    early["model_id"] = model
    weights = local_weights_hash(model, allow_pickle=allow_pickle, gguf_file=gguf_file)  # None for a hub id; cached for load_model
    if weights is not None:
        early["weights_hash"] = weights
    check_store_group(url, group, early, shard_size=shard_size)


@store_app.command("info")
def store_info_cmd(
    store: str = typer.Argument(..., help="Store root: a local path or an fsspec URL."),
) -> None:
    """Groups, arrays, shapes, dtypes, chunks, provenance and the fraction done of a store."""
    from mechdiff.engine.store import store_info

    try:
        infos = store_info(store)
    except EXPECTED as e:  # StoreIncompleteError included: a group whose creation was interrupted
        fail(e)
    if not infos:
        fail(f"{store} holds no activation group")
    for g in infos:
        damaged = f"; shards {g.damaged_shards} damaged (a chunk missing): re-run the extraction to rewrite them" if g.damaged_shards else ""
        t = Table(title=f"{g.group}  ({g.fraction_done:.0%} done{damaged})", title_justify="left")
        for c in ("array", "shape", "dtype", "chunks"):
            t.add_column(c)
        for a in g.arrays:
            t.add_row(a.name, str(tuple(a.shape)), str(a.dtype), str(tuple(a.chunks)))
        out.print(t)
        p = Table(show_header=False, box=None)
        for k, v in sorted(g.provenance.items()):
            p.add_row(f"  {k}", str(v))
        out.print(p)


@store_app.command("verify")
def store_verify_cmd(
    store: str = typer.Argument(..., help="Store root: a local path or an fsspec URL."),
    group: Optional[str] = typer.Option(None, help="Group to check [default: the only group]."),
    sample: int = typer.Option(8, help="How many random finished examples to re-run (0: none, check the chunks only)."),
    repair: bool = typer.Option(False, help="Take down the done flags of damaged shards, so that the next extraction rewrites exactly those."),
    model: Optional[str] = typer.Option(None, help="Model to use instead of the one in the store's provenance."),
    device: str = typer.Option("cpu", help="cpu, cuda or auto."),
    seed: int = typer.Option(0, help="Seed for picking examples."),
) -> None:
    """Check every chunk of every finished shard (present, and its crc32c matching its bytes), then re-run
    SAMPLE stored examples through the model and report the largest difference from what is stored.

    Exits 1 when a chunk is missing or corrupt, or a difference exceeds the stored dtype's rounding. The
    model is not re-run on a damaged group.
    """
    from mechdiff.engine.verify import verify_store

    if sample < 0:
        fail(f"--sample {sample}: give 0 or more examples to re-run (0 checks the stored chunks only)")
    try:
        rep = verify_store(store, group, sample=sample, model=model, device=device, seed=seed, repair=repair)
    except (*EXPECTED, KeyError) as e:
        fail(e)
    ig = rep.integrity
    if ig is not None:
        out.print(f"{rep.group}: {ig.summary()}", highlight=False)
        for p in ig.problems[:10]:
            out.print(f"  shard {p.shard if p.shard is not None else '-'}: {p.array} chunk {p.key} is {p.problem}", highlight=False)
        if len(ig.problems) > 10:
            out.print(f"  ... and {len(ig.problems) - 10} more", highlight=False)
        if rep.repaired:
            out.print(f"done flags taken down for shards {rep.repaired}: re-run the extraction to rewrite exactly those", highlight=False)
        elif ig.group_damaged:
            out.print("coords written at the group's creation are damaged: remove the group and extract it again", highlight=False)
        elif not ig.ok:
            out.print(f"run `mechdiff store verify {store} --group {rep.group or '/'} --repair`, then the extraction "
                      "again: it rewrites exactly the damaged shards", highlight=False, soft_wrap=True)
    if rep.sites:
        t = Table(title=f"{rep.group}: {len(rep.examples)} examples re-run", title_justify="left")
        for c in ("site", "max |diff|", "max |diff| / max |x|", "ok"):
            t.add_column(c)
        for s in rep.sites:
            t.add_row(s.site, f"{s.max_abs_diff:.3g}", f"{s.max_rel_diff:.3g}", "yes" if s.max_rel_diff <= rep.tolerance else "NO")
        out.print(t)
    elif ig is not None and ig.ok:
        out.print(f"{rep.group}: no examples re-run (--sample 0)", highlight=False)
    if not rep.ok:
        raise typer.Exit(1)


_mount()


def main() -> None:  # pragma: no cover
    """The console script: ``app`` itself ends errors with one line (see ErrorLineGroup)."""
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
