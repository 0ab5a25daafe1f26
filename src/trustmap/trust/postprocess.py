"""Turning raw attributions into the [0, 1] maps that the trust criteria compare.

Arun et al.'s (2021) reference code (Arun et al. 2021) post-processed every saliency map the same
way before scoring it: absolute value, sum over the channels, clip at the 99th percentile
of the map, then min-max scaling to [0, 1]. :func:`postprocess` does that by default;
each step is configurable, and :class:`PostprocessConfig` holds the settings so that the
protocol can hash them (``as_dict()``) into its cache keys.

>>> import numpy as np
>>> attr = np.array([[[-2.0, 0.0], [1.0, 4.0]]])  # (C=1, H=2, W=2)
>>> postprocess(attr, clip_percentile=None)
array([[0.5 , 0.  ],
       [0.25, 1.  ]], dtype=float32)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = ["PostprocessConfig", "postprocess"]

_REDUCE = ("sum", "mean", "max_abs")
_NORMALIZE = ("minmax", None)


@dataclass(frozen=True)
class PostprocessConfig:
    """Settings of :func:`postprocess` (defaults: Arun et al.'s (2021) reference post-processing).

    Attributes
    ----------
    absolute:
        Take ``|A|`` first. If False the sign is kept (min-max still maps to [0, 1]).
    reduce_channels:
        ``"sum"``, ``"mean"`` or ``"max_abs"`` (per pixel, the channel value of largest
        magnitude, sign kept) over the channel axis.
    clip_percentile:
        Clip each map at this percentile of its own values (``np.percentile``, linear
        interpolation), in (0, 100]; None disables clipping. A signed map
        (``absolute=False``) is clipped at both ends, at ``100 - q`` and ``q`` (then
        ``q >= 50``).
    normalize:
        ``"minmax"``: ``(m - min) / (max - min)`` per map, a constant map giving zeros;
        None: leave the values as they are.
    """

    absolute: bool = True
    reduce_channels: str = "sum"
    clip_percentile: float | None = 99.0
    normalize: str | None = "minmax"

    def __post_init__(self) -> None:
        if not isinstance(self.absolute, bool | np.bool_):
            raise TypeError(f"absolute must be True or False, got {self.absolute!r}")
        object.__setattr__(self, "absolute", bool(self.absolute))
        if self.reduce_channels not in _REDUCE:
            raise ValueError(
                f"reduce_channels must be one of {_REDUCE}, got {self.reduce_channels!r}"
            )
        if self.normalize not in _NORMALIZE:
            raise ValueError(f"normalize must be one of {_NORMALIZE}, got {self.normalize!r}")
        q = self.clip_percentile
        if q is not None:
            if isinstance(q, bool) or not isinstance(q, int | float | np.number):
                raise TypeError(f"clip_percentile must be a number or None, got {q!r}")
            if not 0.0 < float(q) <= 100.0:
                raise ValueError(f"clip_percentile must be in (0, 100] or None, got {q!r}")
            if not self.absolute and float(q) < 50.0:
                raise ValueError(
                    "a signed map is clipped at the percentiles 100 - q and q, so "
                    f"clip_percentile must be at least 50 with absolute=False; got {q!r}"
                )
            # 99 and 99.0 must hash alike in the protocol's cache keys.
            object.__setattr__(self, "clip_percentile", float(q))

    def as_dict(self) -> dict[str, Any]:
        """The settings as plain JSON values (hashed by the protocol's cache)."""
        return dataclasses.asdict(self)


_DEFAULT = PostprocessConfig()


def postprocess(
    attributions: Any,
    *,
    config: PostprocessConfig | None = None,
    absolute: bool = _DEFAULT.absolute,
    reduce_channels: str = _DEFAULT.reduce_channels,
    clip_percentile: float | None = _DEFAULT.clip_percentile,
    normalize: str | None = _DEFAULT.normalize,
    spatial_dims: int | None = None,
) -> Any:
    """Maps in [0, 1] from raw attributions: ``minmax(clip_q(reduce_c(|A|)))`` per map.

    Parameters
    ----------
    attributions:
        Tensor or array ``(C, *spatial)`` or ``(B, C, *spatial)``, finite. Never modified.
        Without ``spatial_dims`` a 3-axis input is ``(C, H, W)``, a 4-axis input
        ``(B, C, H, W)`` (the layout of :func:`trustmap.explain`) and a 5-axis input
        ``(B, C, D, H, W)``; pass ``spatial_dims=3`` for a single volume ``(C, D, H, W)``.
    config:
        A :class:`PostprocessConfig`; then leave the other keywords at their defaults.
    absolute, reduce_channels, clip_percentile, normalize:
        As in :class:`PostprocessConfig`.
    spatial_dims:
        2 or 3, only needed to read a 4-axis input as one volume.

    Returns
    -------
    float32 maps ``(*spatial)`` or ``(B, *spatial)``, of the input's type (a tensor stays on
    its device). With ``normalize="minmax"`` every value lies in [0, 1] and a constant map
    (nothing to rank) becomes all zeros rather than a division by zero.
    """
    cfg = _config(config, absolute, reduce_channels, clip_percentile, normalize)
    values, shape = _read(attributions, spatial_dims)
    maps = _process(values, cfg).astype(np.float32).reshape(shape)
    if isinstance(attributions, torch.Tensor):
        return torch.from_numpy(maps).to(attributions.device)
    return maps


def _config(
    config: PostprocessConfig | None,
    absolute: bool,
    reduce_channels: str,
    clip_percentile: float | None,
    normalize: str | None,
) -> PostprocessConfig:
    given = PostprocessConfig(absolute, reduce_channels, clip_percentile, normalize)
    if config is None:
        return given
    if not isinstance(config, PostprocessConfig):
        raise TypeError(f"config must be a PostprocessConfig, got {type(config).__name__}")
    if given != _DEFAULT:
        changed = {k: v for k, v in given.as_dict().items() if v != _DEFAULT.as_dict()[k]}
        raise TypeError(
            f"pass either config or keyword settings, not both; got config and {changed}"
        )
    return config


def _read(attributions: Any, spatial_dims: int | None) -> tuple[np.ndarray, tuple[int, ...]]:
    """``(B, C, P)`` float64 copy of the input and the output shape."""
    if isinstance(attributions, torch.Tensor):
        arr = attributions.detach().cpu().numpy()
    else:
        arr = np.asarray(attributions)
    if arr.dtype.kind not in "biuf":
        raise TypeError(f"attributions must be real numbers, got dtype {arr.dtype}")
    if spatial_dims is None:
        if arr.ndim not in (3, 4, 5):
            raise ValueError(
                "attributions must have shape (C, H, W), (B, C, H, W) or (B, C, D, H, W); "
                f"got {arr.ndim} dimensions {tuple(arr.shape)}"
            )
        batched = arr.ndim != 3
    else:
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
        if arr.ndim not in (spatial_dims + 1, spatial_dims + 2):
            raise ValueError(
                f"with spatial_dims={spatial_dims} attributions must have {spatial_dims + 1} "
                f"(C, *spatial) or {spatial_dims + 2} (B, C, *spatial) dimensions; got "
                f"{tuple(arr.shape)}"
            )
        batched = arr.ndim == spatial_dims + 2
    if arr.size == 0:
        raise ValueError(f"attributions are empty: shape {tuple(arr.shape)}")
    values = arr.astype(np.float64)  # a copy: the caller's array is never touched
    if not batched:
        values = values[None]
    finite = np.isfinite(values)
    if not finite.all():
        n_nan = int(np.isnan(values).sum())
        raise ValueError(
            f"attributions contain {n_nan} NaN and {int((~finite).sum()) - n_nan} Inf values"
        )
    b, c, *spatial = values.shape
    out_shape = (b, *spatial) if batched else tuple(spatial)
    return values.reshape(b, c, -1), out_shape


def _process(values: np.ndarray, cfg: PostprocessConfig) -> np.ndarray:
    """``(B, C, P)`` float64 -> ``(B, P)`` float64."""
    if cfg.absolute:
        values = np.abs(values)
    if cfg.reduce_channels == "sum":
        maps = values.sum(axis=1)
    elif cfg.reduce_channels == "mean":
        maps = values.mean(axis=1)
    else:
        pick = np.abs(values).argmax(axis=1)[:, None]
        maps = np.take_along_axis(values, pick, axis=1)[:, 0]
    if cfg.clip_percentile is not None:
        q = cfg.clip_percentile
        high = np.percentile(maps, q, axis=1, keepdims=True)
        # An absolute map is only clipped from above, as in Arun et al.'s (2021) reference: its
        # low end is the background and must stay at 0 after min-max.
        low = None if cfg.absolute else np.percentile(maps, 100.0 - q, axis=1, keepdims=True)
        maps = np.clip(maps, low, high)
    if cfg.normalize == "minmax":
        low = maps.min(axis=1, keepdims=True)
        span = maps.max(axis=1, keepdims=True) - low
        flat = span <= 0
        maps = (maps - low) / np.where(flat, 1.0, span)
        maps[np.broadcast_to(flat, maps.shape)] = 0.0
    return maps
