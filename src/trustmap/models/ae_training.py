"""Train an autoencoder on the normal images of a dataset (Huff et al. 2021, section 2.3).

The loop, resuming, early stopping, checks and model card are those of
:mod:`trustmap.models.training`; what differs is the task: the model sees only the
training images of the normal class, minimises its reconstruction loss, stops early on
the reconstruction loss of the normal validation images, and is scored on the test split
as an anomaly detector and localizer.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from trustmap.errors import InputError
from trustmap.models.augment import augment
from trustmap.models.autoencoders import AUTOENCODERS
from trustmap.models.training import (
    Progress,
    TrainConfig,
    TrainResult,
    _auc,
    _base_card,
    _bootstrap_mean,
    _check_seed,
    _check_splits,
    _device,
    _findings,
    _prepare,
    _reuse,
    _run,
    _save_result,
    _Task,
    _with_lr,
)

__all__ = ["anomaly_maps", "train_autoencoder"]


def anomaly_maps(model: nn.Module, images: torch.Tensor, *, batch_size: int = 64) -> torch.Tensor:
    """Squared reconstruction error ``(x - AE(x))^2`` summed over channels, ``(N, 1, *s)``,
    in eval mode (the caller's mode is restored), without gradients."""
    from trustmap.core.hooks import model_guard

    out = []
    device = next(model.parameters()).device
    with model_guard(model), torch.no_grad():
        for start in range(0, images.shape[0], batch_size):
            x = images[start : start + batch_size].to(device)
            out.append((x - model(x)).pow(2).sum(1, keepdim=True).cpu())
    return torch.cat(out) if out else torch.zeros(0, 1, *images.shape[2:])


class _AutoencoderTask(_Task):
    kind = "autoencoder"
    num_classes = 1

    def __init__(self, data: Any, config: TrainConfig, device: torch.device, normal: int) -> None:
        super().__init__(data, config, device)
        self.normal = normal

    def _normal(self, split: str) -> np.ndarray:
        idx = self.data.split[split]
        return idx[self.data.labels[torch.as_tensor(idx)].numpy() == self.normal]

    def train_indices(self) -> np.ndarray:
        return self._normal("train")

    def batch_loss(self, model: nn.Module, idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        x = self.data.images[idx]
        if self.config.augment is not None:
            x = augment(x, config=self.config.augment, generator=gen).images
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.config.amp):
            loss = model.loss(self.to_device(x))
        return loss.float()

    @torch.inference_mode()
    def evaluate(self, model: nn.Module, split: str) -> dict[str, Any]:
        idx = self.data.split[split]
        maps = anomaly_maps(model, self.data.images[torch.as_tensor(idx)], batch_size=64)
        per_image = maps.flatten(1).mean(1)
        labels = self.data.labels[torch.as_tensor(idx)]
        normal = labels == self.normal
        loss = float(per_image[normal].mean() / self.data.in_channels) if normal.any() else 0.0
        y = (~normal).numpy().astype(int)
        auc = _auc(y, torch.stack([-per_image, per_image], 1).numpy())
        return {"loss": loss, "auc": auc, "maps": maps, "labels": labels, "score": per_image}


def train_autoencoder(
    dataset: Any,
    arch: str = "autoencoder",
    *,
    out: str | os.PathLike[str],
    seed: int = 0,
    config: TrainConfig | None = None,
    progress: Progress | None = None,
    normal_class: int = 0,
) -> TrainResult:
    """Train an autoencoder (``"autoencoder"`` or ``"vae"``) on the normal images.

    Only training images of class ``normal_class`` are seen (augmented as configured);
    early stopping watches the mean reconstruction error of the normal validation images.
    The card's ``test`` entry reports the detection ROC AUC of the image's mean squared
    error (normal against the other classes, with a bootstrap interval), and on the test
    images with a lesion mask the AUPRC of the error map against the mask (mean with a
    bootstrap interval) next to that of the AVG baseline of Arun et al. 2021, the mean
    lesion mask of the training and validation images scored as a map.

    Parameters and errors as :func:`~trustmap.models.train_classifier`; ``lr=None`` takes
    1e-3. Also raises ValueError when ``normal_class`` is not a class of the dataset or a
    split has no normal image.
    """
    from trustmap.metrics.localization import auprc_batch

    config = config or TrainConfig()
    if config.lr is None:
        config = dataclasses.replace(config, lr=1e-3)
    config = _with_lr(config, "classifier")
    seed = _check_seed(seed)
    if arch not in AUTOENCODERS:
        raise InputError(f"unknown autoencoder {arch!r}: choose one of {', '.join(AUTOENCODERS)}")
    device = _device(config)
    data = _prepare(dataset, config)
    _check_splits(data, need_both_classes=False)
    if not 0 <= normal_class < len(data.classes):
        raise InputError(
            f"normal_class {normal_class} is not a class of dataset {data.name!r} "
            f"(classes {list(data.classes)})"
        )
    task = _AutoencoderTask(data, config, device, normal_class)
    for split in ("train", "val"):
        if len(task._normal(split)) < 2:
            raise InputError(
                f"the {split} split of dataset {data.name!r} has fewer than 2 images of the "
                f"normal class {data.classes[normal_class]!r}; an autoencoder learns from them"
            )
    out = Path(out)

    def finalize(
        model: nn.Module, history: list[dict[str, Any]], info: dict[str, Any]
    ) -> TrainResult:
        test = task.evaluate(model, "test")
        idx = data.split["test"]
        masks = data.masks[torch.as_tensor(idx), 0] > 0.5
        has_lesion = masks.flatten(1).any(1) & (test["labels"] != normal_class)
        metrics: dict[str, Any] = {
            "roc_auc": {
                "value": test["auc"],
                "low": None,
                "high": None,
                "reason": "detection: mean squared reconstruction error, normal vs the rest",
            },
            "n_images": len(idx),
            "n_with_lesion": int(has_lesion.sum()),
        }
        if bool(has_lesion.any()):
            lesion = torch.nonzero(has_lesion).flatten()
            maps = test["maps"][lesion, 0].numpy()
            gt = masks[lesion].numpy()
            reference = np.concatenate([data.split["train"], data.split["val"]])
            ref_masks = data.masks[torch.as_tensor(reference), 0]
            ref_masks = ref_masks[ref_masks.flatten(1).amax(1) > 0.5]
            avg = ref_masks.mean(0).numpy() if len(ref_masks) else np.zeros(gt.shape[1:])
            metrics["auprc"] = _bootstrap_mean(auprc_batch(maps, gt), config.n_boot, seed)
            metrics["avg_auprc"] = _bootstrap_mean(
                auprc_batch(np.broadcast_to(avg, gt.shape), gt), config.n_boot, seed
            )
        findings = _findings(model, arch, data, task, config, history, info)
        card = _base_card("autoencoder", arch, seed, data, config, model, info)
        card.update(
            {
                "normal_class": normal_class,
                "test": metrics,
                "history": history,
                "findings": [f.to_dict() for f in findings],
            }
        )
        return _save_result(out, model, arch, data, config, 1, card, history, findings, info)

    return _run(
        task,
        arch,
        out=out,
        seed=seed,
        progress=progress,
        finalize=finalize,
        reuse=_reuse(out, device),
    )
