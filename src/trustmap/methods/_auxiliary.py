"""Running a network that a method needs besides the explained model (counterfactual
generators, an autoencoder) on the explained input."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from trustmap.core.hooks import model_guard
from trustmap.errors import ModelError, ModelTypeError

Net = Callable[[torch.Tensor], torch.Tensor]


def run_auxiliary(net: Net, x: torch.Tensor, name: str, *, trained_for: str) -> torch.Tensor:
    """``net(x)`` without gradients, in ``net``'s eval mode (restored after), returned in
    ``x``'s dtype and on ``x``'s device.

    A module runs on its own device and dtype (``x`` is converted there). The output
    must be a finite tensor of ``x``'s shape; a convolution that meets the wrong channel
    count or rank, a wrong output shape or NaN raise a ValueError naming ``name`` and
    saying that it was ``trained_for`` something else (e.g. "the generators were trained").
    """
    guard: Any = contextlib.nullcontext()
    xin = x
    if isinstance(net, nn.Module):
        param = next((p for p in net.parameters() if p.is_floating_point()), None)
        if param is not None:
            xin = x.to(device=param.device, dtype=param.dtype)
        guard = model_guard(net)
    try:
        with guard, torch.no_grad():
            out = net(xin)
    except RuntimeError as err:
        # A convolution that meets the wrong channel count or rank fails deep in torch.
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ModelError(
            f"{name} cannot process x of shape {tuple(x.shape)} ({first}); {trained_for} for "
            "another channel count or dimensionality"
        ) from err
    if not isinstance(out, torch.Tensor):
        raise ModelTypeError(f"{name} must return a tensor, got {type(out).__name__}")
    if tuple(out.shape) != tuple(x.shape):
        raise ModelError(
            f"{name} returned shape {tuple(out.shape)} for x of shape {tuple(x.shape)}; "
            f"{trained_for} for another image size or channel count"
        )
    if not bool(torch.isfinite(out).all()):
        raise ModelError(f"{name} returned NaN or Inf for this input")
    return out.to(device=x.device, dtype=x.dtype)
