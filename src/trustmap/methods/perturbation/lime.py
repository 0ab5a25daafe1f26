"""LIME (Ribeiro, Singh and Guestrin 2016): a weighted linear surrogate over segments."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
from torch import nn

from trustmap.core.base import Explainer
from trustmap.core.registry import register
from trustmap.core.seeding import resolve_seed
from trustmap.core.targets import Target, TargetSpec
from trustmap.core.validation import choice
from trustmap.methods.perturbation._coalitions import (
    positive_samples,
    seed_generator,
    segment_extra,
    segment_map,
    setup_game,
    weighted_r2,
    weighted_ridge,
)

FEATURE_SELECTION = ("auto", "none", "forward_selection", "highest_weights", "lasso_path")
DISTANCES = ("cosine", "euclidean")


def lime_weights(z: np.ndarray, kernel_width: float, distance: str) -> np.ndarray:
    """``pi(z) = sqrt(exp(-d(z, 1)^2 / width^2))``, ``d`` the distance to the all-on row.

    Cosine distance ``1 - sqrt(k / M)`` for ``k`` of ``M`` segments on (1 for none on), or
    Euclidean ``sqrt(M - k)``; the kernel of the `lime` package's image explainer.
    """
    m = z.shape[1]
    k = z.sum(1).astype(np.float64)
    d = 1.0 - np.sqrt(k / m) if distance == "cosine" else np.sqrt(m - k)
    return np.sqrt(np.exp(-(d**2) / kernel_width**2))


def select_features(
    z: np.ndarray, y: np.ndarray, w: np.ndarray, method: str, n_features: int
) -> np.ndarray:
    """Indices of the segments the surrogate may use (LIME's feature selection).

    ``highest_weights``: the ``n`` largest ``|coef|`` of a weighted ridge (alpha 0.01) on
    every segment; ``forward_selection``: greedily add the segment that most raises the
    weighted R^2 of an unregularised fit; ``lasso_path``: the last point of the weighted
    LARS-lasso path with at most ``n`` non-zero coefficients; ``auto``: forward selection
    for ``n <= 6``, else highest weights.
    """
    m = z.shape[1]
    if method == "none" or n_features >= m:
        return np.arange(m)
    if method == "auto":
        method = "forward_selection" if n_features <= 6 else "highest_weights"
    if method == "highest_weights":
        coef, _ = weighted_ridge(z, y, w, 0.01)
        order = np.argsort(-np.abs(coef), kind="stable")
        return np.sort(order[:n_features])
    if method == "forward_selection":
        chosen: list[int] = []
        for _ in range(n_features):
            best, best_score = -1, -np.inf
            for j in range(m):
                if j in chosen:
                    continue
                cols = [*chosen, j]
                coef, icpt = weighted_ridge(z[:, cols], y, w, 0.0)
                score = weighted_r2(z[:, cols], y, w, coef, icpt)
                if score > best_score:
                    best, best_score = j, score
            chosen.append(best)
        return np.sort(np.array(chosen, dtype=np.int64))
    from sklearn.linear_model import lars_path

    sw = np.sqrt(w)
    zc = (z - np.average(z, axis=0, weights=w)) * sw[:, None]
    yc = (y - np.average(y, weights=w)) * sw
    _, _, coefs = lars_path(zc, yc, method="lasso")
    for i in range(coefs.shape[1] - 1, -1, -1):
        nonzero = np.flatnonzero(coefs[:, i])
        if len(nonzero) <= n_features:
            return nonzero
    return np.zeros(0, dtype=np.int64)


def fit_surrogate(
    z: np.ndarray,
    y: np.ndarray,
    *,
    kernel_width: float,
    distance: str,
    feature_selection: str,
    n_features: int | None,
    alpha: float,
) -> tuple[np.ndarray, float, float, np.ndarray]:
    """LIME's surrogate for coalitions ``z`` ``(n, M)`` (row 0 all on) and scores ``y``.

    Returns ``(coef, intercept, r2, selected)``: one coefficient per segment (0 where not
    selected), the intercept, the weighted R^2 and the selected segments' indices.
    """
    zf = np.asarray(z, dtype=np.float64)
    w = lime_weights(zf, kernel_width, distance)
    keep = select_features(zf, y, w, feature_selection, n_features or zf.shape[1])
    coef = np.zeros(zf.shape[1])
    sub, icpt = weighted_ridge(zf[:, keep], y, w, alpha)
    coef[keep] = sub
    return coef, icpt, weighted_r2(zf[:, keep], y, w, sub, icpt), keep


@register(
    "lime",
    family="perturbation",
    summary="weighted ridge surrogate over superpixels/supervoxels switched on and off at "
    "random; each segment's coefficient on its voxels",
    paper="Ribeiro, Singh, Guestrin 2016, 'Why should I trust you?': explaining the "
    "predictions of any classifier",
    output="single",
)
class Lime(Explainer):
    """LIME: ``a(p) = beta_{s(p)}``, ``beta = argmin sum_i pi(z_i) (S(x[z_i]) - c - z_i.beta)^2
    + alpha |beta|^2`` over random coalitions ``z_i`` of segments.

    Each sample's image is cut into segments (superpixels in 2D, supervoxels in 3D; see
    ``segmentation``). Coalitions ``z`` in ``{0, 1}^M`` are drawn uniformly (each
    segment on with probability 1/2); the first is all on. ``x[z]`` keeps the segments
    that are on and replaces the others by their "off" value; ``S`` is the target score.
    The weighted ridge surrogate is fitted with the proximity weights ``pi`` of the
    `lime` package (Ribeiro et al. 2016, section 3.3; paper 003 section 2.1), after an
    optional feature selection. The map spreads each segment's coefficient over its voxels
    (``(B, 1, *spatial)``; unselected segments 0).

    Extra params on the explanation: ``segment_weights`` (per sample, a list of ``K_b``
    coefficients, segment ``k`` being label ``k`` of the segmentation, i.e. the ``k``-th
    smallest label of ``segments=``), ``intercept``, ``r2`` (weighted fit quality),
    ``selected`` (indices of the segments used), ``n_segments``, ``n_evaluations`` (model
    rows evaluated, ``x`` included) and ``seed``.

    Parameters
    ----------
    n_samples:
        Coalitions per sample, the all-on one included (1000, as the `lime` package).
        Repeated coalitions are evaluated once.
    segments:
        Your own integer label map, ``(*spatial)`` or ``(B, *spatial)``; labels need not be
        contiguous (relabelled to ``0..K-1`` in ascending order). Overrides the automatic
        segmentation.
    segmentation:
        ``"slic"`` (2D and 3D), ``"felzenszwalb"`` or ``"quickshift"`` (2D only), or
        ``"grid"`` (2D and 3D; ``round(n_segments ** (1/d))`` cells per axis).
    n_segments:
        Number of segments asked of SLIC and the grid (ignored by Felzenszwalb and
        quickshift, whose scale parameters set it).
    segmentation_params:
        Options of the algorithm: SLIC ``compactness`` (0.1 on [0, 1] intensities),
        ``sigma`` (1.0); Felzenszwalb ``scale`` (100), ``sigma`` (0.8), ``min_size``
        (20); quickshift ``kernel_size`` (4), ``max_dist`` (200), ``ratio`` (0.2),
        ``sigma`` (0).
    baseline:
        The "off" value: ``"segment_mean"`` (each segment's mean per channel, LIME's
        default), a number, ``"zeros"``, ``"mean"``, ``"blur"``, ``"noise"`` or a tensor.
    kernel_width:
        Width of the exponential proximity kernel (0.25, the `lime` image default).
    distance:
        ``"cosine"`` (LIME's) or ``"euclidean"`` distance to the all-on coalition.
    feature_selection:
        ``"auto"``, ``"none"``, ``"forward_selection"``, ``"highest_weights"`` or
        ``"lasso_path"`` (see :func:`select_features`).
    n_features:
        Segments kept by the feature selection; None: all.
    alpha:
        Ridge penalty of the surrogate (1.0, scikit-learn's and LIME's default).
    batch_size:
        Perturbed inputs per forward pass; None: about 2**20 voxels' worth, at most 64.
    seed:
        Seeds the coalitions (and noise); drawn and reported when None.
    blur_sigma:
        Gaussian sigma in voxels for ``baseline="blur"``.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        n_samples: int = 1000,
        segments: torch.Tensor | np.ndarray | None = None,
        segmentation: str = "slic",
        n_segments: int = 50,
        segmentation_params: dict[str, float] | None = None,
        baseline: float | str | torch.Tensor = "segment_mean",
        kernel_width: float = 0.25,
        distance: str = "cosine",
        feature_selection: str = "auto",
        n_features: int | None = None,
        alpha: float = 1.0,
        batch_size: int | None = None,
        seed: int | None = None,
        blur_sigma: float | None = None,
    ) -> None:
        self.model = model
        self.n_samples = n_samples
        self.segments = segments
        self.segmentation = segmentation
        self.n_segments = n_segments
        self.segmentation_params = segmentation_params
        self.baseline = baseline
        self.kernel_width = kernel_width
        self.distance = distance
        self.feature_selection = feature_selection
        self.n_features = n_features
        self.alpha = alpha
        self.batch_size = batch_size
        self.seed = seed
        self.blur_sigma = blur_sigma

    def attribute(
        self, x: torch.Tensor, target: TargetSpec | Target
    ) -> tuple[torch.Tensor, torch.Tensor, Target, dict[str, Any]]:
        n = positive_samples(self.n_samples)
        width = _positive_number("kernel_width", self.kernel_width)
        alpha = _nonneg_number("alpha", self.alpha)
        distance = choice("distance", self.distance, DISTANCES)
        selection = choice("feature_selection", self.feature_selection, FEATURE_SELECTION)
        n_features = self.n_features
        if n_features is not None and (
            isinstance(n_features, bool) or not isinstance(n_features, int) or n_features < 1
        ):
            raise ValueError(f"n_features must be a positive integer or None, got {n_features!r}")
        seed = resolve_seed(self.seed)
        gen = seed_generator(seed)
        game = setup_game(self, x, target, generator=gen)
        _check_design_memory(n, max(game.seg.counts), len(game.seg.counts))
        designs = []
        for m in game.seg.counts:
            z = torch.randint(0, 2, (n, m), generator=gen, dtype=torch.bool)
            z[0] = True
            designs.append(z)
        # The all-on row is x itself, already scored; only the rest is evaluated.
        scores = game.values([d[1:] for d in designs])
        coefs, intercepts, r2s, selected = [], [], [], []
        for i, (d, s) in enumerate(zip(designs, scores)):
            y = np.concatenate([[float(game.v_full[i])], s.detach().cpu().double().numpy()])
            fit = fit_surrogate(
                d.numpy(),
                y,
                kernel_width=width,
                distance=distance,
                feature_selection=selection,
                n_features=n_features,
                alpha=alpha,
            )
            coefs.append(fit[0])
            intercepts.append(fit[1])
            r2s.append(fit[2])
            selected.append(fit[3].tolist())
        extra = segment_extra(game, coefs, seed)
        extra.update(intercept=intercepts, r2=r2s, selected=selected)
        return segment_map(game, coefs), game.output, game.target, extra


#: Bytes per coalition and segment while a surrogate is fitted: the boolean design, its
#: float64 copy, the feature-selected copy and the weighted products of the ridge solve.
_BYTES_PER_CELL = 1 + 3 * 8


def _check_design_memory(n_samples: int, n_segments: int, batch: int) -> None:
    """Refuse up front when the designs could not be held in memory.

    The coalitions of every sample are drawn and kept for the regression, ``n_samples``
    x ``n_segments`` per sample, whatever ``batch_size`` (which only bounds the model
    evaluations); beyond half of the machine's memory the run would fail hours later or
    swap, so it fails now with a message saying how much is needed.
    """
    need = n_samples * n_segments * _BYTES_PER_CELL + batch * n_samples * n_segments
    limit = _physical_memory() // 2
    if need > limit:
        raise ValueError(
            f"n_samples={n_samples} with {n_segments} segments needs about "
            f"{need / 2**30:.1f} GiB for LIME's coalition design and its regression, more "
            f"than half of this machine's {2 * limit / 2**30:.1f} GiB; use fewer samples (a "
            "few thousand suffice for 50-100 segments) or fewer segments"
        )


def _physical_memory() -> int:
    try:
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):  # not POSIX: assume a 16 GiB machine
        return 16 * 2**30


def _positive_number(name: str, value: object) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not np.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite positive number, got {value!r}")
    return float(value)


def _nonneg_number(name: str, value: object) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not np.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite non-negative number, got {value!r}")
    return float(value)
