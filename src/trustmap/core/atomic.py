"""Atomic file writing: a reader sees the old file or the complete new one, never half of one.

Every file trustmap writes (maps, figures, reports) goes through :func:`atomic_path`:
the content is written to a hidden temporary file in the target's directory and moved
onto the target with :func:`os.replace`, which is atomic on POSIX and Windows when both
paths are on the same file system (hence the same directory).

>>> with atomic_path("map.nii.gz") as tmp:  # doctest: +SKIP
...     nibabel.save(img, tmp)  # tmp ends in ".nii.gz", so nibabel picks the format
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np

__all__ = [
    "atomic_directory",
    "atomic_path",
    "save_npy_atomic",
    "write_bytes_atomic",
    "write_text_atomic",
]


def _suffix(name: str) -> str:
    """The name's suffixes (``".nii.gz"``), which format-sniffing writers look at."""
    # Only dots after the first character count, so ".hidden" has no suffix, and only
    # the last two suffixes are kept, so "sub-01.run.2.nii.gz" keeps ".nii.gz".
    return "".join(Path(name.lstrip(".")).suffixes[-2:])


def _reserve_temp(target: Path) -> Path:
    """Create an empty, uniquely named file next to ``target`` and return its path."""
    suffix = _suffix(target.name)
    stem = target.name[: len(target.name) - len(suffix)] if suffix else target.name
    while True:
        temp = target.with_name(f".{stem}.{secrets.token_hex(6)}.tmp{suffix}")
        try:
            # 0o666 so that the process umask applies, as for a file opened with open();
            # mkstemp would leave the result readable by its owner only.
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return temp


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path to write to; move it onto ``path`` when the block succeeds.

    The temporary file lies in the same directory and ends in the same suffixes
    (``.nii.gz``, ``.png``, ``.npy``), so libraries that infer the format from the name
    write the right one. It exists (empty) when the block starts; writers may overwrite
    or replace it.

    If the block raises, the temporary file is deleted, ``path`` is left as it was (absent
    or with its old content) and the exception propagates.

    Raises
    ------
    FileNotFoundError
        If the directory of ``path`` does not exist.
    IsADirectoryError
        If ``path`` is a directory.
    """
    target = Path(path)
    if not target.parent.is_dir():
        raise FileNotFoundError(f"cannot write {target}: directory {target.parent} does not exist")
    if target.is_dir():
        raise IsADirectoryError(f"cannot write {target}: it is a directory")
    temp = _reserve_temp(target)
    try:
        yield temp
        if not temp.exists():
            raise FileNotFoundError(f"the writer removed the temporary file {temp}")
        # Flush to disk before the rename, so a crash cannot leave the new name pointing
        # at data that never reached the disk.
        _fsync(temp)
        os.replace(temp, target)
    except BaseException:
        # BaseException: an interrupted write (Ctrl-C) must not leave a temp file either.
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()
        raise


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically and return the path."""
    with atomic_path(path) as temp:
        temp.write_bytes(data)
    return Path(path)


def write_text_atomic(path: str | os.PathLike[str], text: str, *, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically and return the path."""
    with atomic_path(path) as temp:
        temp.write_text(text, encoding=encoding)
    return Path(path)


def save_npy_atomic(path: str | os.PathLike[str], array: np.ndarray) -> Path:
    """Save ``array`` in NumPy's ``.npy`` format to ``path`` atomically; return the path.

    Object arrays are refused (``allow_pickle=False``): a saved map must load without
    executing code.
    """
    with atomic_path(path) as temp, open(temp, "wb") as handle:
        # A file handle, not the name: np.save would append ".npy" to other suffixes.
        np.save(handle, np.asarray(array), allow_pickle=False)
    return Path(path)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike[str], *, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary directory next to ``path``; move it onto ``path`` when the
    block succeeds, so a reader sees the old directory or the complete new one.

    ``path`` may exist only as an empty directory, unless ``overwrite``: then the old
    directory is removed once the new one is in place. If the block raises (Ctrl-C
    included), the temporary directory is removed and ``path`` is left as it was.

    Raises
    ------
    ValueError
        If ``path`` is a file, or a non-empty directory without ``overwrite``.
    """
    out = Path(path).expanduser()
    if out.exists() and not out.is_dir():
        raise ValueError(f"output {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ValueError(
            f"output directory {out} exists and is not empty; pass overwrite (--overwrite) to "
            "replace it"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    temp = _temp_dir(out)
    try:
        yield temp
        _replace_dir(temp, out, overwrite=overwrite)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise


def _temp_dir(out: Path) -> Path:
    while True:
        temp = out.with_name(f".{out.name}.{secrets.token_hex(6)}.tmp")
        try:
            temp.mkdir()
        except FileExistsError:
            continue
        return temp


def _replace_dir(temp: Path, out: Path, *, overwrite: bool) -> None:
    """Move the finished ``temp`` onto ``out``; an old ``out`` is removed only afterwards."""
    if not out.exists():
        os.replace(temp, out)
        return
    if any(out.iterdir()) and not overwrite:
        # Checked before writing too; something appeared meanwhile.
        raise ValueError(f"{out} appeared while it was written; not overwritten")
    trash = out.with_name(f".{out.name}.{secrets.token_hex(6)}.old")
    os.replace(out, trash)
    try:
        os.replace(temp, out)
    except BaseException:
        os.replace(trash, out)
        raise
    shutil.rmtree(trash, ignore_errors=True)
