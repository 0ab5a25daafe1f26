"""Iterative saliency maps (González-Gonzalo et al. 2018): explain, inpaint, repeat."""

from __future__ import annotations

import inspect
import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from trustmap.core.base import Explainer, build
from trustmap.core.registry import get_method, register
from trustmap.core.seeding import resolve_seed
from trustmap.core.targets import Target, TargetSpec, take
from trustmap.core.validation import choice, non_negative_int, positive_int
from trustmap.methods.gradient.integrated_gradients import gaussian_blur
from trustmap.methods.perturbation._mask_optim import number

INPAINTERS = ("auto", "biharmonic", "normalized_convolution")
WEIGHTS = ("score", "uniform", "decay")
# Normalized convolution: a voxel is filled at the smallest scale where the blurred
# known-voxel indicator reaches this value, i.e. where enough known voxels are near.
_SUPPORT = 0.05


def inpaint_biharmonic(x: torch.Tensor, hole: torch.Tensor) -> torch.Tensor:
    """Fill ``hole`` ``(k, 1, *spatial)`` of ``x`` ``(k, C, *spatial)`` by biharmonic
    inpainting (scikit-image), channel by channel; known voxels are kept exactly."""
    from skimage.restoration import inpaint_biharmonic as biharmonic

    out = x.clone()
    for i in range(x.shape[0]):
        mask = hole[i, 0].cpu().numpy()
        if not mask.any():
            continue
        image = np.moveaxis(x[i].detach().cpu().double().numpy(), 0, -1)
        filled = biharmonic(image, mask, channel_axis=-1)
        filled = torch.from_numpy(np.ascontiguousarray(np.moveaxis(filled, -1, 0)))
        out[i] = torch.where(hole[i], filled.to(x.device, x.dtype), x[i])
    return out


def inpaint_normalized_convolution(x: torch.Tensor, hole: torch.Tensor) -> torch.Tensor:
    """Fill ``hole`` by normalized convolution (Knutsson and Westin 1993):
    ``G_s * (x known) / G_s * known`` at the smallest Gaussian scale ``s`` (1, 2, 4, ...
    voxels) with enough known voxels nearby. Known voxels are kept exactly; works in 2D
    and 3D. A sample with no known voxel is filled with its mean."""
    known = (~hole).to(x.dtype)
    out = x.clone()
    todo = hole.expand_as(x).clone()
    sigma = 1.0
    largest = max(x.shape[2:])
    while bool(todo.any()) and sigma <= 2 * largest:
        den = gaussian_blur(known, sigma)
        num = gaussian_blur(x * known, sigma)
        ready = todo & (den >= _SUPPORT)
        out = torch.where(ready, num / den.clamp_min(_SUPPORT), out)
        todo = todo & ~ready
        sigma *= 2
    if bool(todo.any()):
        view = (x.shape[0], x.shape[1]) + (1,) * (x.ndim - 2)
        mean = x.reshape(x.shape[0], x.shape[1], -1).mean(2).view(view).expand_as(x)
        out = torch.where(todo, mean, out)
    return out


def dilate(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Binary dilation of ``(k, 1, *spatial)`` by a cube of side ``2 radius + 1``."""
    if radius == 0:
        return mask
    pool = {2: F.max_pool2d, 3: F.max_pool3d}[mask.ndim - 2]
    return pool(mask.float(), kernel_size=2 * radius + 1, stride=1, padding=radius) > 0


def most_salient(saliency: torch.Tensor, removed: torch.Tensor, count: int) -> torch.Tensor:
    """The ``count`` largest voxels of ``saliency`` ``(k, 1, *spatial)`` not yet removed."""
    k = saliency.shape[0]
    flat = saliency.reshape(k, -1).masked_fill(removed.reshape(k, -1), -math.inf)
    top = flat.topk(min(count, flat.shape[1]), dim=1)
    chosen = torch.zeros_like(flat, dtype=torch.bool)
    # A row with fewer voxels left than ``count`` gets only those (never a removed one).
    chosen.scatter_(1, top.indices, top.values > -math.inf)
    return chosen.reshape(saliency.shape)


@register(
    "iterative_saliency",
    family="perturbation",
    summary="any method repeated after inpainting its most salient region, until the "
    "class flips; weighted sum",
    paper="González-Gonzalo et al. 2018, Improving weakly-supervised lesion localization with "
    "iterative saliency map refinement (Huff et al. 2021, section 3.2.1)",
)
class IterativeSaliency(Explainer):
    """Iterative saliency maps: ``S = sum_i w_i E(x_i) / max|E(x_i)|`` with ``x_1 = x`` and
    ``x_{i+1}`` = ``x`` with the union of the regions found so far inpainted.

    At each iteration the base method ``E`` explains the current image; the ``fraction`` of
    voxels with the largest ``sum_channels |E|``, smoothed by a Gaussian of ``smooth``
    voxels so that regions rather than scattered voxels are taken (among the voxels not
    yet removed), dilated by ``dilation`` voxels, joins the removed region; the removed
    region of the *original* image is inpainted from its surroundings, and the model is
    run again. A sample stops when it is no longer classified as the target (the argmax
    differs from the target class; for a single-logit model, the signed logit is no
    longer positive) or after ``max_iter`` maps; the samples still running are explained
    together. Region and callable targets have no class, so they always run ``max_iter``
    iterations (Huff et al. 2021, section 3.2.1; González-Gonzalo et al. 2018).

    Huff et al. 2021 says only that the final map is a weighted sum. trustmap scales each map to
    a maximum absolute value of 1 and weights it by ``weights``: ``"score"`` (default) the
    target's probability on the image the map was computed from, so evidence found after
    the prediction has weakened counts less (the raw score for region and callable
    targets); ``"uniform"`` 1; ``"decay"`` ``1 / i``.

    ``Explanation.params`` reports per sample ``iterations`` (maps computed), ``flipped``,
    ``weights`` and ``removed_fraction``. The output has the base method's shape.

    Parameters
    ----------
    base:
        Registered method explaining each iteration (default ``"gradient"``).
    fraction:
        Fraction of the voxels chosen per iteration, in (0, 1) (default 0.05), before the
        dilation; ``removed_fraction`` reports what was removed in the end.
    smooth:
        Gaussian sigma in voxels applied to the saliency magnitude before ranking
        (default 1; 0 ranks the raw map).
    dilation:
        Dilation radius in voxels of each removed region (default 1).
    max_iter:
        Most maps per sample (default 5).
    inpaint:
        ``"auto"`` (biharmonic in 2D, normalized convolution in 3D), ``"biharmonic"``
        (scikit-image's ``inpaint_biharmonic``; slow on volumes) or
        ``"normalized_convolution"``.
    weights:
        ``"score"``, ``"uniform"`` or ``"decay"``, see above.
    batch_size:
        Handed to the base method if it takes one.
    seed:
        Handed to the base method if it takes one (the same seed every iteration);
        ``None`` draws one and reports it.
    **base_params:
        Parameters of the base method.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        base: str = "gradient",
        fraction: float = 0.05,
        smooth: float = 1.0,
        dilation: int = 1,
        max_iter: int = 5,
        inpaint: str = "auto",
        weights: str = "score",
        batch_size: int | None = None,
        seed: int | None = None,
        **base_params: Any,
    ) -> None:
        self.model = model
        self.base = base
        self.fraction = fraction
        self.smooth = smooth
        self.dilation = dilation
        self.max_iter = max_iter
        self.inpaint = inpaint
        self.weights = weights
        self.batch_size = batch_size
        self.seed = seed
        self.base_params = base_params

    def output_kind(self) -> str:
        return get_method(self.base).output

    def attribute(
        self, x: torch.Tensor, target: TargetSpec | Target
    ) -> tuple[torch.Tensor, torch.Tensor | None, Target, dict[str, Any]]:
        max_iter = positive_int("max_iter", self.max_iter)
        fraction = number("fraction", self.fraction, low=0.0, high=1.0, low_open=True)
        smooth = number("smooth", self.smooth, low=0.0)
        dilation = non_negative_int("dilation", self.dilation)
        choice("inpaint", self.inpaint, INPAINTERS)
        choice("weights", self.weights, WEIGHTS)
        if self.batch_size is not None:
            positive_int("batch_size", self.batch_size)
        base, extra = self._build_base()
        fill = self._inpainter(x.ndim - 2)

        output, resolved = self.output_and_target(x, target)
        if output is None:
            with torch.no_grad():
                output = self.forward(x)
        b, _, *spatial = x.shape
        count = max(1, round(fraction * math.prod(spatial)))
        prob = resolved.probabilities(output).detach().to(x.dtype)
        removed = torch.zeros((b, 1, *spatial), dtype=torch.bool, device=x.device)
        current = x.clone()
        total: torch.Tensor | None = None
        iterations = [0] * b
        flipped = [False] * b
        used: list[list[float]] = [[] for _ in range(b)]
        active = torch.arange(b, device=x.device)
        for it in range(1, max_iter + 1):
            maps, _, _, _ = base.attribute(current[active], take(resolved, active))
            maps = maps.detach()
            if total is None:
                total = torch.zeros((b, *maps.shape[1:]), dtype=x.dtype, device=x.device)
            k = maps.shape[0]
            peak = maps.abs().reshape(k, -1).amax(1)
            # An all-zero map (nothing left to explain) adds nothing.
            inv = torch.where(peak > 0, 1 / peak.clamp_min(torch.finfo(peak.dtype).tiny), 0)
            w = self._weight(it, prob[active])
            view = (k,) + (1,) * (maps.ndim - 1)
            unit = maps.to(x.dtype) * inv.view(view).to(x.dtype)
            total[active] += w.view(view).to(x.dtype) * unit
            for i, wi in zip(active.tolist(), w.tolist()):
                iterations[i] = it
                used[i].append(wi)

            salient = gaussian_blur(maps.abs().sum(1, keepdim=True).to(x.dtype), smooth)
            chosen = dilate(most_salient(salient, removed[active], count), dilation)
            removed[active] |= chosen
            current[active] = fill(x[active], removed[active])
            with torch.no_grad():
                out = self.forward(current[active])
            prob[active] = resolved.probabilities(out, active).detach().to(x.dtype)
            flips = _flipped(resolved, out, active)
            for i, f in zip(active.tolist(), flips.tolist()):
                flipped[i] = f
            exhausted = removed[active].reshape(k, -1).all(1)
            active = active[~(flips | exhausted)]
            if active.numel() == 0:
                break
        assert total is not None
        extra.update(
            {
                "iterations": iterations,
                "flipped": flipped,
                "weights": used,
                "removed_fraction": removed.reshape(b, -1).float().mean(1).tolist(),
            }
        )
        return total, output, resolved, extra

    def _build_base(self) -> tuple[Explainer, dict[str, Any]]:
        base_cls = get_method(self.base)
        if base_cls is IterativeSaliency:
            raise ValueError("iterative_saliency cannot use itself as its base method")
        accepted = set(inspect.signature(base_cls.__init__).parameters)
        params = dict(self.base_params)
        extra: dict[str, Any] = {}
        if self.batch_size is not None and "batch_size" in accepted:
            params.setdefault("batch_size", self.batch_size)
        if "seed" in accepted:
            seed = resolve_seed(self.seed)
            params["seed"] = seed
            extra["seed"] = seed
        return build(base_cls, self.model, params), extra

    def _inpainter(self, ndim: int) -> Any:
        kind = self.inpaint
        if kind == "auto":
            kind = "biharmonic" if ndim == 2 else "normalized_convolution"
        return inpaint_biharmonic if kind == "biharmonic" else inpaint_normalized_convolution

    def _weight(self, it: int, prob: torch.Tensor) -> torch.Tensor:
        if self.weights == "score":
            return prob
        if self.weights == "decay":
            return torch.full_like(prob, 1.0 / it)
        return torch.ones_like(prob)


def _flipped(target: Target, output: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Per row: the model no longer predicts the target class (never for region or
    callable targets, which have no class)."""
    n = output.shape[0]
    if target.kind == "class":
        return output.reshape(n, -1).argmax(1) != target.classes.to(output.device)[rows]
    if target.kind == "binary":
        return target.scores(output, rows) <= 0
    return torch.zeros(n, dtype=torch.bool, device=output.device)
