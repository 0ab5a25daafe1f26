"""Explain files on disk with one or several methods and write maps, overlays and a summary.

This is the work behind ``trustmap explain`` and ``trustmap demo``; the command line only
parses arguments and calls :func:`explain_image`.
"""

from __future__ import annotations

import importlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from trustmap import __version__
from trustmap.core.atomic import save_npy_atomic, write_text_atomic
from trustmap.core.base import build
from trustmap.core.hashing import array_hash, digest_of, weights_hash
from trustmap.core.registry import get_method
from trustmap.core.targets import TargetSpec, resolve_target
from trustmap.core.validation import check_model_matches, check_output, model_mismatch
from trustmap.errors import (
    InputError,
    MissingFileError,
    ModelError,
    ModelTypeError,
    TrustmapError,
)


@dataclass(frozen=True)
class MethodResult:
    """What one method produced for one image."""

    method: str
    seconds: float
    params: dict[str, Any]
    map_path: str | None
    overlay_path: str | None
    error: str | None = None
    key: str | None = None


@dataclass
class ImageSummary:
    """Everything ``summary.json`` records for one input."""

    input: str
    shape: list[int]
    prediction: int | None
    probabilities: list[float]
    target: Any
    methods: dict[str, MethodResult] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "input": self.input,
            "shape": self.shape,
            "prediction": self.prediction,
            "probabilities": self.probabilities,
            "target": self.target,
            "methods": {k: _result_json(v) for k, v in self.methods.items()},
        }


def load_model(spec: str, weights: str | None = None, device: str = "cpu") -> nn.Module:
    """A model from a TorchScript file or a ``package.module:factory`` import path.

    ``factory`` is called without arguments and must return an ``nn.Module``; ``weights``
    (a state dict saved with ``torch.save``) is then loaded into it strictly.
    """
    path = Path(spec)
    if path.suffix in (".pt", ".pth", ".ts", ".torchscript", ".jit") or path.exists():
        if not path.exists():
            raise MissingFileError(f"model file not found: {spec}")
        if not path.is_file():
            raise InputError(f"model {spec} is a folder, not a TorchScript file")
        try:
            model = torch.jit.load(str(path), map_location=device)
        except (RuntimeError, ValueError, OSError) as err:
            raise ModelError(
                f"{spec} is not a TorchScript file ({_brief(err)}); save the model "
                "with torch.jit.save, or pass 'package.module:factory' with --weights"
            ) from None
        if weights:
            raise InputError("--weights applies to 'package.module:factory' models only")
        return model.eval()
    if ":" not in spec:
        raise InputError(
            f"model {spec!r} is neither a file nor 'package.module:factory' (e.g. "
            "'mypkg.models:build_classifier')"
        )
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # ImportError, or whatever the module raises on import
        raise ModelError(
            f"cannot import {module_name!r} for the model: {type(err).__name__}: {err}"
        ) from None
    factory = getattr(module, attr, None)
    if factory is None or not callable(factory):
        raise ModelError(f"{module_name!r} has no callable {attr!r}")
    try:
        model = factory()
    except Exception as err:  # the user's code: name it rather than print its traceback
        raise ModelError(
            f"the model factory {spec} raised {type(err).__name__}: {_brief(err)}"
        ) from err
    if not isinstance(model, nn.Module):
        raise ModelTypeError(f"{spec} returned {type(model).__name__}, not a torch.nn.Module")
    if weights:
        if not Path(weights).is_file():
            raise MissingFileError(f"weights file not found: {weights}")
        try:
            state = torch.load(weights, map_location=device, weights_only=True)
        except Exception as err:  # torch raises several types for a corrupt file
            raise ModelError(f"cannot read weights {weights}: {_brief(err)}") from None
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        try:
            model.load_state_dict(state)
        except (RuntimeError, TypeError, AttributeError) as err:
            raise ModelError(f"weights {weights} do not fit {spec}: {_brief(err)}") from None
    return model.to(device).eval()


def prepare_tensor(
    array: np.ndarray,
    *,
    is_color: bool = False,
    size: int | Sequence[int] | None = None,
    normalize: str = "none",
    channels: int = 1,
) -> torch.Tensor:
    """``(1, C, *spatial)`` float32 from a loaded image array.

    ``array`` is ``(H, W)`` or ``(D, H, W)`` for grey images, ``(C, H, W)`` when
    ``is_color``. ``normalize``: ``"none"``, ``"minmax"`` (to [0, 1]) or ``"zscore"``.
    ``size`` resizes the spatial axes (bilinear/trilinear) to what the model expects;
    ``channels`` repeats a grey image for models that take several channels, and turns a
    colour image grey (ITU-R BT.601 luma) for a model that takes one.
    """
    from trustmap.data.loaders import to_channels

    channels = _positive(channels, "channels")
    if normalize not in ("none", "minmax", "zscore"):
        raise InputError(f"normalize must be 'none', 'minmax' or 'zscore', got {normalize!r}")
    grid = np.asarray(array, dtype=np.float32)
    grid = grid if is_color else grid[None]
    grid = to_channels(grid, channels, "the input", "the image")
    t = torch.as_tensor(np.ascontiguousarray(grid)).unsqueeze(0)
    if size is not None:
        spatial = t.shape[2:]
        shape = (size,) * len(spatial) if isinstance(size, int) else tuple(size)
        if len(shape) != len(spatial):
            raise InputError(f"size {size} does not match the image's {len(spatial)} axes")
        shape = tuple(_positive(n, "size") for n in shape)
        mode = "bilinear" if len(spatial) == 2 else "trilinear"
        t = F.interpolate(t, size=shape, mode=mode, align_corners=False)
    if normalize == "minmax":
        lo, hi = t.min(), t.max()
        t = (t - lo) / (hi - lo) if hi > lo else torch.zeros_like(t)
    elif normalize == "zscore":
        sd = t.std()
        t = (t - t.mean()) / sd if sd > 0 else torch.zeros_like(t)
    return t


def _positive(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise InputError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def explain_image(
    model: nn.Module,
    x: torch.Tensor,
    methods: Sequence[str],
    out_dir: str | Path,
    *,
    name: str = "image",
    target: TargetSpec = None,
    params: dict[str, dict[str, Any]] | None = None,
    like: Any = None,
    resume: bool = False,
    on_method: Callable[[str], None] | None = None,
) -> ImageSummary:
    """Run each method on ``x`` (batch 1) and write, per method, the raw map and an overlay,
    then ``summary.json`` (prediction, probabilities, methods, parameters, timings).

    Every file is written atomically, and the output folder is locked for the run (see
    :mod:`trustmap.core.lock`). The model, ``x`` and ``target`` are checked before any
    method runs: a model that rejects ``x`` raises a :class:`~trustmap.errors.ModelError`
    naming the layer, a target out of range an :class:`~trustmap.errors.InputError`. A
    method that fails with a documented error (its parameters, or a model it cannot
    handle) is recorded with its error and the others still run.

    With ``resume=True`` a method is not recomputed when the previous ``summary.json``
    records it under the same key, a hash of ``x`` (the input after loading, resizing and
    normalizing), the model's weights, the method, its parameters, the target and the
    source geometry, and its map and overlay files are intact. Anything else (another
    input, other weights or parameters, a missing, truncated or damaged map, a damaged
    ``summary.json``) is recomputed.
    """
    from trustmap.core.lock import output_lock

    for method in methods:  # fail fast on unknown names, before any work
        get_method(method)
    params = params or {}
    logits = _checked_forward(model, x)
    probs = _probabilities(logits)
    try:
        resolve_target(target, logits)
    except TrustmapError as err:
        raise InputError(f"target {target!r}: {err}") from None
    out = Path(out_dir)
    with output_lock(out):
        return _explain_methods(
            model, x, logits, probs, methods, out, name, target, params, like, resume, on_method
        )


def _explain_methods(
    model: nn.Module,
    x: torch.Tensor,
    logits: torch.Tensor,
    probs: torch.Tensor,
    methods: Sequence[str],
    out: Path,
    name: str,
    target: TargetSpec,
    params: dict[str, dict[str, Any]],
    like: Any,
    resume: bool,
    on_method: Callable[[str], None] | None,
) -> ImageSummary:
    from trustmap.data.io import save_map
    from trustmap.viz.overlay import grid, overlay

    previous = _previous(out / "summary.json") if resume else {}
    summary = ImageSummary(
        input=name,
        shape=list(x.shape),
        prediction=int(probs.argmax()) if probs.numel() > 1 else int(logits.reshape(-1)[0] > 0),
        probabilities=[round(float(p), 6) for p in probs],
        target=target if isinstance(target, (int, type(None))) else str(target),
    )
    image = x[0].detach().cpu().numpy()
    is3d = x.ndim == 5
    affine = _map_affine(like, x.shape[2:]) if is3d else None
    base_key = {
        "input": array_hash(x),
        "weights": weights_hash(model),
        "target": summary.target,
        "affine": None if affine is None else np.asarray(affine).round(9).tolist(),
        "trustmap": __version__,
    }
    maps: dict[str, np.ndarray] = {}
    for method in methods:
        if on_method:
            on_method(method)
        map_path = out / f"{method}.{'nii.gz' if is3d else 'npy'}"
        png_path = out / f"{method}.png"
        method_params = dict(params.get(method, {}))
        key = digest_of(base_key, method, method_params)
        old = previous.get(method)
        if resume and isinstance(old, dict) and old.get("key") == key and not old.get("error"):
            reused = _read_map(map_path, x) if png_path.is_file() else None
            if reused is not None:
                summary.methods[method] = _reused_result(old, method, key, map_path, png_path)
                maps[method] = reused
                continue
        explainer = build(get_method(method), model, method_params)
        start = time.perf_counter()
        try:
            exp = explainer.explain(x, target=target)
        except (ValueError, TypeError) as err:  # documented errors: the others still run
            summary.methods[method] = MethodResult(
                method, 0.0, {}, None, None, error=_brief(err), key=key
            )
            continue
        seconds = time.perf_counter() - start
        attr = exp.attributions[0].detach().cpu().numpy()
        if is3d:
            save_map(attr.sum(0), map_path, affine=affine)
        else:
            save_npy_atomic(map_path, attr)
        overlay(image, attr, png_path, title=f"{method} ({seconds:.2f} s)", spatial_dims=x.ndim - 2)
        maps[method] = attr.sum(0) if is3d else attr
        summary.methods[method] = MethodResult(
            method, round(seconds, 4), _jsonable(exp.params), map_path.name, png_path.name, key=key
        )
    if maps and not is3d:
        grid([image] * len(maps), list(maps.values()), list(maps), out / "all_methods.png")
    write_text_atomic(out / "summary.json", json.dumps(summary.to_json(), indent=2))
    return summary


def _checked_forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's logits on ``x``; a model that rejects ``x`` raises a ModelError."""
    check_model_matches(model, x)
    with torch.no_grad():
        was_training = model.training
        model.eval()
        try:
            logits = model(x)
        except Exception as err:  # the user's model failed on this input: say which way
            mismatch = model_mismatch(model, x, err)
            if mismatch is not None:
                raise mismatch from err
            raise ModelError(
                f"the model fails on the input of shape {tuple(x.shape)}: "
                f"{type(err).__name__}: {_brief(err)}"
            ) from err
        finally:
            model.train(was_training)
    return check_output(logits, x.shape[0])


def _brief(err: BaseException) -> str:
    """An error message on one line; for TorchScript errors the line that names the cause."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    if "TorchScript" in lines[0] and len(lines) > 1:
        return lines[-1]
    return " ".join(lines)


def _map_affine(like: Any, spatial: Sequence[int]) -> np.ndarray | None:
    """The source affine, adjusted when the image was resized before explaining.

    With ``align_corners=False`` resizing, new index ``i`` sits at old index
    ``(i + 0.5) * s - 0.5`` where ``s = old / new``.
    """
    affine = getattr(like, "affine", None)
    if affine is None:
        return None
    old = like.array.shape[-len(spatial) :]
    if tuple(old) == tuple(spatial):
        return affine
    scale = np.eye(4)
    for axis, (o, n) in enumerate(zip(old, spatial)):
        s = o / n
        scale[axis, axis] = s
        scale[axis, 3] = (s - 1) / 2
    return affine @ scale


def _probabilities(logits: torch.Tensor) -> torch.Tensor:
    flat = logits.detach().reshape(logits.shape[0], -1)[0].float()
    if flat.numel() == 1:
        p = torch.sigmoid(flat)
        return torch.cat([1 - p, p])
    return torch.softmax(flat, 0)


def _previous(path: Path) -> dict[str, dict[str, Any]]:
    """The methods of a previous ``summary.json``; empty if it is missing or damaged."""
    if not path.is_file():
        return {}
    try:
        methods = json.loads(path.read_text(encoding="utf-8"))["methods"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        return {}
    return methods if isinstance(methods, dict) else {}


def _read_map(path: Path, x: torch.Tensor) -> np.ndarray | None:
    """A map written by an earlier run, or None when it is missing, damaged or does not fit
    ``x`` (it is then recomputed)."""
    if not path.is_file():
        return None
    spatial = tuple(x.shape[2:])
    try:
        if path.suffix == ".npy":
            array = np.load(path, allow_pickle=False)
            fits = array.ndim == x.ndim - 1 and array.shape[0] in (1, x.shape[1])
            fits = fits and tuple(array.shape[1:]) == spatial
        else:
            from trustmap.data.io import load

            array = load(path).array
            fits = tuple(array.shape) == spatial
    except (OSError, ValueError, EOFError):
        return None
    if not fits or array.dtype.kind != "f" or not np.isfinite(array).all():
        return None
    return array


def _reused_result(
    old: dict[str, Any], method: str, key: str, map_path: Path, png_path: Path
) -> MethodResult:
    seconds = old.get("seconds")
    params = old.get("params")
    return MethodResult(
        method,
        float(seconds) if isinstance(seconds, (int, float)) else 0.0,
        params if isinstance(params, dict) else {},
        map_path.name,
        png_path.name,
        key=key,
    )


def _result_json(r: MethodResult) -> dict[str, Any]:
    return {
        "method": r.method,
        "seconds": r.seconds,
        "params": r.params,
        "map_path": r.map_path,
        "overlay_path": r.overlay_path,
        "error": r.error,
        "key": r.key,
    }


def _jsonable(params: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in params.items():
        if isinstance(v, (int, float, str, bool, type(None))):
            out[k] = v
        elif isinstance(v, (list, tuple)) and all(isinstance(i, (int, float, str)) for i in v):
            out[k] = list(v)
        elif isinstance(v, torch.Tensor):
            out[k] = f"tensor{tuple(v.shape)}"
        else:
            out[k] = repr(v)
    return out
