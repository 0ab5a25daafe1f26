"""Gradient family: gradient, saliency, input x gradient, DeconvNet, guided backprop,
integrated gradients, SmoothGrad, smooth IG, XRAI."""

from trustmap.methods.gradient import (  # noqa: F401
    deconvnet,
    gradient,
    guided_backprop,
    input_x_gradient,
    integrated_gradients,
    saliency,
    smooth_ig,
    smoothgrad,
    xrai,
)
