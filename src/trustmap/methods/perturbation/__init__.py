"""Perturbation family: occlusion, LIME, KernelSHAP, Shapley sampling, RISE, meaningful and
extremal perturbations, HiPe, iterative saliency."""
