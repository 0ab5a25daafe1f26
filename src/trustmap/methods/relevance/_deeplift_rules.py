"""DeepLIFT multipliers (Shrikumar, Greenside, Kundaje 2017) through any traced network.

Two engines, both built on :class:`~trustmap.methods.relevance._tracing.Tracer`:

* **Rescale** (:func:`rescale_gradients`). One forward pass on ``x`` with gradients, in
  which every nonlinearity is an autograd function whose backward pass multiplies by the
  multiplier ``m = (f(z) - f(z')) / (z - z')`` instead of ``f'(z)``, and one forward pass
  without gradients on the reference, which records ``z'`` for every nonlinearity in call
  order. Linear ops keep their ordinary backward pass, which is DeepLIFT's linear rule.
  Several references can share one forward pass on ``x``: each gets its own backward
  pass over the retained graph (DeepSHAP).
* **RevealCancel** (:func:`reveal_cancel_gradients`). ``x`` and its reference run as one
  batch of ``2B`` rows. Every linear or convolutional layer also computes the positive
  and negative parts of its output's difference from reference, ``dz+ = W+ dx+ + W- dx-``
  and ``dz- = W+ dx- + W- dx+`` (the linear rule of section 3.5.1); BatchNorm, additions,
  concatenation, average pooling, reshaping and scaling carry the pair forward. At a
  nonlinearity ``y = f(z)``::

      dy+ = 1/2 (f(z' + dz+) - f(z')) + 1/2 (f(z) - f(z' + dz-))
      dy- = 1/2 (f(z' + dz-) - f(z')) + 1/2 (f(z) - f(z' + dz+))

  with multipliers ``dy+ / dz+`` and ``dy- / dz-`` (section 3.5.3). Where a tensor's
  split is unknown (the output of a max pool or of another nonlinearity) it is split
  into its own positive and negative parts, which makes RevealCancel coincide with
  Rescale at the next neuron.

Max pooling, ``maxpool="rescale"``: the change of each pooled value, ``max(z) - max(z')``,
goes to the argmax of whichever window has the larger maximum (of ``x`` if
``max(z) >= max(z')``, else of the reference), with multiplier ``(max(z) - max(z')) / dz``
at that position (it lies in [0, 1]); this keeps summation-to-delta. ``maxpool="gradient"``
is the plain gradient through the argmax of ``x``, the default of the reference
implementation by the paper's authors; it breaks summation-to-delta by the difference
between ``max(z')`` and ``z'`` at the argmax of ``x``.

Where ``|z - z'|`` is below ``eps`` (1e-10 in float64, 1e-6 otherwise) the multiplier is
the gradient, its limit; for ReLU only ``z = z'`` exactly is special, with multiplier 0
(see :func:`rescale_multiplier` for why no attribution changes).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from trustmap.core.targets import Target, TargetSpec, resolve_target
from trustmap.core.validation import check_output
from trustmap.methods.relevance._tracing import (
    CATS,
    KINDS,
    RELU_FUNCS,
    SUMS,
    WITH_INDICES,
    ModuleStack,
    Tracer,
    arguments,
    batchnorm_scale,
    channel_view,
    check_traceable,
    is_positive_interpolation,
    layer_args,
    module_stack,
    op_name,
    out_of_place,
    tensors_in,
)

T = torch.Tensor
RULES = ("rescale", "reveal_cancel")
MAXPOOL_RULES = ("rescale", "gradient")


def eps_for(dtype: torch.dtype) -> float:
    """Below this ``|z - z'|`` the multiplier falls back to the gradient."""
    return 1e-10 if dtype == torch.float64 else 1e-6


# -- shared multiplier math ------------------------------------------------------------


def _derivative(f: Callable[[T], T], z: T, relu: bool) -> T:
    if relu:
        return (z > 0).to(z.dtype)
    with torch.enable_grad():
        zz = z.detach().requires_grad_(True)
        (d,) = torch.autograd.grad(f(zz).sum(), zz)
    return d


def rescale_multiplier(f: Callable[[T], T], z: T, y: T, zr: T, yr: T, eps: float, relu: bool) -> T:
    """``(f(z) - f(z')) / (z - z')``, and ``f'(z)`` where ``|z - z'| <= eps``.

    ReLU takes a shorter path (four elementwise passes instead of eight, the dominant
    cost of the rule): the ratio is exact for any nonzero difference (it lies in
    [0, 1], and where both are positive ``y - y'`` and ``z - z'`` are the same float), and
    where ``z = z'`` exactly the multiplier is 0 rather than the gradient. That never
    changes an attribution: such a neuron's inputs all have zero difference too (barring
    exact cancellation), so every path from it to an input with ``x != x'`` passes a
    neuron inactive at both, whose multiplier is 0 either way.
    """
    if relu:
        return (y - yr).div_(z - zr).nan_to_num_(0.0)
    dz = z - zr
    small = dz.abs() <= eps
    m = (y - yr) / torch.where(small, 1.0, dz)
    if bool(small.any()):
        m = torch.where(small, _derivative(f, z, relu), m)
    return m


def maxpool_rescale_grad(g: T, z: T, y: T, idx: T, zr: T, yr: T, idxr: T, eps: float) -> T:
    """Backward pass of max pooling by the rescale rule (see the module docstring).

    ``z``: input ``(B, C, *s)``; ``y``, ``idx``: pooled values and flat argmax indices;
    ``zr``, ``yr``, ``idxr``: the same for the reference (``B`` rows or one).
    """
    b, c = z.shape[:2]
    flat = (b, c, -1)
    zf, yf, idxf, gf = z.reshape(flat), y.reshape(flat), idx.reshape(flat), g.reshape(flat)
    zrf = zr.reshape(zr.shape[0], c, -1).expand(b, -1, -1)
    yrf = yr.reshape(yr.shape[0], c, -1).expand(b, -1, -1)
    idxrf = idxr.reshape(idxr.shape[0], c, -1).expand(b, -1, -1)
    pos = torch.where(yf >= yrf, idxf, idxrf)
    d = zf.gather(2, pos) - zrf.gather(2, pos)
    small = d.abs() <= eps
    contrib = torch.where(small, gf, gf * (yf - yrf) / torch.where(small, 1.0, d))
    pos = torch.where(small, idxf, pos)
    grad = torch.zeros_like(zf).scatter_add_(2, pos, contrib)
    return grad.view_as(z)


def pool_with_indices(func: Any, args: tuple, kwargs: dict) -> tuple[Callable, bool]:
    """``pool(z) -> (values, indices)`` for a max-pool call, and whether the call itself
    asked for the indices."""
    target = WITH_INDICES[func]
    named = arguments(target, args, kwargs)
    assert named is not None
    wants = func is target or bool(named.pop("return_indices", False))
    named.pop("input", None)
    return (lambda z: target(z, **named)), wants


# -- rescale: one forward on x, one recording forward per reference batch ----------------


@dataclass
class _Call:
    func: Any
    f: Callable[..., Any]
    shape: tuple[int, ...]
    relu: bool = False


class _ReplayTracer(Tracer):
    def __init__(self, method: str, modules: ModuleStack, maxpool: str, eps: float) -> None:
        super().__init__(method, modules)
        self.maxpool = maxpool
        self.eps = eps
        self.phase = "input"
        self.calls: list[_Call] = []
        self.refs: list[T | None] = []
        self.select: int | None = None
        self._cursor = 0

    def run(self, model: nn.Module, inputs: T, phase: str) -> Any:
        if phase == "reference" and self._quick_reference(model, inputs):
            return None
        self.phase = phase
        self._cursor = 0
        self.mark(inputs)
        with self:
            out = model(inputs)
        if phase == "reference" and self._cursor != len(self.calls):
            raise self._diverged()
        return out

    def _quick_reference(self, model: nn.Module, inputs: T) -> bool:
        """Record the reference activations without following dependence, which the
        forward pass on ``x`` has checked already; False if the calls do not line up
        (a nonlinearity applied to a constant), and the traced pass must run."""
        recorder = _Recorder({c.func for c in self.calls})
        with recorder:
            model(inputs)
        seen = recorder.seen
        if len(seen) != len(self.calls) or any(
            func is not c.func or tuple(z.shape[1:]) != c.shape
            for (func, z), c in zip(seen, self.calls)
        ):
            return False
        self.refs = [z.detach() for _, z in seen]
        return True

    def reference(self, k: int) -> T:
        zr = self.refs[k]
        assert zr is not None
        return zr if self.select is None else zr[self.select : self.select + 1]

    def _diverged(self) -> ValueError:
        return ValueError(
            f"{self.method}: the forward pass on the reference took a different path "
            "than on x (data-dependent control flow), so their activations cannot be "
            "paired"
        )

    def _record(self, func: Any, z: T) -> None:
        k = self._cursor
        if k >= len(self.calls) or self.calls[k].func is not func:
            raise self._diverged()
        if tuple(z.shape[1:]) != self.calls[k].shape:
            raise self._diverged()
        self.refs[k] = z.detach()
        self._cursor += 1

    def _new_call(self, call: _Call) -> int:
        self.calls.append(call)
        self.refs.append(None)
        return len(self.calls) - 1

    def dispatch(self, kind: str, func: Any, args: tuple, kwargs: dict, dep: list[T]) -> Any:
        if kind == "elementwise":
            z = args[0]
            f = out_of_place(func, args, kwargs)
            if self.phase == "reference":
                self._record(func, z)
                return f(z)
            k = self._new_call(_Call(func, f, tuple(z.shape[1:]), func in RELU_FUNCS))
            return _RescaleFn.apply(z, self, k)
        if kind == "maxpool" and self.maxpool == "rescale":
            z = args[0]
            pool, wants = pool_with_indices(func, args, kwargs)
            if self.phase == "reference":
                self._record(func, z)
                return func(*args, **kwargs)
            k = self._new_call(_Call(func, pool, tuple(z.shape[1:])))
            y, idx = _MaxPoolFn.apply(z, self, k)
            return (y, idx) if wants else y
        return func(*args, **kwargs)


class _Recorder(TorchFunctionMode):
    """Records the first argument of every call to one of ``funcs``, in call order;
    nonlinearities run out of place so the recorded input stays intact."""

    def __init__(self, funcs: set[Any]) -> None:
        super().__init__()
        self.funcs = funcs
        self.seen: list[tuple[Any, T]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        if func in self.funcs and args and isinstance(args[0], torch.Tensor):
            self.seen.append((func, args[0]))
            if KINDS.get(func) == "elementwise":
                return out_of_place(func, args, kwargs)(args[0])
        return func(*args, **kwargs)


class _RescaleFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, z: T, tracer: _ReplayTracer, k: int) -> T:
        y = tracer.calls[k].f(z)
        ctx.tracer, ctx.k = tracer, k
        ctx.save_for_backward(z, y)
        return y

    @staticmethod
    def backward(ctx: Any, g: T) -> tuple[T, None, None]:
        z, y = ctx.saved_tensors
        tracer, call = ctx.tracer, ctx.tracer.calls[ctx.k]
        zr = tracer.reference(ctx.k)
        yr = zr.clamp(min=0) if call.relu else call.f(zr)
        m = rescale_multiplier(call.f, z, y, zr, yr, tracer.eps, call.relu)
        return m.mul_(g), None, None


class _MaxPoolFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, z: T, tracer: _ReplayTracer, k: int) -> tuple[T, T]:
        y, idx = tracer.calls[k].f(z)
        ctx.tracer, ctx.k = tracer, k
        ctx.save_for_backward(z, y, idx)
        ctx.mark_non_differentiable(idx)
        return y, idx

    @staticmethod
    def backward(ctx: Any, g: T, _g_idx: Any) -> tuple[T, None, None]:
        z, y, idx = ctx.saved_tensors
        tracer = ctx.tracer
        zr = tracer.reference(ctx.k)
        yr, idxr = tracer.calls[ctx.k].f(zr)
        return maxpool_rescale_grad(g, z, y, idx, zr, yr, idxr, tracer.eps), None, None


@dataclass
class RescalePass:
    """The forward pass on ``x`` of the rescale rule, ready for backward passes."""

    tracer: _ReplayTracer
    xg: T
    output: T
    target: Target
    score: T


def rescale_forward(
    model: nn.Module,
    method: str,
    x: T,
    target: TargetSpec | Target,
    maxpool: str,
    modules: ModuleStack,
) -> RescalePass:
    """Forward pass on ``x`` (with gradients) and the target score to differentiate;
    ``modules`` is the :func:`module_stack` the forward passes run under."""
    check_traceable(model, method)
    tracer = _ReplayTracer(method, modules, maxpool, eps_for(x.dtype))
    xg = x.detach().requires_grad_(True)
    output = check_output(tracer.run(model, xg, "input"), x.shape[0])
    resolved = resolve_target(target, output)
    return RescalePass(tracer, xg, output, resolved, resolved.scores(output).sum())


def rescale_reference(p: RescalePass, model: nn.Module, reference: T) -> None:
    """Record the reference activations of ``reference`` (``R`` rows) for the next
    backward passes."""
    with torch.no_grad():
        p.tracer.run(model, reference, "reference")


def rescale_backward(p: RescalePass, select: int | None, retain: bool) -> T:
    """Multipliers of the target score with respect to ``x``, for the recorded reference
    rows (all of them, or row ``select`` shared by every sample)."""
    p.tracer.select = select
    (grad,) = torch.autograd.grad(p.score, p.xg, retain_graph=retain)
    return grad


def rescale_gradients(
    model: nn.Module, method: str, x: T, reference: T, target: TargetSpec | Target, maxpool: str
) -> tuple[T, T, Target]:
    """DeepLIFT-rescale multipliers of ``x`` against ``reference`` (``B`` rows, or one row
    shared by all samples); returns ``(multipliers, output, target)``."""
    with module_stack(model) as modules:
        p = rescale_forward(model, method, x, target, maxpool, modules)
        rescale_reference(p, model, reference)
    return rescale_backward(p, None, retain=False), p.output.detach(), p.target


# -- reveal-cancel: x and the reference in one batch, with the (dz+, dz-) split ---------


def _split(d: T) -> T:
    p = d.clamp(min=0)
    return torch.cat([p, d - p])


def _scale_split(sh: T, c: Any, b: int) -> T | None:
    """The split of ``c * t`` from the split of ``t`` (a negative factor swaps parts)."""
    p, n = sh[:b], sh[b:]
    if isinstance(c, (int, float)) and not isinstance(c, bool):
        return sh * c if c >= 0 else torch.cat([n * c, p * c])
    if isinstance(c, torch.Tensor) and c.is_floating_point():
        c = c.detach()
        if c.ndim == sh.ndim and c.shape[0] != 1:
            return None
        cp, cn = c.clamp(min=0), c.clamp(max=0)
        return torch.cat([cp * p + cn * n, cp * n + cn * p])
    return None


class _PairedTracer(Tracer):
    def __init__(self, method: str, modules: ModuleStack, b: int, maxpool: str, eps: float) -> None:
        super().__init__(method, modules)
        self.b = b
        self.maxpool = maxpool
        self.eps = eps
        self._splits: dict[int, tuple[Any, T]] = {}

    def split(self, t: T) -> T:
        """``[dt+; dt-]`` (``2B`` rows) of an input-dependent tensor of ``2B`` rows."""
        entry = self._splits.get(id(t))
        if entry is not None and entry[0]() is t:
            return entry[1]
        return _split(t[: self.b] - t[self.b :].detach())

    def _set(self, t: Any, sh: Any) -> None:
        if isinstance(t, torch.Tensor) and isinstance(sh, torch.Tensor):
            self._splits[id(t)] = (weakref.ref(t), sh)

    def _part(self, t: Any) -> Any:
        """The split of an operand: its own if input-dependent, zero for a constant."""
        if self.depends(t):
            return self.split(t)
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            return torch.zeros_like(t)
        return 0

    def dispatch(self, kind: str, func: Any, args: tuple, kwargs: dict, dep: list[T]) -> Any:
        if kind == "elementwise":
            z = args[0]
            f = out_of_place(func, args, kwargs)
            return _RevealCancelFn.apply(z, self.split(z), f, func in RELU_FUNCS, self.b, self.eps)
        if kind == "maxpool" and self.maxpool == "rescale":
            pool, wants = pool_with_indices(func, args, kwargs)
            y, idx = _PairedMaxPoolFn.apply(args[0], pool, self.b, self.eps)
            return (y, idx) if wants else y
        out = func(*args, **kwargs)
        self._check_rows(func, out)
        sh = None
        if kind == "layer":
            sh = self._layer_split(func, args, kwargs, out)
        elif kind == "batchnorm":
            scale, _ = batchnorm_scale(args, kwargs)
            sh = _scale_split(self.split(args[0]), channel_view(scale, args[0].ndim), self.b)
        elif kind == "struct":
            sh = self._struct_split(func, args, kwargs)
        elif kind == "scale":
            sh = self._scale_op_split(func, args, kwargs)
        if isinstance(out, (tuple, list)) and isinstance(sh, (tuple, list)):
            for o, s in zip(out, sh):
                self._set(o, s)
        else:
            self._set(out, sh)
        return out

    def _check_rows(self, func: Any, out: Any) -> None:
        for t in tensors_in(out):
            if t.is_floating_point() and (t.ndim == 0 or t.shape[0] != 2 * self.b):
                raise self.fail(
                    f"{op_name(func)} returned shape {tuple(t.shape)}; reveal_cancel runs x "
                    "and its reference as one batch and needs every tensor to keep the "
                    "batch axis first"
                )

    def _layer_split(self, func: Any, args: tuple, kwargs: dict, out: T) -> T:
        x, w, _bias, rest, kw = layer_args(func, args, kwargs)
        b = self.b
        d = x[:b] - x[b:].detach()
        dp = d.clamp(min=0)
        dn = d - dp
        wd = w.detach()
        wp = wd.clamp(min=0)
        wn = wd - wp
        pos = func(dp, wp, None, *rest, **kw) + func(dn, wn, None, *rest, **kw)
        neg = (out[:b] - out[b:].detach()) - pos
        return torch.cat([pos, neg])

    def _struct_split(self, func: Any, args: tuple, kwargs: dict) -> Any:
        if func in SUMS:
            other = args[1] if len(args) > 1 else kwargs.get("other")
            alpha = kwargs.get("alpha", 1)
            first = self._part(args[0])
            second = self._part(other)
            if isinstance(second, torch.Tensor):
                second = _scale_split(second, alpha, self.b)
                if second is None:
                    return None
            return first + second
        if func in CATS:
            tensors = args[0] if args else kwargs["tensors"]
            parts = [self._part(t) for t in tensors]
            return func(parts, *args[1:], **{k: v for k, v in kwargs.items() if k != "tensors"})
        if not self.depends(args[0]):
            return None
        if func is F.interpolate and not is_positive_interpolation(args, kwargs):
            return None
        rest_kw = dict(kwargs)
        if func is F.pad:
            named = arguments(F.pad, args, kwargs) or {}
            named.pop("input", None)
            named["value"] = None
            return F.pad(self.split(args[0]), **named)
        return func(self.split(args[0]), *args[1:], **rest_kw)

    def _scale_op_split(self, func: Any, args: tuple, kwargs: dict) -> T | None:
        name = getattr(func, "__name__", "")
        a = args[0]
        other = args[1] if len(args) > 1 else kwargs.get("other")
        alpha = kwargs.get("alpha", 1)
        if name in ("neg", "__neg__"):
            return _scale_split(self.split(a), -1, self.b)
        if name in ("mul", "__mul__", "__rmul__", "mul_", "__imul__"):
            const = other if self.depends(a) else a
            src = a if self.depends(a) else other
            return _scale_split(self.split(src), const, self.b)
        if name in ("div", "__truediv__", "div_", "__itruediv__", "true_divide"):
            if kwargs.get("rounding_mode") is not None:
                return None
            inv = 1.0 / other if isinstance(other, (int, float)) else torch.reciprocal(other)
            return _scale_split(self.split(a), inv, self.b)
        if name in ("sub", "__sub__", "sub_", "__isub__"):
            first, second = self._part(a), self._part(other)
        elif name in ("__rsub__", "rsub"):
            first, second = self._part(other), self._part(a)
        else:
            return None
        if not isinstance(second, torch.Tensor):
            return first
        second = _scale_split(second, -alpha, self.b)
        return None if second is None else first + second


class _RevealCancelFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, z: T, sh: T, f: Callable, relu: bool, b: int, eps: float) -> T:
        y = f(z)
        zx, zr, yx, yr = z[:b], z[b:], y[:b], y[b:]
        p, n = sh[:b], sh[b:]
        fp, fn = f(zr + p), f(zr + n)
        dyp = 0.5 * ((fp - yr) + (yx - fn))
        dyn = 0.5 * ((fn - yr) + (yx - fp))
        m = rescale_multiplier(f, zx, yx, zr, yr, eps, relu)
        mp = torch.where(p.abs() > eps, dyp / torch.where(p.abs() > eps, p, 1.0), m)
        mn = torch.where(n.abs() > eps, dyn / torch.where(n.abs() > eps, n, 1.0), m)
        ctx.b = b
        ctx.save_for_backward(mp, mn)
        return y

    @staticmethod
    def backward(ctx: Any, g: T) -> tuple[Any, ...]:
        mp, mn = ctx.saved_tensors
        gx = g[: ctx.b]
        return None, torch.cat([gx * mp, gx * mn]), None, None, None, None


class _PairedMaxPoolFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, z: T, pool: Callable, b: int, eps: float) -> tuple[T, T]:
        y, idx = pool(z)
        ctx.b, ctx.eps = b, eps
        ctx.save_for_backward(z, y, idx)
        ctx.mark_non_differentiable(idx)
        return y, idx

    @staticmethod
    def backward(ctx: Any, g: T, _g_idx: Any) -> tuple[Any, ...]:
        z, y, idx = ctx.saved_tensors
        b = ctx.b
        grad = torch.zeros_like(z)
        grad[:b] = maxpool_rescale_grad(
            g[:b], z[:b], y[:b], idx[:b], z[b:], y[b:], idx[b:], ctx.eps
        )
        return grad, None, None, None


def reveal_cancel_gradients(
    model: nn.Module, method: str, x: T, reference: T, target: TargetSpec | Target, maxpool: str
) -> tuple[T, T, Target]:
    """DeepLIFT-RevealCancel multipliers of ``x`` against ``reference`` (``B`` rows);
    returns ``(multipliers, output, target)``."""
    check_traceable(model, method)
    b = x.shape[0]
    with module_stack(model) as modules:
        tracer = _PairedTracer(method, modules, b, maxpool, eps_for(x.dtype))
        xg = x.detach().requires_grad_(True)
        both = torch.cat([xg, reference.expand_as(x)])
        tracer.mark(both)
        with tracer:
            out = model(both)
    out = check_output(out, 2 * b)
    output = out[:b]
    resolved = resolve_target(target, output.detach())
    (grad,) = torch.autograd.grad(resolved.scores(output).sum(), xg)
    return grad, output.detach(), resolved
