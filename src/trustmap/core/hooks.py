"""Context managers for every temporary change an explainer makes to a model.

Each change is undone on exit, also when the body raises: hooks are removed, the
training flags of all modules are restored, and nothing is left on the model.
"""

from __future__ import annotations

import contextlib
import difflib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch._ops import OpOverload
from torch.overrides import TorchFunctionMode
from torch.utils.hooks import RemovableHandle

from trustmap.core.script import OTHER_ACTIVATION_OPS, is_script_module, script_graph
from trustmap.core.validation import NotApplicableError


@contextlib.contextmanager
def model_guard(model: nn.Module) -> Iterator[nn.Module]:
    """Run the model in eval mode with gradients enabled, then restore every module's flag.

    Explanations are computed in eval mode so that BatchNorm and dropout behave as at
    inference and the map does not depend on the other samples of the batch.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.enable_grad():
            yield model
    finally:
        for module, flag in flags:
            module.training = flag


@contextlib.contextmanager
def hook_handles() -> Iterator[list[RemovableHandle]]:
    """Collect hook handles in a list; all are removed on exit."""
    handles: list[RemovableHandle] = []
    try:
        yield handles
    finally:
        for handle in handles:
            handle.remove()


def find_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule called ``name`` (as in ``model.named_modules()``)."""
    modules = dict(model.named_modules())
    if not isinstance(name, str):
        raise TypeError(f"layer must be a module name (str), got {type(name).__name__}")
    if name in modules and name != "":
        return modules[name]
    close = difflib.get_close_matches(name, [n for n in modules if n], n=3, cutoff=0.4)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    raise ValueError(f"the model has no layer named {name!r}{hint}")


@dataclass
class LayerCapture:
    """The output of one layer during a forward pass (its last call if it runs twice)."""

    module: nn.Module
    outputs: list[torch.Tensor] = field(default_factory=list)
    replace: Callable[[torch.Tensor], torch.Tensor] | None = None

    @property
    def output(self) -> torch.Tensor:
        if not self.outputs:
            raise RuntimeError("the layer was not called during the forward pass")
        return self.outputs[-1]


@contextlib.contextmanager
def capture_layer(
    module: nn.Module,
    replace: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Iterator[LayerCapture]:
    """Record a layer's output; optionally replace it for the rest of the forward pass.

    The recorded tensor is handed on as a clone, so an in-place operation downstream
    (``ReLU(inplace=True)``) cannot overwrite the activations a CAM method reads, and
    gradients with respect to the recorded tensor still flow.
    """
    capture = LayerCapture(module=module, replace=replace)

    def hook(_mod: nn.Module, _inputs: Any, output: Any) -> torch.Tensor:
        if not isinstance(output, torch.Tensor):
            raise TypeError(
                f"layer {type(_mod).__name__} returns {type(output).__name__}; "
                "pick a layer that returns a tensor"
            )
        if capture.replace is not None:
            output = capture.replace(output)
        capture.outputs.append(output)
        return output.clone()

    with hook_handles() as handles:
        handles.append(module.register_forward_hook(hook))
        yield capture


# ----------------------------------------------------------------------------------------
# Modified ReLU backward passes (DeconvNet, guided backprop)
# ----------------------------------------------------------------------------------------

_RELU_FUNCS: set[Any] = {
    torch.relu,
    torch.nn.functional.relu,
    torch.Tensor.relu,
}
_RELU_INPLACE_FUNCS: set[Any] = {
    torch.relu_,
    torch.nn.functional.relu_,
    torch.Tensor.relu_,
}
# Hidden-layer activations whose backward pass DeconvNet and guided backprop do not
# define. Calling one of them under :func:`modified_relu` raises.
_OTHER_ACTIVATIONS: dict[Any, str] = {
    torch.nn.functional.gelu: "GELU",
    torch.nn.functional.silu: "SiLU",
    torch.nn.functional.elu: "ELU",
    torch.nn.functional.leaky_relu: "LeakyReLU",
    torch.nn.functional.prelu: "PReLU",
    torch.nn.functional.softplus: "Softplus",
    torch.nn.functional.mish: "Mish",
    torch.nn.functional.hardswish: "Hardswish",
    torch.nn.functional.selu: "SELU",
    torch.nn.functional.celu: "CELU",
    torch.nn.functional.rrelu: "RReLU",
    torch.nn.functional.relu6: "ReLU6",
    torch.nn.functional.hardtanh: "Hardtanh",
}


def _relu_backward(rule: str, grad: torch.Tensor, forward_positive: torch.Tensor) -> torch.Tensor:
    if rule == "guided":
        return grad.clamp(min=0) * forward_positive
    if rule == "deconvnet":
        return grad.clamp(min=0)
    raise ValueError(f"unknown ReLU rule {rule!r}")


class _ReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, rule: str) -> torch.Tensor:
        out = x.clamp(min=0)
        ctx.rule = rule
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (out,) = ctx.saved_tensors
        return _relu_backward(ctx.rule, grad, (out > 0).to(grad.dtype)), None


class _ReLUInplace(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, rule: str) -> torch.Tensor:
        x.clamp_(min=0)
        ctx.mark_dirty(x)
        ctx.rule = rule
        ctx.save_for_backward(x)
        return x

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (out,) = ctx.saved_tensors
        return _relu_backward(ctx.rule, grad, (out > 0).to(grad.dtype)), None


class _ModifiedReLUMode(TorchFunctionMode):
    """Intercepts every ReLU call, whether through ``nn.ReLU`` (in place or not), a module
    reused several times, or ``F.relu``/``torch.relu`` inside ``forward``."""

    def __init__(self, rule: str, method: str) -> None:
        super().__init__()
        self.rule = rule
        self.method = method
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        # A torch.export program calls the ATen operators themselves (aten.relu.default).
        aten = f"aten::{func.overloadpacket.__name__}" if isinstance(func, OpOverload) else None
        if aten in ("aten::relu", "aten::relu_"):
            x = args[0]
            self.calls += 1
            if not x.requires_grad:
                return func(*args, **kwargs)
            if aten == "aten::relu_" and not x.is_leaf:
                return _ReLUInplace.apply(x, self.rule)
            return _ReLU.apply(x, self.rule)
        if aten in OTHER_ACTIVATION_OPS:
            raise NotApplicableError(
                f"{self.method} is defined for ReLU networks only, but the model calls "
                f"{OTHER_ACTIVATION_OPS[aten]}; use 'gradient', 'integrated_gradients' or a "
                "CAM method for this model"
            )
        if func in _RELU_FUNCS or func in _RELU_INPLACE_FUNCS:
            x = args[0]
            inplace = func in _RELU_INPLACE_FUNCS or bool(kwargs.get("inplace", False))
            if len(args) > 1 and func is torch.nn.functional.relu:
                inplace = bool(args[1])
            self.calls += 1
            if not x.requires_grad:
                return func(*args, **kwargs)
            if inplace and not x.is_leaf:
                return _ReLUInplace.apply(x, self.rule)
            return _ReLU.apply(x, self.rule)
        if func in _OTHER_ACTIVATIONS:
            raise NotApplicableError(
                f"{self.method} is defined for ReLU networks only, but the model calls "
                f"{_OTHER_ACTIVATIONS[func]}; use 'gradient', 'integrated_gradients' or a CAM "
                "method for this model"
            )
        return func(*args, **kwargs)


@contextlib.contextmanager
def modified_relu(
    model: nn.Module, rule: str, method: str
) -> Iterator[Callable[[torch.Tensor], torch.Tensor]]:
    """Within the block, every ReLU back-propagates by ``rule`` ("guided" or "deconvnet").

    Yields the forward function to differentiate: the model itself (its ReLU calls are
    intercepted while the block runs) or, for a TorchScript model, a copy of its forward
    graph whose ReLUs call the rule's operator (:mod:`trustmap.core.script`). Raises a
    ValueError naming the activation if the model uses a hidden-layer activation other
    than ReLU.
    """
    if is_script_module(model):
        yield script_graph(model).relu_rule_forward(model, rule, method)
        return
    for name, module in model.named_modules():
        for cls, label in _ACTIVATION_MODULES.items():
            if isinstance(module, cls):
                raise NotApplicableError(
                    f"{method} is defined for ReLU networks only, but layer {name!r} is "
                    f"{label}; use 'gradient', 'integrated_gradients' or a CAM method"
                )
    with _ModifiedReLUMode(rule, method):
        yield model


_ACTIVATION_MODULES: dict[type, str] = {
    nn.GELU: "GELU",
    nn.SiLU: "SiLU",
    nn.ELU: "ELU",
    nn.LeakyReLU: "LeakyReLU",
    nn.PReLU: "PReLU",
    nn.Softplus: "Softplus",
    nn.Mish: "Mish",
    nn.Hardswish: "Hardswish",
    nn.SELU: "SELU",
    nn.CELU: "CELU",
    nn.RReLU: "RReLU",
    nn.ReLU6: "ReLU6",
}
