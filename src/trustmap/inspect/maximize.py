"""Activation maximization: class-model visualization and Deep Dream (Huff et al. 2021,
section 3.2.1; Borys et al. 2023).

* :func:`maximize` (class model visualization, Simonyan et al. 2014): the image ``I`` that
  maximizes ``S_c(I) - lambda ||I - m||^2``, the unnormalised score of class ``c`` with an
  L2 penalty (``m = 0`` in Simonyan et al.; the data's mean intensity is a better centre
  for images in [0, 1]). Or, with ``layer`` (and ``channel``), the image that maximizes a
  hidden unit's mean activation.
* :func:`deep_dream` (Mordvintsev et al. 2015): start from a real image and let a layer
  (or one channel) enhance whatever it detects, by gradient ascent on its activation.

Both ascend by Adam on the image in a fixed number of steps, seeded. Three
regularizers keep the image natural, as is usual since Simonyan et al.: jitter (a random
shift of up to ``jitter`` pixels per axis before every step; Mordvintsev et al.), blur
(a Gaussian of ``blur_sigma`` pixels every ``blur_every`` steps; Yosinski et al. 2015) and
total variation ``tv * mean(|grad I|^2)``. The penalties are means over pixels, so
``lambda`` does not depend on the image size (``lambda ||.||^2`` with ``lambda / N``).
Everything works in 2D and 3D. The model is never modified: gradients are taken with
respect to the image only, in eval mode.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from trustmap.core.hooks import model_guard
from trustmap.core.validation import check_output
from trustmap.errors import InputError
from trustmap.inspect.activations import (
    _capture,
    _model_device,
    _model_dtype,
    batch_of_one,
    require_spatial,
)
from trustmap.methods.gradient.integrated_gradients import gaussian_blur

__all__ = ["Maximization", "deep_dream", "maximize"]


@dataclass(frozen=True)
class Maximization:
    """Result of activation maximization.

    ``image`` ``(C, *s)`` the final image, ``start`` where it began; ``curve`` ``(steps,)``
    the regularized objective at each step (on the jittered image the step used) and
    ``score`` ``(steps,)`` the unregularized target (class score or activation);
    ``final_score`` the target on the final, unjittered image.
    """

    objective: str
    image: np.ndarray
    start: np.ndarray
    curve: np.ndarray
    score: np.ndarray
    final_score: float
    seed: int
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def change(self) -> np.ndarray:
        """``image - start``: what the ascent added."""
        return self.image - self.start

    def to_dict(self) -> dict[str, Any]:
        return {
            "objective": self.objective,
            "seed": self.seed,
            "params": self.params,
            "curve": [float(v) for v in self.curve],
            "score": [float(v) for v in self.score],
            "start_score": float(self.score[0]) if len(self.score) else None,
            "final_score": self.final_score,
        }


def _total_variation(x: torch.Tensor) -> torch.Tensor:
    total = x.new_zeros(())
    for axis in range(2, x.ndim):
        total = total + x.diff(dim=axis).pow(2).mean()
    return total


def _check(name: str, value: Any, *, integer: bool = False, positive: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if integer:
        ok = ok and isinstance(value, int)
    if not ok or not np.isfinite(value) or value < 0 or (positive and value <= 0):
        kind = "a positive integer" if integer and positive else "a number >= 0"
        raise InputError(f"{name} must be {kind}, got {value!r}")


def _ascend(
    model: nn.Module,
    start: torch.Tensor,
    target: Callable[[torch.Tensor], torch.Tensor],
    *,
    steps: int,
    lr: float,
    l2: float,
    center: float,
    tv: float,
    jitter: int,
    blur_every: int,
    blur_sigma: float,
    bounds: tuple[float, float] | None,
    seed: int,
    coarse: int = 1,
) -> tuple[torch.Tensor, np.ndarray, np.ndarray, float]:
    """Gradient ascent on ``target(image)`` (a scalar) with the regularizers."""
    _check("steps", steps, integer=True, positive=True)
    _check("lr", lr, positive=True)
    for name, value in (("l2", l2), ("tv", tv), ("blur_sigma", blur_sigma)):
        _check(name, value)
    _check("jitter", jitter, integer=True)
    _check("blur_every", blur_every, integer=True)
    _check("coarse", coarse, integer=True, positive=True)
    gen = torch.Generator().manual_seed(int(seed))
    spatial = tuple(start.shape[2:])
    rank = len(spatial)
    base = start.detach()
    if coarse > 1:
        # The image is the start plus a coarse offset, upsampled: no detail finer than
        # ``coarse`` pixels can appear (a smoothness prior on what the ascent adds).
        low = tuple(-(-n // coarse) for n in spatial)
        variable = torch.zeros((*base.shape[:2], *low), dtype=base.dtype, device=base.device)
    else:
        variable = base.clone()
    variable.requires_grad_(True)

    def render(v: torch.Tensor) -> torch.Tensor:
        image = base + upsample_to_channels(v, spatial) if coarse > 1 else v
        return image.clamp(bounds[0], bounds[1]) if bounds is not None and coarse > 1 else image

    opt = torch.optim.Adam([variable], lr=lr)
    curve, score = [], []
    for step in range(steps):
        shifts = (
            tuple(int(s) for s in torch.randint(-jitter, jitter + 1, (rank,), generator=gen))
            if jitter
            else (0,) * rank
        )
        image = render(variable)
        moved = torch.roll(image, shifts=shifts, dims=tuple(range(2, image.ndim)))
        value = target(moved)
        objective = value
        if l2:
            objective = objective - l2 * (image - center).pow(2).mean()
        if tv:
            objective = objective - tv * _total_variation(image)
        (grad,) = torch.autograd.grad(objective, variable)
        curve.append(float(objective.detach()))
        score.append(float(value.detach()))
        opt.zero_grad(set_to_none=True)
        variable.grad = -grad  # Adam minimises
        opt.step()
        with torch.no_grad():
            if coarse == 1 and blur_every and blur_sigma > 0 and (step + 1) % blur_every == 0:
                variable.copy_(gaussian_blur(variable, blur_sigma))
            if coarse == 1 and bounds is not None:
                variable.clamp_(bounds[0], bounds[1])
    with torch.no_grad():
        image = render(variable).detach()
        final = float(target(image))
    return image, np.asarray(curve), np.asarray(score), final


def upsample_to_channels(v: torch.Tensor, spatial: tuple[int, ...]) -> torch.Tensor:
    """Bilinear (trilinear) upsampling of ``(B, C, *s)`` to ``spatial``, channel by channel."""
    mode = "bilinear" if len(spatial) == 2 else "trilinear"
    return F.interpolate(v, size=spatial, mode=mode, align_corners=False)


def _as_start(
    model: nn.Module,
    start: str | torch.Tensor,
    shape: tuple[int, ...] | None,
    center: float,
    seed: int,
) -> torch.Tensor:
    device, dtype = _model_device(model), _model_dtype(model, torch.zeros(()))
    if isinstance(start, torch.Tensor):
        x = batch_of_one(model, start)
        if x.shape[0] != 1 or not x.is_floating_point() or not bool(torch.isfinite(x).all()):
            raise InputError(
                "start must be one finite float image (C, *spatial) or (1, C, *spatial), "
                f"got shape {tuple(start.shape)}"
            )
        return x.detach().to(device=device, dtype=dtype).clone()
    if shape is None:
        raise InputError("give shape=(C, *spatial) (or a start image) for activation maximization")
    shape = tuple(int(s) for s in shape)
    if len(shape) not in (3, 4) or min(shape) < 1:
        raise InputError(f"shape must be (C, H, W) or (C, D, H, W), got {shape}")
    if start == "zeros":
        return torch.full((1, *shape), float(center), device=device, dtype=dtype)
    if start == "noise":
        gen = torch.Generator().manual_seed(int(seed) + 1)
        noise = 0.01 * torch.randn((1, *shape), generator=gen, dtype=torch.float64)
        return (noise + center).to(device=device, dtype=dtype)
    raise InputError(f"start must be 'noise', 'zeros' or an image tensor, got {start!r}")


def _layer_target(
    model: nn.Module, layer: str, channel: int | None, x_like: torch.Tensor
) -> tuple[Callable[[torch.Tensor], torch.Tensor], str]:
    store: dict[str, torch.Tensor] = {}

    def target(x: torch.Tensor) -> torch.Tensor:
        store.clear()
        with _capture(model, [layer], store, keep_grad=True):
            model(x)
        act = store[layer]
        require_spatial(layer, act, x_like, "activation maximization of a unit")
        if channel is None:
            return 0.5 * act.pow(2).mean()
        if not 0 <= channel < act.shape[1]:
            raise InputError(f"layer {layer!r} has {act.shape[1]} channels; no channel {channel}")
        return act[:, channel].mean()

    what = f"{layer} channel {channel}" if channel is not None else f"{layer} (L2 of all channels)"
    return target, what


def maximize(
    model: nn.Module,
    *,
    target: int | None = None,
    layer: str | None = None,
    channel: int | None = None,
    shape: tuple[int, ...] | None = None,
    start: str | torch.Tensor = "noise",
    steps: int = 128,
    lr: float = 0.05,
    l2: float = 1.0,
    center: float | torch.Tensor = 0.0,
    tv: float = 1.0,
    jitter: int = 2,
    blur_every: int = 4,
    blur_sigma: float = 0.5,
    coarse: int = 1,
    bounds: tuple[float, float] | None = None,
    seed: int = 0,
) -> Maximization:
    """Class-model visualization (``target`` = a class) or unit visualization (``layer``,
    optional ``channel``) by regularized gradient ascent.

    Parameters
    ----------
    target
        Class whose unnormalised score (logit) is maximized.
    layer, channel
        Instead of a class: a layer whose mean activation of ``channel`` (or, without a
        channel, half the mean squared activation of all channels) is maximized.
    shape
        ``(C, *spatial)`` of the image when ``start`` is ``"noise"`` or ``"zeros"``.
    start
        ``"noise"`` (``center`` plus seeded noise of sd 0.01), ``"zeros"`` (``center``
        everywhere) or an image tensor.
    steps, lr
        Adam steps on the image, and the step size.
    l2, center
        ``l2 * mean((I - center)^2)`` is subtracted (Simonyan et al.'s ``lambda ||I||^2``);
        ``center`` is a number or an image (e.g. the mean training image).
    tv
        ``tv * mean(|grad I|^2)`` is subtracted.
    jitter, blur_every, blur_sigma
        Random shift of up to ``jitter`` pixels per axis before each step; a Gaussian blur
        of ``blur_sigma`` pixels every ``blur_every`` steps (0: never).
    coarse
        Optimize a ``coarse`` times smaller offset added to the start image (upsampled
        bilinearly) instead of every pixel: a smoothness prior that keeps the ascent from
        writing high-frequency patterns (Olah et al. 2017's parameterizations); blur is
        then not applied.
    bounds
        Clamp the image to ``(low, high)`` after every step (e.g. the data's range).
    seed
        Seeds the start noise and the jitter; the same seed gives the same image.
    """
    if (target is None) == (layer is None):
        raise InputError("give either target (a class) or layer (a hidden unit), not both")
    if bounds is not None and not (len(bounds) == 2 and bounds[0] < bounds[1]):
        raise InputError(f"bounds must be (low, high) with low < high, got {bounds!r}")
    if isinstance(center, torch.Tensor):
        center_value = float(center.mean())
    else:
        center_value = float(center)
    with model_guard(model):
        x0 = _as_start(model, start, shape, center_value, seed)
        if isinstance(center, torch.Tensor):
            center = batch_of_one(model, center.to(x0))
        if target is not None:
            with torch.no_grad():
                out = check_output(model(x0), 1).reshape(1, -1)
            if isinstance(target, bool) or not isinstance(target, int):
                raise InputError(f"target must be a class index (int), got {target!r}")
            if not 0 <= target < out.shape[1]:
                raise InputError(
                    f"target {target} is not a class of this model (it has {out.shape[1]} outputs)"
                )

            def fn(x: torch.Tensor) -> torch.Tensor:
                return model(x).reshape(1, -1)[0, target]

            what = f"class {target} score"
        else:
            fn, what = _layer_target(model, layer, channel, x0)
        image, curve, score, final = _ascend(
            model,
            x0,
            fn,
            steps=steps,
            lr=lr,
            l2=l2,
            center=center,
            tv=tv,
            jitter=jitter,
            blur_every=blur_every,
            blur_sigma=blur_sigma,
            bounds=bounds,
            seed=seed,
            coarse=coarse,
        )
    params = {
        "steps": steps,
        "lr": lr,
        "l2": l2,
        "center": center if isinstance(center, float | int) else "image",
        "coarse": coarse,
        "tv": tv,
        "jitter": jitter,
        "blur_every": blur_every,
        "blur_sigma": blur_sigma,
        "bounds": list(bounds) if bounds is not None else None,
        "start": start if isinstance(start, str) else "image",
    }
    return Maximization(
        objective=what,
        image=image[0].to("cpu", torch.float32).numpy(),
        start=x0[0].to("cpu", torch.float32).numpy(),
        curve=curve,
        score=score,
        final_score=final,
        seed=int(seed),
        params=params,
    )


def deep_dream(
    model: nn.Module,
    image: torch.Tensor,
    *,
    layer: str,
    channel: int | None = None,
    steps: int = 32,
    lr: float = 0.02,
    l2: float = 0.0,
    tv: float = 0.0,
    jitter: int = 2,
    blur_every: int = 0,
    blur_sigma: float = 0.5,
    bounds: tuple[float, float] | None = None,
    seed: int = 0,
) -> Maximization:
    """Deep Dream on ``image`` (``(C, *s)`` or ``(1, C, *s)``): let ``layer`` (or one
    ``channel`` of it) enhance what it detects, by gradient ascent on its activation
    starting from the image (Mordvintsev et al. 2015; Borys et al. 2023). ``l2`` pulls
    towards the original image's mean. See :func:`maximize` for the other parameters."""
    x = batch_of_one(model, image)
    center = float(x.mean())
    return maximize(
        model,
        layer=layer,
        channel=channel,
        start=x,
        steps=steps,
        lr=lr,
        l2=l2,
        center=center,
        tv=tv,
        jitter=jitter,
        blur_every=blur_every,
        blur_sigma=blur_sigma,
        bounds=bounds,
        seed=seed,
    )
