"""Checks on what users pass in, with errors that name the problem."""

from __future__ import annotations

import torch
from torch import nn


class NotApplicableError(ValueError):
    """The method cannot explain this model (a TorchScript model for a method that needs
    its Python modules, a head CAM cannot read, an activation guided backprop does not
    define). ``trustmap explain`` reports it as one "skipped" line per method and goes on
    with the others."""


class TrustmapWarning(UserWarning):
    """The result is computed but is probably not what the user wants (random weights, an
    input far outside the training range, a CAM layer of 2 x 2 positions). The command
    line prints each one as a line starting with ``warning:``."""


def check_input(x: object) -> torch.Tensor:
    """Validate an image batch and return a detached copy the caller cannot see mutated.

    ``x`` must be a floating tensor of shape ``(B, C, H, W)`` or ``(B, C, D, H, W)``
    without NaN or Inf.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(
            f"x must be a torch.Tensor of shape (B, C, H, W) or (B, C, D, H, W), "
            f"got {type(x).__name__}"
        )
    if x.ndim not in (4, 5):
        raise ValueError(
            f"x must have shape (B, C, H, W) or (B, C, D, H, W); got {x.ndim} dimensions "
            f"{tuple(x.shape)}. Add the batch and channel axes, e.g. x[None, None]"
        )
    if not x.is_floating_point():
        raise TypeError(f"x must be float32 or float64, got {_name(x.dtype)}; use x.float()")
    if x.numel() == 0:
        raise ValueError(f"x is empty: shape {tuple(x.shape)}")
    finite = torch.isfinite(x)
    if not bool(finite.all()):
        n_nan = int(torch.isnan(x).sum())
        n_inf = int((~finite).sum()) - n_nan
        raise ValueError(f"x contains {n_nan} NaN and {n_inf} Inf values")
    return x.detach().clone()


def check_model_matches(model: nn.Module, x: torch.Tensor) -> None:
    """Raise if ``model`` is not a module, or ``x`` and its parameters disagree on device
    or dtype."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    param = next(iter(model.parameters()), None)
    if param is None:
        return
    if param.device != x.device:
        raise ValueError(
            f"x is on {x.device} but the model's parameters are on {param.device}; move one of them"
        )
    if param.is_floating_point() and param.dtype != x.dtype:
        raise TypeError(
            f"x is {_name(x.dtype)} but the model's parameters are {_name(param.dtype)}; "
            "convert one of "
            "them (x.to(dtype) or model.to(dtype))"
        )


def check_output(output: object, batch: int) -> torch.Tensor:
    """The model's output must be a finite tensor with one row per sample."""
    if not isinstance(output, torch.Tensor):
        raise TypeError(
            f"the model must return a tensor, got {type(output).__name__}; wrap the model so "
            "that it returns the logits"
        )
    if output.ndim == 0 or output.shape[0] != batch:
        raise ValueError(
            f"the model returned shape {tuple(output.shape)} for a batch of {batch}; "
            "expected one row per sample"
        )
    if not bool(torch.isfinite(output).all()):
        raise ValueError("the model's output contains NaN or Inf for this input")
    return output


def positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def non_negative_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return value


def choice(name: str, value: object, options: tuple[str, ...]) -> str:
    if value not in options:
        raise ValueError(f"{name} must be one of {options}, got {value!r}")
    return value  # type: ignore[return-value]


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
