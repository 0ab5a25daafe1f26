"""Explain files on disk with one or several methods and write maps, overlays and a summary.

This is the work behind ``trustmap explain`` and ``trustmap demo``; the command line only
parses arguments and calls :func:`explain_image`.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from trustmap.core.atomic import save_npy_atomic, write_text_atomic
from trustmap.core.base import build
from trustmap.core.registry import get_method
from trustmap.core.targets import TargetSpec
from trustmap.core.validation import NotApplicableError, TrustmapWarning


@dataclass(frozen=True)
class MethodResult:
    """What one method produced for one image."""

    method: str
    seconds: float
    params: dict[str, Any]
    map_path: str | None
    overlay_path: str | None
    error: str | None = None
    skipped: str | None = None  # why the method cannot explain this model
    warnings: tuple[str, ...] = ()


@dataclass
class ImageSummary:
    """Everything ``summary.json`` records for one input."""

    input: str
    shape: list[int]
    prediction: int | None
    probabilities: list[float]
    target: Any
    methods: dict[str, MethodResult] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "input": self.input,
            "shape": self.shape,
            "prediction": self.prediction,
            "probabilities": self.probabilities,
            "target": self.target,
            "warnings": self.warnings,
            "methods": {k: _result_json(v) for k, v in self.methods.items()},
        }


def load_model(
    spec: str, weights: str | None = None, device: str = "cpu", *, arch: str | None = None
) -> nn.Module:
    """A model from a file, a MONAI bundle folder or ``package.module:factory``; see
    :func:`trustmap.models.loading.open_model` (which also returns warnings)."""
    from trustmap.models.loading import open_model

    return open_model(spec, weights, device, arch=arch).model


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
    ``channels`` repeats a grey image for models that take several channels.
    """
    t = torch.as_tensor(np.ascontiguousarray(array), dtype=torch.float32)
    t = t.unsqueeze(0) if is_color else t.unsqueeze(0).unsqueeze(0)
    if t.shape[1] == 1 and channels > 1:
        t = t.repeat(1, channels, *([1] * (t.ndim - 2)))
    if size is not None:
        spatial = t.shape[2:]
        shape = (size,) * len(spatial) if isinstance(size, int) else tuple(size)
        if len(shape) != len(spatial):
            raise ValueError(f"size {size} does not match the image's {len(spatial)} axes")
        mode = "bilinear" if len(spatial) == 2 else "trilinear"
        t = F.interpolate(t, size=shape, mode=mode, align_corners=False)
    if normalize == "minmax":
        lo, hi = t.min(), t.max()
        t = (t - lo) / (hi - lo) if hi > lo else torch.zeros_like(t)
    elif normalize == "zscore":
        sd = t.std()
        t = (t - t.mean()) / sd if sd > 0 else torch.zeros_like(t)
    elif normalize != "none":
        raise ValueError(f"normalize must be 'none', 'minmax' or 'zscore', got {normalize!r}")
    return t


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

    Every file is written atomically. A method that fails is recorded with its error and
    the others still run. With ``resume=True`` methods whose map already exists (and is in
    the previous summary) are not recomputed.
    """
    from trustmap.data.io import save_map
    from trustmap.viz.overlay import grid, overlay

    for method in methods:  # fail fast on unknown names, before any work
        get_method(method)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    params = params or {}
    with torch.no_grad():
        was_training = model.training
        model.eval()
        try:
            logits = model(x)
        finally:
            model.train(was_training)
    probs = _probabilities(logits)
    from trustmap.models.loading import input_range_warning

    range_warning = input_range_warning(model, x)
    previous = _previous(out / "summary.json") if resume else {}
    summary = ImageSummary(
        input=name,
        shape=list(x.shape),
        prediction=int(probs.argmax()) if probs.numel() > 1 else int(logits.reshape(-1)[0] > 0),
        probabilities=[round(float(p), 6) for p in probs],
        target=target if isinstance(target, (int, type(None))) else str(target),
        warnings=[range_warning] if range_warning else [],
    )
    image = x[0].detach().cpu().numpy()
    is3d = x.ndim == 5
    maps: dict[str, np.ndarray] = {}
    for method in methods:
        if on_method:
            on_method(method)
        map_path = out / f"{method}.{'nii.gz' if is3d else 'npy'}"
        png_path = out / f"{method}.png"
        old = previous.get(method)
        if resume and old and not old.get("error") and not old.get("skipped") and map_path.exists():
            old = {**old, "warnings": tuple(old.get("warnings") or ())}
            summary.methods[method] = MethodResult(**old)
            maps[method] = _read_map(map_path)
            continue
        explainer = build(get_method(method), model, dict(params.get(method, {})))
        start = time.perf_counter()
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", TrustmapWarning)
                exp = explainer.explain(x, target=target)
        except NotApplicableError as err:  # this model is out of the method's reach
            summary.methods[method] = MethodResult(method, 0.0, {}, None, None, skipped=str(err))
            continue
        except (ValueError, TypeError) as err:
            summary.methods[method] = MethodResult(method, 0.0, {}, None, None, error=str(err))
            continue
        notes = _trustmap_warnings(caught)
        seconds = time.perf_counter() - start
        attr = exp.attributions[0].detach().cpu().numpy()
        if is3d:
            save_map(attr.sum(0), map_path, affine=_map_affine(like, x.shape[2:]))
        else:
            save_npy_atomic(map_path, attr)
        overlay(image, attr, png_path, title=f"{method} ({seconds:.2f} s)", spatial_dims=x.ndim - 2)
        maps[method] = attr.sum(0) if is3d else attr
        summary.methods[method] = MethodResult(
            method,
            round(seconds, 4),
            _jsonable(exp.params),
            map_path.name,
            png_path.name,
            warnings=notes,
        )
    if maps and not is3d:
        grid([image] * len(maps), list(maps.values()), list(maps), out / "all_methods.png")
    write_text_atomic(out / "summary.json", json.dumps(summary.to_json(), indent=2))
    return summary


def _trustmap_warnings(caught: list[warnings.WarningMessage]) -> tuple[str, ...]:
    """The distinct TrustmapWarning messages of a method's run; other warnings go on to
    the caller's filters."""
    notes: list[str] = []
    for w in caught:
        if issubclass(w.category, TrustmapWarning):
            if str(w.message) not in notes:
                notes.append(str(w.message))
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return tuple(notes)


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
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())["methods"]
    except (json.JSONDecodeError, KeyError):
        return {}


def _read_map(path: Path) -> np.ndarray:
    if path.suffix == ".npy":
        return np.load(path)
    from trustmap.data.io import load

    return load(path).array


def _result_json(r: MethodResult) -> dict[str, Any]:
    return {
        "method": r.method,
        "seconds": r.seconds,
        "params": r.params,
        "map_path": r.map_path,
        "overlay_path": r.overlay_path,
        "error": r.error,
        "skipped": r.skipped,
        "warnings": list(r.warnings),
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
