"""The same methods in captum, MONAI and PAIR ``saliency``, with the same layer, steps,
samples and target.

Each peer is built lazily: a library that fails to import is reported as missing, a
method a library has only for 2D images as unsupported, and neither stops the run.
``build(setting, params)`` returns a zero-argument callable that computes the peer's map
for the whole batch; ``params`` are the effective parameters of trustmap's method.

Batching: "matched" variants evaluate as many rows per pass as trustmap does (the input
batch ``B``); captum's integrated gradients and NoiseTunnel(Saliency) are also timed with
captum's own defaults (every path point or noise draw in one pass) and the faster of the
two is reported. PAIR explains one image at a time, so it is timed over the ``B`` images.
MONAI's objects keep hooks on the model and flip its ReLUs, so they get a private copy.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from _limits import DEFAULT_LAYER, Setting


class Unsupported(Exception):
    """The library has no version of the method for this setting."""


Runner = Callable[[], object]


@dataclass(frozen=True)
class Peer:
    library: str  # "captum", "monai" or "pair"
    variant: str  # how it is batched, e.g. "internal_batch_size=4"; "" for one way only
    build: Callable[[Setting, dict[str, Any]], Runner]


def _module(model: nn.Module, name: str) -> nn.Module:
    return dict(model.named_modules())[name]


def _layer(params: dict[str, Any]) -> str:
    return params.get("layer") or DEFAULT_LAYER


def _sigma(s: Setting, params: dict[str, Any]) -> float:
    # trustmap scales the noise per sample; captum takes one number. Same cost either way.
    return float(params.get("noise_level", 0.15)) * float(s.x.max() - s.x.min())


def _seeded(fn: Runner, seed: int = 0) -> Runner:
    """Run a peer that draws from torch's global generator with a fixed seed, without
    changing the caller's generator state."""

    def run() -> object:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return fn()

    return run


# ------------------------------------------------------------------------------------
# captum
# ------------------------------------------------------------------------------------
def _captum_simple(cls_name: str, **kwargs: Any) -> Callable[[Setting, dict], Runner]:
    def build(s: Setting, _params: dict[str, Any]) -> Runner:
        import captum.attr as ca

        method = getattr(ca, cls_name)(s.model)
        return lambda: method.attribute(s.x, target=s.target, **kwargs)

    return build


def _captum_ig(matched: bool) -> Callable[[Setting, dict], Runner]:
    def build(s: Setting, params: dict[str, Any]) -> Runner:
        from captum.attr import IntegratedGradients

        ig = IntegratedGradients(s.model)
        kw: dict[str, Any] = {"n_steps": int(params["n_steps"])}
        if matched:
            kw.update(internal_batch_size=s.x.shape[0], method="riemann_trapezoid")
        return lambda: ig.attribute(s.x, target=s.target, **kw)

    return build


def _captum_smoothgrad(matched: bool) -> Callable[[Setting, dict], Runner]:
    def build(s: Setting, params: dict[str, Any]) -> Runner:
        from captum.attr import NoiseTunnel, Saliency

        nt = NoiseTunnel(Saliency(s.model))
        kw: dict[str, Any] = {
            "nt_type": "smoothgrad",
            "nt_samples": int(params["n_samples"]),
            "stdevs": _sigma(s, params),
            "abs": False,
        }
        if matched:
            kw["nt_samples_batch_size"] = 1
        return _seeded(lambda: nt.attribute(s.x, target=s.target, **kw))

    return build


def _captum_smooth_ig(s: Setting, params: dict[str, Any]) -> Runner:
    from captum.attr import IntegratedGradients, NoiseTunnel

    nt = NoiseTunnel(IntegratedGradients(s.model))
    kw: dict[str, Any] = {
        "nt_type": "smoothgrad",
        "nt_samples": int(params["n_samples"]),
        "nt_samples_batch_size": 1,
        "stdevs": _sigma(s, params),
        "n_steps": int(params["n_steps"]),
        "internal_batch_size": s.x.shape[0],
        "method": "riemann_trapezoid",
    }
    return _seeded(lambda: nt.attribute(s.x, target=s.target, **kw))


def _captum_layer_grad_cam(s: Setting, params: dict[str, Any]) -> Runner:
    from captum.attr import LayerAttribution, LayerGradCam

    gc = LayerGradCam(s.model, _module(s.model, _layer(params)))
    mode = "bilinear" if s.x.ndim == 4 else "trilinear"

    def run() -> object:
        # Upsampled and rectified like trustmap's map, so both return the same thing.
        cam = gc.attribute(s.x, target=s.target, relu_attributions=True)
        return LayerAttribution.interpolate(cam, tuple(s.x.shape[2:]), interpolate_mode=mode)

    return run


def _captum_guided_grad_cam(s: Setting, params: dict[str, Any]) -> Runner:
    from captum.attr import GuidedGradCam

    ggc = GuidedGradCam(s.model, _module(s.model, _layer(params)))
    return lambda: ggc.attribute(s.x, target=s.target)


# ------------------------------------------------------------------------------------
# MONAI
# ------------------------------------------------------------------------------------
def _monai_cam(cls_name: str, **kwargs: Any) -> Callable[[Setting, dict], Runner]:
    def build(s: Setting, params: dict[str, Any]) -> Runner:
        import monai.visualize as mv

        cam = getattr(mv, cls_name)(
            nn_module=copy.deepcopy(s.model), target_layers=_layer(params), **kwargs
        )
        # MONAI's CAM indexes the classes per sample; GradCAM takes one int.
        classes = torch.full((s.x.shape[0],), s.target, dtype=torch.long)
        idx: Any = classes if cls_name == "CAM" else s.target
        return lambda: cam(s.x, class_idx=idx)

    return build


def _monai_grad(cls_name: str, **kwargs: Any) -> Callable[[Setting, dict], Runner]:
    """MONAI's gradient classes take a batch of one: timed over the images."""

    def build(s: Setting, params: dict[str, Any]) -> Runner:
        import monai.visualize as mv

        kw = dict(kwargs)
        if cls_name == "SmoothGrad":
            kw.update(n_samples=int(params["n_samples"]), verbose=False)
        method = getattr(mv, cls_name)(copy.deepcopy(s.model), **kw)

        def run() -> object:
            return [method(s.x[i : i + 1].clone(), index=s.target) for i in range(s.x.shape[0])]

        return _seeded(run) if cls_name == "SmoothGrad" else run

    return build


# ------------------------------------------------------------------------------------
# PAIR saliency
# ------------------------------------------------------------------------------------
def _pair_images(s: Setting) -> list[np.ndarray]:
    """PAIR works on one channels-last numpy image at a time."""
    return [np.moveaxis(s.x[i].numpy(), 0, -1).copy() for i in range(s.x.shape[0])]


def _pair_model_function(s: Setting, layer: str | None = None) -> Callable[..., dict]:
    """The ``call_model_function`` PAIR asks for: input gradients, or the layer's output
    and its gradient, for a channels-last numpy batch."""
    import saliency.core as sc

    module = _module(s.model, layer) if layer else None

    def call(x_batch: np.ndarray, call_model_args: Any = None, expected_keys: Any = None) -> dict:
        t = torch.from_numpy(np.ascontiguousarray(np.moveaxis(x_batch, -1, 1))).float()
        t.requires_grad_(True)
        if sc.base.INPUT_OUTPUT_GRADIENTS in expected_keys:
            out = s.model(t)
            (g,) = torch.autograd.grad(out[:, s.target].sum(), t)
            return {sc.base.INPUT_OUTPUT_GRADIENTS: np.moveaxis(g.numpy(), 1, -1)}
        store: list[torch.Tensor] = []
        handle = module.register_forward_hook(lambda _m, _i, o: store.append(o))
        try:
            out = s.model(t)
        finally:
            handle.remove()
        (g,) = torch.autograd.grad(out[:, s.target].sum(), store[-1])
        return {
            sc.base.CONVOLUTION_LAYER_VALUES: np.moveaxis(store[-1].detach().numpy(), 1, -1),
            sc.base.CONVOLUTION_OUTPUT_GRADIENTS: np.moveaxis(g.numpy(), 1, -1),
        }

    return call


def _pair_2d_only(s: Setting, what: str) -> None:
    if s.x.ndim != 4:
        raise Unsupported(f"PAIR {what} handles 2D images only")


def _pair_gradient(s: Setting, _params: dict[str, Any]) -> Runner:
    import saliency.core as sc

    method, fn, images = sc.GradientSaliency(), _pair_model_function(s), _pair_images(s)
    return lambda: [method.GetMask(im, fn) for im in images]


def _pair_smoothgrad(s: Setting, params: dict[str, Any]) -> Runner:
    import saliency.core as sc

    method, fn, images = sc.GradientSaliency(), _pair_model_function(s), _pair_images(s)
    n = int(params["n_samples"])
    spread = float(params.get("noise_level", 0.15))

    def run() -> object:
        # PAIR draws its noise from numpy's global generator.
        state = np.random.get_state()
        np.random.seed(0)
        try:
            return [
                method.GetSmoothedMask(im, fn, stdev_spread=spread, nsamples=n, magnitude=False)
                for im in images
            ]
        finally:
            np.random.set_state(state)

    return run


def _pair_ig(s: Setting, params: dict[str, Any]) -> Runner:
    import saliency.core as sc

    method, fn, images = sc.IntegratedGradients(), _pair_model_function(s), _pair_images(s)
    steps, b = int(params["n_steps"]), s.x.shape[0]
    return lambda: [method.GetMask(im, fn, x_steps=steps, batch_size=b) for im in images]


def _pair_grad_cam(s: Setting, params: dict[str, Any]) -> Runner:
    _pair_2d_only(s, "GradCam")
    import saliency.core as sc

    method, images = sc.GradCam(), _pair_images(s)
    fn = _pair_model_function(s, _layer(params))
    return lambda: [method.GetMask(im, fn, should_resize=True, three_dims=False) for im in images]


def _pair_xrai(s: Setting, params: dict[str, Any]) -> Runner:
    _pair_2d_only(s, "XRAI")
    import saliency.core as sc

    method, fn, images = sc.XRAI(), _pair_model_function(s), _pair_images(s)
    extra = sc.XRAIParameters(steps=int(params.get("n_steps", 25)))
    b = s.x.shape[0]
    return lambda: [method.GetMask(im, fn, batch_size=b, extra_parameters=extra) for im in images]


# ------------------------------------------------------------------------------------
# The table
# ------------------------------------------------------------------------------------
PEERS: dict[str, list[Peer]] = {
    "gradient": [
        Peer("captum", "Saliency(abs=False)", _captum_simple("Saliency", abs=False)),
        Peer("monai", "VanillaGrad, per image", _monai_grad("VanillaGrad")),
        Peer("pair", "GradientSaliency, per image", _pair_gradient),
    ],
    "saliency": [Peer("captum", "Saliency", _captum_simple("Saliency", abs=True))],
    "input_x_gradient": [Peer("captum", "InputXGradient", _captum_simple("InputXGradient"))],
    "deconvnet": [Peer("captum", "Deconvolution", _captum_simple("Deconvolution"))],
    "guided_backprop": [
        Peer("captum", "GuidedBackprop", _captum_simple("GuidedBackprop")),
        Peer("monai", "GuidedBackpropGrad, per image", _monai_grad("GuidedBackpropGrad")),
    ],
    "integrated_gradients": [
        Peer("captum", "internal_batch_size=B", _captum_ig(matched=True)),
        Peer("captum", "defaults", _captum_ig(matched=False)),
        Peer("pair", "batch_size=B, per image", _pair_ig),
    ],
    "smoothgrad": [
        Peer("captum", "NoiseTunnel(Saliency), nt_samples_batch_size=1", _captum_smoothgrad(True)),
        Peer("captum", "NoiseTunnel(Saliency), defaults", _captum_smoothgrad(False)),
        Peer("monai", "SmoothGrad, per image", _monai_grad("SmoothGrad", magnitude=False)),
        Peer("pair", "GetSmoothedMask(GradientSaliency), per image", _pair_smoothgrad),
    ],
    "smooth_ig": [
        Peer(
            "captum",
            "NoiseTunnel(IntegratedGradients), nt_samples_batch_size=1, internal_batch_size=B",
            _captum_smooth_ig,
        )
    ],
    "xrai": [Peer("pair", "XRAI, batch_size=B, per image", _pair_xrai)],
    "grad_cam": [
        Peer("captum", "LayerGradCam + interpolate", _captum_layer_grad_cam),
        Peer("monai", "GradCAM", _monai_cam("GradCAM")),
        Peer("pair", "GradCam, per image", _pair_grad_cam),
    ],
    "grad_cam_pp": [Peer("monai", "GradCAMpp", _monai_cam("GradCAMpp"))],
    "guided_grad_cam": [Peer("captum", "GuidedGradCam", _captum_guided_grad_cam)],
    "cam": [Peer("monai", "CAM", _monai_cam("CAM", fc_layers="class_layers.out"))],
}
