"""Pieces every command shares: the progress-bar layout, the ``--threads`` option and
its advice on a busy machine, the OpenMP wait policy, the final time table, the ``--out``
check and the error handling."""

from __future__ import annotations

import contextlib
import functools
import math
import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import typer
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


# ---------------------------------------------------------------------------------------
# Errors: one line and exit 2 for what the user can fix, a short report line for bugs

F = TypeVar("F", bound=Callable[..., Any])

#: Exit status for an error the user can fix (bad input, config, file, model).
USER_ERROR = 2
#: Exit status for a bug: anything trustmap did not raise on purpose.
INTERNAL_ERROR = 1
_PACKAGE = Path(__file__).resolve().parents[1]


def cli_errors(func: F) -> F:
    """Run a command so that every failure ends in one line on stderr.

    * :class:`~trustmap.errors.TrustmapError` (and a ``ValueError``, ``TypeError`` or
      file error raised by trustmap's own code, the library's older way of naming a
      problem), an operating-system error (permission denied, disk full) or running out
      of memory: ``error: <message>`` and exit status 2.
    * Ctrl-C: ``interrupted`` and status 130; rerunning the command resumes.
    * Anything else is a bug: one line asking to report it, naming the file that holds
      the traceback (see :func:`save_traceback`), and status 1.
    """

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (typer.Exit, typer.Abort, typer.TyperException):
            raise
        except KeyboardInterrupt:
            _stderr().print("interrupted; run the same command again to resume", highlight=False)
            raise typer.Exit(130) from None
        except Exception as err:
            if is_user_error(err):
                _stderr().print(f"[bold red]error:[/] {escape(one_line(err))}", highlight=False)
                raise typer.Exit(USER_ERROR) from None
            path = save_traceback(err)
            where = f"the traceback is in {path}" if path else "no traceback file could be written"
            _stderr().print(
                f"[bold red]internal error[/] ({escape(type(err).__name__)}: "
                f"{escape(one_line(err, limit=200))}). This is a bug in trustmap; please report "
                f"it with the command you ran; {escape(where)}",
                highlight=False,
            )
            raise typer.Exit(INTERNAL_ERROR) from None

    return wrapper  # type: ignore[return-value]


def is_user_error(err: BaseException) -> bool:
    """Whether ``err`` names a problem the user can fix (see :func:`cli_errors`)."""
    import torch

    from trustmap.errors import TrustmapError

    if isinstance(err, TrustmapError | MemoryError | torch.OutOfMemoryError):
        return True
    if isinstance(err, OSError) and err.errno is not None:
        return True  # permission denied, no space left, a path that is a file, ...
    if isinstance(err, ValueError | TypeError | OSError):
        return _raised_by_trustmap(err)
    return False


def _raised_by_trustmap(err: BaseException) -> bool:
    """True when the innermost frame of ``err``'s traceback is trustmap's own code."""
    tb = err.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    try:
        Path(tb.tb_frame.f_code.co_filename).resolve().relative_to(_PACKAGE)
    except ValueError:
        return False
    return True


def one_line(err: BaseException, *, limit: int | None = None) -> str:
    """The error's message on one line (out of memory gets a hint)."""
    import torch

    text = " ".join(str(err).split()) or type(err).__name__
    if isinstance(err, MemoryError | torch.OutOfMemoryError):
        text = f"out of memory ({text}); use a smaller --batch-size, image size or fewer samples"
    if limit is not None and len(text) > limit:
        text = text[: limit - 3] + "..."
    return text


def save_traceback(err: BaseException) -> Path | None:
    """Write the command line, versions and ``err``'s traceback to a new file; its path.

    The file goes to ``$TRUSTMAP_CACHE/crash-reports`` (default
    ``~/.cache/trustmap/crash-reports``), or the temporary directory where that cannot be
    written; None if neither can.
    """
    import os
    import platform
    import sys
    import tempfile
    import time
    import traceback

    import trustmap

    root = Path(os.environ.get("TRUSTMAP_CACHE") or Path.home() / ".cache" / "trustmap")
    name = f"trustmap-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.txt"
    text = "\n".join(
        [
            f"command: {' '.join(sys.argv)}",
            f"trustmap {getattr(trustmap, '__version__', '?')}, Python {platform.python_version()}"
            f", {platform.platform()}",
            "",
            "".join(traceback.format_exception(err)),
        ]
    )
    for folder in (root.expanduser() / "crash-reports", Path(tempfile.gettempdir())):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / name
            path.write_text(text, encoding="utf-8")
            return path
        except OSError:
            continue
    return None


def _stderr() -> Console:
    return Console(stderr=True, soft_wrap=True)


def check_out(out: str | Path, option: str = "--out") -> Path:
    """Check that ``out`` can be a writable output folder, before any work starts.

    It must not be the root of the file system nor an existing file, and a file must be
    creatable in it: missing folders are created for the check (a probe file is written
    and removed), then removed again, so a failed check leaves nothing behind.

    Raises
    ------
    InputError
        Naming the folder and what is wrong with it.
    """
    import os
    import secrets

    from trustmap.errors import InputError

    path = Path(out).expanduser()
    resolved = path.resolve()
    if resolved == Path(resolved.anchor):
        raise InputError(
            f"{option} {out} is the root of the file system; give the results a folder of "
            f"their own, e.g. {option} results"
        )
    if resolved.exists() and not resolved.is_dir():
        raise InputError(f"{option} {out} is an existing file, not a folder")
    created: list[Path] = []
    try:
        missing = [p for p in [resolved, *resolved.parents] if not p.exists()]
        for folder in reversed(missing):
            folder.mkdir()
            created.append(folder)
        probe = resolved / f".trustmap-write-test-{secrets.token_hex(4)}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        reason = err.strerror or type(err).__name__
        where = f" ({err.filename})" if err.filename and Path(err.filename) != resolved else ""
        raise InputError(f"{option} {out} cannot be written: {reason}{where}") from None
    finally:
        for folder in reversed(created):
            with contextlib.suppress(OSError):
                os.rmdir(folder)
    return path
