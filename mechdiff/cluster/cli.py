"""``mechdiff sweep run`` and ``mechdiff sweep status``; :func:`register` adds them to the main app."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from mechdiff.cli_common import fail as _fail

__all__ = ["register", "sweep_app"]

sweep_app = typer.Typer(
    help="Sweeps: model groups x datasets x captures, extracted on a Ray cluster.", no_args_is_help=True
)
_err = Console(stderr=True)
_out = Console()


@sweep_app.command("run")
def run_cmd(
    sweep: Path = typer.Argument(..., help="The sweep YAML file."),
    address: Optional[str] = typer.Option(
        None, "--address", help="Ray cluster: host:port, ray://host:10001 or auto [default: a Ray on this machine]."
    ),
    actors: Optional[int] = typer.Option(None, help="At most this many model replicas [default: resources.actors, or all that fit]."),
    progress: bool = typer.Option(True, help="Show the live display and the summary tables."),
) -> None:
    """Extract every capture of every model on every dataset of SWEEP; re-running resumes.

    The sweep file is checked completely (keys, types, files, layer ranges, existing stores) before
    Ray starts. Exits 1 if units failed after their retries, naming them.
    """
    from mechdiff.cluster.runner import SweepFailed, run_sweep
    from mechdiff.cluster.sweep import SweepError, load_sweep

    try:
        sw = load_sweep(sweep)
    except SweepError as e:
        _fail(str(e))
    try:
        rep = run_sweep(sw, address=address, progress=progress, actors=actors, console=_err)
    except SweepError as e:
        _fail(str(e))
    except SweepFailed as e:
        _err.print(f"[bold red]{len(e.report.failures)} unit(s) failed[/]", highlight=False)
        for k, v in e.report.failures.items():
            _err.print(f"  {k}: {v}", highlight=False)
        raise typer.Exit(1)
    except (ConnectionError, RuntimeError, OSError) as e:
        _fail(str(e))
    done = sum(r.done for r in rep.rows)
    total = sum(r.total for r in rep.rows)
    _out.print(
        f"sweep {rep.sweep}: {done}/{total} units done ({rep.units_run} run now, {rep.units_skipped} already done), "
        f"{rep.tokens:,} tokens in {rep.seconds:.1f}s, {rep.retries} retried, {rep.actor_deaths} actor(s) died",
        highlight=False,
    )


@sweep_app.command("status")
def status_cmd(sweep: Path = typer.Argument(..., help="The sweep YAML file.")) -> None:
    """Units (store shards) done / total per model, capture and dataset."""
    from mechdiff.cluster.sweep import SweepError, sweep_status

    try:
        rows = sweep_status(sweep)
    except SweepError as e:
        _fail(str(e))
    t = Table(title=f"sweep {sweep}", title_justify="left")
    for c in ("model", "dataset", "capture", "units", "", "store group"):
        t.add_column(c, justify="right" if c == "units" else "left")
    for r in rows:
        style = {"done": "green", "partial": "yellow", "not started": "dim"}[r.state]
        t.add_row(r.model, r.dataset, r.capture, f"{r.done}/{r.total}", f"[{style}]{r.state}[/]", f"{r.url} {r.group}")
    done, total = sum(r.done for r in rows), sum(r.total for r in rows)
    t.caption = f"{done}/{total} units done"
    _out.print(t)


def register(app: typer.Typer) -> None:
    """Add the ``sweep`` command group to ``app``."""
    app.add_typer(sweep_app, name="sweep")
