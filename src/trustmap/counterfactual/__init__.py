"""Counterfactual explanations by cycle-consistent activation maximization (Katzmann et al. 2021).

Katzmann et al. 2021 train two generators on a classifier's own image domain: ``G+``
makes the smallest realistic change that pushes the classifier towards the positive
class, ``G-`` towards the negative one; ``R = G+(x) - G-(x)`` shows the decision-relevant
regions as realistic edits (red: evidence ``G+`` adds, blue: what ``G-`` adds).

>>> from trustmap.counterfactual import CycleConfig, train_counterfactual
>>> result = train_counterfactual("clf/model.pt", "ct-nodule", out="cf")  # doctest: +SKIP
>>> trustmap.explain(model, x, "cyclegan_am", generators="cf")  # doctest: +SKIP
"""

from trustmap.counterfactual.evaluate import CounterfactualEvaluation, evaluate_counterfactual
from trustmap.counterfactual.networks import (
    CounterfactualGenerators,
    PairDiscriminator,
    UNetGenerator,
    load_generators,
    save_generators,
)
from trustmap.counterfactual.training import (
    CycleConfig,
    CycleEvent,
    CycleResult,
    train_counterfactual,
)

__all__ = [
    "CounterfactualEvaluation",
    "CounterfactualGenerators",
    "CycleConfig",
    "CycleEvent",
    "CycleResult",
    "PairDiscriminator",
    "UNetGenerator",
    "evaluate_counterfactual",
    "load_generators",
    "save_generators",
    "train_counterfactual",
]
