"""Counterfactual family: relevance from generated counterfactual images.

cyclegan_am (Katzmann et al. 2021): R = G+(x) - G-(x) of two generators trained by
cycle-consistent activation maximization (:mod:`trustmap.counterfactual`).
"""

from trustmap.methods.counterfactual import cyclegan_am  # noqa: F401
