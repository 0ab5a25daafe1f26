"""Shared test models and checks."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

# `make test` runs two xdist workers on the two cores; each gets one thread so the workers
# do not oversubscribe the CPU. A plain `pytest` run uses both cores in one process.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)


class TinyCNN(nn.Module):
    """A small CNN with the traps real medical networks have: BatchNorm, an in-place ReLU
    module reused twice, ``F.relu`` inside ``forward``, and a global-average-pooling +
    linear head (so CAM applies)."""

    def __init__(self, dims: int = 2, in_channels: int = 1, n_classes: int = 3) -> None:
        super().__init__()
        conv = nn.Conv2d if dims == 2 else nn.Conv3d
        norm = nn.BatchNorm2d if dims == 2 else nn.BatchNorm3d
        pool = nn.AdaptiveAvgPool2d if dims == 2 else nn.AdaptiveAvgPool3d
        self.conv1 = conv(in_channels, 4, 3, padding=1)
        self.bn1 = norm(4)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv(4, 6, 3, padding=1, stride=2)
        self.conv3 = conv(6, 8, 3, padding=1)
        self.pool = pool(1)
        self.fc = nn.Linear(8, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.conv2(x))
        x = F.relu(self.conv3(x))
        return self.fc(self.pool(x).flatten(1))


def make_tiny(dims: int, in_channels: int = 1, n_classes: int = 3, seed: int = 0) -> TinyCNN:
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    model = TinyCNN(dims, in_channels, n_classes)
    # Non-trivial BatchNorm statistics so that eval mode matters.
    with torch.no_grad():
        model.bn1.running_mean.uniform_(-0.2, 0.2)
        model.bn1.running_var.uniform_(0.5, 1.5)
    torch.random.set_rng_state(gen_state)
    return model


def make_input(dims: int, batch: int, channels: int = 1, seed: int = 0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    spatial = (16, 16) if dims == 2 else (8, 8, 8)
    return torch.randn((batch, channels, *spatial), generator=gen, dtype=dtype)


HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_pre_hooks_with_kwargs",
)


def hook_counts(model: nn.Module) -> dict[str, int]:
    counts: dict[str, int] = {}
    for name, module in model.named_modules():
        for attr in HOOK_DICTS:
            n = len(getattr(module, attr, {}) or {})
            if n:
                counts[f"{name}.{attr}"] = n
    return counts


def assert_no_hooks(model: nn.Module) -> None:
    counts = hook_counts(model)
    assert counts == {}, f"hooks left on the model: {counts}"
    assert not torch.nn.modules.module._global_forward_hooks
    assert not torch.nn.modules.module._global_backward_hooks
    assert not torch.nn.modules.module._global_forward_pre_hooks


@pytest.fixture
def tiny2d() -> TinyCNN:
    return make_tiny(2)


@pytest.fixture
def tiny3d() -> TinyCNN:
    return make_tiny(3)
