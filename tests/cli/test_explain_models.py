"""``trustmap explain --method all`` on TorchScript models, and the warnings of a first run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from trustmap.cli.main import _all_methods, app
from trustmap.models import create

runner = CliRunner()
NEEDS_MODULES = {
    "lrp",
    "deep_taylor",
    "deeplift",
    "deep_shap",
    "pattern_net",
    "pattern_attribution",
}
# Small budgets so that all methods on two full-size MONAI networks run in seconds.
CHEAP = {
    "extremal_perturbation.n_iter": 3,
    "meaningful_perturbation.n_iter": 3,
    "rise.n_samples": 32,
    "smooth_ig.n_samples": 2,
    "smooth_ig.n_steps": 3,
    "kernel_shap.n_samples": 16,
    "lime.n_samples": 16,
    "shapley_sampling.n_samples": 2,
    "xrai.n_steps": 3,
    "integrated_gradients.n_steps": 4,
    "gradient_shap.n_samples": 2,
    "smoothgrad.n_samples": 2,
    "iterative_saliency.max_iter": 1,
    "score_cam.batch_size": 1024,
    "ablation_cam.batch_size": 1024,
}


def _trained(arch: str) -> torch.nn.Module:
    """The architecture with non-initial BatchNorm statistics (no random-weights warning)."""
    torch.manual_seed(0)
    model = create(arch, spatial_dims=2, in_channels=1, num_classes=2).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_var.fill_(0.9)
    return model


@pytest.mark.slow
@pytest.mark.parametrize("how", ["script", "trace"])
@pytest.mark.parametrize("arch", ["densenet121", "resnet18"])
def test_method_all_on_torchscript(tmp_path, arch, how):
    model = _trained(arch)
    x = torch.rand(1, 1, 32, 32)
    compiled = torch.jit.script(model) if how == "script" else torch.jit.trace(model, x)
    path = tmp_path / "model.ts"
    torch.jit.save(compiled, str(path))
    image = tmp_path / "img.npy"
    np.save(image, np.random.default_rng(0).random((32, 32)).astype(np.float32))
    out = tmp_path / "out"
    params = [a for k, v in CHEAP.items() for a in ("-p", f"{k}={v}")]
    args = ["explain", "--model", str(path), "--input", str(image), "--method", "all"]
    result = runner.invoke(app, [*args, "--out", str(out), *params], terminal_width=300)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    skipped = {m for m, r in summary["methods"].items() if r["skipped"]}
    assert skipped >= NEEDS_MODULES
    # DenseNet121's last 2 x 2 feature map at 32 x 32 is a transition conv, not the map
    # its pooling reads: CAM's head cannot be found there (a real limit, also in Python)
    assert skipped - NEEDS_MODULES <= ({"cam"} if arch == "densenet121" else set())
    for method in _all_methods():
        record = summary["methods"][method]
        assert record["error"] is None, (method, record["error"])
        if method in skipped:
            lines = [ln for ln in result.output.splitlines() if ln.strip().startswith(method + " ")]
            assert len(lines) == 1 and "skipped:" in lines[0], (method, lines)
        else:
            assert (out / f"{method}.npy").is_file() and (out / f"{method}.png").is_file()
