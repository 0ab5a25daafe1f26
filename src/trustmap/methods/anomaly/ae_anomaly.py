"""Autoencoder anomaly maps (Huff et al. 2021, section 2.3)."""

from __future__ import annotations

import functools
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trustmap.core.base import Explainer
from trustmap.core.registry import register
from trustmap.core.targets import Target, TargetSpec, resolve_target
from trustmap.errors import InputError, InputTypeError, MissingFileError, ModelError
from trustmap.methods._auxiliary import run_auxiliary
from trustmap.methods.gradient.integrated_gradients import gaussian_blur

ERRORS = ("absolute", "squared")


@register(
    "ae_anomaly",
    family="anomaly",
    summary="reconstruction error |x - AE(x)| of an autoencoder trained on normal images",
    paper=(
        "Huff et al. 2021, Interpretation and visualization techniques for deep learning "
        "models in medical imaging, section 2.3"
    ),
    output="input",
    model_dependent=False,
    needs="autoencoder",
)
class AEAnomaly(Explainer):
    """Anomaly map ``|x - D(E(x))|`` of an autoencoder trained on normal images only.

    An autoencoder that has only seen normal anatomy reconstructs an abnormality poorly,
    so its reconstruction error localizes what is abnormal (Huff et al. 2021, section 2.3;
    Uzunova et al. 2019, Chen et al. 2020). The map has ``x``'s shape, one error per
    channel. It does not read the classifier's weights (``model_dependent`` is False):
    the classifier only resolves the target, as for every method, and a randomization
    test of the classifier says nothing about this map. ``params["anomaly_score"]`` is the
    mean error of each image, an image-level anomaly score.

    Parameters
    ----------
    autoencoder
        A directory (or its ``model.pt``) written by ``trustmap train --arch autoencoder``
        / ``vae`` (:func:`trustmap.models.ae_training.train_autoencoder`), loaded on
        ``x``'s device in ``x``'s dtype; or a module or callable mapping ``(B, C,
        *spatial)`` to a reconstruction of the same shape (a module runs on its own device
        and dtype, in eval mode).
    error
        ``"absolute"`` ``|x - x_hat|`` or ``"squared"`` ``(x - x_hat)^2``.
    smooth
        Gaussian sigma in pixels (voxels) applied to the error map (0: none); averages
        out pixel noise that the autoencoder cannot reproduce.

    Raises
    ------
    ValueError
        Without an autoencoder, for a checkpoint that is not an autoencoder, or one
        trained for another channel count, dimensionality or size.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        autoencoder: Any = None,
        error: str = "absolute",
        smooth: float = 0.0,
    ) -> None:
        self.model = model
        self.autoencoder = autoencoder
        self.error = error
        self.smooth = smooth

    def attribute(
        self, x: torch.Tensor, target: TargetSpec | Target
    ) -> tuple[torch.Tensor, torch.Tensor, Target, dict[str, Any]]:
        if self.error not in ERRORS:
            raise InputError(f"error must be one of {ERRORS}, got {self.error!r}")
        if (
            isinstance(self.smooth, bool)
            or not isinstance(self.smooth, (int, float))
            or not math.isfinite(self.smooth)
            or self.smooth < 0
        ):
            raise InputError(f"smooth must be a number >= 0 (pixels), got {self.smooth!r}")
        net = _resolve(self.autoencoder, x)
        with torch.no_grad():
            output = self.forward(x)
        resolved = resolve_target(target, output)
        resolved.scores(output)
        recon = run_auxiliary(net, x, "the autoencoder", trained_for="it was trained")
        diff = x - recon
        err = diff.abs() if self.error == "absolute" else diff * diff
        if self.smooth > 0:
            err = gaussian_blur(err, float(self.smooth))
        score = [float(v) for v in err.flatten(1).mean(1).cpu()]
        return err, output, resolved, {"anomaly_score": score}


def _resolve(autoencoder: Any, x: torch.Tensor) -> Any:
    if autoencoder is None:
        raise InputError(
            "ae_anomaly needs a trained autoencoder: pass autoencoder=DIR, the directory "
            "written by `trustmap train --arch autoencoder` (or vae), or a module"
        )
    if isinstance(autoencoder, (str, os.PathLike)):
        path = Path(autoencoder).expanduser()
        file = path / "model.pt" if path.is_dir() else path
        if not file.is_file():
            raise MissingFileError(f"no autoencoder checkpoint at {file}")
        net, info = _load_cached(
            str(file.resolve()), file.stat().st_mtime_ns, str(x.device), x.dtype
        )
        _check_trained_for(info, x, file)
        return net
    if callable(autoencoder):
        return autoencoder
    raise InputTypeError(
        "autoencoder must be a training directory, a model.pt file, a module or a callable; "
        f"got {type(autoencoder).__name__}"
    )


@functools.lru_cache(maxsize=4)
def _load_cached(
    file: str, mtime_ns: int, device: str, dtype: torch.dtype
) -> tuple[nn.Module, dict[str, Any]]:
    # Keyed on the modification time, so a retrained file is read again.
    from trustmap.models import load_checkpoint
    from trustmap.models.autoencoders import is_autoencoder

    del mtime_ns
    net, info = load_checkpoint(file, map_location=device)
    if not is_autoencoder(net):
        raise ModelError(
            f"{file} holds a {info.get('arch')!r} model, not an autoencoder; train one with "
            "`trustmap train --arch autoencoder`"
        )
    return net.to(dtype=dtype), info


def _check_trained_for(info: dict[str, Any], x: torch.Tensor, file: Path) -> None:
    _, c, *spatial = x.shape
    size = (info.get("extra") or {}).get("input_size")
    if len(spatial) != info["spatial_dims"] or c != info["in_channels"]:
        raise ModelError(
            f"the autoencoder {file} was trained on {info['in_channels']}-channel "
            f"{info['spatial_dims']}D images; x has shape {tuple(x.shape)}"
        )
    if size is not None and tuple(size) != tuple(spatial):
        raise ModelError(
            f"the autoencoder {file} was trained at size {tuple(size)}; x has spatial size "
            f"{tuple(spatial)}. Resize x or train an autoencoder at this size"
        )
