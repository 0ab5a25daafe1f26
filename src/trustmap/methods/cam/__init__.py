"""CAM family: class activation maps of one layer, upsampled to the input.

CAM, Grad-CAM, Grad-CAM++, Score-CAM, guided Grad-CAM, LayerCAM, HiResCAM, XGrad-CAM,
Eigen-CAM, Ablation-CAM, Respond-CAM.
"""

from trustmap.methods.cam import (  # noqa: F401
    ablation_cam,
    cam,
    eigen_cam,
    grad_cam,
    grad_cam_pp,
    guided_grad_cam,
    hires_cam,
    layer_cam,
    respond_cam,
    score_cam,
    xgrad_cam,
)
