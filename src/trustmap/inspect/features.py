"""Feature maps (Huff et al. 2021, section 2.1.2; Singh et al. 2020, section 4.1).

* :func:`feature_maps`: every channel of one layer for one image, as a montage (in 3D the
  slice through each channel's maximum).
* :func:`unit_rates`: over a dataset, the share of units per layer that never fire
  ("dead": a ReLU stuck below zero carries no information, and "networks that have many
  feature maps that are all zero may indicate a problem with the training process") and
  of units that fire everywhere ("saturated": no spatial selectivity).
* :func:`activation_maps`: a layer's activation reduced over channels and upsampled to
  the input, the view Singh et al. describe for skin-lesion classifiers (rescaling the
  feature maps of the last layers to the input size).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from trustmap.core.batching import upsample_to
from trustmap.errors import InputError
from trustmap.inspect.activations import (
    as_images,
    batch_of_one,
    iter_activations,
    layer_table,
    require_spatial,
)

__all__ = [
    "FeatureMaps",
    "LayerRates",
    "UnitRates",
    "activation_maps",
    "default_rate_layers",
    "feature_maps",
    "unit_rates",
]

_ACTIVATIONS = (
    nn.ReLU,
    nn.LeakyReLU,
    nn.PReLU,
    nn.ELU,
    nn.GELU,
    nn.SiLU,
    nn.ReLU6,
    nn.Sigmoid,
    nn.Tanh,
    nn.Softplus,
    nn.Mish,
    nn.Hardswish,
)


@dataclass(frozen=True)
class FeatureMaps:
    """The channels of one layer for one image.

    ``maps`` is ``(K, *s)`` (the layer's resolution); ``planes`` ``(K, h, w)`` the 2D view
    of each channel (in 3D the axial slice through the channel's maximum, whose index is
    in ``slices``); ``peak`` each channel's maximum.
    """

    layer: str
    maps: np.ndarray
    planes: np.ndarray
    slices: np.ndarray | None
    peak: np.ndarray

    def to_dict(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "shape": list(self.maps.shape),
            "peak": self.peak.tolist(),
            "slices": None if self.slices is None else self.slices.tolist(),
            "zero_channels": int((self.peak <= 0).sum()),
        }


@dataclass(frozen=True)
class LayerRates:
    """Dead and saturated units of one layer over a dataset.

    ``active_share[k]``: share of all positions of all images where unit ``k`` is above
    ``tol``; ``peak[k]``: its largest value. A unit is dead when it never rises above
    ``tol`` and saturated when it is active at least ``saturated_share`` of the time.
    """

    layer: str
    kind: str
    units: int
    active_share: np.ndarray
    peak: np.ndarray
    dead: np.ndarray
    saturated: np.ndarray

    @property
    def dead_rate(self) -> float:
        return float(self.dead.mean())

    @property
    def saturated_rate(self) -> float:
        return float(self.saturated.mean())

    def to_dict(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "kind": self.kind,
            "units": self.units,
            "dead_rate": self.dead_rate,
            "saturated_rate": self.saturated_rate,
            "dead_units": np.flatnonzero(self.dead).tolist(),
            "saturated_units": np.flatnonzero(self.saturated).tolist(),
            "active_share": self.active_share.tolist(),
        }


@dataclass(frozen=True)
class UnitRates:
    """:class:`LayerRates` of several layers over ``n_images`` images."""

    layers: tuple[LayerRates, ...]
    n_images: int
    tol: float
    saturated_share: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "n_images": self.n_images,
            "tol": self.tol,
            "saturated_share": self.saturated_share,
            "layers": [layer.to_dict() for layer in self.layers],
        }


def feature_maps(model: nn.Module, image: torch.Tensor, layer: str) -> FeatureMaps:
    """Every channel of ``layer`` for one ``image`` (``(C, *s)`` or ``(1, C, *s)``).

    Raises a ValueError for a layer without spatial output (a linear layer) or a batch of
    more than one image.
    """
    x = as_images(batch_of_one(model, image))
    if x.shape[0] != 1:
        raise InputError(f"feature_maps explains one image; got a batch of {x.shape[0]}")
    batch = next(iter_activations(model, x, [layer], batch_size=1))
    act = batch.activations[layer]
    require_spatial(layer, act, x, "a feature-map montage")
    maps = act[0].to("cpu", torch.float32).numpy()
    peak = maps.reshape(maps.shape[0], -1).max(1)
    slices = None
    planes = maps
    if maps.ndim == 4:
        flat = maps.reshape(maps.shape[0], maps.shape[1], -1).max(2)
        slices = flat.argmax(1)
        planes = np.stack([maps[k, z] for k, z in enumerate(slices)])
    return FeatureMaps(layer=layer, maps=maps, planes=planes, slices=slices, peak=peak)


def default_rate_layers(model: nn.Module, example: torch.Tensor) -> list[str]:
    """The activation modules (ReLU, GELU, sigmoid, ...) with a spatial output, in forward
    order; the convolutions when the model calls its activations as functions."""
    table = layer_table(model, example)
    modules = dict(model.named_modules())
    acts = [i.name for i in table if i.spatial and isinstance(modules[i.name], _ACTIVATIONS)]
    if acts:
        return acts
    convs = (nn.Conv2d, nn.Conv3d)
    return [i.name for i in table if i.spatial and isinstance(modules[i.name], convs)]


def unit_rates(
    model: nn.Module,
    data: Any,
    layers: Sequence[str] | None = None,
    *,
    tol: float = 0.0,
    saturated_share: float = 0.99,
    batch_size: int = 64,
    progress: Callable[[int, int], None] | None = None,
) -> UnitRates:
    """Dead and saturated units per layer over ``data``, in one pass.

    Parameters
    ----------
    layers
        Layers with spatial output; default :func:`default_rate_layers`.
    tol
        A unit is active where it exceeds ``tol`` (0 for ReLU outputs).
    saturated_share
        A unit active at least this share of all positions of all images is saturated.
    """
    images = as_images(data)
    if not 0 < saturated_share <= 1:
        raise InputError(f"saturated_share must lie in (0, 1], got {saturated_share!r}")
    names = list(layers) if layers is not None else default_rate_layers(model, images)
    if not names:
        raise InputError("the model has no layer with a spatial output to count units in")
    modules = dict(model.named_modules())
    peak: dict[str, torch.Tensor] = {}
    active: dict[str, torch.Tensor] = {}
    positions: dict[str, int] = {}
    for batch in iter_activations(model, images, names, batch_size=batch_size, progress=progress):
        for name in names:
            a = batch.activations[name]
            require_spatial(name, a, images, "counting dead and saturated units")
            flat = a.transpose(0, 1).reshape(a.shape[1], -1).float()
            top = flat.amax(1).cpu()
            on = (flat > tol).sum(1).to("cpu", torch.float64)
            peak[name] = top if name not in peak else torch.maximum(peak[name], top)
            active[name] = on if name not in active else active[name] + on
            positions[name] = positions.get(name, 0) + flat.shape[1]
    out = []
    for name in names:
        share = (active[name] / positions[name]).numpy()
        top = peak[name].numpy()
        out.append(
            LayerRates(
                layer=name,
                kind=type(modules[name.split(":")[0]]).__name__,
                units=int(share.shape[0]),
                active_share=share,
                peak=top,
                dead=top <= tol,
                saturated=share >= saturated_share,
            )
        )
    return UnitRates(
        layers=tuple(out),
        n_images=int(images.shape[0]),
        tol=float(tol),
        saturated_share=float(saturated_share),
    )


def activation_maps(
    model: nn.Module,
    x: torch.Tensor,
    layer: str,
    *,
    reduce: str | int = "mean",
) -> torch.Tensor:
    """``layer``'s activation reduced over channels and upsampled to ``x``: ``(B, 1, *s)``.

    ``reduce``: ``"mean"`` or ``"max"`` over channels, ``"norm"`` (L2 over channels), or
    an ``int`` to take one channel. Bilinear (trilinear in 3D) upsampling, as CAM methods.
    """
    images = as_images(x)
    batch = next(iter_activations(model, images, [layer], batch_size=images.shape[0]))
    act = batch.activations[layer]
    require_spatial(layer, act, images, "an activation map")
    if isinstance(reduce, bool):
        raise InputError(f"reduce must be 'mean', 'max', 'norm' or a channel index, got {reduce!r}")
    if isinstance(reduce, int):
        if not 0 <= reduce < act.shape[1]:
            raise InputError(f"layer {layer!r} has {act.shape[1]} channels; no channel {reduce}")
        m = act[:, reduce : reduce + 1]
    elif reduce == "mean":
        m = act.mean(1, keepdim=True)
    elif reduce == "max":
        m = act.amax(1, keepdim=True)
    elif reduce == "norm":
        m = act.norm(dim=1, keepdim=True)
    else:
        raise InputError(f"reduce must be 'mean', 'max', 'norm' or a channel index, got {reduce!r}")
    return upsample_to(m.to(images.dtype).cpu(), tuple(images.shape[2:]))
