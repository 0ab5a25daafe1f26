"""The result object every explainer returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class Explanation:
    """Attributions for one batch, with what produced them.

    Attributes
    ----------
    attributions:
        ``(B, C, *spatial)`` for input-space methods, ``(B, 1, *spatial)`` for CAM
        methods (already upsampled to the input's spatial size).
    method:
        Registered method name.
    params:
        The parameters used, including any seed that was drawn because none was given.
    target:
        The target that was explained: a ``(B,)`` LongTensor of classes for
        classification models (for single-logit models 1 = the logit, 0 = its
        negation), ``(class, region_mask)`` for segmentation models, or the callable.
    output:
        The model's output on the unperturbed input, detached.
    """

    attributions: torch.Tensor
    method: str
    params: dict[str, Any] = field(default_factory=dict)
    target: Any = None
    output: torch.Tensor | None = None

    @property
    def shape(self) -> torch.Size:
        return self.attributions.shape
