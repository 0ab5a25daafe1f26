"""Shared pieces of the perturbation family: reference ("off") values and batched scoring.

Every perturbation method replaces parts of ``x`` by a reference value and reads how the
target score changes (Borys et al. 2023, section 2.1). These helpers keep the reference values and
the batched, gradient-free evaluation identical across occlusion, LIME, SHAP, RISE, HiPe
and the mask-optimisation methods.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from trustmap.core.batching import chunks
from trustmap.core.targets import Target
from trustmap.core.validation import choice
from trustmap.methods.gradient.integrated_gradients import gaussian_blur, make_baseline

BASELINES = ("zeros", "mean", "blur", "noise")


def perturbation_baseline(
    x: torch.Tensor,
    baseline: str | float | torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    blur_sigma: float | None = None,
) -> torch.Tensor:
    """The value a perturbed voxel takes, same shape as ``x`` ``(B, C, *spatial)``.

    ``baseline`` is a number (that constant), ``"zeros"``, ``"mean"`` (each sample's
    per-channel mean), ``"blur"`` (a Gaussian-blurred copy, sigma ``blur_sigma`` voxels,
    default a tenth of the smallest spatial size, as in Fong and Vedaldi 2017), ``"noise"``
    (Gaussian noise with each sample's per-channel mean and standard deviation, drawn from
    ``generator``), or a tensor broadcastable to ``x``.
    """
    if isinstance(baseline, torch.Tensor) or (
        isinstance(baseline, (int, float)) and not isinstance(baseline, bool)
    ):
        return make_baseline(x, baseline, seed=0, blur_sigma=None)
    if not isinstance(baseline, str):
        raise TypeError(
            f"baseline must be a number, a tensor or one of {BASELINES}, got "
            f"{type(baseline).__name__}"
        )
    choice("baseline", baseline, BASELINES)
    b, c = x.shape[:2]
    view = (b, c) + (1,) * (x.ndim - 2)
    if baseline == "zeros":
        return torch.zeros_like(x)
    if baseline == "mean":
        return x.reshape(b, c, -1).mean(2).view(view).expand_as(x).clone()
    if baseline == "blur":
        sigma = blur_sigma if blur_sigma is not None else 0.1 * min(x.shape[2:])
        return gaussian_blur(x, float(sigma))
    if generator is None:
        raise ValueError("baseline='noise' needs a seeded generator")
    flat = x.reshape(b, c, -1)
    mean, std = flat.mean(2).view(view), flat.std(2, unbiased=False).view(view)
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return mean + std * noise


@torch.inference_mode()
def score_perturbations(
    forward: Callable[[torch.Tensor], torch.Tensor],
    make_batch: Callable[[slice], tuple[torch.Tensor, torch.Tensor]],
    n_rows: int,
    target: Target,
    batch_size: int | None,
) -> torch.Tensor:
    """Target scores of ``n_rows`` perturbed inputs, built lazily and evaluated in chunks.

    ``make_batch(sl)`` returns ``(inputs, rows)`` for the rows in ``sl``: the perturbed
    inputs ``(k, C, *spatial)`` and, for each, the index of the original sample whose
    target it is scored against. No gradient is recorded. Returns ``(n_rows,)``.
    """
    out: list[torch.Tensor] = []
    for sl in chunks(n_rows, batch_size):
        inputs, rows = make_batch(sl)
        out.append(target.scores(forward(inputs), rows).detach())
    return torch.cat(out) if out else torch.zeros(0)
