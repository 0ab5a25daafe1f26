"""Metrics: pure functions returning frozen dataclasses."""

from trustmap.metrics.classification import ClassificationReport, MetricCI, classification_report

__all__ = ["ClassificationReport", "MetricCI", "classification_report"]
