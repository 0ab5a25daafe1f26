"""Tiny datasets for the training tests: an in-memory ImageDataset and a dataset folder.

Every image is a noisy disc ("body") on a black background; positives carry a bright
square ("lesion") inside the disc, whose mask is the ground truth. A CNN separates the
classes within a couple of epochs.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from trustmap.data.datasets import ImageDataset, Sample


def toy_arrays(
    n: int = 80, size: int = 24, seed: int = 0, *, signal: float = 0.5, random_labels: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """images (n, size, size) in [0, 1], masks (n, size, size) bool, labels (n,), splits (n,)."""
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % 2).astype(np.int64)
    yy, xx = np.mgrid[:size, :size]
    c = (size - 1) / 2
    body = (yy - c) ** 2 + (xx - c) ** 2 <= (0.47 * size) ** 2
    images = np.zeros((n, size, size), np.float32)
    masks = np.zeros((n, size, size), bool)
    side = max(3, size // 4)
    for i in range(n):
        img = np.where(body, 0.35 + 0.15 * rng.random((size, size)), 0.0).astype(np.float32)
        if labels[i]:
            r, q = rng.integers(size // 4, size - size // 4 - side + 1, 2)
            masks[i, r : r + side, q : q + side] = True
            img[masks[i]] += signal
        images[i] = np.clip(img, 0, 1)
    if random_labels:
        labels = rng.permutation(labels)
    splits = np.array(["train"] * n, dtype=object)
    splits[(n * 6) // 10 : (n * 8) // 10] = "val"
    splits[(n * 8) // 10 :] = "test"
    return images, masks, labels, splits


class ToyDataset(ImageDataset):
    """The toy images as an ImageDataset held in memory (2D, or 3D by stacking slices)."""

    def __init__(self, n: int = 80, size: int = 24, seed: int = 0, **kwargs) -> None:
        images, masks, labels, splits = toy_arrays(n, size, seed, **kwargs)
        super().__init__(
            name="toy",
            classes=("negative", "positive"),
            spatial_dims=2,
            in_channels=1,
            ground_truth="mask",
            labels=labels,
            ids=[f"toy{i:03d}" for i in range(n)],
            splits=splits,
        )
        self._images, self._masks = images, masks

    def _load(self, index: int) -> Sample:
        return Sample(
            image=torch.from_numpy(self._images[index])[None],
            label=int(self.labels[index]),
            mask=torch.from_numpy(self._masks[index]),
            meta={
                "id": self.ids[index],
                "path": "",
                "split": self.splits[index],
                "spacing": None,
                "row": index,
            },
        )


def write_toy_dir(root: Path, n: int = 60, size: int = 24, seed: int = 0) -> Path:
    """Write the toy data in the trustmap dataset layout (PNG images and masks)."""
    images, masks, labels, splits = toy_arrays(n, size, seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rows = []
    for i in range(n):
        name = f"toy{i:03d}"
        Image.fromarray(np.round(images[i] * 255).astype(np.uint8)).save(
            root / "images" / f"{name}.png"
        )
        mask = ""
        if labels[i]:
            mask = f"masks/{name}.png"
            Image.fromarray(masks[i].astype(np.uint8) * 255).save(root / mask)
        rows.append(
            {
                "image": f"images/{name}.png",
                "label": int(labels[i]),
                "split": splits[i],
                "mask": mask,
            }
        )
    with open(root / "manifest.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["image", "label", "split", "mask"])
        writer.writeheader()
        writer.writerows(rows)
    counts = {
        s: {str(k): int(((splits == s) & (labels == k)).sum()) for k in (0, 1)}
        for s in ("train", "val", "test")
    }
    card = {
        "name": "toy",
        "format_version": 1,
        "classes": ["negative", "positive"],
        "spatial_dims": 2,
        "in_channels": 1,
        "image_size": [size, size],
        "modality": "CR",
        "intensity": {"kind": "range", "min": 0, "max": 255},
        "ground_truth": "mask",
        "generator": None,
        "counts": counts,
        "measured_auc": None,
    }
    (root / "dataset.json").write_text(json.dumps(card, indent=2))
    (root / "DATASET_CARD.md").write_text(
        "# Dataset card: toy\n\nA tiny test set.\n\n## Files\n\nimages/, masks/\n"
    )
    return root
