"""A model factory importable as ``tests.cli.factory:build`` for the CLI tests."""

from __future__ import annotations

from tests.conftest import make_tiny


def build():
    return make_tiny(2, n_classes=3).eval()


def build3d():
    return make_tiny(3, n_classes=3).eval()


def not_a_model():
    return "nope"
