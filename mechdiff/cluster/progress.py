"""The live sweep display and the final summary table.

One ``rich.live.Live`` panel: units done / total, tokens/s overall, retries, dead actors and failures,
then one row per actor (node, pid, model, current unit, units, tokens/s) and the last few incidents.
It is fed by the pool's events (:class:`~mechdiff.cluster.pool.PoolEvent`) and redrawn from the
pool's actor slots, so live token counts show up while a unit is still running. Where the console is
not a terminal (a batch job's log), it prints the status line every ``log_every`` seconds and each
incident as it happens instead.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Sequence

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

__all__ = ["SweepProgress", "TargetStats"]


@dataclass
class TargetStats:
    key: str
    model: str
    dataset: str
    capture: str
    total: int  # units of this target (all shards)
    done_before: int  # shards already done when the run started
    done: int = 0  # units finished in this run
    tokens: int = 0
    seconds: float = 0.0  # actor compute time
    failed: int = 0


@dataclass
class SweepProgress:
    """Live display of a sweep; ``summary()`` gives the final table."""

    title: str
    targets: Sequence[TargetStats]
    console: Console | None = None
    enabled: bool = True
    pool: Any = None  # an ActorPool, for live per-actor rows
    retries: int = 0
    deaths: int = 0
    failures: dict[str, str] = field(default_factory=dict)
    incidents: list[str] = field(default_factory=list)
    t0: float = field(default_factory=time.perf_counter)
    t_end: float | None = None
    log_every: float = 30.0
    _live: Live | None = None
    _last_log: float = 0.0

    def __post_init__(self) -> None:
        self.by_key = {t.key: t for t in self.targets}
        self.console = self.console or Console(stderr=True)

    # -- totals -----------------------------------------------------------------------------

    @property
    def total_units(self) -> int:
        return sum(t.total - t.done_before for t in self.targets)

    @property
    def done_units(self) -> int:
        return sum(t.done for t in self.targets)

    @property
    def tokens(self) -> int:
        return sum(t.tokens for t in self.targets)

    def elapsed(self) -> float:
        return (self.t_end or time.perf_counter()) - self.t0

    def _live_tokens(self) -> int:
        if self.pool is None:
            return 0
        return sum(s.live_tokens for s in self.pool.slots if s.alive and s.task is not None)

    # -- events -----------------------------------------------------------------------------

    def on_event(self, ev) -> None:
        t = ev.task
        target = self.by_key.get(getattr(t, "info", None)) if t is not None else None
        if ev.kind == "done" and t is not None and t.kind == "unit" and target is not None:
            target.done += getattr(ev.result, "n_shards", 1)  # a unit may hold several shards
            target.tokens += ev.result.tokens
            target.seconds += ev.result.seconds
        elif ev.kind == "retry":
            self.retries += 1
            self._incident(f"retry {t.key} (attempt {t.attempts + 1}): {ev.detail}")
        elif ev.kind == "failed":
            self.failures[t.key] = ev.detail
            if target is not None and t.kind == "unit":
                target.failed += 1
            self._incident(f"[red]FAILED[/] {t.key}: {ev.detail}")
        elif ev.kind == "actor_died":
            self.deaths += 1
            self._incident(f"actor {ev.slot.id} (pid {ev.slot.pid}) died")
        if self._live is not None:
            self._live.refresh()

    def _incident(self, msg: str) -> None:
        self.incidents.append(msg)
        del self.incidents[:-5]
        if self.enabled and self._live is None:
            self.console.print(Text.from_markup(msg))

    # -- rendering --------------------------------------------------------------------------

    def __enter__(self) -> SweepProgress:
        self.t0 = self._last_log = time.perf_counter()
        if self.enabled and self.console.is_terminal:
            self._live = Live(self, console=self.console, refresh_per_second=4, transient=False)
            self._live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.t_end = time.perf_counter()
        if self._live is not None:
            self._live.refresh()
            self._live.__exit__(*exc)
            self._live = None
        elif self.enabled:
            self.console.print(self.status_line())

    def tick(self) -> None:
        if self._live is not None:
            self._live.refresh()
        elif self.enabled and time.perf_counter() - self._last_log >= self.log_every:
            self._last_log = time.perf_counter()
            self.console.print(self.status_line())

    def status_line(self) -> Text:
        el = self.elapsed()
        total, done = self.total_units, self.done_units
        rate = (self.tokens + self._live_tokens()) / el if el > 0 else 0.0
        head = Text.from_markup(
            f"[bold]{self.title}[/]  units [bold]{done}/{total}[/]"
            f" ({done / total:.0%})  " if total else f"[bold]{self.title}[/]  nothing to do  "
        )
        head.append_text(Text.from_markup(
            f"{rate:,.0f} tok/s  {el:,.0f}s  retries {self.retries}  dead actors {self.deaths}  "
            + (f"[red]failed {len(self.failures)}[/]" if self.failures else "failed 0")
        ))
        return head

    def __rich__(self) -> Group:
        parts: list[Any] = [self.status_line()]
        if self.pool is not None:
            t = Table(box=None, pad_edge=False, header_style="dim")
            for c in ("actor", "node", "pid", "model", "now", "units", "tok/s"):
                t.add_column(c, justify="right" if c in ("units", "tok/s", "pid") else "left")
            now = time.perf_counter()
            for s in self.pool.slots:
                if not s.alive and s.units == 0:
                    continue
                # compute time of finished units plus the running one once it reports tokens
                busy = s.compute_seconds + (now - s.started if s.task is not None and s.live_tokens else 0.0)
                toks = s.tokens + (s.live_tokens if s.task is not None else 0)
                state = s.task.key if s.task is not None else ("dead" if not s.alive and not s.closed else "idle")
                t.add_row(str(s.id), s.node_ip or "-", str(s.pid or "-"), s.model or "-", state, str(s.units),
                          f"{toks / busy:,.0f}" if busy > 0 else "-")
            parts.append(t)
        for msg in self.incidents:
            parts.append(Text.from_markup(f"  {msg}"))
        return Group(*parts)

    def summary(self) -> Table:
        """Per model x dataset x capture: units, tokens and rate; then the run's totals."""
        t = Table(title=f"{self.title}: summary", title_justify="left")
        # per target: tokens over the actors' compute time; the total: over wall time
        for c in ("model", "dataset", "capture", "units done", "tokens", "tok/s", "failed"):
            t.add_column(c, justify="right" if c in ("units done", "tokens", "tok/s", "failed") else "left")
        for s in self.targets:
            rate = f"{s.tokens / s.seconds:,.0f}" if s.seconds > 0 else "-"
            t.add_row(s.model, s.dataset, s.capture, f"{s.done_before + s.done}/{s.total}", f"{s.tokens:,}", rate,
                      str(s.failed) if s.failed else "")
        el = self.elapsed()
        t.add_section()
        t.add_row(
            "total", "", "", f"{sum(s.done_before + s.done for s in self.targets)}/{sum(s.total for s in self.targets)}",
            f"{self.tokens:,}", f"{self.tokens / el:,.0f}" if el > 0 else "-", str(len(self.failures)) if self.failures else "",
        )
        t.caption = (
            f"{el:.1f}s wall, {self.done_units} unit(s) run, {self.retries} retried, {self.deaths} actor(s) died"
        )
        return t

    def actor_table(self) -> Table | None:
        if self.pool is None:
            return None
        t = Table(title="actors", title_justify="left")
        for c in ("actor", "node", "pid", "units", "tokens", "compute s", "tok/s", "state"):
            t.add_column(c, justify="left" if c in ("node", "state") else "right")
        for s in self.pool.slots:
            t.add_row(str(s.id), s.node_ip or "-", str(s.pid or "-"), str(s.units), f"{s.tokens:,}",
                      f"{s.compute_seconds:.1f}", f"{s.tokens / s.compute_seconds:,.0f}" if s.compute_seconds > 0 else "-",
                      "alive" if s.alive else ("stopped" if s.closed else "died"))
        return t
