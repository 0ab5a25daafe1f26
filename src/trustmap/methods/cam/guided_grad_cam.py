"""Guided Grad-CAM (Selvaraju et al. 2017)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from trustmap.core.base import Explainer
from trustmap.core.batching import input_gradient
from trustmap.core.hooks import modified_relu
from trustmap.core.registry import register
from trustmap.core.targets import Target, TargetSpec
from trustmap.core.validation import check_output
from trustmap.methods.cam._layer import finish, gradient_cam
from trustmap.methods.cam.grad_cam import grad_cam_map


@register(
    "guided_grad_cam",
    family="cam",
    summary="guided backprop times the upsampled Grad-CAM map, per input channel",
    paper="Selvaraju et al. 2017, Grad-CAM: visual explanations from deep networks via "
    "gradient-based localization",
    output="input",
)
class GuidedGradCAM(Explainer):
    """Guided Grad-CAM: ``A = GB(x) * up(ReLU(sum_k w_k A_k))``, the guided-backprop
    gradient (one map per input channel) times the Grad-CAM map upsampled to ``x``'s
    size and broadcast over channels (section 3.1).

    Two forward and two backward passes: Grad-CAM needs the true gradient at the layer,
    guided backprop a modified one at the input. They cannot share a pass in general:
    the gradient at the layer also passes through every ReLU *after* the layer (in the
    head, or DenseNet's final ReLU when an earlier layer is chosen), which guided mode
    would change. The target is resolved on the first pass and reused on the second.

    ReLU networks only (see :class:`~trustmap.methods.gradient.guided_backprop.GuidedBackprop`).

    Parameters
    ----------
    layer:
        Layer name; None picks the last spatial feature map (see
        :class:`~trustmap.methods.cam.grad_cam.GradCAM`).
    """

    def __init__(self, model: nn.Module, *, layer: str | None = None) -> None:
        self.model = model
        self.layer = layer

    def attribute(
        self, x: torch.Tensor, target: TargetSpec | Target
    ) -> tuple[torch.Tensor, torch.Tensor, Target, dict[str, Any]]:
        cam, lp = gradient_cam(self, x, target, self.layer, grad_cam_map)
        with modified_relu(self.model, "guided", self.name) as forward:
            guided, _ = input_gradient(lambda t: check_output(forward(t), t.shape[0]), x, lp.target)
        return guided * finish(cam, x, relu=True), lp.output, lp.target, lp.extra
