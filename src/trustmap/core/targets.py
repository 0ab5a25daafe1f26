"""Turning a user's ``target`` into the scalar score per sample that gets explained.

Accepted targets (see :func:`resolve_target`):

* ``None``: the predicted class of each sample;
* an ``int`` class, or a ``(B,)`` integer tensor of classes;
* for a single-logit binary model (output ``(B, 1)``): ``1`` explains the logit,
  ``0`` its negation;
* for a segmentation model (output ``(B, K, *spatial)``): ``(class, region_mask)``
  explains the sum of that class's logits over the region;
* a callable mapping the output ``(N, ...)`` to scores ``(N,)``. It is applied to every
  batch the method evaluates, so it must work row by row.

A target is resolved once, on the output for the unperturbed input, and then applied
unchanged to every perturbed, interpolated or noisy copy of that input.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from trustmap.errors import InputError, InputTypeError

TargetSpec = Any  # int | torch.Tensor | tuple | Callable | None | Target


@dataclass(frozen=True)
class Target:
    """A resolved target. ``scores(output, rows)`` gives one score per output row.

    ``rows`` maps each row of ``output`` to the index of the original sample it came
    from (methods evaluate several copies of each sample in one batch).
    """

    kind: str  # "class", "binary", "region", "callable"
    classes: torch.Tensor | None = None  # (B,) long, for "class" and "region"
    signs: torch.Tensor | None = None  # (B,) float, for "binary"
    region: torch.Tensor | None = None  # (B, *spatial) float, for "region"
    fn: Callable[[torch.Tensor], torch.Tensor] | None = None
    batch: int = 0

    def scores(self, output: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Score to explain, shape ``(N,)`` for an output of ``N`` rows."""
        n = output.shape[0]
        if rows is None:
            if self.kind != "callable" and n != self.batch:
                raise InputError(
                    f"output has {n} rows but the target was resolved for {self.batch}"
                )
            rows = torch.arange(n, device=output.device)
        if self.kind == "class":
            out = output.reshape(n, -1)
            return out.gather(1, self.classes.to(output.device)[rows].unsqueeze(1)).squeeze(1)
        if self.kind == "binary":
            return output.reshape(n) * self.signs.to(output.device, output.dtype)[rows]
        if self.kind == "region":
            cls = self.classes.to(output.device)[rows]
            idx = cls.view(n, 1, *([1] * (output.ndim - 2))).expand(n, 1, *output.shape[2:])
            chosen = output.gather(1, idx).squeeze(1)
            region = self.region.to(output.device, output.dtype)[rows]
            return (chosen * region).reshape(n, -1).sum(1)
        result = self.fn(output)
        if not isinstance(result, torch.Tensor) or result.shape != (n,):
            shape = tuple(result.shape) if isinstance(result, torch.Tensor) else type(result)
            raise InputError(
                f"a callable target must map the output to a tensor of shape ({n},), got {shape}"
            )
        return result

    def probabilities(self, output: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The target's probability where the model is a classifier, else its score.

        Softmax over classes for multi-class outputs, the sigmoid of the signed logit for
        single-logit models; region and callable targets return their raw score.
        Used by methods that weight by confidence (Score-CAM).
        """
        if self.kind == "class" and output.reshape(output.shape[0], -1).shape[1] > 1:
            probs = torch.softmax(output.reshape(output.shape[0], -1), dim=1)
            return Target(kind="class", classes=self.classes, batch=self.batch).scores(probs, rows)
        if self.kind == "binary":
            return torch.sigmoid(self.scores(output, rows))
        return self.scores(output, rows)

    def describe(self) -> Any:
        """What goes into :attr:`Explanation.target`."""
        if self.kind == "class":
            return self.classes
        if self.kind == "binary":
            return (self.signs > 0).long()
        if self.kind == "region":
            return (self.classes, self.region)
        return self.fn


def resolve_target(target: TargetSpec, output: torch.Tensor) -> Target:
    """Resolve ``target`` against the model's output on the unperturbed input.

    Raises
    ------
    ValueError, TypeError
        With a message that names what is wrong (range, shape, type).
    """
    if isinstance(target, Target):
        return target
    if not isinstance(output, torch.Tensor):
        raise InputTypeError(
            f"the model must return a tensor, got {type(output).__name__}; wrap it so that "
            "it returns the logits"
        )
    if output.ndim == 0:
        raise InputError("the model returned a scalar; expected one row per sample")
    b = output.shape[0]
    if output.ndim == 1:
        output = output.unsqueeze(1)
    if callable(target) and not isinstance(target, torch.Tensor):
        return Target(kind="callable", fn=target, batch=b)
    if output.ndim > 2:
        return _resolve_region(target, output)
    k = output.shape[1]
    if k == 1:
        return _resolve_binary(target, output)
    classes = _as_classes(target, b, output.device)
    if classes is None:
        classes = output.detach().argmax(dim=1)
    bad = (classes < 0) | (classes >= k)
    if bool(bad.any()):
        raise InputError(
            f"target {classes[bad].tolist()} is out of range for a model with {k} outputs "
            f"(valid classes: 0..{k - 1})"
        )
    return Target(kind="class", classes=classes, batch=b)


def _as_classes(target: TargetSpec, b: int, device: torch.device) -> torch.Tensor | None:
    if target is None:
        return None
    if isinstance(target, bool):
        raise InputTypeError("target must be an int class, not a bool")
    if isinstance(target, int):
        return torch.full((b,), target, dtype=torch.long, device=device)
    if isinstance(target, torch.Tensor):
        if target.is_floating_point() or target.is_complex():
            raise InputTypeError(f"target tensor must hold integer classes, got {target.dtype}")
        t = target.to(device=device, dtype=torch.long).reshape(-1)
        if t.numel() == 1:
            return t.expand(b).clone()
        if t.numel() != b:
            raise InputError(f"target has {t.numel()} entries but the batch has {b} samples")
        return t
    if isinstance(target, (list, tuple)) and all(isinstance(v, int) for v in target):
        return _as_classes(torch.tensor(target, dtype=torch.long), b, device)
    raise InputTypeError(
        f"unsupported target {type(target).__name__}: use None, an int, a (B,) integer "
        "tensor, (class, region_mask) for segmentation models, or a callable"
    )


def _resolve_binary(target: TargetSpec, output: torch.Tensor) -> Target:
    b = output.shape[0]
    classes = _as_classes(target, b, output.device)
    if classes is None:
        classes = (output.detach().reshape(b) > 0).long()
    if bool(((classes != 0) & (classes != 1)).any()):
        raise InputError(
            "the model has a single output logit: target must be 1 (explain the logit) "
            f"or 0 (explain its negation), got {classes.unique().tolist()}"
        )
    signs = classes.to(torch.float64) * 2 - 1
    return Target(kind="binary", signs=signs, classes=classes, batch=b)


def _resolve_region(target: TargetSpec, output: torch.Tensor) -> Target:
    b, k, *spatial = output.shape
    if target is None:
        raise InputError(
            f"the model's output {tuple(output.shape)} is a segmentation map: pass "
            "target=(class, region_mask) to explain a class over a region"
        )
    if isinstance(target, tuple) and len(target) == 2:
        cls_spec, mask = target
    else:
        cls_spec, mask = target, None
    classes = _as_classes(cls_spec, b, output.device)
    bad = (classes < 0) | (classes >= k)
    if bool(bad.any()):
        raise InputError(f"target class {classes[bad].tolist()} is out of range for {k} classes")
    if mask is None:
        region = torch.ones((b, *spatial), dtype=torch.float64, device=output.device)
    else:
        if not isinstance(mask, torch.Tensor):
            raise InputTypeError(f"region_mask must be a tensor, got {type(mask).__name__}")
        region = mask.to(output.device).to(torch.float64)
        if tuple(region.shape) == tuple(spatial):
            region = region.expand(b, *spatial)
        elif tuple(region.shape) != (b, *spatial):
            raise InputError(
                f"region_mask has shape {tuple(mask.shape)}; expected {tuple(spatial)} or "
                f"{(b, *spatial)} to match the segmentation output"
            )
        if not bool(torch.isfinite(region).all()):
            raise InputError("region_mask contains NaN or Inf")
        empty = region.reshape(b, -1).abs().sum(1) == 0
        if bool(empty.any()):
            samples = empty.nonzero().flatten().tolist()
            raise InputError(f"region_mask is empty for samples {samples}")
    return Target(kind="region", classes=classes, region=region.contiguous(), batch=b)


def take(target: Target, rows: torch.Tensor) -> Target:
    """The target for a batch whose row ``i`` is a copy of original sample ``rows[i]``."""
    if target.kind == "callable":
        return Target(kind="callable", fn=target.fn, batch=int(rows.numel()))

    def pick(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t[rows.to(t.device)]

    return Target(
        kind=target.kind,
        classes=pick(target.classes),
        signs=pick(target.signs),
        region=pick(target.region),
        fn=target.fn,
        batch=int(rows.numel()),
    )
