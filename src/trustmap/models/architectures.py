"""Reference architectures, 2D and 3D, built by name.

>>> model = create("small_cnn", spatial_dims=3, in_channels=1, num_classes=2, width=8)
>>> list_architectures()  # doctest: +NORMALIZE_WHITESPACE
['attention_cnn', 'attention_unet', 'autoencoder', 'box_localizer', 'densenet121',
 'resnet18', 'small_cnn', 'unet', 'vae']

Classifiers (``small_cnn``, ``attention_cnn``, ``resnet18``, ``densenet121``) return logits
``(B, num_classes)``. Localizers (``unet``, ``attention_unet``, ``box_localizer``) return a
dense output and add ``target_kind``, ``loss``, ``localization_map`` (and
``predict_boxes``); see :mod:`trustmap.models.localizers`. Autoencoders (``autoencoder``,
``vae``) return the reconstruction; see :mod:`trustmap.models.autoencoders`.
"""

from __future__ import annotations

import difflib
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from trustmap.models.localizers import BoxLocalizer, SegmentationLocalizer

__all__ = ["SmallCNN", "create", "list_architectures"]


class SmallCNN(nn.Module):
    """The ConvNet of Schutte et al. 2020 (Katzmann et al. 2021, section 3.2), 2D or 3D.

    Four blocks ``Conv(k=3, padding=1) -> BatchNorm -> ReLU`` with ``w, 2w, 4w, 8w``
    kernels (``w = width``, 32/64/128/256 by default), stride 1 in the first block and 2
    in the others; then global average pooling and a linear layer giving logits. The
    paper flattens before its softmax layer; global pooling instead makes the network
    accept any input size and gives CAM its ``GAP -> linear`` head.

    Each block owns its own ``nn.ReLU`` (not in place, never reused), so hooks and
    explainers that act per module see every activation. Modules are named
    ``features.block1 ... features.block4`` (each with ``conv``, ``bn``, ``relu``),
    ``pool``, ``flatten`` and ``fc``.

    Parameters
    ----------
    spatial_dims : int
        2 for ``(B, C, H, W)`` input, 3 for ``(B, C, D, H, W)``.
    in_channels : int
        Channels of the input image.
    num_classes : int
        Number of output logits.
    width : int
        Kernels of the first block; the blocks have ``width * (1, 2, 4, 8)`` kernels.
        Shrink it (e.g. 8) for 3D volumes on a CPU.
    """

    def __init__(
        self, spatial_dims: int = 2, in_channels: int = 1, num_classes: int = 2, *, width: int = 32
    ) -> None:
        super().__init__()
        conv = {2: nn.Conv2d, 3: nn.Conv3d}[spatial_dims]
        norm = {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[spatial_dims]
        pool = {2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}[spatial_dims]
        blocks: OrderedDict[str, nn.Module] = OrderedDict()
        c_in = in_channels
        for i, (mult, stride) in enumerate(zip((1, 2, 4, 8), (1, 2, 2, 2)), start=1):
            c_out = width * mult
            blocks[f"block{i}"] = nn.Sequential(
                OrderedDict(
                    # No bias: the BatchNorm that follows adds its own shift.
                    conv=conv(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=False),
                    bn=norm(c_out),
                    relu=nn.ReLU(),
                )
            )
            c_in = c_out
        self.features = nn.Sequential(blocks)
        self.pool = pool(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.pool(self.features(x))))


def _small_cnn(spatial_dims: int, in_channels: int, num_classes: int, **kwargs: Any) -> nn.Module:
    width = kwargs.pop("width", 32)
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ValueError(f"small_cnn: width must be a positive integer, got {width!r}")
    _no_extra("small_cnn", kwargs)
    return SmallCNN(spatial_dims, in_channels, num_classes, width=width)


def _resnet18(spatial_dims: int, in_channels: int, num_classes: int, **kwargs: Any) -> nn.Module:
    from monai.networks.nets import resnet18

    for key in ("spatial_dims", "n_input_channels", "num_classes", "pretrained"):
        if key in kwargs:
            raise ValueError(f"resnet18: {key!r} is set by create(); do not pass it in kwargs")
    return resnet18(
        spatial_dims=spatial_dims,
        n_input_channels=in_channels,
        num_classes=num_classes,
        **kwargs,
    )


def _densenet121(spatial_dims: int, in_channels: int, num_classes: int, **kwargs: Any) -> nn.Module:
    from monai.networks.nets import DenseNet121

    for key in ("spatial_dims", "in_channels", "out_channels", "pretrained"):
        if key in kwargs:
            raise ValueError(f"densenet121: {key!r} is set by create(); do not pass it in kwargs")
    return DenseNet121(
        spatial_dims=spatial_dims, in_channels=in_channels, out_channels=num_classes, **kwargs
    )


def _attention_cnn(
    spatial_dims: int, in_channels: int, num_classes: int, **kwargs: Any
) -> nn.Module:
    from trustmap.models.attention import AttentionCNN

    return AttentionCNN(spatial_dims, in_channels, num_classes, **kwargs)


def _attention_unet(
    spatial_dims: int, in_channels: int, num_classes: int, **kwargs: Any
) -> nn.Module:
    from trustmap.models.attention import AttentionLocalizer

    _binary_localizer("attention_unet", num_classes)
    return AttentionLocalizer(spatial_dims, in_channels, **kwargs)


def _autoencoder(spatial_dims: int, in_channels: int, num_classes: int, **kwargs: Any) -> nn.Module:
    from trustmap.models.autoencoders import build_autoencoder

    return build_autoencoder(spatial_dims, in_channels, num_classes, variational=False, **kwargs)


def _vae(spatial_dims: int, in_channels: int, num_classes: int, **kwargs: Any) -> nn.Module:
    from trustmap.models.autoencoders import build_autoencoder

    return build_autoencoder(spatial_dims, in_channels, num_classes, variational=True, **kwargs)


def _unet(spatial_dims: int, in_channels: int, num_classes: int, **kwargs: Any) -> nn.Module:
    _binary_localizer("unet", num_classes)
    return SegmentationLocalizer(spatial_dims, in_channels, **kwargs)


def _box_localizer(
    spatial_dims: int, in_channels: int, num_classes: int, **kwargs: Any
) -> nn.Module:
    _binary_localizer("box_localizer", num_classes)
    return BoxLocalizer(spatial_dims, in_channels, **kwargs)


def _binary_localizer(name: str, num_classes: int) -> None:
    # A localizer predicts one lesion score per pixel; num_classes=2 (lesion vs
    # background) is accepted so that callers can pass a classifier's settings unchanged.
    if num_classes not in (1, 2):
        raise ValueError(
            f"{name} localizes one lesion class (one output channel): num_classes must be "
            f"1 or 2, got {num_classes}"
        )


def _no_extra(name: str, kwargs: dict[str, Any]) -> None:
    if kwargs:
        raise TypeError(f"{name}: unexpected keyword arguments {sorted(kwargs)}")


_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "small_cnn": _small_cnn,
    "resnet18": _resnet18,
    "densenet121": _densenet121,
    "unet": _unet,
    "box_localizer": _box_localizer,
    "attention_cnn": _attention_cnn,
    "attention_unet": _attention_unet,
    "autoencoder": _autoencoder,
    "vae": _vae,
}


def list_architectures() -> list[str]:
    """Names accepted by :func:`create`, sorted."""
    return sorted(_BUILDERS)


def create(
    name: str,
    spatial_dims: int = 2,
    in_channels: int = 1,
    num_classes: int = 2,
    *,
    seed: int | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build a reference architecture by name.

    Parameters
    ----------
    name : str
        One of :func:`list_architectures`: ``small_cnn`` (Katzmann et al.'s (2021) ConvNet; kwarg
        ``width``), ``resnet18`` and ``densenet121`` (MONAI; kwargs go to the MONAI
        constructor), ``unet`` (:class:`~trustmap.models.localizers.SegmentationLocalizer`)
        and ``box_localizer`` (:class:`~trustmap.models.localizers.BoxLocalizer`, 2D only);
        ``attention_cnn`` (:class:`~trustmap.models.attention.AttentionCNN`, kwargs
        ``width``, ``attention_blocks``, ``compatibility``) and ``attention_unet``
        (:class:`~trustmap.models.attention.AttentionLocalizer`); ``autoencoder`` and
        ``vae`` (:class:`~trustmap.models.autoencoders.ConvAutoencoder`, ``num_classes``
        must be 1). ``densenet121`` downsamples 32-fold and needs at least 29 pixels per axis (its
        BatchNorm in training also needs a batch of 2 when the last map is 1 pixel).
    spatial_dims : int
        2 or 3.
    in_channels : int
        Channels of the input image.
    num_classes : int
        Logits of a classifier. Localizers have one output channel (the lesion score) and
        accept 1 or 2 here.
    seed : int or None
        If given, the weights are initialised from ``torch.manual_seed(seed)`` inside a
        forked RNG, so the same seed gives the same weights and torch's global generator
        is left as it was. If None, torch's global generator is used, as by any module.
    **kwargs
        Passed to the architecture.

    Returns
    -------
    torch.nn.Module
        The model, in training mode, on the CPU, in float32.

    Raises
    ------
    ValueError
        For an unknown name (the message lists the names and the closest one), a
        ``spatial_dims`` other than 2 or 3, or non-positive channel or class counts.
    """
    if not isinstance(name, str) or name not in _BUILDERS:
        names = list_architectures()
        close = difflib.get_close_matches(str(name), names, n=1, cutoff=0.4)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown architecture {name!r}: choose one of {names}{hint}")
    if spatial_dims not in (2, 3) or isinstance(spatial_dims, bool):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
    for arg, value in (("in_channels", in_channels), ("num_classes", num_classes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{arg} must be a positive integer, got {value!r}")
    builder = _BUILDERS[name]
    if seed is None:
        return builder(spatial_dims, in_channels, num_classes, **kwargs)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer or None, got {seed!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return builder(spatial_dims, in_channels, num_classes, **kwargs)
