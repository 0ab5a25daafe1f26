"""The training checks of Huff et al.'s (2021) Appendix 1 ("Ensuring proper model training").

Explaining an improperly trained model is misleading, so training runs these checks and
writes every finding into the model card and onto the console:

* :func:`check_learning_curves` -- validation loss rising while training loss falls
  (overfitting), a training loss that explodes, or one that does not decrease;
* :func:`check_dead_feature_maps` -- channels of convolution / ReLU layers that are zero on
  the whole validation set;
* :func:`check_class_balance` -- class imbalance in each split, and splits missing a class;
* :func:`check_masks` -- masks that do not line up with their image: another shape, outside
  the body, empty for a positive image, boxes outside the image;
* :func:`check_augmentation` -- that the augmentation moves a mask exactly as it moves the
  image, tested on synthetic images with a marker.

Each returns a list of :class:`Finding` (empty when all is well). Checks never raise for a
bad model or bad data; they describe it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from scipy import ndimage
from torch import nn

from trustmap.core.hooks import hook_handles

__all__ = [
    "Finding",
    "check_augmentation",
    "check_class_balance",
    "check_dead_feature_maps",
    "check_learning_curves",
    "check_masks",
    "foreground_mask",
]

SEVERITIES = ("info", "warning", "error")


@dataclass(frozen=True)
class Finding:
    """One result of a check.

    ``id`` is a stable dotted name (``"training.overfitting"``), ``severity`` one of
    ``"info"``, ``"warning"``, ``"error"``; ``details`` holds the numbers behind the message
    (JSON-serialisable).
    """

    id: str
    severity: str
    message: str
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------------------
# Learning curves
# ----------------------------------------------------------------------------------------


def _slope(values: Sequence[float]) -> float:
    x = np.arange(len(values), dtype=float)
    return float(np.polyfit(x, np.asarray(values, dtype=float), 1)[0])


def check_learning_curves(
    history: Sequence[Mapping[str, float]],
    *,
    k: int = 3,
    best_epoch: int | None = None,
    rel_tol: float = 0.02,
) -> list[Finding]:
    """Read the learning curves the way Huff et al. 2021 (Appendix 1, "Model training") advises.

    Parameters
    ----------
    history
        One mapping per epoch with ``"train_loss"`` and ``"val_loss"`` (and ``"epoch"``,
        1-based, optional).
    k
        Number of final epochs over which a trend is judged.
    best_epoch
        The epoch whose weights were kept (early stopping); a rise after it is reported as
        information rather than as a warning, since the kept model predates it.
    rel_tol
        Relative rise of the validation loss above its minimum that counts as rising.

    Findings
    --------
    ``training.overfitting``: over the last ``k`` epochs the validation loss rises (positive
    least-squares slope, and its last value above the minimum by ``rel_tol``) while the
    training loss falls. ``training.diverging``: a non-finite training loss, or a final one
    above twice its minimum (exploding gradients). ``training.not_learning``: after at least
    3 epochs the training loss fell by less than 5 %.
    """
    findings: list[Finding] = []
    train = [float(h["train_loss"]) for h in history]
    val = [float(h["val_loss"]) for h in history]
    epochs = [int(h.get("epoch", i + 1)) for i, h in enumerate(history)]
    if not train:
        return findings
    if not all(np.isfinite(train)):
        bad = epochs[next(i for i, v in enumerate(train) if not np.isfinite(v))]
        findings.append(
            Finding(
                "training.diverging",
                "error",
                f"the training loss became non-finite at epoch {bad}: the gradients exploded. "
                "Restart with a lower learning rate or with gradient clipping "
                "(Huff et al. 2021, Appendix 1).",
                {"epoch": bad},
            )
        )
        return findings
    if len(train) >= 2 and train[-1] > 2 * min(train):
        findings.append(
            Finding(
                "training.diverging",
                "warning",
                f"the training loss rose steeply, from its minimum {min(train):.4g} to "
                f"{train[-1]:.4g}: a sign of exploding gradients. Restart with a lower "
                "learning rate or with gradient clipping (Huff et al. 2021, Appendix 1).",
                {"min_train_loss": min(train), "last_train_loss": train[-1]},
            )
        )
    if len(train) >= 3 and train[-1] > 0.95 * train[0]:
        findings.append(
            Finding(
                "training.not_learning",
                "warning",
                f"the training loss barely decreased in {len(train)} epochs ({train[0]:.4g} -> "
                f"{train[-1]:.4g}). Raise the learning rate, train longer, or check the "
                "labels (Huff et al. 2021, Appendix 1).",
                {"first_train_loss": train[0], "last_train_loss": train[-1]},
            )
        )
    if len(val) >= k + 1 and all(np.isfinite(val[-k - 1 :])):
        tail_val, tail_train = val[-k - 1 :], train[-k - 1 :]
        val_min = min(val)
        rising = _slope(tail_val) > 0 and tail_val[-1] > val_min * (1 + rel_tol) + 1e-12
        if rising and _slope(tail_train) < 0:
            first = epochs[-k - 1]
            kept = best_epoch is not None and best_epoch < epochs[-1]
            tail = (
                f"Early stopping kept the weights of epoch {best_epoch} "
                f"(validation loss {val[epochs.index(best_epoch)]:.4g})."
                if kept and best_epoch in epochs
                else "Stop training earlier (early stopping), add augmentation or "
                "regularisation, or use more data."
            )
            findings.append(
                Finding(
                    "training.overfitting",
                    "info" if kept else "warning",
                    f"the validation loss rose from {tail_val[0]:.4g} to {tail_val[-1]:.4g} over "
                    f"epochs {first}-{epochs[-1]} while the training loss fell from "
                    f"{tail_train[0]:.4g} to {tail_train[-1]:.4g}: the model started to "
                    f"overfit the training set (Huff et al. 2021, Appendix 1). {tail}",
                    {
                        "epochs": [first, epochs[-1]],
                        "val_loss": [tail_val[0], tail_val[-1]],
                        "train_loss": [tail_train[0], tail_train[-1]],
                        "best_epoch": best_epoch,
                    },
                )
            )
    return findings


# ----------------------------------------------------------------------------------------
# Dead feature maps
# ----------------------------------------------------------------------------------------

_WATCHED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ReLU, nn.ReLU6)


@torch.no_grad()
def check_dead_feature_maps(
    model: nn.Module,
    images: torch.Tensor,
    *,
    batch_size: int = 128,
    device: str | torch.device | None = None,
    warn_fraction: float = 0.5,
) -> list[Finding]:
    """Find channels of convolution and ReLU layers that are zero on every input.

    A channel whose output is exactly zero for every pixel of every validation image
    ("dead", typically a ReLU stuck below zero) carries no information, and maps that read
    that layer (CAM, Grad-CAM) cannot use it. The model runs in eval mode; every module's
    training flag is restored and every hook removed afterwards.

    Returns one ``model.dead_feature_maps`` finding listing each affected layer with the
    fraction of its channels that are dead (``"warning"`` when some layer has at least
    ``warn_fraction`` of them, else ``"info"``), or nothing.
    """
    if images.shape[0] == 0:
        return []
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    peaks: dict[str, torch.Tensor] = {}
    calls: dict[str, int] = {}

    def make_hook(name: str) -> Callable[..., None]:
        def hook(_mod: nn.Module, _inp: Any, out: Any) -> None:
            if not isinstance(out, torch.Tensor) or out.dim() < 3:
                return
            # A module called twice in one forward (a reused ReLU) is two layers here.
            n = calls.get(name, 0)
            calls[name] = n + 1
            key = name if n == 0 else f"{name}#{n + 1}"
            peak = out.detach().abs().transpose(0, 1).reshape(out.shape[1], -1).amax(1)
            peaks[key] = peak if key not in peaks else torch.maximum(peaks[key], peak)

        return hook

    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with hook_handles() as handles:
            for name, module in model.named_modules():
                if isinstance(module, _WATCHED):
                    handles.append(module.register_forward_hook(make_hook(name or "model")))
            for start in range(0, images.shape[0], batch_size):
                calls.clear()
                model(images[start : start + batch_size].to(dev))
    finally:
        for module, flag in flags:
            module.training = flag
    layers = []
    for key, peak in peaks.items():
        dead = int((peak == 0).sum())
        if dead:
            layers.append(
                {
                    "layer": key,
                    "dead": dead,
                    "channels": int(peak.numel()),
                    "fraction": dead / peak.numel(),
                }
            )
    if not layers:
        return []
    worst = max(layer["fraction"] for layer in layers)
    listing = ", ".join(
        f"{layer['layer']} {layer['dead']}/{layer['channels']} ({layer['fraction']:.0%})"
        for layer in layers
    )
    return [
        Finding(
            "model.dead_feature_maps",
            "warning" if worst >= warn_fraction else "info",
            f"{len(layers)} of {len(peaks)} convolution/ReLU layers have feature maps that are "
            f"zero on the whole validation set ({images.shape[0]} images): {listing}. Dead "
            "channels carry no information and explanations that read these layers ignore "
            "them; a lower learning rate or another weight initialisation (He et al. 2015) "
            "usually helps (Huff et al. 2021, Appendix 1).",
            {"layers": layers, "n_images": int(images.shape[0]), "n_layers": len(peaks)},
        )
    ]


# ----------------------------------------------------------------------------------------
# Class balance
# ----------------------------------------------------------------------------------------


def check_class_balance(
    labels: Mapping[str, Sequence[int] | np.ndarray | torch.Tensor],
    *,
    classes: Sequence[str] | None = None,
    max_ratio: float = 3.0,
    max_shift: float = 0.15,
) -> list[Finding]:
    """Class counts per split: imbalance beyond ``max_ratio`` : 1, missing classes, and a
    prevalence that differs between splits by more than ``max_shift``.

    ``labels`` maps a split name (``"train"``, ``"val"``, ``"test"``) to its class indices.
    A split without some class is an ``"error"`` (no sensitivity, specificity or ROC AUC
    can be computed on it); imbalance is a ``"warning"`` with the appendix's advice.
    """
    n_classes = len(classes) if classes else None
    counts: dict[str, np.ndarray] = {}
    for split, y in labels.items():
        arr = np.asarray(y.cpu() if isinstance(y, torch.Tensor) else y, dtype=np.int64).ravel()
        counts[split] = arr
    if n_classes is None:
        n_classes = max(2, 1 + max((int(a.max()) for a in counts.values() if a.size), default=1))
    names = list(classes) if classes else [str(i) for i in range(n_classes)]
    findings: list[Finding] = []
    prevalence: dict[str, float] = {}
    for split, arr in counts.items():
        c = np.bincount(arr, minlength=n_classes)[:n_classes]
        table = {names[i]: int(c[i]) for i in range(n_classes)}
        missing = [names[i] for i in range(n_classes) if c[i] == 0]
        if missing:
            findings.append(
                Finding(
                    "data.class_missing",
                    "error",
                    f"the {split} split ({arr.size} images) has no example of class "
                    f"{', '.join(missing)}: metrics such as sensitivity, specificity and ROC "
                    "AUC are undefined on it. Re-split the data stratified by class.",
                    {"split": split, "counts": table},
                )
            )
            continue
        prevalence[split] = float(c[-1] / arr.size)
        ratio = float(c.max() / c.min())
        listing = ", ".join(f"{k}: {v}" for k, v in table.items())
        if ratio > max_ratio:
            findings.append(
                Finding(
                    "data.class_imbalance",
                    "warning",
                    f"the {split} split is imbalanced ({listing}; "
                    f"{ratio:.1f}:1). Accuracy is misleading when one class dominates: judge "
                    "the model by sensitivity, specificity, PPV and NPV, and balance the "
                    "classes (class-weighted loss, which trustmap uses, or more examples of "
                    "the minority class) (Huff et al. 2021, Appendix 1).",
                    {"split": split, "counts": table, "ratio": ratio},
                )
            )
    if "train" in prevalence:
        for split, p in prevalence.items():
            if split != "train" and abs(p - prevalence["train"]) > max_shift:
                findings.append(
                    Finding(
                        "data.prevalence_shift",
                        "warning",
                        f"the prevalence of {names[-1]} is {p:.0%} in the {split} split but "
                        f"{prevalence['train']:.0%} in the training split: a threshold tuned on "
                        "one does not transfer to the other.",
                        {"split": split, "prevalence": p, "train_prevalence": prevalence["train"]},
                    )
                )
    return findings


# ----------------------------------------------------------------------------------------
# Image / mask alignment
# ----------------------------------------------------------------------------------------


def foreground_mask(image: np.ndarray | torch.Tensor, *, level: float = 0.1) -> np.ndarray:
    """A generous estimate of the body in a one-channel image ``(*spatial)``, 2D or 3D.

    Pixels brighter than ``min + level * (max - min)``, closed, with
    their holes filled (the dark lungs inside a chest, the ventricles inside a brain) and
    every 2D slice replaced by its convex hull, so dark structures inside the body such as a
    pneumothorax still count as body.
    """
    from skimage.morphology import convex_hull_image

    arr = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    arr = arr.astype(np.float32, copy=False)
    lo, hi = float(arr.min()), float(arr.max())
    if hi <= lo:
        return np.ones(arr.shape, dtype=bool)
    fg = arr > lo + level * (hi - lo)
    # Close small gaps on an edge-padded copy: objects touching the border are neither
    # eroded there (as with a zero border) nor joined to it (as with a border of ones).
    pad = 2
    fg = np.pad(fg, pad, mode="edge")
    fg = ndimage.binary_closing(fg, iterations=pad)[(slice(pad, -pad),) * fg.ndim]
    fg = ndimage.binary_fill_holes(fg)
    slices = fg.reshape(-1, *fg.shape[-2:])
    hull = np.stack([convex_hull_image(s) if s.any() else s for s in slices])
    return hull.reshape(fg.shape)


def check_masks(
    images: torch.Tensor | Sequence[torch.Tensor],
    masks: torch.Tensor | Sequence[torch.Tensor | None],
    labels: Sequence[int] | np.ndarray | torch.Tensor,
    *,
    ids: Sequence[str] | None = None,
    boxes: Sequence[Sequence[Sequence[float]]] | None = None,
    outside_tolerance: float = 0.1,
    max_images: int = 400,
    foreground: Callable[[torch.Tensor], np.ndarray] | None = None,
    max_examples: int = 5,
) -> list[Finding]:
    """Check that masks line up with their images (Huff et al. 2021, Appendix 1).

    Parameters
    ----------
    images, masks
        ``(N, C, *S)`` and ``(N, 1, *S)`` tensors, or sequences of per-image tensors
        ``(C, *S)`` and ``(*S)`` / ``(1, *S)`` masks (None = no mask).
    labels
        Class index per image; the last class is the positive (lesion) class.
    ids
        Names of the images for the messages (default: their index).
    boxes
        Optional boxes per image in pixels, ``(x, y, width, height)`` in 2D and
        ``(x, y, z, width, height, depth)`` in 3D.
    outside_tolerance
        Fraction of a mask that may lie outside the estimated body before it is reported.
    max_images
        Masks checked against the body estimate (the first ones; the other checks see all).
    foreground
        Body estimator, given the channel mean ``(*S)`` of an image (default
        :func:`foreground_mask`).

    Findings
    --------
    ``masks.shape_mismatch`` (error), ``masks.empty_positive`` (warning),
    ``masks.outside_body`` (warning), ``masks.box_outside_image`` (warning).
    """
    n = len(images)
    y = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels).ravel()
    names = list(ids) if ids is not None else [f"#{i}" for i in range(n)]
    positive = int(y.max()) if y.size else 1
    positive = max(positive, 1)
    foreground = foreground or foreground_mask
    mismatched, empty, outside = [], [], []
    checked = 0
    for i in range(n):
        img, mask = images[i], masks[i]
        if mask is None:
            if y[i] == positive:
                empty.append(names[i])
            continue
        spatial = tuple(img.shape[1:])
        m = mask[0] if mask.dim() == len(spatial) + 1 else mask
        if tuple(m.shape) != spatial:
            mismatched.append(f"{names[i]} (image {spatial}, mask {tuple(m.shape)})")
            continue
        m = m > 0.5 if m.dtype != torch.bool else m
        area = int(m.sum())
        if area == 0:
            if y[i] == positive:
                empty.append(names[i])
            continue
        if checked < max_images:
            checked += 1
            body = torch.from_numpy(np.asarray(foreground(img.float().mean(0)), dtype=bool))
            body = body.to(m.device)
            frac = float((m & ~body).sum()) / area
            if frac > outside_tolerance:
                outside.append((names[i], frac))
    findings: list[Finding] = []

    def some(items: list[Any]) -> str:
        shown = ", ".join(str(v) for v in items[:max_examples])
        return shown + (
            f" and {len(items) - max_examples} more" if len(items) > max_examples else ""
        )

    if mismatched:
        findings.append(
            Finding(
                "masks.shape_mismatch",
                "error",
                f"{len(mismatched)} masks have another shape than their image: {some(mismatched)}.",
                {"count": len(mismatched), "examples": mismatched[:max_examples]},
            )
        )
    if empty:
        findings.append(
            Finding(
                "masks.empty_positive",
                "warning",
                f"{len(empty)} positive images have an empty mask: {some(empty)}. The lesion is "
                "missing from the ground truth, so localization scores cannot use these images; "
                "check the annotations for completeness (Huff et al. 2021, Appendix 1).",
                {"count": len(empty), "examples": empty[:max_examples]},
            )
        )
    if outside:
        listed = [f"{name} ({frac:.0%})" for name, frac in outside]
        findings.append(
            Finding(
                "masks.outside_body",
                "warning",
                f"{len(outside)} of {checked} checked masks lie more than "
                f"{outside_tolerance:.0%} outside the body in their image: {some(listed)}. The "
                "mask and the image may be misaligned (a flip, a crop or a resize applied to "
                "one only) (Huff et al. 2021, Appendix 1).",
                {
                    "count": len(outside),
                    "checked": checked,
                    "examples": [
                        {"id": a, "fraction_outside": b} for a, b in outside[:max_examples]
                    ],
                },
            )
        )
    if boxes is not None:
        bad_boxes = []
        for i, bx in enumerate(boxes):
            spatial = tuple(images[i].shape[1:])
            size = list(reversed(spatial))  # (W, H[, D]) in box order
            nd = len(spatial)
            for box in bx:
                lo, ext = box[:nd], box[nd : 2 * nd]
                if any(a < -0.5 or a + e > s + 0.5 or e <= 0 for a, e, s in zip(lo, ext, size)):
                    bad_boxes.append(f"{names[i]} {tuple(round(float(v), 1) for v in box)}")
        if bad_boxes:
            findings.append(
                Finding(
                    "masks.box_outside_image",
                    "warning",
                    f"{len(bad_boxes)} boxes reach outside their image or are empty: "
                    f"{some(bad_boxes)}.",
                    {"count": len(bad_boxes), "examples": bad_boxes[:max_examples]},
                )
            )
    return findings


# ----------------------------------------------------------------------------------------
# Augmentation
# ----------------------------------------------------------------------------------------

AugmentFn = Callable[
    [torch.Tensor, torch.Tensor, torch.Generator], tuple[torch.Tensor, torch.Tensor]
]


def check_augmentation(
    augment_fn: AugmentFn,
    spatial: Sequence[int],
    *,
    in_channels: int = 1,
    n: int = 8,
    seed: int = 0,
    max_offset: float = 1.0,
    min_iou: float = 0.7,
) -> list[Finding]:
    """Check that an augmentation moves the mask exactly as it moves the image.

    ``n`` synthetic images of shape ``(in_channels, *spatial)`` carry one bright square
    marker each, off-centre and at different places, whose mask is the square itself. After
    ``augment_fn(images, masks, generator)`` the marker found in each image (pixels above the
    midpoint of the image's range) must coincide with the transformed mask: centroids within
    ``max_offset`` pixels and IoU at least ``min_iou`` (interpolation blurs the image's edge
    by up to a pixel, nearest-neighbour masks do not).

    Returns an ``augment.misaligned`` finding (error) or nothing.
    """
    spatial = tuple(int(s) for s in spatial)
    gen = torch.Generator().manual_seed(seed)
    side = [max(3, s // 5) for s in spatial]
    images = torch.zeros(n, in_channels, *spatial)
    masks = torch.zeros(n, 1, *spatial)
    for i in range(n):
        lo = [
            int(torch.randint(s // 8, s - side[d] - s // 8 + 1, (1,), generator=gen))
            for d, s in enumerate(spatial)
        ]
        region = tuple(slice(a, a + b) for a, b in zip(lo, side))
        images[(i, slice(None), *region)] = 1.0
        masks[(i, 0, *region)] = 1.0
    out_images, out_masks = augment_fn(images, masks, gen)
    bad = []
    for i in range(n):
        img = out_images[i].float().mean(0)
        lo, hi = float(img.min()), float(img.max())
        marker = img > (lo + hi) / 2
        m = out_masks[i, 0] > 0.5
        if not marker.any() and not m.any():
            continue  # both moved out of view together
        if not marker.any() or not m.any():
            bad.append({"image": i, "iou": 0.0, "offset": None})
            continue
        iou = float((marker & m).sum()) / float((marker | m).sum())
        c1 = marker.nonzero().float().mean(0)
        c2 = m.nonzero().float().mean(0)
        offset = float((c1 - c2).norm())
        if iou < min_iou or offset > max_offset:
            bad.append({"image": i, "iou": iou, "offset": offset})
    if not bad:
        return []
    return [
        Finding(
            "augment.misaligned",
            "error",
            f"the augmentation moved the mask differently from the image in {len(bad)} of {n} "
            "synthetic test images (a bright square marker and its mask): transformations "
            "applied as augmentation must also be applied to the ground-truth masks so that "
            "their spatial correspondence is kept (Huff et al. 2021, Appendix 1).",
            {"failures": bad, "n": n},
        )
    ]
