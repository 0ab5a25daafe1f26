"""Training: learning, seeding, resuming, early stopping, the model card, augmentation."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from tests.models._toy import ToyDataset, write_toy_dir
from trustmap.models import load_checkpoint
from trustmap.models.augment import AugmentConfig, augment, transform_boxes
from trustmap.models.calibrate import calibration_config, measure_dataset_auc
from trustmap.models.training import (
    DEFAULT_LR,
    TrainConfig,
    TrainEvent,
    train_classifier,
    train_localizer,
)

FAST = TrainConfig(
    epochs=3,
    batch_size=8,
    lr=1e-2,
    model_kwargs={"width": 4},
    n_boot=200,
    eval_batch_size=64,
    patience=None,
)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # The models are tiny: a second thread gains nothing, and on a shared, busy machine
    # OpenMP threads waiting for each other make these tests many times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def toy():
    return ToyDataset(n=120, size=24)


@pytest.fixture(scope="module")
def trained(toy, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    return train_classifier(toy, "small_cnn", out=out, seed=0, config=FAST)


def _weights(model):
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_loss_decreases_and_test_auc_is_high(trained):
    losses = [row["train_loss"] for row in trained.history]
    assert len(losses) == 3
    assert losses[-1] < losses[0]
    assert trained.card["test"]["roc_auc"]["value"] > 0.9
    assert trained.history[-1]["val_auc"] > 0.9


def test_same_seed_same_weights_other_seed_differs_and_global_rng_untouched(toy, trained, tmp_path):
    state = torch.get_rng_state()
    again = train_classifier(toy, "small_cnn", out=tmp_path / "a", seed=0, config=FAST)
    assert torch.equal(torch.get_rng_state(), state)
    assert not again.reused
    assert _same(_weights(again.model), _weights(trained.model))
    other = train_classifier(toy, "small_cnn", out=tmp_path / "b", seed=1, config=FAST)
    assert not _same(_weights(other.model), _weights(trained.model))


def test_resume_after_interrupt_gives_the_uninterrupted_weights(toy, trained, tmp_path):
    out = tmp_path / "interrupted"

    class Stop(Exception):
        pass

    def interrupt(event: TrainEvent) -> None:
        if event.kind == "epoch" and event.epoch == 1:
            raise Stop

    with pytest.raises(Stop):
        train_classifier(toy, "small_cnn", out=out, seed=0, config=FAST, progress=interrupt)
    assert (out / "last.pt").exists() and not (out / "model.pt").exists()
    events = []
    resumed = train_classifier(
        toy, "small_cnn", out=out, seed=0, config=FAST, progress=events.append
    )
    start = events[0]
    assert start.kind == "start" and start.epoch == 1 and start.stats["resumed"]
    assert [e.epoch for e in events if e.kind == "epoch"] == [2, 3]
    assert _same(_weights(resumed.model), _weights(trained.model))
    assert [r["train_loss"] for r in resumed.history] == [r["train_loss"] for r in trained.history]


def test_resume_restores_the_schedule_with_bfloat16_autocast(toy, tmp_path):
    cfg = dataclasses.replace(FAST, scheduler="onecycle", amp=True, checks=False, n_boot=0)
    whole = train_classifier(toy, "small_cnn", out=tmp_path / "whole", seed=2, config=cfg)

    def interrupt(event: TrainEvent) -> None:
        if event.kind == "epoch" and event.epoch == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_classifier(
            toy, "small_cnn", out=tmp_path / "cut", seed=2, config=cfg, progress=interrupt
        )
    resumed = train_classifier(toy, "small_cnn", out=tmp_path / "cut", seed=2, config=cfg)
    assert _same(_weights(resumed.model), _weights(whole.model))
    lrs = [row["lr"] for row in whole.history]
    assert lrs == [row["lr"] for row in resumed.history]
    assert lrs[-1] < lrs[0]  # the one-cycle schedule decays to ~0 at the last step


def test_finished_run_is_reused_and_other_settings_are_refused(toy, trained):
    again = train_classifier(toy, "small_cnn", out=trained.out, seed=0, config=FAST)
    assert again.reused
    assert _same(_weights(again.model), _weights(trained.model))
    assert again.card["test"] == json.loads(json.dumps(trained.card["test"]))
    with pytest.raises(ValueError, match=r"another training run.*lr"):
        train_classifier(
            toy, "small_cnn", out=trained.out, seed=0, config=dataclasses.replace(FAST, lr=0.1)
        )


def test_early_stopping_keeps_the_best_weights(toy, tmp_path):
    # min_delta so large that only the first epoch counts as an improvement.
    cfg = dataclasses.replace(FAST, epochs=10, patience=2, min_delta=100.0, min_epochs=0)
    run = train_classifier(toy, "small_cnn", out=tmp_path / "es", seed=0, config=cfg)
    assert run.card["stop_reason"] == "early stopping"
    assert run.epochs_run == 3 and run.best_epoch == 1
    # Not before min_epochs, though.
    cfg = dataclasses.replace(cfg, min_epochs=4)
    late = train_classifier(toy, "small_cnn", out=tmp_path / "late", seed=0, config=cfg)
    assert late.epochs_run == 4 and late.best_epoch == 1
    one = train_classifier(
        toy, "small_cnn", out=tmp_path / "one", seed=0, config=dataclasses.replace(FAST, epochs=1)
    )
    assert _same(_weights(run.model), _weights(one.model))


def test_model_card_fields_files_and_intervals(trained):
    card = json.loads((trained.out / "model_card.json").read_text())
    for key in (
        "dataset",
        "arch",
        "params",
        "seed",
        "epochs_run",
        "best_epoch",
        "wall_time_s",
        "test",
        "confusion",
        "threshold",
        "findings",
        "versions",
        "history",
    ):
        assert key in card, key
    assert card["dataset"]["counts"]["test"] == {"0": 12, "1": 12}
    assert card["versions"]["torch"] == torch.__version__ and "trustmap" in card["versions"]
    assert card["params"] == sum(p.numel() for p in trained.model.parameters())
    (tn, fp), (fn, tp) = card["confusion"]
    assert tn + fp + fn + tp == 24
    names = ("accuracy", "f1", "sensitivity", "specificity", "ppv", "npv", "informedness")
    names += ("markedness", "mcc", "roc_auc")
    for name in names:
        m = card["test"][name]
        if m["value"] is not None and m["low"] is not None:
            assert m["low"] - 1e-12 <= m["value"] <= m["high"] + 1e-12, name
    for f in card["findings"]:
        assert set(f) >= {"id", "severity", "message"}
    for name in ("model.pt", "model_card.md", "learning_curves.png"):
        assert (trained.out / name).stat().st_size > 0
    assert (trained.out / "learning_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "ROC AUC" in (trained.out / "model_card.md").read_text()
    model, info = load_checkpoint(trained.out / "model.pt")
    assert info["arch"] == "small_cnn" and info["create_kwargs"] == {"width": 4}
    x = torch.rand(3, 1, 24, 24)
    with torch.no_grad():
        assert torch.allclose(model(x), trained.model.eval()(x), atol=1e-6)


def test_youden_threshold_is_chosen_on_validation(toy, tmp_path):
    cfg = dataclasses.replace(FAST, epochs=1, threshold="youden", checks=False, lr=None)
    run = train_classifier(toy, "small_cnn", out=tmp_path / "y", seed=0, config=cfg)
    assert run.card["config"]["lr"] == DEFAULT_LR["classifier"]
    assert 0 <= run.card["threshold"] <= 1
    assert run.card["test"]["threshold"] == run.card["threshold"]


def test_errors_name_the_problem(toy, tmp_path):
    with pytest.raises(ValueError, match=r"unknown architecture 'small_cn'.*small_cnn"):
        train_classifier(toy, "small_cn", out=tmp_path / "x", seed=0, config=FAST)
    with pytest.raises(ValueError, match="localizer"):
        train_classifier(toy, "unet", out=tmp_path / "x", seed=0, config=FAST)
    with pytest.raises(ValueError, match="classifier"):
        train_localizer(toy, "small_cnn", out=tmp_path / "x", seed=0, config=FAST)
    with pytest.raises(ValueError, match="unknown dataset 'no-such-phantom'"):
        train_classifier("no-such-phantom", "small_cnn", out=tmp_path / "x", seed=0, config=FAST)
    with pytest.raises(ValueError, match="batch_size"):
        train_classifier(toy, out=tmp_path / "x", config=dataclasses.replace(FAST, batch_size=1))
    one_class = ToyDataset(n=40, size=24)
    one_class.labels[one_class.splits == "val"] = 0
    with pytest.raises(ValueError, match=r"val split .* one class only"):
        train_classifier(one_class, "small_cnn", out=tmp_path / "x", seed=0, config=FAST)
    no_masks = ToyDataset(n=40, size=24)
    no_masks.ground_truth = "none"
    with pytest.raises(ValueError, match="no lesion masks or boxes"):
        train_localizer(no_masks, "unet", out=tmp_path / "x", seed=0, config=FAST)


@pytest.mark.parametrize(
    ("arch", "kwargs"),
    [
        ("unet", {"channels": (4, 8), "strides": (2,), "num_res_units": 0}),
        ("box_localizer", {"width": 4}),
    ],
)
def test_localizer_training_writes_localization_metrics(toy, tmp_path, arch, kwargs):
    cfg = dataclasses.replace(FAST, epochs=2, model_kwargs=kwargs, lr=None)
    run = train_localizer(toy, arch, out=tmp_path / arch, seed=0, config=cfg)
    assert run.card["config"]["lr"] == DEFAULT_LR["localizer"]
    test = run.card["test"]
    assert test["n_with_lesion"] == 12
    for key in ("dice", "iou", "auprc"):
        m = test[key]
        assert 0 <= m["value"] <= 1
        assert m["low"] <= m["value"] <= m["high"]
    assert run.card["kind"] == "localizer" and run.card["target_kind"] == run.model.target_kind
    _, info = load_checkpoint(run.out / "model.pt")
    assert info["arch"] == arch


def test_unet_learns_the_lesions(toy, tmp_path):
    cfg = dataclasses.replace(
        FAST,
        epochs=6,
        lr=1e-2,
        augment=None,
        checks=False,
        model_kwargs={"channels": (8, 16), "strides": (2,), "num_res_units": 0},
    )
    run = train_localizer(toy, "unet", out=tmp_path / "u", seed=0, config=cfg)
    # A uniform map scores the lesion fraction (~6 %); a learned one ranks lesion pixels first.
    assert run.card["test"]["auprc"]["value"] > 0.5


def test_measure_dataset_auc_writes_the_dataset_card(tmp_path):
    root = write_toy_dir(tmp_path / "toyset", n=60, size=24)
    cfg = dataclasses.replace(FAST, epochs=2, checks=False)
    measured = measure_dataset_auc(root, seed=0, config=cfg)
    card = json.loads((root / "dataset.json").read_text())
    assert card["measured_auc"] == json.loads(json.dumps(measured))
    assert set(measured) >= {"arch", "seed", "test_auc", "ci95", "epochs", "seconds"}
    assert measured["arch"] == "small_cnn" and measured["epochs"] == 2
    lo, hi = measured["ci95"]
    assert lo <= measured["test_auc"] <= hi
    text = (root / "DATASET_CARD.md").read_text()
    assert f"{measured['test_auc']:.3f}" in text and "## Files" in text
    # Measuring again replaces the section instead of adding a second one.
    measure_dataset_auc(root, seed=0, config=cfg)
    assert (root / "DATASET_CARD.md").read_text().count("Measured") == text.count("Measured")


def test_calibration_config_is_cheap_for_large_images_and_volumes():
    assert calibration_config(2, [128, 128]).size == 64
    assert calibration_config(2, [28, 28]).size is None
    assert calibration_config(2).model_kwargs == {"width": 16}
    cfg3 = calibration_config(3, [64, 64, 64])
    assert cfg3.model_kwargs == {"widen_factor": 0.25, "conv1_t_stride": 2}
    assert cfg3.scheduler == "onecycle" and cfg3.patience is None


def test_measure_dataset_auc_needs_a_config_for_another_arch(tmp_path):
    root = write_toy_dir(tmp_path / "toy", n=40, size=24)
    with pytest.raises(ValueError, match="no calibration settings for 'resnet18' in 2D"):
        measure_dataset_auc(root, arch="resnet18")


# ----------------------------------------------------------------------------------------
# Augmentation
# ----------------------------------------------------------------------------------------


def _square_batch(dims: int, n: int = 6, size: int = 20):
    gen = torch.Generator().manual_seed(3)
    images = torch.zeros(n, 1, *(size,) * dims)
    for i in range(n):
        lo = torch.randint(3, size - 9, (dims,), generator=gen).tolist()
        images[(i, 0, *(slice(a, a + 6) for a in lo))] = 1.0
    return images, images.clone()


@pytest.mark.parametrize("dims", [2, 3])
def test_augmentation_moves_mask_exactly_with_the_image(dims):
    images, masks = _square_batch(dims)
    cfg = AugmentConfig(rotate=25, scale=0.2, translate=0.15, contrast=0, brightness=0, flip=(0, 1))
    out = augment(
        images, masks, config=cfg, generator=torch.Generator().manual_seed(0), image_mode="nearest"
    )
    assert not torch.equal(out.images, images)  # it did move
    # Nearest neighbour on one grid: the bright pixels of the image are exactly the mask.
    assert torch.equal(out.images > 0.5, out.masks > 0.5)
    assert set(out.masks.unique().tolist()) <= {0.0, 1.0}


def test_augmentation_boxes_bound_the_transformed_mask():
    images, masks = _square_batch(2)
    boxes = []
    for m in masks[:, 0]:
        rows, cols = m.nonzero(as_tuple=True)
        boxes.append([(float(cols.min()), float(rows.min()), 6.0, 6.0)])
    cfg = AugmentConfig(rotate=10, scale=0.1, translate=0.1)
    out = augment(images, masks, boxes, config=cfg, generator=torch.Generator().manual_seed(1))
    for m, (box,) in zip(out.masks[:, 0], out.boxes):
        rows, cols = m.nonzero(as_tuple=True)
        x, y, w, h = box
        # Every mask pixel lies in the box, and the box is not much larger than the mask.
        assert x <= cols.min() + 0.5 and cols.max() + 0.5 <= x + w
        assert y <= rows.min() + 0.5 and rows.max() + 0.5 <= y + h
        assert w <= (cols.max() - cols.min() + 1) + 3 and h <= (rows.max() - rows.min() + 1) + 3


def test_augmentation_is_seeded_never_flips_by_default_and_leaves_global_rng():
    images, masks = _square_batch(2, n=32)
    state = torch.get_rng_state()
    a = augment(images, masks, config=AugmentConfig(), generator=torch.Generator().manual_seed(5))
    b = augment(images, masks, config=AugmentConfig(), generator=torch.Generator().manual_seed(5))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a.images, b.images) and torch.equal(a.masks, b.masks)
    # A flip has determinant -1; the default keeps laterality (positive determinants).
    det = torch.linalg.det(a.theta[:, :, :2])
    assert (det > 0).all()
    flipped = augment(
        images, config=AugmentConfig(flip=(1,)), generator=torch.Generator().manual_seed(5)
    )
    det = torch.linalg.det(flipped.theta[:, :, :2])
    assert (det < 0).any() and (det > 0).any()


def test_transform_boxes_identity_and_bad_config():
    theta = torch.tensor([[[1.0, 0, 0], [0, 1.0, 0]]], dtype=torch.float64)
    assert transform_boxes([[(2.0, 3.0, 4.0, 5.0)]], theta, (16, 16)) == [[(2.0, 3.0, 4.0, 5.0)]]
    with pytest.raises(ValueError, match="flip axes"):
        augment(
            torch.zeros(1, 1, 8, 8), config=AugmentConfig(flip=(2,)), generator=torch.Generator()
        )
    with pytest.raises(ValueError, match="masks"):
        augment(torch.zeros(2, 1, 8, 8), torch.zeros(2, 1, 4, 4), generator=torch.Generator())


def test_intensity_jitter_keeps_finite_values_and_changes_contrast():
    images, _ = _square_batch(2, n=8)
    images = images * 0.5 + 0.25
    out = augment(
        images,
        config=AugmentConfig(
            rotate=0, scale=0, translate=0, contrast=0.3, brightness=0.2, noise=0.05
        ),
        generator=torch.Generator().manual_seed(0),
    )
    assert torch.isfinite(out.images).all()
    assert not np.allclose(out.images.std((1, 2, 3)).numpy(), images.std((1, 2, 3)).numpy())


def test_localizer_auprc_is_average_precision_with_ties():
    from sklearn.metrics import average_precision_score

    from trustmap.models.training import _average_precision

    rng = np.random.default_rng(0)
    for decimals in (1, 6):  # many ties, few ties
        scores = np.round(rng.random(400), decimals)
        target = rng.random(400) < 0.2
        assert _average_precision(scores, target) == pytest.approx(
            average_precision_score(target, scores), abs=1e-12
        )
