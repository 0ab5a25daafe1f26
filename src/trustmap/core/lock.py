"""One run at a time per output folder: an advisory lock file, ``<out>/.trustmap.lock``.

``trustmap trust``, ``trustmap train`` and ``trustmap explain`` (and their library
functions :func:`trustmap.trust.run`, :func:`trustmap.models.train_classifier`,
:func:`trustmap.models.train_localizer` and :func:`trustmap.run.explain_image`) hold this
lock while they write into their output folder. A second run into the same folder does
not wait and does not duplicate the work: it stops at once with an
:class:`~trustmap.errors.OutputBusyError` that names the process holding the lock. Run it
again when the first has finished (it then resumes from, or reuses, what the first
wrote), or give it another output folder.

The lock is the operating system's (``flock`` on POSIX, ``msvcrt.locking`` on Windows) on
an open file, so it is released when the process ends in any way, also when it is
killed: a stale lock file never blocks a later run. The file itself stays (removing it
while another process opens it would let two runs lock two different files); it holds the
process id, the command and the start time of the last run that took it, for the message.
Locks are advisory and local: they do not protect a folder on a network file system that
two machines write to.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from trustmap.errors import OutputBusyError

__all__ = ["LOCK_NAME", "output_lock"]

LOCK_NAME = ".trustmap.lock"


@contextlib.contextmanager
def output_lock(out: str | os.PathLike[str], what: str | None = None) -> Iterator[Path]:
    """Hold the lock of the output folder ``out`` (created if missing) for the block.

    ``what`` describes the run for the message another run gets (default: the command
    line). Yields the lock file's path.

    Raises
    ------
    OutputBusyError
        If another process holds the lock of ``out``.
    """
    folder = Path(out).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        if not _try_lock(fd):
            raise OutputBusyError(
                f"{folder} is being written by another trustmap run ({_holder(fd)}); wait for "
                "it to finish and run again (it then resumes from what that run wrote), or "
                "choose another output folder"
            )
        try:
            info = {
                "pid": os.getpid(),
                "command": what or " ".join(Path(sys.argv[0]).name.split() + sys.argv[1:]),
                "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            }
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, json.dumps(info).encode())
            yield path
        finally:
            _unlock(fd)
    finally:
        os.close(fd)


def _holder(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        info = json.loads(os.read(fd, 4096).decode() or "{}")
        return f"process {info['pid']}, '{info['command']}', since {info['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


if sys.platform == "win32":  # pragma: no cover - exercised on Windows only
    import msvcrt

    def _try_lock(fd: int) -> bool:
        # Byte 2**20 rather than 0: the lock forbids others to read the locked bytes,
        # and the holder's description is at the start of the file.
        os.lseek(fd, 1 << 20, os.SEEK_SET)
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True

    def _unlock(fd: int) -> None:
        os.lseek(fd, 1 << 20, os.SEEK_SET)
        with contextlib.suppress(OSError):
            msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)

else:
    import fcntl

    def _try_lock(fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def _unlock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_UN)
