"""What every CAM method shares: choosing the layer, reading its activations (and the
gradient of the target score with respect to them), weighting channels, upsampling.

Notation used throughout the family: ``A`` is the layer's output ``(B, K, *s)``
(``K`` channels, ``s`` the layer's spatial positions, ``N = prod(s)``), ``G = dS/dA``
the gradient of the target score ``S`` with respect to it.
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from trustmap.core.base import Explainer
from trustmap.core.batching import upsample_to
from trustmap.core.hooks import capture_layer, find_module, hook_handles
from trustmap.core.script import is_script_module, script_graph
from trustmap.core.targets import Target, TargetSpec, resolve_target
from trustmap.core.validation import (
    NotApplicableError,
    TrustmapWarning,
    check_output,
    positive_int,
)

# The default layer of a model, per input spatial shape (which fixes the rank). The
# shape, not only the rank, is the key: whether the last block still has more than one
# position depends on the input size (DenseNet121: 2 x 2 at 64 x 64, 1 x 1 at 32 x 32).
# Weak keys: the cache never keeps a model alive and nothing is stored on the model.
# Each entry lists every feature-map layer with its grid, in the order they finish.
_DEFAULT_LAYERS: weakref.WeakKeyDictionary[
    nn.Module, dict[tuple[int, ...], list[tuple[str, tuple[int, ...]]]]
] = weakref.WeakKeyDictionary()
# A layer of at most this many positions per axis gives a CAM of a few blobs.
COARSE_GRID = 2


def default_layer(model: nn.Module, x: torch.Tensor) -> str:
    """Name of the last module, in the order modules finish during the forward pass,
    whose output is a feature map ``(B, K, *s)`` with ``x``'s spatial rank and ``N > 1``.

    That is the feature map that feeds the global pooling of a classifier (for MONAI's
    DenseNet121 ``class_layers.relu``). Found with one no-grad probe forward on the first
    sample, then cached per model and input spatial shape. For a TorchScript model the
    probe reads every submodule's output from its forward graph
    (:mod:`trustmap.core.script`) instead of hooks.
    """
    rank = x.ndim - 2
    maps = feature_maps(model, x)
    if not maps:
        raise NotApplicableError(
            "CAM methods need a convolutional model with a spatial feature map: no layer "
            f"of this model outputs a (B, K, *spatial) tensor with {rank} spatial dims and "
            "more than one position. Use a gradient method (e.g. 'integrated_gradients')"
        )
    return maps[-1][0]


def feature_maps(model: nn.Module, x: torch.Tensor) -> list[tuple[str, tuple[int, ...]]]:
    """``(name, grid)`` of every layer whose output is a feature map ``(B, K, *s)`` with
    ``x``'s rank and more than one position, in the order they finish; cached per model
    and input spatial shape."""
    key = tuple(x.shape[2:])
    cached = _DEFAULT_LAYERS.get(model, {}).get(key)
    if cached is None:
        probe = _script_feature_maps if is_script_module(model) else _feature_maps
        cached = probe(model, x)
        _DEFAULT_LAYERS.setdefault(model, {})[key] = cached
    return cached


def _feature_maps(model: nn.Module, x: torch.Tensor) -> list[tuple[str, tuple[int, ...]]]:
    last: list[tuple[str, tuple[int, ...]]] = []

    def make_hook(name: str) -> Callable[..., None]:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            if (
                isinstance(output, torch.Tensor)
                and output.ndim == x.ndim
                and math.prod(output.shape[2:]) > 1
            ):
                last.append((name, tuple(output.shape[2:])))

        return hook

    with hook_handles() as handles:
        for name, module in model.named_modules():
            # The model itself is excluded: its output is the score, not a feature map.
            if name:
                handles.append(module.register_forward_hook(make_hook(name)))
        with torch.no_grad():
            model(x[:1])
    return last


def _script_feature_maps(model: nn.Module, x: torch.Tensor) -> list[tuple[str, tuple[int, ...]]]:
    """:func:`_feature_maps` for a TorchScript model: every submodule's output is read from
    one probe run of its forward graph. Of two calls ending on the same node the enclosing
    module finishes last, as its forward hook would fire last."""
    graph = script_graph(model)
    order = sorted(graph.calls.values(), key=lambda c: (c.end, -c.name.count(".")))
    names = [c.name for c in order]
    with torch.no_grad():
        _, outputs, _ = graph.run(model, x[:1], outputs=names)
    return [
        (name, tuple(out.shape[2:]))
        for name, out in zip(names, outputs)
        if out.ndim == x.ndim and math.prod(out.shape[2:]) > 1
    ]


def warn_if_coarse(model: nn.Module, name: str, act: torch.Tensor, x: torch.Tensor) -> None:
    """Warn when the layer has at most 2 positions per axis: upsampled, its map is a flat
    wash of a few blobs whatever the method (ResNet-18 at 64 x 64 ends at 2 x 2)."""
    grid = tuple(act.shape[2:])
    if max(grid) > COARSE_GRID:
        return
    finer = [n for n, g in feature_maps(model, x) if max(g) > COARSE_GRID]
    hint = f"pass layer={finer[-1]!r} (a finer feature map) or " if finer else ""
    warnings.warn(
        f"CAM layer {name!r} has a grid of only {' x '.join(map(str, grid))} positions for "
        f"a {' x '.join(map(str, x.shape[2:]))} input, so its map is a few upsampled "
        f"blobs; {hint}use a larger input",
        TrustmapWarning,
        stacklevel=3,
    )


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
    with grad_mode:
        inputs = x.detach().requires_grad_(gradient)
        output, act, calls = forward_capturing(explainer, name, module, inputs)
        b = x.shape[0]
        if act.ndim == x.ndim:
            warn_if_coarse(explainer.model, name, act, x)
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
        calls=calls,
        gradient=grad,
        extra={"layer": name},
    )


def forward_capturing(
    explainer: Explainer, name: str, module: nn.Module, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(model output, layer output of its last call, number of calls)`` from one forward
    pass: with a forward hook, or for a TorchScript model through its forward graph."""
    model = explainer.model
    if is_script_module(model):
        graph = script_graph(model)
        call = graph.call(name)
        output, (act,), _ = graph.run(model, x, outputs=[name])
        return check_output(output, x.shape[0]), act, call.calls
    with capture_layer(module) as capture:
        output = explainer.forward(x)
    if not capture.outputs:
        raise ValueError(
            f"layer {name!r} did not run during the forward pass; pick a layer on the "
            "path from the input to the output"
        )
    return output, capture.output, len(capture.outputs)


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
