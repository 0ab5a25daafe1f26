"""Faithfulness of an explanation to the model: does the model react where the map points?

Beyond Arun et al.'s (2021) four criteria, the trust protocol reports four checks that perturb the
input and watch the model's score:

* **Deletion** and **insertion** curves (Petsiuk, Das & Saenko 2018, "RISE: Randomized
  input sampling for explanation of black-box models", BMVC): remove (or
  insert) pixels in decreasing order of saliency and follow the softmax probability of
  the target class; a faithful map makes it fall fast on deletion (low AUC) and rise fast
  on insertion (high AUC).
* **Sensitivity-n** (Ancona et al. 2018, "Towards better understanding of gradient-based
  attribution methods for deep neural networks", ICLR; reviewed in Singh et al. 2020, section on
  completeness): Pearson's correlation, over random subsets ``S`` of ``n`` pixels, between
  ``sum_{i in S} R_i`` and ``f(x) - f(x with S set to the baseline)``.
* The **completeness gap** (Singh et al. 2020; Sundararajan et al. 2017):
  ``|sum_i R_i - (f(x) - f(x'))| / |f(x) - f(x')|``, zero for methods that satisfy
  completeness (integrated gradients with exact integration, DeepLIFT-rescale on ReLU
  networks).

All functions take one image ``x`` (``(1, C, *spatial)`` or ``(C, *spatial)``, 2D or 3D),
run the model in eval mode without gradients (every module's ``training`` flag is restored
afterwards), never modify ``x`` or the map, and evaluate the perturbed copies in batches.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy.ndimage import gaussian_filter
from torch import nn

from trustmap.core.batching import chunks
from trustmap.core.hooks import model_guard
from trustmap.core.targets import Target, TargetSpec, resolve_target
from trustmap.core.validation import check_input, check_model_matches, check_output, positive_int

__all__ = [
    "BLUR_SIGMA",
    "Curve",
    "completeness_gap",
    "deletion_curve",
    "insertion_curve",
    "sensitivity_n",
]

BLUR_SIGMA = 5.0
"""Standard deviation, in pixels (voxels), of the blurred baseline (RISE's insertion)."""

Baseline = str | float | torch.Tensor | np.ndarray


@dataclass(frozen=True)
class Curve:
    """A deletion or insertion curve.

    Attributes
    ----------
    fractions:
        ``(steps + 1,)`` fraction of the pixels removed (inserted), from 0 to 1; exactly
        ``n_k / P`` for the ``n_k = floor(k P / steps)`` pixels changed at step ``k``.
    scores:
        ``(steps + 1,)`` softmax probability of the target class at each step.
    auc:
        Trapezoid area under ``scores`` over ``fractions``, in [0, 1].
    """

    fractions: np.ndarray
    scores: np.ndarray
    auc: float


# ----------------------------------------------------------------------------------------
# Deletion and insertion
# ----------------------------------------------------------------------------------------


def deletion_curve(
    model: nn.Module,
    x: torch.Tensor,
    saliency_map: Any,
    target: TargetSpec = None,
    *,
    steps: int = 20,
    baseline: Baseline = "zero",
    batch_size: int = 32,
) -> Curve:
    """Probability of the target class as the most salient pixels are removed (RISE).

    Step ``k`` of ``steps`` replaces the ``floor(k P / steps)`` most salient of the ``P``
    pixels, in every channel, by the baseline; the curve runs from the intact image
    (fraction 0) to the baseline (fraction 1). Ties in the map are broken by position (a
    stable sort of ``-map``), so the curve is deterministic. A faithful map gives a low AUC.

    Parameters
    ----------
    model:
        Classifier returning logits ``(N, K)``; for ``K >= 2`` the score is
        ``softmax(logits)[target]``, for a single logit ``sigmoid(+-logit)``.
    x:
        ``(1, C, *spatial)`` or ``(C, *spatial)``, 2D or 3D. Never modified.
    saliency_map:
        ``(*spatial)`` array or tensor; applies to all channels. Usually a post-processed
        map, but only the order of its values matters.
    target:
        A class (int or ``(1,)`` tensor) or None for the predicted class; see
        :mod:`trustmap.core.targets`.
    steps:
        Number of equal steps (at most the number of pixels).
    baseline:
        What removed pixels become: ``"zero"`` (default, RISE's deletion), ``"blur"`` (the
        image blurred by a Gaussian of sigma :data:`BLUR_SIGMA` pixels), a number, or an
        array/tensor of ``x``'s shape.
    batch_size:
        Perturbed images per forward pass.
    """
    return _curve(model, x, saliency_map, target, steps, baseline, batch_size, deletion=True)


def insertion_curve(
    model: nn.Module,
    x: torch.Tensor,
    saliency_map: Any,
    target: TargetSpec = None,
    *,
    steps: int = 20,
    baseline: Baseline = "blur",
    batch_size: int = 32,
) -> Curve:
    """Probability of the target class as the most salient pixels are inserted (RISE).

    Starts from the baseline (default: the image blurred by a Gaussian of sigma
    :data:`BLUR_SIGMA` pixels, as in RISE) and puts back the ``floor(k P / steps)`` most
    salient pixels of ``x`` at step ``k``. A faithful map gives a high AUC. Parameters as
    for :func:`deletion_curve`.
    """
    return _curve(model, x, saliency_map, target, steps, baseline, batch_size, deletion=False)


def _curve(
    model: nn.Module,
    x: torch.Tensor,
    saliency_map: Any,
    target: TargetSpec,
    steps: int,
    baseline: Baseline,
    batch_size: int,
    *,
    deletion: bool,
) -> Curve:
    smap = _map(saliency_map)
    x1 = _image(x, smap.ndim)
    if tuple(x1.shape[2:]) != smap.shape:
        raise ValueError(
            f"the saliency map has shape {smap.shape} but the image's spatial shape is "
            f"{tuple(x1.shape[2:])}"
        )
    n_pixels = smap.size
    steps = positive_int("steps", steps)
    if steps > n_pixels:
        raise ValueError(f"steps ({steps}) cannot exceed the number of pixels ({n_pixels})")
    batch_size = positive_int("batch_size", batch_size)
    check_model_matches(model, x1)
    base = _baseline(x1, baseline)

    # rank[p] = position of pixel p in the order of removal; a stable sort on -map breaks
    # ties by position, so equal values are always removed in the same order.
    order = np.argsort(-smap.ravel(), kind="stable")
    rank = np.empty(n_pixels, dtype=np.int64)
    rank[order] = np.arange(n_pixels)
    rank_t = torch.from_numpy(rank).to(x1.device).view(1, 1, *smap.shape)
    counts = np.arange(steps + 1, dtype=np.int64) * n_pixels // steps
    # Deletion starts from x and moves pixels to the baseline; insertion the reverse.
    start, end = (x1, base) if deletion else (base, x1)

    scores = np.empty(steps + 1)
    with model_guard(model), torch.no_grad():
        resolved = resolve_target(target, check_output(model(x1), 1))
        for sl in chunks(steps + 1, batch_size):
            n_changed = torch.from_numpy(counts[sl]).to(x1.device)
            changed = rank_t < n_changed.view(-1, *([1] * (x1.ndim - 1)))
            inputs = torch.where(changed, end, start)
            output = check_output(model(inputs), inputs.shape[0])
            scores[sl] = _probability(resolved, output).cpu().numpy()
    fractions = counts / n_pixels
    auc = float(np.trapezoid(scores, fractions))
    fractions.flags.writeable = False
    scores.flags.writeable = False
    return Curve(fractions=fractions, scores=scores, auc=auc)


def _probability(resolved: Target, output: torch.Tensor) -> torch.Tensor:
    """Probability of the resolved class for each row of ``output`` (float64)."""
    n = output.shape[0]
    rows = torch.zeros(n, dtype=torch.long, device=output.device)
    if resolved.kind == "class":
        logits = output.reshape(n, -1).to(torch.float64)
        cls = resolved.classes.to(output.device)[rows].unsqueeze(1)
        return torch.softmax(logits, dim=1).gather(1, cls).squeeze(1)
    if resolved.kind == "binary":
        # The signed logit: sigmoid gives P(class 1) for target 1 and P(class 0) for 0.
        return torch.sigmoid(resolved.scores(output, rows).to(torch.float64))
    raise ValueError(
        "deletion and insertion follow the probability of a class; a "
        f"{resolved.kind!r} target has none. Pass a class index"
    )


# ----------------------------------------------------------------------------------------
# Sensitivity-n and completeness
# ----------------------------------------------------------------------------------------


def sensitivity_n(
    model: nn.Module,
    x: torch.Tensor,
    attributions: Any,
    target: TargetSpec = None,
    *,
    n_values: Iterable[int],
    n_subsets: int = 50,
    seed: int,
    baseline: Baseline = 0.0,
    batch_size: int = 64,
) -> dict[int, float | None]:
    """Sensitivity-n (Ancona et al. 2018): ``corr_S(sum_{i in S} R_i, f(x) - f(x_[S=x']))``.

    For each ``n`` draws ``n_subsets`` uniformly random sets ``S`` of ``n`` pixels, sets
    those pixels (all channels) to the baseline and correlates (Pearson) the drop of the
    target score (the logit, see :mod:`trustmap.core.targets`) with the sum of the
    attributions over ``S``. 1 means the attributions add up like the model does on sets
    of that size.

    Parameters
    ----------
    x:
        ``(1, C, *spatial)``, or ``(C, H, W)`` for one 2D image (a 4-axis input is read as
        ``(1, C, H, W)``, so a single volume needs its batch axis).
    attributions:
        The RAW attributions, ``x``'s shape (with or without the batch axis), summed over
        channels per pixel. Not a post-processed map: that has lost sign and scale.
    n_values:
        Subset sizes, each in ``[1, P]``.
    n_subsets:
        Random subsets per size (at least 2).
    seed:
        Seeds ``numpy.random.default_rng``; the subsets are a function of it alone.
    baseline:
        Value of the removed pixels: a number, ``"zero"``, ``"blur"``, or ``x``'s shape.

    Returns
    -------
    ``{n: r}`` in the order of ``n_values``; ``r`` is None where the correlation is
    undefined (no spread in the sums or in the drops, e.g. ``n = P``).
    """
    x1 = _image(x, None)
    pixel_attr = _attributions(attributions, x1).sum(axis=0).ravel()
    n_pixels = pixel_attr.size
    sizes = _n_values(n_values, n_pixels)
    n_subsets = positive_int("n_subsets", n_subsets)
    if n_subsets < 2:
        raise ValueError(f"n_subsets must be at least 2 to compute a correlation, got {n_subsets}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    batch_size = positive_int("batch_size", batch_size)
    check_model_matches(model, x1)
    base = _baseline(x1, baseline)
    rng = np.random.default_rng(seed)
    spatial = tuple(x1.shape[2:])

    result: dict[int, float | None] = {}
    with model_guard(model), torch.no_grad():
        output = check_output(model(x1), 1)
        resolved = resolve_target(target, output)
        f_x = float(resolved.scores(output)[0])
        for n in sizes:
            keys = rng.random((n_subsets, n_pixels))
            members = np.argpartition(keys, n - 1, axis=1)[:, :n]
            removed = np.zeros((n_subsets, n_pixels), dtype=bool)
            np.put_along_axis(removed, members, True, axis=1)
            sums = pixel_attr[members].sum(axis=1)
            drops = np.empty(n_subsets)
            removed_t = torch.from_numpy(removed).to(x1.device)
            for sl in chunks(n_subsets, batch_size):
                mask = removed_t[sl].view(-1, 1, *spatial)
                inputs = torch.where(mask, base, x1)
                out = check_output(model(inputs), inputs.shape[0])
                rows = torch.zeros(inputs.shape[0], dtype=torch.long, device=x1.device)
                drops[sl] = f_x - resolved.scores(out, rows).to(torch.float64).cpu().numpy()
            result[n] = _pearson(sums, drops)
    return result


def completeness_gap(
    model: nn.Module,
    x: torch.Tensor,
    attributions: Any,
    target: TargetSpec = None,
    *,
    baseline: Baseline = 0.0,
) -> float:
    """Relative completeness gap ``|sum_i R_i - (f(x) - f(x'))| / |f(x) - f(x')|``.

    ``f`` is the target score (the logit; see :mod:`trustmap.core.targets`) and ``x'`` the
    baseline the attributions were computed against (integrated gradients' default is
    0). Zero for a method that satisfies completeness; 1 means the attributions account
    for none of the change. If ``f(x)`` and ``f(x')`` coincide (``|f(x) - f(x')| <= 1e-6
    max(1, |f(x)|, |f(x')|)``) the relative gap is undefined: the absolute gap
    ``|sum_i R_i|`` is returned instead and a RuntimeWarning says so.

    Shapes of ``x`` and ``attributions`` as for :func:`sensitivity_n`.
    """
    x1 = _image(x, None)
    total = float(_attributions(attributions, x1).sum())
    check_model_matches(model, x1)
    base = _baseline(x1, baseline)
    with model_guard(model), torch.no_grad():
        output = check_output(model(torch.cat([x1, base])), 2)
        resolved = resolve_target(target, output[:1])
        rows = torch.zeros(2, dtype=torch.long, device=x1.device)
        f_x, f_base = resolved.scores(output, rows).to(torch.float64).tolist()
    delta = f_x - f_base
    gap = abs(total - delta)
    if abs(delta) <= 1e-6 * max(1.0, abs(f_x), abs(f_base)):
        warnings.warn(
            f"f(x) - f(baseline) = {delta:.3g} is too close to 0 for a relative gap; "
            "returning the absolute gap |sum(attributions) - (f(x) - f(baseline))|",
            RuntimeWarning,
            stacklevel=2,
        )
        return gap
    return gap / abs(delta)


# ----------------------------------------------------------------------------------------
# Validation and helpers
# ----------------------------------------------------------------------------------------


def _image(x: Any, spatial_ndim: int | None) -> torch.Tensor:
    """A validated copy of ``x`` as ``(1, C, *spatial)``.

    With ``spatial_ndim`` (known from the map) both layouts are unambiguous; without it a
    3-axis input is ``(C, H, W)`` and a 4- or 5-axis input carries the batch axis.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if spatial_ndim is None:
        unbatched = x.ndim == 3
    else:
        if x.ndim not in (spatial_ndim + 1, spatial_ndim + 2):
            raise ValueError(
                f"for a {spatial_ndim}D map, x must have shape (1, C, *spatial) or "
                f"(C, *spatial) with {spatial_ndim} spatial axes; got {tuple(x.shape)}"
            )
        unbatched = x.ndim == spatial_ndim + 1
    if unbatched:
        x = x.unsqueeze(0)
    if x.ndim in (4, 5) and x.shape[0] != 1:
        raise ValueError(f"x must hold one image (batch size 1); got shape {tuple(x.shape)}")
    return check_input(x)


def _map(saliency_map: Any) -> np.ndarray:
    if isinstance(saliency_map, torch.Tensor):
        m = saliency_map.detach().cpu().numpy()
    else:
        m = np.asarray(saliency_map)
    if m.ndim not in (2, 3):
        raise ValueError(f"the saliency map must be (H, W) or (D, H, W), got {tuple(m.shape)}")
    if m.dtype.kind not in "biuf":
        raise TypeError(f"the saliency map must be real numbers, got dtype {m.dtype}")
    m = m.astype(np.float64)
    if not np.isfinite(m).all():
        raise ValueError("the saliency map contains NaN or Inf values")
    return m


def _attributions(attributions: Any, x1: torch.Tensor) -> np.ndarray:
    """Float64 ``(C, *spatial)`` attributions matching ``x1 (1, C, *spatial)``."""
    if isinstance(attributions, torch.Tensor):
        a = attributions.detach().cpu().numpy()
    else:
        a = np.asarray(attributions)
    if a.dtype.kind not in "biuf":
        raise TypeError(f"attributions must be real numbers, got dtype {a.dtype}")
    if tuple(a.shape) not in (tuple(x1.shape), tuple(x1.shape[1:])):
        raise ValueError(
            f"attributions must have x's shape {tuple(x1.shape)} (batch axis optional); got "
            f"{tuple(a.shape)}"
        )
    a = a.astype(np.float64).reshape(x1.shape[1:])
    if not np.isfinite(a).all():
        raise ValueError("the attributions contain NaN or Inf values")
    return a


def _baseline(x1: torch.Tensor, baseline: Baseline) -> torch.Tensor:
    """The reference image ``(1, C, *spatial)`` that removed pixels take their values from."""
    if isinstance(baseline, str):
        if baseline in ("zero", "zeros"):
            return torch.zeros_like(x1)
        if baseline == "blur":
            sigma = (0.0, 0.0) + (BLUR_SIGMA,) * (x1.ndim - 2)
            # scipy's reflect mode handles any image size (a 16-pixel image and sigma 5).
            blurred = gaussian_filter(x1.detach().cpu().double().numpy(), sigma, mode="reflect")
            return torch.from_numpy(blurred).to(x1.device, x1.dtype)
        raise ValueError(
            f"baseline must be 'zero', 'blur', a number or a tensor of x's shape; got {baseline!r}"
        )
    if isinstance(baseline, bool):
        raise TypeError("baseline must be 'zero', 'blur', a number or a tensor, got a bool")
    if isinstance(baseline, int | float | np.number):
        if not math.isfinite(float(baseline)):
            raise ValueError(f"baseline must be finite, got {baseline!r}")
        return torch.full_like(x1, float(baseline))
    if isinstance(baseline, np.ndarray):
        baseline = torch.from_numpy(baseline)
    if not isinstance(baseline, torch.Tensor):
        raise TypeError(
            f"baseline must be 'zero', 'blur', a number or a tensor, got {type(baseline).__name__}"
        )
    if tuple(baseline.shape) not in (tuple(x1.shape), tuple(x1.shape[1:])):
        raise ValueError(
            f"a baseline tensor must have x's shape {tuple(x1.shape)}; got {tuple(baseline.shape)}"
        )
    base = baseline.detach().to(x1.device, x1.dtype).reshape(x1.shape).clone()
    if not bool(torch.isfinite(base).all()):
        raise ValueError("the baseline contains NaN or Inf values")
    return base


def _n_values(n_values: Iterable[int], n_pixels: int) -> list[int]:
    if isinstance(n_values, int | np.integer):
        n_values = [int(n_values)]
    sizes = list(n_values)
    if not sizes:
        raise ValueError("n_values is empty; give at least one subset size")
    for n in sizes:
        if isinstance(n, bool) or not isinstance(n, int | np.integer) or not 1 <= n <= n_pixels:
            raise ValueError(
                f"each of n_values must be an integer in [1, {n_pixels}] (the number of "
                f"pixels); got {n!r}"
            )
    if len(set(sizes)) != len(sizes):
        raise ValueError(f"n_values has repeated sizes: {sizes}")
    return [int(n) for n in sizes]


def _pearson(a: np.ndarray, b: np.ndarray) -> float | None:
    """Pearson's r, or None when either sample has no spread."""
    da = a - a.mean()
    db = b - b.mean()
    den = math.sqrt(float(da @ da) * float(db @ db))
    if den == 0.0 or np.ptp(a) == 0.0 or np.ptp(b) == 0.0:
        return None
    return float(np.clip(float(da @ db) / den, -1.0, 1.0))
