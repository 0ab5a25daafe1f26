"""Perturbation methods and Ablation-CAM rerun a batch only for their own reasons (memory,
the channels-last layout, an expanded batch a skip connection cannot take), never to hide
an error of the user's model (issue 19, defect 13)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import trustmap
from tests.conftest import assert_no_hooks, make_input, make_tiny

METHODS = ["occlusion", "lime", "kernel_shap", "shapley_sampling", "ablation_cam"]
PARAMS = {
    "occlusion": {"window": 4, "stride": 4, "batch_size": 4},
    "lime": {"n_samples": 16, "segmentation": "grid", "n_segments": 4, "batch_size": 4},
    "kernel_shap": {"n_samples": 16, "segmentation": "grid", "n_segments": 4, "batch_size": 4},
    "shapley_sampling": {
        "n_samples": 2,
        "segmentation": "grid",
        "n_segments": 4,
        "batch_size": 4,
    },
    "ablation_cam": {},
}


class FailsOnce(nn.Module):
    """Raises its own RuntimeError once, at its ``fail_at``-th evaluation without
    gradients (a batch that the method would retry), as a flaky model would; succeeds
    afterwards."""

    def __init__(self, fail_at: int) -> None:
        super().__init__()
        self.net = make_tiny(2)
        self.fail_at = fail_at
        self.calls = 0
        self.failed = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            self.calls += 1
            if self.calls == self.fail_at and not self.failed:
                self.failed = True
                raise RuntimeError("boom: the model's own failure")
        return self.net(x)


@pytest.mark.parametrize("method", METHODS)
def test_an_error_of_the_model_is_not_retried(method):
    # No-grad evaluations before the first retried batch: the target's (with the first
    # perturbations), and for Ablation-CAM also the layer search and the layer pass.
    model = FailsOnce(fail_at=3 if method == "ablation_cam" else 2).eval()
    with pytest.raises(RuntimeError, match="boom"):
        trustmap.explain(model, make_input(2, 1), method, target=0, **PARAMS[method])
    assert_no_hooks(model)


class Viewing(nn.Module):
    """Flattens a feature map with .view, which channels-last strides do not allow."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.fc = nn.Linear(3 * 16 * 16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).view(x.shape[0], -1))


@pytest.mark.parametrize("method", ["occlusion", "lime"])
def test_a_model_that_rejects_the_layout_still_works(method):
    torch.manual_seed(0)
    model = Viewing().eval()
    x = make_input(2, 1, channels=2)
    attr = trustmap.explain(model, x, method, target=1, **PARAMS[method])
    assert attr.shape[2:] == x.shape[2:] and torch.isfinite(attr).all() and attr.abs().sum() > 0


def test_lime_refuses_a_design_that_cannot_fit_in_memory():
    # 10**9 coalitions of 4 segments: 100 GB of design and regression. Refused at once,
    # before any allocation, naming the parameter and the memory it needs.
    model = make_tiny(2).eval()
    with pytest.raises(ValueError, match=r"n_samples=1000000000 with 4 segments needs about"):
        trustmap.explain(
            model,
            make_input(2, 1),
            "lime",
            target=0,
            n_samples=10**9,
            segmentation="grid",
            n_segments=4,
            batch_size=8,
        )
