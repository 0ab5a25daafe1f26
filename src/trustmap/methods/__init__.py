"""Every explainer family; importing this package registers all methods."""

from trustmap.methods import cam, counterfactual, gradient, perturbation, relevance  # noqa: F401
