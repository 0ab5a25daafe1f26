"""The LRP engine: relevance from one forward and one backward pass.

Relevance is carried in the *x-times-gradient* form: every tensor ``t`` of the forward
pass holds the relevance ``R_t = t * g_t``, where ``g_t`` is a modified gradient. Three
facts make this form fit real networks:

* ops that are positively homogeneous of degree 1 (ReLU, leaky ReLU, max pooling,
  reshapes, concatenation, multiplication by a constant) pass relevance through unchanged
  with their ordinary gradient: ``R_in = x * f'(x) g = f(x) g = R_out``;
* an addition ``z = a + b`` with its ordinary gradient gives ``R_a = a g = a / z R_z``,
  the proportional split (canonizer: stabilised by ``eps``);
* a layer with a rule (convolution, dense layer, average pooling) is replaced by an
  autograd function whose backward pass returns ``g_a = sum c W'^T (R / stab(z'))`` (see
  :mod:`._rules`), so that ``a * g_a`` is the rule's input relevance.

The forward pass runs under a :class:`~torch.overrides.TorchFunctionMode` that sees every
torch call of the model, ``torch.cat``, ``+`` and ``F.relu`` inside ``forward`` included.
It attaches the rules, folds BatchNorm into its neighbouring layer (in the backward pass
only, see :mod:`._canonizers`), and raises an error naming the layer for every op through
which relevance cannot be propagated: non-homogeneous activations (GELU, sigmoid,
tanh, ...), products of two activations (attention, gating), data-dependent
normalisation (LayerNorm, GroupNorm, batch statistics), recurrent layers and anything
else it does not know. The parameters stop requiring grad during the pass (restored on
exit), so "requires grad" means "depends on the input".

Nothing is written into the model; hooks go through :func:`~trustmap.core.hooks.hook_handles`
and are removed on exit, also on error.
"""

from __future__ import annotations

import contextlib
import sys
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from trustmap.core.hooks import hook_handles
from trustmap.core.targets import resolve_target
from trustmap.core.validation import check_output
from trustmap.errors import ModelError
from trustmap.methods.relevance import _canonizers as canon
from trustmap.methods.relevance._composites import Composite
from trustmap.methods.relevance._rules import CONSTANT_INPUTS, Rule, Term, safe_divide

# ----------------------------------------------------------------------------------------
# Which torch functions are what
# ----------------------------------------------------------------------------------------


def _collect(owner: Any, names: Sequence[str]) -> set[Any]:
    return {getattr(owner, n) for n in names if hasattr(owner, n)}


_CONV = {torch.conv1d: 1, torch.conv2d: 2, torch.conv3d: 3}
_LINEAR = {F.linear}
_AVG_POOL = {
    F.avg_pool1d,
    F.avg_pool2d,
    F.avg_pool3d,
    F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d,
    F.adaptive_avg_pool3d,
}
_BATCH_NORM = {F.batch_norm}

_STRUCTURAL_NAMES = (
    "view",
    "view_as",
    "reshape",
    "reshape_as",
    "flatten",
    "unflatten",
    "squeeze",
    "unsqueeze",
    "permute",
    "transpose",
    "swapaxes",
    "t",
    "contiguous",
    "expand",
    "expand_as",
    "repeat",
    "narrow",
    "select",
    "split",
    "split_with_sizes",
    "tensor_split",
    "chunk",
    "unbind",
    "clone",
    "flip",
    "roll",
    "movedim",
    "moveaxis",
    "to",
    "float",
    "double",
    "half",
    "bfloat16",
    "type_as",
    "type",
    "cpu",
    "cuda",
)
# Reshapes and copies: replayable on the constant inputs of the input-layer rules.
_STRUCTURAL = (
    _collect(torch.Tensor, (*_STRUCTURAL_NAMES, "__getitem__"))
    | _collect(torch, _STRUCTURAL_NAMES)
    | {F.pad, F.interpolate, F.pixel_shuffle, F.pixel_unshuffle}
)
# Linear maps and identities (in eval mode) without a rule of their own: the ordinary
# gradient is LRP-0 for them.
_LINEAR_PASS = (
    _collect(torch, ("cat", "concat", "concatenate", "stack", "hstack", "vstack", "sum", "mean"))
    | _collect(torch, ("neg", "negative"))
    | _collect(torch.Tensor, ("sum", "mean", "neg", "negative", "__neg__", "__pos__"))
    | {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d}
    | {F.upsample, F.upsample_nearest, F.upsample_bilinear}
)
# Positively homogeneous of degree 1 (f(x) = x f'(x)): relevance passes unchanged.
_HOMOGENEOUS = (
    _collect(torch, ("relu", "relu_", "prelu", "abs", "amax", "amin", "max", "min"))
    | _collect(torch.Tensor, ("relu", "relu_", "abs", "abs_", "amax", "amin", "max", "min"))
    | {F.relu, F.relu_, F.leaky_relu, F.leaky_relu_, F.prelu}
    | {F.max_pool1d, F.max_pool2d, F.max_pool3d}
    | {F.max_pool1d_with_indices, F.max_pool2d_with_indices, F.max_pool3d_with_indices}
    | {F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d}
    | {
        F.adaptive_max_pool1d_with_indices,
        F.adaptive_max_pool2d_with_indices,
        F.adaptive_max_pool3d_with_indices,
    }
)
# In-place ops after which a saved layer output still gives the right relevance
# (out * g is unchanged where the ReLU's gradient is nonzero).
_RELU_INPLACE = _collect(torch, ("relu", "relu_")) | _collect(torch.Tensor, ("relu", "relu_"))
_RELU_INPLACE |= {F.relu, F.relu_}
# clamp(min=0) and threshold(x, t, 0) are ReLU-like (x times a mask); other bounds saturate.
_CLAMP = _collect(torch, ("clamp", "clamp_", "clamp_min", "clamp_min_", "clip", "clip_"))
_CLAMP |= _collect(torch.Tensor, ("clamp", "clamp_", "clamp_min", "clamp_min_", "clip", "clip_"))
_THRESHOLD = {F.threshold, F.threshold_}
_ADD = (
    _collect(torch, ("add", "sub", "subtract"))
    | _collect(
        torch.Tensor,
        ("add", "add_", "sub", "sub_", "subtract", "__add__", "__radd__", "__iadd__"),
    )
    | _collect(torch.Tensor, ("__sub__", "__rsub__", "__isub__"))
)
_MUL = (
    _collect(torch, ("mul", "multiply", "div", "divide", "true_divide"))
    | _collect(
        torch.Tensor,
        ("mul", "mul_", "multiply", "div", "div_", "divide", "true_divide"),
    )
    | _collect(torch.Tensor, ("__mul__", "__rmul__", "__imul__", "__truediv__", "__itruediv__"))
)
_DIVISIONS = _collect(torch, ("div", "divide", "true_divide")) | _collect(
    torch.Tensor, ("div", "div_", "divide", "true_divide", "__truediv__", "__itruediv__")
)
_REVERSED_DIVISION = _collect(torch.Tensor, ("__rtruediv__", "__rdiv__"))

_PASS = _STRUCTURAL | _LINEAR_PASS | _HOMOGENEOUS

_INPLACE_DUNDER = {"__iadd__", "__isub__", "__imul__", "__itruediv__", "__setitem__"}
# Position of the ``inplace`` flag of functional ops that take one.
_INPLACE_ARG = {
    F.relu: 1,
    F.leaky_relu: 2,
    F.threshold: 3,
    F.dropout: 3,
    F.dropout1d: 3,
    F.dropout2d: 3,
    F.dropout3d: 3,
}

# Up to this many input channels, one convolution over the terms' inputs stacked along
# channels beats one convolution per term: for a 1-channel 7x7 input layer it costs about
# as much as one of them, and its input gradient as much as one input gradient.
_STACK_CHANNELS = 4

_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONV_DEFAULTS = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}
_BN_ARGS = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum")
_BN_DEFAULTS = {"weight": None, "bias": None, "training": False, "momentum": 0.1, "eps": 1e-5}


def _bind(names: Sequence[str], defaults: dict[str, Any], args: tuple, kwargs: dict) -> dict:
    bound = dict(defaults)
    bound.update(zip(names, args))
    if len(args) > len(names):
        bound["eps"] = args[len(names)]
    bound.update(kwargs)
    return bound


def _name_of(func: Any) -> str:
    name = getattr(func, "__name__", None) or repr(func)
    owner = getattr(func, "__objclass__", None)
    return f"Tensor.{name}" if owner is not None else name


_INPLACE_BY_NAME: dict[Any, bool] = {}


def _is_inplace(func: Any, args: tuple, kwargs: dict) -> bool:
    by_name = _INPLACE_BY_NAME.get(func)
    if by_name is None:
        name = getattr(func, "__name__", "")
        by_name = name in _INPLACE_DUNDER or (name.endswith("_") and not name.startswith("__"))
        _INPLACE_BY_NAME[func] = by_name
    if by_name or (kwargs and kwargs.get("inplace")):
        return True
    pos = _INPLACE_ARG.get(func)
    return pos is not None and len(args) > pos and bool(args[pos])


def _graph_tensors(args: tuple, kwargs: dict) -> list[torch.Tensor]:
    found = []
    tensor = torch.Tensor
    for value in args:
        if isinstance(value, tensor):
            if value.requires_grad:
                found.append(value)
        elif isinstance(value, (list, tuple)):
            found.extend(v for v in value if isinstance(v, tensor) and v.requires_grad)
    if kwargs:
        for value in kwargs.values():
            if isinstance(value, tensor) and value.requires_grad:
                found.append(value)
    return found


def _has_graph(result: Any) -> bool:
    if isinstance(result, torch.Tensor):
        return result.requires_grad
    if isinstance(result, (list, tuple)):
        return any(isinstance(r, torch.Tensor) and r.requires_grad for r in result)
    return False


def _ntuple(value: Any, n: int) -> list[int]:
    if isinstance(value, int):
        return [value] * n
    return [int(v) for v in value]


# ----------------------------------------------------------------------------------------
# Saved values
# ----------------------------------------------------------------------------------------
class _Saved:
    """A tensor value needed in the backward pass, with its version at saving time.

    It aliases the forward tensor (no copy); an in-place op on that tensor makes the engine
    take a copy first (``snapshot``), and any modification it could not see is caught by
    the version check.
    """

    def __init__(self, tensor: torch.Tensor) -> None:
        self.source = weakref.ref(tensor)
        self.value = tensor.detach()
        self.version = tensor._version

    def snapshot(self) -> None:
        self.value = self.value.clone()
        self.version = self.value._version

    def refresh(self) -> None:
        self.version = self.value._version

    def check(self, what: str, where: str) -> None:
        if self.value._version != self.version:
            raise RuntimeError(
                f"lrp: the {what} of {where} was modified in place after the layer used it, "
                "by an operation the relevance engine cannot follow (an in-place op on a "
                "view?); make that operation out of place"
            )


# ----------------------------------------------------------------------------------------
# One rule layer
# ----------------------------------------------------------------------------------------
class _Op:
    """The linear map of one call of a rule layer, evaluated with other inputs/weights."""

    def __init__(self, kind: str, func: Any, args: tuple, kwargs: dict) -> None:
        self.kind = kind
        self.func = func
        self.args = args
        self.kwargs = kwargs
        if kind == "conv":
            p = _bind(_CONV_ARGS, _CONV_DEFAULTS, args, kwargs)
            self.input, self.weight, self.bias = p["input"], p["weight"], p["bias"]
            self.dims = _CONV[func]
            self.stride, self.padding = p["stride"], p["padding"]
            self.dilation, self.groups = p["dilation"], int(p["groups"])
        elif kind == "linear":
            p = _bind(("input", "weight", "bias"), {"bias": None}, args, kwargs)
            self.input, self.weight, self.bias = p["input"], p["weight"], p["bias"]
            self.groups = 1
        else:
            self.input = args[0] if args else kwargs["input"]
            self.weight = self.bias = None
            self.groups = 1

    def native(self) -> torch.Tensor:
        return self.func(*self.args, **self.kwargs)

    def apply(self, inp: torch.Tensor, weight: Any, bias: torch.Tensor | None) -> torch.Tensor:
        """The layer on ``inp`` with ``weight`` (a factor for pooling) and ``bias`` (a vector,
        a map, or None)."""
        vector = bias if bias is not None and bias.ndim == 1 else None
        if self.kind == "conv":
            out = self.func(
                inp, weight, vector, self.stride, self.padding, self.dilation, self.groups
            )
        elif self.kind == "linear":
            out = F.linear(inp, weight, vector)
        else:
            rest = self.args[1:]
            kwargs = {k: v for k, v in self.kwargs.items() if k != "input"}
            out = self.func(inp, *rest, **kwargs)
            if weight != 1:
                out = out * weight
        if bias is not None and vector is None:
            out = out + bias
        return out

    def vjp(self, inp: torch.Tensor, weight: Any, s: torch.Tensor) -> torch.Tensor:
        """``W^T s``: the layer's transpose applied to ``s``, shaped like ``inp``."""
        if self.kind == "linear":
            return (s @ weight).reshape(inp.shape)
        if self.kind == "conv" and not isinstance(self.padding, str):
            d = self.dims
            return torch.ops.aten.convolution_backward(
                s,
                inp,
                weight,
                None,
                _ntuple(self.stride, d),
                _ntuple(self.padding, d),
                _ntuple(self.dilation, d),
                False,
                [0] * d,
                self.groups,
                [True, False, False],
            )[0]
        with torch.enable_grad():
            leaf = inp.detach().requires_grad_(True)
            out = self.apply(leaf, weight, None)
            (grad,) = torch.autograd.grad(out, leaf, s)
        return grad

    def stackable(self, inp: torch.Tensor) -> bool:
        """Whether terms may be stacked along input channels (see :func:`propagate`)."""
        return self.kind == "conv" and self.groups == 1 and inp.shape[1] <= _STACK_CHANNELS

    def modified(self, weight: Any, modifier: Callable | None) -> Any:
        if self.kind == "pool":
            return 1.0 if modifier is None else _pool_factor(modifier)
        return weight if modifier is None else modifier(weight)


def _pool_factor(modifier: Callable) -> float:
    # Average pooling has one positive weight per window; a modifier that is positively
    # homogeneous maps it to a multiple of itself.
    one = float(modifier(torch.ones((), dtype=torch.float64)))
    two = float(modifier(torch.full((), 2.0, dtype=torch.float64)))
    if abs(two - 2 * one) > 1e-12:
        raise ValueError("not homogeneous")
    return one


@dataclass
class _BatchNormCall:
    name: str
    stats: tuple[Any, ...]  # running_mean, running_var, weight, bias, eps
    input_tensor: torch.Tensor
    input: _Saved
    output: _Tracked | None = None
    after_of: _LayerCall | None = None  # the layer it may be merged into (BN follows it)
    before_of: _LayerCall | None = None  # the layer it may be merged into (BN precedes it)
    _affine: canon.BatchNormAffine | None = None

    @property
    def affine(self) -> canon.BatchNormAffine:
        # Only merged BatchNorms need their affine map; most of DenseNet's are not merged.
        if self._affine is None:
            self._affine = canon.batchnorm_affine(*self.stats)
        return self._affine


@dataclass
class _Tracked:
    """A tensor whose later uses are counted (fold checks)."""

    source: weakref.ref
    version: int
    uses: int = 0
    layer: _LayerCall | None = None
    bn: _BatchNormCall | None = None


@dataclass
class _LayerCall:
    name: str
    module: nn.Module
    kind: str
    rule: Rule
    op: _Op
    a: _Saved
    masked: bool  # the input is ReLU-masked (see _Session.masked)
    leaves: tuple[str, ...]
    constants: dict[str, torch.Tensor]
    out: _Saved | None = None
    out_track: _Tracked | None = None
    after: _BatchNormCall | None = None
    before: _BatchNormCall | None = None
    after_ok: bool = False
    before_ok: bool = False

    @property
    def where(self) -> str:
        return _describe(self.name, self.module)

    def backward(self, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        self.a.check("input", self.where)
        assert self.out is not None
        self.out.check("output", self.where)
        op, out, inp = self.op, self.out.value, self.a.value
        weight = op.weight.detach() if op.weight is not None else None
        bias = op.bias.detach() if op.bias is not None else None
        masked = self.masked
        plain = self.rule.is_plain
        if self.after_ok:
            assert self.after is not None and weight is not None
            bn = self.after.affine
            weight, bias = canon.fold_after(weight, bias, bn)
            shape = (1, -1) + (1,) * (out.ndim - 2)
            scale = bn.scale.to(out.dtype)
            nonzero = scale != 0
            inverse = torch.where(nonzero, torch.where(nonzero, scale, 1).reciprocal(), 0)
            shift = bn.shift.to(out.dtype).view(shape)
            if plain:
                # The merged output y = s z + t; the BatchNorm's own backward multiplied
                # the gradient by s, so the gradient at y is g / s (0 where s = 0: that
                # channel has no weight left).
                out = torch.addcmul(shift, out, scale.view(shape))
                grad = grad * inverse.view(shape)
            else:
                # R = y g_y = (z + t / s) g, without forming y.
                relevance = (out + shift * inverse.view(shape)).mul_(grad)
        elif not plain:
            relevance = out * grad
        if plain:
            # epsilon: R / (y + eps sign y) = g |y| / (|y| + eps), with y the layer output.
            relevance = _plain_share(grad, out, self.rule.stabilizer)
        if self.before_ok:
            assert self.before is not None and weight is not None
            self.before.input.check("input", self.where)
            weight = canon.fold_before(weight, self.before.affine, op.groups)
            inp = self.before.input.value
            masked = False
            if _needs_bias(self.rule):
                bias = canon.shift_contribution(out, op.apply(inp, weight, None))
        g_inp, g_const = propagate(
            self.rule, op, inp, weight, bias, out, relevance, self.constants, masked
        )
        leaf_grads = tuple(g_const.get(kind) for kind in self.leaves)
        if self.before_ok:
            return (None, g_inp, *leaf_grads)
        return (g_inp, None, *leaf_grads)


def _plain_share(grad: torch.Tensor, out: torch.Tensor, eps: float) -> torch.Tensor:
    """``out * grad / (out + eps sign out)`` in fewer passes: ``grad |out| / (|out| + eps)``
    (0 where ``out`` is 0 and ``eps`` is 0)."""
    if eps == 0:
        return torch.where(out == 0, 0, grad)
    magnitude = out.abs()
    return grad * magnitude.div_(magnitude + eps)


def _describe(name: str, module: nn.Module) -> str:
    if name == "":
        return f"the forward of {type(module).__name__}"
    return f"layer {name!r} ({type(module).__name__})"


def _sum_biases(biases: list[torch.Tensor | None], ndim: int) -> torch.Tensor | None:
    present = [b for b in biases if b is not None]
    if not present:
        return None
    if all(b.ndim == 1 for b in present):
        return torch.stack(present).sum(0)
    shape = (1, -1) + (1,) * (ndim - 2)
    total = present[0] if present[0].ndim > 1 else present[0].view(shape)
    for b in present[1:]:
        total = total + (b if b.ndim > 1 else b.view(shape))
    return total


def _needs_bias(rule: Rule) -> bool:
    return not rule.is_plain and any(t.bias for t in rule.terms)


def propagate(
    rule: Rule,
    op: _Op,
    inp: torch.Tensor,
    weight: Any,
    bias: torch.Tensor | None,
    out: torch.Tensor,
    relevance: torch.Tensor,
    constants: dict[str, torch.Tensor],
    masked: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The rule's backward step: ``g_a`` such that ``a * g_a`` is the input relevance,
    and the gradients of the constant inputs (bounds, ones) of input-layer rules.

    ``relevance`` is the output relevance ``R = out * g``; for the plain (epsilon) rule it
    is already divided by the stabilised output, ``R / stab(out)``.

    ``masked``: ``inp`` is the output of ReLUs (possibly pooled, concatenated or
    reshaped), so it is non-negative and the gradient at its zeros is cleared upstream.
    """
    signs: list[bool] = [True, False] if masked else []

    def sign_range() -> tuple[bool, bool]:
        if not signs:
            low, high = torch.aminmax(inp)
            signs.extend((bool(low >= 0), bool(high <= 0)))
        return signs[0], signs[1]

    def term_input(term: Term) -> torch.Tensor | None:
        if term.input == "identity":
            return inp
        nonneg, nonpos = sign_range()
        if term.input == "positive":
            return inp if nonneg else None if nonpos else inp.clamp(min=0)
        if term.input == "negative":
            return inp if nonpos else None if nonneg else inp.clamp(max=0)
        return constants[term.input]

    g_inp: torch.Tensor | None = None
    g_const: dict[str, torch.Tensor] = {}
    for group in rule.groups:
        parts = []
        for term in group.terms:
            value = term_input(term)
            if value is None:
                continue
            w = op.modified(weight, term.weight)
            if op.kind == "pool" and w == 0:
                continue
            b = None
            if term.bias and bias is not None:
                b = term.weight(bias) if term.weight is not None else bias
            parts.append((term, value, w, b))
        if not parts:
            continue
        stacked = len(parts) > 1 and op.stackable(inp)
        if rule.is_plain:
            # ``relevance`` already is R / stab(z) (see _plain_share).
            z = None
        elif stacked:
            # Few input channels (the input layer): one convolution over the terms' inputs
            # stacked along channels is much cheaper than one convolution per term.
            z = op.apply(
                torch.cat([p[1] for p in parts], 1),
                torch.cat([p[2] for p in parts], 1),
                _sum_biases([p[3] for p in parts], inp.ndim),
            )
        else:
            z = op.apply(parts[0][1], parts[0][2], parts[0][3])
            for _, value, w, b in parts[1:]:
                z = z + op.apply(value, w, b)
        if z is None:
            s = relevance
        else:
            s = safe_divide(relevance, z, rule.stabilizer, group.sign, scratch=True)
        if group.coefficient != 1:
            s = s * group.coefficient
        if stacked:
            stacked_inp = torch.cat([inp] * len(parts), 1)
            stacked_grad = op.vjp(stacked_inp, torch.cat([p[2] for p in parts], 1), s)
            grads = stacked_grad.split(inp.shape[1], 1)
        else:
            grads = [op.vjp(inp, w, s) for _, _, w, _ in parts]
        for (term, _, _, _), grad in zip(parts, grads):
            # Positions with a_j = 0 hold no relevance and must pass none further back
            # (already so for ReLU outputs, whose own gradient is 0 there).
            if term.input == "positive" and not masked:
                grad = torch.where(inp > 0, grad, 0)
            elif term.input == "negative":
                grad = torch.where(inp < 0, grad, 0)
            if term.input in CONSTANT_INPUTS:
                g_const[term.input] = g_const[term.input] + grad if term.input in g_const else grad
            else:
                g_inp = grad if g_inp is None else g_inp + grad
    if g_inp is None:
        g_inp = torch.zeros_like(inp)
    return g_inp, g_const


class _LayerFunction(torch.autograd.Function):
    """Forward: the layer itself. Backward: the rule (see :meth:`_LayerCall.backward`)."""

    @staticmethod
    def forward(ctx: Any, call: _LayerCall, a: torch.Tensor, before: Any, *leaves: Any) -> Any:
        ctx.call = call
        return call.op.native()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        return (None, *ctx.call.backward(grad))


# ----------------------------------------------------------------------------------------
# The forward-pass mode
# ----------------------------------------------------------------------------------------
class UnsupportedLayerError(ModelError):
    """A layer or op through which relevance cannot be propagated faithfully."""


@dataclass
class _Session:
    model: nn.Module
    composite: Composite
    method: str
    x: torch.Tensor  # the model input, requires grad
    epsilon: float
    fold_batchnorm: bool = True
    split_residuals: bool = True
    names: dict[nn.Module, str] = field(default_factory=dict)
    calls: list[_LayerCall] = field(default_factory=list)
    bns: list[_BatchNormCall] = field(default_factory=list)
    tracked: dict[int, _Tracked] = field(default_factory=dict)
    saved: dict[int, list[tuple[_Saved, bool]]] = field(default_factory=dict)
    # Tensors that are ReLU outputs, possibly pooled, concatenated, summed or reshaped:
    # non-negative, and the gradient at their zeros is cleared by the ReLUs upstream.
    masked: dict[int, tuple[weakref.ref, int]] = field(default_factory=dict)
    views: dict[int, tuple[weakref.ref, Callable]] = field(default_factory=dict)
    leaves: dict[str, torch.Tensor] = field(default_factory=dict)
    leaf_values: dict[str, torch.Tensor] = field(default_factory=dict)
    input_layers: list[str] = field(default_factory=list)
    first_op_on_input: str | None = None
    layer_outputs: dict[str, torch.Tensor] = field(default_factory=dict)

    # -- where are we -----------------------------------------------------------------
    def where(self) -> tuple[str, nn.Module]:
        """The innermost module of the model whose code is running: the first frame up
        the Python stack whose ``self`` is one of its modules (no hooks needed)."""
        names = self.names
        frame = sys._getframe(1)
        while frame is not None:
            owner = frame.f_locals.get("self")
            if isinstance(owner, nn.Module) and owner in names:
                return names[owner], owner
            frame = frame.f_back
        return "", self.model

    def describe(self) -> str:
        return _describe(*self.where())

    def unsupported(self, what: str, why: str) -> UnsupportedLayerError:
        return UnsupportedLayerError(
            f"{self.method} cannot propagate relevance through {what} in {self.describe()}: "
            f"{why}. LRP rules exist for convolutions, dense layers, pooling, BatchNorm, "
            "ReLU-like activations, additions and concatenations"
        )

    # -- bookkeeping ------------------------------------------------------------------
    def lookup(self, t: Any) -> _Tracked | None:
        rec = self.tracked.get(id(t))
        if rec is not None and rec.source() is t:
            return rec
        return None

    def track(self, t: torch.Tensor, **kwargs: Any) -> _Tracked:
        rec = _Tracked(weakref.ref(t), t._version, **kwargs)
        self.tracked[id(t)] = rec
        return rec

    def count_uses(self, graph: list[torch.Tensor]) -> None:
        tracked = self.tracked
        for t in graph:
            rec = tracked.get(id(t))
            if rec is not None and rec.source() is t:
                rec.uses += 1

    def register_saved(self, t: torch.Tensor, saved: _Saved, is_output: bool) -> None:
        self.saved.setdefault(id(t), []).append((saved, is_output))

    def before_inplace(self, target: Any, relu_like: bool) -> list[_Saved]:
        """Copy the saved values an in-place op on ``target`` would overwrite; return those
        it may overwrite (a ReLU on a layer output: out * g is unchanged, since the ReLU's
        gradient is 0 wherever it changes the value)."""
        keep = []
        for saved, is_output in self.saved.get(id(target), []):
            if saved.source() is target and saved.value._version == saved.version:
                if is_output and relu_like:
                    keep.append(saved)
                else:
                    saved.snapshot()
        return keep

    def is_masked(self, t: Any) -> bool:
        entry = self.masked.get(id(t))
        return entry is not None and entry[0]() is t and entry[1] == t._version

    def mark_masked(self, t: Any) -> None:
        if isinstance(t, torch.Tensor):
            self.masked[id(t)] = (weakref.ref(t), t._version)

    def input_replay(self, t: Any) -> Callable | None:
        if t is self.x:
            return _identity
        entry = self.views.get(id(t))
        if entry is not None and entry[0]() is t:
            return entry[1]
        return None

    def constant(self, kind: str, rule: Rule) -> torch.Tensor:
        if kind not in self.leaves:
            value = _constant_value(kind, rule, self.x.detach(), self.method)
            self.leaf_values[kind] = value
            self.leaves[kind] = value.clone().requires_grad_(True)
        return self.leaves[kind]


def _identity(v: torch.Tensor) -> torch.Tensor:
    return v


def _constant_value(kind: str, rule: Rule, x: torch.Tensor, method: str) -> torch.Tensor:
    if kind == "ones":
        return torch.ones_like(x)
    dims = tuple(range(1, x.ndim))
    given = rule.low if kind == "low" else rule.high
    if given is None:
        value = x.amin(dim=dims, keepdim=True) if kind == "low" else x.amax(dim=dims, keepdim=True)
        return value.expand_as(x).clone()
    try:
        value = torch.as_tensor(given, dtype=x.dtype, device=x.device).expand_as(x).clone()
    except (RuntimeError, TypeError, ValueError) as exc:
        raise ValueError(
            f"{method}: {kind} must be a number or a tensor broadcastable to the input "
            f"{tuple(x.shape)}, got {given!r}"
        ) from exc
    if not bool(torch.isfinite(value).all()):
        raise ValueError(f"{method}: {kind} contains NaN or Inf")
    bad = (value > x) if kind == "low" else (value < x)
    if bool(bad.any()):
        raise ValueError(
            f"{method}: the input lies outside the box [low, high] of the z^B rule "
            f"({int(bad.sum())} values {'below low' if kind == 'low' else 'above high'}); "
            "pass the bounds of the input's value range"
        )
    return value


# Ops whose output is ReLU-masked when all their graph inputs are.
_MASK_PRESERVING = (
    _STRUCTURAL
    | _collect(torch, ("cat", "concat", "concatenate", "stack", "hstack", "vstack"))
    | _collect(torch, ("amax", "max"))
    | _collect(torch.Tensor, ("amax", "max"))
    | {F.max_pool1d, F.max_pool2d, F.max_pool3d}
    | {F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d}
) - {F.pad, F.interpolate}  # padding values and bicubic weights can be negative
_RELU_FAMILY = _RELU_INPLACE


class _LRPMode(TorchFunctionMode):
    def __init__(self, session: _Session) -> None:
        super().__init__()
        self.s = session
        handlers: dict[Any, Callable] = {}
        for f in _CONV:
            handlers[f] = self._conv
        for f in _LINEAR:
            handlers[f] = self._linear
        for f in _AVG_POOL:
            handlers[f] = self._pool
        for f in _BATCH_NORM:
            handlers[f] = self._batch_norm
        for f in _ADD:
            handlers[f] = self._add
        for f in _MUL:
            handlers[f] = self._mul
        for f in _REVERSED_DIVISION:
            handlers[f] = self._reversed_division
        for f in _CLAMP:
            handlers[f] = self._clamp
        for f in _THRESHOLD:
            handlers[f] = self._threshold
        self.handlers = handlers

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        if func in _IGNORED:
            return func(*args, **kwargs)
        graph = _graph_tensors(args, kwargs)
        if not graph:
            return func(*args, **kwargs)
        handler = self.handlers.get(func)
        if handler is not None:
            return handler(func, args, kwargs, graph)
        return self._generic(func, args, kwargs, graph, func in _PASS)

    # -- generic ops --------------------------------------------------------------------
    def _generic(
        self,
        func: Any,
        args: tuple,
        kwargs: dict,
        graph: list,
        allowed: bool,
        relu_like: bool = False,
    ) -> Any:
        s = self.s
        inplace = _is_inplace(func, args, kwargs)
        relu_like = relu_like or func in _RELU_FAMILY
        kept: list[_Saved] = []
        masked = relu_like or (
            allowed and func in _MASK_PRESERVING and all(s.is_masked(t) for t in graph)
        )
        if inplace:
            if not allowed:
                raise s.unsupported(
                    f"the in-place op {_name_of(func)}", "it is not a relevance-preserving op"
                )
            kept = s.before_inplace(args[0], relu_like)
        result = func(*args, **kwargs)
        if not allowed:
            if _has_graph(result):
                raise s.unsupported(_name_of(func), _reason(func))
            return result
        if s.first_op_on_input is None:
            self._note_input_use(func, graph)
        s.count_uses(graph)
        for saved in kept:
            saved.refresh()
        if masked:
            s.mark_masked(result)
        if not inplace and func in _STRUCTURAL and args and isinstance(result, torch.Tensor):
            replay = s.input_replay(args[0])
            if replay is not None:
                rest, kw = args[1:], kwargs

                def replayed(v: torch.Tensor, replay=replay, rest=rest, kw=kw) -> torch.Tensor:
                    return func(replay(v), *rest, **kw)

                s.views[id(result)] = (weakref.ref(result), replayed)
        return result

    def _note_input_use(self, func: Any, graph: list) -> None:
        s = self.s
        if any(t is s.x for t in graph):
            s.first_op_on_input = f"{_name_of(func)} in {s.describe()}"

    # -- rule layers --------------------------------------------------------------------
    def _conv(self, func, args, kwargs, graph):  # type: ignore[no-untyped-def]
        return self._rule_layer("conv", func, args, kwargs, graph)

    def _linear(self, func, args, kwargs, graph):  # type: ignore[no-untyped-def]
        return self._rule_layer("linear", func, args, kwargs, graph)

    def _pool(self, func, args, kwargs, graph):  # type: ignore[no-untyped-def]
        return self._rule_layer("pool", func, args, kwargs, graph)

    def _rule_layer(self, kind: str, func: Any, args: tuple, kwargs: dict, graph: list) -> Any:
        s = self.s
        op = _Op(kind, func, args, kwargs)
        a = op.input
        for p in (op.weight, op.bias):
            if isinstance(p, torch.Tensor) and p.requires_grad:
                raise s.unsupported(
                    f"{_name_of(func)} with input-dependent weights",
                    "its weights are computed from the activations (a product of activations)",
                )
        if not (isinstance(a, torch.Tensor) and a.requires_grad):
            return func(*args, **kwargs)
        if s.first_op_on_input is None:
            self._note_input_use(func, graph)
        name, module = s.where()
        bn = self._fold_before_candidate(a, op) if kind != "pool" else None
        replay = s.input_replay(a)
        if replay is None and bn is not None:
            replay = s.input_replay(bn.input_tensor)
        rule = s.composite.rule_for(name, module, kind, replay is not None)
        if rule.input_layer_only and replay is None:
            raise ValueError(
                f"{s.method}: rule {rule!r} is defined only for a layer that takes the model "
                f"input, but {s.describe()} takes an intermediate tensor; give it another "
                "rule (epsilon, zplus, gamma or alpha_beta)"
            )
        if kind == "pool":
            self._check_pool_rule(rule)
        leaf_kinds = tuple(sorted({t.input for t in rule.terms if t.input in CONSTANT_INPUTS}))
        leaf_inputs = []
        constants = {}
        for k in leaf_kinds:
            assert replay is not None
            leaf_inputs.append(replay(s.constant(k, rule)))
            constants[k] = leaf_inputs[-1].detach()
        if replay is not None:
            s.input_layers.append(name)
        masked = s.is_masked(a)
        s.count_uses(graph)
        call = _LayerCall(
            name=name,
            module=module,
            kind=kind,
            rule=rule,
            op=op,
            a=_Saved(a),
            masked=masked,
            leaves=leaf_kinds,
            constants=constants,
        )
        before_input = bn.input_tensor if bn is not None else None
        result = _LayerFunction.apply(call, a, before_input, *leaf_inputs)
        call.out = _Saved(result)
        call.out_track = s.track(result, layer=call)
        s.register_saved(a, call.a, False)
        s.register_saved(result, call.out, True)
        if kind == "pool" and masked:
            s.mark_masked(result)
        if bn is not None:
            bn.before_of = call
            call.before = bn
        s.calls.append(call)
        return result

    def _check_pool_rule(self, rule: Rule) -> None:
        for term in rule.terms:
            if term.weight is None:
                continue
            try:
                _pool_factor(term.weight)
            except ValueError:
                raise ValueError(
                    f"{self.s.method}: rule {rule!r} cannot be applied to the average pooling "
                    f"in {self.s.describe()} (its weight modifier is not homogeneous); use "
                    "epsilon or zplus there"
                ) from None

    def _fold_before_candidate(self, a: torch.Tensor, op: _Op) -> _BatchNormCall | None:
        s = self.s
        if not s.fold_batchnorm:
            return None
        rec = s.lookup(a)
        if rec is None or rec.bn is None or rec.uses != 0 or a._version != rec.version:
            return None
        if op.kind == "linear" and a.ndim != 2:
            return None
        return rec.bn

    # -- BatchNorm ----------------------------------------------------------------------
    def _batch_norm(self, func, args, kwargs, graph):  # type: ignore[no-untyped-def]
        s = self.s
        p = _bind(_BN_ARGS, _BN_DEFAULTS, args, kwargs)
        x = p["input"]
        if not (isinstance(x, torch.Tensor) and x.requires_grad):
            return func(*args, **kwargs)
        if p["training"] or p["running_mean"] is None or p["running_var"] is None:
            raise s.unsupported(
                "batch normalisation with batch statistics",
                "it divides by statistics of the activations (training mode or "
                "track_running_stats=False); LRP needs the fixed affine map of eval mode",
            )
        if s.first_op_on_input is None:
            self._note_input_use(func, graph)
        prod = s.lookup(x)
        after = (
            s.fold_batchnorm
            and prod is not None
            and prod.layer is not None
            and prod.layer.kind in ("conv", "linear")
            and prod.uses == 0
            and x._version == prod.version
            and (prod.layer.kind != "linear" or x.ndim == 2)
        )
        s.count_uses(graph)
        result = func(*args, **kwargs)
        stats = (p["running_mean"], p["running_var"], p["weight"], p["bias"], float(p["eps"]))
        bn = _BatchNormCall(s.where()[0], stats, x, _Saved(x))
        if after:
            assert prod is not None and prod.layer is not None
            prod.layer.after = bn
            bn.after_of = prod.layer
        bn.output = s.track(result, bn=bn)
        s.register_saved(x, bn.input, False)
        s.bns.append(bn)
        return result

    # -- additions and products ---------------------------------------------------------
    def _add(self, func, args, kwargs, graph):  # type: ignore[no-untyped-def]
        s = self.s
        # A sum of ReLU outputs is masked too: it is 0 only where all summands are.
        masked = all(s.is_masked(t) for t in graph)
        result = self._generic(func, args, kwargs, graph, allowed=True)
        if len(graph) >= 2 and isinstance(result, torch.Tensor):
            if masked:
                s.mark_masked(result)
            if s.split_residuals:
                factor = canon.proportional_split(result.detach(), s.epsilon)
                result.register_hook(lambda g, factor=factor: g * factor)
        return result

    def _mul(self, func, args, kwargs, graph):  # type: ignore[no-untyped-def]
        s = self.s
        if len(graph) >= 2:
            raise s.unsupported(
                f"the product {_name_of(func)} of two activations",
                "LRP has no rule for multiplicative interactions (gating, attention)",
            )
        if func in _DIVISIONS:
            den = args[1] if len(args) > 1 else kwargs.get("other")
            if isinstance(den, torch.Tensor) and den.requires_grad:
                raise s.unsupported(
                    f"the division {_name_of(func)} by an activation",
                    "dividing by an activation is not a linear map (normalisation)",
                )
        return self._generic(func, args, kwargs, graph, allowed=True)

    def _reversed_division(self, func, args, kwargs, graph):  # type: ignore[no-untyped-def]
        raise self.s.unsupported(
            f"the division {_name_of(func)} by an activation",
            "dividing by an activation is not a linear map",
        )

    def _clamp(self, func, args, kwargs, graph):  # type: ignore[no-untyped-def]
        name = getattr(func, "__name__", "")
        low = args[1] if len(args) > 1 else kwargs.get("min")
        high = (
            None
            if name.startswith("clamp_min")
            else (args[2] if len(args) > 2 else kwargs.get("max"))
        )
        if high is None and isinstance(low, (int, float)) and low == 0:
            return self._generic(func, args, kwargs, graph, allowed=True, relu_like=True)
        raise self.s.unsupported(
            f"{_name_of(func)}(min={low}, max={high})",
            "clamping at a bound other than 0 saturates and is not relevance-preserving "
            "(only clamp(min=0), a ReLU, is)",
        )

    def _threshold(self, func, args, kwargs, graph):  # type: ignore[no-untyped-def]
        threshold = args[1] if len(args) > 1 else kwargs.get("threshold")
        value = args[2] if len(args) > 2 else kwargs.get("value")
        if value == 0 and isinstance(threshold, (int, float)) and threshold >= 0:
            return self._generic(func, args, kwargs, graph, allowed=True, relu_like=True)
        raise self.s.unsupported(
            f"{_name_of(func)}(threshold={threshold}, value={value})", "it is not ReLU-like"
        )


# Ops with graph inputs whose result never carries relevance (shape queries, comparisons):
# skipped without further checks.
_IGNORED = _collect(
    torch.Tensor,
    (
        "dim",
        "size",
        "numel",
        "ndimension",
        "nelement",
        "is_contiguous",
        "is_floating_point",
        "element_size",
        "data_ptr",
        "stride",
        "storage_offset",
        "__len__",
        "__format__",
        "__repr__",
        "__bool__",
        "tolist",
        "item",
    ),
)


def _reason(func: Any) -> str:
    name = getattr(func, "__name__", "")
    if name in ("gelu", "silu", "elu", "selu", "celu", "mish", "softplus", "hardswish"):
        return (
            f"{name} is not positively homogeneous (x * f'(x) != f(x)), so relevance would "
            "not pass through it unchanged"
        )
    if name in ("sigmoid", "tanh", "hardtanh", "relu6", "hardsigmoid", "logsigmoid", "exp"):
        return f"{name} saturates or is not homogeneous, so it does not preserve relevance"
    if "softmax" in name:
        return "explain the logits: remove the softmax from the model"
    if "norm" in name:
        return "it divides by statistics of the activations"
    if name in ("lstm", "gru", "rnn_tanh", "rnn_relu") or "attention" in name:
        return "recurrent and attention layers multiply activations together"
    return "it has no LRP rule and is not a known relevance-preserving op"


# ----------------------------------------------------------------------------------------
# The pass
# ----------------------------------------------------------------------------------------
class RelevanceTape:
    """The result of an LRP forward pass, from which relevance is read off by one backward
    pass (:meth:`relevance`)."""

    def __init__(self, session: _Session, output: torch.Tensor) -> None:
        self.session = session
        self.output = output

    def relevance(
        self, score: torch.Tensor, tensors: Sequence[torch.Tensor] = ()
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Relevance at the input of ``score`` (a scalar: the sum of the target scores),
        and ``t * g_t`` for each of ``tensors`` (relevance at intermediate tensors)."""
        s = self.session
        leaves = list(s.leaves.items())
        inputs = [s.x, *(leaf for _, leaf in leaves), *tensors]
        grads = torch.autograd.grad(score, inputs, allow_unused=True)
        g_x = grads[0]
        relevance = torch.zeros_like(s.x) if g_x is None else s.x.detach() * g_x
        for (kind, _), grad in zip(leaves, grads[1 : 1 + len(leaves)]):
            if grad is not None:
                relevance = relevance + s.leaf_values[kind] * grad
        extra = [
            t.detach() * g if g is not None else torch.zeros_like(t)
            for t, g in zip(tensors, grads[1 + len(leaves) :])
        ]
        return relevance.detach(), extra

    @property
    def layer_outputs(self) -> dict[str, torch.Tensor]:
        """Outputs of the modules named in ``lrp_pass(record=...)``."""
        return self.session.layer_outputs

    @property
    def summary(self) -> dict[str, Any]:
        """Which rule each rule layer got and which BatchNorms were merged."""
        s = self.session
        return {
            "rules": {c.name: repr(c.rule) for c in s.calls},
            "folded_after": [c.name for c in s.calls if c.after_ok],
            "folded_before": [c.name for c in s.calls if c.before_ok],
            "input_layers": list(s.input_layers),
        }


@contextlib.contextmanager
def lrp_pass(
    model: nn.Module,
    x: torch.Tensor,
    composite: Composite,
    *,
    method: str,
    epsilon: float,
    fold_batchnorm: bool = True,
    split_residuals: bool = True,
    record: Sequence[str] = (),
) -> Iterator[Callable[[], RelevanceTape]]:
    """Run the model's forward pass with LRP rules attached.

    Yields a function that runs the forward pass on ``x`` (call it once) and returns a
    :class:`RelevanceTape`. On exit every hook is removed and every parameter's
    ``requires_grad`` restored. ``record`` names modules whose outputs are kept in
    ``tape.layer_outputs`` (for relevance at intermediate layers).
    """
    named = list(model.named_modules())
    for name, module in named:
        if isinstance(module, (torch.jit.ScriptModule, torch.jit.RecursiveScriptModule)):
            where = f"layer {name!r}" if name else "the model"
            raise ValueError(
                f"{method} cannot attach LRP rules inside a TorchScript module ({where}); "
                "pass the Python nn.Module instead"
            )
    session = _Session(
        model=model,
        composite=composite,
        method=method,
        x=x.detach().requires_grad_(True),
        epsilon=float(epsilon),
        fold_batchnorm=fold_batchnorm,
        split_residuals=split_residuals,
    )
    modules: dict[str, nn.Module] = {}
    for name, module in named:
        session.names.setdefault(module, name)
        modules.setdefault(name, module)

    def recorder(name: str) -> Callable:
        def hook(_m: nn.Module, _i: Any, output: Any) -> None:
            if isinstance(output, torch.Tensor):
                session.layer_outputs[name] = output

        return hook

    with hook_handles() as handles:
        for name in record:
            if name not in modules:
                raise ValueError(f"the model has no layer named {name!r}")
            handles.append(modules[name].register_forward_hook(recorder(name)))
        params = {id(p): p for _, m in named for p in m._parameters.values() if p is not None}

        def run() -> RelevanceTape:
            with _parameters_frozen(params.values()), _LRPMode(session):
                output = model(session.x)
            _finish(session)
            return RelevanceTape(session, output)

        yield run


@contextlib.contextmanager
def _parameters_frozen(params: Iterable[torch.Tensor]) -> Iterator[None]:
    """Parameters stop requiring grad during the pass, so that "requires grad" means
    "depends on the input"; every flag is restored on exit."""
    frozen = [p for p in params if p.requires_grad]
    try:
        for p in frozen:
            p.requires_grad_(False)
        yield
    finally:
        for p in frozen:
            p.requires_grad_(True)


def _finish(s: _Session) -> None:
    """Decide which BatchNorms are merged, now that every use of every tensor is known."""
    for call in s.calls:
        if call.after is not None and call.out_track is not None and call.out is not None:
            call.after_ok = call.out_track.uses == 1 and call.out.value._version == (
                call.out_track.version
            )
    for bn in s.bns:
        call = bn.before_of
        if call is None or bn.output is None:
            continue
        merged_after = bn.after_of is not None and bn.after_of.after_ok
        source = bn.output.source()
        unchanged = source is None or source._version == bn.output.version
        call.before_ok = not merged_after and bn.output.uses == 1 and unchanged
        if not call.before_ok and call.rule.input_layer_only:
            raise ValueError(
                f"{s.method}: rule {call.rule!r} of {call.where} needs the model input, but the "
                f"BatchNorm {bn.name!r} before it cannot be merged into it (its output is "
                "used elsewhere)"
            )
    if s.composite.first is not None and not s.input_layers:
        first = s.first_op_on_input or "nothing"
        raise ValueError(
            f"{s.method}: composite {s.composite.name!r} applies {s.composite.first!r} to the "
            "layer that takes the model input, but no convolution or dense layer receives the "
            f"input directly (the model first applies {first}); choose another composite, "
            "e.g. 'epsilon_plus'"
        )


def lrp_attribution(
    explainer: Any,
    x: torch.Tensor,
    target: Any,
    composite: Composite,
    *,
    epsilon: float,
) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """``(relevance at the input, output on x, resolved target)`` from one forward and one
    backward pass. The starting relevance is ``output * d score / d output`` (the target
    score itself for class, binary and region targets)."""
    with lrp_pass(explainer.model, x, composite, method=explainer.name, epsilon=epsilon) as run:
        tape = run()
    output = check_output(tape.output, x.shape[0])
    resolved = resolve_target(target, output)
    relevance, _ = tape.relevance(resolved.scores(output).sum())
    return relevance, output.detach(), resolved
