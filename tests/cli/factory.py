"""A model factory importable as ``tests.cli.factory:build`` for the CLI tests."""

from __future__ import annotations

import torch
from torch import nn

from tests.conftest import make_tiny


def build():
    return make_tiny(2, n_classes=3).eval()


def build3d():
    return make_tiny(3, n_classes=3).eval()


def not_a_model():
    return "nope"


class _Pair(nn.Module):
    """Returns (logits, features), as some research code does."""

    def __init__(self) -> None:
        super().__init__()
        self.net = make_tiny(2, n_classes=2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.net(x)
        return logits, logits.detach()


def pair():
    return _Pair().eval()


def broken():
    raise RuntimeError("the weights server is unreachable")


def two_classes():
    return make_tiny(2, n_classes=2).eval()


def three_channels():
    return make_tiny(2, in_channels=3, n_classes=2).eval()


class _Crashing(nn.Module):
    """A model whose forward hits a bug of its own (not a shape mismatch)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = make_tiny(2, n_classes=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise KeyError("feature_cache")


def crashing():
    return _Crashing().eval()
