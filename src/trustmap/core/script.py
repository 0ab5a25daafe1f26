"""Reading and replacing a layer's output inside a TorchScript model.

A scripted or traced model (``torch.jit.script``, ``torch.jit.trace``, ``torch.jit.load``)
runs its forward pass in the TorchScript interpreter, which calls no Python hooks, so the
forward hooks the CAM methods use on an ``nn.Module`` are refused (scripted) or never run
(traced). Instead, the model's forward graph is copied and inlined; every node in it
records the chain of submodules it was called from (``Node.getModuleHierarchy``), so the
tensor a submodule returned can be found in the graph and

* added to the graph's outputs (:meth:`ScriptGraph.run` with ``outputs=``): the layer's
  activation, differentiable, as a forward hook would record it, or
* replaced by a tensor the caller passes in (:meth:`ScriptGraph.run_replacing`), as a
  forward hook that returns a new output would.

The model itself is never changed: the copy is compiled into a separate function that is
called with the model's own parameters. Only calls of a submodule at the top level of the
forward graph can be reached; a submodule that only runs inside a loop or an ``if`` of the
TorchScript code cannot, and gets an error naming it.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from trustmap.core.validation import NotApplicableError

_PART = re.compile(r"(\w+)\(([^()]*)\)")


def is_script_module(model: object) -> bool:
    """True for scripted, traced and loaded TorchScript modules."""
    return isinstance(model, torch.jit.ScriptModule)


def compiled_kind(model: nn.Module) -> str | None:
    """``"TorchScript"`` or ``"torch.export"`` when the model (or a submodule) runs compiled
    code rather than the Python modules it was built from; None for a plain module.

    Methods that attach rules to each layer type (LRP, DeepLIFT, PatternNet) cannot see
    the layers of such a model.
    """
    from torch.export.unflatten import InterpreterModule, UnflattenedModule

    for module in model.modules():
        if is_script_module(module):
            return "TorchScript"
        if isinstance(module, (InterpreterModule, UnflattenedModule, torch.fx.GraphModule)):
            return "torch.export"
    return None


@dataclass(frozen=True)
class ModuleCall:
    """Where the last call of one submodule sits in the inlined graph.

    ``end`` is the index (in the graph's top-level node list) of its last node, which
    orders the calls as their forward hooks would fire; ``calls`` counts how often the
    submodule runs in one forward pass.
    """

    name: str
    end: int
    calls: int
    output: Any  # torch._C.Value
    input: Any  # torch._C.Value or None


def _path(node: Any) -> tuple[str, ...]:
    """The submodule names a node was called from, e.g. ``("features", "norm5")``."""
    return tuple(
        name for name, _ in _PART.findall(node.getModuleHierarchy()) if name != "UNKNOWN_INSTANCE"
    )


def _is_tensor(value: Any) -> bool:
    return value.type().kind() == "TensorType"


def _analyse(graph: Any) -> dict[str, ModuleCall]:
    """Every submodule called at the graph's top level, with its last call's output."""
    nodes = list(graph.nodes())
    index = {id(n): i for i, n in enumerate(nodes)}
    top = graph.block()
    paths = [_path(n) for n in nodes]

    def top_index(node: Any) -> int:
        # A use inside an if/loop counts where that if/loop sits at the top level.
        while node.owningBlock() != top:
            node = node.owningBlock().owningNode()
        if node.kind() == "prim::Return":
            return len(nodes)
        return index[id(node)]

    # Runs of consecutive nodes per module path; nodes without a module (constants, an
    # ``if`` the inliner left unattributed) do not interrupt a run.
    runs: dict[tuple[str, ...], list[list[int]]] = {}
    open_run: dict[tuple[str, ...], list[int]] = {}
    for i, path in enumerate(paths):
        if not path:
            continue
        prefixes = {path[:k] for k in range(1, len(path) + 1)}
        for prefix in list(open_run):
            if prefix not in prefixes:
                runs.setdefault(prefix, []).append(open_run.pop(prefix))
        for prefix in prefixes:
            if prefix in open_run:
                open_run[prefix][1] = i
            else:
                open_run[prefix] = [i, i]
    for prefix, run in open_run.items():
        runs.setdefault(prefix, []).append(run)

    calls: dict[str, ModuleCall] = {}
    for prefix, spans in runs.items():
        start, end = spans[-1]
        output = None
        first_input = None
        for i in range(start, end + 1):
            node = nodes[i]
            for value in node.inputs():
                producer = value.node()
                if (
                    first_input is None
                    and _is_tensor(value)
                    and producer.kind() not in ("prim::Param", "prim::GetAttr", "prim::Constant")
                    and producer.owningBlock() == top
                    and index.get(id(producer), end + 1) < start
                ):
                    first_input = value
            for value in node.outputs():
                if _is_tensor(value) and any(top_index(u.user) > end for u in value.uses()):
                    output = value
        if first_input is None:
            # The graph's own input (the image) feeds the first layers.
            inputs = [v for v in graph.inputs() if _is_tensor(v)]
            if inputs and any(start <= top_index(u.user) <= end for u in inputs[0].uses()):
                first_input = inputs[0]
        if output is not None:
            calls[".".join(prefix)] = ModuleCall(
                ".".join(prefix), end, len(spans), output, first_input
            )
    return calls


class ScriptGraph:
    """The inlined forward graph of one TorchScript model; see the module docstring."""

    def __init__(self, model: nn.Module) -> None:
        graph = model.graph.copy()
        torch._C._jit_pass_inline(graph)
        self._graph = graph
        modules = {name for name, _ in model.named_modules() if name}
        self._calls = {k: v for k, v in _analyse(graph).items() if k in modules}
        self._functions: dict[tuple[Any, ...], Any] = {}

    @property
    def calls(self) -> dict[str, ModuleCall]:
        return self._calls

    def call(self, name: str) -> ModuleCall:
        """The last call of submodule ``name``; ValueError if it cannot be reached."""
        if name not in self._calls:
            raise NotApplicableError(
                f"layer {name!r} of this TorchScript model cannot be read: it returns no "
                "tensor at the top level of the forward graph (it runs inside a loop or an "
                "'if' of the TorchScript code, or not at all); pick another layer"
            )
        return self._calls[name]

    def run(
        self,
        model: nn.Module,
        x: torch.Tensor,
        outputs: Sequence[str] = (),
        inputs_of: Sequence[str] = (),
    ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """``(model(x), [output of each name in outputs], [input of each in inputs_of])``.

        The recorded outputs are the tensors the layers returned, cloned before the rest of
        the network sees them (an in-place ReLU downstream cannot overwrite them), and
        gradients with respect to them flow.
        """
        key = ("run", tuple(outputs), tuple(inputs_of))
        if key not in self._functions:
            self._functions[key] = self._compile_run(outputs, inputs_of)
        result = self._functions[key](model._c, x)
        n = len(outputs)
        return result[0], list(result[1 : 1 + n]), list(result[1 + n :])

    def run_replacing(self, model: nn.Module, x: torch.Tensor, name: str, value: torch.Tensor):
        """``model(x)`` with the output of layer ``name`` (its last call) replaced by
        ``value``."""
        key = ("replace", name)
        if key not in self._functions:
            graph = self._graph.copy()
            call = _analyse(graph)[name]
            new = graph.addInput()
            new.setType(call.output.type())
            call.output.replaceAllUsesAfterNodeWith(list(graph.nodes())[call.end], new)
            self._functions[key] = torch._C._create_function_from_graph(
                f"trustmap_replace_{len(self._functions)}", graph
            )
        return self._functions[key](model._c, x, value)

    def relu_rule_forward(self, model: nn.Module, rule: str, method: str) -> ForwardFn:
        """The model's forward pass with every ReLU back-propagating by ``rule``
        (``"guided"`` or ``"deconvnet"``, see :func:`trustmap.core.hooks.modified_relu`).

        Each ``aten::relu``/``aten::relu_`` node of the graph copy (also inside loops and
        branches) becomes a call of the ``trustmap::relu_rule`` operator, whose forward pass
        is the ReLU and whose backward pass is the rule. ValueError if the graph calls
        another hidden-layer activation, whose backward pass neither rule defines.
        """
        key = ("relu", rule)
        if key not in self._functions:
            graph = self._graph.copy()
            for kind, label in OTHER_ACTIVATION_OPS.items():
                if graph.findAllNodes(kind):
                    raise NotApplicableError(
                        f"{method} is defined for ReLU networks only, but the model calls "
                        f"{label}; use 'gradient', 'integrated_gradients' or a CAM method"
                    )
            code = _RELU_RULES[rule]
            _relu_rule_op()
            for node in [*graph.findAllNodes("aten::relu"), *graph.findAllNodes("aten::relu_")]:
                with graph.insert_point_guard(node):
                    constant = graph.insertConstant(code)
                new = graph.create("trustmap::relu_rule", [node.input(), constant])
                new.insertAfter(node)
                new.output().setType(node.output().type())
                node.output().replaceAllUsesWith(new.output())
                node.destroy()
            self._functions[key] = torch._C._create_function_from_graph(
                f"trustmap_relu_{rule}", graph
            )
        function = self._functions[key]
        return lambda x: function(model._c, x)

    def _compile_run(self, outputs: Sequence[str], inputs_of: Sequence[str]) -> Any:
        graph = self._graph.copy()
        calls = _analyse(graph)
        for name in (*outputs, *inputs_of):
            if name not in calls:
                self.call(name)  # raises with the message
        values = []
        for name in outputs:
            out = calls[name].output
            # Downstream nodes read a clone, so the recorded tensor stays as the layer
            # returned it.
            with graph.insert_point_guard(out.node()):
                none = graph.insertConstant(None)
            clone = graph.create("aten::clone", [out, none])
            clone.insertAfter(out.node())
            clone.output().setType(out.type())
            out.replaceAllUsesAfterNodeWith(clone, clone.output())
            values.append(out)
        for name in inputs_of:
            value = calls[name].input
            if value is None:
                raise ValueError(f"the input of layer {name!r} cannot be read in this model")
            values.append(value)
        for value in values:
            graph.registerOutput(value)
        graph.makeMultiOutputIntoTuple()
        return torch._C._create_function_from_graph(f"trustmap_run_{len(self._functions)}", graph)


_RELU_RULES = {"guided": 0, "deconvnet": 1}
OTHER_ACTIVATION_OPS = {
    "aten::gelu": "GELU",
    "aten::silu": "SiLU",
    "aten::silu_": "SiLU",
    "aten::elu": "ELU",
    "aten::elu_": "ELU",
    "aten::leaky_relu": "LeakyReLU",
    "aten::leaky_relu_": "LeakyReLU",
    "aten::prelu": "PReLU",
    "aten::softplus": "Softplus",
    "aten::mish": "Mish",
    "aten::hardswish": "Hardswish",
    "aten::hardswish_": "Hardswish",
    "aten::selu": "SELU",
    "aten::celu": "CELU",
    "aten::rrelu": "RReLU",
    "aten::relu6": "ReLU6",
    "aten::hardtanh": "Hardtanh",
    "aten::hardtanh_": "Hardtanh",
}
_OP: list[Any] = []


def _relu_rule_op() -> Any:
    """The ``trustmap::relu_rule(x, rule)`` operator, defined on first use.

    Forward: ``max(x, 0)``. Backward: ``max(g, 0) * 1[out > 0]`` for guided backprop
    (rule 0), ``max(g, 0)`` for DeconvNet (rule 1), as in :mod:`trustmap.core.hooks`.
    A registered operator, unlike a Python autograd function, can be called from a
    TorchScript graph.
    """
    if _OP:
        return _OP[0]

    @torch.library.custom_op("trustmap::relu_rule", mutates_args=())
    def relu_rule(x: torch.Tensor, rule: int) -> torch.Tensor:
        return x.clamp(min=0)

    @relu_rule.register_fake
    def _(x: torch.Tensor, rule: int) -> torch.Tensor:
        return torch.empty_like(x)

    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        ctx.rule = inputs[1]
        ctx.save_for_backward(output)

    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (out,) = ctx.saved_tensors
        grad = grad.clamp(min=0)
        if ctx.rule == _RELU_RULES["guided"]:
            grad = grad * (out > 0).to(grad.dtype)
        return grad, None

    relu_rule.register_autograd(backward, setup_context=setup_context)
    _OP.append(relu_rule)
    return relu_rule


_GRAPHS: weakref.WeakKeyDictionary[nn.Module, ScriptGraph] = weakref.WeakKeyDictionary()


def script_graph(model: nn.Module) -> ScriptGraph:
    """The (cached) :class:`ScriptGraph` of a TorchScript model."""
    graph = _GRAPHS.get(model)
    if graph is None:
        graph = ScriptGraph(model)
        _GRAPHS[model] = graph
    return graph


def module_type(module: nn.Module) -> str:
    """The class name of a submodule; for TorchScript submodules their original class."""
    return getattr(module, "original_name", type(module).__name__)


ForwardFn = Callable[[torch.Tensor], torch.Tensor]
