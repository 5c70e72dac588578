"""``mechdiff run``: the main job, every study on a model group, with results.json and report.html."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from mechdiff.cli.common import EXPECTED, check_output_dir, err, fail, man_help, opt_device, opt_out, opt_progress, out

__all__ = ["run", "print_findings"]


def run(
    sweep: Optional[Path] = typer.Argument(None, help="A sweep YAML file; without one, the embedded model pair and its datasets."),
    out_dir: Path = opt_out(Path("mechdiff-out"), "Output directory: store.zarr, results.json, report.html, one folder per study."),
    address: Optional[str] = typer.Option(None, help="Ray cluster address for a sweep: its extraction, its studies (a task per model group, a GPU each where there are GPUs) and their dask graphs run there; OUT must be on storage the workers share (default: a local Ray extracts, the studies run here)."),
    studies: str = typer.Option("knowledge,truthfulness,refusal,confidence", help="Comma-separated studies to run."),
    quick: bool = typer.Option(False, help="Smaller samples everywhere: a smoke run in about a minute."),
    device: str = opt_device(),
    progress: bool = opt_progress(),
) -> None:
    from mechdiff.pipeline import RunOptions, embedded_job, run_job

    try:
        check_output_dir(out_dir)  # a file or a read-only directory is refused before any study runs
        opts = RunOptions(studies=tuple(s.strip() for s in studies.split(",") if s.strip()), quick=quick, device=device,
                          progress=progress)
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
    t0 = time.perf_counter()
    if sweep is not None and address is not None:
        # on a cluster the studies run there too: one task per group where a model replica fits
        from mechdiff.cluster.study_runner import run_groups_on_cluster
        from mechdiff.cluster.sweep import load_sweep

        err.print(f"studies of {len(jobs)} group(s) run on the Ray cluster at {address}, dask graphs too")
        try:
            runs = run_groups_on_cluster(jobs, opts, address, load_sweep(sweep).resources)
        except Exception as e:  # a failed group: say which error, not a Ray traceback
            fail(f"studies on the cluster failed: {str(e).strip().splitlines()[-1]}")
        for job, r in zip(jobs, runs):
            err.print(f"[bold]{job.group.name}[/]: studies ran on {r.host} (pid {r.pid}) in "
                      + ", ".join(f"{n} {s:.1f}s" for n, s in r.outcome.seconds.items()))
            print_findings(r.outcome)
            out.print(f"wrote {r.outcome.results_json} and {r.outcome.report}")
    else:
        for job in jobs:
            err.print(f"[bold]{job.group.name}[/]: {', '.join(f'{k} = {v}' for k, v in job.group.models.items())}")
            outcome = run_job(job, opts, on_study=lambda n, s: err.print(f"  {n} done in {s:.1f}s"))
            print_findings(outcome)
            out.print(f"wrote {outcome.results_json} and {outcome.report}")
    err.print(f"total {time.perf_counter() - t0:.1f}s")


run.__doc__ = man_help("""Run every study: extraction, the four analyses, results.json and a self-contained report.html.

    DESCRIPTION

    Without SWEEP it runs on the embedded base / post-trained pair and its datasets; with SWEEP it runs that
    sweep's extraction (on Ray; --address for a cluster) and then its studies for each model group. The models
    load once for all studies; a second run reuses the finished parts of the store. Each finding is printed
    with its verdict against the paper (agrees, disagrees, inconclusive).

    OUTPUTS

    OUT/store.zarr      every study's activations (resumable)
    OUT/<study>/        results.zarr, summary.json and figures of each study
    OUT/results.json    every number, finding and store read, with provenance
    OUT/report.html     the report, readable offline

    EXAMPLES

      mechdiff run --out mechdiff-out
      mechdiff run sweep.yaml --address ray://head:10001 --out /shared/out

    EXIT STATUS

    0 on success, 2 on bad input (one line on stderr).
    """)


def print_findings(outcome) -> None:
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
