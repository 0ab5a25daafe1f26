"""The trust protocol of Arun et al. 2021 (Arun et al., Radiology: AI 2021) and its pieces.

>>> from trustmap.trust import TrustConfig, run
>>> result = run(TrustConfig.from_preset("quick", out="trust_quick"))  # doctest: +SKIP

The pieces work alone on your own tensors: :func:`average_mask`,
:func:`cascading_randomization`, :func:`independent_randomization`,
:func:`randomization_baseline`, :func:`postprocess`, and the metrics
:func:`trustmap.metrics.auprc`, :func:`~trustmap.metrics.auroc`,
:func:`~trustmap.metrics.ssim`.
"""

from trustmap.trust.config import PAPER_METHODS, ModelSpec, TrustConfig, load_config
from trustmap.trust.postprocess import PostprocessConfig, postprocess
from trustmap.trust.protocol import Prepared, TrustResult, average_mask, evaluate, prepare, run
from trustmap.trust.randomization import (
    RandomizationResult,
    Stage,
    cascading_randomization,
    independent_randomization,
    model_stages,
    randomization_baseline,
)

__all__ = [
    "PAPER_METHODS",
    "ModelSpec",
    "PostprocessConfig",
    "Prepared",
    "RandomizationResult",
    "Stage",
    "TrustConfig",
    "TrustResult",
    "average_mask",
    "cascading_randomization",
    "evaluate",
    "independent_randomization",
    "load_config",
    "model_stages",
    "postprocess",
    "prepare",
    "randomization_baseline",
    "run",
]
