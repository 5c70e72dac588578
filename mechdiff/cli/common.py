"""What every mechdiff command shares: the one error path, the check that an output directory can be written,
and the options that mean the same thing in every command (defined here once).

A failed command prints ONE line on stderr (``error: ...``) and exits 2; ``mechdiff --debug`` shows the
traceback instead. Commands call :func:`fail` for the errors they expect; :class:`ErrorLineGroup`, the class
of the top-level app (and so of every group under it), turns anything else that escapes a command into the
same line, so no input reaches the user as a traceback.
"""

from __future__ import annotations

import contextvars
import inspect
import os
import tempfile
from pathlib import Path
from typing import Any, List, NoReturn, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from typer.core import TyperGroup

from mechdiff.errors import MechdiffError

__all__ = [
    "EXPECTED", "EXIT_BAD_INPUT", "EXIT_INTERRUPTED", "ErrorLineGroup", "OutputError", "check_output_dir",
    "error_line", "fail", "out", "err", "man_help", "group_from_options", "findings_table",
    "opt_model_dtype", "opt_device", "opt_base", "opt_post", "opt_labels", "opt_out", "opt_progress", "opt_layers",
    "LAYERS_HELP",
]

# Errors a command reports as bad input; their messages are written for the user.
EXPECTED: tuple[type[BaseException], ...] = (MechdiffError, ValueError, OSError)
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C

err = Console(stderr=True)  # progress, notes and the error line
out = Console()  # results
# set from the root command's --debug for the duration of one invocation (a CliRunner test runs many)
_debug = contextvars.ContextVar("mechdiff_debug", default=False)


class OutputError(MechdiffError, OSError):
    """An output path that cannot be written (a file where a directory is needed, no write permission)."""


def error_line(e: BaseException | str) -> str:
    """The message of ``e`` as one line; errors nobody raised on purpose also name their type."""
    text = " ".join(ln.strip() for ln in str(e).splitlines() if ln.strip())
    if isinstance(e, str) or isinstance(e, EXPECTED):
        return text or type(e).__name__
    return f"{type(e).__name__}: {text} (unexpected; run `mechdiff --debug ...` for the traceback)"


def fail(msg: BaseException | str, code: int = EXIT_BAD_INPUT) -> NoReturn:
    """Print ``error: MSG`` as one line on stderr and exit with ``code``; under ``--debug`` an exception is
    raised again instead, so its traceback shows. The only way a mechdiff command reports an error."""
    if isinstance(msg, BaseException) and _debug.get():
        raise msg
    # soft_wrap: rich would otherwise wrap a long message into several lines at the terminal width
    err.print(f"[bold red]error:[/] {escape(error_line(msg))}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _passthrough() -> tuple[type[BaseException], ...]:
    """Usage errors and deliberate exits, which keep typer's own handling. Recent typer vendors click (as
    ``typer._click``), older typer uses click itself: its ClickException is found through a public class."""
    click_exception = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")
    return (typer.Exit, typer.Abort, click_exception)


_PASSTHROUGH = _passthrough()


class ErrorLineGroup(TyperGroup):
    """A typer group whose commands end an error with one line and exit 2 (``--debug``: the traceback).

    Catching in ``invoke`` (not in a console-script wrapper) is what makes ``CliRunner().invoke(app)``
    see the same exit code and message as a shell does.
    """

    def invoke(self, ctx: Any) -> Any:
        token = _debug.set(bool(ctx.find_root().params.get("debug")))
        try:
            return super().invoke(ctx)
        except _PASSTHROUGH:
            raise
        except KeyboardInterrupt:
            if _debug.get():
                raise
            fail("interrupted", EXIT_INTERRUPTED)
        except Exception as e:
            fail(e)
        finally:
            _debug.reset(token)


def check_output_dir(url: str | os.PathLike[str], what: str = "output") -> None:
    """Refuse, before any work, an output that cannot become a directory we write into.

    Non-file URLs (s3://, gs://) are left to their filesystem. The nearest existing ancestor is probed by
    creating (and removing) a temporary file: ``os.access`` alone says yes to root on a read-only or
    immutable directory, where the real write would fail only after the work is done.
    """
    s = os.fspath(url)
    if "://" in s and not s.startswith("file://"):
        return
    p = Path(s.removeprefix("file://")).expanduser().resolve()
    probe = p
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        where = "exists and is not a directory" if probe == p else f"is inside {probe}, which is not a directory"
        raise OutputError(f"{what} {s} {where}; give a directory path")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise OutputError(f"{what} {s} is not writable ({probe} does not allow writing); choose another path")
    try:
        with tempfile.TemporaryFile(dir=probe, prefix=".mechdiff-probe-"):
            pass
    except OSError as e:
        raise OutputError(
            f"{what} {s} is not writable ({probe}: {e.strerror or e}); choose another path"
        ) from None


# -- options shared by the commands: one definition each, so a flag means the same everywhere ----------------

LAYERS_HELP = "all, a list 0,3,5, or a range 2:6 (end exclusive); negatives count from the end."
DEVICE_HELP = "cpu, cuda, cuda:N or auto."
MODEL_DTYPE_HELP = "Dtype the models run in: auto (bfloat16 on a GPU, float32 on the CPU), float32, bfloat16 or float16."


def opt_model_dtype(default: str = "auto") -> Any:
    return typer.Option(default, "--model-dtype", help=MODEL_DTYPE_HELP)


def opt_device(default: str = "cpu") -> Any:
    return typer.Option(default, "--device", help=DEVICE_HELP)


def opt_base() -> Any:
    return typer.Option(None, "--base", help="Base model: local directory or hub id \\[default: the embedded base].")


def opt_post() -> Any:
    return typer.Option(None, "--post", help="Post-trained model; repeat for several \\[default: the embedded post].")


def opt_labels() -> Any:
    return typer.Option(None, "--labels", help="Short model names, comma-separated, base first \\[default: base,post or "
                                                "base,post0,post1,...].")


def opt_out(default: Any = ..., help: str = "Output directory.") -> Any:
    return typer.Option(default, "--out", "-o", help=help)


def opt_progress(help: str = "Show live progress on stderr.") -> Any:
    return typer.Option(True, "--progress/--no-progress", help=help)


def opt_layers(default: str = "all", help: str = LAYERS_HELP) -> Any:
    return typer.Option(default, "--layers", help=help)


def group_from_options(base: Optional[str], post: Optional[List[str]], labels: Optional[str], name: str):
    """The model group from --base/--post/--labels; the embedded pair when neither model is given."""
    from mechdiff.analyses.common import ModelGroup

    if base is None and not post:
        from mechdiff.zoo.paths import zoo_path

        try:
            base, post = str(zoo_path("base")), [str(zoo_path("post"))]
        except FileNotFoundError as e:
            raise ValueError(f"no --base/--post given and the embedded pair is not available ({e})") from None
    if base is None or not post:
        raise ValueError("give both --base and at least one --post (or neither, for the embedded pair)")
    labs = tuple(x.strip() for x in labels.split(",")) if labels else ()
    return ModelGroup(name, base, tuple(post), labs)


def man_help(doc: str | None) -> str:
    """A docstring as man-page-like help: prose paragraphs re-flowed to the terminal (typer's rich mode keeps
    every source line break), headings and indented or column-aligned blocks kept as written."""
    parts = []
    for para in inspect.cleandoc(doc or "").split("\n\n"):
        lines = para.split("\n")
        verbatim = any(ln.startswith(" ") or "   " in ln for ln in lines)
        parts.append(para if verbatim or len(lines) == 1 else " ".join(ln.strip() for ln in lines))
    return "\n\n".join(parts)


def findings_table(result) -> Table:
    """A study's findings: verdict, controls and the reason, one row each."""
    t = Table(title=f"{result.study}: findings", title_justify="left")
    for c in ("finding", "pair", "verdict", "controls", "detail"):
        t.add_column(c, overflow="fold")
    for f in result.findings:
        ctl = "\n".join(f"{k} = {v:.3g}" if isinstance(v, float) else f"{k} = {v}" for k, v in f.controls.items())
        t.add_row(f.finding, f.pair, f.verdict, ctl, f"{f.reason}; {f.detail}" if f.reason else f.detail)
    return t
