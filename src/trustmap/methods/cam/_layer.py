"""What every CAM method shares: choosing the layer, reading its activations (and the
gradient of the target score with respect to them), weighting channels, upsampling.

Notation used throughout the family: ``A`` is the layer's output ``(B, K, *s)``
(``K`` channels, ``s`` the layer's spatial positions, ``N = prod(s)``), ``G = dS/dA``
the gradient of the target score ``S`` with respect to it.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from trustmap.core.base import Explainer
from trustmap.core.batching import upsample_to
from trustmap.core.hooks import capture_layer, find_module, hook_handles
from trustmap.core.targets import Target, TargetSpec, resolve_target
from trustmap.core.validation import positive_int

# The default layer of a model, per input spatial shape (which fixes the rank). The
# shape, not only the rank, is the key: whether the last block still has more than one
# position depends on the input size (DenseNet121: 2 x 2 at 64 x 64, 1 x 1 at 32 x 32).
# Weak keys: the cache never keeps a model alive and nothing is stored on the model.
_DEFAULT_LAYERS: weakref.WeakKeyDictionary[nn.Module, dict[tuple[int, ...], str]] = (
    weakref.WeakKeyDictionary()
)


def default_layer(model: nn.Module, x: torch.Tensor) -> str:
    """Name of the last module, in the order modules finish during the forward pass,
    whose output is a feature map ``(B, K, *s)`` with ``x``'s spatial rank and ``N > 1``.

    That is the feature map that feeds the global pooling of a classifier (for MONAI's
    DenseNet121 ``class_layers.relu``). Found with one no-grad probe forward on the first
    sample, then cached per model and input spatial shape.
    """
    rank = x.ndim - 2
    key = tuple(x.shape[2:])
    cached = _DEFAULT_LAYERS.get(model, {}).get(key)
    if cached is not None:
        return cached
    last: list[str] = []

    def make_hook(name: str) -> Callable[..., None]:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            if (
                isinstance(output, torch.Tensor)
                and output.ndim == x.ndim
                and math.prod(output.shape[2:]) > 1
            ):
                last.append(name)

        return hook

    with hook_handles() as handles:
        for name, module in model.named_modules():
            # The model itself is excluded: its output is the score, not a feature map.
            if name:
                handles.append(module.register_forward_hook(make_hook(name)))
        with torch.no_grad():
            model(x[:1])
    if not last:
        raise ValueError(
            "CAM methods need a convolutional model with a spatial feature map: no layer "
            f"of this model outputs a (B, K, *spatial) tensor with {rank} spatial dims and "
            "more than one position. Use a gradient method (e.g. 'integrated_gradients')"
        )
    _DEFAULT_LAYERS.setdefault(model, {})[key] = last[-1]
    return last[-1]


def resolve_layer(model: nn.Module, layer: str | None, x: torch.Tensor) -> tuple[str, nn.Module]:
    """``(name, module)`` for the user's ``layer``, or the default feature map if None."""
    name = default_layer(model, x) if layer is None else layer
    return name, find_module(model, name)


@dataclass(frozen=True)
class LayerPass:
    """Result of one forward pass through the model with the layer captured."""

    layer: str
    module: nn.Module
    activation: torch.Tensor  # (B, K, *s), detached
    output: torch.Tensor  # model output on x, detached
    target: Target
    calls: int  # how often the layer ran in one forward pass (the last call is used)
    gradient: torch.Tensor | None = None  # dS/dA, (B, K, *s)
    extra: dict[str, Any] = field(default_factory=dict)


def layer_pass(
    explainer: Explainer,
    x: torch.Tensor,
    target: TargetSpec | Target,
    layer: str | None,
    *,
    gradient: bool,
) -> LayerPass:
    """One forward pass on ``x`` capturing the layer; with ``gradient`` also one backward.

    The target is resolved on this same forward pass, so a gradient-weighted CAM costs
    exactly one forward and one backward pass. Parameters keep their ``requires_grad``:
    the graph is built from ``x`` instead, so frozen models work too.
    """
    name, module = resolve_layer(explainer.model, layer, x)
    grad_mode = torch.enable_grad() if gradient else torch.no_grad()
    with grad_mode, capture_layer(module) as capture:
        output = explainer.forward(x.detach().requires_grad_(gradient))
        if not capture.outputs:
            raise ValueError(
                f"layer {name!r} did not run during the forward pass; pick a layer on the "
                "path from the input to the output"
            )
        act = capture.output
        b = x.shape[0]
        if act.ndim != x.ndim or act.shape[0] != b:
            raise ValueError(
                f"layer {name!r} outputs shape {tuple(act.shape)}; CAM methods need a "
                f"feature map (B, K, *spatial) with {x.ndim - 2} spatial dims for a batch "
                f"of {b}"
            )
        resolved = resolve_target(target, output)
        # Evaluated once even where only the resolution is needed (Eigen-CAM, CAM), so a
        # target that cannot score this output fails here, not later.
        score = resolved.scores(output)
        grad = None
        if gradient:
            if not (score.requires_grad and act.requires_grad):
                raise ValueError(
                    f"the target score is not differentiable with respect to layer {name!r}"
                )
            (grad,) = torch.autograd.grad(score.sum(), act, allow_unused=True)
            if grad is None:
                raise ValueError(f"the target score does not depend on layer {name!r}")
    return LayerPass(
        layer=name,
        module=module,
        activation=act.detach(),
        output=output.detach(),
        target=resolved,
        calls=len(capture.outputs),
        gradient=grad,
        extra={"layer": name},
    )


def spatial_dims(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(range(2, t.ndim))


def channel_view(weights: torch.Tensor, ndim: int) -> torch.Tensor:
    """``(B, K)`` weights shaped to broadcast against ``(B, K, *s)``."""
    return weights.reshape(*weights.shape[:2], *([1] * (ndim - 2)))


def weighted_sum(weights: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
    """``sum_k w_k A_k``: ``(B, K)`` weights and ``(B, K, *s)`` activations to ``(B, 1, *s)``."""
    return (channel_view(weights.to(act.dtype), act.ndim) * act).sum(1, keepdim=True)


def safe_divide(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """``num / (den + eps * sign(den))``, with sign(0) = +1 and eps the dtype's epsilon.

    The epsilon only keeps an exactly-zero denominator finite; it moves the sign of none
    and changes the others by a relative ``eps``.
    """
    eps = torch.finfo(den.dtype).eps
    sign = torch.where(den < 0, -1.0, 1.0).to(den.dtype)
    return num / (den + eps * sign)


def finish(cam: torch.Tensor, x: torch.Tensor, relu: bool) -> torch.Tensor:
    """Rectify (if asked) at the layer's resolution, then upsample to ``x``'s spatial size."""
    if relu:
        cam = cam.clamp(min=0)
    return upsample_to(cam, tuple(x.shape[2:]))


def gradient_cam(
    explainer: Explainer,
    x: torch.Tensor,
    target: TargetSpec | Target,
    layer: str | None,
    combine: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> tuple[torch.Tensor, LayerPass]:
    """``combine(A, G)`` at the layer's resolution, ``(B, 1, *s)``, from one forward and
    one backward pass; and the pass itself."""
    lp = layer_pass(explainer, x, target, layer, gradient=True)
    return combine(lp.activation, lp.gradient), lp


def check_flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def check_batch_size(value: object, default: int) -> int:
    return default if value is None else positive_int("batch_size", value)
