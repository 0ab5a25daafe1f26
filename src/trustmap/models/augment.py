"""Training augmentation that moves images, masks and boxes with one and the same transform.

Huff et al. 2021 (Appendix 1, "Ensuring data correctness") warns that augmentation applied to an
image but not, or differently, to its segmentation mask silently breaks their spatial
correspondence. Here every spatial change is a single affine map per sample, applied to
the image (bilinear), to the mask (nearest neighbour) and to the box corners, so the three
can only move together.

Defaults are chosen for radiology: small rotations (+-10 degrees), scaling (+-10 %),
translations (+-5 %) and an intensity jitter. Flips are opt-in (``flip=(axes)``): a
left/right flip turns a left pneumothorax into a right one, reverses the heart's side and
mirrors laterality markers ("L"/"R" tokens), which a shortcut experiment must keep.

All random draws come from an explicit :class:`torch.Generator` (on the CPU, so the draws
are the same on every device); nothing touches torch's global generator.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["AugmentConfig", "Augmented", "augment", "sample_affines", "transform_boxes"]

Box = tuple[float, ...]


@dataclass(frozen=True)
class AugmentConfig:
    """Ranges of the random transform; each value is drawn uniformly per sample.

    Parameters
    ----------
    rotate
        Maximum rotation in degrees (+-). In 3D the volume is rotated about each of its
        three axes by up to this angle.
    scale
        Maximum relative zoom (+-): 0.1 draws a zoom factor in [0.9, 1.1].
    translate
        Maximum shift as a fraction of the image size along each axis (+-).
    contrast
        Maximum relative contrast change (+-) around the image's mean.
    brightness
        Maximum additive shift (+-), in units of the image's standard deviation.
    noise
        Standard deviation of additive Gaussian noise, in units of the image's standard
        deviation (0 disables it).
    flip
        Spatial axes (0 = first spatial axis, i.e. rows in 2D) flipped with probability
        1/2 each. Empty by default: see the module docstring.
    padding
        How pixels that come from outside the image are filled: ``"border"`` (repeat the
        edge) or ``"zeros"``. Images and masks use the same rule, so they stay aligned.
    """

    rotate: float = 10.0
    scale: float = 0.1
    translate: float = 0.05
    contrast: float = 0.1
    brightness: float = 0.05
    noise: float = 0.0
    flip: tuple[int, ...] = ()
    padding: str = "border"

    def validate(self, spatial_dims: int) -> None:
        """Raise ValueError for ranges that make no sense."""
        for name in ("rotate", "scale", "translate", "contrast", "brightness", "noise"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"augmentation {name} must be a finite number >= 0, got {value!r}")
        if self.scale >= 1 or self.contrast >= 1:
            raise ValueError("augmentation scale and contrast must be below 1 (relative ranges)")
        if self.padding not in ("border", "zeros"):
            raise ValueError(
                f"augmentation padding must be 'border' or 'zeros', got {self.padding!r}"
            )
        bad = [a for a in self.flip if not (isinstance(a, int) and 0 <= a < spatial_dims)]
        if bad:
            raise ValueError(
                f"augmentation flip axes must be spatial axes 0..{spatial_dims - 1}, got {bad}"
            )

    @property
    def is_identity(self) -> bool:
        return not (
            self.rotate
            or self.scale
            or self.translate
            or self.contrast
            or self.brightness
            or self.noise
            or self.flip
        )


@dataclass(frozen=True)
class Augmented:
    """The transformed batch: images ``(B, C, *S)``, masks ``(B, 1, *S)`` or None, boxes
    (one list per sample, None when none were given) and the affine maps used
    (``(B, n, n + 1)`` in grid_sample's normalised coordinates, output -> input)."""

    images: torch.Tensor
    masks: torch.Tensor | None
    boxes: list[list[Box]] | None
    theta: torch.Tensor


def _rotation(angles: torch.Tensor, n: int) -> torch.Tensor:
    """Rotation matrices ``(B, n, n)`` from angles in radians ((B, 1) in 2D, (B, 3) in 3D)."""
    b = angles.shape[0]
    if n == 2:
        c, s = angles[:, 0].cos(), angles[:, 0].sin()
        return torch.stack([torch.stack([c, -s], 1), torch.stack([s, c], 1)], 1)
    out = torch.eye(3, dtype=angles.dtype).expand(b, 3, 3).clone()
    for axis in range(3):
        i, j = [k for k in range(3) if k != axis]
        c, s = angles[:, axis].cos(), angles[:, axis].sin()
        rot = torch.eye(3, dtype=angles.dtype).expand(b, 3, 3).clone()
        rot[:, i, i], rot[:, i, j], rot[:, j, i], rot[:, j, j] = c, -s, s, c
        out = rot @ out
    return out


def sample_affines(
    batch: int, spatial: Sequence[int], config: AugmentConfig, generator: torch.Generator
) -> torch.Tensor:
    """Draw ``batch`` random affine maps ``(B, n, n + 1)`` (float64, CPU).

    Each maps an output location to the input location it samples, in grid_sample's
    normalised coordinates ((x, y[, z]) order, ``align_corners=False``). The rotation and
    zoom act in pixel units, so a rotation stays a rotation on non-square images.
    """
    n = len(spatial)
    # One fixed-size draw per batch, whatever the config, so that the stream of the
    # generator does not depend on which ranges are zero.
    u = torch.rand(batch, 3 + 2 * n + n, generator=generator, dtype=torch.float64) * 2 - 1
    n_angles = 1 if n == 2 else 3
    angles = u[:, :n_angles] * math.radians(config.rotate)
    zoom = 1 + u[:, 3] * config.scale
    shift = u[:, 4 : 4 + n] * (2 * config.translate)  # normalised units: 2 = whole image
    flips = torch.ones(batch, n, dtype=torch.float64)
    for axis in config.flip:
        # Spatial axis `axis` (rows = 0) is grid coordinate n - 1 - axis ((x, y, z) order).
        flips[:, n - 1 - axis] = torch.where(u[:, 4 + n + axis] > 0, -1.0, 1.0)
    # Sampling from input = A @ output; zooming in by `zoom` means sampling a smaller area.
    a_pix = _rotation(angles, n) / zoom[:, None, None] * flips[:, None, :]
    half = torch.tensor([s / 2 for s in reversed(spatial)], dtype=torch.float64)
    a_norm = a_pix * half[None, None, :] / half[None, :, None]
    return torch.cat([a_norm, shift[:, :, None]], dim=2)


def transform_boxes(
    boxes: Sequence[Sequence[Box]], theta: torch.Tensor, spatial: Sequence[int]
) -> list[list[Box]]:
    """Map boxes through the inverse of ``theta`` (input -> output), as axis-aligned boxes.

    A box is ``(x, y, width, height)`` in 2D (x = column of the left edge, y = row of the top
    edge, RSNA style) or ``(x, y, z, width, height, depth)`` in 3D. The result is the
    bounding box of the transformed corners clipped to the image; boxes that leave the image
    entirely are dropped.
    """
    n = len(spatial)
    sizes = torch.tensor(list(reversed(spatial)), dtype=torch.float64)  # (W, H[, D])
    corners_unit = torch.tensor(
        [[(k >> d) & 1 for d in range(n)] for k in range(2**n)], dtype=torch.float64
    )
    out: list[list[Box]] = []
    for i, sample_boxes in enumerate(boxes):
        a = theta[i, :, :n].to(torch.float64)
        t = theta[i, :, n].to(torch.float64)
        a_inv = torch.linalg.inv(a)
        moved: list[Box] = []
        for box in sample_boxes:
            if len(box) < 2 * n:
                raise ValueError(f"a {n}D box needs {2 * n} numbers, got {tuple(box)}")
            lo = torch.tensor(box[:n], dtype=torch.float64)
            size = torch.tensor(box[n : 2 * n], dtype=torch.float64)
            corners = lo + corners_unit * size  # pixel edges
            u = 2 * corners / sizes - 1
            v = (u - t) @ a_inv.T
            p = (v + 1) / 2 * sizes
            new_lo = p.min(0).values.clamp(min=0)
            new_hi = torch.minimum(p.max(0).values, sizes)
            if bool((new_hi - new_lo <= 0).any()):
                continue
            moved.append(tuple(float(v) for v in (*new_lo, *(new_hi - new_lo))))
        out.append(moved)
    return out


def _jitter(images: torch.Tensor, u: torch.Tensor, config: AugmentConfig, gen: torch.Generator):
    b = images.shape[0]
    flat = images.reshape(b, -1)
    mean = flat.mean(1).view(b, *([1] * (images.dim() - 1)))
    std = flat.std(1).clamp_min(1e-6).view_as(mean)
    c = (1 + u[:, 0] * config.contrast).to(images).view_as(mean)
    shift = (u[:, 1] * config.brightness).to(images).view_as(mean) * std
    out = (images - mean) * c + mean + shift
    if config.noise:
        noise = torch.randn(images.shape, generator=gen, dtype=images.dtype)
        out = out + noise.to(images.device) * config.noise * std
    return out


def augment(
    images: torch.Tensor,
    masks: torch.Tensor | None = None,
    boxes: Sequence[Sequence[Box]] | None = None,
    *,
    config: AugmentConfig | None = None,
    generator: torch.Generator,
    image_mode: str = "bilinear",
) -> Augmented:
    """Apply one random affine map per sample to images, masks and boxes, then jitter the
    image intensities.

    Parameters
    ----------
    images
        ``(B, C, *spatial)`` float tensor, 2D or 3D.
    masks
        ``(B, 1, *spatial)`` (any dtype; returned as float 0/1) or None. Resampled with
        nearest neighbour on the same grid as the images, so a pixel of the output mask is
        the mask value at exactly the input location the image pixel samples.
    boxes
        One list of boxes per sample (see :func:`transform_boxes`) or None.
    config
        The ranges; ``AugmentConfig()`` when None.
    generator
        CPU :class:`torch.Generator` for every random draw.
    image_mode
        grid_sample mode for the image: ``"bilinear"`` (default) or ``"nearest"``.
    """
    config = config or AugmentConfig()
    if images.dim() not in (4, 5):
        raise ValueError(
            f"images must be (B, C, H, W) or (B, C, D, H, W), got {tuple(images.shape)}"
        )
    b, _c, *spatial = images.shape
    config.validate(len(spatial))
    if masks is not None and (masks.shape[0] != b or tuple(masks.shape[2:]) != tuple(spatial)):
        raise ValueError(
            f"masks {tuple(masks.shape)} do not match images {tuple(images.shape)} "
            "(expected (B, 1, *spatial) with the images' B and spatial shape)"
        )
    if boxes is not None and len(boxes) != b:
        raise ValueError(f"got {len(boxes)} box lists for a batch of {b} images")
    theta64 = sample_affines(b, spatial, config, generator)
    u = torch.rand(b, 2, generator=generator, dtype=torch.float64) * 2 - 1
    if config.is_identity:
        out_masks = None if masks is None else masks.to(images.dtype)
        out_boxes = None if boxes is None else [list(map(tuple, bx)) for bx in boxes]
        return Augmented(images, out_masks, out_boxes, theta64)
    theta = theta64.to(device=images.device, dtype=images.dtype)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    out = F.grid_sample(
        images, grid, mode=image_mode, padding_mode=config.padding, align_corners=False
    )
    if config.contrast or config.brightness or config.noise:
        out = _jitter(out, u, config, generator)
    out_masks = None
    if masks is not None:
        m = masks.to(device=images.device, dtype=images.dtype)
        out_masks = F.grid_sample(
            m, grid, mode="nearest", padding_mode=config.padding, align_corners=False
        )
    out_boxes = None if boxes is None else transform_boxes(boxes, theta64, spatial)
    return Augmented(out, out_masks, out_boxes, theta64)
