"""Class activation mapping (Zhou et al. 2016)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from trustmap.core.base import Explainer
from trustmap.core.hooks import hook_handles
from trustmap.core.registry import register
from trustmap.core.script import is_script_module, module_type, script_graph
from trustmap.core.targets import Target, TargetSpec
from trustmap.core.validation import NotApplicableError
from trustmap.methods.cam._layer import LayerPass, finish, layer_pass, spatial_dims, weighted_sum


@contextlib.contextmanager
def _linear_calls(model: nn.Module) -> Iterator[list[tuple[nn.Linear, torch.Tensor, torch.Tensor]]]:
    """Record ``(module, input, output)`` of every ``nn.Linear`` call in the block."""
    calls: list[tuple[nn.Linear, torch.Tensor, torch.Tensor]] = []

    def hook(module: nn.Module, inputs: Any, output: Any) -> None:
        if inputs and isinstance(inputs[0], torch.Tensor) and isinstance(output, torch.Tensor):
            calls.append((module, inputs[0].detach(), output.detach()))

    with hook_handles() as handles:
        for module in model.modules():
            if isinstance(module, nn.Linear):
                handles.append(module.register_forward_hook(hook))
        yield calls


def _script_linear_calls(
    model: nn.Module, x: torch.Tensor
) -> list[tuple[nn.Module, torch.Tensor, torch.Tensor]]:
    """:func:`_linear_calls` for a TorchScript model, read from its forward graph."""
    graph = script_graph(model)
    modules = dict(model.named_modules())
    names = [
        n
        for n, c in sorted(graph.calls.items(), key=lambda item: item[1].end)
        if module_type(modules[n]) == "Linear" and c.input is not None
    ]
    with torch.no_grad():
        _, outputs, inputs = graph.run(model, x, outputs=names, inputs_of=names)
    return [(modules[n], i, o) for n, i, o in zip(names, inputs, outputs)]


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    scale = float(b.abs().max()) if b.numel() else 0.0
    return bool(torch.allclose(a, b, rtol=1e-4, atol=1e-6 * (1.0 + scale)))


def head_weights(
    calls: list[tuple[nn.Linear, torch.Tensor, torch.Tensor]], lp: LayerPass
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weights (B, K), features (B, K, *s))``: the row of the linear layer that maps the
    globally pooled features to the target score, and those features; ValueError if the
    model's head is not of that form.

    The features are the layer's output ``A`` or, when a functional ReLU sits between the
    layer and the pooling (``F.relu`` inside ``forward``, as in torchvision's DenseNet),
    ``ReLU(A)``: no module outputs that tensor, and it is what the pooling averages.
    """
    act, output, target = lp.activation, lp.output, lp.target
    if target.kind not in ("class", "binary"):
        raise ValueError(
            f"cam explains a class score of a classifier; {target.kind} targets are not "
            "supported: use 'grad_cam'"
        )
    b, k = act.shape[:2]
    dims = spatial_dims(act)
    out_flat = output.reshape(b, -1)
    for linear, inp, out in reversed(calls):
        if tuple(inp.shape) != (b, k) or tuple(out.reshape(b, -1).shape) != out_flat.shape:
            continue
        if not _close(target.scores(out.reshape(output.shape)), target.scores(output)):
            continue
        for features in (act, act.clamp(min=0)):
            pooled = (features.mean(dim=dims), features.amax(dim=dims))
            if not any(_close(inp, p) for p in pooled):
                continue
            weight = linear.weight.detach().to(act.dtype)
            if target.kind == "binary":
                signs = target.signs.to(act.device, act.dtype).unsqueeze(1)
                return weight[0].unsqueeze(0) * signs, features
            return weight[target.classes.to(weight.device)], features
    raise NotApplicableError(
        f"cam needs layer {lp.layer!r} (output {tuple(act.shape)}) to be followed by "
        "global average (or max) pooling and one linear layer whose output is the "
        "model's score (Zhou et al. 2016); this model's head is different. Use "
        "'grad_cam', which generalises CAM to any head (if the pooled feature map has a "
        "single position at this input size, CAM has no spatial resolution: use a larger "
        "input)"
    )


@register(
    "cam",
    family="cam",
    summary="linear-head weights times the pooled feature map, sum_k w_k^c A_k (signed)",
    paper="Zhou et al. 2016, Learning deep features for discriminative localization",
    output="single",
)
class CAM(Explainer):
    """CAM: ``M_c = sum_k w_k^c A_k`` with ``w^c`` the row of the final linear layer for
    class ``c`` (eq. 2), signed, bias excluded.

    Only defined for a head of global average (or max) pooling followed by one linear
    layer producing the score; the head is detected on the forward pass (the linear
    layer's input must equal the pooled layer output, its output the model's output), and
    anything else raises a ValueError pointing to Grad-CAM. A functional ReLU between the
    layer and the pooling is recognised; the map then weights ``ReLU(A)``. When the
    pooling reads the layer directly, ``CAM = N * Grad-CAM`` before rectification (``N``
    positions of the layer). For a single-logit model, target 0 uses the negated weights.
    Region and callable targets are not supported. One forward pass, no gradient.

    Parameters
    ----------
    layer:
        Layer name; None picks the last spatial feature map, the one that feeds the
        global pooling.
    """

    def __init__(self, model: nn.Module, *, layer: str | None = None) -> None:
        self.model = model
        self.layer = layer

    def attribute(
        self, x: torch.Tensor, target: TargetSpec | Target
    ) -> tuple[torch.Tensor, torch.Tensor, Target, dict[str, Any]]:
        if is_script_module(self.model):
            lp = layer_pass(self, x, target, self.layer, gradient=False)
            calls = _script_linear_calls(self.model, x)
        else:
            with _linear_calls(self.model) as calls:
                lp = layer_pass(self, x, target, self.layer, gradient=False)
        weights, features = head_weights(calls, lp)
        cam = weighted_sum(weights, features)
        return finish(cam, x, relu=False), lp.output, lp.target, lp.extra
