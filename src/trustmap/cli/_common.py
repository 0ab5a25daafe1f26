"""Pieces every command shares: the progress-bar layout and the ``--threads`` option."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn


def progress_bars(console: Console, *, info: bool = False, transient: bool = False) -> Progress:
    """Description, bar, ``done/total`` (and a free ``info`` field), elapsed time."""
    columns = [
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
    ]
    if info:
        columns.append(TextColumn("{task.fields[info]}"))
    columns.append(TimeElapsedColumn())
    return Progress(*columns, console=console, transient=transient)


def set_threads(threads: int | None) -> None:
    """Apply ``--threads`` (None leaves torch's default); ValueError below 1."""
    if threads is None:
        return
    if threads < 1:
        raise ValueError(f"--threads must be >= 1, got {threads}")
    import torch

    torch.set_num_threads(threads)
