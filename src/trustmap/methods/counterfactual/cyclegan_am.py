"""Cycle-consistent activation maximization (Katzmann et al. 2021, Katzmann et al. 2021)."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trustmap.core.base import Explainer
from trustmap.core.registry import register
from trustmap.core.targets import Target, TargetSpec, resolve_target
from trustmap.counterfactual.networks import (
    GENERATORS_FILE,
    CounterfactualGenerators,
    load_generators,
)
from trustmap.methods._auxiliary import run_auxiliary

GeneratorFn = Callable[[torch.Tensor], torch.Tensor]


@register(
    "cyclegan_am",
    family="counterfactual",
    summary="R = G+(x) - G-(x) of two generators trained to flip the classifier",
    paper=(
        "Katzmann et al. 2021, Explaining clinical decision support systems in medical "
        "imaging using cycle-consistent activation maximization"
    ),
    output="input",
    model_dependent=False,
    needs="generators",
)
class CycleGANAM(Explainer):
    """Counterfactual relevance ``R = G+(x) - G-(x)`` (Katzmann et al. 2021, equation 6).

    ``G+`` and ``G-`` were trained (:func:`trustmap.counterfactual.train_counterfactual`)
    to make the smallest realistic change that drives the classifier towards the
    positive (``G+``) or the negative class (``G-``). ``R`` is signed and has ``x``'s
    shape: positive (red) where ``G+`` makes the image brighter than ``G-`` does,
    negative (blue) where ``G-`` does. It does not depend on ``target``: the target is
    resolved as for every method, and the target's score on ``x``, ``G+(x)`` and
    ``G-(x)`` is reported in the explanation's params (``score_original``,
    ``score_plus``, ``score_minus``), which shows whether the counterfactuals move the
    decision.

    Parameters
    ----------
    generators
        Where the generators come from:

        * a training directory (or its ``generators.pt``) written by
          ``trustmap counterfactual train``; loaded on ``x``'s device in ``x``'s dtype;
        * a :class:`~trustmap.counterfactual.networks.CounterfactualGenerators`;
        * a pair ``(G+, G-)`` of modules or callables mapping ``(B, C, *spatial)`` to the
          same shape. A module runs on its own device and dtype (``x`` is converted there
          and the result back).

        The first two record what they were trained for, and a mismatch is a ValueError:
        a classifier output that is not binary (two logits or one) or not the width they
        were trained against, or an input of another spatial size or channel count. A
        bare pair carries no such record: only the shape of its outputs is checked.

    Raises
    ------
    FileNotFoundError
        If the directory or its ``generators.pt`` does not exist.
    """

    def __init__(self, model: nn.Module, *, generators: Any = None) -> None:
        self.model = model
        self.generators = generators

    def attribute(
        self, x: torch.Tensor, target: TargetSpec | Target
    ) -> tuple[torch.Tensor, torch.Tensor, Target, dict[str, Any]]:
        g_plus, g_minus, trained = _resolve(self.generators, x)
        with torch.no_grad():
            output = self.forward(x)
        if trained is not None:
            _check_trained_for(trained, x, output)
        resolved = resolve_target(target, output)
        plus = _run(g_plus, x, "G+")
        minus = _run(g_minus, x, "G-")
        with torch.no_grad():
            scores = {
                "score_original": resolved.scores(output),
                "score_plus": resolved.scores(self.forward(plus)),
                "score_minus": resolved.scores(self.forward(minus)),
            }
        extra = {k: [float(v) for v in s.detach().cpu()] for k, s in scores.items()}
        return plus - minus, output, resolved, extra


def _resolve(
    generators: Any, x: torch.Tensor
) -> tuple[GeneratorFn, GeneratorFn, CounterfactualGenerators | None]:
    if generators is None:
        raise ValueError(
            "cyclegan_am needs trained generators: pass generators=DIR, the directory written "
            "by `trustmap counterfactual train`"
        )
    if isinstance(generators, (str, os.PathLike)):
        path = Path(generators).expanduser()
        file = path / GENERATORS_FILE if path.is_dir() else path
        if not file.is_file():
            # load_generators words the error (missing directory, unfinished run, ...).
            load_generators(path)
        stat = file.stat()
        trained = _load_cached(str(file.resolve()), stat.st_mtime_ns, str(x.device), x.dtype)
        return trained.plus, trained.minus, trained
    if isinstance(generators, CounterfactualGenerators):
        return generators.plus, generators.minus, generators
    if (
        isinstance(generators, (tuple, list))
        and len(generators) == 2
        and all(callable(g) for g in generators)
    ):
        return generators[0], generators[1], None
    raise TypeError(
        "generators must be a training directory, a generators.pt file, "
        "CounterfactualGenerators or a pair (G+, G-) of modules or callables; got "
        f"{type(generators).__name__}"
    )


@functools.lru_cache(maxsize=4)
def _load_cached(
    file: str, mtime_ns: int, device: str, dtype: torch.dtype
) -> CounterfactualGenerators:
    # Keyed on the modification time, so a retrained file is read again; explaining batch
    # after batch of a data set reads it once.
    del mtime_ns
    return load_generators(file, map_location=device, dtype=dtype)


def _check_trained_for(
    trained: CounterfactualGenerators, x: torch.Tensor, output: torch.Tensor
) -> None:
    b, c, *spatial = x.shape
    if (
        len(spatial) != trained.spatial_dims
        or c != trained.in_channels
        or (tuple(spatial) != tuple(trained.image_size))
    ):
        raise ValueError(
            f"the generators were trained for {trained.describe()}; x has shape "
            f"{tuple(x.shape)}. Resize x to {tuple(trained.image_size)} or train generators "
            "for this input"
        )
    width = output.reshape(b, -1).shape[1] if output.ndim > 1 else 1
    if output.ndim > 2 or width not in (1, 2):
        raise ValueError(
            "cyclegan_am explains a binary classifier (two logits, or one for the positive "
            f"class); this model returns {tuple(output.shape)}"
        )
    if width != trained.classifier_outputs:
        raise ValueError(
            f"the generators were trained against a classifier with "
            f"{trained.classifier_outputs} output(s); this model has {width}"
        )


def _run(g: GeneratorFn, x: torch.Tensor, name: str) -> torch.Tensor:
    return run_auxiliary(g, x, name, trained_for="the generators were trained")
