"""Ablation-CAM (Desai and Ramaswamy 2020)."""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from trustmap.core.base import Explainer
from trustmap.core.batching import chunks
from trustmap.core.hooks import capture_layer
from trustmap.core.registry import register
from trustmap.core.targets import Target, TargetSpec
from trustmap.methods.cam._layer import (
    LayerPass,
    check_batch_size,
    check_flag,
    finish,
    layer_pass,
    safe_divide,
    weighted_sum,
)

#: PyTorch's messages for tensors whose sizes do not fit together (torch.cat, broadcasting,
#: matrix products, reshapes).
_SHAPE_ERROR = re.compile(r"\bsizes?\b|\bshapes?\b", re.IGNORECASE)


class _ShapeMismatch(RuntimeError):
    """The layers after the ablated one did not keep the expanded batch apart."""


def ablated_scores(
    model: nn.Module,
    x1: torch.Tensor,
    lp: LayerPass,
    sample: int,
    channels: torch.Tensor,
    *,
    expand: bool,
) -> torch.Tensor:
    """Target score of sample ``sample`` (``x1``, a batch of one) with channel
    ``channels[j]`` of the layer zeroed in row ``j``, ``(n,)``.

    ``expand=True`` runs the layers before the ablated one once and turns the layer's
    output into ``n`` ablated copies; ``expand=False`` runs the whole model on ``n``
    copies of ``x1``. Only the layer's last call in the forward pass is ablated, the one
    the activations were read from.
    """
    n = len(channels)
    calls = 0

    def ablate(out: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        if calls != lp.calls:
            return out
        drop = torch.zeros((n, out.shape[1]), dtype=torch.bool, device=out.device)
        drop[torch.arange(n, device=out.device), channels.to(out.device)] = True
        drop = drop.reshape(n, out.shape[1], *([1] * (out.ndim - 2)))
        rows = out.expand(n, *out.shape[1:]) if expand else out
        return rows.masked_fill(drop, 0)

    inputs = x1 if expand else x1.expand(n, *x1.shape[1:])
    with torch.no_grad(), capture_layer(lp.module, replace=ablate):
        output = model(inputs)
    if not isinstance(output, torch.Tensor) or output.ndim == 0 or output.shape[0] != n:
        shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output)
        raise _ShapeMismatch(f"expected {n} output rows, got {shape}")
    rows_of = torch.full((n,), sample, dtype=torch.long, device=output.device)
    return lp.target.scores(output, rows_of)


def ablation_cam_weights(
    model: nn.Module, x: torch.Tensor, lp: LayerPass, batch_size: int
) -> tuple[torch.Tensor, bool]:
    """``w_k = (y - y_k) / y``, ``(B, K)``, and whether the fast (expanded) path ran."""
    b, k = lp.activation.shape[:2]
    y = lp.target.scores(lp.output).to(lp.activation.dtype)
    ablated = torch.empty((b, k), dtype=y.dtype, device=x.device)
    fast = True
    for i in range(b):
        for sl in chunks(k, batch_size):
            channels = torch.arange(sl.start, sl.stop, device=x.device)
            x1 = x[i : i + 1]
            if fast:
                try:
                    ablated[i, sl] = ablated_scores(model, x1, lp, i, channels, expand=True)
                    continue
                except RuntimeError as err:
                    # E.g. a skip connection concatenated after the layer with a tensor
                    # computed before it (still of batch 1): recompute everything per row.
                    # Only such shape errors; any other error is the model's own, and
                    # running the batch again would hide it.
                    if not isinstance(err, _ShapeMismatch) and not _SHAPE_ERROR.search(str(err)):
                        raise
                    fast = False
            ablated[i, sl] = ablated_scores(model, x1, lp, i, channels, expand=False)
    return safe_divide(y.unsqueeze(1) - ablated, y.unsqueeze(1)), fast


@register(
    "ablation_cam",
    family="cam",
    summary="channels weighted by the relative drop of the score when each is zeroed, "
    "gradient-free",
    paper="Desai and Ramaswamy 2020, Ablation-CAM: visual explanations for deep "
    "convolutional network via gradient-free localization",
    output="single",
)
class AblationCAM(Explainer):
    """Ablation-CAM: ``M = ReLU(sum_k w_k A_k)``, ``w_k = (y - y_k) / y`` where ``y_k``
    is the score with channel ``k`` of the layer set to zero (eq. 3).

    Cost: ``K`` ablated evaluations per image, ``batch_size`` at a time. The layers before
    the ablated one run once per chunk on the single image: its output is expanded into
    the ablated copies inside a forward hook. If the rest of the network cannot take that
    expanded batch (a concatenation with an earlier tensor raises a shape error, or the
    output has the wrong number of rows), the whole model is run on repeated copies of
    the image instead; both give the same weights. ``y`` near 0 makes the weights large;
    a dtype epsilon with the sign of ``y`` only keeps ``y = 0`` finite.

    Parameters
    ----------
    layer:
        Layer name; None picks the last spatial feature map (see
        :class:`~trustmap.methods.cam.grad_cam.GradCAM`).
    relu:
        Rectify the map; False returns the signed map.
    batch_size:
        Channels ablated per forward pass (None: 64).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        layer: str | None = None,
        relu: bool = True,
        batch_size: int | None = None,
    ) -> None:
        self.model = model
        self.layer = layer
        self.relu = relu
        self.batch_size = batch_size

    def attribute(
        self, x: torch.Tensor, target: TargetSpec | Target
    ) -> tuple[torch.Tensor, torch.Tensor, Target, dict[str, Any]]:
        relu = check_flag("relu", self.relu)
        batch_size = check_batch_size(self.batch_size, 64)
        lp = layer_pass(self, x, target, self.layer, gradient=False)
        weights, _ = ablation_cam_weights(self.model, x, lp, batch_size)
        cam = weighted_sum(weights, lp.activation)
        return finish(cam, x, relu), lp.output, lp.target, lp.extra
