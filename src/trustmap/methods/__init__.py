"""Every explainer family; importing this package registers all methods."""

from trustmap.methods import cam, gradient, perturbation, relevance  # noqa: F401
