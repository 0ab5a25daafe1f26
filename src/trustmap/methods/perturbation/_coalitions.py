"""Shared machinery of the segment-based methods (LIME, KernelSHAP, Shapley sampling).

A *coalition* is a boolean vector over a sample's segments: ``True`` keeps the segment,
``False`` replaces it by its reference ("off") value. The helpers here build the masked
inputs of many coalitions of all samples of a batch in chunks, score them in one stream
of batched forward passes, and solve the weighted regressions the surrogates need.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from trustmap.core.targets import Target, resolve_target
from trustmap.core.validation import positive_int
from trustmap.methods.perturbation._common import (
    BASELINES,
    perturbation_baseline,
    score_perturbations,
)
from trustmap.methods.perturbation._segmentation import Segmentation, prepare, segment_means

# Rows per forward pass when ``batch_size`` is None: about 2**20 input voxels per pass
# (64 images of 128 x 128, 4 volumes of 64^3), at most 64 rows. Larger CPU batches gain
# little throughput and cost memory.
AUTO_VOXELS = 2**20
AUTO_MAX_ROWS = 64


def batch_rows(x: torch.Tensor, batch_size: object) -> int:
    """Validated ``batch_size``, or the automatic number of rows per forward pass."""
    if batch_size is not None:
        return positive_int("batch_size", batch_size)
    per_row = max(1, x[0].numel())
    return int(min(AUTO_MAX_ROWS, max(1, AUTO_VOXELS // per_row)))


class FastLayout:
    """A forward that hands the model its inputs in channels-last memory layout.

    Same values, different strides: oneDNN's convolutions run 15-30 % faster on
    channels-last inputs on CPU (measured on MONAI DenseNet121 and ResNet-10, 2D and 3D).
    For one channel the restriding is free (no copy, memory unchanged). A model that
    rejects the layout (e.g. it calls ``.view`` on a feature map) raises on the first
    pass; from then on the inputs go in the standard layout. Only used on CPU: on GPUs
    the gain has not been measured here.
    """

    def __init__(self, forward: Callable[[torch.Tensor], torch.Tensor], device: torch.device):
        self.forward = forward
        self.active = device.type == "cpu"

    def __call__(self, inputs: torch.Tensor) -> torch.Tensor:
        if self.active:
            try:
                return self.forward(channels_last(inputs))
            except torch.OutOfMemoryError:
                # The restrided copy of a multi-channel batch costs memory the standard
                # layout does not need; retry once without it.
                self.active = False
            except RuntimeError as err:
                # Only the layout's own failure (a .view on a restrided map) is retried:
                # any other error of the model is the model's, and must not be hidden by
                # running the batch again.
                if not _LAYOUT_ERROR.search(str(err)):
                    raise
                self.active = False
        return self.forward(inputs)


#: What PyTorch says when a model cannot take channels-last strides (``x.view`` on a
#: restrided tensor, kernels that demand contiguous memory).
_LAYOUT_ERROR = re.compile(r"stride|contiguous", re.IGNORECASE)


def channels_last(t: torch.Tensor) -> torch.Tensor:
    """``t`` ``(N, C, *spatial)`` with channels-last strides (a view when ``C == 1``)."""
    if t.shape[1] == 1:
        stride = list(t.contiguous().stride())
        stride[1] = 1
        return t.contiguous().as_strided(t.shape, stride)
    fmt = torch.channels_last if t.ndim == 4 else torch.channels_last_3d
    return t.contiguous(memory_format=fmt)


def positive_samples(value: object, name: str = "n_samples") -> int:
    """``n_samples`` must be a positive integer: zero samples explain nothing."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a positive integer, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be a positive integer (at least 1 sample), got {value}")
    return value


def seed_generator(seed: int) -> torch.Generator:
    """A CPU generator: designs are drawn on the CPU so that a seed gives the same
    coalitions on every device."""
    gen = torch.Generator()
    gen.manual_seed(seed)
    return gen


def reference(
    x: torch.Tensor,
    baseline: object,
    seg: Segmentation,
    *,
    generator: torch.Generator | None,
    blur_sigma: float | None,
) -> torch.Tensor:
    """The "off" value of every voxel, ``(B, C, *spatial)``.

    ``"segment_mean"``: each segment's own mean per channel (LIME's default); otherwise
    any baseline of :func:`~trustmap.methods.perturbation._common.perturbation_baseline`.
    """
    if isinstance(baseline, str):
        options = (*BASELINES, "segment_mean")
        if baseline not in options:
            raise ValueError(
                f"baseline must be a number, a tensor or one of {options}, got {baseline!r}"
            )
        if baseline == "segment_mean":
            return segment_means(x, seg)
        if baseline == "noise":
            generator = device_generator(generator, x.device)
    return perturbation_baseline(x, baseline, generator=generator, blur_sigma=blur_sigma)


def device_generator(
    generator: torch.Generator | None, device: torch.device
) -> torch.Generator | None:
    """A generator on ``device`` seeded by one draw from the CPU ``generator``.

    Noise is drawn on the input's device; its seed comes from the method's own stream so
    that one ``seed`` fixes everything.
    """
    if generator is None:
        return None
    dev = torch.Generator(device=device)
    dev.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
    return dev


def coalition_batches(
    x: torch.Tensor, off: torch.Tensor, seg: Segmentation, designs: Sequence[torch.Tensor]
) -> tuple[Callable[[slice], tuple[torch.Tensor, torch.Tensor]], list[int]]:
    """The masked inputs of every coalition of every sample, built lazily per chunk.

    ``designs[b]`` is ``(n_b, K_b)`` bool (CPU or ``x``'s device): sample ``b``'s
    coalitions. Rows of all samples are stacked, so a forward pass mixes samples when the
    chunks allow. Returns ``make_batch(slice) -> (inputs, rows)`` over the stacked rows
    and the row count per sample.
    """
    b, _, *spatial = x.shape
    sizes = [int(d.shape[0]) for d in designs]
    padded = torch.zeros((sum(sizes), seg.max_count), dtype=torch.bool, device=x.device)
    start = 0
    for d, n in zip(designs, sizes):
        padded[start : start + n, : d.shape[1]] = d.to(x.device, torch.bool)
        start += n
    samples = torch.repeat_interleave(
        torch.arange(b, device=x.device), torch.tensor(sizes, device=x.device)
    )

    def make_batch(sl: slice) -> tuple[torch.Tensor, torch.Tensor]:
        rows = samples[sl]
        keep = padded[sl].gather(1, seg.labels[rows]).view(len(rows), 1, *spatial)
        return torch.where(keep, x[rows], off[rows]), rows

    return make_batch, sizes


def score_with_x(
    forward: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    target: Any,
    make_batch: Callable[[slice], tuple[torch.Tensor, torch.Tensor]],
    n_rows: int,
    batch_size: int,
) -> tuple[torch.Tensor, Target, torch.Tensor]:
    """The output on ``x``, the resolved target and the scores of ``n_rows`` perturbed
    inputs ``(n_rows,)``.

    ``x`` rides in the first forward pass with the first perturbed rows, so explaining a
    batch costs no separate pass; the target is resolved on its rows before any score is
    read. Everything runs under inference mode.
    """
    b = x.shape[0]
    first = min(n_rows, max(0, batch_size - b))
    with torch.inference_mode():
        if first:
            inputs, rows = make_batch(slice(0, first))
            out = forward(torch.cat([x, inputs]))
            output = out[:b]
        else:
            output = forward(x)
        resolved = target if isinstance(target, Target) else resolve_target(target, output)
        head = resolved.scores(out[b:], rows) if first else output.new_zeros(0)

    def rest(sl: slice) -> tuple[torch.Tensor, torch.Tensor]:
        return make_batch(slice(sl.start + first, sl.stop + first))

    tail = score_perturbations(forward, rest, n_rows - first, resolved, batch_size)
    scores = torch.cat([head.to(x.dtype), tail.to(device=x.device, dtype=x.dtype)])
    return output, resolved, scores


def unique_rows(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct rows of a boolean matrix and, for every row, the index of its copy."""
    uniq, inverse = torch.unique(z, dim=0, return_inverse=True)
    return uniq, inverse


# -- regressions ----------------------------------------------------------------------------
def weighted_ridge(
    z: np.ndarray, y: np.ndarray, w: np.ndarray, alpha: float
) -> tuple[np.ndarray, float]:
    """``argmin_{b, c} sum_i w_i (y_i - c - z_i . b)^2 + alpha |b|^2`` (intercept free).

    The same solution as scikit-learn's ``Ridge(alpha, fit_intercept=True)`` with
    ``sample_weight=w``: centre by the weighted means, then solve the normal equations.
    """
    wsum = w.sum()
    if z.shape[1] == 0:
        return np.zeros(0), float((w * y).sum() / wsum)
    z_mean = (w[:, None] * z).sum(0) / wsum
    y_mean = float((w * y).sum() / wsum)
    zc = (z - z_mean) * np.sqrt(w)[:, None]
    yc = (y - y_mean) * np.sqrt(w)
    m = z.shape[1]
    gram = zc.T @ zc + alpha * np.eye(m)
    rhs = zc.T @ yc
    if alpha > 0:
        coef = np.linalg.solve(gram, rhs)
    else:
        coef = np.linalg.lstsq(zc, yc, rcond=None)[0]
    return coef, y_mean - float(z_mean @ coef)


def weighted_r2(
    z: np.ndarray, y: np.ndarray, w: np.ndarray, coef: np.ndarray, icpt: float
) -> float:
    """Weighted coefficient of determination of a linear fit (scikit-learn's ``score``)."""
    pred = z @ coef + icpt
    y_mean = (w * y).sum() / w.sum()
    total = float((w * (y - y_mean) ** 2).sum())
    resid = float((w * (y - pred) ** 2).sum())
    if total == 0:
        return 1.0 if resid == 0 else 0.0
    return 1.0 - resid / total


def constrained_wls(z: np.ndarray, y: np.ndarray, w: np.ndarray, total: float) -> np.ndarray:
    """``argmin_phi sum_i w_i (y_i - z_i . phi)^2`` subject to ``sum(phi) = total``.

    Solved through its KKT system ``[[Z'WZ, 1], [1', 0]] [phi; mu] = [Z'Wy; total]`` by
    least squares, so a design that does not determine every coefficient (few samples)
    still gets the minimum-norm solution instead of an error.
    """
    m = z.shape[1]
    zw = z * np.sqrt(w)[:, None]
    yw = y * np.sqrt(w)
    kkt = np.zeros((m + 1, m + 1))
    kkt[:m, :m] = zw.T @ zw
    kkt[:m, m] = 1.0
    kkt[m, :m] = 1.0
    rhs = np.concatenate([zw.T @ yw, [total]])
    # Scale the constraint row like the Gram matrix so lstsq's rank cut-off treats both alike.
    scale = max(1.0, float(np.abs(kkt[:m, :m]).max(initial=0.0)))
    kkt[m, :m] *= scale
    kkt[:m, m] *= scale
    rhs[m] *= scale
    sol = np.linalg.lstsq(kkt, rhs, rcond=None)[0]
    return sol[:m]


# -- the game every segment method plays -------------------------------------------------------
@dataclass
class SegmentGame:
    """``v_b(S)``: the target score of sample ``b`` with only the segments in ``S`` kept.

    The first call of :meth:`values` also forwards ``x`` (in the same first pass) and
    sets ``output``, ``target`` and ``v_full`` (every segment kept, i.e. ``x`` itself);
    ``n_evaluations`` counts the model rows evaluated, ``x`` included.
    """

    forward: Callable[[torch.Tensor], torch.Tensor]
    x: torch.Tensor
    seg: Segmentation
    off: torch.Tensor
    target_spec: Any
    rows_per_pass: int
    output: torch.Tensor | None = None
    target: Target | None = None
    v_full: torch.Tensor | None = None  # (B,), x's dtype
    n_evaluations: int = 0

    def values(self, designs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Scores of ``designs[b]`` ``(n_b, K_b)`` bool, each coalition evaluated once.

        Repeated rows are evaluated once and their score copied: a forward pass is the
        whole cost of these methods.
        """
        uniq, inverse = [], []
        for d in designs:
            u, inv = unique_rows(d.to(torch.bool))
            uniq.append(u)
            inverse.append(inv)
        make_batch, sizes = coalition_batches(self.x, self.off, self.seg, uniq)
        n_rows = sum(sizes)
        if self.target is None:
            self.output, self.target, scores = score_with_x(
                self.forward, self.x, self.target_spec, make_batch, n_rows, self.rows_per_pass
            )
            with torch.inference_mode():
                self.v_full = self.target.scores(self.output).to(self.x.dtype)
            self.n_evaluations += self.x.shape[0]
        else:
            scores = score_perturbations(
                self.forward, make_batch, n_rows, self.target, self.rows_per_pass
            ).to(self.x.dtype)
        self.n_evaluations += n_rows
        per_sample = scores.split(sizes)
        return [s[inv.to(s.device)] for s, inv in zip(per_sample, inverse)]


def setup_game(
    explainer: Any, x: torch.Tensor, target: Any, *, generator: torch.Generator
) -> SegmentGame:
    """Validate the options every segment method shares (``segments``, ``segmentation``,
    ``n_segments``, ``segmentation_params``, ``baseline``, ``blur_sigma``, ``batch_size``,
    read from the explainer), segment ``x`` and build the off values; no forward pass yet
    (see :meth:`SegmentGame.values`)."""
    e = explainer
    rows = batch_rows(x, e.batch_size)
    seg = prepare(x, e.segments, e.segmentation, e.n_segments, e.segmentation_params)
    off = reference(x, e.baseline, seg, generator=generator, blur_sigma=e.blur_sigma)
    return SegmentGame(
        forward=FastLayout(e.forward, x.device),
        x=x,
        seg=seg,
        off=off,
        target_spec=target,
        rows_per_pass=rows,
    )


def segment_extra(game: SegmentGame, values: Sequence[np.ndarray], seed: int) -> dict[str, Any]:
    """What every segment method reports: per-sample segment values, counts, cost, seed."""
    return {
        "segment_weights": [np.asarray(v, dtype=np.float64).tolist() for v in values],
        "n_segments": list(game.seg.counts),
        "n_evaluations": game.n_evaluations,
        "seed": seed,
    }


def segment_map(game: SegmentGame, values: Sequence[np.ndarray]) -> torch.Tensor:
    """``(B, 1, *spatial)``: each segment's value on its voxels."""
    x = game.x
    b, _, *spatial = x.shape
    padded = torch.zeros((b, game.seg.max_count), dtype=torch.float64)
    for i, v in enumerate(values):
        padded[i, : len(v)] = torch.as_tensor(np.asarray(v, dtype=np.float64))
    return game.seg.spread(padded.to(x.device), tuple(spatial)).to(x.dtype)
