"""Chest-radiograph phantoms: ``cxr-pneumothorax`` and ``cxr-pneumonia``.

Both share the procedural anatomy of :mod:`trustmap.data.phantoms._anatomy_cxr`.

* **Pneumothorax** (positive): the lung has collapsed towards its hilum over part of its
  outline (apical, apicolateral or lateral, either side). Between the chest wall and the
  collapsed lung's edge lies a lucent rim without vessel markings, bounded on its inner
  side by a thin bright visceral pleural line. The pixel mask is that rim.
* **Pneumonia** (positive): one or two patchy opacities inside the lungs (irregular,
  textured, with fuzzy edges). Ground truth: one RSNA-style box per opacity and the mask.

Difficulty ``d`` (1.0 default, larger is harder) scales lesion size by ``d^-0.6``,
lesion contrast by ``d^-0.5`` and noise by ``d^0.5``. A share ``0.08 d`` of the positives
is subtle (a shallow, faint pneumothorax; a single small faint opacity), as in real
series; it bounds how separable the classes can be however long a model trains.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from trustmap.data.phantoms import _anatomy_cxr as anatomy
from trustmap.data.phantoms._common import PhantomSpec, component_boxes, smooth_noise, splat

__all__ = ["PNEUMONIA", "PNEUMOTHORAX"]

_LOCATIONS = ("apical", "apicolateral", "lateral")


def _context(seed: int, size: tuple[int, int], difficulty: float, template: str | None):
    del seed, template  # the anatomy is drawn per image; nothing is shared but the grid
    return anatomy.make_context(size, difficulty)


def _wrap(angle: np.ndarray) -> np.ndarray:
    return (angle + np.pi) % (2 * np.pi) - np.pi


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest connected part (rasterising two nearly equal outlines leaves slivers)."""
    labelled, n = ndimage.label(mask)
    if n <= 1:
        return mask
    sizes = np.bincount(labelled.ravel())[1:]
    return labelled == (int(np.argmax(sizes)) + 1)


def _resample(points: np.ndarray, step: float) -> tuple[np.ndarray, np.ndarray]:
    """Points every ``step`` along an open polyline, and their position (0..1) along it."""
    seg = np.linalg.norm(np.diff(points, axis=0), axis=1)
    cum = np.concatenate([[0.0], np.cumsum(seg)])
    s = np.arange(0.0, cum[-1], step)
    return np.stack([np.interp(s, cum, points[:, i]) for i in (0, 1)], axis=1), s / cum[-1]


def pneumothorax(
    ctx: anatomy.CXRContext, rng: np.random.Generator, chest: anatomy.Chest
) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """Collapse part of one lung towards its hilum.

    Returns
    -------
    mask, added_density, vessel_keep, lesion_type
        The pneumothorax (bool); the density to add (pleural line minus lucency); the
        factor on the vessel map (0 inside the pneumothorax: no lung markings there).
    """
    side = int(rng.integers(2))
    location = _LOCATIONS[int(rng.choice(3, p=[0.4, 0.3, 0.3]))]
    hilum = anatomy._HILA[side]
    contour = chest.contours[side]
    rel = contour - hilum
    phi = np.arctan2(rel[:, 1], rel[:, 0])
    # The mediastinal border does not move: no collapse within 0.2 of the midline.
    lateral = np.clip((np.abs(contour[:, 0]) - 0.2) / 0.1, 0.0, 1.0)
    # Direction from the hilum, canonical angles (y down): up is -90 degrees.
    target = {"apical": -100.0, "apicolateral": -140.0, "lateral": 180.0}[location]
    if side == 1:
        target = 180.0 - target if location == "lateral" else -180.0 - target
    phi0 = math.radians(target + rng.normal(0.0, 10.0))
    width = math.radians(rng.uniform(30.0, 55.0))
    scale = ctx.difficulty**-0.6
    contrast = ctx.difficulty**-0.5
    # Occult cases (8% at difficulty 1, 0.08 d): a shallow, faint rim.
    subtle = rng.random() < min(0.4, 0.08 * ctx.difficulty)
    if subtle:
        scale, contrast = 0.35 * scale, 0.45 * contrast
    fmax = min(0.6, rng.uniform(0.18, 0.36) * scale)
    min_area = 0.003 * ctx.shape[0] * ctx.shape[1] * min(scale, 1.0)
    for _ in range(8):
        # A bump with compact support: the rest of the outline stays in place.
        f = fmax * lateral * np.clip(1.0 - (_wrap(phi - phi0) / width) ** 2, 0.0, None) ** 2
        collapsed = hilum + (1.0 - f)[:, None] * rel
        inner = anatomy.rasterise(ctx, chest.pose, collapsed)
        mask = _largest_component(chest.lungs[side] & ~inner)
        if mask.sum() >= min_area:
            break
        fmax = min(0.6, fmax * 1.3)
    unit = ctx.px / 64.0
    added = np.zeros(ctx.shape, dtype=np.float32)
    # Visceral pleural line along the collapsed edge, where the gap is visible.
    idx = np.flatnonzero(f > 0.1 * fmax)
    if len(idx) > 1:
        seg = collapsed[idx[0] : idx[-1] + 1]
        strength = np.clip((f[idx[0] : idx[-1] + 1] / fmax - 0.1) / 0.35, 0.0, 1.0)
        pts, s = _resample(seg, 0.35 / ctx.px)
        w = np.interp(s, np.linspace(0, 1, len(strength)), strength)
        rows, cols = anatomy.to_pixels(ctx, chest.pose.forward(pts))
        line = ndimage.gaussian_filter(splat(rows, cols, w, ctx.shape), 0.45 * unit)
        added += rng.uniform(0.12, 0.18) * contrast * line / max(float(line.max()), 1e-6)
    # Pleural air: more lucent than aerated lung.
    soft = ndimage.gaussian_filter(mask.astype(np.float32), 0.4 * unit)
    added -= rng.uniform(0.07, 0.11) * contrast * soft
    lesion_type = f"{'subtle ' if subtle else ''}{location} {'right' if side == 0 else 'left'}"
    return mask, added, (1.0 - soft) * ~mask, lesion_type


def _render_pneumothorax(
    ctx: anatomy.CXRContext, rng: np.random.Generator, label: int
) -> tuple[np.ndarray, np.ndarray, list, str, dict[str, np.ndarray]]:
    # Separate streams for anatomy, lesion and exposure: the same case rendered with
    # either label differs only by the lesion.
    anatomy_rng, lesion_rng, exposure_rng = rng.spawn(3)
    chest = anatomy.render_chest(ctx, anatomy_rng)
    density, vessels = chest.density, chest.vessels
    mask = np.zeros(ctx.shape, dtype=bool)
    lesion_type = ""
    if label:
        mask, added, keep, lesion_type = pneumothorax(ctx, lesion_rng, chest)
        density = density + added
        vessels = vessels * keep
    image = anatomy.expose(ctx, exposure_rng, density + vessels)
    concepts = anatomy.concept_masks(chest)
    return image, mask, component_boxes(mask, min_size=4), lesion_type, concepts


def _render_pneumonia(
    ctx: anatomy.CXRContext, rng: np.random.Generator, label: int
) -> tuple[np.ndarray, np.ndarray, list, str, dict[str, np.ndarray]]:
    anatomy_rng, rng, exposure_rng = rng.spawn(3)
    chest = anatomy.render_chest(ctx, anatomy_rng)
    density = chest.density
    mask = np.zeros(ctx.shape, dtype=bool)
    boxes: list[tuple[int, ...]] = []
    lesion_type = ""
    if label:
        h, w = ctx.shape
        # Faint cases (8% at difficulty 1, 0.08 d): one small, low-contrast opacity.
        subtle = rng.random() < min(0.4, 0.08 * ctx.difficulty)
        count = 1 if subtle else 1 + int(rng.random() < 0.35)
        visible = (chest.lungs[0] | chest.lungs[1]) & (chest.heart < 0.3)
        candidates = np.flatnonzero(visible)
        opacity = np.zeros(ctx.shape, dtype=np.float32)
        scale = ctx.difficulty**-0.6 * (0.6 if subtle else 1.0)
        contrast = ctx.difficulty**-0.5 * (0.4 if subtle else 1.0)
        for _ in range(count):
            for _attempt in range(6):
                r0, c0 = divmod(int(candidates[rng.integers(len(candidates))]), w)
                side = 0 if chest.lungs[0][r0, c0] else 1
                radius = rng.uniform(0.1, 0.19) * ctx.px * scale
                aspect = rng.uniform(1.0, 1.6)
                theta = rng.uniform(0.0, np.pi)
                half = math.ceil(2.6 * radius * aspect)
                r_lo, r_hi = max(0, r0 - half), min(h, r0 + half + 1)
                c_lo, c_hi = max(0, c0 - half), min(w, c0 + half + 1)
                rr, cc = np.mgrid[r_lo:r_hi, c_lo:c_hi].astype(np.float32)
                dr, dc = rr - r0, cc - c0
                u = (math.cos(theta) * dc + math.sin(theta) * dr) / (radius * aspect)
                v = (-math.sin(theta) * dc + math.cos(theta) * dr) / (radius / aspect)
                env = np.exp(-0.5 * (u * u + v * v))
                tex = smooth_noise(rng, env.shape, max(0.8, 0.2 * radius))
                field = env * (1.0 + 0.5 * tex)
                lung = chest.lungs[side][r_lo:r_hi, c_lo:c_hi]
                part = (field > 0.45) & lung
                if part.sum() >= max(6, 0.15 * radius * radius):
                    break
            if not part.any():
                # Small images: keep the densest part of the opacity inside the lung (the
                # centre is a lung pixel, so this is never empty).
                part = lung & (field >= 0.8 * field[lung].max())
            fine = smooth_noise(rng, env.shape, 0.7)
            fuzzy = np.clip((field - 0.2) / 0.5, 0.0, 1.0) * (0.8 + 0.2 * fine)
            soft_lung = chest.lung_soft[r_lo:r_hi, c_lo:c_hi]
            opacity[r_lo:r_hi, c_lo:c_hi] = np.maximum(
                opacity[r_lo:r_hi, c_lo:c_hi], fuzzy * soft_lung
            )
            full = np.zeros(ctx.shape, dtype=bool)
            full[r_lo:r_hi, c_lo:c_hi] = part
            mask |= full
            box = component_boxes(full)
            if box:
                # One box per opacity, around all of its pieces.
                xs = [b[0] for b in box] + [b[0] + b[2] for b in box]
                ys = [b[1] for b in box] + [b[1] + b[3] for b in box]
                boxes.append((min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)))
        density = density + rng.uniform(0.24, 0.34) * contrast * opacity
        lesion_type = ("subtle " if subtle else "") + ("multifocal" if len(boxes) > 1 else "focal")
    image = anatomy.expose(ctx, exposure_rng, density + chest.vessels)
    return image, mask, boxes, lesion_type, anatomy.concept_masks(chest)


def _finish(ctx: anatomy.CXRContext, image: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)


_COMMON = {
    "spatial_dims": 2,
    "modality": "CR",
    "default_n": 2500,
    "default_size": 128,
    "min_size": 48,
    "max_size": 2048,
    "intensity": {"kind": "range", "min": 0, "max": 255},
    "image_suffix": ".png",
    "context": _context,
    "finish": _finish,
    "token_values": (0.95, 0.08),
    "concepts": ("lung_fields", "heart", "ribs", "body_outline"),
}

PNEUMOTHORAX = PhantomSpec(
    name="cxr-pneumothorax",
    prevalence=0.4,
    ground_truth="mask",
    classes=("negative", "positive"),
    description=(
        "Procedural PA chest radiographs (body outline, lungs with branching vessel markings, "
        "heart, mediastinum, spine, trachea, posterior and anterior ribs, clavicles, diaphragm "
        "domes, gastric bubble; exposure, pose and noise vary). Positives carry a "
        "pneumothorax: a lucent rim without vessel markings at the apex or lateral lung edge, "
        "bounded by a thin visceral pleural line. Mask = the pneumothorax."
    ),
    render=_render_pneumothorax,
    **_COMMON,  # type: ignore[arg-type]
)

PNEUMONIA = PhantomSpec(
    name="cxr-pneumonia",
    prevalence=0.4,
    ground_truth="mask+boxes",
    classes=("negative", "positive"),
    description=(
        "The chest radiographs of cxr-pneumothorax; positives carry one or two patchy, "
        "textured opacities with fuzzy edges inside the lungs. Ground truth: one RSNA-style "
        "box per opacity (boxes.csv) and the opacity mask."
    ),
    render=_render_pneumonia,
    **_COMMON,  # type: ignore[arg-type]
)
