"""Perturbation family: occlusion, LIME, KernelSHAP, Shapley sampling, RISE, meaningful and
extremal perturbations, HiPe, iterative saliency."""

from trustmap.methods.perturbation import (  # noqa: F401
    extremal_perturbation,
    hipe,
    iterative_saliency,
    kernel_shap,
    lime,
    meaningful_perturbation,
    occlusion,
    rise,
    shapley_sampling,
)
