"""Every explainer family; importing this package registers all methods."""

from trustmap.methods import (  # noqa: F401
    anomaly,
    attention,
    cam,
    counterfactual,
    gradient,
    perturbation,
    relevance,
)
