"""``mri-brain-3d``: FLAIR-like brain MRI volumes with or without a lesion.

Template
--------
``template="mni152"`` uses the MNI152 (2009c, symmetric) T1 template, grey- and
white-matter maps that nilearn ships as package data (``nilearn.datasets.load_mni152_*``
read files inside the package, no network). The T1 contrast is remapped to a FLAIR-like
one (CSF dark, grey matter brighter than white matter) and a CSF rim, skull and scalp are
added around the brain. ``template="procedural"`` builds a head from ellipsoids: scalp,
skull, CSF, cortex with a seeded folding pattern, white matter, lateral and third
ventricles, interhemispheric fissure, deep grey nuclei, cerebellum and brainstem.
``template="auto"`` uses MNI152 when nilearn is importable, else the procedural head.
The template is built once per run; each subject is a random affine (rotation, scale,
shift) plus a smooth random deformation of it, with a multiplicative bias field and Rician
noise.

Lesions (label 1; the mask is the whole lesion)
------------------------------------------------
* tumour-like: an irregular mass with a bright (enhancing) rim, a dark necrotic core and
  hyperintense perilesional edema that spreads preferentially in white matter;
* MS-like: three to eight small ovoid hyperintensities next to the lateral ventricles,
  their long axes perpendicular to the ventricular wall.

Volumes are ``(D, H, W)`` = (axial slice, row, column), displayed radiologically (row 0
anterior, column 0 the patient's right), 192 mm field of view per axis (3 mm voxels at
64^3), stored as int16 (intensity x 1000); background outside the head is exactly 0, so
the loader's z-score over non-zero voxels is over the head (and token, if any).

Difficulty ``d`` scales lesion size by ``d^-0.6``, lesion contrast by ``d^-0.5`` and noise
by ``d^0.5``; a share ``0.08 d`` of the positives is subtle (one or two small, faint MS-like
lesions).
"""

from __future__ import annotations

import functools
import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from trustmap.data.phantoms._common import (
    BASE,
    PhantomSpec,
    component_boxes,
    cosine_field,
    smooth_noise,
    stream,
)

__all__ = ["FOV_MM", "MRI_BRAIN", "TEMPLATES", "resolve_template"]

FOV_MM = 192.0
TEMPLATES = ("auto", "mni152", "procedural")

# FLAIR-like intensities (arbitrary units, white matter about 0.55).
_CSF, _BONE, _SCALP, _GM, _WM, _DEEP = 0.06, 0.04, 0.5, 0.72, 0.55, 0.66


@dataclass(frozen=True)
class Template:
    kind: str
    image: np.ndarray  # float32 (D, H, W), 0 outside the head
    brain: np.ndarray  # bool
    wm: np.ndarray  # float32 white-matter probability
    ventricle_dist: np.ndarray  # float32, voxels to the nearest ventricle voxel
    tumour_sites: np.ndarray  # flat indices of possible tumour centres
    ms_sites: np.ndarray  # flat indices of possible MS lesion centres


@dataclass(frozen=True)
class MRIContext:
    shape: tuple[int, int, int]
    difficulty: float
    template: Template
    grid: np.ndarray  # float32 (3, D, H, W) voxel indices relative to the centre
    vox: float  # voxels per 64-voxel unit (lesion sizes are given for 64^3)


def nilearn_available() -> bool:
    return importlib.util.find_spec("nilearn") is not None


def resolve_template(template: str | None) -> str:
    """``auto`` -> ``mni152`` when nilearn is importable, else ``procedural``."""
    key = "auto" if template is None else str(template).lower()
    if key not in TEMPLATES:
        raise ValueError(f"template must be one of {TEMPLATES}, got {template!r}")
    if key == "auto":
        return "mni152" if nilearn_available() else "procedural"
    if key == "mni152" and not nilearn_available():
        raise ValueError(
            "template='mni152' needs nilearn (pip install nilearn); use template='procedural' "
            "or 'auto'"
        )
    return key


def _mm_grid(shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Physical coordinates (mm) of every voxel: X (patient's left = +col... see below)."""
    d, h, w = shape
    z = (np.arange(d, dtype=np.float32) - (d - 1) / 2) * (FOV_MM / d)
    # Row 0 anterior: Y (anterior positive) decreases down the rows.
    y = -(np.arange(h, dtype=np.float32) - (h - 1) / 2) * (FOV_MM / h)
    # Column 0 the patient's right: X (RAS, right positive) decreases along the columns.
    x = -(np.arange(w, dtype=np.float32) - (w - 1) / 2) * (FOV_MM / w)
    return np.meshgrid(z, y, x, indexing="ij")


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def _ellipsoid(z, y, x, centre, axes) -> np.ndarray:
    return (
        ((z - centre[0]) / axes[0]) ** 2
        + ((y - centre[1]) / axes[1]) ** 2
        + ((x - centre[2]) / axes[2]) ** 2
    )


def _finish_template(
    kind: str,
    image: np.ndarray,
    brain: np.ndarray,
    wm: np.ndarray,
    ventricles: np.ndarray,
) -> Template:
    vdist = ndimage.distance_transform_edt(~ventricles).astype(np.float32)
    inner = ndimage.distance_transform_edt(brain)
    scale = image.shape[0] / 64.0
    tumour = brain & (inner > 7 * scale) & (wm > 0.3)
    ms = brain & (vdist >= 1.0 * scale) & (vdist <= 3.5 * scale) & (wm > 0.5)
    # Very small volumes may have no such voxels; fall back to any deep white matter.
    if not tumour.any():
        tumour = brain & (inner >= inner.max() / 2)
    if not ms.any():
        ms = tumour
    return Template(
        kind=kind,
        image=image.astype(np.float32),
        brain=brain,
        wm=wm.astype(np.float32),
        ventricle_dist=vdist,
        tumour_sites=np.flatnonzero(tumour),
        ms_sites=np.flatnonzero(ms),
    )


def _procedural(shape: tuple[int, int, int], seed: int) -> Template:
    z, y, x = _mm_grid(shape)
    rng = stream(seed, BASE, 3)
    head = _ellipsoid(z, y, x, (-6.0, -4.0, 0.0), (84.0, 92.0, 74.0)) ** 0.5
    cut = _sigmoid((z + 52.0) / 3.0)  # the brain stops above the skull base
    brain_r = 0.84
    # Folding: a smooth noise field moves the grey/white boundary and opens sulci.
    fold = smooth_noise(rng, shape, 1.6 * shape[0] / 64.0)
    image = np.zeros(shape, dtype=np.float32)
    image[head < 1.0] = _SCALP
    image[head < 0.94] = _BONE
    image[head < 0.87] = _CSF
    neck = (head < 0.87) & (cut < 0.5)
    image[neck] = 0.35
    brain = (head < brain_r) & (cut >= 0.5)
    wm_edge = 0.75 - 0.04 * fold
    wm = _sigmoid((wm_edge - head) / 0.012) * brain
    image[brain] = _GM
    image = np.where(brain, _GM + (_WM - _GM) * wm, image)
    sulci = brain & (fold > 1.3) & (head > 0.78)
    # The falx: between the hemispheres, above the corpus callosum and at the poles.
    fissure = brain & (np.abs(x) < 1.6) & (z > -20.0) & ((head > 0.5) | (z > 22.0))
    image[sulci | fissure] = _CSF
    # Deep grey nuclei (thalami, basal ganglia), cerebellum and brainstem.
    deep = np.zeros(shape, dtype=bool)
    for side in (-1.0, 1.0):
        deep |= _ellipsoid(z, y, x, (2.0, -8.0, 10.0 * side), (8.0, 12.0, 8.0)) < 1
        deep |= _ellipsoid(z, y, x, (5.0, 8.0, 20.0 * side), (9.0, 14.0, 6.0)) < 1
    deep &= brain
    image[deep] = _DEEP
    cerebellum = brain & (_ellipsoid(z, y, x, (-38.0, -55.0, 0.0), (22.0, 28.0, 48.0)) < 1)
    folia = 0.06 * np.sin(z * 1.2 + 0.3 * y)
    image = np.where(cerebellum, 0.66 + folia, image)
    stem = brain & (np.hypot(y + 20.0, x) < 12.0) & (z < -10.0)
    image[stem] = _WM
    wm = np.where(deep | cerebellum | sulci | fissure, 0.0, wm)
    wm = np.where(stem, 1.0, wm)
    # Lateral ventricles (curved, frontal to occipital horns) and the third ventricle.
    ventricles = np.zeros(shape, dtype=bool)
    for side in (-1.0, 1.0):
        zc = 12.0 - 0.008 * y**2
        width = 4.0 + 2.0 * _sigmoid((y - 10.0) / 5.0)
        ventricles |= (
            ((z - zc) / 6.0) ** 2 + ((y + 2.0) / 30.0) ** 2 + ((x - 9.0 * side) / width) ** 2
        ) < 1
    ventricles |= (np.abs(x) < 1.6) & (np.abs(y + 2.0) < 10.0) & (z > -10.0) & (z < 8.0)
    ventricles &= brain
    image[ventricles] = _CSF
    wm = np.where(ventricles, 0.0, wm)
    return _finish_template("procedural", image, brain & (image > 0.3), wm, ventricles)


_MNI_FILES = {
    "t1": ("mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz", "load_mni152_template"),
    "gm": ("mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz", "load_mni152_gm_template"),
    "wm": ("mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz", "load_mni152_wm_template"),
}


def _mni_volume(key: str) -> tuple[np.ndarray, np.ndarray]:
    """One of nilearn's bundled 1 mm MNI152 volumes, scaled to [0, 1], and its affine.

    The file is read straight from nilearn's package data with nibabel, which is what
    ``nilearn.datasets.load_mni152_*(resolution=1)`` does, without importing nilearn
    (over a second); the API is the fallback if the file has moved.
    """
    import nibabel as nib

    filename, loader = _MNI_FILES[key]
    spec = importlib.util.find_spec("nilearn")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for base in locations:
        path = Path(base) / "datasets" / "data" / filename
        if path.is_file():
            img = nib.load(path)
            break
    else:
        from nilearn import datasets

        img = getattr(datasets, loader)(resolution=1)
    data = np.asarray(img.dataobj, dtype=np.float32)
    return data / max(float(data.max()), 1e-6), np.asarray(img.affine, dtype=np.float64)


def _mni152(shape: tuple[int, int, int]) -> Template:
    volumes = {}
    for key in _MNI_FILES:
        data, affine = _mni_volume(key)
        # 2 x 2 x 2 block means: the 1 mm volume is sampled at about 3 mm below, and
        # averaging first avoids aliasing.
        even = tuple(s - s % 2 for s in data.shape)
        data = data[: even[0], : even[1], : even[2]]
        data = data.reshape(even[0] // 2, 2, even[1] // 2, 2, even[2] // 2, 2).mean(axis=(1, 3, 5))
        affine = affine @ np.diag([2.0, 2.0, 2.0, 1.0])
        affine[:3, 3] += affine[:3, :3] @ np.full(3, 0.25)  # centre of each 2 x 2 x 2 block
        volumes[key] = (data, affine)
    t1, affine = volumes["t1"]
    inv = np.linalg.inv(affine)
    z, y, x = _mm_grid(shape)
    # Centre the brain's bounding box in the field of view.
    idx = np.argwhere(t1 > 0.05)
    lo, hi = idx.min(axis=0), idx.max(axis=0)
    centre = affine[:3, :3] @ ((lo + hi) / 2) + affine[:3, 3]
    world = np.stack([x + centre[0], y + centre[1], z + centre[2]])
    ijk = np.tensordot(inv[:3, :3], world, axes=1) + inv[:3, 3, None, None, None]

    def sample(vol: np.ndarray) -> np.ndarray:
        return ndimage.map_coordinates(vol, ijk, order=1, mode="constant", cval=0.0)

    t1, gm, wm = sample(t1), sample(volumes["gm"][0]), sample(volumes["wm"][0])
    brain = ndimage.binary_fill_holes(t1 > 0.08)
    flair = np.interp(
        t1, [0.0, 0.3, 0.5, 0.62, 0.75, 0.88, 1.0], [0.03, 0.08, 0.55, 0.72, 0.62, 0.55, 0.53]
    ).astype(np.float32)
    outside = ndimage.distance_transform_edt(~brain, sampling=FOV_MM / shape[0])
    image = np.zeros(shape, dtype=np.float32)
    image[outside < 15.0] = _SCALP
    image[outside < 9.0] = _BONE
    image[outside < 3.0] = _CSF
    image = np.where(brain, flair, image)
    # Ventricles: the CSF near the centre of the brain.
    central = (np.abs(x) < 25.0) & (np.abs(y + 10.0) < 45.0) & (z > -5.0) & (z < 32.0)
    csf = brain & (t1 < 0.35) & central
    labelled, n = ndimage.label(csf)
    if n:
        sizes = ndimage.sum_labels(csf, labelled, index=np.arange(1, n + 1))
        keep = np.flatnonzero(sizes >= max(4.0, 0.2 * sizes.max())) + 1
        csf = np.isin(labelled, keep)
    wm = np.where(brain, wm / np.maximum(wm + gm, 0.3), 0.0)
    return _finish_template("mni152", image, brain, wm, csf)


@functools.lru_cache(maxsize=4)
def build_template(kind: str, shape: tuple[int, int, int], seed: int) -> Template:
    """The template of a run (cached: every case of a run shares it)."""
    return _mni152(shape) if kind == "mni152" else _procedural(shape, seed)


def _context(seed: int, size: tuple[int, int, int], difficulty: float, template: str | None):
    kind = resolve_template(template)
    grid = np.indices(size, dtype=np.float32)
    centre = (np.array(size, dtype=np.float32) - 1) / 2
    grid -= centre[:, None, None, None]
    return MRIContext(
        shape=size,
        difficulty=difficulty,
        template=build_template(kind, size, seed),
        grid=grid,
        vox=size[0] / 64.0,
    )


def _local_box(shape, centre, half):
    lo = [max(0, int(c) - half) for c in centre]
    hi = [min(s, int(c) + half + 1) for c, s in zip(centre, shape)]
    sl = tuple(slice(a, b) for a, b in zip(lo, hi))
    grid = np.mgrid[sl].astype(np.float32)
    return sl, grid - np.asarray(centre, dtype=np.float32)[:, None, None, None]


def _tumour(ctx: MRIContext, rng: np.random.Generator, image: np.ndarray, mask: np.ndarray):
    tpl = ctx.template
    centre = np.unravel_index(int(tpl.tumour_sites[rng.integers(len(tpl.tumour_sites))]), ctx.shape)
    centre = np.asarray(centre, dtype=np.float32) + rng.uniform(-0.5, 0.5, 3)
    radius = rng.uniform(3.5, 7.0) * ctx.vox * ctx.difficulty**-0.6
    spread = rng.uniform(1.4, 1.9)
    half = math.ceil(radius * spread * 1.35) + 2
    sl, g = _local_box(ctx.shape, centre, half)
    dist = np.sqrt((g**2).sum(axis=0))
    bumpy = 1.0 + 0.15 * smooth_noise(rng, dist.shape, 1.5 * ctx.vox)
    rho = dist / (radius * bumpy)
    rho_e = dist / (radius * spread * (1.0 + 0.22 * smooth_noise(rng, dist.shape, 2.0 * ctx.vox)))
    brain = tpl.brain[sl]
    wm = tpl.wm[sl]
    contrast = ctx.difficulty**-0.5
    local = image[sl]
    edema = _sigmoid((1.0 - rho_e) / 0.08) * brain * (0.45 + 0.55 * wm)
    local = local + contrast * (rng.uniform(1.0, 1.1) - local) * edema
    rim = _sigmoid((1.0 - rho) / 0.07)
    local = local + contrast * (rng.uniform(1.25, 1.4) - local) * rim
    core = _sigmoid((rng.uniform(0.45, 0.7) - rho) / 0.07)
    necrosis = 0.3 + 0.05 * smooth_noise(rng, dist.shape, 1.0)
    local = local + contrast * (necrosis - local) * core
    image[sl] = local
    mask[sl] |= ((rho_e < 1.0) & brain) | (rho < 1.0)


def _ms(
    ctx: MRIContext,
    rng: np.random.Generator,
    image: np.ndarray,
    mask: np.ndarray,
    *,
    subtle: bool = False,
):
    tpl = ctx.template
    contrast = ctx.difficulty**-0.5 * (0.5 if subtle else 1.0)
    size = ctx.vox * ctx.difficulty**-0.6 * (0.8 if subtle else 1.0)
    count = int(rng.integers(1, 3)) if subtle else int(rng.integers(3, 9))
    for _ in range(count):
        site = np.unravel_index(int(tpl.ms_sites[rng.integers(len(tpl.ms_sites))]), ctx.shape)
        centre = np.asarray(site, dtype=np.float32) + rng.uniform(-0.5, 0.5, 3)
        # Long axis along the gradient of the ventricle distance (perpendicular to the wall).
        lo = [max(0, s - 1) for s in site]
        hi = [min(n, s + 2) for s, n in zip(site, ctx.shape)]
        patch = tpl.ventricle_dist[tuple(slice(a, b) for a, b in zip(lo, hi))]
        grad = np.array([np.gradient(patch, axis=a).mean() for a in range(3)])
        normal = grad / max(float(np.linalg.norm(grad)), 1e-6)
        if not np.isfinite(normal).all() or np.linalg.norm(normal) < 0.5:
            normal = rng.normal(size=3)
            normal /= np.linalg.norm(normal)
        long_axis = rng.uniform(1.6, 3.0) * size
        short_axis = rng.uniform(0.9, 1.5) * size
        half = math.ceil(long_axis) + 2
        sl, g = _local_box(ctx.shape, centre, half)
        along = np.tensordot(normal.astype(np.float32), g, axes=1)
        perp2 = (g**2).sum(axis=0) - along**2
        q = (along / long_axis) ** 2 + perp2 / short_axis**2
        lesion = _sigmoid((1.0 - q) / 0.15) * tpl.brain[sl]
        local = image[sl]
        image[sl] = local + contrast * (rng.uniform(1.15, 1.3) - local) * lesion
        mask[sl] |= (q < 1.0) & tpl.brain[sl]


def _warp_coordinates(ctx: MRIContext, rng: np.random.Generator) -> np.ndarray:
    """Sampling coordinates of a random affine plus smooth deformation (voxel units)."""
    angles = np.radians(rng.uniform(-1, 1, 3) * np.array([6.0, 4.0, 4.0]))
    rot = np.eye(3)
    for axis, a in enumerate(angles):
        c, s = math.cos(a), math.sin(a)
        i, j = [k for k in range(3) if k != axis]
        r = np.eye(3)
        r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
        rot = rot @ r
    scale = rng.uniform(0.93, 1.07) * rng.uniform(0.97, 1.03, 3)
    matrix = (rot * (1.0 / scale)[None, :]).astype(np.float32)
    shift = rng.uniform(-1.5, 1.5, 3) * ctx.vox
    coords = np.tensordot(matrix, ctx.grid, axes=1)
    centre = (np.array(ctx.shape, dtype=np.float32) - 1) / 2 + shift
    for axis in range(3):
        coords[axis] += centre[axis] + cosine_field(rng, ctx.shape, 3, 1.2 * ctx.vox)
    return coords


def _render(
    ctx: MRIContext, rng: np.random.Generator, label: int
) -> tuple[np.ndarray, np.ndarray, list, str]:
    rng, lesion_rng, noise_rng = rng.spawn(3)
    tpl = ctx.template
    image = tpl.image.copy()
    mask = np.zeros(ctx.shape, dtype=bool)
    lesion_type = ""
    if label:
        # Subtle cases (8% at difficulty 1, 0.08 d): one or two small faint MS-like lesions.
        subtle = lesion_rng.random() < min(0.4, 0.08 * ctx.difficulty)
        if not subtle and lesion_rng.random() < 0.5:
            _tumour(ctx, lesion_rng, image, mask)
            lesion_type = "tumour"
        else:
            _ms(ctx, lesion_rng, image, mask, subtle=subtle)
            lesion_type = "subtle ms" if subtle else "ms"
    coords = _warp_coordinates(ctx, rng)
    warped = ndimage.map_coordinates(image, coords, order=1, mode="constant", cval=0.0)
    head = warped > 0.01
    if label:
        lesion = ndimage.map_coordinates(mask.astype(np.float32), coords, order=1, cval=0.0)
        lesion *= head
        # Half occupancy; a lesion thinner than a voxel after warping keeps its most
        # covered voxels.
        mask = (lesion >= min(0.5, 0.5 * float(lesion.max()))) & (lesion > 0)
    bias = np.exp(cosine_field(noise_rng, ctx.shape, 2, 0.08))
    sigma = noise_rng.uniform(0.015, 0.03) * math.sqrt(ctx.difficulty)
    n1 = noise_rng.standard_normal(ctx.shape, dtype=np.float32)
    n2 = noise_rng.standard_normal(ctx.shape, dtype=np.float32)
    signal = warped * bias
    noisy = np.sqrt((signal + sigma * n1) ** 2 + (sigma * n2) ** 2)  # Rician
    out = np.where(head, noisy, 0.0).astype(np.float32)
    return out, mask, component_boxes(mask) if label else [], lesion_type, {"head": head}


def _finish(ctx: MRIContext, image: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(image * 1000.0), 0, 32767).astype(np.int16)


MRI_BRAIN = PhantomSpec(
    name="mri-brain-3d",
    spatial_dims=3,
    modality="MR",
    default_n=500,
    default_size=64,
    min_size=24,
    max_size=256,
    prevalence=0.5,
    ground_truth="mask",
    intensity={"kind": "zscore"},
    image_suffix=".nii.gz",
    classes=("negative", "positive"),
    description=(
        "FLAIR-like brain MRI volumes (192 mm field of view) warped per subject from a "
        "template (MNI152 from nilearn, or a procedural head), with bias field and Rician "
        "noise. Positives carry a tumour-like lesion (enhancing rim, necrotic core, edema) or "
        "several MS-like periventricular ovoid hyperintensities. Mask = the lesion."
    ),
    context=_context,
    render=_render,
    finish=_finish,
    token_values=(1.6, 0.05),
    concepts=("head",),
    spacing=lambda size: tuple(FOV_MM / s for s in size),
)
