"""DeepSHAP (Lundberg and Lee 2017): DeepLIFT averaged over a background distribution."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from trustmap.core.base import Explainer
from trustmap.core.batching import chunks
from trustmap.core.registry import register
from trustmap.core.seeding import generator, resolve_seed
from trustmap.core.targets import Target, TargetSpec
from trustmap.core.validation import choice, positive_int
from trustmap.methods.relevance._deeplift_rules import (
    MAXPOOL_RULES,
    RULES,
    rescale_backward,
    rescale_forward,
    rescale_reference,
    reveal_cancel_gradients,
)
from trustmap.methods.relevance._tracing import module_stack


def draw_background(x: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """``n`` samples of uniform noise between each channel's minimum and maximum over
    the batch ``x``, shape ``(n, C, *spatial)``; the same for every sample of the batch."""
    _b, c, *spatial = x.shape
    dims = [0, *range(2, x.ndim)]
    lo = x.amin(dim=dims).view(1, c, *([1] * len(spatial)))
    hi = x.amax(dim=dims).view(1, c, *([1] * len(spatial)))
    gen = generator(seed, x.device)
    u = torch.rand((n, c, *spatial), generator=gen, device=x.device, dtype=x.dtype)
    return lo + u * (hi - lo)


def make_background(
    x: torch.Tensor, background: int | torch.Tensor, seed: int | None
) -> tuple[torch.Tensor, dict[str, Any]]:
    """The background samples ``(N, C, *spatial)`` and the extra parameters to report
    (the seed, when the samples were drawn)."""
    _b, c, *spatial = x.shape
    if isinstance(background, torch.Tensor):
        if not background.is_floating_point():
            raise TypeError(f"background must be a floating tensor, got {background.dtype}")
        bg = background.to(x.device, x.dtype)
        if tuple(bg.shape) == (c, *spatial):
            bg = bg.unsqueeze(0)
        if bg.ndim != x.ndim or tuple(bg.shape[1:]) != (c, *spatial):
            raise ValueError(
                f"background has shape {tuple(background.shape)}; expected (N, {c}, "
                f"{', '.join(map(str, spatial))}) to match x's {tuple(x.shape)}"
            )
        if bg.shape[0] == 0:
            raise ValueError("background is empty")
        if not bool(torch.isfinite(bg).all()):
            raise ValueError("background contains NaN or Inf")
        return bg.detach(), {}
    if isinstance(background, bool) or not isinstance(background, int):
        raise TypeError(
            "background must be a tensor (N, C, *spatial) of reference samples or an int "
            f"number of samples to draw, got {type(background).__name__}"
        )
    n = positive_int("background", background)
    used = resolve_seed(seed)
    return draw_background(x, n, used), {"seed": used}


@register(
    "deep_shap",
    family="relevance",
    summary="DeepLIFT averaged over background samples used as baselines (SHAP values)",
    paper="Lundberg, Lee 2017, A unified approach to interpreting model predictions",
)
class DeepShap(Explainer):
    """DeepSHAP: ``A = 1/N sum_j (x - r_j) * m(x, r_j)``, DeepLIFT with each background
    sample ``r_j`` as the baseline, averaged.

    Additivity: ``sum A = S(x) - 1/N sum_j S(r_j)``, exactly up to rounding (as
    DeepLIFT's summation-to-delta), with ``S`` the target score.

    The rescale rule runs one forward pass on ``x`` with gradients, forward passes
    without gradients over the background in batches of ``batch_size``, and one backward
    pass per background sample over the retained graph, so it costs no more than one
    input-gradient pass per background sample. Reveal-cancel runs one paired pass per
    background sample.

    Parameters
    ----------
    background:
        Reference samples, a tensor ``(N, C, *spatial)`` (or one ``(C, *spatial)``), ideally
        drawn from the training data; or an int ``n``: ``n`` samples of uniform noise
        between each channel's minimum and maximum over the batch (seeded).
    rule, maxpool:
        As in ``deeplift``.
    batch_size:
        Background samples per reference forward pass (their activations are held until
        their backward passes are done); ``None``: all of them.
    seed:
        For a drawn background.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        background: int | torch.Tensor = 10,
        rule: str = "rescale",
        maxpool: str = "rescale",
        batch_size: int | None = None,
        seed: int | None = None,
    ) -> None:
        self.model = model
        self.background = background
        self.rule = rule
        self.maxpool = maxpool
        self.batch_size = batch_size
        self.seed = seed

    def attribute(
        self, x: torch.Tensor, target: TargetSpec | Target
    ) -> tuple[torch.Tensor, torch.Tensor, Target, dict[str, Any]]:
        rule = choice("rule", self.rule, RULES)
        maxpool = choice("maxpool", self.maxpool, MAXPOOL_RULES)
        if self.batch_size is not None:
            positive_int("batch_size", self.batch_size)
        background, extra = make_background(x, self.background, self.seed)
        n = background.shape[0]
        total = torch.zeros_like(x)
        if rule == "reveal_cancel":
            output, resolved = None, target
            for j in range(n):
                ref = background[j : j + 1]
                grad, output, resolved = reveal_cancel_gradients(
                    self.model, self.name, x, ref, resolved, maxpool
                )
                total += (x - ref) * grad
            return total / n, output, resolved, extra
        with module_stack(self.model) as modules:
            p = rescale_forward(self.model, self.name, x, target, maxpool, modules)
            for sl in chunks(n, self.batch_size):
                refs = background[sl]
                rescale_reference(p, self.model, refs)
                for j in range(refs.shape[0]):
                    grad = rescale_backward(p, j, retain=sl.stop < n or j < refs.shape[0] - 1)
                    total += (x - refs[j : j + 1]) * grad
        return total / n, p.output.detach(), p.target, extra
