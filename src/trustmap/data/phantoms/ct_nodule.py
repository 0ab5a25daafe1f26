"""``ct-nodule``: axial CT lung patches in Hounsfield units with a nodule at the centre.

Modelled on the LIDC-IDRI crops of Katzmann et al. 2021 (section 3.1): 64 x 64
pixels covering 45 x 45 mm around the lesion (pixel spacing 45/64 mm); 45% malignant, as
in their 348/772. Each patch shows

* parenchyma around -850 HU with a gentle gravity gradient and fine texture;
* vessels (about +40 HU): round cross-sections and in-plane branches, with partial volume
  for the thin ones; sometimes the chest wall (muscle, a fat stripe) at one edge;
* a nodule at or near the centre. Benign (label 0): smooth, round or oval, a sharp margin,
  a quarter of them with central calcification. Malignant (label 1): lobulated (a few
  strong low harmonics of the outline) or spiculated (thin tapering radial spicules) or
  both, with a slightly fuzzier margin, and larger on average. Atypical cases (7% of each
  class at difficulty 1, ``0.07 d``) swap the shape: smooth malignant, lobulated benign;
* correlated noise of 20-35 HU.

The mask is the nodule (spicules included), ``occupancy > 0.5``. Images are stored as
int16 HU in NIfTI; the card's intensity is the lung window (centre -600, width 1500).

Difficulty ``d`` scales lobulation and spicule amplitude by ``d^-0.8``, pulls the two size
distributions together, scales the share of atypical cases by ``d`` and noise by ``d^0.5``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from trustmap.data.phantoms._common import PhantomSpec, bbox, smooth_noise

__all__ = ["CT_NODULE", "FOV_MM"]

#: Field of view of a patch in mm, whatever its size in pixels (Katzmann et al. 2021).
FOV_MM = 45.0


@dataclass(frozen=True)
class CTContext:
    shape: tuple[int, int]
    difficulty: float
    mm: float  # pixel spacing
    x: np.ndarray  # (H, W) mm from the patch centre, columns
    y: np.ndarray  # (H, W) mm from the patch centre, rows


def _context(seed: int, size: tuple[int, int], difficulty: float, template: str | None):
    del seed, template
    h, w = size
    mm = FOV_MM / max(h, w)
    y, x = np.meshgrid(
        (np.arange(h, dtype=np.float32) - (h - 1) / 2) * mm,
        (np.arange(w, dtype=np.float32) - (w - 1) / 2) * mm,
        indexing="ij",
    )
    return CTContext(shape=size, difficulty=difficulty, mm=mm, x=x, y=y)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def _vessels(ctx: CTContext, rng: np.random.Generator) -> np.ndarray:
    """Occupancy (0..1) of vessels: cross-sections (discs) and in-plane branches (tubes).

    Every vessel is a centreline with a radius; one distance transform to the nearest
    centreline pixel gives the distance and (through the nearest pixel) the local radius
    for all of them at once.
    """
    h, w = ctx.shape
    half = FOV_MM / 2
    pts, radii = [], []
    n_discs = int(rng.integers(3, 10))
    pts.append(rng.uniform(-half, half, (n_discs, 2)))
    radii.append(rng.uniform(0.5, 2.2, n_discs))
    for _ in range(int(rng.integers(0, 3))):
        # A quadratic Bezier across the patch, tapering from one end.
        p0, p1, p2 = rng.uniform(-half * 1.2, half * 1.2, (3, 2))
        t = np.linspace(0.0, 1.0, 4 * (h + w))[:, None]
        pts.append((1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2)
        radii.append(rng.uniform(0.5, 1.5) * (1.0 - 0.5 * t[:, 0]))
    p = np.concatenate(pts)
    r = np.concatenate(radii)
    rows = np.rint(p[:, 1] / ctx.mm + (h - 1) / 2).astype(np.int64)
    cols = np.rint(p[:, 0] / ctx.mm + (w - 1) / 2).astype(np.int64)
    ok = (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)
    radius = np.zeros(ctx.shape, dtype=np.float32)
    np.maximum.at(radius, (rows[ok], cols[ok]), r[ok])
    if not (radius > 0).any():
        return np.zeros(ctx.shape, dtype=np.float32)
    dist, (ir, ic) = ndimage.distance_transform_edt(radius == 0, return_indices=True)
    local = radius[ir, ic]
    occ = _sigmoid((local - dist * ctx.mm) / (0.4 * ctx.mm))
    # Thin vessels are only partly in the slice (partial volume): fainter.
    return (occ * np.clip(local / 1.2, 0.0, 1.0)).astype(np.float32)


def _nodule(
    ctx: CTContext, rng: np.random.Generator, label: int
) -> tuple[np.ndarray, np.ndarray, str, float]:
    """Occupancy of the nodule, its HU map, its type and its radius (mm)."""
    d = ctx.difficulty
    irregular = d**-0.8
    # Sizes in mm (diameter); the malignant distribution shifts towards the benign one as
    # difficulty grows.
    if label:
        diameter = rng.uniform(6.0, 18.0) - 1.5 * (d - 1.0)
    else:
        diameter = rng.uniform(5.0, 15.0) + 1.0 * (d - 1.0)
    r0 = float(np.clip(diameter, 3.5, 24.0)) / 2
    cx, cy = rng.normal(0.0, 1.0, 2)
    dx, dy = ctx.x - cx, ctx.y - cy
    rho = np.hypot(dx, dy)
    theta = np.arctan2(dy, dx)
    # Outline r(theta): an ellipse-like second harmonic plus higher ones.
    ecc = rng.uniform(0.0, 0.18)
    radius = 1.0 + ecc * np.cos(2 * (theta - rng.uniform(0, np.pi)))
    spiculated = lobulated = calcified = False
    # Atypical cases, as in real series: some malignant nodules are smooth and some benign
    # ones lobulated (hamartomas, granulomas). Their share, 7% each at difficulty 1,
    # bounds how separable the classes can be however long a model trains.
    atypical = rng.random() < min(0.4, 0.07 * d)
    if label and not atypical:
        kind = rng.random()
        lobulated = kind < 0.65
        spiculated = kind > 0.35
    elif not label:
        lobulated = atypical
        calcified = not atypical and rng.random() < 0.25
    # Outlines are not perfect circles either: weak lobulation, 0.5-3%.
    weak = rng.uniform(0.005, 0.03)
    for k in range(3, 8):
        amp = rng.uniform(0.03, 0.09) * irregular if lobulated and k <= 6 else weak
        radius = radius + amp * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    radius = r0 * radius
    edge = (0.55 if lobulated or spiculated else 0.35) * ctx.mm
    occ = _sigmoid((radius - rho) / edge)
    if spiculated:
        n_spikes = int(rng.integers(4, 12))
        angles = rng.uniform(0, 2 * np.pi, n_spikes)
        lengths = rng.uniform(0.3, 0.9, n_spikes) * r0 * irregular
        widths = rng.uniform(0.35, 0.65, n_spikes)
        dth = (theta[None] - angles[:, None, None] + np.pi) % (2 * np.pi) - np.pi
        along = rho[None] * np.cos(dth) - 0.85 * r0
        perp = rho[None] * np.abs(np.sin(dth))
        frac = np.clip(along / lengths[:, None, None], 0.0, 1.0)
        w = widths[:, None, None] * (1.0 - frac)
        inside = (along > -0.5 * r0) & (along < lengths[:, None, None])
        spikes = (_sigmoid((w - perp) / (0.3 * ctx.mm)) * inside).max(axis=0)
        occ = np.maximum(occ, spikes)
    hu = 35.0 + rng.normal(0.0, 12.0) + 12.0 * smooth_noise(rng, ctx.shape, 1.2)
    if calcified:
        core = _sigmoid((rng.uniform(0.3, 0.6) * r0 - rho) / ctx.mm)
        hu = hu + rng.uniform(300.0, 700.0) * core
    if lobulated or spiculated:
        flags = ((lobulated, "lobulated"), (spiculated, "spiculated"))
        shape = "+".join(name for flag, name in flags if flag)
    elif calcified:
        shape = "calcified"
    else:
        shape = "oval" if ecc > 0.09 else "round"
    lesion_type = f"{'malignant' if label else 'benign'} {shape}"
    return occ.astype(np.float32), hu.astype(np.float32), lesion_type, r0


def _render(
    ctx: CTContext, rng: np.random.Generator, label: int
) -> tuple[np.ndarray, np.ndarray, list, str]:
    rng, lesion_rng, noise_rng = rng.spawn(3)
    # Parenchyma: -850 HU, a gravity gradient (denser posteriorly = lower rows), texture.
    base = -850.0 + rng.normal(0.0, 20.0)
    hu = base + rng.uniform(0.0, 1.2) * ctx.y + 14.0 * smooth_noise(rng, ctx.shape, 1.0)
    vessel = _vessels(ctx, rng)
    hu = hu * (1.0 - vessel) + (40.0 + rng.normal(0.0, 10.0)) * vessel
    occ, nod_hu, lesion_type, r0 = _nodule(ctx, lesion_rng, label)
    # Chest wall at one edge in a fifth of the patches, clear of the nodule.
    chest_wall = np.zeros(ctx.shape, dtype=bool)
    if rng.random() < 0.2:
        angle = rng.uniform(0, 2 * np.pi)
        dist = rng.uniform(r0 + 5.0, FOV_MM / 2 + 2.0)
        s = ctx.x * math.cos(angle) + ctx.y * math.sin(angle) - dist
        s = s + 0.01 * (ctx.x * math.sin(angle) - ctx.y * math.cos(angle)) ** 2  # curved
        wall = _sigmoid(s / (0.5 * ctx.mm))
        fat = _sigmoid((s - 1.5) / (0.5 * ctx.mm))
        tissue = -90.0 * wall * (1.0 - fat) + 45.0 * fat
        hu = hu * (1.0 - wall) + tissue
        chest_wall = wall > 0.5
    hu = hu * (1.0 - occ) + nod_hu * occ
    # CT noise: correlated (reconstruction kernel), 20-35 HU.
    sigma = noise_rng.uniform(20.0, 35.0) * math.sqrt(ctx.difficulty)
    noise = ndimage.gaussian_filter(noise_rng.standard_normal(ctx.shape).astype(np.float32), 0.7)
    hu = hu + noise * (sigma / 0.4)
    mask = occ > 0.5
    box = bbox(mask)
    concepts = {"vessels": (vessel > 0.5) & ~mask, "chest_wall": chest_wall & ~mask}
    return hu.astype(np.float32), mask, [box] if box else [], lesion_type, concepts


def _finish(ctx: CTContext, image: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(image), -1024, 3071).astype(np.int16)


CT_NODULE = PhantomSpec(
    name="ct-nodule",
    spatial_dims=2,
    modality="CT",
    default_n=2500,
    default_size=64,
    min_size=32,
    max_size=512,
    prevalence=0.45,
    ground_truth="mask",
    intensity={"kind": "window", "center": -600, "width": 1500},
    image_suffix=".nii.gz",
    classes=("benign", "malignant"),
    description=(
        "Axial CT lung patches in Hounsfield units (45 x 45 mm, like the LIDC crops of "
        "Katzmann et al. 2021): parenchyma about -850 HU with vessels about +40 HU, sometimes "
        "chest wall; a nodule at the centre, benign (smooth, round or oval, some calcified) "
        "or malignant (lobulated and/or spiculated). Every image has a nodule mask."
    ),
    context=_context,
    render=_render,
    finish=_finish,
    token_values=(1500.0, -1000.0),
    concepts=("vessels", "chest_wall"),
    spacing=lambda size: (FOV_MM / max(size),) * 2,
)
