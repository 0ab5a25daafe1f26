"""The checks of the appendix of Huff et al. (2021): each fires on a constructed bad case,
and only there."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from tests.conftest import assert_no_hooks
from tests.models._toy import toy_arrays
from trustmap.models.augment import AugmentConfig, augment
from trustmap.models.checks import (
    Finding,
    check_augmentation,
    check_class_balance,
    check_dead_feature_maps,
    check_learning_curves,
    check_masks,
    foreground_mask,
)


def _ids(findings: list[Finding]) -> list[str]:
    return [f.id for f in findings]


def _history(train, val):
    return [
        {"epoch": i + 1, "train_loss": t, "val_loss": v} for i, (t, v) in enumerate(zip(train, val))
    ]


# -- learning curves ----------------------------------------------------------------------


def test_overfitting_fires_when_val_rises_while_train_falls():
    h = _history([1.0, 0.7, 0.5, 0.35, 0.25, 0.18], [0.9, 0.6, 0.5, 0.55, 0.62, 0.7])
    (f,) = check_learning_curves(h, k=3)
    assert f.id == "training.overfitting" and f.severity == "warning"
    assert f.details["epochs"] == [3, 6]
    assert "overfit" in f.message
    # When early stopping kept an earlier epoch, the finding is informational.
    (f,) = check_learning_curves(h, k=3, best_epoch=3)
    assert f.severity == "info" and "epoch 3" in f.message


def test_learning_curves_silent_on_healthy_training():
    h = _history([1.0, 0.7, 0.5, 0.4, 0.35, 0.3], [0.9, 0.65, 0.5, 0.45, 0.42, 0.41])
    assert check_learning_curves(h) == []
    # Both rising is not overfitting (nor is a flat validation loss).
    h = _history([0.5, 0.4, 0.3, 0.25, 0.2], [0.5, 0.45, 0.44, 0.44, 0.44])
    assert check_learning_curves(h) == []


def test_diverging_and_not_learning():
    (f,) = check_learning_curves(_history([1.0, 0.5, math.nan], [1.0, 0.6, 0.7]))
    assert f.id == "training.diverging" and f.severity == "error" and f.details["epoch"] == 3
    ids = _ids(check_learning_curves(_history([1.0, 0.4, 0.9], [1.0, 0.6, 0.7])))
    assert "training.diverging" in ids
    ids = _ids(check_learning_curves(_history([0.693, 0.692, 0.691, 0.690], [0.7, 0.7, 0.7, 0.7])))
    assert ids == ["training.not_learning"]


# -- dead feature maps --------------------------------------------------------------------


class _Net(nn.Module):
    def __init__(self, dead: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.relu = nn.ReLU()
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 2)
        with torch.no_grad():
            # Non-negative inputs and weights with a bias of +1: every channel is alive...
            self.conv.weight.uniform_(0, 0.1)
            self.conv.bias.fill_(1.0)
            # ...except `dead` channels, whose pre-activation is always negative.
            self.conv.weight[:dead] = -self.conv.weight[:dead]
            self.conv.bias[:dead] = -1.0

    def forward(self, x):
        return self.fc(self.bn(self.relu(self.conv(x))).mean((2, 3)))


def test_dead_feature_maps_names_layer_and_fraction():
    net = _Net(dead=6).train()
    x = torch.rand(20, 1, 12, 12)
    (f,) = check_dead_feature_maps(net, x, batch_size=7)
    assert f.id == "model.dead_feature_maps" and f.severity == "warning"
    (layer,) = f.details["layers"]
    assert layer == {"layer": "relu", "dead": 6, "channels": 8, "fraction": 0.75}
    assert "relu 6/8 (75%)" in f.message
    # The model is as it was: training mode, no hooks.
    assert net.training and all(m.training for m in net.modules())
    assert_no_hooks(net)
    (f,) = check_dead_feature_maps(_Net(dead=1), x)
    assert f.severity == "info"


def test_dead_feature_maps_silent_on_live_network():
    assert check_dead_feature_maps(_Net(dead=0), torch.rand(10, 1, 12, 12)) == []


# -- class balance ------------------------------------------------------------------------


def test_class_imbalance_fires_beyond_three_to_one():
    labels = {"train": [0] * 40 + [1] * 10, "val": [0] * 5 + [1] * 5, "test": [0] * 5 + [1] * 5}
    findings = check_class_balance(labels, classes=("negative", "positive"))
    imbalance = [f for f in findings if f.id == "data.class_imbalance"]
    assert len(imbalance) == 1 and imbalance[0].details["split"] == "train"
    assert imbalance[0].details["ratio"] == 4.0
    assert "sensitivity, specificity" in imbalance[0].message
    # Prevalence 20 % in train versus 50 % in val and test is a shift.
    assert sum(f.id == "data.prevalence_shift" for f in findings) == 2


def test_class_balance_silent_when_balanced_and_error_for_missing_class():
    balanced = {"train": [0] * 30 + [1] * 20, "val": [0, 1] * 5, "test": [0, 1] * 5}
    assert check_class_balance(balanced) == []
    (f,) = check_class_balance({"train": [0, 1] * 5, "val": [0, 1], "test": [0, 0, 0]})
    assert f.id == "data.class_missing" and f.severity == "error" and f.details["split"] == "test"


# -- masks --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def toy():
    images, masks, labels, _ = toy_arrays(n=20, size=32)
    return torch.from_numpy(images)[:, None], torch.from_numpy(masks)[:, None].float(), labels


def test_masks_silent_on_aligned_data(toy):
    images, masks, labels = toy
    assert check_masks(images, masks, labels) == []


def test_mask_outside_body_fires(toy):
    images, masks, labels = toy
    moved = masks.clone()
    # Misalign the positives' masks: flip them top-left to bottom-right corner area, outside.
    moved[labels == 1] = 0
    moved[labels == 1, :, :5, :5] = 1
    (f,) = check_masks(images, moved, labels, ids=[f"img{i}" for i in range(len(labels))])
    assert f.id == "masks.outside_body" and f.details["count"] == int((labels == 1).sum())
    assert "img1" in f.message


def test_empty_positive_mask_shape_mismatch_and_box_outside(toy):
    images, masks, labels = toy
    emptied = masks.clone()
    emptied[1] = 0
    (f,) = check_masks(images, emptied, labels)
    assert f.id == "masks.empty_positive" and f.details["examples"] == ["#1"]
    imgs = [images[i] for i in range(4)]
    ms = [masks[i, 0] for i in range(4)]
    ms[3] = torch.zeros(16, 16)
    (f,) = check_masks(imgs, ms, labels[:4])
    assert f.id == "masks.shape_mismatch" and "(32, 32)" in f.message and "(16, 16)" in f.message
    boxes = [[] for _ in range(4)]
    boxes[1] = [(10.0, 10.0, 5.0, 5.0)]
    assert check_masks(imgs[:3], ms[:3], labels[:3], boxes=boxes[:3]) == []
    boxes[1] = [(30.0, 10.0, 8.0, 5.0)]
    (f,) = check_masks(imgs[:3], ms[:3], labels[:3], boxes=boxes[:3])
    assert f.id == "masks.box_outside_image"


def test_foreground_counts_dark_regions_inside_the_body():
    # A bright ring (the chest wall) around a dark interior (lungs): all of it is body.
    yy, xx = np.mgrid[:40, :40]
    r = np.hypot(yy - 19.5, xx - 19.5)
    image = np.where((r > 12) & (r < 18), 0.8, 0.05).astype(np.float32)
    image[r >= 18] = 0.0
    fg = foreground_mask(image)
    assert fg[20, 20] and fg[19, 8] and not fg[0, 0]


# -- augmentation -------------------------------------------------------------------------


def test_augmentation_check_silent_for_trustmap_augment():
    def fn(images, masks, gen):
        out = augment(images, masks, config=AugmentConfig(rotate=15, flip=(1,)), generator=gen)
        return out.images, out.masks

    assert check_augmentation(fn, (32, 32)) == []
    assert check_augmentation(fn, (16, 24, 24), n=4) == []


def test_augmentation_check_fires_when_mask_is_not_moved():
    def image_only(images, masks, gen):
        out = augment(
            images, config=AugmentConfig(rotate=15, translate=0.2, flip=(1,)), generator=gen
        )
        return out.images, masks

    (f,) = check_augmentation(image_only, (32, 32))
    assert f.id == "augment.misaligned" and f.severity == "error"
    assert f.details["failures"]
