"""A tiny training run: shapes, finite losses, files, resumption, refusals, evaluation."""

from __future__ import annotations

import json

import pytest
import torch

from tests.counterfactual.helpers import tiny_classifier, tiny_config
from tests.models._toy import ToyDataset
from trustmap.counterfactual import (
    CycleEvent,
    evaluate_counterfactual,
    load_generators,
    train_counterfactual,
)
from trustmap.models import save_checkpoint


@pytest.fixture(scope="module")
def data():
    return ToyDataset(n=40, size=32)


@pytest.fixture(scope="module")
def classifier():
    return tiny_classifier()


@pytest.fixture(scope="module")
def run(tmp_path_factory, data, classifier):
    out = tmp_path_factory.mktemp("cf") / "run"
    events: list[CycleEvent] = []
    result = train_counterfactual(
        classifier, data, out=out, config=tiny_config(), seed=1, progress=events.append
    )
    return result, events


def _weights(gens):
    return {
        f"{name}.{k}": v.clone()
        for name, net in (("plus", gens.plus), ("minus", gens.minus))
        for k, v in net.state_dict().items()
    }


def test_run_writes_generators_checkpoint_curves_and_previews(run):
    result, events = run
    out = result.out
    assert result.steps == 4 and not result.reused
    for name in ("generators.pt", "last.pt", "loss_curves.png"):
        assert (out / name).is_file()
    assert [p.name for p in result.previews] == ["step_000002.png", "step_000004.png"]
    kinds = [e.kind for e in events]
    assert kinds[0] == "start" and kinds[-1] == "done"
    assert kinds.count("step") == 4 and kinds.count("checkpoint") == 2
    gens = load_generators(out)
    assert gens.image_size == (32, 32) and gens.in_channels == 1 and gens.spatial_dims == 2
    assert gens.classifier_outputs == 2 and gens.classes == ("negative", "positive")
    x = torch.rand(3, 1, 32, 32)
    assert gens.plus(x).shape == x.shape and gens.minus(x).shape == x.shape


def test_losses_are_finite_and_every_term_is_recorded(run):
    result, _ = run
    keys = {"cycle", "sim", "adv", "am", "p"}
    for row in result.history:
        for key in keys:
            for sign in ("plus", "minus"):
                assert torch.isfinite(torch.tensor(row[f"{key}_{sign}"]))
        assert 0 <= row["p_original"] <= 1
    # Step 1 starts from identity generators: no edit yet, so no similarity loss.
    assert result.history[0]["sim_plus"] == pytest.approx(0.0, abs=1e-6)


def test_generators_move_off_the_identity_after_training(run):
    gens = run[0].generators
    x = torch.rand(2, 1, 32, 32)
    assert not torch.allclose(gens.plus(x), x) and not torch.allclose(gens.minus(x), x)


def test_same_call_again_reuses_the_finished_run(run, data, classifier):
    result, _ = run
    again = train_counterfactual(classifier, data, out=result.out, config=tiny_config(), seed=1)
    assert again.reused and again.steps == 4
    assert all(
        torch.equal(a, b)
        for a, b in zip(_weights(result.generators).values(), _weights(again.generators).values())
    )


def test_interrupted_run_resumes_to_the_uninterrupted_result(run, data, classifier, tmp_path):
    result, _ = run

    class Stop(Exception):
        pass

    def stop_at_3(event):
        if event.kind == "step" and event.step == 3:
            raise Stop

    out = tmp_path / "resumed"
    # The caller's model must come through untouched.
    before = {k: v.clone() for k, v in classifier.state_dict().items()}
    with pytest.raises(Stop):
        train_counterfactual(
            classifier, data, out=out, config=tiny_config(), seed=1, progress=stop_at_3
        )
    assert (out / "last.pt").is_file() and not (out / "generators.pt").exists()
    events: list[CycleEvent] = []
    resumed = train_counterfactual(
        classifier, data, out=out, config=tiny_config(), seed=1, progress=events.append
    )
    assert events[0].kind == "start" and events[0].step == 2  # lost only step 3
    assert resumed.resumed_from == 2
    a, b = _weights(result.generators), _weights(resumed.generators)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["g_plus"] for r in resumed.history] == [r["g_plus"] for r in result.history]
    assert all(torch.equal(v, classifier.state_dict()[k]) for k, v in before.items())
    # Training froze a copy: the caller's model keeps its gradient flags and mode.
    assert all(p.requires_grad for p in classifier.parameters())
    assert classifier.training is False


def test_more_steps_continue_a_finished_run(run, data, classifier, tmp_path):
    out = tmp_path / "longer"
    train_counterfactual(classifier, data, out=out, config=tiny_config(steps=2), seed=1)
    longer = train_counterfactual(classifier, data, out=out, config=tiny_config(), seed=1)
    assert longer.resumed_from == 2 and longer.steps == 4
    a, b = _weights(run[0].generators), _weights(longer.generators)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_refuses_a_checkpoint_with_other_settings(run, data, classifier):
    out = run[0].out
    with pytest.raises(ValueError, match=r"another training run \(.*w_am: 1\.0 -> 2\.0"):
        train_counterfactual(classifier, data, out=out, config=tiny_config(w_am=2.0), seed=1)
    with pytest.raises(ValueError, match="seed: 1 -> 2"):
        train_counterfactual(classifier, data, out=out, config=tiny_config(), seed=2)
    other = tiny_classifier(seed=5)
    with pytest.raises(ValueError, match="classifier"):
        train_counterfactual(other, data, out=out, config=tiny_config(), seed=1)


def test_refuses_a_classifier_that_is_not_binary(data, tmp_path):
    with pytest.raises(ValueError, match="binary classifier"):
        train_counterfactual(
            tiny_classifier(num_classes=3), data, out=tmp_path, config=tiny_config()
        )


def test_missing_classifier_checkpoint_and_bad_dataset_are_named(data, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        train_counterfactual(tmp_path / "nope.pt", data, out=tmp_path / "o", config=tiny_config())
    with pytest.raises(ValueError, match="did you mean 'ct-nodule'"):
        train_counterfactual(
            tiny_classifier(), "ct-nodul", out=tmp_path / "o", config=tiny_config()
        )
    with pytest.raises(ValueError, match="batch_size"):
        tiny_config(batch_size=1).validate()


def test_training_leaves_the_global_rng_alone(data, classifier, tmp_path):
    state = torch.random.get_rng_state()
    train_counterfactual(
        classifier, data, out=tmp_path, config=tiny_config(steps=1, n_preview=0), seed=3
    )
    assert torch.equal(torch.random.get_rng_state(), state)


def test_evaluate_writes_json_in_the_issue_shape_and_a_self_contained_report(
    run, data, classifier, tmp_path
):
    ckpt = save_checkpoint(
        tmp_path / "clf.pt",
        classifier,
        arch="small_cnn",
        spatial_dims=2,
        in_channels=1,
        num_classes=2,
        width=2,
    )
    ev = evaluate_counterfactual(ckpt, run[0].out, data, out=tmp_path / "eval", n_examples=2)
    doc = json.loads((tmp_path / "eval" / "counterfactual.json").read_text())
    assert set(doc["probability"]) == {"original", "minus", "plus"}
    for v in doc["probability"].values():
        assert set(v) == {"mean", "ci"} and len(v["ci"]) == 2
        assert v["ci"][0] <= v["mean"] <= v["ci"][1]
    assert set(doc["t_tests"]) == {"plus_vs_original", "minus_vs_original"}
    for v in doc["t_tests"].values():
        assert {"t", "p", "effect_size"} <= set(v)
    assert set(doc["similarity"]["ssim"]) == {"minus", "plus"}
    assert set(doc["similarity"]["l1"]) == {"minus", "plus"}
    assert doc["n"] == ev.n == 8 and doc["effect_size_kind"] == "cohen_dz"
    # The numbers are those of the per-sample arrays: paired t and Cohen's d_z by hand.
    d = ev.per_sample["p_plus"] - ev.per_sample["p_original"]
    sd = d.std(ddof=1)
    if sd > 0:
        t = d.mean() / (sd / len(d) ** 0.5)
        assert doc["t_tests"]["plus_vs_original"]["t"] == pytest.approx(t)
        assert doc["t_tests"]["plus_vs_original"]["effect_size"] == pytest.approx(d.mean() / sd)
    html = (tmp_path / "eval" / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 3  # the bar chart and two examples
    assert "<img" in html and 'src="http' not in html


def test_time_budget_stops_and_saves(data, classifier, tmp_path):
    config = tiny_config(max_seconds=1e-9, n_preview=0)
    result = train_counterfactual(classifier, data, out=tmp_path, config=config, seed=1)
    assert result.steps == 1 and result.stop_reason == "time budget"
    assert load_generators(tmp_path).meta["steps"] == 1
    again = train_counterfactual(classifier, data, out=tmp_path, config=config, seed=1)
    assert again.reused and again.steps == 1
    longer = train_counterfactual(
        classifier, data, out=tmp_path, config=tiny_config(steps=2, n_preview=0), seed=1
    )
    assert longer.steps == 2 and longer.resumed_from == 1
