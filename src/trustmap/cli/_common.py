"""Pieces every command shares: the progress-bar layout, the ``--threads`` option, the
``--out`` check and the error handling."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
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
