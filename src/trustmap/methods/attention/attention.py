"""Attention maps of trainable attention (Jetley et al. 2018; Huff et al. 2021, section 3.4)."""

from __future__ import annotations

import difflib
from typing import Any

import torch
from torch import nn

from trustmap.core.base import Explainer
from trustmap.core.batching import upsample_to
from trustmap.core.hooks import hook_handles
from trustmap.core.registry import register
from trustmap.core.targets import Target, TargetSpec, resolve_target
from trustmap.errors import InputError, ModelError

COMBINE = ("mean", "max")


@register(
    "attention",
    family="attention",
    summary="the attention maps of a model with trainable attention gates, upsampled",
    paper="Jetley et al. 2018, Learn to pay attention (Huff et al. 2021, section 3.4)",
    output="single",
    model_dependent=True,
    needs="attention",
)
class Attention(Explainer):
    """The attention maps a model computes for ``x``, as a saliency map ``(B, 1, *spatial)``.

    Built-in attention is an explanation that is part of the model: in ``attention_cnn``
    (:class:`~trustmap.models.attention.AttentionCNN`) the class score sees the local
    features only through ``g_a = sum_s a_s l_s``, with ``a_s = softmax_s(c_s)`` the
    attention over positions. The map is read during one forward pass (no gradients).

    Sources: every :class:`~trustmap.models.attention.AttentionGate` (map ``a_s`` times
    the number of positions, so that uniform attention is 1 at every resolution) and every
    ``AttentionBlock`` of MONAI's ``AttentionUnet`` (its gate ``psi`` in ``[0, 1]``). Each
    map is upsampled bilinearly (trilinearly in 3D) to ``x``'s size; several are combined
    by ``combine``. The map does not depend on ``target`` (attention is computed before
    the class scores); the target is resolved as for every method and its score is
    reported in ``params["score"]``, the sources in ``params["gates"]``.

    The map reads the model's weights (``model_dependent``), so the randomization test
    applies to it.

    Parameters
    ----------
    gates
        Qualified module names of the sources to use (e.g. ``["gates.block2"]``); None
        uses all of them.
    combine
        ``"mean"`` or ``"max"`` of the upsampled maps.

    Raises
    ------
    ValueError
        If the model has no attention (train ``attention_cnn`` or ``attention_unet``),
        or a name in ``gates`` is not an attention source (the closest names are given).
    """

    def __init__(
        self, model: nn.Module, *, gates: list[str] | None = None, combine: str = "mean"
    ) -> None:
        self.model = model
        self.gates = gates
        self.combine = combine

    def attribute(
        self, x: torch.Tensor, target: TargetSpec | Target
    ) -> tuple[torch.Tensor, torch.Tensor, Target, dict[str, Any]]:
        from trustmap.models.attention import AttentionGate, attention_sources

        if self.combine not in COMBINE:
            raise InputError(f"combine must be one of {COMBINE}, got {self.combine!r}")
        sources = _select(attention_sources(self.model), self.gates)
        maps: dict[str, torch.Tensor] = {}

        def record(name: str, positions: bool):
            def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
                a = output[1] if positions else output
                if positions:
                    # Softmax over N positions: scale so that uniform attention is 1.
                    a = a * a[0, 0].numel()
                maps[name] = a.detach()

            return hook

        with hook_handles() as handles, torch.no_grad():
            for name, module in sources.items():
                if isinstance(module, AttentionGate):
                    handles.append(module.register_forward_hook(record(name, True)))
                else:
                    handles.append(module.psi.register_forward_hook(record(name, False)))
            output = self.forward(x)
        resolved = resolve_target(target, output)
        score = resolved.scores(output)
        missing = [name for name in sources if name not in maps]
        if missing:
            raise InputError(
                f"attention source(s) {missing} did not run during the forward pass; pick "
                "sources on the path from the input to the output"
            )
        spatial = tuple(x.shape[2:])
        stack = torch.stack([upsample_to(maps[n].to(x.dtype), spatial) for n in sources])
        combined = stack.mean(0) if self.combine == "mean" else stack.amax(0)
        extra = {
            "gates": list(sources),
            "score": [float(v) for v in score.detach().cpu()],
        }
        return combined, output, resolved, extra


def _select(sources: dict[str, nn.Module], names: list[str] | None) -> dict[str, nn.Module]:
    if not sources:
        raise ModelError(
            "attention needs a model with trainable attention: this model has no attention "
            "gate. Train one with `trustmap train --arch attention_cnn` (classifier) or "
            "`--arch attention_unet` (localizer), or use a post-hoc method such as grad_cam"
        )
    if names is None:
        return sources
    if isinstance(names, str) or not all(isinstance(n, str) for n in names) or not names:
        raise InputError(f"gates must be a non-empty list of module names, got {names!r}")
    for name in names:
        if name not in sources:
            close = difflib.get_close_matches(name, list(sources), n=2, cutoff=0.4)
            hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            raise InputError(
                f"{name!r} is not an attention gate of this model{hint} (gates: "
                f"{', '.join(sources)})"
            )
    return {name: sources[name] for name in names}
