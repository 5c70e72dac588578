"""``mechdiff sweep run`` and ``mechdiff sweep status``: a sweep's extraction on a Ray cluster."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from mechdiff.cli.common import EXPECTED, err, fail, man_help, opt_progress, out

__all__ = ["sweep_app"]

sweep_app = typer.Typer(
    help="Sweeps: model groups x datasets x captures, extracted on a Ray cluster.", no_args_is_help=True
)


def run_cmd(
    sweep: Path = typer.Argument(..., help="The sweep YAML file."),
    address: Optional[str] = typer.Option(
        None, "--address", help="Ray cluster: host:port, ray://host:10001 or auto \\[default: a Ray on this machine]."
    ),
    actors: Optional[int] = typer.Option(None, help="At most this many model replicas \\[default: resources.actors, or all that fit]."),
    progress: bool = opt_progress("Show the live display and the summary tables."),
) -> None:
    from mechdiff.cluster.runner import SweepFailed, run_sweep
    from mechdiff.cluster.sweep import load_sweep

    try:
        sw = load_sweep(sweep)
    except EXPECTED as e:
        fail(e)
    try:
        rep = run_sweep(sw, address=address, progress=progress, actors=actors, console=err)
    except SweepFailed as e:  # units that failed after their retries: named, exit 1 (not bad input)
        err.print(f"[bold red]{len(e.report.failures)} unit(s) failed[/]", highlight=False)
        for k, v in e.report.failures.items():
            err.print(f"  {k}: {v}", highlight=False)
        raise typer.Exit(1)
    except EXPECTED as e:
        fail(e)
    except RuntimeError as e:  # Ray's own (no cluster at --address, ...): its message is the line
        fail(str(e))
    done = sum(r.done for r in rep.rows)
    total = sum(r.total for r in rep.rows)
    out.print(
        f"sweep {rep.sweep}: {done}/{total} units done ({rep.units_run} run now, {rep.units_skipped} already done), "
        f"{rep.tokens:,} tokens in {rep.seconds:.1f}s, {rep.retries} retried, {rep.actor_deaths} actor(s) died"
        + (f", {rep.tokenizations_reused} dataset tokenization(s) shared" if rep.tokenizations_reused else ""),
        highlight=False,
    )


sweep_app.command("run", help=man_help("""Extract every capture of every model on every dataset of SWEEP; re-running resumes.

    The sweep file is checked completely (keys, types, files, layer ranges, existing stores) before Ray
    starts. Each unit (a store shard) is extracted by a pool of model replicas and retried where a replica
    dies; finished units are kept.

    EXAMPLE

      mechdiff sweep run sweep.yaml --address ray://head:10001

    EXIT STATUS

    0 when every unit is done; 1 when units failed after their retries (named on stderr); 2 on bad input.
    """))(run_cmd)


@sweep_app.command("status")
def status_cmd(sweep: Path = typer.Argument(..., help="The sweep YAML file.")) -> None:
    """Units (store shards) done / total per model, capture and dataset.

    EXAMPLE

      mechdiff sweep status sweep.yaml
    """
    from mechdiff.cluster.sweep import sweep_status

    try:
        rows = sweep_status(sweep)
    except EXPECTED as e:
        fail(e)
    t = Table(title=f"sweep {sweep}", title_justify="left")
    for c in ("model", "replica", "dataset", "capture", "units", "", "store group"):
        t.add_column(c, justify="right" if c == "units" else "left")
    for r in rows:
        style = {"done": "green", "partial": "yellow", "not started": "dim"}[r.state]
        t.add_row(r.model, r.resources, r.dataset, r.capture, f"{r.done}/{r.total}", f"[{style}]{r.state}[/]",
                  f"{r.url} {r.group}")
    done, total = sum(r.done for r in rows), sum(r.total for r in rows)
    t.caption = f"{done}/{total} units done"
    out.print(t)
