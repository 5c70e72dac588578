"""Rich progress bars for long work, with throughput in tokens/s."""

from __future__ import annotations

import contextlib
import sys
from typing import Callable, Iterator

from rich.progress import (
    BarColumn,
    Progress,
    ProgressColumn,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

__all__ = ["token_progress"]


class _RateColumn(ProgressColumn):
    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.0f} {self.unit}/s" if speed else f"- {self.unit}/s", style="cyan")


@contextlib.contextmanager
def token_progress(description: str, total_tokens: int, *, enabled: bool = True) -> Iterator[Callable[[int], None]]:
    """A bar over tokens, showing tokens/s; yields ``advance(n_tokens)``."""
    if not enabled:
        yield lambda n: None
        return
    cols = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        _RateColumn("tok"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    ]
    with Progress(*cols, transient=not sys.stderr.isatty(), disable=not enabled) as prog:
        task = prog.add_task(description, total=total_tokens)
        yield lambda n: prog.advance(task, n)
