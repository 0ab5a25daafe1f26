"""A resumable store for the trust protocol: each finished unit of work is a file named by
the content hash of what produced it (model weights, images, method, parameters).

An interrupted run finds the files of the units it finished and recomputes only the rest;
changing a model's weights, the images or a parameter changes the hash, so stale results
are never reused. Files are written atomically, so a unit is either complete or absent.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from trustmap.core.atomic import write_bytes_atomic, write_text_atomic

# Bump when the meaning of a cached unit changes, so old caches are not reused.
CACHE_VERSION = 1


def weights_hash(model: nn.Module) -> str:
    """SHA-256 (16 hex digits) of a model's class, parameter and buffer names and bytes."""
    digest = hashlib.sha256(type(model).__qualname__.encode())
    for name, tensor in model.state_dict().items():
        t = tensor.detach()
        digest.update(name.encode())
        digest.update(str(t.dtype).encode() + str(tuple(t.shape)).encode())
        digest.update(t.to("cpu").contiguous().numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()[:16]


def array_hash(array: np.ndarray | torch.Tensor) -> str:
    """SHA-256 (16 hex digits) of an array's dtype, shape and bytes."""
    if isinstance(array, torch.Tensor):
        array = array.detach().to("cpu").contiguous().numpy()
    array = np.ascontiguousarray(array)
    digest = hashlib.sha256(f"{array.dtype}{array.shape}".encode())
    digest.update(array.tobytes())
    return digest.hexdigest()[:16]


def key_of(*parts: Any) -> str:
    """A stable key for JSON-serialisable parts (dict order does not matter)."""
    text = json.dumps([CACHE_VERSION, *parts], sort_keys=True, default=_jsonable)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _jsonable(value: Any) -> Any:
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return {"array": array_hash(value)}
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    return repr(value)


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
                self.hits += 1
                return out
            except (OSError, ValueError):
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
            except (OSError, ValueError):
                path.unlink(missing_ok=True)
        self.misses += 1
        value = compute()
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps(value))
        return value
