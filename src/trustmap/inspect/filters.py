"""Convolutional filters (Huff et al. 2021, section 2.1.1).

The first layer's kernels act on the image itself and are the most readable: edges,
blobs, gradients. In 3D a kernel ``(k, k, k)`` is shown as its three orthogonal central
slices. Comparing two checkpoints (a trained model against its initial weights, or a
model trained from scratch against a transferred one) per filter, by weight norm and by
cosine similarity, shows which filters training changed: a filter with cosine similarity
near 1 to its random initialisation has barely moved (Shin et al. 2016 compared random
initialisation with transfer learning this way).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from trustmap.errors import InputError
from trustmap.inspect.activations import resolve_layer

__all__ = ["FilterComparison", "Filters", "compare_filters", "filters", "initial_model"]

_CONV = (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)


@dataclass(frozen=True)
class Filters:
    """The kernels of one convolution.

    Attributes
    ----------
    layer
        Module name.
    weights
        ``(K, C, *kernel)`` float32 (``K`` filters over ``C`` input channels).
    spatial_dims
        2 or 3.
    planes
        Per filter and input channel, the 2D views to draw: the kernel itself in 2D; in 3D
        its central axial, coronal and sagittal slices ``(K, C, 3, k, k)``.
    norms
        Frobenius norm of each filter ``(K,)``.
    """

    layer: str
    weights: np.ndarray
    spatial_dims: int
    planes: np.ndarray
    norms: np.ndarray

    def to_dict(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "shape": list(self.weights.shape),
            "spatial_dims": self.spatial_dims,
            "norms": self.norms.tolist(),
        }


@dataclass(frozen=True)
class FilterComparison:
    """Per-filter comparison of one layer between two checkpoints ``a`` and ``b``.

    ``norm_a``, ``norm_b``: Frobenius norms; ``cosine``: cosine similarity of each filter
    pair (1: same direction); ``relative_change``: ``|w_b - w_a| / |w_a|``.
    """

    layer: str
    label_a: str
    label_b: str
    norm_a: np.ndarray
    norm_b: np.ndarray
    cosine: np.ndarray
    relative_change: np.ndarray

    @property
    def mean_cosine(self) -> float:
        return float(self.cosine.mean())

    def to_dict(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "a": self.label_a,
            "b": self.label_b,
            "norm_a": self.norm_a.tolist(),
            "norm_b": self.norm_b.tolist(),
            "cosine": self.cosine.tolist(),
            "relative_change": self.relative_change.tolist(),
            "mean_cosine": self.mean_cosine,
        }


def _first_conv(model: nn.Module) -> str:
    for name, module in model.named_modules():
        if isinstance(module, _CONV):
            return name
    raise InputError("the model has no convolution layer (Conv2d or Conv3d) to show filters of")


def _conv(model: nn.Module, layer: str | None) -> tuple[str, nn.Module]:
    name = _first_conv(model) if layer is None else layer
    module = resolve_layer(model, name)
    if not isinstance(module, _CONV):
        raise InputError(
            f"layer {name!r} is a {type(module).__name__}, not a convolution; filters are "
            f"the kernels of a Conv2d/Conv3d layer (the first is {_first_conv(model)!r})"
        )
    return name, module


def filters(model: nn.Module, layer: str | None = None) -> Filters:
    """The kernels of ``layer`` (default: the model's first convolution). Read only."""
    name, module = _conv(model, layer)
    w = module.weight.detach().to("cpu", torch.float32).numpy().copy()
    if isinstance(module, (nn.ConvTranspose2d, nn.ConvTranspose3d)):
        w = w.swapaxes(0, 1)  # stored (C_in, C_out, ...): make it (K, C, ...)
    dims = w.ndim - 2
    if dims == 3:
        k = w.shape[2:]
        side = max(k)
        views = (w[:, :, k[0] // 2, :, :], w[:, :, :, k[1] // 2, :], w[:, :, :, :, k[2] // 2])
        planes = np.stack([_pad_square(v, side) for v in views], axis=2)
    else:
        planes = w[:, :, None]
    norms = np.sqrt((w.reshape(w.shape[0], -1) ** 2).sum(1))
    return Filters(layer=name, weights=w, spatial_dims=dims, planes=planes, norms=norms)


def _pad_square(a: np.ndarray, side: int) -> np.ndarray:
    """Centre ``(..., h, w)`` in a ``side x side`` square of zeros (the orthogonal slices of
    a non-cubic 3D kernel differ in shape)."""
    h, w = a.shape[-2:]
    out = np.zeros((*a.shape[:-2], side, side), dtype=a.dtype)
    top, left = (side - h) // 2, (side - w) // 2
    out[..., top : top + h, left : left + w] = a
    return out


def compare_filters(
    model_a: nn.Module,
    model_b: nn.Module,
    layer: str | None = None,
    *,
    labels: tuple[str, str] = ("a", "b"),
) -> FilterComparison:
    """Compare the filters of ``layer`` (default: the first convolution) between two models
    of the same architecture, filter by filter.

    Typical use: ``compare_filters(initial_model(info), trained, labels=("init",
    "trained"))`` shows how far each first-layer filter moved from its random
    initialisation.
    """
    name, conv_a = _conv(model_a, layer)
    _, conv_b = _conv(model_b, name)
    wa = conv_a.weight.detach().to("cpu", torch.float64).reshape(conv_a.weight.shape[0], -1)
    wb = conv_b.weight.detach().to("cpu", torch.float64).reshape(conv_b.weight.shape[0], -1)
    if wa.shape != wb.shape:
        raise InputError(
            f"layer {name!r} has filters of shape {tuple(conv_a.weight.shape)} in the first "
            f"model and {tuple(conv_b.weight.shape)} in the second; compare checkpoints of "
            "one architecture"
        )
    na, nb = wa.norm(dim=1), wb.norm(dim=1)
    tiny = torch.finfo(torch.float64).tiny
    cosine = (wa * wb).sum(1) / (na * nb).clamp_min(tiny)
    change = (wb - wa).norm(dim=1) / na.clamp_min(tiny)
    return FilterComparison(
        layer=name,
        label_a=labels[0],
        label_b=labels[1],
        norm_a=na.numpy(),
        norm_b=nb.numpy(),
        cosine=cosine.numpy(),
        relative_change=change.numpy(),
    )


def initial_model(info: dict[str, Any]) -> nn.Module:
    """The weights a trustmap-trained model started from, rebuilt from its checkpoint info
    (:func:`~trustmap.models.load_checkpoint`): training builds the model with
    ``create(arch, ..., seed=seed)``, so the same call gives the initial weights exactly."""
    from trustmap.models import create

    seed = (info.get("extra") or {}).get("seed")
    if seed is None:
        raise InputError(
            "the checkpoint does not record the seed it was trained with, so its initial "
            "weights cannot be rebuilt; compare with another checkpoint instead"
        )
    return create(
        info["arch"],
        info["spatial_dims"],
        info["in_channels"],
        info["num_classes"],
        seed=int(seed),
        **dict(info.get("create_kwargs") or {}),
    ).eval()
