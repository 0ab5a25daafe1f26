"""Bad input gets a clear ValueError or TypeError that names the problem."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import trustmap
from tests.conftest import assert_no_hooks, make_input, make_tiny


@pytest.fixture
def model():
    return make_tiny(2)


def test_unknown_method_suggests_closest(model):
    with pytest.raises(ValueError, match="did you mean 'grad_cam'"):
        trustmap.explain(model, make_input(2, 1), "gradcam")
    with pytest.raises(ValueError, match="unknown method 'nonsense'"):
        trustmap.get_method("nonsense")


@pytest.mark.parametrize("shape", [(16, 16), (1, 16, 16), (1, 1, 1, 4, 4, 4)])
def test_wrong_rank(model, shape):
    with pytest.raises(ValueError, match=r"\(B, C, H, W\) or \(B, C, D, H, W\)"):
        trustmap.explain(model, torch.zeros(shape), "gradient")


def test_not_a_tensor(model):
    with pytest.raises(TypeError, match=r"torch\.Tensor"):
        trustmap.explain(model, [[0.0]], "gradient")


def test_integer_input(model):
    with pytest.raises(TypeError, match="float32 or float64"):
        trustmap.explain(model, torch.zeros(1, 1, 16, 16, dtype=torch.long), "gradient")


@pytest.mark.parametrize(("value", "word"), [(float("nan"), "NaN"), (float("inf"), "Inf")])
def test_nan_and_inf(model, value, word):
    x = make_input(2, 1)
    x[0, 0, 3, 3] = value
    with pytest.raises(ValueError, match=f"1 {word}"):
        trustmap.explain(model, x, "gradient")


@pytest.mark.parametrize("target", [3, -1, torch.tensor([0, 5])])
def test_target_out_of_range(model, target):
    with pytest.raises(ValueError, match="out of range"):
        trustmap.explain(model, make_input(2, 2), "gradient", target=target)
    assert_no_hooks(model)


def test_target_wrong_length(model):
    with pytest.raises(ValueError, match="3 entries but the batch has 2"):
        trustmap.explain(model, make_input(2, 2), "gradient", target=torch.tensor([0, 1, 2]))


def test_float_target(model):
    with pytest.raises(TypeError, match="integer classes"):
        trustmap.explain(model, make_input(2, 1), "gradient", target=torch.tensor([0.5]))


def test_dtype_mismatch(model):
    with pytest.raises(TypeError, match="float64 but the model's parameters are float32"):
        trustmap.explain(model, make_input(2, 1, dtype=torch.float64), "gradient")


def test_unknown_parameter(model):
    with pytest.raises(TypeError, match="does not take parameter"):
        trustmap.explain(model, make_input(2, 1), "gradient", n_steps=3)


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"n_steps": 0}, "n_steps must be a positive integer"),
        ({"rule": "simpson"}, "rule must be one of"),
        ({"baseline": "gray"}, "baseline must be one of"),
        ({"baseline": torch.zeros(3, 3)}, "cannot be broadcast"),
    ],
)
def test_bad_ig_params(model, params, match):
    with pytest.raises(ValueError, match=match):
        trustmap.explain(model, make_input(2, 1), "integrated_gradients", **params)


def test_bad_smoothgrad_params(model):
    with pytest.raises(ValueError, match="variant must be one of"):
        trustmap.explain(model, make_input(2, 1), "smoothgrad", variant="median")
    with pytest.raises(ValueError, match="unknown method 'gradiant'"):
        trustmap.explain(model, make_input(2, 1), "smoothgrad", base="gradiant")
    with pytest.raises(ValueError, match="noise_level must be a finite number >= 0"):
        trustmap.explain(model, make_input(2, 1), "smoothgrad", noise_level=-1.0)


def test_model_returning_tuple():
    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(1, 2, 3)

        def forward(self, x):
            y = self.c(x).mean((2, 3))
            return y, y

    with pytest.raises(TypeError, match="must return a tensor"):
        trustmap.explain(Pair(), make_input(2, 1), "gradient")


def test_nan_output():
    class Bad(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(1, 2, 3)

        def forward(self, x):
            return self.c(x).mean((2, 3)) * float("nan")

    with pytest.raises(ValueError, match="NaN or Inf"):
        trustmap.explain(Bad(), make_input(2, 1), "gradient")


def test_model_not_a_module():
    with pytest.raises(TypeError, match=r"torch\.nn\.Module"):
        trustmap.explain(lambda x: x, make_input(2, 1), "gradient")


def test_binary_target_must_be_0_or_1():
    class Binary(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(1, 1, 3)

        def forward(self, x):
            return self.c(x).mean((2, 3))

    model = Binary()
    x = make_input(2, 2)
    with pytest.raises(ValueError, match="single output logit"):
        trustmap.explain(model, x, "gradient", target=2)
    pos = trustmap.explain(model, x, "gradient", target=1)
    neg = trustmap.explain(model, x, "gradient", target=0)
    assert torch.allclose(pos, -neg)
    auto = trustmap.get_method("gradient")(model).explain(x)
    with torch.no_grad():
        assert torch.equal(auto.target, (model(x)[:, 0] > 0).long())


def test_segmentation_targets():
    class Seg(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(1, 3, 3, padding=1)

        def forward(self, x):
            return self.c(x)

    model = Seg()
    x = make_input(2, 2)
    with pytest.raises(ValueError, match="segmentation map"):
        trustmap.explain(model, x, "gradient")
    with pytest.raises(ValueError, match="region_mask is empty"):
        trustmap.explain(model, x, "gradient", target=(1, torch.zeros(16, 16)))
    with pytest.raises(ValueError, match="region_mask has shape"):
        trustmap.explain(model, x, "gradient", target=(1, torch.ones(8, 8)))
    mask = torch.zeros(16, 16)
    mask[4:8, 4:8] = 1
    attr = trustmap.explain(model, x, "gradient", target=(1, mask))
    # The class-1 logit summed over the region depends only on pixels within the kernel
    # reach of the region (3x3 conv): the gradient is zero elsewhere.
    reach = torch.zeros(16, 16, dtype=torch.bool)
    reach[3:9, 3:9] = True
    assert attr[:, :, ~reach].abs().max() == 0
    assert attr[:, :, reach].abs().max() > 0
    callable_attr = trustmap.explain(
        model, x, "gradient", target=lambda out: (out[:, 1] * mask).sum((1, 2))
    )
    assert torch.allclose(attr, callable_attr)


def test_callable_target_with_wrong_shape(model):
    with pytest.raises(ValueError, match="callable target must map the output"):
        trustmap.explain(model, make_input(2, 2), "gradient", target=lambda out: out)


# -- issue 19: the documented hierarchy, and model/input mismatches named -----------------


def test_documented_hierarchy_keeps_the_builtin_types():
    from trustmap import errors

    for cls in (errors.InputError, errors.DataError, errors.ConfigError, errors.ModelError):
        assert issubclass(cls, errors.TrustmapError) and issubclass(cls, ValueError)
    assert issubclass(errors.InputTypeError, TypeError)
    assert issubclass(errors.ModelTypeError, TypeError)
    assert issubclass(errors.MissingFileError, FileNotFoundError)
    assert issubclass(errors.OutputBusyError, errors.InputError)
    from trustmap.methods.relevance.lrp import UnsupportedLayerError
    from trustmap.metrics import EmptyMaskError

    assert issubclass(EmptyMaskError, errors.DataError)
    assert issubclass(UnsupportedLayerError, errors.ModelError)


def test_input_errors_are_documented_types(model):
    from trustmap.errors import InputError, InputTypeError

    with pytest.raises(InputError):
        trustmap.explain(model, torch.zeros(16, 16), "gradient")
    with pytest.raises(InputTypeError):
        trustmap.explain(model, [[0.0]], "gradient")
    with pytest.raises(InputError, match="did you mean"):
        trustmap.get_method("gradcam")


@pytest.mark.parametrize(
    ("x", "match"),
    [
        (torch.zeros(1, 3, 16, 16), r"layer 'conv1' \(Conv2d\) expects 1 input channel"),
        (torch.zeros(1, 1, 16, 16, 16), r"the model is 2D .* the input is .*3D"),
    ],
)
@pytest.mark.parametrize("method", ["gradient", "grad_cam", "occlusion"])
def test_channel_and_rank_mismatch_name_the_layer(model, x, match, method):
    from trustmap.errors import ModelError

    with pytest.raises(ModelError, match=match):
        trustmap.explain(model, x, method)
    assert_no_hooks(model)


def test_a_bug_inside_the_model_is_not_dressed_up(model):
    class Buggy(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(1, 2, 3)

        def forward(self, x):
            raise RuntimeError("my own bug")

    with pytest.raises(RuntimeError, match="my own bug"):
        trustmap.explain(Buggy(), make_input(2, 1), "gradient")


def test_tuple_output_is_a_model_error():
    from trustmap.errors import ModelTypeError

    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(1, 2, 3)

        def forward(self, x):
            y = self.c(x).mean((2, 3))
            return y, y

    with pytest.raises(ModelTypeError, match="must return a tensor"):
        trustmap.explain(Pair(), make_input(2, 1), "gradient")


def test_nan_noise_level_is_not_blamed_on_the_model(model):
    with pytest.raises(ValueError, match="noise_level must be a finite number >= 0, got nan"):
        trustmap.explain(model, make_input(2, 1), "smoothgrad", noise_level=float("nan"))
