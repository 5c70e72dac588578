"""What every mechdiff command shares: one way to fail, and the check that an output directory can be written.

A failed command prints ONE line on stderr (``error: ...``) and exits 2; ``mechdiff --debug`` shows the
traceback instead. Commands call :func:`fail` for the errors they expect; :class:`ErrorLineGroup`, the class
of the top-level app, turns anything else that escapes a command into the same line, so no input reaches
the user as a traceback.
"""

from __future__ import annotations

import contextvars
import os
import tempfile
from pathlib import Path
from typing import Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

from mechdiff.errors import MechdiffError

__all__ = ["EXPECTED", "ErrorLineGroup", "OutputError", "check_output_dir", "error_line", "fail"]

# Errors a command reports as bad input; their messages are written for the user.
EXPECTED: tuple[type[BaseException], ...] = (MechdiffError, ValueError, OSError)
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C

_err = Console(stderr=True)
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
    raised again instead, so its traceback shows."""
    if isinstance(msg, BaseException) and _debug.get():
        raise msg
    # soft_wrap: rich would otherwise wrap a long message into several lines at the terminal width
    _err.print(f"[bold red]error:[/] {escape(error_line(msg))}", highlight=False, soft_wrap=True)
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
