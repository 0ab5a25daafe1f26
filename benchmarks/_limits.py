"""Timing, and the bare-PyTorch limit of each method.

A method's *limit* is the cost of the forward and backward passes it cannot avoid,
written as plainly as PyTorch allows: no validation, no target resolution, no hook
context managers, no chunk bookkeeping. ``limit_plan`` lists those passes per method; a
method without a rule gets ``None`` and is reported with limit "n/a".

A plan is a sum ``sum_i count_i * pass_i``. By default each distinct pass is timed on its
own (one warm-up, then the median of the repeats) and multiplied by its count: the passes
of a plan are independent and identical in cost, so this is the same sum, measured with
less noise and in a fraction of the time (the 3D Score-CAM limit alone is over a thousand
forward passes). ``exact=True`` runs the whole loop instead.
"""

from __future__ import annotations

import contextlib
import gc
import inspect
import math
import re
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# The CAM layer trustmap picks by default on MONAI's DenseNet121: the last feature map,
# the input of the global pooling (1024 channels).
DEFAULT_LAYER = "class_layers.relu"

# Default chunk sizes of the perturbation CAMs when their source cannot be read; the
# values are read from the source when possible (see ``default_chunk``).
SCORE_CAM_CHUNK = 32
ABLATION_CAM_CHUNK = 64

GRAD_CAM_LIKE = ("grad_cam", "grad_cam_pp", "layer_cam", "hires_cam", "xgrad_cam", "respond_cam")
GRADIENT_LIKE = ("gradient", "saliency", "input_x_gradient", "deconvnet", "guided_backprop")

# Targets: every method within this factor of its limit, XRAI within 1.5x of its IG passes.
LIMIT_FACTOR = 1.15
LIMIT_FACTORS = {"xrai": 1.5}


@dataclass(frozen=True)
class Setting:
    """One benchmark setting: a model, its input batch and the class explained."""

    label: str  # "2D" or "3D"
    model: nn.Module
    x: torch.Tensor  # (B, C, *spatial)
    target: int


# ------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Timing:
    """Median of the measured runs; ``runs`` is empty when the warm-up was counted."""

    seconds: float
    warmup: float
    runs: tuple[float, ...]

    @property
    def warmup_counted(self) -> bool:
        return not self.runs


def _timed(fn: Callable[[], object]) -> float:
    gc.collect()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def time_call(fn: Callable[[], object], repeats: int | None, long_call: float) -> Timing:
    """One warm-up call, then the median of ``repeats`` calls.

    ``repeats=None`` picks 3 for calls under 2 s and 1 otherwise; a warm-up of at least
    ``long_call`` seconds is then itself the measurement, since first-call costs (memory
    allocation, kernel selection) are well under a second and a second run of a call that
    long would double the run time for under a percent of accuracy.
    """
    warmup = _timed(fn)
    if repeats is None:
        if warmup >= long_call:
            return Timing(warmup, warmup, ())
        repeats = 3 if warmup < 2.0 else 1
    runs = tuple(_timed(fn) for _ in range(max(1, repeats)))
    return Timing(statistics.median(runs), warmup, runs)


# ------------------------------------------------------------------------------------
# Bare passes
# ------------------------------------------------------------------------------------
@contextlib.contextmanager
def _stored_output(module: nn.Module, replace: Callable | None = None) -> Iterator[list]:
    store: list[torch.Tensor] = []

    def hook(_m: nn.Module, _i: Any, out: torch.Tensor) -> torch.Tensor | None:
        if replace is not None:
            out = replace(out)
        store.append(out)
        return out if replace is not None else None

    handle = module.register_forward_hook(hook)
    try:
        yield store
    finally:
        handle.remove()


def input_gradient_pass(s: Setting) -> Callable[[], object]:
    """``x.requires_grad_(); out = model(x); autograd.grad(out[:, c].sum(), x)``."""

    def run() -> object:
        xg = s.x.detach().requires_grad_()
        out = s.model(xg)
        return torch.autograd.grad(out[:, s.target].sum(), xg)

    return run


def forward_pass(s: Setting, module: nn.Module | None = None) -> Callable[[], object]:
    """One forward of the batch under inference mode (storing the layer's output)."""

    def run() -> object:
        with torch.inference_mode():
            if module is None:
                return s.model(s.x)
            with _stored_output(module) as store:
                s.model(s.x)
            return store[-1]

    return run


def layer_gradient_pass(s: Setting, module: nn.Module) -> Callable[[], object]:
    """One forward storing the layer's output ``A``, then ``autograd.grad(score, A)``."""

    def run() -> object:
        with _stored_output(module) as store:
            out = s.model(s.x.detach().requires_grad_())
        return torch.autograd.grad(out[:, s.target].sum(), store[-1])

    return run


def layer_and_input_gradient_pass(s: Setting, module: nn.Module) -> Callable[[], object]:
    """One forward; the gradient to the layer (graph retained), then to the input."""

    def run() -> object:
        xg = s.x.detach().requires_grad_()
        with _stored_output(module) as store:
            out = s.model(xg)
        score = out[:, s.target].sum()
        (g_act,) = torch.autograd.grad(score, store[-1], retain_graph=True)
        (g_x,) = torch.autograd.grad(score, xg)
        return g_act, g_x

    return run


def score_cam_chunk_pass(s: Setting, act: torch.Tensor, rows: slice) -> Callable[[], object]:
    """Rows ``rows`` of the Score-CAM batch (row ``r``: sample ``r // K`` masked by its
    channel ``r % K``): upsampled, min-max normalised channels times ``x``, one forward."""
    k = act.shape[1]
    spatial = tuple(s.x.shape[2:])
    mode = "bilinear" if len(spatial) == 2 else "trilinear"
    dims = tuple(range(2, s.x.ndim))

    def run() -> object:
        with torch.inference_mode():
            r = torch.arange(rows.start, rows.stop)
            sample, channel = r // k, r % k
            maps = F.interpolate(
                act[sample, channel].unsqueeze(1), size=spatial, mode=mode, align_corners=False
            )
            low = maps.amin(dim=dims, keepdim=True)
            span = (maps.amax(dim=dims, keepdim=True) - low).clamp_min(1e-12)
            out = s.model(s.x[sample] * ((maps - low) / span))
            return torch.softmax(out, dim=1)[:, s.target]

    return run


def ablation_chunk_pass(
    s: Setting, module: nn.Module, sample: int, channels: range, k: int, expand: bool
) -> Callable[[], object]:
    """The target score of sample ``sample`` with one channel of the layer zeroed per row,
    for ``len(channels)`` rows. ``expand``: the sample is forwarded once and the layer's
    output replaced by the ablated copies; otherwise ``n`` copies of the sample are
    forwarded (for models that mix the layer's output with earlier tensors)."""
    n = len(channels)
    drop = torch.zeros((n, k), dtype=torch.bool)
    drop[torch.arange(n), torch.tensor(list(channels))] = True
    drop = drop.reshape(n, k, *([1] * (s.x.ndim - 2)))
    x1 = s.x[sample : sample + 1]
    inputs = x1 if expand else x1.expand(n, *x1.shape[1:])

    def ablate(out: torch.Tensor) -> torch.Tensor:
        return (out.expand(n, *out.shape[1:]) if expand else out).masked_fill(drop, 0)

    def run() -> object:
        with torch.inference_mode(), _stored_output(module, replace=ablate):
            out = s.model(inputs)
        return out[:, s.target]

    return run


# ------------------------------------------------------------------------------------
# Plans
# ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Pass:
    """``count`` repetitions of one bare pass; ``key`` identifies equal passes so that a
    pass shared by several methods is timed once per setting."""

    key: str
    count: int
    run: Callable[[], object]


@dataclass(frozen=True)
class LimitPlan:
    description: str
    passes: tuple[Pass, ...]
    factor: float = LIMIT_FACTOR


@dataclass
class LimitResult:
    seconds: float
    description: str
    factor: float
    pass_seconds: dict[str, float] = field(default_factory=dict)
    exact: bool = False


def default_chunk(cls: type, fallback: int) -> int:
    """The chunk size a perturbation CAM uses when ``batch_size`` is None, read from its
    source (``check_batch_size(self.batch_size, 32)``) so the limit follows the library."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return fallback
    match = re.search(r"check_batch_size\(\s*self\.batch_size\s*,\s*(\d+)\s*\)", source)
    return int(match.group(1)) if match else fallback


def _chunk_passes(
    prefix: str, n: int, size: int, make: Callable[[slice], Callable[[], object]]
) -> list[Pass]:
    """Passes for ``n`` rows in chunks of ``size``: the full chunks and the remainder."""
    full, rest = divmod(n, size)
    passes = []
    if full:
        passes.append(Pass(f"{prefix} x{size}", full, make(slice(0, size))))
    if rest:
        passes.append(Pass(f"{prefix} x{rest}", 1, make(slice(full * size, n))))
    return passes


def limit_plan(
    name: str, cls: type, params: dict[str, Any], s: Setting, layer_of: Callable[[str], nn.Module]
) -> LimitPlan | None:
    """The bare passes ``name`` needs with ``params`` (its effective parameters), or None
    when no rule is defined for it."""
    b = s.x.shape[0]
    grad = Pass(f"input-gradient pass (B={b})", 1, input_gradient_pass(s))

    def grads(n: int, what: str) -> LimitPlan:
        p = Pass(grad.key, n, grad.run)
        factor = LIMIT_FACTORS.get(name, LIMIT_FACTOR)
        plural = "pass" if n == 1 else "passes"
        return LimitPlan(f"{n} input-gradient {plural} ({what})", (p,), factor)

    if name in GRADIENT_LIKE:
        return grads(1, "forward + backward")
    if name == "integrated_gradients":
        return grads(int(params["n_steps"]), "n_steps")
    if name == "smoothgrad":
        if params.get("base", "gradient") != "gradient":
            return None
        return grads(int(params["n_samples"]), "n_samples")
    if name == "smooth_ig":
        n, m = int(params["n_samples"]), int(params["n_steps"])
        return grads(n * m, f"n_samples {n} x n_steps {m}")
    if name == "xrai":
        baselines = params.get("baselines", ("min", "max"))
        n_base = len(baselines) if isinstance(baselines, (list, tuple)) else 1
        steps = int(params.get("n_steps", params.get("steps", 25)))
        return grads(n_base * steps, f"{n_base} baselines x n_steps {steps}")

    layer = params.get("layer") or DEFAULT_LAYER
    module = layer_of(layer)
    if name in GRAD_CAM_LIKE:
        p = Pass(f"layer-gradient pass {layer} (B={b})", 1, layer_gradient_pass(s, module))
        return LimitPlan("1 forward + backward to the layer", (p,))
    if name in ("cam", "eigen_cam"):
        p = Pass(f"forward storing {layer} (B={b})", 1, forward_pass(s, module))
        return LimitPlan("1 forward", (p,))
    if name == "guided_grad_cam":
        p = Pass(
            f"layer+input-gradient pass {layer} (B={b})",
            1,
            layer_and_input_gradient_pass(s, module),
        )
        return LimitPlan("1 forward + backward to the layer + backward to the input", (p,))
    if name in ("score_cam", "ablation_cam"):
        first = Pass(f"forward storing {layer} (B={b})", 1, forward_pass(s, module))
        act = first.run()
        assert isinstance(act, torch.Tensor)
        k = act.shape[1]
        if name == "score_cam":
            size = int(params.get("batch_size") or default_chunk(cls, SCORE_CAM_CHUNK))
            chunks = _chunk_passes(
                f"Score-CAM masked forward {layer}",
                b * k,
                size,
                lambda sl: score_cam_chunk_pass(s, act, sl),
            )
            baseline = Pass(f"forward (B={b})", 1, forward_pass(s))
            n_fwd = sum(p.count for p in chunks)
            return LimitPlan(
                f"1 forward + {n_fwd} masked forwards of {size} rows (K={k}) + 1 baseline",
                (first, baseline, *chunks),
            )
        size = int(params.get("batch_size") or default_chunk(cls, ABLATION_CAM_CHUNK))
        full, rest = divmod(k, size)
        expand = True
        try:
            ablation_chunk_pass(s, module, 0, range(min(size, k)), k, expand=True)()
        except RuntimeError:
            expand = False
        mode = "expanded" if expand else "copies"
        chunks = []
        if full:
            run = ablation_chunk_pass(s, module, 0, range(size), k, expand)
            chunks.append(Pass(f"ablated forward {layer} x{size} {mode}", b * full, run))
        if rest:
            run = ablation_chunk_pass(s, module, 0, range(full * size, k), k, expand)
            chunks.append(Pass(f"ablated forward {layer} x{rest} {mode}", b, run))
        n_fwd = sum(p.count for p in chunks)
        return LimitPlan(
            f"1 forward + {n_fwd} ablated forwards of {size} channels (K={k}, {mode})",
            (first, *chunks),
        )
    return None


class LimitTimer:
    """Times plans within one setting, timing each distinct pass (or plan) once."""

    def __init__(self, repeats: int | None, long_call: float, exact: bool) -> None:
        self.repeats = repeats
        self.long_call = long_call
        self.exact = exact
        self._cache: dict[str, float] = {}

    def time(self, plan: LimitPlan) -> LimitResult:
        if self.exact:
            key = plan.description + "|" + "|".join(p.key for p in plan.passes)
            if key not in self._cache:

                def loop() -> None:
                    for p in plan.passes:
                        for _ in range(p.count):
                            p.run()

                self._cache[key] = time_call(loop, self.repeats, self.long_call).seconds
            return LimitResult(self._cache[key], plan.description, plan.factor, exact=True)
        per_pass: dict[str, float] = {}
        total = 0.0
        for p in plan.passes:
            if p.key not in self._cache:
                self._cache[p.key] = time_call(p.run, self.repeats, self.long_call).seconds
            per_pass[p.key] = self._cache[p.key]
            total += p.count * self._cache[p.key]
        return LimitResult(total, plan.description, plan.factor, per_pass)


def effective_params(cls: type, overrides: dict[str, Any]) -> dict[str, Any]:
    """The constructor defaults of ``cls`` updated by the benchmark's ``overrides`` (only
    those the constructor takes)."""
    sig = inspect.signature(cls.__init__)
    params = {
        n: p.default
        for n, p in sig.parameters.items()
        if n not in ("self", "model") and p.default is not inspect.Parameter.empty
    }
    params.update({k: v for k, v in overrides.items() if k in sig.parameters})
    return params


def accepted(cls: type, overrides: dict[str, Any]) -> dict[str, Any]:
    """The ``overrides`` that the constructor of ``cls`` takes."""
    sig = inspect.signature(cls.__init__)
    return {k: v for k, v in overrides.items() if k in sig.parameters}


def is_finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)
