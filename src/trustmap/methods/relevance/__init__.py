"""Relevance and reference-based family: LRP, DeepTaylor, DeepLIFT, DeepSHAP,
GradientSHAP, PatternNet and PatternAttribution."""

from trustmap.methods.relevance import (  # noqa: F401
    deep_shap,
    deep_taylor,
    deeplift,
    gradient_shap,
    lrp,
    pattern_attribution,
    pattern_net,
)
