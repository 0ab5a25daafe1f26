"""Pieces every command shares: the progress-bar layout, the ``--threads`` option and
its advice on a busy machine, the OpenMP wait policy, and the final time table."""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from collections.abc import Iterator
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, ProgressColumn, Task, TextColumn, TimeElapsedColumn
from rich.table import Column, Table
from rich.text import Text


class _Count(ProgressColumn):
    """``done/total``; nothing while the total is not known yet (never ``0/None``)."""

    def render(self, task: Task) -> Text:
        if task.total is None:
            return Text("")
        return Text(f"{task.completed:g}/{task.total:g}", style="progress.download")


class _Remaining(ProgressColumn):
    """Time left: the task's ``left`` field (seconds) where the caller estimates it, else
    rich's estimate from the task's speed; ``left ~m:ss``."""

    def render(self, task: Task) -> Text:
        left = task.fields.get("left")
        if left is None:
            left = task.time_remaining if task.total is not None and task.completed else None
        if left is None or task.finished:
            return Text("")
        return Text(f"left ~{format_seconds(left)}", style="progress.remaining")


def format_seconds(seconds: float) -> str:
    """``1:02:03``, ``4:05`` or ``7 s``."""
    seconds = max(0.0, float(seconds))
    if seconds < 60:
        return f"{seconds:.0f} s"
    m, s = divmod(round(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def progress_bars(console: Console, *, info: bool = False, transient: bool = False) -> Progress:
    """Description, bar, ``done/total`` (and a free ``info`` field), elapsed and remaining
    time. The description folds onto a second line rather than being cut off, so a long
    method name stays readable in a narrow terminal."""
    columns: list[ProgressColumn] = [
        TextColumn("{task.description}", table_column=Column(ratio=2, overflow="fold")),
        BarColumn(bar_width=20),
        _Count(),
    ]
    if info:
        columns.append(
            TextColumn("{task.fields[info]}", table_column=Column(ratio=2, overflow="fold"))
        )
    columns += [TimeElapsedColumn(), _Remaining()]
    return Progress(*columns, console=console, transient=transient, expand=True)


@contextlib.contextmanager
def warnings_as_lines(console: Console) -> Iterator[None]:
    """Print each distinct :class:`~trustmap.core.validation.TrustmapWarning` once, as a
    ``warning:`` line, instead of Python's two lines with a file and line number."""
    from trustmap.core.validation import TrustmapWarning

    seen: set[str] = set()
    original = warnings.showwarning

    def show(message: Any, category: type[Warning], *args: Any, **kwargs: Any) -> None:
        if not issubclass(category, TrustmapWarning):
            original(message, category, *args, **kwargs)
            return
        text = str(message)
        if text not in seen:
            seen.add(text)
            console.print(f"[yellow]warning:[/] {escape(text)}", highlight=False)

    with warnings.catch_warnings():
        warnings.simplefilter("always", TrustmapWarning)
        warnings.showwarning = show
        try:
            yield
        finally:
            warnings.showwarning = original


def default_wait_policy() -> None:
    """Let idle OpenMP threads sleep instead of spinning, unless the user chose.

    Must run before torch starts OpenMP (the command line calls it first). With the
    default policy a thread that waits spins, which on a machine whose cores other
    processes keep busy steals their time: ``benchmarks/threads.py`` measures it.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def busy_machine_advice(threads: int | None) -> str | None:
    """A line suggesting ``--threads`` when the load average exceeds the cores this
    process may use; None on a quiet machine or when ``--threads`` was given."""
    if threads is not None or not hasattr(os, "getloadavg"):
        return None
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    load = os.getloadavg()[0]
    if load <= cores:
        return None
    free = max(1, cores - math.ceil(load - cores))
    return (
        f"the machine is busy (load {load:.1f} on {cores} cores): threads that wait for a "
        f"core slow each other down; --threads {free} is usually faster here"
    )


def time_table(rows: list[tuple[str, float | None, float | None]], *, title: str) -> Table:
    """Stage, estimated and measured time; it wraps the stage names to fit the terminal."""
    table = Table(title=title, title_justify="left", expand=False)
    table.add_column("stage", overflow="fold", ratio=3)
    table.add_column("estimated", justify="right", no_wrap=True)
    table.add_column("took", justify="right", no_wrap=True)
    for stage, estimated, took in rows:
        table.add_row(
            stage,
            "" if estimated is None else format_seconds(estimated),
            "" if took is None else format_seconds(took),
        )
    return table


def set_threads(threads: int | None) -> None:
    """Apply ``--threads`` (None leaves torch's default); ValueError below 1."""
    if threads is None:
        return
    if threads < 1:
        raise ValueError(f"--threads must be >= 1, got {threads}")
    import torch

    torch.set_num_threads(threads)
