"""A resumable store for the trust protocol: each finished unit of work is a file named by
the content hash of what produced it (model weights, images, method, parameters).

An interrupted run finds the files of the units it finished and recomputes only the rest;
changing a model's weights, the images or a parameter changes the hash, so stale results
are never reused. Files are written atomically, so a unit is either complete or absent.
"""

from __future__ import annotations

import io
import json
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from trustmap.core.atomic import write_bytes_atomic, write_text_atomic
from trustmap.core.hashing import array_hash, digest_of, weights_hash

__all__ = ["CACHE_VERSION", "Store", "array_hash", "key_of", "weights_hash"]

# What reading a truncated or otherwise damaged file raises: zipfile's BadZipFile (not an
# OSError), zlib's error, EOFError, KeyError for a missing member, ValueError for bad
# headers and JSON, OSError for unreadable files.
_DAMAGED = (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error)

# Bump when the meaning of a cached unit changes, so old caches are not reused.
CACHE_VERSION = 1


def key_of(*parts: Any) -> str:
    """A stable key for JSON-serialisable parts (dict order does not matter)."""
    return digest_of(CACHE_VERSION, *parts)


class Store:
    """Arrays and JSON records under ``root``, by key. ``hits``/``misses`` count lookups."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.hits = 0
        self.misses = 0

    def arrays(
        self, kind: str, key: str, compute: Callable[[], dict[str, np.ndarray]]
    ) -> dict[str, np.ndarray]:
        """The arrays stored under ``kind/key``, computing and storing them when absent."""
        path = self.root / kind / f"{key}.npz"
        if path.is_file():
            try:
                with np.load(path, allow_pickle=False) as data:
                    out = {k: data[k] for k in data.files}
                # numpy hands back the raw bytes of a member that is not an .npy array.
                if not out or not all(isinstance(v, np.ndarray) for v in out.values()):
                    raise ValueError(f"{path} holds something other than arrays")
                self.hits += 1
                return out
            except _DAMAGED:
                path.unlink(missing_ok=True)  # a damaged file is recomputed
        self.misses += 1
        out = compute()
        buffer = io.BytesIO()
        np.savez(buffer, **out)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(path, buffer.getvalue())
        return out

    def record(self, kind: str, key: str, compute: Callable[[], Any]) -> Any:
        """The JSON value stored under ``kind/key``, computing and storing it when absent."""
        path = self.root / kind / f"{key}.json"
        if path.is_file():
            try:
                value = json.loads(path.read_text(encoding="utf-8"))
                self.hits += 1
                return value
            except _DAMAGED:
                path.unlink(missing_ok=True)
        self.misses += 1
        value = compute()
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps(value))
        return value
