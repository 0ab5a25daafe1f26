"""The default counterfactual run, end to end: classifier, generators, evaluation, report.

``run_demo(DIR)`` (``trustmap counterfactual demo --out DIR``) on the ``ct-nodule``
phantom (benign vs spiculated/lobulated malignant nodules, Katzmann et al.'s (2021) task):

1. ``DIR/classifier``: ``small_cnn`` trained with the calibration settings
   (:func:`trustmap.models.calibrate.calibration_config`);
2. ``DIR/generators``: ``G+`` and ``G-`` trained with the CPU default
   :class:`~trustmap.counterfactual.training.CycleConfig`;
3. ``DIR/evaluation``: Katzmann et al.'s (2021) section 4.1 on the test split,
   ``counterfactual.json`` and ``report.html``.

A finished classifier or generator run found in ``DIR`` is reused and an interrupted one
resumed; the evaluation (a few seconds) is recomputed.

Measured on two shared CPU cores (load average 3-4, ``OMP_WAIT_POLICY=PASSIVE``,
``torch.set_num_threads(2)``): the classifier in 120 s (test ROC AUC 0.907), the
generators' 300 steps in 633 s; on the 250 test images the mean malignancy probability
went from 0.436 [0.393, 0.479] on ``x`` to 0.998 on ``G+(x)`` (paired t(249) = 26.0,
p = 8e-73) and 0.007 on ``G-(x)`` (t(249) = -20.1, p = 5e-54), with SSIM 0.971 and 0.940
to ``x`` (Katzmann et al. 2021 on LIDC: 0.470 -> 0.820 and 0.289).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trustmap.counterfactual.evaluate import CounterfactualEvaluation, evaluate_counterfactual
from trustmap.counterfactual.training import (
    CycleConfig,
    CycleResult,
    Progress,
    train_counterfactual,
)
from trustmap.models.training import open_training_dataset

__all__ = ["DEMO_DATASET", "DemoResult", "run_demo"]

DEMO_DATASET = "ct-nodule"


@dataclass(frozen=True, eq=False)
class DemoResult:
    """What the demo produced: the classifier checkpoint, the generator training and the
    evaluation, with wall-clock seconds per stage (0 for a reused stage)."""

    out: Path
    classifier: Path
    training: CycleResult
    evaluation: CounterfactualEvaluation
    seconds: dict[str, float] = field(default_factory=dict)


def run_demo(
    out: str | os.PathLike[str],
    *,
    dataset: Any = DEMO_DATASET,
    seed: int = 0,
    classifier_config: Any = None,
    cycle_config: CycleConfig | None = None,
    progress: Progress | None = None,
    classifier_progress: Callable[[Any], None] | None = None,
    on_stage: Callable[[str], None] | None = None,
) -> DemoResult:
    """Run the default end to end into ``out`` (see the module docstring).

    Parameters
    ----------
    dataset
        The phantom (default ``ct-nodule``), a dataset directory or an ImageDataset.
    seed
        Seeds the classifier and the generators.
    classifier_config
        :class:`~trustmap.models.TrainConfig` of the classifier; None takes the
        calibration settings for the data's dimension and size.
    cycle_config
        :class:`~trustmap.counterfactual.training.CycleConfig`; None is the CPU default.
    progress, classifier_progress
        Progress callbacks of the generator and the classifier training.
    on_stage
        Called with a line naming each stage as it starts.
    """
    from trustmap.models import train_classifier
    from trustmap.models.calibrate import calibration_config

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    say = on_stage or (lambda _line: None)
    seconds: dict[str, float] = {}

    ds = open_training_dataset(dataset)
    if classifier_config is None:
        image_size = tuple(ds[0].image.shape[1:])
        classifier_config = calibration_config(ds.spatial_dims, image_size)
    say(f"1/3 classifier: small_cnn on {getattr(ds, 'name', 'dataset')} -> {out / 'classifier'}")
    started = time.perf_counter()
    clf = train_classifier(
        ds,
        "small_cnn",
        out=out / "classifier",
        seed=seed,
        config=classifier_config,
        progress=classifier_progress,
    )
    seconds["classifier"] = 0.0 if clf.reused else time.perf_counter() - started
    auc = clf.card.get("test", {}).get("roc_auc", {}).get("value")
    say(
        f"classifier {'reused' if clf.reused else 'trained'}: test ROC AUC {auc:.3f}"
        if auc is not None
        else "classifier ready"
    )

    say(f"2/3 generators G+/G- -> {out / 'generators'}")
    started = time.perf_counter()
    training = train_counterfactual(
        clf.checkpoint,
        ds,
        out=out / "generators",
        config=cycle_config,
        seed=seed,
        progress=progress,
    )
    seconds["generators"] = 0.0 if training.reused else time.perf_counter() - started

    say(f"3/3 evaluation (Katzmann et al. 2021, section 4.1) -> {out / 'evaluation'}")
    started = time.perf_counter()
    evaluation = evaluate_counterfactual(
        clf.checkpoint,
        training.generators,
        ds,
        out=out / "evaluation",
        device=(cycle_config or CycleConfig()).device,
    )
    seconds["evaluation"] = time.perf_counter() - started
    return DemoResult(
        out=out,
        classifier=clf.checkpoint,
        training=training,
        evaluation=evaluation,
        seconds=seconds,
    )
