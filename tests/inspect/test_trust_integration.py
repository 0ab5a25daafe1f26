"""The attention and ae_anomaly maps run through the trust protocol like any method."""

from __future__ import annotations

import json

import pytest

from tests.models._toy import ToyDataset, write_toy_dir
from tests.trust.test_protocol import tiny_config
from trustmap.models import TrainConfig
from trustmap.models.ae_training import train_autoencoder
from trustmap.trust import run


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    root = tmp_path_factory.mktemp("trust_new")
    data = write_toy_dir(root / "toy", n=80, size=32)
    ae = train_autoencoder(
        ToyDataset(n=80, size=32), "autoencoder", out=root / "ae", seed=0,
        config=TrainConfig(epochs=2, batch_size=16, model_kwargs={"width": 4, "depth": 2},
                           n_boot=10, checks=False, augment=None),
    )  # fmt: skip
    config = tiny_config(
        data,
        root / "out",
        methods=["attention", "ae_anomaly"],
        n_images=4,
        faithfulness={"enabled": False},
        method_params={"ae_anomaly": {"autoencoder": str(ae.out), "smooth": 1.0}},
        models={
            "A": {"arch": "attention_cnn", "seeds": [0, 1], "kwargs": {"width": 4}},
            "B": {
                "arch": "attention_cnn",
                "seed": 0,
                "kwargs": {"width": 4, "compatibility": "dp"},
            },
            "localizer": {
                "arch": "unet",
                "seeds": [0, 1],
                "kwargs": {"channels": [4, 8], "strides": [2], "num_res_units": 0},
            },
        },
    )
    return run(config), root / "out"


def test_both_methods_get_verdicts_on_every_criterion(finished):
    _, out = finished
    results = json.loads((out / "results.json").read_text())
    for method in ("attention", "ae_anomaly"):
        entry = results["methods"][method]
        for criterion in ("utility", "randomization", "repeatability", "reproducibility"):
            assert entry[criterion]["n"] > 0, (method, criterion)
            assert entry[criterion]["verdict"] in ("pass", "fail", "uncertain"), (method, criterion)
    # The autoencoder's maps do not depend on the classifier: the replicates' maps agree
    # exactly, and randomizing the classifier leaves them as they were.
    ae = results["methods"]["ae_anomaly"]
    assert ae["repeatability"]["mean"] == pytest.approx(1.0)
    assert ae["randomization"]["mean"] == pytest.approx(1.0)
    assert "attention" in (out / "report.html").read_text()
