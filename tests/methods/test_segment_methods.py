"""LIME, KernelSHAP and Shapley sampling over segments: exact identities, statistics,
segmentations, determinism and errors."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn

import trustmap
from tests.conftest import make_input, make_tiny
from trustmap.methods.perturbation import _segmentation
from trustmap.methods.perturbation.kernel_shap import kernel_shap_design
from trustmap.methods.perturbation.lime import fit_surrogate
from trustmap.methods.perturbation.shapley_sampling import permutations

SEGMENT_METHODS = ("lime", "kernel_shap", "shapley_sampling")


class SegmentModel(nn.Module):
    """A model of the segment means ``m_k`` of channel 0 of ``x``.

    ``s = bias + w . m + hidden`` where ``hidden = v . relu(A m + c)`` (off when
    ``nonlinear`` is False, leaving a model additive over segments). Output ``(s, -s)``.
    """

    def __init__(self, labels: torch.Tensor, *, nonlinear: bool = False, seed: int = 0) -> None:
        super().__init__()
        k = int(labels.max()) + 1
        gen = torch.Generator().manual_seed(seed)
        self.register_buffer("onehot", nn.functional.one_hot(labels.reshape(-1), k).double())
        self.w = nn.Parameter(torch.randn(k, generator=gen, dtype=torch.float64))
        self.bias = nn.Parameter(torch.tensor(0.7, dtype=torch.float64))
        self.a = nn.Parameter(torch.randn(8, k, generator=gen, dtype=torch.float64))
        self.c = nn.Parameter(torch.randn(8, generator=gen, dtype=torch.float64))
        self.v = nn.Parameter(torch.randn(8, generator=gen, dtype=torch.float64))
        self.nonlinear = nonlinear

    def means(self, x: torch.Tensor) -> torch.Tensor:
        flat = x[:, 0].reshape(x.shape[0], -1)
        return flat @ self.onehot / self.onehot.sum(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.means(x)
        s = self.bias + m @ self.w
        if self.nonlinear:
            s = s + torch.relu(m @ self.a.T + self.c) @ self.v
        return torch.stack([s, -s], 1)


def block_labels(spatial: tuple[int, ...], n: int) -> torch.Tensor:
    return torch.from_numpy(_segmentation.grid_labels(spatial, n))


def brute_force_shapley(model, x, labels, baseline, target=0):
    """Shapley values by the subset formula, one forward per coalition."""
    k = int(labels.max()) + 1
    b = x.shape[0]

    def v(subset):
        keep = torch.zeros(k, dtype=torch.bool)
        keep[list(subset)] = True
        mask = keep[labels].view(1, 1, *x.shape[2:])
        with torch.no_grad():
            return model(torch.where(mask, x, baseline))[:, target]

    values = {s: v(s) for r in range(k + 1) for s in itertools.combinations(range(k), r)}
    phi = torch.zeros(b, k, dtype=torch.float64)
    for i in range(k):
        others = [j for j in range(k) if j != i]
        for r in range(k):
            weight = math.factorial(r) * math.factorial(k - r - 1) / math.factorial(k)
            for s in itertools.combinations(others, r):
                phi[:, i] += weight * (values[tuple(sorted((*s, i)))] - values[s])
    return phi


def weights_of(exp) -> torch.Tensor:
    return torch.tensor(exp.params["segment_weights"], dtype=torch.float64)


def smooth_input(dims: int, batch: int, seed: int = 0) -> torch.Tensor:
    return make_input(dims, batch, seed=seed, dtype=torch.float64) + 1.0


# -- segmentations ----------------------------------------------------------------------------
def test_grid_labels():
    labels = _segmentation.grid_labels((16, 16), 16)
    assert labels.max() == 15 and np.array_equal(np.unique(labels), np.arange(16))
    assert (labels[:4, :4] == 0).all() and (labels[12:, 12:] == 15).all()
    vol = _segmentation.grid_labels((8, 6, 5), 8)  # 2 cells per axis; axis 5 cut 2 + 3
    assert sorted(set(np.bincount(vol.reshape(-1)).tolist())) == [24, 36]
    assert len(np.unique(vol)) == 8
    assert len(np.unique(_segmentation.grid_labels((3, 16), 100))) == 3 * 10  # capped at 3


@pytest.mark.parametrize("method", ["slic", "felzenszwalb", "quickshift", "grid"])
def test_automatic_segmentations_2d(method):
    x = smooth_input(2, 2)
    seg = _segmentation.prepare(x, None, method, 8, None)
    assert seg.labels.shape == (2, 256)
    for i, k in enumerate(seg.counts):
        assert torch.equal(seg.labels[i].unique(), torch.arange(k))
    model = make_tiny(2).double()
    exp = trustmap.get_method("kernel_shap")(
        model, segmentation=method, n_segments=8, n_samples=20, seed=0
    ).explain(x)
    assert exp.params["n_segments"] == list(seg.counts)
    assert exp.attributions.shape == (2, 1, 16, 16)


@pytest.mark.parametrize("method", ["slic", "grid"])
def test_supervoxels_3d(method):
    x = smooth_input(3, 1)
    seg = _segmentation.prepare(x, None, method, 8, None)
    assert seg.labels.shape == (1, 512) and seg.counts[0] >= 2
    for name in SEGMENT_METHODS:
        exp = trustmap.get_method(name)(
            make_tiny(3).double(), segmentation=method, n_segments=8, n_samples=4, seed=0
        ).explain(x)
        # Every segment's voxels share one value.
        flat = exp.attributions.reshape(-1)
        for k in range(seg.counts[0]):
            vals = flat[seg.labels[0] == k]
            assert torch.all(vals == vals[0])


@pytest.mark.parametrize("method", ["felzenszwalb", "quickshift"])
def test_2d_only_segmentations_refuse_volumes(method):
    with pytest.raises(ValueError, match="2D images only"):
        trustmap.explain(make_tiny(3), make_input(3, 1), "lime", segmentation=method)


def test_segment_means():
    x = smooth_input(2, 2)
    labels = block_labels((16, 16), 4)
    seg = _segmentation.prepare(x, labels, None, None, None)
    means = _segmentation.segment_means(x, seg)
    assert torch.allclose(
        means[:, :, :8, :8], x[:, :, :8, :8].mean((2, 3), keepdim=True).expand(-1, -1, 8, 8)
    )
    assert torch.allclose(means[:, :, 8:, :8].mean((2, 3)), x[:, :, 8:, :8].mean((2, 3)))


def test_user_segments_are_relabelled():
    x = smooth_input(2, 2)
    labels = block_labels((16, 16), 4)
    odd = torch.tensor([3, 7, 100, 12])[labels]  # same partition, arbitrary labels
    model = SegmentModel(labels)
    ks = trustmap.get_method("kernel_shap")
    a = ks(model, segments=labels, n_samples=14, seed=0).explain(x)
    b = ks(model, segments=odd.numpy(), n_samples=14, seed=0).explain(x)
    # Segment order follows ascending labels: 3, 7, 12, 100 -> block 0, 1, 3, 2.
    torch.testing.assert_close(a.attributions, b.attributions)
    torch.testing.assert_close(weights_of(b), weights_of(a)[:, [0, 1, 3, 2]])


def test_per_sample_segments_with_different_counts():
    x = smooth_input(2, 2)
    per_sample = torch.stack([block_labels((16, 16), 4), block_labels((16, 16), 9)])
    model = SegmentModel(block_labels((16, 16), 16), nonlinear=True)
    ks = trustmap.get_method("kernel_shap")
    exp = ks(model, segments=per_sample, n_samples=600, seed=0).explain(x)
    assert exp.params["n_segments"] == [4, 9]
    assert [len(w) for w in exp.params["segment_weights"]] == [4, 9]
    assert exp.params["exact"] == [True, True]
    # Exact regime: the batch equals each sample explained alone.
    for i in range(2):
        alone = ks(model, segments=per_sample[i], n_samples=600, seed=0).explain(
            x[i : i + 1], target=exp.target[i : i + 1]
        )
        torch.testing.assert_close(
            alone.attributions, exp.attributions[i : i + 1], rtol=1e-9, atol=1e-12
        )


@pytest.mark.parametrize("name", SEGMENT_METHODS)
def test_segment_errors(name):
    model = make_tiny(2)
    x = make_input(2, 2)
    cls = trustmap.get_method(name)
    with pytest.raises(ValueError, match="segments has shape"):
        cls(model, segments=torch.zeros(15, 16, dtype=torch.long)).explain(x)
    with pytest.raises(ValueError, match="segments has shape"):
        cls(model, segments=torch.zeros(3, 16, 16, dtype=torch.long)).explain(x)
    with pytest.raises(TypeError, match="integer labels"):
        cls(model, segments=torch.zeros(16, 16)).explain(x)
    with pytest.raises(TypeError, match="label tensor"):
        cls(model, segments=[[0, 1]]).explain(x)
    with pytest.raises(ValueError, match="n_samples"):
        cls(model, n_samples=0).explain(x)
    with pytest.raises(TypeError, match="n_samples"):
        cls(model, n_samples=2.5).explain(x)
    with pytest.raises(ValueError, match="segmentation must be"):
        cls(model, segmentation="watershed").explain(x)
    with pytest.raises(ValueError, match="not options of"):
        cls(model, segmentation_params={"scale": 3}).explain(x)
    with pytest.raises(ValueError, match="n_segments"):
        cls(model, n_segments=0).explain(x)
    with pytest.raises(ValueError, match="baseline"):
        cls(model, baseline="median").explain(x)


def test_method_specific_errors():
    model = make_tiny(2)
    x = make_input(2, 1)
    with pytest.raises(ValueError, match="kernel_width"):
        trustmap.explain(model, x, "lime", kernel_width=0)
    with pytest.raises(ValueError, match="n_features"):
        trustmap.explain(model, x, "lime", n_features=0)
    with pytest.raises(ValueError, match="feature_selection"):
        trustmap.explain(model, x, "lime", feature_selection="best")
    with pytest.raises(ValueError, match="distance"):
        trustmap.explain(model, x, "lime", distance="manhattan")
    with pytest.raises(ValueError, match="sampling"):
        trustmap.explain(model, x, "shapley_sampling", sampling="sobol")


@pytest.mark.parametrize("name", SEGMENT_METHODS)
def test_determinism_under_seed(name):
    model = make_tiny(2).double()
    x = smooth_input(2, 2)
    cls = trustmap.get_method(name)
    params = {"n_segments": 12, "n_samples": 30 if name != "shapley_sampling" else 3}
    a = cls(model, seed=5, **params).explain(x)
    b = cls(model, seed=5, **params).explain(x)
    c = cls(model, seed=6, **params).explain(x)
    assert torch.equal(a.attributions, b.attributions)
    assert not torch.equal(a.attributions, c.attributions)
    drawn = cls(model, **params).explain(x)
    again = cls(model, seed=drawn.params["seed"], **params).explain(x)
    assert torch.equal(drawn.attributions, again.attributions)


# -- KernelSHAP -------------------------------------------------------------------------------
@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("baseline", [0.0, -0.4, "blur"])
def test_kernel_shap_exact_on_additive_model(dims, baseline):
    spatial = (16, 16) if dims == 2 else (8, 8, 8)
    labels = block_labels(spatial, 6 if dims == 2 else 8)
    k = int(labels.max()) + 1
    model = SegmentModel(labels)
    x = smooth_input(dims, 2)
    exp = trustmap.get_method("kernel_shap")(
        model, segments=labels, n_samples=2**k - 2, baseline=baseline
    ).explain(x, target=0)
    from trustmap.methods.perturbation._common import perturbation_baseline

    off = perturbation_baseline(x, baseline)
    expected = model.w.detach() * (model.means(x) - model.means(off))
    assert exp.params["exact"] == [True, True]
    assert exp.params["n_evaluations"] == 2 * 2**k  # every coalition, x included
    torch.testing.assert_close(weights_of(exp), expected, rtol=0, atol=1e-6)
    spread = expected.gather(1, labels.reshape(1, -1).expand(2, -1)).view(2, 1, *spatial)
    torch.testing.assert_close(exp.attributions, spread, rtol=0, atol=1e-6)


def test_kernel_shap_exact_with_interactions():
    labels = block_labels((16, 16), 6)
    model = SegmentModel(labels, nonlinear=True)
    x = smooth_input(2, 2)
    exact = brute_force_shapley(model, x, labels, 0.0)
    exp = trustmap.get_method("kernel_shap")(model, segments=labels, n_samples=10**4).explain(
        x, target=0
    )
    torch.testing.assert_close(weights_of(exp), exact, rtol=0, atol=1e-6)


def test_kernel_shap_sampled_is_efficient_and_converges():
    labels = block_labels((16, 16), 12)
    model = SegmentModel(labels, nonlinear=True, seed=1)
    x = smooth_input(2, 1)
    exact = trustmap.get_method("kernel_shap")(model, segments=labels, n_samples=2**12).explain(
        x, target=0
    )
    phi_exact = weights_of(exact)
    with torch.no_grad():
        v_full = model(x)[0, 0]
        v_empty = model(torch.zeros_like(x))[0, 0]
    errors = {}
    for n in (40, 400):
        errs = []
        for seed in range(8):
            exp = trustmap.get_method("kernel_shap")(
                model, segments=labels, n_samples=n, seed=seed
            ).explain(x, target=0)
            phi = weights_of(exp)
            assert exp.params["exact"] == [False]
            assert exp.params["n_evaluations"] <= n + 2
            # Efficiency holds exactly even with few samples.
            assert abs(float(phi.sum()) - float(v_full - v_empty)) < 1e-9
            errs.append(float((phi - phi_exact).norm() / phi_exact.norm()))
        errors[n] = float(np.mean(errs))
    assert errors[400] < 0.5 * errors[40]


def test_kernel_shap_design():
    gen = torch.Generator().manual_seed(0)
    z, w, exact = kernel_shap_design(5, 30, gen)
    assert exact and z.shape == (30, 5) and len({r.tobytes() for r in z}) == 30
    z, w, exact = kernel_shap_design(10, 100, gen)
    assert not exact and z.shape == (100, 10)
    assert len({r.tobytes() for r in z}) == 100  # distinct coalitions
    sizes = z.sum(1)
    assert (sizes > 0).all() and (sizes < 10).all()
    # Sizes 1 and 9 (20 coalitions) are enumerated; the rest sampled in complementary pairs.
    assert (sizes == 1).sum() == 10 and (sizes == 9).sum() == 10
    keys = {r.tobytes() for r in z}
    paired = sum((~r).tobytes() in keys for r in z)
    assert paired >= 99  # only the last draw may lose its complement to the budget
    assert abs(w.sum() - 1.0) < 1e-12  # the kernel's mass, normalised


# -- Shapley sampling ---------------------------------------------------------------------------
@pytest.mark.parametrize("sampling", ["antithetic", "independent"])
def test_shapley_sampling_exact_on_additive_model(sampling):
    labels = block_labels((8, 8, 8), 8)
    model = SegmentModel(labels)
    x = smooth_input(3, 2)
    exp = trustmap.get_method("shapley_sampling")(
        model, segments=labels, n_samples=3, sampling=sampling, seed=0
    ).explain(x, target=0)
    expected = model.w.detach() * model.means(x)  # baseline 0
    torch.testing.assert_close(weights_of(exp), expected, rtol=0, atol=1e-10)


def test_permutations():
    gen = torch.Generator().manual_seed(0)
    for sampling in ("antithetic", "independent"):
        p = permutations(6, 17, sampling, gen)
        assert p.shape == (17, 6)
        assert torch.equal(p.sort(1).values, torch.arange(6).expand(17, 6))
    p = permutations(6, 4, "antithetic", gen)
    assert torch.equal(p[1], p[0].flip(0)) and torch.equal(p[3], p[2].flip(0))
    assert not torch.equal(p[0], p[2])


def test_shapley_sampling_unbiased_and_root_n():
    labels = block_labels((16, 16), 6)
    model = SegmentModel(labels, nonlinear=True, seed=2)
    x = smooth_input(2, 1)
    exact = brute_force_shapley(model, x, labels, 0.0)[0]
    estimates = {}
    for n in (12, 48):
        runs = [
            weights_of(
                trustmap.get_method("shapley_sampling")(
                    model, segments=labels, n_samples=n, seed=seed
                ).explain(x, target=0)
            )[0]
            for seed in range(80)
        ]
        estimates[n] = torch.stack(runs)
    est = estimates[12]
    sem = est.std(0) / math.sqrt(len(est))
    assert sem.max() > 0  # the game is not quadratic: sampling has variance
    assert ((est.mean(0) - exact).abs() <= 4 * sem + 1e-12).all()
    rmse = {n: float(((e - exact) ** 2).sum(1).mean().sqrt()) for n, e in estimates.items()}
    assert 1.5 < rmse[12] / rmse[48] < 2.7  # ~ sqrt(4)
    # Efficiency: the marginal gains of every ordering add up to v(all) - v(none).
    with torch.no_grad():
        total = model(x)[0, 0] - model(torch.zeros_like(x))[0, 0]
    torch.testing.assert_close(est.sum(1), total.expand(len(est)), rtol=0, atol=1e-10)


def test_shapley_sampling_cost():
    labels = block_labels((16, 16), 9)
    model = SegmentModel(labels, nonlinear=True)
    x = smooth_input(2, 2)
    exp = trustmap.get_method("shapley_sampling")(
        model, segments=labels, n_samples=2, seed=0
    ).explain(x)
    # An antithetic pair: M - 1 prefixes and their M - 1 complements, the empty coalition
    # and x; captum would forward 2 M + 1 rows besides x.
    assert exp.params["n_evaluations"] == 2 * (2 * 8 + 1 + 1)
    exp = trustmap.get_method("shapley_sampling")(model, segments=labels, seed=0).explain(x)
    assert exp.params["n_evaluations"] <= 2 * (32 * 8 + 1 + 1)


# -- LIME -----------------------------------------------------------------------------------------
def test_lime_recovers_linear_model():
    labels = block_labels((16, 16), 9)
    model = SegmentModel(labels)
    x = smooth_input(2, 2)
    exp = trustmap.get_method("lime")(
        model, segments=labels, n_samples=300, baseline=0.0, alpha=0.0, seed=0
    ).explain(x, target=0)
    # v(z) = bias + sum_k w_k m_k z_k: the coefficient of segment k is w_k m_k exactly.
    expected = model.w.detach() * model.means(x)
    torch.testing.assert_close(weights_of(exp), expected, rtol=0, atol=1e-9)
    torch.testing.assert_close(
        torch.tensor(exp.params["intercept"], dtype=torch.float64),
        model.bias.detach().expand(2),
        rtol=0,
        atol=1e-9,
    )
    assert min(exp.params["r2"]) > 1 - 1e-12
    # With LIME's default ridge penalty the coefficients shrink a little.
    ridge = trustmap.get_method("lime")(
        model, segments=labels, n_samples=300, baseline=0.0, seed=0
    ).explain(x, target=0)
    corr = np.corrcoef(weights_of(ridge).reshape(-1), expected.reshape(-1))[0, 1]
    assert corr > 0.99


def test_lime_map_spreads_weights_and_includes_all_on_sample():
    labels = block_labels((16, 16), 4)
    model = SegmentModel(labels)
    x = smooth_input(2, 1)
    exp = trustmap.get_method("lime")(model, segments=labels, n_samples=1, baseline=0.0).explain(x)
    # One sample (the all-on coalition, x itself): nothing to fit, no model row evaluated.
    assert exp.params["n_evaluations"] == 1
    assert torch.equal(exp.attributions, torch.zeros_like(exp.attributions))
    exp = trustmap.get_method("lime")(model, segments=labels, n_samples=50, seed=0).explain(x)
    w = weights_of(exp)[0]
    torch.testing.assert_close(exp.attributions[0, 0], w[labels].to(exp.attributions.dtype))


@pytest.mark.parametrize(
    "selection", ["forward_selection", "highest_weights", "lasso_path", "auto"]
)
def test_lime_feature_selection_keeps_dominant_segments(selection):
    labels = block_labels((16, 16), 9)
    model = SegmentModel(labels)
    with torch.no_grad():
        model.w.mul_(0.01)
        model.w[2] = 5.0
        model.w[7] = -4.0
    x = smooth_input(2, 1)
    exp = trustmap.get_method("lime")(
        model,
        segments=labels,
        n_samples=200,
        baseline=0.0,
        feature_selection=selection,
        n_features=2,
        seed=0,
    ).explain(x, target=0)
    assert exp.params["selected"] == [[2, 7]]
    w = weights_of(exp)[0]
    assert (w[[0, 1, 3, 4, 5, 6, 8]] == 0).all() and w[2] > 0 > w[7]


def test_lime_surrogate_matches_lime_package():
    lime_base = pytest.importorskip("lime.lime_base")
    from sklearn.metrics import pairwise_distances

    rng = np.random.default_rng(0)
    m, n = 10, 120
    z = rng.integers(0, 2, (n, m))
    z[0] = 1
    y = z @ rng.normal(size=m) + 0.3 * rng.normal(size=n)
    distances = pairwise_distances(z, z[:1], metric="cosine").ravel()
    for selection, n_features in (
        ("none", m),
        ("highest_weights", 4),
        ("forward_selection", 3),
        ("lasso_path", 4),
    ):
        base = lime_base.LimeBase(lambda d: np.sqrt(np.exp(-(d**2) / 0.25**2)), random_state=0)
        ref = base.explain_instance_with_data(
            z, y[:, None], distances, 0, n_features, feature_selection=selection
        )
        coef, icpt, r2, _ = fit_surrogate(
            z,
            y,
            kernel_width=0.25,
            distance="cosine",
            feature_selection=selection,
            n_features=n_features,
            alpha=1.0,
        )
        ref_coef = np.zeros(m)
        for j, value in ref[1]:
            ref_coef[j] = value
        np.testing.assert_allclose(coef, ref_coef, rtol=1e-9, atol=1e-12)
        assert abs(icpt - ref[0]) < 1e-9
        assert abs(r2 - ref[2]) < 1e-9
