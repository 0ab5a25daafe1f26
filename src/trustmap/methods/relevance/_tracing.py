"""Op-level tracing of a forward pass, shared by DeepLIFT, DeepSHAP and PatternNet.

A :class:`Tracer` is a :class:`~torch.overrides.TorchFunctionMode`: it sees every torch
call the model makes, whether through a module, a module reused several times, an
in-place op or a functional call inside ``forward``. It follows which tensors depend on
the explained input and sorts each call on such a tensor into a kind:

* ``elementwise``: a nonlinearity applied to each element (ReLU, sigmoid, ELU, ...);
* ``maxpool``: max pooling, plain or adaptive;
* ``layer``: a linear layer with weights (linear, convolution, transposed convolution);
* ``batchnorm``: batch normalisation, which is affine per channel in eval mode;
* ``struct``: linear ops with non-negative coefficients and no bias (reshaping,
  indexing, concatenation, addition, average pooling, interpolation, dropout in eval);
* ``scale``: other linear ops (subtraction, negation, multiplication or division by a
  constant);
* ``linear``: linear ops with one input-dependent operand (``matmul``, ``einsum``,
  bicubic interpolation);
* ``constant``: ops whose result does not depend on the values (``zeros_like``).

A call on an input-dependent tensor that fits none of these kinds and returns a floating
tensor (softmax, layer norm, the product of two activations, a max over an axis, ...)
raises a ValueError that names the op and the layer that called it: the methods built
on this tracer propagate only through ops whose rule they know, and never fall back to
the plain gradient silently.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from trustmap.core.script import compiled_kind
from trustmap.core.validation import NotApplicableError

T = torch.Tensor

# -- the op table ------------------------------------------------------------------------

_ELEMENTWISE = [
    F.relu, torch.relu, T.relu, F.relu_, torch.relu_, T.relu_,
    F.leaky_relu, F.leaky_relu_, F.elu, F.elu_, F.selu, torch.selu_, F.celu, torch.celu_,
    F.rrelu, F.rrelu_, F.gelu, F.silu, F.mish, F.softplus, F.hardtanh, F.hardtanh_,
    F.relu6, F.hardsigmoid, F.hardswish, F.logsigmoid, F.softsign, F.tanhshrink,
    F.softshrink, F.hardshrink, F.threshold, F.threshold_, torch.prelu,
    torch.sigmoid, T.sigmoid, T.sigmoid_, torch.tanh, T.tanh, T.tanh_,
    torch.exp, T.exp, torch.abs, T.abs, torch.square, T.square,
    torch.clamp, T.clamp, T.clamp_, torch.clip, T.clip, T.clip_,
]  # fmt: skip
# ReLU in all its spellings: the only activation PatternNet and PatternAttribution accept.
RELU_FUNCS = frozenset([F.relu, torch.relu, T.relu, F.relu_, torch.relu_, T.relu_])
_MAXPOOL = [
    F.max_pool1d, F.max_pool2d, F.max_pool3d,
    F.max_pool1d_with_indices, F.max_pool2d_with_indices, F.max_pool3d_with_indices,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d,
    F.adaptive_max_pool1d_with_indices, F.adaptive_max_pool2d_with_indices,
    F.adaptive_max_pool3d_with_indices,
]  # fmt: skip
CONVS = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}
CONV_TRANSPOSES = {F.conv_transpose1d: 1, F.conv_transpose2d: 2, F.conv_transpose3d: 3}
_LAYER = [F.linear, *CONVS, *CONV_TRANSPOSES]
# Linear, batch-preserving ops with non-negative coefficients and no bias.
_STRUCT_UNARY = [
    T.view, T.reshape, torch.reshape, T.flatten, torch.flatten, T.unflatten, torch.unflatten,
    T.permute, torch.permute, T.transpose, torch.transpose, T.squeeze, torch.squeeze,
    T.unsqueeze, torch.unsqueeze, T.contiguous, T.clone, torch.clone, T.expand, T.expand_as,
    T.view_as, T.reshape_as, T.__getitem__, T.narrow, torch.narrow, T.chunk, torch.chunk,
    T.split, torch.split, T.movedim, torch.movedim, T.repeat, T.to, T.float, T.double,
    T.half, T.type_as, T.mean, torch.mean, T.sum, torch.sum,
    F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
    F.feature_alpha_dropout, F.interpolate, F.pad, F.pixel_shuffle, F.pixel_unshuffle,
]  # fmt: skip
_STRUCT_SUM = [torch.add, T.add, T.__add__, T.__radd__, T.add_, T.__iadd__]
_STRUCT_CAT = [torch.cat, torch.concat, torch.concatenate, torch.stack]
_SCALE = [
    torch.sub, T.sub, T.__sub__, T.__rsub__, torch.rsub, T.sub_, T.__isub__,
    torch.neg, T.neg, T.__neg__,
    torch.mul, T.mul, T.__mul__, T.__rmul__, T.mul_, T.__imul__,
    torch.div, T.div, T.__truediv__, T.div_, T.__itruediv__, torch.true_divide,
]  # fmt: skip
_LINEAR = [torch.matmul, T.matmul, T.__matmul__, torch.mm, T.mm, torch.einsum]
_CONSTANT = [
    torch.zeros_like, torch.ones_like, torch.empty_like, torch.full_like,
    T.new_zeros, T.new_ones, T.new_full, T.new_empty, T.new_tensor,
]  # fmt: skip

KINDS: dict[Any, str] = {}
for _kind, _funcs in (
    ("elementwise", _ELEMENTWISE),
    ("maxpool", _MAXPOOL),
    ("layer", _LAYER),
    ("batchnorm", [F.batch_norm]),
    ("struct", _STRUCT_UNARY + _STRUCT_SUM + _STRUCT_CAT),
    ("scale", _SCALE),
    ("linear", _LINEAR),
    ("constant", _CONSTANT),
):
    for _f in _funcs:
        KINDS[_f] = _kind
SUMS = frozenset(_STRUCT_SUM)
CATS = frozenset(_STRUCT_CAT)
_DIVS = frozenset([torch.div, T.div, T.__truediv__, T.div_, T.__itruediv__, torch.true_divide])
_REDUCTIONS = frozenset([T.mean, torch.mean, T.sum, torch.sum])
_DROPOUTS = frozenset(
    [F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout]
)
# Calls that read metadata only.
_META = frozenset(
    [T.dim, T.size, T.numel, T.nelement, T.ndimension, T.is_floating_point, T.stride,
     T.is_contiguous, T.element_size, T.data_ptr, T.get_device]
)  # fmt: skip
# Interpolation modes whose weights are non-negative.
_POSITIVE_MODES = ("nearest", "nearest-exact", "linear", "bilinear", "trilinear", "area")

# In-place nonlinearities and their out-of-place versions: the tracer computes every
# nonlinearity out of place (the caller uses the returned tensor either way).
OUT_OF_PLACE: dict[Any, Any] = {
    F.relu_: F.relu, torch.relu_: torch.relu, T.relu_: T.relu,
    F.leaky_relu_: F.leaky_relu, F.elu_: F.elu, torch.selu_: F.selu, torch.celu_: F.celu,
    F.rrelu_: F.rrelu, F.hardtanh_: F.hardtanh, F.threshold_: F.threshold,
    T.sigmoid_: T.sigmoid, T.tanh_: T.tanh, T.clamp_: T.clamp, T.clip_: T.clip,
}  # fmt: skip
WITH_INDICES: dict[Any, Any] = {
    F.max_pool1d: F.max_pool1d_with_indices,
    F.max_pool2d: F.max_pool2d_with_indices,
    F.max_pool3d: F.max_pool3d_with_indices,
    F.adaptive_max_pool1d: F.adaptive_max_pool1d_with_indices,
    F.adaptive_max_pool2d: F.adaptive_max_pool2d_with_indices,
    F.adaptive_max_pool3d: F.adaptive_max_pool3d_with_indices,
}
for _f in list(WITH_INDICES.values()):
    WITH_INDICES[_f] = _f


def op_name(func: Any) -> str:
    """A readable name for a torch function, e.g. ``torch.nn.functional.softmax``."""
    name = getattr(func, "__name__", None) or repr(func)
    module = getattr(func, "__module__", None)
    if module in (None, "torch._tensor", "torch._C"):
        return f"Tensor.{name}"
    if module == "torch._C._nn":
        module = "torch.nn.functional"
    return f"{module}.{name}"


_PARAMS: dict[Any, tuple[str, ...] | None] = {}


def arguments(func: Any, args: tuple, kwargs: dict) -> dict[str, Any] | None:
    """The call's arguments by parameter name (defaults not filled in), or None for a
    builtin without a signature. Cheaper than ``inspect.Signature.bind``."""
    if func not in _PARAMS:
        try:
            params = inspect.signature(func).parameters
            _PARAMS[func] = tuple(params)
        except (TypeError, ValueError):
            _PARAMS[func] = None
    names = _PARAMS[func]
    if names is None:
        return None
    out = dict(zip(names, args))
    out.update(kwargs)
    return out


def out_of_place(func: Any, args: tuple, kwargs: dict) -> Callable[[T], T]:
    """``f(z)`` for an elementwise call ``func(*args, **kwargs)``, never in place: the
    first argument is replaced by ``z`` and ``inplace`` forced to False."""
    func = OUT_OF_PLACE.get(func, func)
    named = arguments(func, args, kwargs)
    if named is not None and "inplace" in (_PARAMS[func] or ()):
        first = _PARAMS[func][0]
        named.pop(first, None)
        named["inplace"] = False
        return lambda z: func(z, **named)
    rest, kw = tuple(args[1:]), dict(kwargs)
    return lambda z: func(z, *rest, **kw)


def tensors_in(obj: Any) -> Iterator[T]:
    """Tensors in an argument or result, one level into lists, tuples and dicts."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            if isinstance(item, torch.Tensor):
                yield item
    elif isinstance(obj, dict):
        for item in obj.values():
            if isinstance(item, torch.Tensor):
                yield item


# -- which layer is running --------------------------------------------------------------


class ModuleStack:
    """Names the layer whose forward is running, for error messages and pattern keys.

    It reads the Python call stack (the innermost ``forward`` frame whose ``self`` is a
    module of the model) only when asked, so tracing costs no module hooks.
    """

    def __init__(self, model: nn.Module) -> None:
        self.names = {id(m): (name, m) for name, m in model.named_modules()}

    def _innermost(self) -> tuple[str, nn.Module] | None:
        frame = sys._getframe(1)
        while frame is not None:
            obj = frame.f_locals.get("self")
            if obj is not None:
                entry = self.names.get(id(obj))
                if entry is not None and entry[1] is obj:
                    return entry
            frame = frame.f_back
        return None

    def current(self) -> str:
        entry = self._innermost()
        if entry is None:
            return "the model's forward"
        name, module = entry
        if not name:
            return f"the forward of {type(module).__name__}"
        return f"layer {name!r} ({type(module).__name__})"

    def current_name(self) -> str:
        entry = self._innermost()
        return entry[0] if entry is not None else ""


@contextlib.contextmanager
def module_stack(model: nn.Module) -> Iterator[ModuleStack]:
    yield ModuleStack(model)


def check_traceable(model: nn.Module, method: str) -> None:
    compiled = compiled_kind(model)
    if compiled is not None:
        raise NotApplicableError(
            f"{method} follows every op of the forward pass, which a {compiled} model "
            "hides; pass the Python nn.Module instead"
        )


# -- the tracer ----------------------------------------------------------------------------


class Tracer(TorchFunctionMode):
    """Follows input-dependent tensors and routes each call on them by kind.

    Subclasses override :meth:`dispatch` for the kinds they treat specially; the base
    class runs the op unchanged and marks its result as input-dependent.
    """

    def __init__(self, method: str, modules: ModuleStack) -> None:
        super().__init__()
        self.method = method
        self.modules = modules
        self._dependent: dict[int, weakref.ref] = {}

    # dependence ---------------------------------------------------------------------
    def mark(self, obj: Any) -> None:
        if isinstance(obj, torch.Tensor):
            self._dependent[id(obj)] = weakref.ref(obj)
        else:
            for t in tensors_in(obj):
                self._dependent[id(t)] = weakref.ref(t)

    def depends(self, t: Any) -> bool:
        if not isinstance(t, torch.Tensor):
            return False
        ref = self._dependent.get(id(t))
        return ref is not None and ref() is t

    def _collect(self, obj: Any, found: list[T]) -> None:
        if isinstance(obj, torch.Tensor):
            ref = self._dependent.get(id(obj))
            if ref is not None and ref() is obj:
                found.append(obj)
        elif isinstance(obj, (list, tuple)):
            for t in obj:
                if isinstance(t, torch.Tensor):
                    ref = self._dependent.get(id(t))
                    if ref is not None and ref() is t:
                        found.append(t)

    # errors ---------------------------------------------------------------------------
    def fail(self, what: str) -> ValueError:
        return ValueError(f"{self.method}: {what}, called in {self.modules.current()}")

    def unsupported(self, func: Any, why: str = "") -> ValueError:
        reason = f" ({why})" if why else ""
        return NotApplicableError(
            f"{self.method}: no propagation rule for {op_name(func)}{reason}; the method "
            "handles linear and convolutional layers, BatchNorm in eval mode, pooling, "
            "concatenation, residual additions and elementwise activations, called in "
            f"{self.modules.current()}"
        )

    # dispatch -------------------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        if kwargs is None:
            kwargs = {}
        dep: list[T] = []
        for a in args:
            self._collect(a, dep)
        for a in kwargs.values():
            self._collect(a, dep)
        if not dep or func in _META:
            return func(*args, **kwargs)
        kind = KINDS.get(func)
        if kind is None:
            out = func(*args, **kwargs)
            if any(t.is_floating_point() for t in tensors_in(out)):
                raise self.unsupported(func)
            self.mark(out)
            return out
        if kind == "constant":
            return func(*args, **kwargs)
        self.check(kind, func, args, kwargs, dep)
        out = self.dispatch(kind, func, args, kwargs, dep)
        self.mark(out)
        return out

    def dispatch(self, kind: str, func: Any, args: tuple, kwargs: dict, dep: list[T]) -> Any:
        return func(*args, **kwargs)

    def check(self, kind: str, func: Any, args: tuple, kwargs: dict, dep: list[T]) -> None:
        """Refuse the calls of a known kind that are not linear here."""
        if any(not t.is_floating_point() for t in dep):
            why = "an integer or boolean operand computed from the input (data-dependent masking)"
            raise self.unsupported(func, why)
        if len(dep) > 1 and kind == "elementwise":
            raise self.unsupported(func, "a parameter of the activation depends on the input")
        if len(dep) > 1 and kind in ("layer", "batchnorm"):
            raise self.unsupported(func, "its weights depend on the input")
        if kind in ("scale", "linear") and len(dep) > 1:
            why = "both operands depend on the input: a product of activations is not linear"
            raise self.unsupported(func, why)
        if func in _DIVS and not self.depends(args[0]):
            raise self.unsupported(func, "division by an input-dependent tensor")
        if kind == "batchnorm":
            training = kwargs.get("training", args[5] if len(args) > 5 else False)
            mean = kwargs.get("running_mean", args[1] if len(args) > 1 else None)
            if training or mean is None:
                raise self.fail(
                    "BatchNorm normalises with the batch's own statistics (training mode or "
                    "track_running_stats=False), which is not linear; use running statistics"
                )
        if func in _DROPOUTS:
            named = arguments(func, args, kwargs)
            if named is not None and named.get("training", True):
                raise self.fail(f"{op_name(func)} is active (training=True)")
        if func in CATS:
            tensors = args[0] if args else kwargs["tensors"]
            dim = kwargs.get("dim", args[1] if len(args) > 1 else 0)
            ndim = tensors[0].ndim + (func is torch.stack)
            if dim in (0, -ndim):
                raise self.unsupported(func, "it concatenates along the batch axis")
        if func in _REDUCTIONS:
            dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
            dims = dim if isinstance(dim, (tuple, list)) else (dim,)
            if dim is None or any(d in (0, -args[0].ndim) for d in dims):
                raise self.unsupported(func, "it reduces over the batch axis")


def layer_args(func: Any, args: tuple, kwargs: dict) -> tuple[T, T, T | None, tuple, dict]:
    """``(input, weight, bias, other_args, other_kwargs)`` of a linear or conv call."""
    args = list(args)
    kwargs = dict(kwargs)
    x = args.pop(0) if args else kwargs.pop("input")
    w = args.pop(0) if args else kwargs.pop("weight")
    if args:
        b = args.pop(0)
    else:
        b = kwargs.pop("bias", None)
    return x, w, b, tuple(args), kwargs


def is_positive_interpolation(args: tuple, kwargs: dict) -> bool:
    named = arguments(F.interpolate, args, kwargs) or {}
    mode = named.get("mode", "nearest")
    return mode in _POSITIVE_MODES


def batchnorm_scale(args: tuple, kwargs: dict) -> tuple[T, T]:
    """Per-channel ``(scale, shift)`` of an eval-mode ``F.batch_norm`` call."""
    b = arguments(F.batch_norm, args, kwargs) or {}
    x, mean, var = b["input"], b["running_mean"], b["running_var"]
    eps = float(b.get("eps", 1e-5))
    scale = torch.rsqrt(var.to(x.dtype) + eps)
    weight, bias = b.get("weight"), b.get("bias")
    if weight is not None:
        scale = scale * weight
    shift = -mean.to(x.dtype) * scale
    if bias is not None:
        shift = shift + bias
    return scale.detach(), shift.detach()


def channel_view(v: T, ndim: int) -> T:
    """A per-channel vector shaped to broadcast over ``(N, C, *spatial)``."""
    return v.reshape(1, -1, *([1] * (ndim - 2)))
