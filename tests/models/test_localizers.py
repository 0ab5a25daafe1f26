"""Localizers: U-Net (masks, 2D and 3D) and the CenterNet-style box detector."""

from __future__ import annotations

import math

import pytest
import torch

from trustmap.models import BoxLocalizer, SegmentationLocalizer, create
from trustmap.models.localizers import nms

TINY_UNET = {"channels": (4, 8, 16), "strides": (2, 2), "num_res_units": 1}


def _blobs(shape, boxes_per_image, seed=0):
    """Images of faint noise with bright rectangles, and their masks."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=gen) * 0.2
    masks = torch.zeros(shape)
    for b, boxes in enumerate(boxes_per_image):
        for box in boxes:
            region = (b, 0, *(slice(int(lo), int(lo + ext)) for lo, ext in box))
            x[region] += 0.8
            masks[region] = 1.0
    return x, masks


def _overfit(model, x, masks, boxes, steps=30, lr=1e-2):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = model.loss(model(x), masks, boxes)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


# -- U-Net ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dims", "shape", "regions"),
    [
        (2, (2, 1, 24, 24), [[((4, 6), (6, 8))], [((12, 6), (14, 4))]]),
        (3, (2, 1, 8, 16, 16), [[((2, 4), (3, 6), (4, 5))], [((4, 3), (8, 5), (8, 6))]]),
    ],
)
def test_unet_overfits_two_examples(dims, shape, regions):
    model = create("unet", spatial_dims=dims, seed=0, **TINY_UNET)
    assert isinstance(model, SegmentationLocalizer) and model.target_kind == "mask"
    x, masks = _blobs(shape, regions)
    losses = _overfit(model, x, masks, None, lr=3e-2)
    assert losses[-1] < 0.5 * losses[0], losses
    model.eval()
    with torch.no_grad():
        lmap = model.localization_map(model(x), shape[2:])
    assert lmap.shape == (2, 1, *shape[2:])
    assert float(lmap.min()) >= 0 and float(lmap.max()) <= 1
    # After fitting, lesion pixels score above background ones in each image.
    for b in range(2):
        inside = lmap[b][masks[b] > 0].mean()
        outside = lmap[b][masks[b] == 0].mean()
        assert inside > outside + 0.2


@pytest.mark.parametrize("shape", [(1, 1, 21, 27), (1, 1, 7, 10, 13)])
def test_unet_any_input_size(shape):
    model = create("unet", spatial_dims=len(shape) - 2, seed=0, **TINY_UNET).eval()
    x = torch.rand(shape, requires_grad=True)
    out = model(x)
    assert out.shape == shape
    out.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_unet_loss_is_bce_plus_soft_dice():
    model = create("unet", seed=0, **TINY_UNET, dice_weight=0.5, pos_weight=3.0)
    logits = torch.tensor([[[[2.0, -1.0], [0.0, -3.0]]]], dtype=torch.float64)
    mask = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]]]], dtype=torch.float64)
    p = torch.sigmoid(logits)
    # BCE with lesion pixels weighted by pos_weight, averaged over the 4 pixels.
    bce = -(3.0 * mask * torch.log(p) + (1 - mask) * torch.log(1 - p)).mean()
    dice = 1 - (2 * (p * mask).sum() + 1) / (p.sum() + mask.sum() + 1)
    expected = bce + 0.5 * dice
    assert torch.allclose(model.loss(logits, mask, None), expected)


def test_unet_localization_map_resizes():
    model = create("unet", seed=0, **TINY_UNET)
    logits = torch.full((1, 1, 4, 4), -20.0)
    logits[..., :2, :2] = 20.0
    lmap = model.localization_map(logits, (8, 8))
    assert lmap.shape == (1, 1, 8, 8)
    assert torch.allclose(lmap[0, 0, :3, :3], torch.ones(3, 3))
    assert torch.allclose(lmap[0, 0, 5:, 5:], torch.zeros(3, 3))
    assert float(lmap.min()) >= 0 and float(lmap.max()) <= 1


def test_unet_errors():
    model = create("unet", seed=0, **TINY_UNET)
    out = torch.zeros(2, 1, 8, 8)
    with pytest.raises(ValueError, match="masks must have the output's shape"):
        model.loss(out, torch.zeros(2, 1, 8, 9), None)
    with pytest.raises(ValueError, match="needs masks"):
        model.loss(out, None, [[], []])
    with pytest.raises(ValueError, match=r"values in \[0, 1\]"):
        model.loss(out, torch.full((2, 1, 8, 8), 255.0), None)
    with pytest.raises(ValueError, match="output must have shape"):
        model.localization_map(torch.zeros(2, 3, 8, 8), (8, 8))
    with pytest.raises(ValueError, match="spatial must be 2 positive integers"):
        model.localization_map(out, (8, 8, 8))
    with pytest.raises(ValueError, match="one stride fewer"):
        create("unet", channels=(4, 8), strides=(2, 2))


# -- box localizer -------------------------------------------------------------------------

BOXES = [[(4.0, 6.0, 10.0, 8.0)], [(14.0, 12.0, 12.0, 16.0), (2.0, 2.0, 6.0, 6.0)]]


def _box_images(boxes, size=32, seed=0):
    regions = [[((y, h), (x, w)) for x, y, w, h in image] for image in boxes]
    return _blobs((len(boxes), 1, size, size), regions, seed)


def test_box_localizer_overfits_two_examples():
    model = create("box_localizer", width=8, seed=0)
    assert isinstance(model, BoxLocalizer) and model.target_kind == "boxes"
    x, masks = _box_images(BOXES)
    losses = _overfit(model, x, None, BOXES, steps=30)
    assert losses[-1] < 0.2 * losses[0], losses
    model.eval()
    with torch.no_grad():
        out = model(x)
    found = model.predict_boxes(out, score_threshold=0.2)
    for truth, predicted in zip(BOXES, found):
        for box in truth:
            assert max(_iou(box, p[:4]) for p in predicted) > 0.5, (box, predicted)
    lmap = model.localization_map(out, (32, 32))
    assert lmap.shape == (2, 1, 32, 32)
    assert float(lmap.min()) >= 0 and float(lmap.max()) <= 1
    # The map ranks box pixels above the rest.
    assert lmap[masks > 0].mean() > lmap[masks == 0].mean() + 0.3


def _iou(a, b):
    ax0, ay0, aw, ah = a
    bx0, by0, bw, bh = b
    iw = max(0.0, min(ax0 + aw, bx0 + bw) - max(ax0, bx0))
    ih = max(0.0, min(ay0 + ah, by0 + bh) - max(ay0, by0))
    inter = iw * ih
    return inter / (aw * ah + bw * bh - inter)


def test_predict_boxes_from_hand_built_output():
    model = BoxLocalizer(width=4)
    # Box x=11, y=14, w=18, h=10: centre (20, 19) pixels = (5.0, 4.75) cells of stride 4,
    # so cell (i=4, j=5) with offset (dx=0, dy=0.75), size (18/4, 10/4) cells.
    out = torch.zeros(1, 5, 8, 8)
    out[0, 0] = -10.0
    out[0, 0, 4, 5] = 3.0
    out[0, 1:, 4, 5] = torch.tensor([0.0, 0.75, math.log(18 / 4), math.log(10 / 4)])
    (boxes,) = model.predict_boxes(out)
    assert len(boxes) == 1
    x, y, w, h, score = boxes[0]
    assert (x, y, w, h) == pytest.approx((11.0, 14.0, 18.0, 10.0), abs=1e-5)
    assert score == pytest.approx(1 / (1 + math.exp(-3.0)), abs=1e-6)
    # Map: the box's pixel columns 11..28 and rows 14..23 carry its score, the rest 0.
    lmap = model.localization_map(out, (32, 32))
    expected = torch.zeros(32, 32)
    expected[14:24, 11:29] = score
    assert torch.allclose(lmap[0, 0], expected)


def test_encode_decode_round_trip():
    model = BoxLocalizer(width=4, score_threshold=0.5)
    boxes = [[(3.0, 5.0, 7.0, 9.0), (20.0, 18.0, 9.5, 11.0)], []]
    heat, centres, regression = model.encode(boxes, (10, 10))
    assert heat.shape == (2, 1, 10, 10) and heat.max() == 1 and heat[1].max() == 0
    assert centres.tolist() == [[0, 2, 1], [0, 5, 6]]
    # A perfect output: heatmap logit from the target, regression at the centre cells.
    out = torch.zeros(2, 5, 10, 10)
    out[:, :1] = torch.logit(heat.clamp(1e-6, 1 - 1e-6))
    out[centres[:, 0], 1:, centres[:, 1], centres[:, 2]] = regression
    decoded = model.predict_boxes(out)
    assert decoded[1] == []
    got = sorted(b[:4] for b in decoded[0])
    for truth, found in zip(sorted(boxes[0]), got):
        assert found == pytest.approx(truth, abs=1e-4)


def test_box_localization_map_takes_best_covering_box():
    model = BoxLocalizer(width=4, map_threshold=0.05)
    out = torch.full((1, 5, 5, 5), -10.0)
    out[0, 1:] = 0.0
    # Box A: cell (1, 1), centre (6, 6), 8 px wide -> [2, 10)^2, score sigmoid(2).
    # Box B: cell (3, 3), centre (14, 14), 12 px wide -> [8, 20)^2, score sigmoid(-1).
    for (i, j), logit, size in (((1, 1), 2.0, 2.0), ((3, 3), -1.0, 3.0)):
        out[0, 0, i, j] = logit
        out[0, 1:, i, j] = torch.tensor([0.5, 0.5, math.log(size), math.log(size)])
    hi, lo = torch.sigmoid(torch.tensor(2.0)), torch.sigmoid(torch.tensor(-1.0))
    lmap = model.localization_map(out, (20, 20))[0, 0]
    expected = torch.zeros(20, 20)
    expected[8:20, 8:20] = lo
    expected[2:10, 2:10] = hi  # the overlap [8, 10)^2 takes the better box's score
    assert torch.allclose(lmap, expected)
    assert len(model.predict_boxes(out, score_threshold=0.05, nms_iou=0.1)[0]) == 2


def test_box_localization_map_scales_to_another_size():
    model = BoxLocalizer(width=4)
    out = torch.full((1, 5, 4, 4), -10.0)
    out[0, 0, 1, 1] = 5.0
    out[0, 1:, 1, 1] = torch.tensor([0.5, 0.5, math.log(2.0), math.log(2.0)])  # box [2, 10)^2
    lmap = model.localization_map(out, (32, 32))[0, 0]  # the image was 16 px: scale 2
    assert lmap[4:20, 4:20].min() > 0.99 and lmap[20:, :].max() == 0 and lmap[:4, :].max() == 0


def test_nms():
    boxes = torch.tensor([[0.0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 5, 5], [0, 0, 10, 10]])
    scores = torch.tensor([0.5, 0.9, 0.3, 0.1])
    assert nms(boxes, scores, 0.5).tolist() == [1, 2]
    assert nms(boxes, scores, 0.99).tolist() == [1, 0, 2]  # IoU(0, 3) = 1 > 0.99
    assert nms(boxes[:0], scores[:0], 0.5).tolist() == []


def test_box_localizer_shapes_and_errors():
    model = create("box_localizer", width=4, seed=0)
    assert model(torch.rand(2, 1, 30, 30)).shape == (2, 5, 8, 8)
    assert model(torch.rand(1, 1, 64, 48)).shape == (1, 5, 16, 12)
    out = torch.zeros(2, 5, 8, 8)
    with pytest.raises(ValueError, match="one list of"):
        model.loss(out, None, [[(1.0, 1.0, 4.0, 4.0)]])
    with pytest.raises(ValueError, match="positive width and height"):
        model.loss(out, None, [[(1.0, 1.0, -4.0, 4.0)], []])
    with pytest.raises(ValueError, match=r"must be \(x, y, width, height\)"):
        model.loss(out, None, [[(1.0, 1.0)], []])
    with pytest.raises(ValueError, match="top_k"):
        model.predict_boxes(out, top_k=0)
    with pytest.raises(ValueError, match="output must have shape"):
        model.predict_boxes(torch.zeros(2, 1, 8, 8))
    with pytest.raises(ValueError, match="2D only"):
        BoxLocalizer(spatial_dims=3)
    # Images without boxes still give a finite loss with a gradient.
    out = model(torch.rand(2, 1, 32, 32))
    loss = model.loss(out, None, [[], []])
    loss.backward()
    assert math.isfinite(loss.item()) and loss.item() > 0
