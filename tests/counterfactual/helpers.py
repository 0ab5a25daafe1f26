"""Tiny generators, classifiers and data for the counterfactual tests."""

from __future__ import annotations

import functools

import torch
from torch import nn

from trustmap.counterfactual import CycleConfig, UNetGenerator
from trustmap.models import create


def tiny_config(**overrides) -> CycleConfig:
    """A few steps on 32 x 32 images with widths of 2: checks mechanics, not convergence."""
    base = {
        "steps": 4,
        "batch_size": 4,
        "width": 2,
        "disc_width": 2,
        "checkpoint_every": 2,
        "preview_every": 2,
        "n_preview": 2,
    }
    base.update(overrides)
    return CycleConfig(**base)


def tiny_classifier(num_classes: int = 2, seed: int = 0, dims: int = 2) -> nn.Module:
    return create("small_cnn", dims, 1, num_classes, seed=seed, width=2).eval()


def random_generator(dims: int, channels: int, seed: int) -> UNetGenerator:
    """An untrained generator whose output is not the identity (random last layer)."""
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    net = UNetGenerator(dims, channels, width=2, residual=False)
    torch.random.set_rng_state(state)
    return net


class ByShape(nn.Module):
    """One generator per (spatial dimensionality, channel count), picked by the input's
    shape; lets a single parameter set serve all inputs of the registry contract."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        self.nets = nn.ModuleDict(
            {f"{d}d{c}c": random_generator(d, c, seed + 10 * d + c) for d in (2, 3) for c in (1, 2)}
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.nets[f"{x.ndim - 2}d{x.shape[1]}c"](x)


@functools.cache
def contract_generators() -> tuple[ByShape, ByShape]:
    """Tiny untrained (G+, G-) for tests/conftest.py's inputs (1 or 2 channels, 2D, 3D)."""
    return ByShape(seed=100), ByShape(seed=200)
