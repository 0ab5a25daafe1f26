"""Occlusion: analytic identities, a loop reference, baselines, batching and errors."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

import trustmap
from tests.conftest import make_input, make_tiny


class Linear(nn.Module):
    """``f(x) = (sum w x, -sum w x)``: the drop of a window is ``sum_window w (x - b)``."""

    def __init__(self, shape: tuple[int, ...], seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.w = nn.Parameter(torch.randn(shape, generator=gen, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = (x * self.w).flatten(1).sum(1)
        return torch.stack([s, -s], 1)


def loop_reference(model, x, target, window, stride, base):
    """Occlusion by an explicit loop over window positions (independent of the library)."""
    b, _, *spatial = x.shape
    starts = [
        list(range(0, max(n - w, 0) + 1, s))
        + ([] if (n - w) % s == 0 else [((n - w) // s + 1) * s])
        for n, w, s in zip(spatial, window, stride)
    ]
    total = torch.zeros((b, *spatial), dtype=x.dtype)
    count = torch.zeros(spatial, dtype=x.dtype)
    with torch.no_grad():
        score = model(x)[:, target]
        for origin in itertools.product(*starts):
            sl = tuple(slice(o, o + w) for o, w in zip(origin, window))
            xo = x.clone()
            xo[(slice(None), slice(None), *sl)] = base[(slice(None), slice(None), *sl)]
            drop = score - model(xo)[:, target]
            total[(slice(None), *sl)] += drop.view(b, *([1] * len(spatial)))
            count[sl] += 1
    return torch.where(count > 0, total / count.clamp_min(1), 0.0).unsqueeze(1)


def test_linear_model_tiling_is_exact():
    # Non-overlapping windows tiling the image: each voxel gets its window's sum w (x - b).
    x = make_input(2, 2, channels=2, dtype=torch.float64)
    model = Linear(tuple(x.shape[1:]))
    attr = trustmap.explain(model, x, "occlusion", target=0, window=4, stride=4, baseline=0.5)
    contrib = (model.w * (x - 0.5)).sum(1)  # (B, 16, 16)
    blocks = contrib.view(2, 4, 4, 4, 4).sum((2, 4))  # per 4x4 window
    expected = blocks.repeat_interleave(4, 1).repeat_interleave(4, 2).unsqueeze(1)
    assert attr.shape == (2, 1, 16, 16)
    torch.testing.assert_close(attr, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    ("dims", "window", "stride"),
    [
        (2, (5, 3), (4, 2)),  # overlapping, last window cut off by the border
        (2, 3, 5),  # stride > window: uncovered voxels get 0
        (2, 16, 1),  # window = image: one window
        (3, (3, 2, 4), (2, 2, 3)),
    ],
)
def test_matches_loop_reference(dims, window, stride):
    model = make_tiny(dims, in_channels=2).double()
    x = make_input(dims, 2, channels=2, dtype=torch.float64)
    nd = dims
    w = (window,) * nd if isinstance(window, int) else window
    s = (stride,) * nd if isinstance(stride, int) else stride
    base = torch.full_like(x, -0.3)
    ref = loop_reference(model.eval(), x, 1, w, s, base)
    got = trustmap.explain(
        model, x, "occlusion", target=1, window=window, stride=stride, baseline=-0.3
    )
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    if isinstance(stride, int) and isinstance(window, int) and stride > window:
        assert (got[:, :, 3:5] == 0).all()  # rows 3, 4 lie between windows at 0 and 5


def test_batch_is_one_call_and_equals_per_sample():
    model = make_tiny(2).double()
    x = make_input(2, 3, dtype=torch.float64)
    calls = []
    handle = model.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    try:
        exp = trustmap.get_method("occlusion")(model, window=4, stride=4, batch_size=200).explain(x)
    finally:
        handle.remove()
    # x (3 rows) and 16 windows x 3 samples in one pass.
    assert calls == [3 + 48]
    assert exp.params["n_windows"] == 16 and exp.params["n_evaluations"] == 3 * 17
    for i in range(3):
        single = trustmap.explain(
            model, x[i : i + 1], "occlusion", target=exp.target[i : i + 1], window=4, stride=4
        )
        torch.testing.assert_close(exp.attributions[i : i + 1], single, rtol=1e-10, atol=1e-12)


def test_batch_size_does_not_change_the_map():
    model = make_tiny(3).double()
    x = make_input(3, 2, dtype=torch.float64)
    a = trustmap.explain(model, x, "occlusion", window=4, stride=2, batch_size=1)
    b = trustmap.explain(model, x, "occlusion", window=4, stride=2)
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("baseline", ["mean", "blur", "zeros"])
def test_named_baselines_equal_their_tensor(baseline):
    from trustmap.methods.perturbation._common import perturbation_baseline

    model = make_tiny(2, in_channels=2).double()
    x = make_input(2, 2, channels=2, dtype=torch.float64)
    ref = perturbation_baseline(x, baseline)
    a = trustmap.explain(model, x, "occlusion", window=6, stride=3, baseline=baseline)
    b = trustmap.explain(model, x, "occlusion", window=6, stride=3, baseline=ref)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert a.abs().sum() > 0


def test_noise_baseline_is_seeded_and_reported():
    model = make_tiny(2)
    x = make_input(2, 1)
    occ = trustmap.get_method("occlusion")
    a = occ(model, window=4, baseline="noise", seed=3).explain(x)
    b = occ(model, window=4, baseline="noise", seed=3).explain(x)
    c = occ(model, window=4, baseline="noise", seed=4).explain(x)
    assert torch.equal(a.attributions, b.attributions)
    assert not torch.equal(a.attributions, c.attributions)
    drawn = occ(model, window=4, baseline="noise").explain(x)
    assert isinstance(drawn.params["seed"], int)
    again = occ(model, window=4, baseline="noise", seed=drawn.params["seed"]).explain(x)
    assert torch.equal(drawn.attributions, again.attributions)


def test_default_stride_is_half_the_window():
    model = make_tiny(2).double()
    x = make_input(2, 1, dtype=torch.float64)
    a = trustmap.get_method("occlusion")(model, window=(6, 5)).explain(x)
    b = trustmap.explain(model, x, "occlusion", window=(6, 5), stride=(3, 3))
    assert a.params["n_windows"] == math.prod(
        math.ceil((16 - w) / s) + 1 for w, s in ((6, 3), (5, 3))
    )
    torch.testing.assert_close(a.attributions, b)


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"window": 17}, "larger than the image"),
        ({"window": (4, 20)}, "larger than the image"),
        ({"window": 0}, "window must be"),
        ({"window": (4, 4, 4)}, "window must be"),
        ({"window": 4, "stride": 0}, "stride must be"),
        ({"window": 4, "stride": (1,)}, "stride must be"),
        ({"window": 4, "baseline": "median"}, "baseline"),
        ({"window": 4, "batch_size": 0}, "batch_size"),
    ],
)
def test_errors(params, match):
    model = make_tiny(2)
    x = make_input(2, 1)
    with pytest.raises(ValueError, match=match):
        trustmap.explain(model, x, "occlusion", **params)


def test_window_larger_than_volume_3d():
    model = make_tiny(3)
    x = make_input(3, 1)
    with pytest.raises(ValueError, match="larger than the image"):
        trustmap.explain(model, x, "occlusion", window=(4, 4, 9))


class ViewHead(nn.Module):
    """Flattens a feature map with ``.view``, which a channels-last map refuses."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 16 * 16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x))
        return self.fc(h.view(h.shape[0], -1))


def test_inputs_go_channels_last_and_fall_back_for_view_models():
    seen = []
    model = make_tiny(2).double()
    handle = model.register_forward_pre_hook(lambda m, a: seen.append(a[0].stride(1)))
    try:
        trustmap.explain(model, make_input(2, 2, dtype=torch.float64), "occlusion", window=8)
    finally:
        handle.remove()
    assert seen == [1]  # one channel: restrided in place, no copy
    view_model = ViewHead().double()
    x = make_input(2, 2, dtype=torch.float64)
    with pytest.raises(RuntimeError):
        x_cl = x.as_strided(x.shape, (256, 1, 16, 1))
        view_model(x_cl)
    got = trustmap.explain(view_model, x, "occlusion", target=1, window=4, stride=4)
    ref = loop_reference(view_model, x, 1, (4, 4), (4, 4), torch.zeros_like(x))
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
