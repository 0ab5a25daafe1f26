"""Activation maximization: class models and Deep Dream, seeded, 2D and 3D, model untouched."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import assert_no_hooks, make_input, make_tiny
from trustmap.inspect import deep_dream, maximize


@pytest.mark.parametrize("dims", [2, 3])
def test_class_model_raises_the_class_score_and_is_seeded(dims):
    model = make_tiny(dims)
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    shape = (1, 16, 16) if dims == 2 else (1, 8, 8, 8)
    # The tiny untrained model's logit moves slowly: light regularization.
    opts = {"steps": 16, "lr": 0.1, "l2": 0.01, "tv": 0.01, "blur_every": 0, "jitter": 0}
    a = maximize(model, target=2, shape=shape, seed=3, **opts)
    b = maximize(model, target=2, shape=shape, seed=3, **opts)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.curve, b.curve)
    c = maximize(model, target=2, shape=shape, seed=4, **opts)
    assert not np.array_equal(a.image, c.image)
    # The score rises on average: each quarter's mean above the previous one's.
    quarters = a.score.reshape(4, -1).mean(1)
    assert (np.diff(quarters) > 0).all(), quarters
    assert a.final_score > a.score[0]
    assert a.image.shape == shape and len(a.curve) == 16
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert all(m.training for m in model.modules())
    assert_no_hooks(model)


def test_regularizers_are_subtracted_from_the_objective():
    model = make_tiny(2)
    res = maximize(model, target=0, shape=(1, 16, 16), steps=5, l2=2.0, tv=0.0, jitter=0,
                   blur_every=0, center=0.5)  # fmt: skip
    # curve = score - l2 * mean((I - center)^2); at step 0 the image is the start.
    start = torch.from_numpy(res.start)
    penalty = 2.0 * float((start - 0.5).pow(2).mean())
    assert res.curve[0] == pytest.approx(res.score[0] - penalty, rel=1e-5, abs=1e-6)
    bounded = maximize(model, target=0, shape=(1, 16, 16), steps=10, bounds=(0.2, 0.4),
                       center=0.3)  # fmt: skip
    assert bounded.image.min() >= 0.2 and bounded.image.max() <= 0.4


def test_deep_dream_enhances_a_channel_of_a_layer():
    model = make_tiny(2)
    x = make_input(2, 1)
    before = x.clone()
    res = deep_dream(model, x[0], layer="conv3", channel=1, steps=20, jitter=0, seed=0)
    assert (np.diff(res.score) > 0).all()
    jittered = deep_dream(model, x[0], layer="conv3", channel=1, steps=20, seed=0)
    # The curve is taken on the jittered images; the final, unjittered image gained.
    assert jittered.final_score > jittered.score[0]
    assert np.allclose(res.start, x[0].numpy())
    assert torch.equal(x, before)
    assert res.objective == "conv3 channel 1"
    all_channels = deep_dream(model, x, layer="conv3", steps=10, jitter=0)
    assert all_channels.score[-1] > all_channels.score[0]
    assert_no_hooks(model)


def test_bad_arguments_are_named():
    model = make_tiny(2)
    with pytest.raises(ValueError, match="either target"):
        maximize(model, shape=(1, 16, 16))
    with pytest.raises(ValueError, match="target 5 is not a class"):
        maximize(model, target=5, shape=(1, 16, 16), steps=2)
    with pytest.raises(ValueError, match="give shape"):
        maximize(model, target=0)
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        maximize(model, target=0, shape=(1, 16, 16), steps=0)
    with pytest.raises(ValueError, match="without 2 spatial axes"):
        maximize(model, layer="fc", shape=(1, 16, 16), steps=2)
    with pytest.raises(ValueError, match="no channel 99"):
        deep_dream(model, make_input(2, 1), layer="conv3", channel=99, steps=2)
    assert_no_hooks(model)
