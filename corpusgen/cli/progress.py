"""Rendering run_job's events for people: a rich progress bar on a terminal, log lines otherwise.

Only the CLI imports this module (it imports rich).
"""

from __future__ import annotations

import time
from typing import Any, Mapping

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from corpusgen.job.events import Event, JobFinished, JobStarted, JobWarning, RowsCommitted, RunSummary


def fmt_seconds(s: float | None) -> str:
    """12 s, 3m05s, 2h14m; '?' when unknown."""
    if s is None:
        return "?"
    s = int(round(s))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def fmt_statuses(statuses: Mapping[str, int], *, failures_only: bool = False) -> str:
    items = [(k, v) for k, v in sorted(statuses.items()) if v and not (failures_only and k == "ok")]
    return ", ".join(f"{k} {v}" for k, v in items) or "none"


def summary_line(s: RunSummary) -> str:
    """One line saying what a run did."""
    return (f"{s.status}: {s.rows} rows committed ({fmt_statuses(s.statuses)}), {s.skipped} already done, "
            f"{s.gen_tokens} tokens in {s.seconds:.1f}s (load {s.load_seconds:.1f}s, engine "
            f"{s.engine_seconds:.1f}s, overhead {s.overhead_seconds:.2f}s = {100 * s.overhead_fraction:.1f}%)")


class Reporter:
    """Callable given to run_job as ``on_event``; ``live`` draws a progress bar."""

    def __init__(self, console: Console, *, live: bool, log_every: float = 10.0):
        self.console = console
        self.live = live
        self.log_every = log_every
        self._last_log = 0.0
        self._progress: Progress | None = None
        self._task: Any = None
        self.summary: RunSummary | None = None

    def __call__(self, event: Event) -> None:
        if isinstance(event, JobStarted):
            self._started(event)
        elif isinstance(event, RowsCommitted):
            self._committed(event)
        elif isinstance(event, JobWarning):
            self.console.print(f"[yellow]warning:[/] {event.message}", highlight=False)
        elif isinstance(event, JobFinished):
            self.close()
            self.summary = event.summary

    def _started(self, e: JobStarted) -> None:
        engine = e.engine
        where = f"{engine.get('model', '?')} on {engine.get('device', '?')} ({engine.get('dtype', '?')})"
        if e.moved_to:
            self.console.print(f"previous outputs moved to {e.moved_to}", highlight=False)
        verb = f"resuming ({e.rows_done} rows already committed)" if e.resumed else "starting"
        total = "?" if e.rows_total is None else str(e.rows_total)
        self.console.print(f"{verb} run {e.run_id} → {e.output_dir}: {total} input rows, {where}, "
                           f"blocks of {e.block_size}, engine loaded in {e.load_seconds:.1f}s", highlight=False)
        if self.live:
            self._progress = Progress(
                TextColumn("[bold]rows"), BarColumn(), TextColumn("{task.completed}/{task.fields[total_s]}"),
                TextColumn("{task.fields[tps]} tok/s"), TextColumn("ETA {task.fields[eta]}"),
                TextColumn("failures: {task.fields[fail]}"), TimeElapsedColumn(),
                console=self.console, transient=False)
            self._progress.start()
            self._task = self._progress.add_task("rows", total=e.rows_total, completed=e.rows_done,
                                                 total_s=total, tps="-", eta="?", fail="none")

    def _committed(self, e: RowsCommitted) -> None:
        fail = fmt_statuses(e.statuses, failures_only=True)
        if self._progress is not None:
            self._progress.update(self._task, completed=e.rows_done, tps=f"{e.tokens_per_s:.1f}",
                                  eta=fmt_seconds(e.eta_s), fail=fail)
            return
        now = time.monotonic()
        if now - self._last_log >= self.log_every:
            self._last_log = now
            total = "?" if e.rows_total is None else e.rows_total
            self.console.print(f"{e.rows_done}/{total} rows, {e.gen_tokens} tokens, {e.tokens_per_s:.1f} tok/s, "
                               f"ETA {fmt_seconds(e.eta_s)}, failures: {fail}", highlight=False)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
