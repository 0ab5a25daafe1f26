"""Autoencoders trained on normal images, and the attention architectures, as models."""

from __future__ import annotations

import pytest
import torch

from tests.models._toy import ToyDataset
from trustmap.models import create, load_checkpoint
from trustmap.models.ae_training import anomaly_maps, train_autoencoder
from trustmap.models.training import TrainConfig, train_classifier

FAST = TrainConfig(
    epochs=6,
    batch_size=8,
    lr=3e-3,
    model_kwargs={"width": 4, "depth": 2, "latent_channels": 4},
    n_boot=100,
    patience=None,
    augment=None,
)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def toy():
    return ToyDataset(n=120, size=24)


@pytest.fixture(scope="module")
def trained_ae(toy, tmp_path_factory):
    return train_autoencoder(
        toy, "autoencoder", out=tmp_path_factory.mktemp("ae"), seed=0, config=FAST
    )


def test_autoencoder_learns_normal_images_and_localizes_the_lesion(trained_ae) -> None:
    losses = [row["train_loss"] for row in trained_ae.history]
    assert losses[-1] < 0.5 * losses[0]
    test = trained_ae.card["test"]
    # The toy lesion is a bright square the autoencoder never saw: its error map finds it
    # better than the mean lesion mask does, and the image error detects the positives.
    assert test["auprc"]["value"] > test["avg_auprc"]["value"] + 0.2
    assert test["roc_auc"]["value"] > 0.9
    assert trained_ae.card["kind"] == "autoencoder"


def test_only_normal_images_are_seen(toy, tmp_path) -> None:
    seen = []

    from trustmap.models import ae_training

    task_cls = ae_training._AutoencoderTask
    original = task_cls.batch_loss

    def spy(self, model, idx, gen):
        seen.extend(self.data.labels[idx].tolist())
        return original(self, model, idx, gen)

    task_cls.batch_loss = spy
    try:
        train_autoencoder(
            toy,
            "vae",
            out=tmp_path,
            seed=0,
            config=TrainConfig(**{**FAST.__dict__, "epochs": 1, "checks": False}),
        )
    finally:
        task_cls.batch_loss = original
    assert seen and set(seen) == {0}


def test_checkpoint_round_trip_and_resume(trained_ae, toy) -> None:
    model, info = load_checkpoint(trained_ae.checkpoint)
    assert info["arch"] == "autoencoder" and info["num_classes"] == 1
    x = toy.tensors("test").images[:4]
    assert torch.allclose(anomaly_maps(model, x), anomaly_maps(trained_ae.model, x))
    again = train_autoencoder(toy, "autoencoder", out=trained_ae.out, seed=0, config=FAST)
    assert again.reused


def test_vae_is_deterministic_in_eval_mode_and_samples_in_training() -> None:
    vae = create("vae", 2, 1, 1, width=2, depth=2, seed=0)
    x = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    vae.eval()
    assert torch.equal(vae(x), vae(x))
    vae.train()
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(0)
        a = vae(x)
        b = vae(x)
    assert not torch.equal(a, b)
    plain = create("autoencoder", 2, 1, 1, width=2, depth=2, seed=0).eval()
    with torch.no_grad():
        assert float(plain.loss(x)) == pytest.approx(float(((plain(x) - x) ** 2).mean()), rel=1e-6)


def test_bad_arguments_name_the_problem(toy, tmp_path) -> None:
    with pytest.raises(ValueError, match="num_classes must be 1"):
        create("autoencoder", 2, 1, 2)
    with pytest.raises(ValueError, match="unknown autoencoder"):
        train_autoencoder(toy, "small_cnn", out=tmp_path, config=FAST)
    with pytest.raises(ValueError, match="normal_class 5"):
        train_autoencoder(toy, "vae", out=tmp_path, config=FAST, normal_class=5)
    with pytest.raises(ValueError, match="compatibility must be one of"):
        create("attention_cnn", 2, 1, 2, compatibility="cosine")
    with pytest.raises(ValueError, match="attention_blocks"):
        create("attention_cnn", 2, 1, 2, attention_blocks=(4,))


def test_attention_cnn_trains_through_the_classifier_loop(toy, tmp_path) -> None:
    config = TrainConfig(
        epochs=3, batch_size=8, lr=1e-2, model_kwargs={"width": 4}, n_boot=100, patience=None
    )
    result = train_classifier(toy, "attention_cnn", out=tmp_path, seed=0, config=config)
    assert result.card["arch"] == "attention_cnn"
    assert result.card["test"]["roc_auc"]["value"] > 0.8
    _, info = load_checkpoint(result.checkpoint)
    assert info["arch"] == "attention_cnn"
