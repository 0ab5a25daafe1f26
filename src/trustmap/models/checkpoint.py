"""Checkpoints that rebuild their model without user code.

A checkpoint is one torch file holding the architecture's name and constructor arguments
next to the weights:

``{"format": "trustmap-checkpoint", "version": 1, "arch", "spatial_dims", "in_channels",
"num_classes", "create_kwargs", "state_dict", "extra"}``

Everything but the tensors is JSON-like (dicts, lists, tuples, str, numbers, bool, None),
so :func:`load_checkpoint` reads it with ``torch.load(weights_only=True)``: loading a
checkpoint never executes code from the file.

>>> save_checkpoint("model.pt", model, arch="small_cnn", spatial_dims=2, in_channels=1,
...                 num_classes=2, width=16)  # doctest: +SKIP
>>> model, info = load_checkpoint("model.pt")  # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trustmap.core.atomic import atomic_path
from trustmap.models.architectures import create, list_architectures

__all__ = ["CHECKPOINT_FORMAT", "CHECKPOINT_VERSION", "load_checkpoint", "save_checkpoint"]

CHECKPOINT_FORMAT = "trustmap-checkpoint"
CHECKPOINT_VERSION = 1


def _check_json_like(value: Any, where: str) -> None:
    """Raise unless ``value`` is made of what ``torch.load(weights_only=True)`` reads back
    and JSON can express: dicts with str keys, lists, tuples, str, int, float, bool, None."""
    if value is None or isinstance(value, str | bool | int):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{where} must be finite (JSON has no NaN or Inf), got {value!r}")
        return
    if isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _check_json_like(item, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"{where} keys must be strings, got {key!r}")
            _check_json_like(item, f"{where}[{key!r}]")
        return
    raise ValueError(
        f"{where} must be JSON-like (dict, list, tuple, str, int, float, bool, None), got "
        f"{type(value).__name__}; convert it (e.g. float(x), x.tolist()) before saving"
    )


def save_checkpoint(
    path: str | os.PathLike[str],
    model: nn.Module,
    *,
    arch: str,
    spatial_dims: int,
    in_channels: int,
    num_classes: int,
    extra: Mapping[str, Any] | None = None,
    **create_kwargs: Any,
) -> Path:
    """Write ``model``'s weights and how to rebuild it to ``path``, atomically.

    Parameters
    ----------
    path : path-like
        The ``.pt`` file to write; its directory must exist. A reader sees the old file
        or the complete new one, never half of one.
    model : torch.nn.Module
        A model built by ``create(arch, spatial_dims, in_channels, num_classes,
        **create_kwargs)`` (then trained).
    arch, spatial_dims, in_channels, num_classes, **create_kwargs
        The arguments of :func:`~trustmap.models.create` that built ``model``.
    extra : mapping or None
        JSON-like metadata stored alongside (epoch, metrics, dataset name, ...).

    Returns
    -------
    pathlib.Path
        ``path``.

    Raises
    ------
    ValueError
        If ``arch`` is unknown, ``extra`` or ``create_kwargs`` are not JSON-like, or the
        weights do not fit the architecture the arguments describe (so a checkpoint that
        could not be loaded is never written).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if arch not in list_architectures():
        raise ValueError(f"unknown architecture {arch!r}: choose one of {list_architectures()}")
    if extra is not None and not isinstance(extra, Mapping):
        raise ValueError(f"extra must be a dict or None, got {type(extra).__name__}")
    extra_dict = dict(extra) if extra is not None else {}
    _check_json_like(extra_dict, "extra")
    _check_json_like(create_kwargs, "create_kwargs")
    state = {key: value.detach().cpu() for key, value in model.state_dict().items()}
    _check_fits(state, arch, spatial_dims, in_channels, num_classes, create_kwargs, "model")
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "arch": arch,
        "spatial_dims": spatial_dims,
        "in_channels": in_channels,
        "num_classes": num_classes,
        "create_kwargs": dict(create_kwargs),
        "state_dict": state,
        "extra": extra_dict,
    }
    with atomic_path(path) as temp:
        torch.save(payload, temp)
    return Path(path)


def _check_fits(
    state: Mapping[str, torch.Tensor],
    arch: str,
    spatial_dims: int,
    in_channels: int,
    num_classes: int,
    create_kwargs: Mapping[str, Any],
    what: str,
) -> nn.Module:
    """Build the described model and check ``state`` has its keys and shapes; return it."""
    model = create(arch, spatial_dims, in_channels, num_classes, **create_kwargs)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(
        key
        for key in set(expected) & set(state)
        if tuple(expected[key].shape) != tuple(state[key].shape)
    )
    if missing or unexpected or wrong:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape", wrong)):
            if keys:
                more = f" and {len(keys) - 5} more" if len(keys) > 5 else ""
                parts.append(f"{label}: {keys[:5]}{more}")
        raise ValueError(
            f"the weights of {what} do not fit create({arch!r}, spatial_dims={spatial_dims}, "
            f"in_channels={in_channels}, num_classes={num_classes}, **{dict(create_kwargs)}): "
            + "; ".join(parts)
        )
    return model


def load_checkpoint(
    path: str | os.PathLike[str], map_location: str | torch.device = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model saved by :func:`save_checkpoint` and load its weights.

    Parameters
    ----------
    path : path-like
        A file written by :func:`save_checkpoint`.
    map_location : str or torch.device
        Where the weights (and the returned model) go.

    Returns
    -------
    model : torch.nn.Module
        The rebuilt model with its weights, in eval mode, on ``map_location``.
    info : dict
        The checkpoint without its weights: ``format``, ``version``, ``arch``,
        ``spatial_dims``, ``in_channels``, ``num_classes``, ``create_kwargs``, ``extra``,
        plus ``path``.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If the file is not a readable trustmap checkpoint (corrupt, truncated, another
        program's file, a newer format version, weights that do not fit); the message
        names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's own message advises weights_only=False, which would run code from an
        # untrusted file: not advice to pass on.
        raise ValueError(
            f"{path} is not a readable trustmap checkpoint: it is not a torch file, or it "
            "holds Python objects that a weights-only load refuses"
        ) from err
    except Exception as err:  # torch.load fails on a damaged file in many ways
        first = str(err).splitlines()[0] if str(err) else ""
        raise ValueError(
            f"{path} is not a readable trustmap checkpoint (corrupt or truncated): "
            f"{type(err).__name__}: {first}"
        ) from err
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(
            f"{path} is not a trustmap checkpoint (no 'format': {CHECKPOINT_FORMAT!r} entry); "
            "a bare state_dict must be loaded into a model you build yourself"
        )
    version = payload.get("version")
    if not isinstance(version, int) or version > CHECKPOINT_VERSION or version < 1:
        raise ValueError(
            f"{path} has checkpoint version {version!r}; this trustmap reads versions up to "
            f"{CHECKPOINT_VERSION} (upgrade trustmap)"
        )
    keys = ("arch", "spatial_dims", "in_channels", "num_classes", "create_kwargs", "state_dict")
    absent = [key for key in keys if key not in payload]
    if absent:
        raise ValueError(f"{path} is an incomplete trustmap checkpoint: missing {absent}")
    state = payload["state_dict"]
    kwargs = payload["create_kwargs"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: 'state_dict' is not a mapping of names to tensors")
    if not isinstance(kwargs, dict):
        raise ValueError(f"{path}: 'create_kwargs' is not a dict")
    try:
        model = _check_fits(
            state,
            payload["arch"],
            payload["spatial_dims"],
            payload["in_channels"],
            payload["num_classes"],
            kwargs,
            str(path),
        )
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: cannot rebuild the model: {err}") from err
    model.load_state_dict(state)
    model.to(map_location)
    model.eval()
    info = {key: value for key, value in payload.items() if key != "state_dict"}
    info.setdefault("extra", {})
    info["path"] = str(path)
    return model, info
