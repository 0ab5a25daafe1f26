"""The loss terms of cycle-consistent activation maximization (Katzmann et al. 2021, section 2).

Every function is differentiable, works on ``(B, C, H, W)`` and ``(B, C, D, H, W)`` in
float32 and float64, and returns a scalar (the batch mean) unless it says otherwise.

The generator loss for ``G+`` (equation 4), mirrored for ``G-``::

    L(G+) = w_cycle * L_cycle(x_a, G-(G+(x_a)))        cycle consistency, eq. 2
          + w_sim   * L_DSSIM(x_a, G+(x_a))            similarity
          + w_adv   * L_CE(D+(G+(x_a), x_b), "fake is real")   inverted labels, eq. 3
          + w_am    * L_CE(1, C(G+(x_a)))              activation maximization

with all weights 1 in the paper.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "MS_SSIM_WEIGHTS",
    "activation_maximization_loss",
    "cycle_loss",
    "discriminator_loss",
    "dssim",
    "generator_adversarial_loss",
    "l1_loss",
    "ms_ssim",
    "pair_cross_entropy",
    "positive_probability",
    "similarity_loss",
    "ssim",
]

#: Scale weights of MS-SSIM (Wang, Simoncelli and Bovik 2003), finest scale first.
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def _check_pair(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.shape != y.shape:
        raise ValueError(f"images must have one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.ndim not in (4, 5):
        raise ValueError(f"expected (B, C, H, W) or (B, C, D, H, W), got {tuple(x.shape)}")


def _gaussian(size: int, sigma: float, like: torch.Tensor) -> torch.Tensor:
    coords = torch.arange(size, dtype=like.dtype, device=like.device) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    return g / g.sum()


def _blur(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Separable filtering of every channel along every spatial axis, 'valid' borders."""
    c = x.shape[1]
    dims = x.ndim - 2
    conv = F.conv2d if dims == 2 else F.conv3d
    out = x
    for axis in range(dims):
        shape = [1] * dims
        shape[axis] = kernel.numel()
        weight = kernel.reshape(1, 1, *shape).expand(c, 1, *shape)
        out = conv(out, weight, groups=c)
    return out


def _window_size(spatial: Sequence[int], window_size: int) -> int:
    # Shrink the window on images smaller than it (the largest odd size that fits), so
    # that tiny test images and coarse MS-SSIM scales still have one valid position.
    size = min(window_size, *spatial)
    return size if size % 2 == 1 else size - 1


def _ssim_parts(
    x: torch.Tensor,
    y: torch.Tensor,
    data_range: float,
    window_size: int,
    sigma: float,
    k1: float,
    k2: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample means of the SSIM map and of its contrast-structure factor."""
    size = _window_size(x.shape[2:], window_size)
    kernel = _gaussian(size, sigma, x)
    c1 = (k1 * data_range) ** 2
    c2 = (k2 * data_range) ** 2
    mu_x, mu_y = _blur(x, kernel), _blur(y, kernel)
    # Biased (population) local moments, as in Wang et al. 2004 and scikit-image with
    # use_sample_covariance=False.
    var_x = _blur(x * x, kernel) - mu_x**2
    var_y = _blur(y * y, kernel) - mu_y**2
    cov = _blur(x * y, kernel) - mu_x * mu_y
    cs = (2 * cov + c2) / (var_x + var_y + c2)
    lum = (2 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1)
    return (lum * cs).flatten(1).mean(1), cs.flatten(1).mean(1)


def ssim(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    data_range: float = 1.0,
    window_size: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
    reduction: str = "mean",
) -> torch.Tensor:
    """Structural similarity (Wang et al. 2004) with a Gaussian window, per sample.

    ``SSIM = mean over windows of (2 mu_x mu_y + c1)(2 s_xy + c2) /
    ((mu_x^2 + mu_y^2 + c1)(s_x^2 + s_y^2 + c2))`` with ``c1 = (k1 L)^2``,
    ``c2 = (k2 L)^2``, ``L = data_range``, averaged over channels. Katzmann et al.'s (2021)
    "``c1 = .01`` and ``c2 = .03``" are read as these ``k1``, ``k2``: taken literally they
    would swamp the local variances of images in [0, 1] and make SSIM blind to texture.
    Only windows wholly inside the image count (no padding), as in scikit-image.

    Parameters
    ----------
    reduction : str
        ``"mean"``: a scalar over the batch; ``"none"``: one value per sample ``(B,)``.
    """
    _check_pair(x, y)
    value, _ = _ssim_parts(x, y, data_range, window_size, sigma, k1, k2)
    return value.mean() if reduction == "mean" else value


def ms_ssim(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    data_range: float = 1.0,
    window_size: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
    weights: Sequence[float] = MS_SSIM_WEIGHTS,
    reduction: str = "mean",
) -> torch.Tensor:
    """Multi-scale SSIM (Wang, Simoncelli and Bovik 2003).

    ``MS-SSIM = prod_{j<M} cs_j^{w_j} * ssim_M^{w_M}``, halving the image between
    scales. Images too small for all five scales use as many as keep at least
    ``window_size`` pixels per axis (at least one), with their weights renormalised.
    Negative factors are clipped to a small positive value so that the fractional powers
    stay defined and differentiable.
    """
    _check_pair(x, y)
    n_scales = 1
    smallest = min(x.shape[2:])
    while n_scales < len(weights) and smallest // 2**n_scales >= window_size:
        n_scales += 1
    w = torch.tensor(weights[:n_scales], dtype=x.dtype, device=x.device)
    w = w / w.sum()
    pool = F.avg_pool2d if x.ndim == 4 else F.avg_pool3d
    value = torch.ones(x.shape[0], dtype=x.dtype, device=x.device)
    for j in range(n_scales):
        full, cs = _ssim_parts(x, y, data_range, window_size, sigma, k1, k2)
        factor = full if j == n_scales - 1 else cs
        value = value * factor.clamp_min(1e-6) ** w[j]
        if j < n_scales - 1:
            x, y = pool(x, 2, ceil_mode=True), pool(y, 2, ceil_mode=True)
    return value.mean() if reduction == "mean" else value


def dssim(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    multiscale: bool = False,
    data_range: float = 1.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """Structural dissimilarity ``(1 - SSIM) / 2`` (0 for identical images).

    Katzmann et al.'s (2021) equation 1 prints ``1 - SSIM / 2`` (a 2 in the denominator), which is
    0.5 for identical images; it differs from this one by the constant 1/2 only, so the
    gradients are the same. ``multiscale`` uses :func:`ms_ssim` (the paper's MS-DSSIM
    for the cycle loss).
    """
    fn = ms_ssim if multiscale else ssim
    return (1 - fn(x, y, data_range=data_range, reduction=reduction)) / 2


def l1_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference."""
    _check_pair(x, y)
    return (x - y).abs().mean()


def cycle_loss(
    x: torch.Tensor, x_cycled: torch.Tensor, *, multiscale: bool = False, data_range: float = 1.0
) -> torch.Tensor:
    """Equation 2: ``1/2 (|x - x'| + L_DSSIM(x, x'))`` with ``x' = G-(G+(x))``.

    The L1 term keeps the mean intensity, which DSSIM (mostly covariances) does not.
    """
    return 0.5 * (
        l1_loss(x, x_cycled) + dssim(x, x_cycled, multiscale=multiscale, data_range=data_range)
    )


def similarity_loss(
    x: torch.Tensor, generated: torch.Tensor, *, multiscale: bool = False, data_range: float = 1.0
) -> torch.Tensor:
    """``L_sim(x, G(x)) = L_DSSIM(x, G(x))``: keep the edit small."""
    return dssim(x, generated, multiscale=multiscale, data_range=data_range)


def pair_cross_entropy(logits: Sequence[torch.Tensor], real_index: int) -> torch.Tensor:
    """Categorical cross-entropy (equation 3) of the pair discriminator's patch logits.

    ``logits`` are the maps ``(B, 2, *patches)`` of :class:`PairDiscriminator`, one per
    scale; the target at every patch is ``real_index`` (0: the first image of the pair is
    the real one, 1: the second). The mean over patches, averaged over scales.
    """
    if not logits:
        raise ValueError("the discriminator returned no scales")
    losses = []
    for lg in logits:
        target = torch.full(
            (lg.shape[0], *lg.shape[2:]), real_index, dtype=torch.long, device=lg.device
        )
        losses.append(F.cross_entropy(lg, target))
    return torch.stack(losses).mean()


def discriminator_loss(logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """The discriminator's loss on ``D(fake, real)``: the second image is the real one."""
    return pair_cross_entropy(logits, real_index=1)


def generator_adversarial_loss(logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """The generator's loss on ``D(G(x_a), x_b)`` with inverted labels: the generated
    first image is called the real one (``L_CE(D(G(x_a), x_b), 0)`` in equation 4). The
    discriminator is frozen by the caller."""
    return pair_cross_entropy(logits, real_index=0)


def activation_maximization_loss(logits: torch.Tensor, target_class: int) -> torch.Tensor:
    """Cross-entropy between ``target_class`` and the classifier's output on the
    *generated* image.

    Equation 4 of Katzmann et al. 2021 writes ``L_AM(l, C(x_a))``, the classifier on the *input*,
    which does not depend on the generator and so could not train it; the text (sections
    2.1 and 2.4: each generator "maximize[s] one of the classifier's output activations")
    means ``C(G+(x_a))`` for ``G+`` and ``C(G-(x_a))`` for ``G-``. This function is given
    those logits.

    ``logits`` is ``(B, 2)`` (softmax cross-entropy) or ``(B, 1)`` / ``(B,)`` (one logit
    for the positive class: binary cross-entropy). ``target_class`` is 1 for ``G+`` and 0
    for ``G-``.
    """
    if target_class not in (0, 1):
        raise ValueError(f"target_class must be 0 or 1, got {target_class!r}")
    flat = logits.reshape(logits.shape[0], -1)
    if flat.shape[1] == 2:
        target = torch.full((flat.shape[0],), target_class, dtype=torch.long, device=flat.device)
        return F.cross_entropy(flat, target)
    if flat.shape[1] == 1:
        return F.binary_cross_entropy_with_logits(
            flat[:, 0], torch.full_like(flat[:, 0], float(target_class))
        )
    raise ValueError(
        f"activation maximization needs a binary classifier (2 logits or 1), got {flat.shape[1]}"
    )


def positive_probability(logits: torch.Tensor) -> torch.Tensor:
    """``P(positive class)`` per sample from ``(B, 2)`` or ``(B, 1)`` logits."""
    flat = logits.reshape(logits.shape[0], -1)
    if flat.shape[1] == 2:
        return torch.softmax(flat, dim=1)[:, 1]
    if flat.shape[1] == 1:
        return torch.sigmoid(flat[:, 0])
    raise ValueError(f"expected a binary classifier's logits (2 or 1), got {flat.shape[1]}")
