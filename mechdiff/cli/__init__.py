"""The mechdiff command line: ``app`` (the console script ``mechdiff``) and :func:`main`.

One module per command group: ``extract``, ``store``, ``run``, ``analyze`` (one command per study, its flags
generated from the study's Config), ``sweep`` and ``zoo``; ``common`` holds the one error path and the options
every command shares.
"""

from __future__ import annotations

import typer

from mechdiff.cli import analyze, extract, run, store, sweep, zoo
from mechdiff.cli.common import ErrorLineGroup, fail

__all__ = ["app", "main", "fail"]

app = typer.Typer(
    cls=ErrorLineGroup,  # every command ends an error with one line and exit 2
    name="mechdiff",
    help=(
        "Compare a base LLM with its post-trained versions from the inside.\n\n"
        "mechdiff stores activations once, in chunked Zarr stores, and answers four questions about how "
        "post-training reshaped the model: where facts are stored (knowledge), whether truth is a shared linear "
        "direction (truthfulness), whether refusal is (refusal), and what entropy neurons do (confidence).\n\n"
        "Start with `mechdiff run`: every study on the embedded model pair, with an HTML report. "
        "`mechdiff COMMAND --help` describes each command: what it does, its inputs, outputs and an example.\n\n"
        "Every command ends an error with one line on stderr (`error: ...`) and exit status 2."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _options(
    debug: bool = typer.Option(False, "--debug", help="On an error, show the full traceback instead of one line."),
) -> None:
    # read by ErrorLineGroup from the root context's params; nothing to do here
    pass


app.command("extract")(extract.extract)
app.command("run")(run.run)
app.add_typer(store.store_app, name="store")
app.add_typer(analyze.analyze_app, name="analyze")  # its commands are built when asked for
app.add_typer(sweep.sweep_app, name="sweep")
app.add_typer(zoo.zoo_app, name="zoo")


def main() -> None:  # pragma: no cover
    """The console script: ``app`` itself ends errors with one line (see ErrorLineGroup)."""
    app()
