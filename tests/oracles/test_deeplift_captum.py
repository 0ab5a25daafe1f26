"""DeepLIFT, DeepSHAP and GradientSHAP against captum in float64 on small networks.

captum's DeepLift implements the rescale rule for ``nn.Module`` nonlinearities that are
not reused, so the networks here use one module per activation; ours must agree with
it although it intercepts every ReLU form. captum's max-pool rule is left out: the
installed captum back-propagates max pooling by the plain gradient, which breaks
summation-to-delta (our ``maxpool="rescale"`` keeps it; see test_deeplift.py).
"""

from __future__ import annotations

import pytest
import torch
from captum.attr import DeepLift, DeepLiftShap, GradientShap
from torch import nn

import trustmap

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-9) -> None:
    scale = b.abs().max().clamp(min=1e-30)
    assert (a - b).abs().max() <= rtol * scale, f"max diff {(a - b).abs().max()} vs {scale}"


class Block(nn.Module):
    """Conv-BN-activation with a residual addition and a concatenation, one module per
    activation (what captum needs)."""

    def __init__(self, dims: int, act: type[nn.Module]):
        super().__init__()
        conv = nn.Conv2d if dims == 2 else nn.Conv3d
        norm = nn.BatchNorm2d if dims == 2 else nn.BatchNorm3d
        gap = nn.AdaptiveAvgPool2d if dims == 2 else nn.AdaptiveAvgPool3d
        self.conv1, self.bn1, self.act1 = conv(2, 4, 3, padding=1), norm(4), act()
        self.conv2, self.bn2, self.act2 = conv(4, 4, 3, padding=1), norm(4), act()
        self.conv3, self.act3 = conv(8, 3, 1), act()
        self.gap, self.fc = gap(2), nn.Linear(3 * 2**dims, 3)
        with torch.no_grad():
            for bn in (self.bn1, self.bn2):
                bn.running_mean.uniform_(-0.3, 0.3)
                bn.running_var.uniform_(0.5, 1.5)
                bn.weight.uniform_(-1.0, 1.0)

    def forward(self, x):
        h = self.act1(self.bn1(self.conv1(x)))
        h = self.act2(self.bn2(self.conv2(h)) + h)
        h = self.act3(self.conv3(torch.cat([h, h * 0.5], dim=1)))
        return self.fc(self.gap(h).flatten(1))


@pytest.fixture(params=[(2, nn.ReLU), (3, nn.ReLU), (2, nn.Sigmoid), (2, nn.Tanh), (2, nn.ELU)],
                ids=["relu-2d", "relu-3d", "sigmoid", "tanh", "elu"])  # fmt: skip
def setup(request):
    dims, act = request.param
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = Block(dims, act).double().eval()
    gen = torch.Generator().manual_seed(1)
    spatial = (6, 6) if dims == 2 else (4, 4, 4)
    x = torch.randn((3, 2, *spatial), generator=gen, dtype=torch.float64)
    background = 0.5 * torch.randn((4, 2, *spatial), generator=gen, dtype=torch.float64)
    return model, x, background, torch.tensor([0, 2, 1])


def test_deeplift_matches_captum(setup):
    model, x, background, target = setup
    baseline = background[:1].expand_as(x)
    ours = trustmap.explain(model, x, "deeplift", target=target, baseline=baseline)
    ref = DeepLift(model).attribute(x.clone(), baselines=baseline.clone(), target=target)
    close(ours, ref)


def test_deeplift_per_sample_baselines_match_captum(setup):
    model, x, background, target = setup
    baseline = background[:3]
    ours = trustmap.explain(model, x, "deeplift", target=target, baseline=baseline)
    ref = DeepLift(model).attribute(x.clone(), baselines=baseline.clone(), target=target)
    close(ours, ref)


def test_deep_shap_matches_captum(setup):
    model, x, background, target = setup
    ours = trustmap.explain(model, x, "deep_shap", target=target, background=background)
    ref = DeepLiftShap(model).attribute(x.clone(), baselines=background.clone(), target=target)
    close(ours, ref)


def test_gradient_shap_matches_captum_with_one_baseline_on_a_linear_model():
    # Both are exact here: a constant gradient times (x - r) whatever the draws.
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(2 * 36, 3)).double().eval()
    x = torch.randn(3, 2, 6, 6, dtype=torch.float64)
    baseline = torch.randn(1, 2, 6, 6, dtype=torch.float64)
    ours = trustmap.explain(model, x, "gradient_shap", target=1, background=baseline,
                            n_samples=5, seed=0)  # fmt: skip
    with torch.random.fork_rng():
        torch.manual_seed(0)
        ref = GradientShap(model).attribute(x.clone(), baselines=baseline, target=1, n_samples=5)
    close(ours, ref)


def test_gradient_shap_agrees_with_captum_in_expectation(setup):
    # Both estimate E[(x - r) * grad f(r + a (x - r))]; with many draws they agree within
    # their Monte Carlo error.
    model, x, background, target = setup
    ours = trustmap.explain(model, x, "gradient_shap", target=target, background=background,
                            n_samples=600, seed=0, batch_size=1800)  # fmt: skip
    with torch.random.fork_rng():
        torch.manual_seed(0)
        ref = GradientShap(model).attribute(
            x.clone(), baselines=background, target=target, n_samples=600
        )
    assert (ours - ref).abs().max() < 0.15 * ref.abs().max()
    assert torch.corrcoef(torch.stack([ours.flatten(), ref.flatten()]))[0, 1] > 0.98
