"""Shapley values of segments against brute force over every coalition, and captum's
exact ``ShapleyValues`` (all orderings), on small CNNs in float64, 2D and 3D."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

import trustmap
from trustmap.methods.perturbation._common import perturbation_baseline
from trustmap.methods.perturbation._segmentation import grid_labels

DTYPE = torch.float64


def cnn(dim: int) -> nn.Sequential:
    conv = nn.Conv2d if dim == 2 else nn.Conv3d
    pool = nn.AdaptiveMaxPool2d(1) if dim == 2 else nn.AdaptiveMaxPool3d(1)
    torch.manual_seed(21)
    return nn.Sequential(
        conv(1, 6, 3, padding=1),
        nn.ReLU(),
        conv(6, 6, 3, padding=1, stride=2),
        nn.ReLU(),
        pool,  # max pooling: strong interactions between segments
        nn.Flatten(),
        nn.Linear(6, 3),
    ).to(DTYPE)


def setting(dim: int, n_segments: int):
    spatial = (12, 12) if dim == 2 else (6, 6, 6)
    g = torch.Generator().manual_seed(22)
    x = torch.randn(2, 1, *spatial, generator=g, dtype=DTYPE)
    labels = torch.from_numpy(grid_labels(spatial, n_segments))
    return cnn(dim).eval(), x, labels


def brute_force(model, x, labels, off, target):
    """``phi_i = sum_S |S|! (M - |S| - 1)! / M! [v(S + i) - v(S)]``, ``(B, M)``."""
    m = int(labels.max()) + 1
    subsets = [s for r in range(m + 1) for s in itertools.combinations(range(m), r)]
    keep = torch.zeros(len(subsets), m, dtype=torch.bool)
    for row, s in enumerate(subsets):
        keep[row, list(s)] = True
    value = {}
    with torch.no_grad():
        for b in range(x.shape[0]):
            masks = keep[:, labels].unsqueeze(1)
            out = model(torch.where(masks, x[b], off[b]))[:, int(target[b])]
            for s, v in zip(subsets, out):
                value[b, s] = v
    phi = torch.zeros(x.shape[0], m, dtype=DTYPE)
    for b, i in itertools.product(range(x.shape[0]), range(m)):
        others = [j for j in range(m) if j != i]
        for r in range(m):
            w = math.factorial(r) * math.factorial(m - r - 1) / math.factorial(m)
            for s in itertools.combinations(others, r):
                phi[b, i] += w * (value[b, tuple(sorted((*s, i)))] - value[b, s])
    return phi


def segment_weights(exp) -> torch.Tensor:
    return torch.tensor(exp.params["segment_weights"], dtype=DTYPE)


@pytest.mark.parametrize(("dim", "n_segments"), [(2, 6), (3, 8)])
@pytest.mark.parametrize("baseline", [0.0, "blur"])
def test_kernel_shap_enumeration_is_exact(dim, n_segments, baseline):
    model, x, labels = setting(dim, n_segments)
    m = int(labels.max()) + 1
    target = torch.tensor([0, 2])
    exact = brute_force(model, x, labels, perturbation_baseline(x, baseline), target)
    exp = trustmap.get_method("kernel_shap")(
        model, segments=labels, n_samples=2**m - 2, baseline=baseline
    ).explain(x, target=target)
    assert exp.params["exact"] == [True, True]
    assert float(exact.abs().max()) > 1e-3
    torch.testing.assert_close(segment_weights(exp), exact, rtol=0, atol=1e-6)


def test_brute_force_agrees_with_captum_shapley_values():
    # Checks the oracle itself: captum enumerates every ordering (M! of them).
    captum_attr = pytest.importorskip("captum.attr")
    model, x, labels = setting(2, 4)
    target = torch.tensor([1, 1])
    exact = brute_force(model, x, labels, torch.zeros_like(x), target)
    ref = captum_attr.ShapleyValues(model).attribute(
        x, target=target, baselines=0.0, feature_mask=labels[None, None], perturbations_per_eval=16
    )
    first = [int((labels.reshape(-1) == k).nonzero()[0, 0]) for k in range(4)]
    ref_phi = ref.reshape(2, -1)[:, first].to(DTYPE)
    torch.testing.assert_close(ref_phi, exact, rtol=1e-5, atol=1e-7)
    exp = trustmap.get_method("kernel_shap")(model, segments=labels, n_samples=14).explain(
        x, target=target
    )
    torch.testing.assert_close(segment_weights(exp), exact, rtol=0, atol=1e-10)


def test_shapley_sampling_is_unbiased_on_a_cnn():
    model, x, labels = setting(2, 6)
    target = torch.tensor([0, 2])
    exact = brute_force(model, x, labels, torch.zeros_like(x), target)
    runs = torch.stack(
        [
            segment_weights(
                trustmap.get_method("shapley_sampling")(
                    model, segments=labels, n_samples=4, seed=seed
                ).explain(x, target=target)
            )
            for seed in range(60)
        ]
    )
    sem = runs.std(0) / math.sqrt(len(runs))
    assert ((runs.mean(0) - exact).abs() <= 4 * sem + 1e-9).all()
    # Efficiency holds per run: the gains of every ordering add up to v(all) - v(none).
    torch.testing.assert_close(runs.sum(2), exact.sum(1).expand(len(runs), 2), rtol=0, atol=1e-9)
