"""Terminal output: progress for long operations, tables, one-line errors."""

from __future__ import annotations

import time

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from coppice.lifecycle import HANDED_OUT_STATES, State
from coppice.store.records import EntryRecord, PoolTargetRecord

out = Console()
err = Console(stderr=True)


class RichProgress:
    """Draws the library's progress reports on stderr (stdout stays parseable)."""

    def __init__(self) -> None:
        self._bar = Progress(
            SpinnerColumn(),
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[detail]}"),
            TimeElapsedColumn(),
            console=err,
            transient=False,
        )
        self._task: TaskID | None = None
        self._started = time.monotonic()

    def __enter__(self) -> RichProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._task is not None:
            self._bar.stop()

    def stage(self, name: str, total: int | None = None) -> None:
        # The display starts with the first stage, so a command that fails its checks
        # prints its one-line error and nothing else.
        if self._task is None:
            self._bar.start()
        if self._task is not None:
            self._bar.update(self._task, completed=self._bar.tasks[-1].total or 0)
            self._bar.stop_task(self._task)
        self._task = self._bar.add_task(escape(name), total=total, detail="")

    def advance(self, detail: str = "", step: int = 1) -> None:
        if self._task is not None:
            self._bar.update(self._task, advance=step, detail=escape(detail[:60]))

    def note(self, message: str) -> None:
        self._bar.console.print(message, markup=False, highlight=False)

    def log(self, message: str, level: str = "info", step: str | None = None) -> None:
        style = "red" if level == "error" else "dim"
        prefix = f"[{step}] " if step else ""
        self._bar.console.print(f"{prefix}{message}", style=style, markup=False, highlight=False)


def entries_table(entries: list[EntryRecord]) -> None:
    from rich.table import Table

    table = Table(box=None, pad_edge=False)
    for col in ("id", "template", "substrate", "state", "ip", "pid", "age"):
        table.add_column(col)
    now = time.time()
    for e in entries:
        pid = e.pid
        # A VM names its accelerator (kvm or tcg): TCG is ~10x slower, worth seeing at once.
        detail = e.handle.detail if e.handle is not None else ""
        table.add_row(
            e.id,
            e.template,
            f"{e.substrate} ({detail})" if detail else e.substrate,
            e.state.value,
            e.ip,
            str(pid) if pid else "-",
            f"{now - e.created_at:.0f}s",
        )
    out.print(table)


def pools_table(entries: list[EntryRecord], targets: dict[str, PoolTargetRecord]) -> None:
    """One line per pool: its size by state, and the target the gateway last set and why."""
    from rich.table import Table

    table = Table(box=None, pad_edge=False)
    for col in ("pool", "available", "warming", "in use", "target", "why", "waiting", "decided"):
        table.add_column(col)
    now = time.time()
    for template in sorted({e.template for e in entries} | set(targets)):
        mine = [e for e in entries if e.template == template]
        decided = targets.get(template)
        table.add_row(
            template,
            str(sum(1 for e in mine if e.state is State.AVAILABLE)),
            str(sum(1 for e in mine if e.state is State.WARMING)),
            str(sum(1 for e in mine if e.state in HANDED_OUT_STATES)),
            str(decided.target) if decided else "-",
            decided.why if decided else "no gateway has kept it",
            str(decided.waiting) if decided else "-",
            f"{now - decided.decided_at:.0f}s ago" if decided else "-",
        )
    out.print(table)
