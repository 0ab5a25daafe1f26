"""Content hashes of models, arrays and parameters: the keys of everything trustmap resumes.

A run that resumes (``trustmap trust``'s cache, ``trustmap explain --resume``) reuses a
result only under the hash of everything that produced it, so that another input, other
weights or other parameters are never answered with a stale result.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["array_hash", "digest_of", "weights_hash"]


def weights_hash(model: nn.Module) -> str:
    """SHA-256 (16 hex digits) of a model's class, parameter and buffer names and bytes.

    The memory format of a parameter is part of the hash when it is not the standard one
    (a channels-last convolution weight): PyTorch computes with other kernels then, and
    the results differ in the last bits, so such a model does not share its results with
    the same weights in the standard format.
    """
    digest = hashlib.sha256(type(model).__qualname__.encode())
    for name, tensor in model.state_dict().items():
        t = tensor.detach()
        digest.update(name.encode())
        digest.update(str(t.dtype).encode() + str(tuple(t.shape)).encode())
        if t.numel() and not t.is_contiguous():
            # The stride order tells channels-last from a plain transposed view alike.
            digest.update(f"strides{t.stride()}".encode())
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


def digest_of(*parts: Any) -> str:
    """SHA-256 (24 hex digits) of JSON-serialisable parts (dict order does not matter);
    arrays and tensors enter by :func:`array_hash`."""
    text = json.dumps(list(parts), sort_keys=True, default=_jsonable)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _jsonable(value: Any) -> Any:
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return {"array": array_hash(value)}
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    return repr(value)
