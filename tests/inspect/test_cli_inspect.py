"""``trustmap inspect`` end to end on a tiny dataset folder, and its bad-input errors."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
import typer
from PIL import Image
from typer.testing import CliRunner

from tests.models._toy import write_toy_dir
from trustmap.cli.inspect import inspect
from trustmap.data import open_dataset
from trustmap.models import TrainConfig, train_classifier

runner = CliRunner()
app = typer.Typer()
app.command()(inspect)

FAST = ["--n-images", "40", "--n-embed", "60", "--projection", "pca", "--steps", "4",
        "--threads", "1"]  # fmt: skip


@pytest.fixture(autouse=True)
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _concepts(root, ds):
    masks = ds.tensors().masks[:, 0] > 0.5
    yy, xx = np.mgrid[:24, :24]
    body = (yy - 11.5) ** 2 + (xx - 11.5) ** 2 <= (0.47 * 24) ** 2
    for name in ("lesion", "body"):
        (root / "concepts" / name).mkdir(parents=True)
    for i, sample_id in enumerate(ds.ids):
        if masks[i].any():
            Image.fromarray(masks[i].numpy().astype(np.uint8) * 255).save(
                root / "concepts" / "lesion" / f"{sample_id}.png"
            )
        Image.fromarray(body.astype(np.uint8) * 255).save(
            root / "concepts" / "body" / f"{sample_id}.png"
        )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    base = tmp_path_factory.mktemp("inspect")
    root = write_toy_dir(base / "toyset", n=60, size=24)
    _concepts(root, open_dataset(root))
    config = TrainConfig(epochs=2, batch_size=8, lr=1e-2, model_kwargs={"width": 4}, n_boot=50,
                         patience=None, checks=False)  # fmt: skip
    result = train_classifier(root, "small_cnn", out=base / "run", seed=0, config=config)
    return root, result.checkpoint


def test_writes_json_figures_and_a_self_contained_page(trained, tmp_path):
    _root, ckpt = trained
    out = tmp_path / "out"
    result = runner.invoke(app, [str(ckpt), "--out", str(out), *FAST], terminal_width=200)
    assert result.exit_code == 0, result.output
    numbers = json.loads((out / "inspect.json").read_text())
    assert numbers["layers"] == ["features.block4", "features.block3"]
    assert numbers["data"]["concepts"] == ["body", "lesion"]
    assert [d["layer"] for d in numbers["dissection"]] == numbers["layers"]
    assert {u["label"] for u in numbers["dissection"][0]["unit_labels"]} <= {"body", "lesion", None}
    assert (
        numbers["embedding"]["n"] == 60
        and numbers["embedding"]["projections"][0]["method"] == "pca"
    )
    assert len(numbers["maximization"]) == 3  # two class models and Deep Dream
    assert all(len(m["curve"]) == 4 for m in numbers["maximization"][:2])
    assert numbers["filter_comparison"]["layer"] == "features.block1.conv"
    rows = list(csv.DictReader((out / "embedding.csv").open()))
    assert len(rows) == 60 and "pca_x" in rows[0]
    page = (out / "inspect.html").read_text()
    assert page.count("data:image/png;base64,") == len(list((out / "figures").iterdir()))
    assert "http://" not in page and "https://" not in page and "<script src" not in page
    assert "Network dissection" in page
    # Nothing but the outputs, no temporary directory left beside them.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            ["--layer", "features.blok4"],
            "no layer named 'features.blok4'; did you mean 'features.block4'",
        ),
        (["--layer", "fc"], "layer 'fc' outputs (2,) per image, without spatial axes"),
        (["--projection", "isomap"], "unknown projection 'isomap'"),
        (["--cohort-method", "grad_cma"], "did you mean 'grad_cam'"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(trained, tmp_path, extra, message):
    _, ckpt = trained
    out = tmp_path / "out"
    result = runner.invoke(app, [str(ckpt), "--out", str(out), *FAST, *extra], terminal_width=400)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert result.output.count("error:") == 1 and "Traceback" not in result.output
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_concepts_of_another_shape_and_single_class_data_are_refused(trained, tmp_path):
    _root, ckpt = trained
    bad = tmp_path / "concepts" / "lesion"
    bad.mkdir(parents=True)
    Image.fromarray(np.zeros((12, 12), np.uint8)).save(bad / "toy001.png")
    out = tmp_path / "out"
    args = [str(ckpt), "--out", str(out), "--concepts", str(tmp_path / "concepts"), *FAST]
    result = runner.invoke(app, args, terminal_width=400)
    assert result.exit_code == 2, result.output
    assert "toy001.png has shape (12, 12) but its image 'toy001' has (24, 24)" in result.output
    assert not out.exists()
    single = write_toy_dir(tmp_path / "single", n=60, size=24)
    manifest = (single / "manifest.csv").read_text().splitlines()
    fixed = [manifest[0]] + [
        ",".join([r.split(",")[0], "0", *r.split(",")[2:3], ""]) for r in manifest[1:]
    ]
    (single / "manifest.csv").write_text("\n".join(fixed) + "\n")
    result = runner.invoke(app, [str(ckpt), "--dataset", str(single), "--out", str(out), *FAST],
                           terminal_width=400)  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "the dataset has one class only ([0])" in result.output
    assert not out.exists()


def test_existing_output_is_not_overwritten_without_the_flag(trained, tmp_path):
    _, ckpt = trained
    (tmp_path / "keep.txt").write_text("mine")
    result = runner.invoke(app, [str(ckpt), "--out", str(tmp_path), *FAST], terminal_width=400)
    assert result.exit_code == 2 and "--overwrite" in result.output
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_list_layers(trained):
    _, ckpt = trained
    result = runner.invoke(app, [str(ckpt), "--list-layers"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "features.block4" in result.output and "spatial" in result.output
