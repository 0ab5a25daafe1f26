"""Explicit randomness: every stochastic method draws from a generator built here."""

from __future__ import annotations

import os

import torch


def resolve_seed(seed: int | None) -> int:
    """``seed`` itself, or a fresh one from the OS (recorded by the caller so the run can
    be repeated). Never touches torch's or numpy's global generators."""
    if seed is None:
        return int.from_bytes(os.urandom(8), "little") >> 1
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer or None, got {seed!r}")
    return seed


def generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator on ``device`` seeded with ``seed``."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen
