"""HiPe: a loop-by-loop reference, a planted hot spot found with fewer evaluations than
occlusion, batching, errors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import trustmap
from tests.conftest import assert_no_hooks, make_input, make_tiny


class Spot(nn.Module):
    """Two logits: 0 and the sum of ``x`` over a box (weights ``w``), so occluding a
    window with zeros drops the score by the box voxels it covers."""

    def __init__(self, spatial: tuple[int, ...], box: tuple[slice, ...]) -> None:
        super().__init__()
        w = torch.zeros(spatial, dtype=torch.float64)
        w[box] = 1.0
        self.register_buffer("w", w)
        self.scale = nn.Parameter(torch.tensor(1.0, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.scale * (x[:, 0] * self.w).flatten(1).sum(1)
        return torch.stack([torch.zeros_like(s), s], 1)


@torch.no_grad()
def reference_hipe(model, x, start_cells, min_window, rule):
    """HiPe on one 2D image, window by window, with a zero baseline."""
    h, w = x.shape[2:]
    clean = float(model(x)[0, 1])
    saliency = torch.zeros((h, w), dtype=x.dtype)
    counts = list(start_cells)
    evaluations, first = 1, True
    while True:
        cells = [math.ceil(s / n) for s, n in zip((h, w), counts)]
        flat = saliency.flatten()
        if rule == "mean":
            threshold = float(flat.mean())
        else:
            threshold = float(flat.min() + (flat.max() - flat.min()) / 2)
        added = torch.zeros_like(saliency)
        for ky in range(math.ceil(h / cells[0]) + 1):
            for kx in range(math.ceil(w / cells[1]) + 1):
                y0, y1 = max(0, (ky - 1) * cells[0]), min(h, (ky + 1) * cells[0])
                x0, x1 = max(0, (kx - 1) * cells[1]), min(w, (kx + 1) * cells[1])
                if not first and float(saliency[y0:y1, x0:x1].max()) < threshold:
                    continue
                occluded = x.clone()
                occluded[:, :, y0:y1, x0:x1] = 0
                drop = max(0.0, clean - float(model(occluded)[0, 1]))
                added[y0:y1, x0:x1] += drop
                evaluations += 1
        saliency += added
        first = False
        done = [c == 1 or 2 * c <= m for c, m in zip(cells, min_window)]
        if all(done):
            return saliency, evaluations
        counts = [n if d else 2 * n for n, d in zip(counts, done)]


@pytest.mark.parametrize("rule", ["mid_range", "mean"])
def test_matches_the_window_by_window_reference(rule):
    box = (slice(3, 6), slice(7, 10))
    model = Spot((13, 12), box)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand((1, 1, 13, 12), generator=gen, dtype=torch.float64) + 0.5
    exp = trustmap.get_method("hipe")(model, start_cells=2, min_window=2, threshold=rule).explain(
        x, target=1
    )
    expected, evaluations = reference_hipe(model, x, (2, 2), (2, 2), rule)
    assert torch.allclose(exp.attributions[0, 0], expected, atol=1e-12)
    assert exp.params["n_evaluations"] == [evaluations]
    assert sum(exp.params["windows_per_level"][0]) + 1 == evaluations


@pytest.mark.parametrize(
    ("spatial", "box", "window"),
    [
        ((64, 64), (slice(40, 46), slice(10, 16)), 4),
        ((16, 32, 32), (slice(4, 8), slice(20, 24), slice(5, 9)), 2),
    ],
    ids=["2d", "3d"],
)
def test_finds_a_planted_hot_spot_with_fewer_evaluations(spatial, box, window):
    model = Spot(spatial, box)
    gen = torch.Generator().manual_seed(1)
    x = torch.rand((1, 1, *spatial), generator=gen, dtype=torch.float64) + 0.5
    exp = trustmap.get_method("hipe")(model, min_window=window).explain(x, target=1)
    a = exp.attributions[0, 0]
    inside = torch.zeros(spatial, dtype=torch.bool)
    inside[box] = True
    n_box = int(inside.sum())
    top = torch.zeros(a.numel(), dtype=torch.bool)
    top[a.flatten().topk(n_box).indices] = True
    overlap = int((top & inside.flatten()).sum()) / n_box
    assert overlap > 0.7, overlap
    assert inside.flatten()[a.flatten().argmax()]
    # The box was examined at the finest level; most of the image was not.
    region = exp.params["finest_region"][0, 0]
    assert region[inside].all()
    assert float(region.float().mean()) < 0.3
    # Occlusion with the finest windows everywhere costs far more.
    assert exp.params["n_evaluations"][0] < 0.3 * exp.params["occlusion_evaluations"]


def test_batch_is_one_call_per_level_and_rows_are_independent():
    model = make_tiny(2).double()
    x = make_input(2, 3, dtype=torch.float64)
    hipe = trustmap.get_method("hipe")
    batch = hipe(model, min_window=4).explain(x)
    alone = hipe(model, min_window=4).explain(x[1:2])
    assert torch.allclose(batch.attributions[1:2], alone.attributions, atol=1e-12)
    assert batch.params["n_evaluations"][1] == alone.params["n_evaluations"][0]
    assert len(batch.params["windows_per_level"]) == 3
    assert all(p.grad is None for p in model.parameters())
    assert_no_hooks(model)


def test_noise_baseline_is_seeded():
    model = make_tiny(3)
    x = make_input(3, 1)
    hipe = trustmap.get_method("hipe")
    first = hipe(model, baseline="noise", min_window=4, seed=2).explain(x)
    second = hipe(model, baseline="noise", min_window=4, seed=2).explain(x)
    assert torch.equal(first.attributions, second.attributions)
    assert first.params["seed"] == 2


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"min_window": 0}, "min_window"),
        ({"min_window": (2, 2, 2)}, "one per spatial dimension"),
        ({"start_cells": 0}, "start_cells"),
        ({"start_cells": 17}, "larger than the image"),
        ({"threshold": "median"}, "threshold"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_errors(params, message):
    with pytest.raises(ValueError, match=message):
        trustmap.explain(make_tiny(2), make_input(2, 1), "hipe", **params)
