"""Core: explainer base class, results, targets, hook context managers, registry."""

from trustmap.core.base import Explainer, build, explain
from trustmap.core.explanation import Explanation
from trustmap.core.registry import get_method, list_methods, register
from trustmap.core.targets import Target, resolve_target

__all__ = [
    "Explainer",
    "Explanation",
    "Target",
    "build",
    "explain",
    "get_method",
    "list_methods",
    "register",
    "resolve_target",
]
