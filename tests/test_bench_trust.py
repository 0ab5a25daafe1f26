"""Smoke test of benchmarks/trust.py: every code path on a tiny config, with real checks.

The peer protocol must compute the same thing as trustmap's: for the deterministic methods
its captum maps equal trustmap's maps, its randomized copies carry trustmap's weights, and
its per-image table matches. The JSON must hold the totals and the ratios.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("captum")
pytest.importorskip("saliency")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:captum.*")

# the benchmark scripts import their helpers as top-level modules
BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.append(str(BENCH))

import _trust_peer as peer  # noqa: E402
import trust as bench  # noqa: E402
from tests.models._toy import toy_arrays  # noqa: E402
from trustmap.core.base import build  # noqa: E402
from trustmap.core.registry import get_method  # noqa: E402
from trustmap.models import create  # noqa: E402
from trustmap.trust import PAPER_METHODS, TrustConfig, postprocess  # noqa: E402
from trustmap.trust.protocol import Prepared, average_mask  # noqa: E402
from trustmap.trust.randomization import model_stages, randomized_models  # noqa: E402

SIZE = 32
N_IMAGES = 4
FIGURES = [
    "utility_boxplot",
    "randomization_curves",
    "randomization_grid",
    "repro_boxplot",
    "repro_examples",
    "faithfulness_plot",
]
# Methods of the timed runs: every kind of peer (captum input gradients, NoiseTunnel over
# IG, a layer method, PAIR's XRAI) and IG's completeness gap; fewer methods keep the
# statistics (Tukey HSD over all levels) and the runs short.
BENCH_METHODS = ["gradient", "integrated_gradients", "smooth_ig", "grad_cam", "xrai"]
DETERMINISTIC = [
    "gradient",
    "integrated_gradients",
    "grad_cam",
    "guided_backprop",
    "guided_grad_cam",
]


def tiny_config(out: Path, methods: list[str] = BENCH_METHODS) -> TrustConfig:
    return TrustConfig.from_preset(
        "quick",
        out=str(out),
        methods=methods,
        size=SIZE,
        n_images=N_IMAGES,
        batch_size=N_IMAGES,
        method_params={
            "smoothgrad": {"n_samples": 2, "noise_level": 0.15, "seed": 0},
            "integrated_gradients": {"n_steps": 4},
            "smooth_ig": {"n_samples": 2, "n_steps": 3, "noise_level": 0.15, "seed": 0},
            # native-resolution segments: the 224 x 224 grid costs seconds per image
            "xrai": {"n_steps": 3, "resize": None},
        },
        models={
            "A": {"arch": "small_cnn", "seeds": [0, 1], "kwargs": {"width": 4}},
            "B": {"arch": "resnet18", "seeds": [0], "kwargs": {"widen_factor": 0.125}},
            "localizer": {"arch": "unet", "seeds": [0, 1]},
        },
        randomization={"n_pairs": 5},
        faithfulness={"n_images": 1, "steps": 4, "n_values": [4, 16], "n_subsets": 4},
    )


def tiny_prepared() -> Prepared:
    """Untrained tiny models on toy positives: the benchmark times work, not accuracy."""
    images, masks, labels, _ = toy_arrays(n=2 * N_IMAGES + 4, size=SIZE, seed=0)
    pos = np.flatnonzero(labels == 1)
    chosen, fit = pos[:N_IMAGES], pos[N_IMAGES:]
    models = {
        "A1": create("small_cnn", seed=0, width=4),
        "A2": create("small_cnn", seed=1, width=4),
        "B": create("resnet18", seed=0, widen_factor=0.125),
        "L1": create("unet", seed=0),
        "L2": create("unet", seed=1),
    }
    return Prepared(
        images=torch.from_numpy(images[chosen, None]).float(),
        masks=masks[chosen],
        ids=[f"toy{i}" for i in chosen],
        avg_mask=np.asarray(average_mask(masks[fit]), dtype=np.float64),
        models={k: m.eval() for k, m in models.items()},
        model_info={k: {"arch": type(m).__name__, "seed": None} for k, m in models.items()},
        n_skipped_empty=0,
        dataset={"name": "toy"},
    )


def _blank_figure(*args, **kwargs) -> Path:
    path = Path(next(a for a in args if isinstance(a, Path)))
    path.write_bytes(b"")
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from trustmap.trust import figures

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("bench_trust")
    cfg, prepared = tiny_config(root / "work"), tiny_prepared()
    before = {
        k: {n: t.clone() for n, t in m.state_dict().items()} for k, m in prepared.models.items()
    }
    # Rendering the PNGs (seconds each run) is trustmap's figure code, tested elsewhere; the
    # benchmark only needs write_outputs to run and time it.
    with pytest.MonkeyPatch.context() as mp:
        for name in FIGURES:
            mp.setattr(figures, name, _blank_figure)
        payload = bench.benchmark(cfg, prepared, scratch=root / "runs", limit_repeats=1)
    payload["setup"] = bench.setup_info(cfg, prepared, 1, [None, None], "quick")
    path = root / "trust.json"
    bench.write_payload(payload, path)
    return cfg, prepared, payload, path, before


def _trustmap_maps(model, method, params, x):
    target = torch.ones(len(x), dtype=torch.long)
    attr = build(get_method(method), model, params).explain(x, target=target).attributions
    return attr, postprocess(attr.numpy())


@pytest.mark.parametrize("role", ["A1", "B"])
@pytest.mark.parametrize("method", DETERMINISTIC)
def test_peer_maps_equal_trustmap_maps(setup, method, role) -> None:
    cfg, prepared, *_ = setup
    model, x = prepared.models[role], prepared.images
    params = dict(cfg.method_params.get(method, {}))
    attr, maps = _trustmap_maps(model, method, params, x)
    layer = peer.layer_names(prepared)[role]
    peer_attr = peer.captum_attributions(
        method, model, x, peer.method_params(cfg, method), layer
    ).detach()
    np.testing.assert_allclose(peer.postprocess_maps(peer_attr.numpy()), maps, atol=1e-5)
    if method == "integrated_gradients":
        # captum's trapezoid weights sum to (n - 1) / n instead of 1
        n = params["n_steps"]
        torch.testing.assert_close(peer_attr, attr * (n - 1) / n, atol=1e-6, rtol=1e-4)
    elif method != "grad_cam":
        torch.testing.assert_close(peer_attr, attr, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize(("method", "plain"), [("smoothgrad", "gradient"), ("smooth_ig", None)])
def test_peer_noise_tunnel_without_noise_is_its_base(setup, method, plain) -> None:
    # With noise_level 0 every noisy copy is x: SmoothGrad is the gradient, Smooth IG is IG.
    cfg, prepared, *_ = setup
    model, x = prepared.models["A1"], prepared.images
    params = {**peer.method_params(cfg, method), "noise_level": 0.0}
    got = peer.captum_attributions(method, model, x, params, None).detach()
    if plain is None:
        n = params["n_steps"]
        attr, _ = _trustmap_maps(model, "integrated_gradients", {"n_steps": n}, x)
        want = attr * (n - 1) / n
    else:
        want, _ = _trustmap_maps(model, plain, {}, x)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)


def test_peer_postprocess_equals_trustmap() -> None:
    attr = np.random.default_rng(0).normal(size=(3, 2, 9, 11))
    attr[1] = 5.0  # a constant map becomes zeros, not a division by zero
    np.testing.assert_allclose(peer.postprocess_maps(attr), postprocess(attr), atol=1e-6)


@pytest.mark.parametrize("mode", ["cascading", "independent"])
def test_peer_randomized_copies_carry_trustmaps_weights(setup, mode) -> None:
    _, prepared, *_ = setup
    model = prepared.models["A1"]
    stages = model_stages(model)
    seeds = peer.stage_seeds(len(stages), 0)
    for k, (_name, theirs) in enumerate(randomized_models(model, mode=mode, seed=0)):
        ours = peer.randomized_copy(model, stages, seeds, k, mode)
        for (n1, t1), (n2, t2) in zip(ours.state_dict().items(), theirs.state_dict().items()):
            assert n1 == n2
            torch.testing.assert_close(t1, t2, rtol=0, atol=0)


def test_models_are_not_modified(setup) -> None:
    _, prepared, _, _, before = setup
    for role, model in prepared.models.items():
        for name, t in model.state_dict().items():
            torch.testing.assert_close(t, before[role][name], rtol=0, atol=0)


def test_per_image_tables_agree(setup) -> None:
    _, _, payload, *_ = setup
    agreement = payload["agreement"]
    assert agreement["rows_trustmap"] == agreement["rows_peer"] > 0
    assert agreement["rows_unmatched"] == 0
    for method in ["gradient", "integrated_gradients", "grad_cam", "AVG", "localizer"]:
        for metric in ("auprc", "auroc", "ssim"):
            diff = agreement["max_abs_diff"][method].get(metric)
            if diff is not None:
                assert diff < 1e-6, (method, metric, diff)
    for method in ["gradient", "integrated_gradients", "grad_cam"]:
        # per-method test (Welch against the method's own pairs): equal data, equal verdict
        assert agreement["verdicts_equal"][method]["randomization"]
    # the deletion curves of equal maps are equal
    assert agreement["max_abs_diff"]["gradient"]["deletion_auc"] < 1e-9


def test_json_has_totals_and_ratios(setup) -> None:
    cfg, _, _, path, _ = setup
    data = json.loads(path.read_text())
    t, p, b = data["trustmap"], data["peer"], data["bare_passes"]
    r = data["ratios"]
    assert math.isclose(r["peer_over_trustmap"], p["total"] / t["total"], rel_tol=1e-9)
    assert math.isclose(r["trustmap_over_bare"], t["total"] / b["total"], rel_tol=1e-9)
    assert r["peer_target_met"] == (r["peer_over_trustmap"] >= 1.3)
    assert r["bare_target_met"] == (r["trustmap_over_bare"] <= 1.2)
    for side in (t, p):
        parts = side["components"]
        assert {f"explainer {m}" for m in cfg.methods} <= set(parts)
        # orchestration is what no bucket claimed: negative would mean double counting
        # (figure and report seconds come rounded to 1 ms from results.json)
        assert all(v >= -2e-3 for v in parts.values()), parts
        assert parts["statistics"] > 0 and parts["ssim"] > 0 and parts["utility metrics"] > 0
    by_pass = sum(v["count"] * v["seconds_each"] for v in b["passes"].values())
    assert math.isclose(by_pass, b["total"], rel_tol=1e-9)
    # the trustmap run started from an empty cache; its only hits are the first independent
    # stage, which has the weights of the first cascading stage
    assert t["cache"]["hits"] == len(cfg.methods) and t["cache"]["misses"] > 0
    assert data["setup"]["threads"] == 1 and "load_average_1min" in data["setup"]


def test_bare_pass_counts(setup, tmp_path) -> None:
    _, prepared, *_ = setup
    cfg = tiny_config(tmp_path, methods=list(PAPER_METHODS))
    plan = bench.bare_plan(cfg, prepared)
    n_stages = len(model_stages(prepared.models["A1"]))
    # trained, cascading and independent stages; the first independent stage is the first
    # cascading one
    a1_states = 2 * n_stages
    counts = plan.counts
    key = f"A1: input-gradient pass, {N_IMAGES} rows"
    assert counts["explainer integrated_gradients"][key] == 4 * a1_states
    assert counts["explainer smooth_ig"][key] == 2 * 3 * a1_states
    assert counts["explainer xrai"][key] == 2 * 3 * a1_states  # two baselines
    assert counts["explainer smoothgrad"][f"B: input-gradient pass, {N_IMAGES} rows"] == 2
    ggc = counts["explainer guided_grad_cam"]
    # a layer and an input pass per state: A1 and its copies, A2, B
    assert sorted(ggc.values()) == [1, 1, 1, 1, a1_states, a1_states]
    # faithfulness: 2 curves of 5 images each, 2 sensitivity-n sizes, per method and image
    assert counts["faithfulness"]["A1: forward, 5 rows"] == 2 * len(cfg.methods)
    assert counts["faithfulness"]["A1: forward, 4 rows"] == 2 * len(cfg.methods) + 1


class _Clock:
    """A fake ``time`` module whose clock moves only when told to."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


def test_buckets_are_exclusive(monkeypatch) -> None:
    clock = _Clock()
    monkeypatch.setattr(peer, "time", clock)
    b = peer.Buckets()

    def step(seconds: float) -> None:
        clock.now += seconds

    def items():
        for i in range(3):
            step(0.5)  # charged to the generator's bucket
            yield i

    with b("outer"):
        step(1.0)
        with b("inner"):
            step(2.0)
        b.wrap("inner", step)(4.0)
        assert list(b.wrap_iter("gen", items)()) == [0, 1, 2]
    assert b.seconds == {"inner": 6.0, "gen": 1.5, "outer": 1.0}
    assert b.total() == clock.now == 8.5


def test_main_writes_the_json(setup, tmp_path, monkeypatch, capsys) -> None:
    import trustmap.trust

    _, prepared, payload, *_ = setup
    timed = {k: v for k, v in payload.items() if k != "setup"}
    monkeypatch.setattr(trustmap.trust, "prepare", lambda cfg: prepared)
    monkeypatch.setattr(bench, "benchmark", lambda cfg, prepared, **kw: timed)
    out = tmp_path / "result.json"
    assert bench.main(["--preset", "quick", "--threads", "1", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["benchmark"] == "trust" and data["setup"]["preset"] == "quick"
    assert data["setup"]["config"]["n_images"] == 12  # the preset's, not the tiny config's
    assert "not part of the comparison" in data["prepare"]["note"]
    assert data["ratios"] == json.loads(json.dumps(bench._json_safe(timed["ratios"])))
    printed = capsys.readouterr().out
    assert "peer / trustmap" in printed and "trustmap / bare passes" in printed
