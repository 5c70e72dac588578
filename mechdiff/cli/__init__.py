"""The mechdiff command line: ``app`` (the console script ``mechdiff``) and :func:`main`.

One module per command group: ``extract``, ``store``, ``run``, ``analyze`` (one command per study, its flags
generated from the study's Config), ``sweep`` and ``zoo``; ``common`` holds the one error path and the options
every command shares.
"""

from __future__ import annotations

import typer

from mechdiff.cli import analyze, extract, run, store, sweep, zoo
from mechdiff.cli.common import ErrorLineGroup, fail

__all__ = ["app", "main", "exit_now", "fail"]

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
    """The console script: ``app`` itself ends errors with one line (see ErrorLineGroup).

    The process then ends without tearing the interpreter down (see :func:`exit_now`)."""
    try:
        app()
    except SystemExit as e:
        exit_now(e.code)
    exit_now(0)


def exit_now(code: int | str | None) -> None:
    """End the process with ``code`` once the command's work is done, skipping the interpreter's teardown.

    With torch and transformers loaded, tearing down ~400,000 objects of their modules takes ~0.7 s here, on
    every command, after everything is written. What normal exit does that matters still happens first: the
    exit handlers run (Ray's shutdown, temporary files, ``weakref.finalize``), logging and the standard streams
    are flushed. A command that left a non-daemon thread running, or ``MECHDIFF_FAST_EXIT=0``, exits the
    ordinary way instead.
    """
    import atexit
    import logging
    import os
    import sys
    import threading

    others = [t for t in threading.enumerate() if t is not threading.current_thread() and not t.daemon]
    if others or os.environ.get("MECHDIFF_FAST_EXIT", "1") == "0":
        sys.exit(code)
    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code
    else:  # sys.exit("message"): printed to stderr, status 1
        print(code, file=sys.stderr)
        status = 1
    atexit._run_exitfuncs()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed, or a broken pipe: nothing left to save
            pass
    os._exit(status)
