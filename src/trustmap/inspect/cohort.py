"""Cohort maps: the average attribution of a method over a class (Singh et al. 2020,
section 5).

Explanations are local, one image at a time; "this then is extrapolated to a global level
by averaging the highlighted features, especially in cases where the images have the
same spatial orientation" (Singh et al. 2020). For spatially aligned data (the
MNI-registered ``mri-brain-3d``, or any registered cohort) the mean map over the images of
a class shows where the model looks for that class across patients; saved as NIfTI with
the images' affine it overlays on the template in any viewer.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from trustmap.core.hooks import model_guard
from trustmap.errors import InputError
from trustmap.inspect.activations import _model_device, _model_dtype, as_images

__all__ = ["CohortMap", "cohort_map"]


@dataclass(frozen=True)
class CohortMap:
    """The mean post-processed map of ``method`` over ``n`` images of class
    ``class_index``: ``mean`` ``(*spatial)`` float32 in [0, 1], ``sd`` its per-pixel
    standard deviation, ``affine`` the images' 4x4 NIfTI affine (None if unknown)."""

    method: str
    class_index: int
    mean: np.ndarray
    sd: np.ndarray
    n: int
    select: str
    affine: np.ndarray | None = None
    params: dict[str, Any] = field(default_factory=dict)

    def save_nifti(self, path: str | os.PathLike[str]) -> Path:
        """Write ``mean`` as a NIfTI volume (``.nii.gz``) with the images' affine,
        atomically."""
        from trustmap.data.io import save_map

        return save_map(self.mean, path, affine=self.affine)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "class_index": self.class_index,
            "select": self.select,
            "n": self.n,
            "shape": list(self.mean.shape),
            "mean_of_map": float(self.mean.mean()),
            "params": self.params,
        }


def _affine_of(data: Any) -> np.ndarray | None:
    """The NIfTI affine of the dataset's first image, if it is a NIfTI file."""
    if not (hasattr(data, "__getitem__") and hasattr(data, "ids")):
        return None
    try:
        path = data[0].meta.get("path")
    except Exception:
        return None
    if not path or not str(path).endswith((".nii", ".nii.gz")):
        return None
    from trustmap.data.io import load

    affine = getattr(load(path), "affine", None)
    return None if affine is None else np.asarray(affine, dtype=np.float64)


def cohort_map(
    model: nn.Module,
    data: Any,
    method: str,
    *,
    class_index: int = 1,
    select: str = "label",
    labels: Any = None,
    params: Mapping[str, Any] | None = None,
    batch_size: int = 4,
    affine: np.ndarray | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> CohortMap:
    """Mean map of ``method`` (explaining class ``class_index``) over the images of that
    class.

    Each map is post-processed as in the trust protocol (absolute value, sum over
    channels, clip at the 99th percentile, min-max to [0, 1]; Arun et al. 2021) so that
    every image weighs the same, then the maps are averaged.

    Parameters
    ----------
    data
        An ImageDataset (labels and, for NIfTI files, the affine are read from it), a
        TensorData, or images with ``labels``.
    select
        ``"label"``: the images whose label is ``class_index``; ``"prediction"``: those
        the model assigns to it; ``"all"``: every image.
    params
        Keyword parameters of the method.
    affine
        The NIfTI affine to save with (default: that of the dataset's first image).
    """
    from trustmap.core.base import build
    from trustmap.core.registry import get_method
    from trustmap.trust.postprocess import postprocess

    if select not in ("label", "prediction", "all"):
        raise InputError(f"select must be 'label', 'prediction' or 'all', got {select!r}")
    images = as_images(data)
    n = images.shape[0]
    if labels is None:
        labels = getattr(data, "labels", None)
    device, dtype = _model_device(model), _model_dtype(model, images)
    explainer = build(get_method(method), model, dict(params or {}))
    if select == "prediction":
        preds = []
        with model_guard(model), torch.no_grad():
            for start in range(0, n, 64):
                x = images[start : start + 64].to(device=device, dtype=dtype)
                preds.append(model(x).reshape(x.shape[0], -1).argmax(1).cpu())
        chosen = np.flatnonzero(torch.cat(preds).numpy() == class_index)
    elif select == "label":
        if labels is None:
            raise InputError("select='label' needs labels: pass a dataset or labels=")
        lab = np.asarray(labels).reshape(-1)
        if lab.shape[0] != n:
            raise InputError(f"labels has {lab.shape[0]} entries for {n} images")
        chosen = np.flatnonzero(lab == class_index)
    else:
        chosen = np.arange(n)
    if chosen.size == 0:
        raise InputError(
            f"no image is of class {class_index} ({select}); a cohort map needs at least one"
        )
    total = None
    total_sq = None
    for done, start in enumerate(range(0, len(chosen), batch_size), start=1):
        idx = torch.as_tensor(chosen[start : start + batch_size])
        x = images[idx].to(device=device, dtype=dtype)
        attr = explainer.explain(x, target=class_index).attributions
        maps = torch.as_tensor(postprocess(attr.detach().cpu())).double()
        maps = maps.reshape(x.shape[0], *x.shape[2:])
        total = maps.sum(0) if total is None else total + maps.sum(0)
        sq = maps.pow(2).sum(0)
        total_sq = sq if total_sq is None else total_sq + sq
        if progress is not None:
            progress(min(done * batch_size, len(chosen)), len(chosen))
    assert total is not None and total_sq is not None
    mean = total / len(chosen)
    sd = (total_sq / len(chosen) - mean.pow(2)).clamp_min(0).sqrt()
    return CohortMap(
        method=method,
        class_index=int(class_index),
        mean=mean.numpy().astype(np.float32),
        sd=sd.numpy().astype(np.float32),
        n=len(chosen),
        select=select,
        affine=_affine_of(data) if affine is None else np.asarray(affine, dtype=np.float64),
        params=dict(params or {}),
    )
