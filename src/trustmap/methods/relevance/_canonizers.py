"""Canonizers: rewrite a network into an equivalent one on which LRP rules are meaningful.

LRP rules are defined for layers ``z = W a + b``. Real medical networks also contain
BatchNorm, residual additions and concatenations; canonization (Montavon et al. 2019;
Motzkus et al. 2022, "Measurably stronger explanation reliability via model
canonization") makes them fit:

* **BatchNorm folding.** In eval mode BatchNorm is the affine map ``y = s x + t`` per
  channel, ``s = gamma / sqrt(var + eps)``, ``t = beta - mean * s`` (eps included, never
  assumed 0). A BatchNorm that directly follows a convolution or dense layer is merged
  into it (``W' = s W``, ``b' = s b + t``); one that directly precedes it is merged into
  it as well (``W' = W diag(s)``, with the shift's contribution as the bias, which is a
  map, not a vector, where the convolution zero-pads). The rule of the layer then sees the
  merged weights. A BatchNorm separated from every linear layer by a nonlinearity
  (DenseNet's BN -> ReLU -> conv) cannot be merged exactly; it stays an affine layer whose
  shift absorbs relevance like a bias (LRP-0).
* **Residual additions** ``z = a + b`` split relevance in proportion to the contributions,
  ``R_a = a / (z + eps sign z) R_z``.
* **Concatenations** pass each part's relevance back to that part.

trustmap applies these *virtually*: the forward pass computes exactly what the original
model computes (nothing is written into the model), and the merged weights are built
inside the backward pass of the LRP engine. The model is therefore bit-identical
afterwards by construction; the folding arithmetic lives here and is tested against the
original layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trustmap.methods.relevance._rules import stabilize


@dataclass(frozen=True)
class BatchNormAffine:
    """Eval-mode BatchNorm as ``y = scale * x + shift`` per channel (dimension 1)."""

    scale: torch.Tensor  # (C,)
    shift: torch.Tensor  # (C,)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.ndim - 2)
        return x * self.scale.view(shape) + self.shift.view(shape)


def batchnorm_affine(
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
) -> BatchNormAffine:
    """The affine map of an eval-mode BatchNorm, with its ``eps``."""
    scale = torch.rsqrt(running_var.detach() + eps)
    if weight is not None:
        scale = scale * weight.detach()
    shift = -running_mean.detach() * scale
    if bias is not None:
        shift = shift + bias.detach()
    return BatchNormAffine(scale, shift)


def _channel_view(v: torch.Tensor, ndim: int) -> torch.Tensor:
    return v.view((-1,) + (1,) * (ndim - 1))


def fold_after(
    weight: torch.Tensor, bias: torch.Tensor | None, bn: BatchNormAffine
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge a BatchNorm that follows a convolution or dense layer into it.

    ``bn(W a + b) = (s W) a + (s b + t)``; ``weight`` is ``(C_out, ...)``.
    """
    w = weight * _channel_view(bn.scale.to(weight.dtype), weight.ndim)
    b = bn.shift.to(weight.dtype)
    if bias is not None:
        b = b + bias * bn.scale.to(weight.dtype)
    return w, b


def fold_before(weight: torch.Tensor, bn: BatchNormAffine, groups: int = 1) -> torch.Tensor:
    """The weight of a convolution or dense layer with a preceding BatchNorm merged in.

    ``W (s x + t) = (W diag s) x + W t``: the weight scales along its input channels
    (``weight`` is ``(C_out, C_in / groups, *kernel)``). The shift's contribution
    ``W t`` is returned by :func:`shift_contribution` because zero padding makes it vary
    over space.
    """
    c_out, c_in_g, *kernel = weight.shape
    scale = bn.scale.to(weight.dtype).view(groups, 1, c_in_g, *([1] * len(kernel)))
    w = weight.reshape(groups, c_out // groups, c_in_g, *kernel) * scale
    return w.reshape(weight.shape)


def shift_contribution(output: torch.Tensor, linear_part: torch.Tensor) -> torch.Tensor:
    """The bias map of a merged layer: its output minus its weight term ``W' x``.

    Exact for any padding, since ``output = W' x + bias_map`` by construction; it includes
    the layer's own bias.
    """
    return output - linear_part


def proportional_split(z: torch.Tensor, eps: float) -> torch.Tensor:
    """Gradient factor that turns the gradient of a sum into the epsilon-stabilised
    proportional split ``R_i = x_i / (z + eps sign z) R_z`` in the x * gradient form."""
    return z / stabilize(z, eps)
