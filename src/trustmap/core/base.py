"""The explainer base class and the functional entry point :func:`explain`."""

from __future__ import annotations

import inspect
from typing import Any, ClassVar

import torch
from torch import nn

from trustmap.core.explanation import Explanation
from trustmap.core.hooks import model_guard
from trustmap.core.registry import get_method
from trustmap.core.targets import Target, TargetSpec, resolve_target
from trustmap.core.validation import (
    check_input,
    check_model_matches,
    check_output,
    model_mismatch,
)
from trustmap.errors import InputTypeError


class Explainer:
    """Base class of every explainer.

    Subclasses store their keyword-only parameters in ``__init__`` and implement
    :meth:`attribute`. ``__init__`` neither validates nor computes (scikit-learn's
    convention); :meth:`explain` does the work and keeps no per-call state on ``self``.
    """

    name: ClassVar[str] = ""
    family: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    output: ClassVar[str] = "input"
    model_dependent: ClassVar[bool] = True
    needs: ClassVar[str] = ""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    # -- public -----------------------------------------------------------------------
    def explain(self, x: torch.Tensor, target: TargetSpec = None) -> Explanation:
        """Explain ``model(x)`` for ``target``.

        Parameters
        ----------
        x:
            ``(B, C, H, W)`` or ``(B, C, D, H, W)``, float32 or float64, CPU or CUDA.
            Never modified.
        target:
            See :mod:`trustmap.core.targets`.
        """
        x = check_input(x)
        check_model_matches(self.model, x)
        try:
            with model_guard(self.model):
                attributions, output, resolved, extra = self._attribute_checked(x, target)
        except (RuntimeError, ValueError) as err:
            # A model built for other inputs fails deep inside torch; name the layer.
            mismatch = model_mismatch(self.model, x, err)
            if mismatch is None:
                raise
            raise mismatch from err
        params = self.get_params()
        params.update(extra)
        return Explanation(
            attributions=attributions.detach(),
            method=self.name,
            params=params,
            target=resolved.describe(),
            output=output.detach(),
        )

    def get_params(self) -> dict[str, Any]:
        """The constructor parameters, as stored."""
        sig = inspect.signature(type(self).__init__)
        params: dict[str, Any] = {}
        for name, p in sig.parameters.items():
            if name in ("self", "model") or p.kind is p.VAR_POSITIONAL:
                continue
            if p.kind is p.VAR_KEYWORD:
                params.update(getattr(self, name, {}) or {})
                continue
            params[name] = getattr(self, name, p.default)
        return params

    # -- for subclasses -----------------------------------------------------------------
    def attribute(
        self, x: torch.Tensor, target: TargetSpec | Target
    ) -> tuple[torch.Tensor, torch.Tensor | None, Target, dict[str, Any]]:
        """Compute attributions for a validated ``x`` inside :func:`model_guard`.

        Returns ``(attributions, output_on_x, resolved_target, extra_params)``. ``target``
        may already be a resolved :class:`Target` (wrappers such as SmoothGrad resolve it
        once on the clean input); then ``output_on_x`` may be ``None``.
        """
        raise NotImplementedError

    def output_kind(self) -> str:
        """``"input"`` or ``"single"``; wrappers report their base method's kind."""
        return self.output

    # -- helpers ----------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run the model and check that it returned one finite row per sample."""
        return check_output(self.model(x), x.shape[0])

    def output_and_target(
        self, x: torch.Tensor, target: TargetSpec | Target
    ) -> tuple[torch.Tensor | None, Target]:
        """Output on ``x`` without gradients (only if the target still needs resolving)."""
        if isinstance(target, Target):
            return None, target
        with torch.no_grad():
            output = self.forward(x)
        return output, resolve_target(target, output)

    def _attribute_checked(
        self, x: torch.Tensor, target: TargetSpec
    ) -> tuple[torch.Tensor, torch.Tensor, Target, dict[str, Any]]:
        attributions, output, resolved, extra = self.attribute(x, target)
        if output is None:
            with torch.no_grad():
                output = self.forward(x)
        b, c, *spatial = x.shape
        expected = (b, c, *spatial) if self.output_kind() == "input" else (b, 1, *spatial)
        if tuple(attributions.shape) != expected:
            raise RuntimeError(
                f"{self.name} produced shape {tuple(attributions.shape)}, expected {expected}"
            )
        if not bool(torch.isfinite(attributions).all()):
            raise ValueError(
                f"{self.name} produced NaN or Inf attributions; the model's gradients are not "
                "finite for this input"
            )
        return attributions, output, resolved, extra


def explain(
    model: nn.Module,
    x: torch.Tensor,
    method: str,
    target: TargetSpec = None,
    **params: Any,
) -> torch.Tensor:
    """Attributions of ``model`` at ``x`` by the registered ``method``.

    Input-space methods return ``x``'s shape ``(B, C, *spatial)``; CAM methods return
    ``(B, 1, *spatial)``, upsampled to ``x``'s spatial size. ``params`` are the method's
    keyword parameters (see ``trustmap methods``).

    Example
    -------
    >>> attr = trustmap.explain(model, x, "integrated_gradients", n_steps=25)
    """
    cls = get_method(method)
    explainer = build(cls, model, params)
    return explainer.explain(x, target=target).attributions


def build(cls: type[Explainer], model: nn.Module, params: dict[str, Any]) -> Explainer:
    """Instantiate ``cls`` with ``params``, turning unknown names into a clear error."""
    sig = inspect.signature(cls.__init__)
    accepts_any = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
    known = [n for n in sig.parameters if n not in ("self", "model")]
    if not accepts_any:
        unknown = sorted(set(params) - set(known))
        if unknown:
            raise InputTypeError(
                f"{cls.name} does not take parameter(s) {unknown}; it takes {sorted(known)}"
            )
    return cls(model, **params)
