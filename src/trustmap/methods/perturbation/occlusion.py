"""Occlusion (Zeiler and Fergus 2014): the output drop when a sliding window is occluded."""

from __future__ import annotations

import math
import string
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from trustmap.core.base import Explainer
from trustmap.core.registry import register
from trustmap.core.seeding import resolve_seed
from trustmap.core.targets import Target, TargetSpec
from trustmap.methods.perturbation._coalitions import (
    FastLayout,
    batch_rows,
    device_generator,
    score_with_x,
    seed_generator,
)
from trustmap.methods.perturbation._common import perturbation_baseline


def per_axis(name: str, value: object, ndim: int, *, allow_none: bool = False) -> tuple[int, ...]:
    """An int, or one positive int per spatial axis, as a tuple of ``ndim`` ints."""
    if value is None and allow_none:
        return ()
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value,) * ndim
    ok = isinstance(value, (list, tuple)) and len(value) == ndim
    if not ok or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value):
        raise ValueError(
            f"{name} must be a positive int or {ndim} positive ints (one per spatial axis), "
            f"got {value!r}"
        )
    return tuple(int(v) for v in value)


def window_starts(size: int, window: int, stride: int) -> list[int]:
    """Window origins along one axis: ``0, s, 2s, ...``, ``ceil((n - w) / s) + 1`` of them.

    The first window touches index 0; the last may hang over the end and is then cut to
    the image (captum's ``Occlusion`` placement).
    """
    return [i * stride for i in range(math.ceil((size - window) / stride) + 1)]


def coverage(
    spatial: Sequence[int], window: Sequence[int], stride: Sequence[int], device: torch.device
) -> list[torch.Tensor]:
    """Per axis, ``(n_windows_d, size_d)`` bool: which indices each window covers."""
    out = []
    for size, w, s in zip(spatial, window, stride):
        starts = torch.tensor(window_starts(size, w, s), device=device)
        idx = torch.arange(size, device=device)
        out.append((idx >= starts[:, None]) & (idx < starts[:, None] + w))
    return out


@register(
    "occlusion",
    family="perturbation",
    summary="output drop when a sliding window (all channels) is replaced by a baseline, "
    "averaged over the windows covering each voxel",
    paper="Zeiler and Fergus 2014, Visualizing and understanding convolutional networks",
    output="single",
)
class Occlusion(Explainer):
    """Occlusion: ``a(p) = mean_{w covering p} [S(x) - S(x with window w occluded)]``.

    A window of ``window`` voxels (all channels) slides over the image with ``stride``;
    each position is replaced by the baseline and the target score ``S`` re-evaluated
    (Zeiler and Fergus 2014; Borys et al. 2023 section 2.1, Singh et al. 2020 section 3.1).
    Along each axis the windows start at ``0, s, 2s, ...`` until one reaches the end,
    ``ceil((n - w) / s) + 1`` windows, the last possibly cut off by the border; this is
    captum's ``Occlusion`` placement, and for ``sliding_window_shapes=(C, *window)`` the
    maps are equal. Voxels that no window covers (``stride > window``) get 0.

    The map is one value per voxel, ``(B, 1, *spatial)``. All windows of all samples are
    evaluated in batches of ``batch_size`` rows, under inference mode.

    Parameters
    ----------
    window:
        Window size in voxels: an int, or one per spatial axis. Must fit in the image.
    stride:
        Step between windows: an int or one per spatial axis; None: half the window
        (rounded up).
    baseline:
        The occluded value: a number, ``"zeros"``, ``"mean"`` (the sample's per-channel
        mean), ``"blur"`` (a Gaussian-blurred copy, ``blur_sigma``), ``"noise"`` (Gaussian
        noise with the sample's per-channel mean and spread, seeded) or a tensor
        broadcastable to ``x``.
    batch_size:
        Occluded inputs per forward pass; None: about 2**20 voxels' worth, at most 64.
    seed:
        For ``baseline="noise"`` (drawn and reported when None).
    blur_sigma:
        Gaussian sigma in voxels for ``baseline="blur"`` (default a tenth of the smallest
        spatial size).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        window: int | Sequence[int] = 16,
        stride: int | Sequence[int] | None = None,
        baseline: float | str | torch.Tensor = 0.0,
        batch_size: int | None = None,
        seed: int | None = None,
        blur_sigma: float | None = None,
    ) -> None:
        self.model = model
        self.window = window
        self.stride = stride
        self.baseline = baseline
        self.batch_size = batch_size
        self.seed = seed
        self.blur_sigma = blur_sigma

    def attribute(
        self, x: torch.Tensor, target: TargetSpec | Target
    ) -> tuple[torch.Tensor, torch.Tensor, Target, dict[str, Any]]:
        b, _, *spatial = x.shape
        ndim = len(spatial)
        window = per_axis("window", self.window, ndim)
        stride = per_axis("stride", self.stride, ndim, allow_none=True)
        stride = stride or tuple(max(1, (w + 1) // 2) for w in window)
        too_big = [(w, n) for w, n in zip(window, spatial) if w > n]
        if too_big:
            raise ValueError(
                f"window {window} is larger than the image {tuple(spatial)}; each window size "
                "must be at most the image size along its axis"
            )
        rows = batch_rows(x, self.batch_size)
        extra: dict[str, Any] = {}
        gen = None
        if isinstance(self.baseline, str) and self.baseline == "noise":
            seed = resolve_seed(self.seed)
            extra["seed"] = seed
            gen = device_generator(seed_generator(seed), x.device)
        base = perturbation_baseline(x, self.baseline, generator=gen, blur_sigma=self.blur_sigma)

        cover = coverage(spatial, window, stride, x.device)
        counts = [int(cv.shape[0]) for cv in cover]
        n_win = math.prod(counts)

        def make_batch(sl: slice) -> tuple[torch.Tensor, torch.Tensor]:
            r = torch.arange(sl.start, sl.stop, device=x.device)
            sample, win = r // n_win, r % n_win
            mask = None
            # Row-major unravel of the window index; the mask is the outer AND of the
            # per-axis coverages, built by broadcasting.
            for axis in reversed(range(ndim)):
                idx = win % counts[axis]
                win = win // counts[axis]
                shape = [len(r)] + [1] * ndim
                shape[axis + 1] = spatial[axis]
                part = cover[axis][idx].view(shape)
                mask = part if mask is None else mask & part
            return torch.where(mask.unsqueeze(1), base[sample], x[sample]), sample

        forward = FastLayout(self.forward, x.device)
        output, resolved, scores = score_with_x(forward, x, target, make_batch, b * n_win, rows)
        with torch.inference_mode():
            score_x = resolved.scores(output).to(x.dtype)
        drops = (score_x.unsqueeze(1) - scores.to(x.dtype).view(b, n_win)).view(b, *counts)
        attr = average_over_windows(drops, [cv.to(x.dtype) for cv in cover])
        extra.update(n_windows=n_win, n_evaluations=b * (n_win + 1))
        return attr.unsqueeze(1), output, resolved, extra


def average_over_windows(drops: torch.Tensor, cover: list[torch.Tensor]) -> torch.Tensor:
    """``sum_w drop_w [p in w] / #{w : p in w}`` for separable windows, 0 where uncovered.

    ``drops`` is ``(B, n_1, ..., n_D)``, ``cover[d]`` is ``(n_d, size_d)``; the sum is one
    tensor contraction per axis instead of a loop over windows.
    """
    ndim = len(cover)
    letters = string.ascii_lowercase
    win, vox = letters[:ndim], letters[ndim : 2 * ndim]
    spec = "z" + win + "," + ",".join(w + v for w, v in zip(win, vox)) + "->z" + vox
    total = torch.einsum(spec, drops, *cover)
    count = torch.ones((), dtype=drops.dtype, device=drops.device)
    for d, cv in enumerate(cover):
        shape = [1] * ndim
        shape[d] = cv.shape[1]
        count = count * cv.sum(0).view(shape)
    count = count.unsqueeze(0)
    return torch.where(count > 0, total / count.clamp_min(1), torch.zeros_like(total))
