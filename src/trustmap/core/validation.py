"""Checks on what users pass in, with errors that name the problem."""

from __future__ import annotations

import torch
from torch import nn

from trustmap.errors import (
    InputError,
    InputTypeError,
    ModelError,
    ModelTypeError,
    TrustmapError,
)


def check_input(x: object) -> torch.Tensor:
    """Validate an image batch and return a detached copy the caller cannot see mutated.

    ``x`` must be a floating tensor of shape ``(B, C, H, W)`` or ``(B, C, D, H, W)``
    without NaN or Inf.
    """
    if not isinstance(x, torch.Tensor):
        raise InputTypeError(
            f"x must be a torch.Tensor of shape (B, C, H, W) or (B, C, D, H, W), "
            f"got {type(x).__name__}"
        )
    if x.ndim not in (4, 5):
        raise InputError(
            f"x must have shape (B, C, H, W) or (B, C, D, H, W); got {x.ndim} dimensions "
            f"{tuple(x.shape)}. Add the batch and channel axes, e.g. x[None, None]"
        )
    if not x.is_floating_point():
        raise InputTypeError(f"x must be float32 or float64, got {_name(x.dtype)}; use x.float()")
    if x.numel() == 0:
        raise InputError(f"x is empty: shape {tuple(x.shape)}")
    finite = torch.isfinite(x)
    if not bool(finite.all()):
        n_nan = int(torch.isnan(x).sum())
        n_inf = int((~finite).sum()) - n_nan
        raise InputError(f"x contains {n_nan} NaN and {n_inf} Inf values")
    return x.detach().clone()


def check_model_matches(model: nn.Module, x: torch.Tensor) -> None:
    """Raise if ``model`` is not a module, or ``x`` and its parameters disagree on device
    or dtype."""
    if not isinstance(model, nn.Module):
        raise ModelTypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    param = next(iter(model.parameters()), None)
    if param is None:
        return
    if param.device != x.device:
        raise InputError(
            f"x is on {x.device} but the model's parameters are on {param.device}; move one of them"
        )
    if param.is_floating_point() and param.dtype != x.dtype:
        raise InputTypeError(
            f"x is {_name(x.dtype)} but the model's parameters are {_name(param.dtype)}; "
            "convert one of "
            "them (x.to(dtype) or model.to(dtype))"
        )


def check_output(output: object, batch: int) -> torch.Tensor:
    """The model's output must be a finite tensor with one row per sample."""
    if not isinstance(output, torch.Tensor):
        raise ModelTypeError(
            f"the model must return a tensor, got {type(output).__name__}; wrap the model so "
            "that it returns the logits"
        )
    if output.ndim == 0 or output.shape[0] != batch:
        raise ModelError(
            f"the model returned shape {tuple(output.shape)} for a batch of {batch}; "
            "expected one row per sample"
        )
    if not bool(torch.isfinite(output).all()):
        raise ModelError("the model's output contains NaN or Inf for this input")
    return output


def model_mismatch(model: nn.Module, x: torch.Tensor, err: BaseException) -> ModelError | None:
    """A :class:`ModelError` explaining ``err`` when it is the model rejecting ``x``'s shape.

    ``err`` was raised while ``model`` ran on ``x`` (or on a batch derived from it). The
    traceback names the innermost layer of ``model`` that failed and the input it got; a
    convolution that got another number of spatial axes (a 3D volume in a 2D model) or
    channels, a linear layer that got another number of features (an input size the
    model was not built for) or a normalization layer of the other dimension is
    explained with the layer's name. Returns None for anything else (a bug in the model
    or in trustmap), which the caller lets through.
    """
    if isinstance(err, TrustmapError) or not isinstance(err, (RuntimeError, ValueError)):
        return None
    names = {id(m): name for name, m in model.named_modules()}
    layer, got = None, None
    tb = err.__traceback__
    while tb is not None:
        local = tb.tb_frame.f_locals
        module = local.get("self")
        if isinstance(module, nn.Module) and id(module) in names:
            value = local.get("input", local.get("x"))
            if isinstance(value, torch.Tensor):
                layer, got = module, value
        tb = tb.tb_next
    if layer is None or got is None:
        return None
    where = f"layer {names[id(layer)] or '(the model itself)'!r} ({type(layer).__name__})"
    given = f"x of shape {tuple(x.shape)} ({x.ndim - 2}D, {x.shape[1]} channel(s))"
    dims = _layer_dims(layer)
    if dims is not None and got.ndim != dims + 2:
        return ModelError(
            f"the model is {dims}D ({where} takes (B, C, {_axes(dims)})) but the input is "
            f"{given}; use a {got.ndim - 2}D model or a {dims}D image"
        )
    if isinstance(layer, nn.modules.conv._ConvNd) and got.shape[1] != layer.in_channels:
        first = tuple(got.shape) == tuple(x.shape)
        hint = f"; the model takes images with {layer.in_channels} channel(s)" if first else ""
        return ModelError(
            f"{where} expects {layer.in_channels} input channel(s) but gets {got.shape[1]} "
            f"from {given}{hint}"
        )
    if isinstance(layer, nn.Linear) and got.shape[-1] != layer.in_features:
        return ModelError(
            f"{where} expects {layer.in_features} features but gets {got.shape[-1]} from "
            f"{given}; the model was probably built for another image size"
        )
    return None


def _layer_dims(layer: nn.Module) -> int | None:
    """Spatial axes a convolution, pooling or normalization layer takes, or None."""
    for dims, kinds in _DIMS.items():
        if isinstance(layer, kinds):
            return dims
    return None


def _axes(dims: int) -> str:
    return "H, W" if dims == 2 else "D, H, W" if dims == 3 else "L"


_DIMS: dict[int, tuple[type[nn.Module], ...]] = {
    2: (nn.Conv2d, nn.ConvTranspose2d, nn.BatchNorm2d, nn.MaxPool2d, nn.AvgPool2d),
    3: (nn.Conv3d, nn.ConvTranspose3d, nn.BatchNorm3d, nn.MaxPool3d, nn.AvgPool3d),
}


def positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{name} must be a positive integer, got {value!r}")
    return value


def choice(name: str, value: object, options: tuple[str, ...]) -> str:
    if value not in options:
        raise InputError(f"{name} must be one of {options}, got {value!r}")
    return value  # type: ignore[return-value]


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
