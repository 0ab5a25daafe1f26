"""LRP against captum's LRP in float64 on small CNNs, where the two define the same rules.

captum's rules assume non-negative layer inputs and keep the bias unmodified (gamma) or
ignore nothing (z+ keeps the bias in its denominator), and it has no canonizers and no
Conv1d/Conv3d rule. The networks here are therefore 2D, take images in [0, 1], have no
BatchNorm and no residual additions, and are bias-free where a rule treats biases
differently. They use average pooling: captum also stabilises max pooling
(``a R / (a + 1e-9)`` for the winner), where trustmap passes the relevance unchanged.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from captum.attr import LRP
from captum.attr._utils.lrp_rules import Alpha1_Beta0_Rule, EpsilonRule, GammaRule
from torch import nn

import trustmap
from trustmap.methods.relevance import _rules as rules


class Net(nn.Module):
    def __init__(self, bias: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1, bias=bias)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.AvgPool2d(2)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1, bias=bias)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(24, 3, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        return self.fc(x.flatten(1))


def setup(bias: bool, seed: int = 0):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Net(bias).double().eval()
    x = torch.rand((3, 2, 8, 8), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return model, x, torch.tensor([0, 2, 1])


def captum_lrp(model: nn.Module, x: torch.Tensor, target: torch.Tensor, conv_rule) -> torch.Tensor:
    for conv in (model.conv1, model.conv2):
        conv.rule = conv_rule()
    model.fc.rule = EpsilonRule(1e-9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return LRP(model).attribute(x.clone(), target=target)


CASES = {
    "epsilon": (lambda: EpsilonRule(1e-9), rules.epsilon(1e-9), True),
    "gamma": (lambda: GammaRule(0.25), rules.gamma(0.25), False),
    "zplus": (lambda: Alpha1_Beta0_Rule(), rules.zplus(), False),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("seed", [0, 1])
def test_lrp_matches_captum(case, seed):
    captum_rule, ours, bias = CASES[case]
    model, x, target = setup(bias, seed)
    ref = captum_lrp(model, x, target, captum_rule)
    eps = rules.epsilon(1e-9)
    composite = {nn.Conv2d: ours, nn.Linear: eps, nn.AvgPool2d: eps, nn.AdaptiveAvgPool2d: eps}
    got = trustmap.explain(model, x, "lrp", target=target, composite=composite, epsilon=1e-9)
    scale = ref.abs().max()
    assert (got - ref).abs().max() <= 1e-9 * scale


def test_epsilon_composite_matches_captum_defaults():
    # captum's default rule for every supported layer is epsilon; so is our "epsilon".
    model, x, target = setup(bias=True, seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = LRP(model).attribute(x.clone(), target=target)
    got = trustmap.explain(model, x, "lrp", target=target, composite="epsilon", epsilon=1e-9)
    assert (got - ref).abs().max() <= 1e-9 * ref.abs().max()


def test_epsilon_plus_matches_captum_composite():
    model, x, target = setup(bias=False, seed=4)
    ref = captum_lrp(model, x, target, Alpha1_Beta0_Rule)
    got = trustmap.explain(model, x, "lrp", target=target, composite="epsilon_plus", epsilon=1e-9)
    assert (got - ref).abs().max() <= 1e-9 * ref.abs().max()


def test_relevance_differs_from_gradient_times_input():
    # A check that the comparison above is not trivially satisfied: with z+ in the
    # convolutions, LRP is not gradient x input.
    model, x, target = setup(bias=False, seed=5)
    lrp = trustmap.explain(model, x, "lrp", target=target, composite="epsilon_plus")
    xg = x.clone().requires_grad_()
    out = model(xg).gather(1, target[:, None]).sum()
    (grad,) = torch.autograd.grad(out, xg)
    assert not torch.allclose(lrp, grad * x, rtol=1e-3)
    assert F.cosine_similarity(lrp.flatten(), (grad * x).flatten(), dim=0) < 0.999
