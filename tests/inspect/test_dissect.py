"""Network dissection (Bau et al. 2017) against a brute-force reference, and on a model
whose units are known concept detectors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from tests.conftest import assert_no_hooks, make_input, make_tiny
from tests.models._toy import write_toy_dir
from trustmap.data import open_dataset
from trustmap.inspect import concept_masks, dissect, influential_units, load_concepts


def reference_iou(acts: np.ndarray, masks: np.ndarray, quantile: float) -> np.ndarray:
    """Every map upsampled with F.interpolate, thresholded, and the IoU summed over the
    dataset in numpy: the slow, obvious computation."""
    _n, units, *s = acts.shape
    size = masks.shape[2:]
    flat = acts.transpose(1, 0, *range(2, acts.ndim)).reshape(units, -1)
    k = math.ceil(quantile * flat.shape[1])
    thresholds = np.sort(flat, axis=1)[:, -k]
    mode = "bilinear" if len(s) == 2 else "trilinear"
    up = F.interpolate(torch.from_numpy(acts), size=size, mode=mode, align_corners=False).numpy()
    fired = up > thresholds.reshape(1, units, *([1] * len(s)))
    iou = np.zeros((units, masks.shape[1]))
    for u in range(units):
        for c in range(masks.shape[1]):
            inter = np.logical_and(fired[:, u], masks[:, c]).sum()
            union = np.logical_or(fired[:, u], masks[:, c]).sum()
            iou[u, c] = inter / union if union else 0.0
    return iou


class Fixed(nn.Module):
    """A 'model' whose layer ``feat`` outputs given activations, one image per input row."""

    def __init__(self, acts: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("acts", acts)
        self.feat = nn.Identity()
        self.head = nn.Linear(acts.shape[1], 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idx = x.flatten(1)[:, 0].round().long()
        a = self.feat(self.acts[idx])
        return self.head(a.flatten(2).mean(2))


@pytest.mark.parametrize(
    ("shape", "size", "n_concepts"),
    [((8, 8), (32, 32), 3), ((5, 7), (20, 21), 10), ((3, 4, 4), (9, 12, 12), 3)],
)
def test_iou_equals_the_brute_force_reference(shape, size, n_concepts):
    gen = torch.Generator().manual_seed(0)
    n, units = 12, 6
    acts = torch.randn(n, units, *shape, generator=gen, dtype=torch.float64)
    masks = torch.rand(n, n_concepts, *size, generator=gen) > 0.7
    model = Fixed(acts).double()
    x = torch.arange(n, dtype=torch.float64).view(n, 1, *([1] * len(shape))).expand(n, 1, *size)
    cm = concept_masks({f"c{i}": masks[:, i] for i in range(n_concepts)})
    for quantile in (0.005, 0.05):
        result = dissect(model, x.clone(), cm, layer="feat", quantile=quantile, batch_size=5)
        expected = reference_iou(acts.numpy(), masks.numpy(), quantile)
        np.testing.assert_allclose(result.iou, expected, atol=1e-12)
    assert result.units == units and result.resolution == size


def test_units_that_detect_a_concept_are_labelled_with_it():
    # Unit k of the layer is concept k average-pooled 4x: dissection must recover k -> k.
    gen = torch.Generator().manual_seed(1)
    n = 40
    masks = torch.zeros(n, 3, 32, 32, dtype=torch.bool)
    for i in range(n):
        for c in range(3):
            r, q = torch.randint(0, 24, (2,), generator=gen).tolist()
            masks[i, c, r : r + 6, q : q + 6 + 2 * c] = True
    acts = F.avg_pool2d(masks.double(), 4) + 1e-3 * torch.rand(n, 3, 8, 8, generator=gen)
    model = Fixed(acts.double()).double()
    x = torch.arange(n, dtype=torch.float64).view(n, 1, 1, 1).expand(n, 1, 32, 32).clone()
    names = {"small": masks[:, 0], "medium": masks[:, 1], "large": masks[:, 2]}
    result = dissect(model, x, names, layer="feat", quantile=0.03)
    assert result.labels == ("small", "medium", "large")
    assert (result.best_iou > 0.2).all()
    assert list(result.units_for("medium")) == [1]
    assert result.counts() == {"small": 1, "medium": 1, "large": 1}
    table = result.to_dict()
    assert table["best_unit_per_concept"]["large"]["unit"] == 2


def test_bad_input_gets_one_clear_error():
    model = make_tiny(2)
    x = make_input(2, 4)
    good = {"blob": torch.zeros(4, 16, 16, dtype=torch.bool)}
    good["blob"][:, 4:8, 4:8] = True
    with pytest.raises(ValueError, match=r"no layer named 'conv9'"):
        dissect(model, x, good, layer="conv9")
    with pytest.raises(ValueError, match=r"layer 'fc' outputs shape .* network dissection"):
        dissect(model, x, good, layer="fc")
    with pytest.raises(ValueError, match=r"cover 3 images but the data has 4"):
        dissect(model, x, {"blob": good["blob"][:3]}, layer="conv3")
    with pytest.raises(ValueError, match=r"concept 'b' has shape \(4, 8, 8\)"):
        dissect(
            model,
            x,
            {"a": good["blob"], "b": torch.zeros(4, 8, 8, dtype=torch.bool)},
            layer="conv3",
        )
    with pytest.raises(ValueError, match=r"empty on every image"):
        dissect(model, x, {**good, "none": torch.zeros(4, 16, 16, dtype=torch.bool)}, layer="conv3")
    assert_no_hooks(model)


def test_concepts_load_from_a_dataset_folder_and_wrong_shapes_are_named(tmp_path):
    root = write_toy_dir(tmp_path / "toy", n=20, size=24)
    ds = open_dataset(root)
    (root / "concepts" / "lesion").mkdir(parents=True)
    (root / "concepts" / "body").mkdir()
    masks = ds.tensors().masks[:, 0] > 0.5
    for i, sample_id in enumerate(ds.ids):
        if masks[i].any():
            Image.fromarray(masks[i].numpy().astype(np.uint8) * 255).save(
                root / "concepts" / "lesion" / f"{sample_id}.png"
            )
        Image.fromarray(np.full((24, 24), 255, np.uint8)).save(
            root / "concepts" / "body" / f"{sample_id}.png"
        )
    cm = load_concepts(ds)
    assert cm.names == ("body", "lesion")
    assert torch.equal(cm.masks[:, 1], masks)
    assert cm.masks[:, 0].all()
    small = load_concepts(ds, names=["lesion"], size=12)
    assert small.masks.shape == (20, 1, 12, 12)
    with pytest.raises(ValueError, match=r"no concept 'lesions'.*did you mean 'lesion'"):
        load_concepts(ds, names=["lesions"])
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(root / "concepts" / "body" / "toy003.png")
    with pytest.raises(ValueError, match=r"toy003.png has shape \(20, 20\) but its image 'toy003'"):
        load_concepts(ds)
    with pytest.raises(FileNotFoundError, match="no concept folder"):
        load_concepts(ds, folder=tmp_path / "nowhere")


def test_influence_is_gradient_times_activation():
    model = make_tiny(2).eval()
    x = make_input(2, 5)
    table = influential_units(model, x, layer="conv3", target=2, top=3, n_examples=2, crop=8)
    store = {}
    handle = model.conv3.register_forward_hook(lambda _m, _i, o: store.setdefault("a", o))
    try:
        out = model(x)
    finally:
        handle.remove()
    (grad,) = torch.autograd.grad(out[:, 2].sum(), store["a"])
    expected = (grad * store["a"]).detach().flatten(2).sum(2).mean(0)
    np.testing.assert_allclose(table.influence, expected.numpy(), rtol=1e-5, atol=1e-7)
    assert [row.unit for row in table.rows] == torch.argsort(expected, descending=True)[:3].tolist()
    assert table.rows[0].crops.shape == (2, 1, 8, 8)
    assert_no_hooks(model)
