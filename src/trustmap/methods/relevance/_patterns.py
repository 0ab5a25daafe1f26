"""Signal patterns and the PatternNet / PatternAttribution backward passes.

Kindermans et al. 2018, "Learning how to explain neural networks: PatternNet and
PatternAttribution" (ICLR). For a linear or convolutional layer with output neuron
``y = w^T x`` the *pattern* ``a`` is the direction in which the signal of ``y`` lies in the
input: with ``x = a y + d`` (signal plus distractor, ``cov(d, y) = 0``)::

    a = cov(x, y) / (w^T cov(x, y))                       (pattern_type="linear")

and, for ReLU networks, the two-component estimator computed separately over the
samples where the neuron is active and where it is not::

    a+ = cov+(x, y) / (w^T cov+(x, y)),  a- = cov-(x, y) / (w^T cov-(x, y))   ("relu")

The statistics are sums over samples and, for convolutions, over positions of the
receptive-field patch ``x`` and the output ``y``; they are gathered with the
convolution's weight-gradient kernel (``sum y * patch(x)`` is the weight gradient for an
output gradient ``y``), in float64.

Backward passes, initialised with the target score at the output:

* PatternNet: the signal estimate, propagated with each layer's weights replaced by its
  patterns (``a+`` where the neuron was active in the forward pass, ``a-`` elsewhere)
  and the ReLUs gating as in the forward pass;
* PatternAttribution: the same with the weights replaced by ``w * a``.

BatchNorm in eval mode is folded into the convolution or linear layer that feeds it,
without rewriting the model: a pattern is invariant to a per-channel affine map of
``y`` (``a`` for ``s y + t`` equals ``a`` for ``y``), so the folded layer's patterns are the
layer's own, its regime (active or not) is read after the BatchNorm, and the BatchNorm
itself, a one-input linear neuron with weight ``s`` and pattern ``1 / s``, scales the
PatternNet signal by ``1 / s`` and the PatternAttribution relevance by ``s * (1 / s) = 1``.
A BatchNorm that does not directly follow a layer (DenseNet's pre-activation
BatchNorm after a concatenation) is the same one-input neuron on its own, and the layers
behind it get their regime from their own output.

Max pooling, average pooling, concatenation, additions and reshaping pass the signal
back as the gradient does (as in iNNvestigate). Other activations than ReLU, transposed
convolutions and ops without a rule raise a ValueError naming the layer.
"""

from __future__ import annotations

import copy
import math
import weakref
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from trustmap.core.base import Explainer
from trustmap.core.batching import chunks
from trustmap.core.hooks import model_guard
from trustmap.core.targets import Target, TargetSpec, resolve_target
from trustmap.core.validation import check_input, check_model_matches, check_output, choice
from trustmap.core.validation import positive_int as _positive_int
from trustmap.methods.relevance._tracing import (
    CONV_TRANSPOSES,
    CONVS,
    RELU_FUNCS,
    ModuleStack,
    Tracer,
    batchnorm_scale,
    channel_view,
    check_traceable,
    layer_args,
    module_stack,
    op_name,
)

T = torch.Tensor
PATTERN_TYPES = ("relu", "linear")


@dataclass(frozen=True)
class LayerPattern:
    """The patterns of one call of a linear or convolutional layer.

    ``positive`` (``a+``) and ``negative`` (``a-``) have the layer's weight shape
    ``(C_out, C_in / groups, *kernel)`` or ``(out, in)``; for ``pattern_type="linear"``
    both are the one pattern ``a``. ``w^T a = 1`` for every output channel. ``counts`` is
    the number of (sample, position) pairs per output channel and regime the statistics
    came from, shape ``(2, C_out)``.
    """

    name: str
    op: str
    positive: T
    negative: T
    counts: T


# -- geometry of a conv call ---------------------------------------------------------------


@dataclass
class _Layer:
    """One call of a linear or conv layer, normalised for the weight- and input-gradient
    kernels."""

    name: str
    func: Any
    weight: T
    bias: T | None
    rest: tuple
    kw: dict
    dims: int = 0  # 0 for linear
    stride: list[int] = field(default_factory=list)
    padding: list[int] = field(default_factory=list)
    dilation: list[int] = field(default_factory=list)
    groups: int = 1
    pre_pad: list[int] | None = None  # F.pad for padding="same" with an even kernel

    @property
    def op(self) -> str:
        return "linear" if self.dims == 0 else f"conv{self.dims}d"


def _ints(v: Any, n: int) -> list[int]:
    if isinstance(v, int):
        return [v] * n
    v = list(v)
    return v * n if len(v) == 1 else v


def _layer(func: Any, args: tuple, kwargs: dict, name: str) -> _Layer:
    _x, w, b, rest, kw = layer_args(func, args, kwargs)
    layer = _Layer(name, func, w.detach(), None if b is None else b.detach(), rest, kw)
    if func is F.linear:
        return layer
    d = CONVS[func]
    names = ("stride", "padding", "dilation", "groups")
    values = dict(zip(names, (1, 0, 1, 1)))
    values.update(zip(names, rest))
    values.update({k: v for k, v in kw.items() if k in names})
    layer.dims = d
    layer.stride = _ints(values["stride"], d)
    layer.dilation = _ints(values["dilation"], d)
    layer.groups = int(values["groups"])
    padding = values["padding"]
    if padding == "valid":
        padding = 0
    if padding == "same":
        totals = [dil * (k - 1) for dil, k in zip(layer.dilation, w.shape[2:])]
        if all(t % 2 == 0 for t in totals):
            padding = [t // 2 for t in totals]
        else:
            # F.pad lists the last axis first; the extra element goes after (as torch).
            layer.pre_pad = [p for t in reversed(totals) for p in (t // 2, t - t // 2)]
            padding = 0
    layer.padding = _ints(padding, d)
    return layer


_WEIGHT_GRAD = {1: torch.nn.grad.conv1d_weight, 2: torch.nn.grad.conv2d_weight,
                3: torch.nn.grad.conv3d_weight}  # fmt: skip
_INPUT_GRAD = {1: torch.nn.grad.conv1d_input, 2: torch.nn.grad.conv2d_input,
               3: torch.nn.grad.conv3d_input}  # fmt: skip


def _weight_grad(layer: _Layer, x: T, g: T, out_channels: int, groups: int) -> T:
    """``sum over samples and positions of g * patch(x)``, shape ``(out_channels, ...)``."""
    if layer.dims == 0:
        return g.reshape(-1, g.shape[-1]).t() @ x.reshape(-1, x.shape[-1])
    if layer.pre_pad is not None:
        x = F.pad(x, layer.pre_pad)
    size = (out_channels, x.shape[1] // groups, *layer.weight.shape[2:])
    return _WEIGHT_GRAD[layer.dims](x, size, g, layer.stride, layer.padding, layer.dilation, groups)


def _input_grad(layer: _Layer, shape: torch.Size, weight: T, g: T) -> T:
    """The layer's backward pass to its input with ``weight`` in place of its weights."""
    if layer.dims == 0:
        return g @ weight
    if layer.pre_pad is None:
        return _INPUT_GRAD[layer.dims](
            shape, weight, g, layer.stride, layer.padding, layer.dilation, layer.groups
        )
    padded = list(shape[:2]) + [
        s + layer.pre_pad[2 * (layer.dims - 1 - i)] + layer.pre_pad[2 * (layer.dims - 1 - i) + 1]
        for i, s in enumerate(shape[2:])
    ]
    grad = _INPUT_GRAD[layer.dims](
        padded, weight, g, layer.stride, layer.padding, layer.dilation, layer.groups
    )
    index = [slice(None), slice(None)]
    for i, s in enumerate(shape[2:]):
        left = layer.pre_pad[2 * (layer.dims - 1 - i)]
        index.append(slice(left, left + s))
    return grad[tuple(index)]


# -- statistics ----------------------------------------------------------------------------


@dataclass
class _Record:
    layer: _Layer
    x: T
    y: T
    regime: T


class _Stats:
    """Running sums of one layer call: ``[sum y x, sum x, sum y, count]`` over the active
    regime and over all samples, in float64."""

    def __init__(self, layer: _Layer) -> None:
        self.name, self.op = layer.name, layer.op
        self.weight_shape = tuple(layer.weight.shape)
        self.sums: dict[str, T] | None = None

    def update(self, r: _Record) -> None:
        layer, x, y = r.layer, r.x, r.y
        active = (r.regime > 0).to(y.dtype)
        c = y.shape[1] if layer.dims else y.shape[-1]
        axes = [0, *range(2, y.ndim)] if layer.dims else list(range(y.ndim - 1))
        ya = y * active
        if layer.dims and layer.groups == 1:
            both = _weight_grad(layer, x, torch.cat([ya, active, y], 1), 3 * c, 1)
            sxy_pos, sx_pos, sxy = both[:c], both[c : 2 * c], both[2 * c :]
            ones = torch.ones_like(y[:, :1])
            sx = _weight_grad(layer, x, ones, 1, 1).expand_as(sxy_pos).clone()
        else:
            groups = layer.groups
            sxy_pos = _weight_grad(layer, x, ya, c, groups)
            sx_pos = _weight_grad(layer, x, active, c, groups)
            sxy = _weight_grad(layer, x, y, c, groups)
            sx = _weight_grad(layer, x, torch.ones_like(y), c, groups)
        new = {
            "sxy_pos": sxy_pos,
            "sx_pos": sx_pos,
            "sy_pos": ya.sum(axes),
            "n_pos": active.sum(axes),
            "sxy": sxy,
            "sx": sx,
            "sy": y.sum(axes),
            "n": torch.full((c,), y.numel() / c, dtype=y.dtype, device=y.device),
        }
        new = {k: v.to(torch.float64) for k, v in new.items()}
        if self.sums is None:
            self.sums = new
        else:
            for k, v in new.items():
                self.sums[k] += v

    def pattern(self, weight: T, pattern_type: str) -> LayerPattern:
        s = self.sums
        assert s is not None
        w = weight.detach().to(torch.float64)
        n_neg = s["n"] - s["n_pos"]
        if pattern_type == "linear":
            pos = neg = _pattern(w, s["sxy"], s["sx"], s["sy"], s["n"])
        else:
            pos = _pattern(w, s["sxy_pos"], s["sx_pos"], s["sy_pos"], s["n_pos"])
            neg = _pattern(
                w, s["sxy"] - s["sxy_pos"], s["sx"] - s["sx_pos"], s["sy"] - s["sy_pos"], n_neg
            )
        counts = torch.stack([s["n_pos"], n_neg])
        # Stored in the layer's dtype: the backward pass uses them as weights.
        dtype = weight.dtype
        return LayerPattern(self.name, self.op, pos.to(dtype), neg.to(dtype), counts)


def _pattern(w: T, sxy: T, sx: T, sy: T, n: T) -> T:
    """``cov(x, y) / (w^T cov(x, y))`` per output channel; ``w / |w|^2`` (the pattern of
    white data) where the covariance is degenerate (fewer than 2 samples, or orthogonal
    to ``w``)."""
    view = (-1,) + (1,) * (w.ndim - 1)
    safe_n = n.clamp(min=1).view(view)
    cov = sxy / safe_n - (sx / safe_n) * (sy.view(view) / safe_n)
    flat_w, flat_cov = w.reshape(w.shape[0], -1), cov.reshape(cov.shape[0], -1)
    den = (flat_w * flat_cov).sum(1)
    scale = flat_w.norm(dim=1) * flat_cov.norm(dim=1)
    ok = (n >= 2) & (den.abs() > 1e-10 * scale) & (scale > 0)
    a = cov / torch.where(ok, den, 1.0).view(view)
    if bool(ok.all()):
        return a
    w_norm2 = (flat_w**2).sum(1)
    white = w / torch.where(w_norm2 > 0, w_norm2, 1.0).view(view)
    return torch.where(ok.view(view), a, white)


# -- the tracer ------------------------------------------------------------------------------


class _PatternTracer(Tracer):
    """Fit phase: records each layer's input, output and regime. Explain phase: the
    layers back-propagate with patterns (``attribution``: weights times patterns)."""

    def __init__(
        self, method: str, modules: ModuleStack, phase: str, collect: bool, attribution: bool
    ) -> None:
        super().__init__(method, modules)
        self.phase = phase
        self.collect = collect
        self.attribution = attribution
        self.layers: list[_Layer] = []
        self.records: list[_Record] = []
        self.masks: list[T | None] = []
        self.patterns: list[LayerPattern] | None = None
        self._output_of: dict[int, tuple[Any, int]] = {}

    def dispatch(self, kind: str, func: Any, args: tuple, kwargs: dict, dep: list[T]) -> Any:
        if kind == "elementwise" and func not in RELU_FUNCS:
            raise self.fail(
                f"{op_name(func)} is not a ReLU; PatternNet and PatternAttribution are "
                "defined for ReLU networks"
            )
        if kind == "layer":
            if func in CONV_TRANSPOSES:
                raise self.fail(
                    f"{op_name(func)}: patterns are defined for Linear and Conv1d/2d/3d "
                    "layers, not transposed convolutions"
                )
            return self._layer(func, args, kwargs)
        if kind == "batchnorm":
            return self._batchnorm(func, args, kwargs)
        return func(*args, **kwargs)

    def _layer(self, func: Any, args: tuple, kwargs: dict) -> T:
        layer = _layer(func, args, kwargs, self.modules.current_name())
        k = len(self.layers)
        self.layers.append(layer)
        self.masks.append(None)
        x = args[0]
        if self.phase == "explain":
            out = _PatternLayerFn.apply(x, self, k)
        else:
            out = func(*args, **kwargs)
        if self.collect:
            self.records.append(_Record(layer, x.detach(), out.detach(), out.detach()))
        self.masks[k] = out.detach() > 0
        self._output_of[id(out)] = (weakref.ref(out), k)
        return out

    def _batchnorm(self, func: Any, args: tuple, kwargs: dict) -> T:
        x = args[0]
        scale, _ = batchnorm_scale(args, kwargs)
        if self.phase == "explain":
            factor = torch.ones_like(scale) if self.attribution else _safe_inverse(scale)
            out = _ScaleBackFn.apply(x, func, args[1:], kwargs, channel_view(factor, x.ndim))
        else:
            out = func(*args, **kwargs)
        entry = self._output_of.get(id(x))
        if entry is not None and entry[0]() is x:
            k = entry[1]
            self.masks[k] = out.detach() > 0
            if self.collect:
                self.records[k].regime = out.detach()
        return out

    def backward_weights(self, k: int) -> tuple[T, T]:
        assert self.patterns is not None
        p, layer = self.patterns[k], self.layers[k]
        w = layer.weight
        pos, neg = p.positive.to(w.device, w.dtype), p.negative.to(w.device, w.dtype)
        if self.attribution:
            pos, neg = pos * w, neg * w
        return pos, neg

    def check_patterns(self, patterns: list[LayerPattern]) -> None:
        if len(patterns) != len(self.layers) or any(
            p.name != lay.name or tuple(p.positive.shape) != tuple(lay.weight.shape)
            for p, lay in zip(patterns, self.layers)
        ):
            fitted = [(p.name, tuple(p.positive.shape)) for p in patterns]
            seen = [(lay.name, tuple(lay.weight.shape)) for lay in self.layers]
            raise ValueError(
                f"{self.method}: the patterns were fitted for the layer calls {fitted}, but "
                f"this forward pass calls {seen}; fit on the same model"
            )
        self.patterns = patterns


def _safe_inverse(s: T) -> T:
    tiny = torch.finfo(s.dtype).tiny ** 0.5
    return torch.where(s.abs() > tiny, 1.0 / torch.where(s.abs() > tiny, s, 1.0), 0.0)


class _PatternLayerFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: T, tracer: _PatternTracer, k: int) -> T:
        layer = tracer.layers[k]
        ctx.tracer, ctx.k, ctx.shape = tracer, k, x.shape
        return layer.func(x, layer.weight, layer.bias, *layer.rest, **layer.kw)

    @staticmethod
    def backward(ctx: Any, g: T) -> tuple[T, None, None]:
        tracer, k = ctx.tracer, ctx.k
        layer = tracer.layers[k]
        pos, neg = tracer.backward_weights(k)
        active = tracer.masks[k]
        g_pos = g * active
        g_neg = g - g_pos
        grad = _input_grad(layer, ctx.shape, pos, g_pos)
        # Below a ReLU, the inactive part of the signal is gated to zero already.
        if bool(g_neg.any()):
            grad = grad + _input_grad(layer, ctx.shape, neg, g_neg)
        return grad, None, None


class _ScaleBackFn(torch.autograd.Function):
    """BatchNorm forward; backward multiplies by ``factor`` instead of the scale."""

    @staticmethod
    def forward(ctx: Any, x: T, func: Any, rest: tuple, kwargs: dict, factor: T) -> T:
        ctx.save_for_backward(factor)
        return func(x, *rest, **kwargs)

    @staticmethod
    def backward(ctx: Any, g: T) -> tuple[Any, ...]:
        (factor,) = ctx.saved_tensors
        return g * factor, None, None, None, None


# -- fitting and explaining ----------------------------------------------------------------


def _accumulate(stats: list[_Stats], records: list[_Record]) -> list[_Stats]:
    if not stats:
        stats = [_Stats(r.layer) for r in records]
    if len(stats) != len(records):
        raise ValueError("the model's forward pass called a different number of layers")
    for s, r in zip(stats, records):
        s.update(r)
    return stats


def fit_patterns(
    model: nn.Module, data: T, batch_size: int | None, pattern_type: str, method: str
) -> list[LayerPattern]:
    """Patterns of every layer call of ``model`` from the samples ``data``."""
    check_traceable(model, method)
    stats: list[_Stats] = []
    layers: list[_Layer] = []
    with module_stack(model) as modules, torch.no_grad():
        for sl in chunks(data.shape[0], batch_size):
            tracer = _PatternTracer(method, modules, "fit", collect=True, attribution=False)
            batch = data[sl]
            tracer.mark(batch)
            with tracer:
                check_output(model(batch), batch.shape[0])
            stats = _accumulate(stats, tracer.records)
            layers = tracer.layers
    return [s.pattern(layer.weight, pattern_type) for s, layer in zip(stats, layers)]


def explain_with_patterns(
    model: nn.Module,
    x: T,
    target: TargetSpec | Target,
    patterns: list[LayerPattern] | None,
    pattern_type: str,
    attribution: bool,
    method: str,
) -> tuple[T, T, Target, list[LayerPattern]]:
    """One forward pass and one pattern backward pass; patterns from ``x`` itself when
    ``patterns`` is None. Returns the map, the output, the target and the patterns."""
    check_traceable(model, method)
    with module_stack(model) as modules:
        tracer = _PatternTracer(method, modules, "explain", patterns is None, attribution)
        xg = x.detach().requires_grad_(True)
        tracer.mark(xg)
        with tracer:
            output = model(xg)
    output = check_output(output, x.shape[0])
    if patterns is None:
        stats = _accumulate([], tracer.records)
        patterns = [s.pattern(lay.weight, pattern_type) for s, lay in zip(stats, tracer.layers)]
        tracer.records = []
    tracer.check_patterns(patterns)
    resolved = resolve_target(target, output)
    score = resolved.scores(output)
    # Initialised with the output's own value: the signal of the explained neuron.
    (grad,) = torch.autograd.grad((score * score.detach()).sum(), xg)
    return grad, output.detach(), resolved, patterns


class PatternExplainer(Explainer):
    """Shared by PatternNet and PatternAttribution (see :mod:`._patterns`).

    ``fit(data)`` learns the patterns from a sample of inputs and stores them on the
    explainer as ``patterns_`` (a list of :class:`LayerPattern`, one per layer call in
    forward order), returning the explainer itself, as scikit-learn's ``fit`` does.
    Without a fit, ``data`` decides: ``"input"`` (default) fits the patterns on the
    batch being explained, in the same forward pass (convenient, but an estimate from
    a few images, and each sample's map depends on the rest of the batch); a tensor is
    fitted on at every call; ``None`` raises until ``fit`` is called.

    The PatternNet signal can grow by orders of magnitude per layer (patterns of
    correlated inputs are long when the filters are not aligned with the data, as in an
    untrained network): on MONAI's untrained DenseNet121 it reaches about ``2^500``. When
    a sample's map overflows (or underflows to zero) in ``x``'s dtype, it is recomputed
    on a float64 copy of the model and scaled by a power of two into range; the
    exponents are reported as ``signal_log2_scale`` (true map = map * 2^exponent).

    Parameters
    ----------
    pattern_type:
        ``"relu"`` (two-component ``a+`` / ``a-``) or ``"linear"`` (one ``a``).
    data:
        ``"input"``, a tensor ``(N, C, *spatial)`` of samples, or ``None``.
    batch_size:
        Samples per forward pass when fitting on a tensor; ``None``: all at once.
    """

    attribution: ClassVar[bool] = False

    def __init__(
        self,
        model: nn.Module,
        *,
        pattern_type: str = "relu",
        data: str | torch.Tensor | None = "input",
        batch_size: int | None = None,
    ) -> None:
        self.model = model
        self.pattern_type = pattern_type
        self.data = data
        self.batch_size = batch_size

    def fit(self, data: torch.Tensor, *, batch_size: int | None = None) -> PatternExplainer:
        """Learn the patterns from ``data`` ``(N, C, *spatial)``; returns ``self``."""
        pattern_type = choice("pattern_type", self.pattern_type, PATTERN_TYPES)
        data = check_input(data)
        if batch_size is not None:
            _positive_int("batch_size", batch_size)
        check_model_matches(self.model, data)
        with model_guard(self.model):
            patterns = fit_patterns(self.model, data, batch_size, pattern_type, self.name)
        self.patterns_ = patterns
        return self

    def attribute(
        self, x: torch.Tensor, target: TargetSpec | Target
    ) -> tuple[torch.Tensor, torch.Tensor, Target, dict[str, Any]]:
        pattern_type = choice("pattern_type", self.pattern_type, PATTERN_TYPES)
        if self.batch_size is not None:
            _positive_int("batch_size", self.batch_size)
        patterns = getattr(self, "patterns_", None)
        source = "fit"
        if patterns is None:
            data = self.data
            if data is None:
                raise ValueError(
                    f"{self.name} has no patterns yet: call .fit(data) with a sample of "
                    "inputs first, or pass data='input' or data=tensor to the constructor"
                )
            if isinstance(data, torch.Tensor):
                data = check_input(data)
                check_model_matches(self.model, data)
                patterns = fit_patterns(self.model, data, self.batch_size, pattern_type, self.name)
                source = "data"
            elif isinstance(data, str) and data == "input":
                source = "input"
            else:
                raise ValueError(f"data must be 'input', a tensor or None, got {data!r}")
        grad, output, resolved, patterns = explain_with_patterns(
            self.model, x, target, patterns, pattern_type, self.attribution, self.name
        )
        extra: dict[str, Any] = {"pattern_source": source}
        if _out_of_range(grad, resolved.scores(output)) and x.dtype != torch.float64:
            grad, exponents = self._wide(x, resolved, patterns, pattern_type)
            extra["signal_log2_scale"] = exponents
        return grad, output, resolved, extra

    def _wide(
        self, x: T, target: Target, patterns: list[LayerPattern], pattern_type: str
    ) -> tuple[T, list[int]]:
        """The map computed on a float64 copy of the model, each sample scaled by a power
        of two into ``x``'s range if it lies outside (the exponents are returned)."""
        try:
            wide = copy.deepcopy(self.model).to(torch.float64)
        except Exception as exc:
            raise ValueError(
                f"{self.name}: the signal leaves the {x.dtype} range on this network and "
                f"the model cannot be copied to float64 ({exc}); pass a float64 model and x"
            ) from exc
        grad, _, _, _ = explain_with_patterns(
            wide, x.double(), target, patterns, pattern_type, self.attribution, self.name
        )
        info = torch.finfo(x.dtype)
        exponents = []
        for i in range(grad.shape[0]):
            peak = float(grad[i].abs().max())
            if not math.isfinite(peak):
                raise ValueError(
                    f"{self.name}: the signal exceeds the float64 range on this network "
                    "(the patterns amplify it layer after layer)"
                )
            e = 0
            if peak > info.max / 4 or 0 < peak < info.tiny * 2.0**30:
                e = math.frexp(peak)[1]
                grad[i] = torch.ldexp(grad[i], torch.tensor(-e, device=grad.device))
            exponents.append(e)
        return grad.to(x.dtype), exponents


def _out_of_range(grad: T, scores: T) -> bool:
    """Whether a sample's map overflowed, or underflowed to zero for a nonzero score."""
    flat = grad.reshape(grad.shape[0], -1)
    if not bool(torch.isfinite(flat).all()):
        return True
    return bool(((flat == 0).all(1) & (scores.detach() != 0)).any())
