"""How long a trust run will take, from a short probe before it starts.

The protocol's time goes into two kinds of work whose cost is known from the config and
from a few timed passes on this machine, at this load, with these thread settings:

* training: ``epochs x batches`` optimizer steps per model (and a validation pass per
  epoch), timed with a few steps of each architecture on random images of the run's size;
* maps: every method explains ``n_images`` images once per model state (the trained model,
  each randomization stage, the replicate and the second architecture), timed with one
  call per method on one batch of an untrained model of the same architecture (the cost
  of an explanation does not depend on the weights); and the faithfulness curves.

Models already trained in ``out/models`` (a resumed run) cost nothing. The estimate is an
upper bound where training stops early. :class:`RunClock` turns the estimate and the
progress the protocol reports into time remaining, re-scaled by how fast the finished
stages actually went.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from trustmap.trust.config import TrustConfig

# Statistics, figures and the report: measured 3.8 s for 8 methods on 2 idle cores
# (benchmarks/results/trust.json), about half a second per method.
_REPORT_SECONDS_PER_METHOD = 0.5
_REPORT_SECONDS = 2.0
# Per epoch beyond the optimizer steps: the validation pass and the augmentation, and per
# model the test evaluation with bootstrap intervals, the checks and the figures.
_VALIDATION_FRACTION = 0.35
_MODEL_OVERHEAD_SECONDS = 2.0


@dataclass(frozen=True)
class StageEstimate:
    """One stage of the run: its key (as :func:`stage_of` names progress messages), what
    the user reads, and the estimated seconds."""

    key: str
    label: str
    seconds: float


@dataclass(frozen=True)
class RunEstimate:
    """The estimated stages of a run, and how long the probe itself took."""

    stages: tuple[StageEstimate, ...]
    probe_seconds: float
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def total(self) -> float:
        return sum(s.seconds for s in self.stages)

    def seconds_of(self, key: str) -> float:
        return sum(s.seconds for s in self.stages if s.key == key)


def stage_of(text: str) -> str:
    """The stage a protocol progress message belongs to."""
    if text.startswith(("model ", "train ")):
        role = text.split()[1]
        return f"train {role}"
    for prefix, key in (
        ("data", "data"),
        ("maps of the trained model", "trained maps"),
        ("cascading randomization", "randomization"),
        ("independent randomization", "randomization"),
        ("maps of A2 and B", "A2 and B"),
        ("faithfulness", "faithfulness"),
        ("figures and report", "report"),
        ("statistics", "report"),
    ):
        if text.startswith(prefix):
            return key
    return "other"


def estimate_run(cfg: TrustConfig) -> RunEstimate:
    """Probe this machine and estimate every stage of ``trust.run(cfg)``.

    Opens (or generates) the dataset, which the run then finds in its cache; the probe
    itself takes a few seconds (``probe_seconds``).
    """
    from trustmap.data.datasets import open_dataset
    from trustmap.data.phantoms import PHANTOMS
    from trustmap.models.training import prepare_data

    started = time.perf_counter()
    tick = time.perf_counter()
    if cfg.dataset in PHANTOMS and not Path(cfg.dataset).exists():
        dataset = open_dataset(cfg.dataset, **cfg.phantom)
    else:
        dataset = open_dataset(cfg.dataset)
    data = prepare_data(dataset, cfg.train_config())
    data_seconds = time.perf_counter() - tick
    channels = int(data.images.shape[1])
    spatial = tuple(int(s) for s in data.images.shape[2:])
    n_train = len(data.split["train"])
    n_val = len(data.split["val"])
    n_positive_test = int(sum(int(data.labels[i]) == 1 for i in data.split["test"]))
    n_images = min(n_positive_test, cfg.n_images or n_positive_test)

    stages = [StageEstimate("data", "data", data_seconds)]
    notes: list[str] = []
    out = Path(cfg.out).expanduser()
    roles = [("A1", "A", 0), ("A2", "A", 1), ("B", "B", 0), ("L1", "localizer", 0)]
    roles.append(("L2", "localizer", 1))
    step_cache: dict[tuple[str, int], float] = {}
    for role, group, _k in roles:
        spec = cfg.models[group]
        done = (out / "models" / role / "model.pt").is_file() and (
            out / "models" / role / "model_card.json"
        ).is_file()
        if spec.checkpoints or done:
            stages.append(StageEstimate(f"train {role}", f"model {role}: loaded", 0.5))
            continue
        extra = dict(cfg.localizer_training) if group == "localizer" else {}
        train_cfg = cfg.train_config(model_kwargs=dict(spec.kwargs), **extra)
        key = (spec.arch, int(train_cfg.batch_size))
        if key not in step_cache:
            step_cache[key] = _train_step_seconds(
                spec.arch, dict(spec.kwargs), channels, spatial, int(train_cfg.batch_size)
            )
        steps = math.ceil(n_train / train_cfg.batch_size)
        val_steps = math.ceil(n_val / train_cfg.batch_size)
        per_epoch = (steps + _VALIDATION_FRACTION * val_steps) * step_cache[key]
        seconds = per_epoch * int(train_cfg.epochs) + _MODEL_OVERHEAD_SECONDS
        stages.append(
            StageEstimate(
                f"train {role}", f"train {role} ({spec.arch}, {train_cfg.epochs} epochs)", seconds
            )
        )

    # Maps: one call per method on one batch of an untrained model of architecture A.
    spec_a = cfg.models["A"]
    model = _untrained(spec_a.arch, dict(spec_a.kwargs), channels, spatial, cfg.device)
    batch = min(cfg.batch_size, n_images)
    x = torch.rand((batch, channels, *spatial), generator=torch.Generator().manual_seed(0))
    x = x.to(cfg.device)
    n_calls = math.ceil(n_images / batch)
    first = per_state = 0.0
    method_seconds: dict[str, float] = {}
    for method in cfg.methods:
        once, again = _explain_seconds(model, x, method, cfg.method_params.get(method, {}))
        method_seconds[method] = again
        first += once * n_calls
        per_state += again * n_calls
    from trustmap.trust.randomization import model_stages

    settings = cfg.randomization_settings()
    n_stages = len(model_stages(model, settings["stages"]))
    modes = 2 if settings["independent"] else 1
    stages.append(
        StageEstimate(
            "trained maps", f"maps of the trained model ({len(cfg.methods)} methods)", first
        )
    )
    stages.append(
        StageEstimate(
            "randomization",
            f"randomization: {n_stages} stages x {modes} mode(s)",
            per_state * n_stages * modes,
        )
    )
    stages.append(StageEstimate("A2 and B", "maps of A2 and B", 2 * per_state))
    faith = cfg.faithfulness_settings()
    if faith["enabled"]:
        per_image = _faithfulness_seconds(model, x[:1], faith)
        n_faith = min(int(faith["n_images"]), n_images)
        stages.append(
            StageEstimate(
                "faithfulness",
                f"faithfulness ({n_faith} images)",
                per_image * n_faith * len(cfg.methods),
            )
        )
    stages.append(
        StageEstimate(
            "report",
            "statistics, figures and report",
            _REPORT_SECONDS + _REPORT_SECONDS_PER_METHOD * len(cfg.methods),
        )
    )
    slow = max(method_seconds, key=method_seconds.get) if method_seconds else None
    if slow is not None:
        notes.append(
            f"slowest method: {slow} ({method_seconds[slow] * n_calls:.1f} s per model state)"
        )
    return RunEstimate(tuple(stages), time.perf_counter() - started, tuple(notes))


def _untrained(
    arch: str, kwargs: dict[str, Any], channels: int, spatial: tuple[int, ...], device: str
):
    from trustmap.models import create

    gen_state = torch.random.get_rng_state()
    try:
        model = create(
            arch, spatial_dims=len(spatial), in_channels=channels, num_classes=2, **kwargs
        )
    finally:
        torch.random.set_rng_state(gen_state)  # create() draws the initial weights
    return model.to(device).eval()


def _train_step_seconds(
    arch: str, kwargs: dict[str, Any], channels: int, spatial: tuple[int, ...], batch: int
) -> float:
    """Seconds of one optimizer step (forward, backward, AdamW) on a batch; the median of
    three after one warm-up step."""
    model = _untrained(arch, kwargs, channels, spatial, "cpu").train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.rand((batch, channels, *spatial), generator=torch.Generator().manual_seed(0))
    times = []
    for i in range(4):
        tick = time.perf_counter()
        out = model(x)
        loss = (
            out.float().square().mean()
            if isinstance(out, torch.Tensor)
            else sum(o.float().square().mean() for o in out.values())
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i:
            times.append(time.perf_counter() - tick)
    return sorted(times)[len(times) // 2]


def _explain_seconds(
    model: torch.nn.Module, x: torch.Tensor, method: str, params: dict
) -> tuple[float, float]:
    """Seconds of the first call and of a repeated call (some methods memoize work per
    image across model states, e.g. XRAI's segmentation); a first call of over 2 s is
    taken for both."""
    from trustmap.core.base import build
    from trustmap.core.registry import get_method

    explainer = build(get_method(method), model, dict(params))
    target = torch.ones(len(x), dtype=torch.long, device=x.device)
    times = []
    for _ in range(2):
        tick = time.perf_counter()
        explainer.explain(x, target=target)
        times.append(time.perf_counter() - tick)
        if times[0] > 2.0:
            return times[0], times[0]
    return times[0], times[1]


def _faithfulness_seconds(model: torch.nn.Module, x: torch.Tensor, faith: dict[str, Any]) -> float:
    """One image's deletion and insertion curves and sensitivity-n."""
    from trustmap.metrics.faithfulness import deletion_curve, insertion_curve, sensitivity_n

    target = torch.ones(1, dtype=torch.long, device=x.device)
    smap = torch.rand(x.shape[2:], generator=torch.Generator().manual_seed(0))
    n_values = [int(v) for v in faith["n_values"] if v < int(math.prod(x.shape[2:]))]
    tick = time.perf_counter()
    deletion_curve(model, x, smap, target, steps=faith["steps"])
    insertion_curve(model, x, smap, target, steps=faith["steps"])
    if n_values:
        attr = torch.rand(x.shape, generator=torch.Generator().manual_seed(1)).to(x.device)
        sensitivity_n(
            model, x, attr, target, n_values=n_values, n_subsets=int(faith["n_subsets"]), seed=0
        )
    return time.perf_counter() - tick


class RunClock:
    """Time remaining of a run from its estimate and its progress messages.

    ``update(text, done, total)`` takes the protocol's progress; :meth:`remaining` is the
    estimated seconds of the unfinished work, scaled by the ratio of the time the finished
    work took to its estimate (once a tenth of the estimate is done; before that the
    probe's numbers stand).
    """

    def __init__(self, estimate: RunEstimate) -> None:
        self.estimate = estimate
        self.started = time.perf_counter()
        self.finished: dict[str, float] = {}  # stage key -> seconds it took
        self.current: str | None = None
        self.current_started = self.started
        self.fraction = 0.0

    def update(self, text: str, done: int, total: int) -> str:
        key = stage_of(text)
        now = time.perf_counter()
        if key != self.current:
            if self.current is not None:
                self.finished[self.current] = self.finished.get(self.current, 0.0) + (
                    now - self.current_started
                )
            self.current, self.current_started, self.fraction = key, now, 0.0
        self.fraction = done / total if total else self.fraction
        return key

    def done_estimate(self) -> float:
        """Estimated seconds of the work finished so far."""
        done = sum(self.estimate.seconds_of(k) for k in self.finished)
        if self.current is not None:
            done += self.fraction * self.estimate.seconds_of(self.current)
        return min(done, self.estimate.total)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def speed(self) -> float:
        """Actual seconds per estimated second so far (1 until enough is done)."""
        done = self.done_estimate()
        if done < 0.1 * self.estimate.total or done <= 0:
            return 1.0
        return self.elapsed() / done

    def remaining(self) -> float:
        return max(0.0, (self.estimate.total - self.done_estimate()) * self.speed())

    def stage_times(self) -> dict[str, float]:
        """Seconds each stage took (the current one so far)."""
        times = dict(self.finished)
        if self.current is not None:
            times[self.current] = times.get(self.current, 0.0) + (
                time.perf_counter() - self.current_started
            )
        return times
