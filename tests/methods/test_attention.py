"""attention: the maps of trainable attention (Jetley et al. 2018; MONAI AttentionUnet)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import trustmap
from tests.conftest import assert_no_hooks, make_input, make_tiny
from trustmap.models import create


@pytest.mark.parametrize("compatibility", ["pc", "dp", "additive"])
@pytest.mark.parametrize("dims", [2, 3])
def test_gate_is_the_softmax_of_the_compatibility_scores(compatibility: str, dims: int) -> None:
    model = create("attention_cnn", dims, 1, 2, width=2, compatibility=compatibility, seed=0).eval()
    x = make_input(dims, 2, seed=3)
    with torch.no_grad():
        local = {}
        h = x
        for name, block in model.features.items():
            h = block(h)
            local[name] = h
        g = model.global_relu(model.global_fc(model.flatten(model.pool(h))))
        gate = model.gates["block2"]
        flat = local["block2"].flatten(2)
        gp = gate.project(g)[:, :, None]
        if compatibility == "pc":
            c = (gate.u[None, :, None] * (flat + gp)).sum(1)
        elif compatibility == "dp":
            c = (flat * gp).sum(1)
        else:
            c = (gate.u[None, :, None] * torch.relu(flat + gp)).sum(1)
        expected = torch.softmax(c, 1)
        logits, maps = model.forward_with_attention(x)
        attended = (expected[:, None] * flat).sum(2)
    assert torch.allclose(maps["gates.block2"].flatten(1), expected, atol=1e-6)
    assert torch.allclose(maps["gates.block2"].flatten(1).sum(1), torch.ones(2), atol=1e-6)
    # The logits see the local features only through the attended descriptors.
    ga3 = (maps["gates.block3"].flatten(2) * local["block3"].flatten(2)).sum(2)
    assert torch.allclose(logits, model.fc(torch.cat([attended, ga3], 1)), atol=1e-5)


def test_explainer_returns_the_upsampled_gates() -> None:
    model = create("attention_cnn", 2, 1, 3, width=2, seed=0).eval()
    x = make_input(2, 2)
    exp = trustmap.get_method("attention")(model).explain(x)
    with torch.no_grad():
        _, maps = model.forward_with_attention(x)
    ups = [
        F.interpolate(a * a[0, 0].numel(), size=(16, 16), mode="bilinear", align_corners=False)
        for a in maps.values()
    ]
    assert torch.allclose(exp.attributions, (ups[0] + ups[1]) / 2, atol=1e-6)
    assert exp.params["gates"] == ["gates.block2", "gates.block3"]
    one = trustmap.explain(model, x, "attention", gates=["gates.block3"])
    assert torch.allclose(one, ups[1], atol=1e-6)
    top = trustmap.explain(model, x, "attention", combine="max")
    assert torch.allclose(top, torch.maximum(ups[0], ups[1]), atol=1e-6)
    # Uniform attention is 1 at every resolution: the map's mean stays near 1.
    assert abs(float(exp.attributions.mean()) - 1.0) < 0.2
    assert_no_hooks(model)


def test_pc_compatibility_does_not_depend_on_the_global_vector() -> None:
    # <u, l_s + g> = <u, l_s> + <u, g>: the second term is the same at every position and
    # cancels in the softmax (documented in AttentionGate).
    gate = create("attention_cnn", 2, 1, 2, width=2, seed=0).gates["block2"]
    local = torch.randn(2, 4, 5, 5, generator=torch.Generator().manual_seed(0))
    g1 = torch.randn(2, 16, generator=torch.Generator().manual_seed(1))
    g2 = torch.randn(2, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.allclose(gate(local, g1)[1], gate(local, g2)[1], atol=1e-6)


def test_attention_unet_gates_are_read() -> None:
    model = create("attention_unet", 2, 1, 1, channels=(4, 8, 16), strides=(2, 2), seed=0)
    model.eval()
    x = make_input(2, 1)
    captured = []
    blocks = [m for m in model.modules() if type(m).__name__ == "AttentionBlock"]
    handles = [b.psi.register_forward_hook(lambda _m, _i, o: captured.append(o)) for b in blocks]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    target = (0, torch.ones(1, 16, 16, dtype=torch.bool))
    got = trustmap.explain(model, x, "attention", target=target)
    ups = [F.interpolate(a, size=(16, 16), mode="bilinear", align_corners=False) for a in captured]
    assert len(blocks) == 2
    assert torch.allclose(got, torch.stack(ups).mean(0), atol=1e-6)
    assert float(got.min()) >= 0 and float(got.max()) <= 1


def test_a_model_without_attention_gets_one_clear_error() -> None:
    with pytest.raises(ValueError, match=r"no attention gate.*--arch attention_cnn"):
        trustmap.explain(make_tiny(2), make_input(2, 1), "attention")
    model = create("attention_cnn", 2, 1, 3, width=2, seed=0)
    with pytest.raises(ValueError, match=r"did you mean 'gates\.block2'"):
        trustmap.explain(model, make_input(2, 1), "attention", gates=["gates.blok2"])
    with pytest.raises(ValueError, match="combine must be one of"):
        trustmap.explain(model, make_input(2, 1), "attention", combine="sum")


def test_declares_itself_model_dependent() -> None:
    cls = trustmap.get_method("attention")
    assert cls.model_dependent is True and cls.needs == "attention"
    assert cls.family == "attention" and cls.output == "single"
