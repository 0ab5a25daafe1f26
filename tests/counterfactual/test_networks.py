"""Generator and pair-discriminator shapes, identity start, shuffling and softmax."""

from __future__ import annotations

import pytest
import torch

from trustmap.counterfactual import PairDiscriminator, UNetGenerator
from trustmap.counterfactual.networks import (
    CounterfactualGenerators,
    load_generators,
    save_generators,
)


@pytest.mark.parametrize(
    ("dims", "spatial"), [(2, (32, 32)), (2, (20, 27)), (3, (16, 16, 16)), (3, (8, 10, 12))]
)
def test_generator_keeps_shape_2d_3d(dims, spatial):
    g = UNetGenerator(dims, 2, width=2)
    x = torch.randn(2, 2, *spatial)
    assert g(x).shape == x.shape


def test_generator_is_depth_3_with_3_convs_per_stage_and_doubling_widths():
    g = UNetGenerator(2, 1, width=3)
    convs = [[m for m in stage if isinstance(m, torch.nn.Conv2d)] for stage in g.down]
    assert len(g.down) == 4 and len(g.up) == 3
    assert [len(c) for c in convs] == [3, 3, 3, 3]
    assert [c[0].out_channels for c in convs] == [3, 6, 12, 24]
    assert [c[0].stride for c in convs] == [(1, 1), (2, 2), (2, 2), (2, 2)]


def test_residual_generator_starts_as_identity_and_plain_one_does_not():
    x = torch.rand(2, 1, 16, 16)
    assert torch.equal(UNetGenerator(2, 1, width=2)(x), x)
    assert not torch.allclose(UNetGenerator(2, 1, width=2, residual=False)(x), x)


def test_discriminator_scales_shapes_and_two_neuron_softmax():
    d = PairDiscriminator(2, 1, width=2)
    a, b = torch.rand(3, 1, 32, 32), torch.rand(3, 1, 32, 32)
    logits = d(a, b, torch.Generator().manual_seed(0))
    # Encoder cut after stages 2 and 3: 32 / 4 and 32 / 8 patch grids, 2 logits each.
    assert [tuple(lg.shape) for lg in logits] == [(3, 2, 8, 8), (3, 2, 4, 4)]
    probs = [torch.softmax(lg, dim=1) for lg in logits]
    for p in probs:
        assert torch.allclose(p.sum(1), torch.ones_like(p[:, 0]))
    d3 = PairDiscriminator(3, 2, width=2)
    out3 = d3(torch.rand(1, 2, 16, 16, 16), torch.rand(1, 2, 16, 16, 16))
    assert [tuple(lg.shape) for lg in out3] == [(1, 2, 4, 4, 4), (1, 2, 2, 2, 2)]


def test_shuffled_logits_are_the_pair_classified_in_a_random_order_then_put_back():
    d = PairDiscriminator(2, 1, width=2)
    a, b = torch.rand(2, 1, 32, 32), torch.rand(2, 1, 32, 32)
    shuffled = d(a, b, torch.Generator().manual_seed(5))
    kept, swapped = d(a, b), d(b, a)  # fixed order: head([f_a, f_b]) and head([f_b, f_a])
    for s, k, w in zip(shuffled, kept, swapped):
        as_kept = torch.isclose(s, k, atol=1e-6).all(1)
        # Classified as (b, a), then reordered so that channel 0 still speaks of a.
        as_swapped = torch.isclose(s, w.flip(1), atol=1e-6).all(1)
        assert bool((as_kept | as_swapped).all())
        assert bool(as_kept.any()) and bool(as_swapped.any())


def test_shuffling_keeps_a_slot_bias_from_becoming_a_real_neuron():
    d = PairDiscriminator(2, 1, width=2)
    for head in d.heads:
        with torch.no_grad():
            head.weight.zero_()
            head.bias.copy_(torch.tensor([5.0, -5.0]))  # a constant "neuron 0 is real"
    a, b = torch.rand(4, 1, 64, 64), torch.rand(4, 1, 64, 64)
    plain = d(a, b)
    shuffled = d(a, b, torch.Generator().manual_seed(0))
    # Without shuffling neuron 0 always names a; with it, a and b each half of the time.
    assert all(bool((lg[:, 0] > lg[:, 1]).all()) for lg in plain)
    share = torch.cat([(lg[:, 0] > lg[:, 1]).flatten() for lg in shuffled]).float().mean()
    assert 0.35 < float(share) < 0.65


def test_discriminator_refuses_pairs_of_two_shapes():
    d = PairDiscriminator(2, 1, width=2)
    with pytest.raises(ValueError, match="one shape"):
        d(torch.rand(1, 1, 16, 16), torch.rand(1, 1, 16, 8))


def test_bad_architecture_arguments_are_named():
    with pytest.raises(ValueError, match="spatial_dims"):
        UNetGenerator(4, 1)
    with pytest.raises(ValueError, match="width"):
        UNetGenerator(2, 1, width=0)
    with pytest.raises(ValueError, match="norm"):
        PairDiscriminator(2, 1, norm="batch")


def test_generators_file_round_trip_and_errors(tmp_path):
    arch = {
        "spatial_dims": 2,
        "in_channels": 1,
        "width": 2,
        "depth": 3,
        "convs_per_stage": 3,
        "norm": "group",
        "residual": False,
    }
    pair = CounterfactualGenerators(
        plus=UNetGenerator(**arch),
        minus=UNetGenerator(**arch),
        spatial_dims=2,
        in_channels=1,
        image_size=(16, 16),
        arch=arch,
    )
    save_generators(tmp_path / "generators.pt", pair)
    loaded = load_generators(tmp_path, dtype=torch.float64)
    x = torch.rand(1, 1, 16, 16, dtype=torch.float64)
    assert torch.allclose(loaded.plus(x), pair.plus.double()(x))
    assert loaded.image_size == (16, 16) and loaded.classifier_outputs == 2
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"has no generators\.pt"):
        load_generators(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="do not exist"):
        load_generators(tmp_path / "missing")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="not a readable"):
        load_generators(tmp_path / "junk.pt")
