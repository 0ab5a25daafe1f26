"""Metrics: pure functions returning floats, arrays or frozen dataclasses."""

from trustmap.metrics.classification import ClassificationReport, MetricCI, classification_report
from trustmap.metrics.faithfulness import (
    Curve,
    completeness_gap,
    deletion_curve,
    insertion_curve,
    sensitivity_n,
)
from trustmap.metrics.localization import (
    EmptyMaskError,
    auprc,
    auprc_batch,
    auroc,
    auroc_batch,
)
from trustmap.metrics.similarity import ssim, ssim_batch

__all__ = [
    "ClassificationReport",
    "Curve",
    "EmptyMaskError",
    "MetricCI",
    "auprc",
    "auprc_batch",
    "auroc",
    "auroc_batch",
    "classification_report",
    "completeness_gap",
    "deletion_curve",
    "insertion_curve",
    "sensitivity_n",
    "ssim",
    "ssim_batch",
]
