"""Procedural chest-radiograph anatomy (PA view), shared by the two CXR phantoms.

The image is built as an attenuation ("density") map and exposed at the end:
``I = 1 - exp(-k D)``, then gamma, contrast, brightness, detector blur and noise. Bright
means attenuating (bone, soft tissue), dark means air (lungs, outside the body), as on a
radiograph.

Coordinates: canonical ``(X, Y)`` in ``[-1, 1]``, ``X`` to the image right (the patient's
left in a PA view), ``Y`` down. A per-image pose (rotation, scale, shift) maps canonical
coordinates to the image, so patient rotation and size vary; analytic parts are evaluated
on the pose's inverse-mapped pixel grid and polygons/points are mapped forward, so every
mask is exact in pixel space.

Parts: body silhouette (neck, shoulders, torso), two lungs (polygons from control points,
corner-cut), heart and aortic knob, mediastinum, spine with vertebral bodies, trachea and
main bronchi, posterior and anterior ribs, clavicles, diaphragm domes (the lung bases),
gastric bubble, and branching pulmonary vessels that thin and fade towards the periphery.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from trustmap.data.phantoms._common import chaikin, fill_polygon, splat

# Lung control points (canonical X, Y), clockwise on the image, starting at the apex.
# Right lung = image left. The left lung's medial border follows the heart's left border.
_RIGHT_LUNG = np.array(
    [
        (-0.30, -0.80),
        (-0.43, -0.74),
        (-0.56, -0.58),
        (-0.67, -0.34),
        (-0.74, -0.04),
        (-0.78, 0.26),
        (-0.81, 0.50),  # costophrenic angle
        (-0.68, 0.42),
        (-0.55, 0.33),
        (-0.41, 0.28),
        (-0.28, 0.30),
        (-0.18, 0.37),  # cardiophrenic angle
        (-0.14, 0.16),
        (-0.12, -0.10),
        (-0.12, -0.40),
        (-0.18, -0.68),
    ]
)
_LEFT_LUNG = np.array(
    [
        (0.30, -0.79),
        (0.43, -0.73),
        (0.56, -0.57),
        (0.67, -0.32),
        (0.74, -0.01),
        (0.78, 0.30),
        (0.81, 0.56),  # costophrenic angle
        (0.69, 0.50),
        (0.57, 0.45),
        (0.47, 0.42),
        (0.40, 0.34),
        (0.33, 0.17),
        (0.24, -0.03),
        (0.15, -0.18),
        (0.12, -0.42),
        (0.18, -0.67),
    ]
)
_HILA = np.array([(-0.19, -0.08), (0.19, -0.12)])
# Indices of the diaphragm points (they move with inspiration depth).
_BASE_POINTS = slice(5, 12)


@dataclass(frozen=True)
class CXRContext:
    """Per-run constants: output shape and the pixel-centre grid in normalised units."""

    shape: tuple[int, int]
    difficulty: float
    xn: np.ndarray  # (H, W) normalised column coordinate of pixel centres, in [-1, 1]
    yn: np.ndarray  # (H, W) normalised row coordinate
    px: float  # pixels per normalised unit (mean of the two axes)


def make_context(shape: tuple[int, int], difficulty: float) -> CXRContext:
    h, w = shape
    yn, xn = np.meshgrid(
        (np.arange(h, dtype=np.float32) + 0.5) / h * 2 - 1,
        (np.arange(w, dtype=np.float32) + 0.5) / w * 2 - 1,
        indexing="ij",
    )
    return CXRContext(shape=shape, difficulty=difficulty, xn=xn, yn=yn, px=(h + w) / 4.0)


@dataclass(frozen=True)
class Pose:
    """Canonical -> normalised image coordinates: ``p = s R c + t``."""

    angle: float
    scale: float
    shift: tuple[float, float]

    def forward(self, pts: np.ndarray) -> np.ndarray:
        c, s = math.cos(self.angle), math.sin(self.angle)
        x, y = pts[..., 0], pts[..., 1]
        return np.stack(
            [
                self.scale * (c * x - s * y) + self.shift[0],
                self.scale * (s * x + c * y) + self.shift[1],
            ],
            axis=-1,
        )

    def inverse_grid(self, ctx: CXRContext) -> tuple[np.ndarray, np.ndarray]:
        c, s = math.cos(self.angle), math.sin(self.angle)
        u = (ctx.xn - self.shift[0]) / self.scale
        v = (ctx.yn - self.shift[1]) / self.scale
        return (c * u + s * v).astype(np.float32), (-s * u + c * v).astype(np.float32)


def to_pixels(ctx: CXRContext, norm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Normalised ``(..., 2)`` (x, y) -> (rows, cols) in pixel units (centres at integers)."""
    h, w = ctx.shape
    return (norm[..., 1] + 1) * h / 2 - 0.5, (norm[..., 0] + 1) * w / 2 - 0.5


@dataclass
class Chest:
    """One rendered chest, before lesions and exposure."""

    density: np.ndarray  # float32 (H, W), without vessels
    vessels: np.ndarray  # float32 (H, W), vessel density (already confined to the lungs)
    lungs: tuple[np.ndarray, np.ndarray]  # bool masks: right (image left), left
    lung_soft: np.ndarray  # float32, blurred union of the lungs
    contours: tuple[np.ndarray, np.ndarray]  # canonical (N, 2) lung contours
    heart: np.ndarray  # float32 soft heart silhouette
    pose: Pose
    x: np.ndarray  # canonical X of each pixel
    y: np.ndarray  # canonical Y of each pixel
    ribs: np.ndarray | None = None  # float32 rib profile (about 1 on a rib's shaft)
    body: np.ndarray | None = None  # bool: inside the body outline


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def _smoothstep(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    t = np.clip((x - lo) / (hi - lo), 0.0, 1.0)
    return t * t * (3 - 2 * t)


def random_pose(rng: np.random.Generator) -> Pose:
    return Pose(
        angle=math.radians(rng.uniform(-4.0, 4.0)),
        scale=rng.uniform(0.92, 1.04),
        shift=(rng.uniform(-0.04, 0.04), rng.uniform(-0.03, 0.05)),
    )


def lung_contours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Per-image lung outlines (canonical), jittered, with a shared inspiration depth."""
    inspiration = rng.uniform(-0.06, 0.06)
    width = rng.uniform(0.95, 1.05)
    out = []
    for base in (_RIGHT_LUNG, _LEFT_LUNG):
        pts = base + rng.normal(0.0, 0.012, size=base.shape)
        pts[:, 0] *= width
        pts[_BASE_POINTS, 1] += inspiration + rng.normal(0.0, 0.015)
        out.append(chaikin(pts, 3))
    return out[0], out[1]


def rasterise(ctx: CXRContext, pose: Pose, contour: np.ndarray) -> np.ndarray:
    rows, cols = to_pixels(ctx, pose.forward(contour))
    return fill_polygon(rows, cols, ctx.shape)


def _rib_profile(d: np.ndarray) -> np.ndarray:
    """Cross-section of a rib, ``d`` in half-thicknesses: flat-topped with bright cortices."""
    d2 = d * d
    return np.exp(-(d2 * d2 * d2)) + 0.45 * np.exp(-((np.abs(d) - 0.85) ** 2) * 33.0)


def _ribs(rng: np.random.Generator, x: np.ndarray, y: np.ndarray, spine_x: float) -> np.ndarray:
    """Ten posterior ribs per side and the anterior ribs, as a float32 density map.

    Ribs do not overlap, so each pixel only sees its nearest rib: its fractional rib
    index is solved from the rib curves ``y = y0 + k s + slope a + curve_k a^2``
    (a = distance from the spine), which costs a few whole-image operations instead of
    one per rib.
    """
    n = 10
    a = np.abs(x - spine_x) - 0.05
    y_top = rng.uniform(-0.84, -0.78)
    spacing = rng.uniform(0.112, 0.124)
    slope = -0.25
    thick = np.float32(rng.uniform(0.9, 1.1))
    bend = rng.uniform(0.62, 0.72)
    # Upper ribs are shorter and more curved; the fractional index is refined twice
    # because the curvature depends on it.
    k = (y - y_top - slope * a - bend * a * a) / spacing
    for _ in range(2):
        curve = bend + 0.5 * np.clip(2.0 - k, 0.0, 2.0) / 2.0
        k = (y - y_top - slope * a - curve * a * a) / spacing
    kr = np.clip(np.rint(k), 0, n - 1)
    curve = bend + 0.5 * np.clip(2.0 - kr, 0.0, 2.0) / 2.0
    yc = y_top + kr * spacing + slope * a + curve * a * a
    half = (0.019 + 0.0018 * kr) * thick
    a_hi = np.minimum(0.86, 0.5 + 0.12 * kr)
    along = _smoothstep(a, 0.0, 0.06) * (1.0 - _smoothstep(a - a_hi, -0.08, 0.0))
    ribs = _rib_profile((y - yc) / half) * along
    # Anterior ribs (from rib 2 on): from each posterior rib's lateral end (a = 0.83),
    # medially and downwards; fainter, as costal cartilage does not show.
    a0 = 0.83
    lat0 = y_top + slope * a0 + bend * a0 * a0
    da = a - a0
    ka = (y - lat0 - (-0.38 * da - 0.1 * da * da)) / spacing
    kra = np.clip(np.rint(ka), 2, n - 1)
    ya = lat0 + kra * spacing - 0.38 * da - 0.1 * da * da
    along_a = _smoothstep(a, 0.28, 0.36) * (1.0 - _smoothstep(a, 0.8, 0.86))
    ribs += 0.45 * _rib_profile((y - ya) / (0.9 * (0.019 + 0.0018 * kra) * thick)) * along_a
    return ribs.astype(np.float32)


def _clavicles(rng: np.random.Generator, x: np.ndarray, y: np.ndarray, spine_x: float):
    """Both clavicles: from the sternal ends up and out to the shoulders, gently S-shaped."""
    a = np.abs(x - spine_x) - 0.04
    y0 = -0.63 + rng.normal(0.0, 0.015)
    yc = y0 - 0.36 * a + 0.12 * a * a + 0.02 * np.sin(2 * np.pi * a / 0.6)
    along = _smoothstep(a, 0.0, 0.06) * (1.0 - _smoothstep(a, 0.54, 0.62))
    return (_rib_profile((y - yc) / 0.026) * along).astype(np.float32)


def _vessel_tree(
    rng: np.random.Generator, hilum: np.ndarray, lateral: float
) -> tuple[np.ndarray, np.ndarray]:
    """Points (canonical, (N, 2)) and weights of one lung's vessel tree.

    Trunks fan out from the hilum; each generation splits every branch in two at
    +-(18-32) degrees, 0.72-0.86 times shorter and 0.68 times thinner. Weights fall with generation
    and with distance from the hilum, so markings fade towards the periphery.
    """
    n_trunks = int(rng.integers(5, 7))
    # Directions from downwards (90 deg) through lateral to upwards, in canonical angles.
    base = np.linspace(100.0, 255.0, n_trunks) + rng.normal(0.0, 8.0, n_trunks)
    ang = np.radians(base if lateral < 0 else 180.0 - base)
    start = np.repeat(hilum[None], n_trunks, axis=0)
    length = rng.uniform(0.15, 0.2, n_trunks)
    width = np.ones(n_trunks)
    pts, wts = [], []
    for gen in range(6):
        end = start + length[:, None] * np.stack([np.cos(ang), np.sin(ang)], axis=1)
        n_samples = 12
        t = np.linspace(0.0, 1.0, n_samples, endpoint=False)
        seg = start[:, None] + t[None, :, None] * (end - start)[:, None]
        pts.append(seg.reshape(-1, 2))
        wts.append(np.repeat(width, n_samples) * (length[:, None] / n_samples).repeat(n_samples))
        # Children: two per branch, rotated apart.
        spread = np.radians(rng.uniform(18.0, 32.0, len(ang)))
        jitter = np.radians(rng.normal(0.0, 8.0, (2, len(ang))))
        ang = np.concatenate([ang - spread + jitter[0], ang + spread + jitter[1]])
        start = np.concatenate([end, end])
        length = np.concatenate([length, length]) * rng.uniform(0.72, 0.86, 2 * len(length))
        width = np.concatenate([width, width]) * 0.68
        del gen
    p = np.concatenate(pts)
    w = np.concatenate(wts)
    dist = np.linalg.norm(p - hilum, axis=1)
    w = w * np.exp(-((dist / 0.75) ** 2))
    return p, w


def render_chest(ctx: CXRContext, rng: np.random.Generator) -> Chest:
    """Render the normal anatomy of one chest (no lesion, not yet exposed)."""
    pose = random_pose(rng)
    x, y = pose.inverse_grid(ctx)
    px = ctx.px
    unit = px / 64.0  # blur widths are given for a 128-pixel image
    spine_x = float(rng.normal(0.0, 0.01))

    # Body: neck, shoulders, torso; thicker (brighter) in the middle, a sharp skin line.
    body_w = float(rng.uniform(0.9, 1.02))
    hw = body_w * (0.2 + 0.72 * _sigmoid((y + 0.8) / 0.045) - 0.05 * np.clip(y - 0.3, 0, 1))
    inside = np.clip(1.0 - ((x - spine_x) / hw) ** 2, 0.0, 1.0)
    density = 0.62 * (0.6 + 0.4 * np.sqrt(inside)) * _smoothstep(inside, 0.0, 0.05)

    # Lungs: dark, most where they are deepest; less at the bases and apices, where
    # soft tissue overlies them.
    contours = lung_contours(rng)
    lungs = tuple(rasterise(ctx, pose, c) for c in contours)
    lung_union = (lungs[0] | lungs[1]).astype(np.float32)
    lung_soft = ndimage.gaussian_filter(lung_union, 0.6 * unit)
    air = ndimage.gaussian_filter(lung_union, 2.5 * unit, truncate=3.0)
    air *= 1.0 - 0.3 * _smoothstep(y, 0.05, 0.55) - 0.25 * _smoothstep(-y, 0.55, 0.85)
    density -= float(rng.uniform(0.42, 0.5)) * air

    # Mediastinum and spine with vertebral bodies.
    mediastinum = _sigmoid((0.12 - np.abs(x - spine_x)) / 0.02) * _sigmoid((0.5 - y) / 0.05)
    density += 0.22 * mediastinum
    phase = float(rng.uniform(0.0, 0.12))
    vertebrae = 0.7 + 0.3 * np.cos(np.pi * (y - phase) / 0.118) ** 2
    density += 0.1 * _sigmoid((0.06 - np.abs(x - spine_x)) / 0.012) * vertebrae

    # Heart (apex down and to the image right) and aortic knob.
    hx, hy = 0.1 + float(rng.normal(0.0, 0.02)), 0.22 + float(rng.normal(0.0, 0.02))
    ha = math.radians(float(rng.uniform(-25.0, -12.0)))
    ax, ay = float(rng.uniform(0.3, 0.35)), float(rng.uniform(0.21, 0.25))
    dx, dy = x - hx, y - hy
    u = (math.cos(ha) * dx + math.sin(ha) * dy) / ax
    v = (-math.sin(ha) * dx + math.cos(ha) * dy) / ay
    heart = _sigmoid((1.0 - np.sqrt(u * u + v * v)) / 0.1)
    density += 0.2 * heart
    knob = _sigmoid((0.065 - np.hypot(x - 0.13 - spine_x, y + 0.4)) / 0.015)
    density += 0.12 * knob

    # Trachea and main bronchi (air: darker).
    carina = np.array([spine_x, -0.28 + float(rng.normal(0.0, 0.02))])
    trachea = _sigmoid((0.028 - np.abs(x - spine_x)) / 0.006) * _sigmoid(
        (float(carina[1]) - y) / 0.01
    )
    density -= 0.1 * trachea
    t = np.linspace(0.0, 1.0, 24)[:, None]
    bronchi = np.concatenate([carina + t * (hilum - carina) for hilum in _HILA])
    br, bc = to_pixels(ctx, pose.forward(bronchi))
    bronchus = splat(br, bc, np.full(len(br), 1.0 / unit), ctx.shape)
    density -= 0.1 * ndimage.gaussian_filter(bronchus, 1.2 * unit)

    # Ribs and clavicles (bone: brighter), within the body.
    ribs = _ribs(rng, x, y, spine_x)
    bone = 0.065 * ribs + 0.13 * _clavicles(rng, x, y, spine_x)
    density += bone * (inside > 0)

    # Gastric bubble under the left dome.
    gx, gy = 0.45 + float(rng.normal(0.0, 0.02)), 0.66 + float(rng.normal(0.0, 0.02))
    bubble = _sigmoid((1.0 - np.hypot((x - gx) / 0.11, (y - gy) / 0.05)) / 0.1)
    density -= 0.15 * bubble * _sigmoid((y - gy + 0.01) / 0.01) * (1.0 - lung_soft)

    # Pulmonary vessels, confined to the lungs.
    vessel = np.zeros(ctx.shape, dtype=np.float32)
    for side, hilum in enumerate(_HILA):
        pts, wts = _vessel_tree(rng, hilum + rng.normal(0.0, 0.015, 2), lateral=side - 0.5)
        rows, cols = to_pixels(ctx, pose.forward(pts))
        # x unit: the blur below spreads a line over more pixels in a larger image.
        vessel += splat(rows, cols, wts * px * unit, ctx.shape)
    vessel = ndimage.gaussian_filter(vessel, 0.8 * unit)
    vessel = 0.36 * np.tanh(vessel * 0.9) * lung_soft

    return Chest(
        density=density.astype(np.float32),
        vessels=vessel.astype(np.float32),
        lungs=lungs,  # type: ignore[arg-type]
        lung_soft=lung_soft,
        contours=contours,
        heart=heart.astype(np.float32),
        pose=pose,
        x=x,
        y=y,
        ribs=ribs * (inside > 0),
        body=inside > 0,
    )


def concept_masks(chest: Chest) -> dict[str, np.ndarray]:
    """The anatomical concepts of a chest as bool masks (drawing nothing from any RNG).

    ``lung_fields``: both lungs; ``heart``: the cardiac silhouette (soft outline above
    one half); ``ribs``: posterior and anterior rib shafts (profile above 0.3, about the
    visible bone); ``body_outline``: the area inside the body outline (the skin line).
    """
    assert chest.ribs is not None and chest.body is not None
    return {
        "lung_fields": chest.lungs[0] | chest.lungs[1],
        "heart": (chest.heart > 0.5) & chest.body,
        "ribs": chest.ribs > 0.3,
        "body_outline": chest.body.copy(),
    }


def expose(ctx: CXRContext, rng: np.random.Generator, density: np.ndarray) -> np.ndarray:
    """Film/detector response, exposure variation, blur and noise -> float image in [0, 1]."""
    k = rng.uniform(1.3, 1.7)
    img = 1.0 - np.exp(-k * np.clip(density, 0.0, None))
    img = img / (1.0 - math.exp(-k))
    gamma = rng.uniform(0.8, 1.25)
    img = np.clip(img, 0.0, 1.0) ** gamma
    # Heel effect / uneven exposure: a gentle linear ramp.
    ramp = rng.normal(0.0, 0.04) * ctx.xn + rng.normal(0.0, 0.03) * ctx.yn
    img = img * rng.uniform(0.85, 1.05) + rng.uniform(-0.04, 0.06) + ramp
    img = ndimage.gaussian_filter(img.astype(np.float32), 0.45 * ctx.px / 64.0)
    sigma = rng.uniform(0.012, 0.024) * math.sqrt(ctx.difficulty)
    img = img + rng.standard_normal(ctx.shape, dtype=np.float32) * sigma
    return np.clip(img, 0.0, 1.0)
