"""Train the generators of cycle-consistent activation maximization (Katzmann et al. 2021,
section 2.5).

>>> result = train_counterfactual("runs/clf/model.pt", "ct-nodule", out="runs/cf")  # doctest: +SKIP
>>> result.generators.plus  # G+: pushes the classifier towards the positive class  # doctest: +SKIP

What a run does
---------------
* The classifier ``C`` is frozen (a copy in eval mode; the caller's model is untouched).
  It must be binary: two logits, or one logit for the positive class.
* Every step draws two random batches ``x_a`` and ``x_b`` of the training split. The
  true labels are never read. First both discriminators take one step: ``D+`` learns to
  tell the real ``x_b`` from ``G+(x_a)``, ``D-`` from ``G-(x_a)`` (categorical
  cross-entropy per patch). Then both generators take one step on the sum of their
  losses (equation 4, :mod:`trustmap.counterfactual.losses`), with the discriminators
  frozen and their labels inverted.
* Weights are initialised from ``seed`` inside :func:`torch.random.fork_rng`; batches and
  the discriminators' patch shuffling draw from a :class:`torch.Generator` seeded from
  ``seed``. The caller's global RNG is left as it was; the same seed gives the same
  generators on one machine and thread count.
* Every ``checkpoint_every`` steps ``DIR/last.pt`` is written atomically (all four
  networks, both optimizers, the generator state, the loss history), and
  ``DIR/loss_curves.png`` is redrawn; every ``preview_every`` steps
  ``DIR/previews/step_NNNNNN.png`` shows ``x, G-(x), G+(x)`` and ``R = G+(x) - G-(x)``
  for a few validation images. Running the same call again resumes from ``last.pt``
  (an interruption loses at most one checkpoint interval) and refuses a ``last.pt``
  written with other settings, classifier or data. ``steps`` is not one of those
  settings: asking for more steps continues a finished run.
* A run that stops at its time budget (``max_seconds``) is finished as well: running it
  again returns it unless the budget or the steps are raised.
* At the end ``DIR/generators.pt`` holds both generators and what they were trained for
  (:func:`~trustmap.counterfactual.networks.load_generators`).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from trustmap.core.atomic import atomic_path
from trustmap.counterfactual import losses as L
from trustmap.counterfactual.networks import (
    GENERATORS_FILE,
    CounterfactualGenerators,
    PairDiscriminator,
    UNetGenerator,
    load_generators,
    save_generators,
)
from trustmap.models.training import (
    identity_diff,
    load_state,
    normalize_size,
    open_training_dataset,
    resize_images,
)

__all__ = [
    "CycleConfig",
    "CycleEvent",
    "CycleResult",
    "load_classifier",
    "train_counterfactual",
]

STATE_FORMAT = "trustmap-cyclegan-am-state"
STATE_VERSION = 1

# Settings that change what is trained: a resumed run must agree with them. The others
# (steps, intervals, previews, device, time budget) may change between attempts.
_IDENTITY_FIELDS = (
    "batch_size",
    "width",
    "disc_width",
    "depth",
    "convs_per_stage",
    "norm",
    "disc_norm",
    "residual",
    "size",
    "lr_g",
    "lr_d",
    "betas",
    "w_cycle",
    "w_sim",
    "w_adv",
    "w_am",
    "multiscale_ssim",
    "data_range",
    "split",
)


@dataclass(frozen=True)
class CycleConfig:
    """How to train the generators.

    The loss weights default to Katzmann et al.'s (2021) equation 4 (all terms weighted 1). The
    network width and the number of steps are a CPU default: the paper used
    ``width=48`` (48/96/192/384 kernels) and does not report its steps, batch size or
    learning rate.

    Parameters
    ----------
    steps
        Training steps (one discriminator step and one generator step each).
    batch_size
        Images in ``x_a`` and in ``x_b`` per step.
    width, disc_width
        Kernels of stage 0 of the generators and of the discriminators' encoder
        (``disc_width=None``: the same as ``width``).
    depth, convs_per_stage, norm, residual
        Generator architecture (:class:`~trustmap.counterfactual.networks.UNetGenerator`);
        the discriminators use the same ``convs_per_stage``.
    disc_norm
        Normalisation in the discriminators (default none: they must see each image's
        absolute intensity; see :class:`~trustmap.counterfactual.networks.PairDiscriminator`).
    size
        Resize every image once before training (an int for every axis, or one per axis);
        None takes the classifier's input size recorded in its checkpoint, else the
        native size.
    lr_g, lr_d, betas
        Adam for the generators and the discriminators.
    w_cycle, w_sim, w_adv, w_am
        Weights of the cycle, similarity, adversarial and activation-maximization terms.
    multiscale_ssim
        Use MS-DSSIM instead of DSSIM in the cycle and similarity losses.
    data_range
        Dynamic range ``L`` of the SSIM constants; None takes ``max - min`` of the
        training images.
    split
        The dataset split to train on.
    checkpoint_every, preview_every, n_preview
        Checkpoint (and loss-curve) interval, preview interval and images per preview.
    device
        ``"cpu"`` or ``"cuda[:N]"``.
    max_seconds
        Time budget: stop (and save) after the step that exceeds it. The default (18
        minutes of training steps) keeps the CPU default within 20 minutes on a busy
        shared machine, where steps can take twice as long as on idle cores; None trains
        all ``steps``.
    """

    steps: int = 300
    batch_size: int = 16
    width: int = 16
    disc_width: int | None = 8
    depth: int = 3
    convs_per_stage: int = 3
    norm: str = "group"
    disc_norm: str = "none"
    residual: bool = True
    size: int | tuple[int, ...] | None = None
    lr_g: float = 5e-4
    lr_d: float = 2e-4
    betas: tuple[float, float] = (0.5, 0.999)
    w_cycle: float = 1.0
    w_sim: float = 1.0
    w_adv: float = 1.0
    w_am: float = 1.0
    multiscale_ssim: bool = False
    data_range: float | None = None
    split: str = "train"
    checkpoint_every: int = 50
    preview_every: int = 100
    n_preview: int = 4
    device: str = "cpu"
    max_seconds: float | None = 18 * 60

    def validate(self) -> None:
        """Raise ValueError naming the first bad option."""
        for name in ("steps", "width", "depth", "convs_per_stage", "checkpoint_every"):
            _positive_int(name, getattr(self, name), minimum=0 if name == "depth" else 1)
        _positive_int("preview_every", self.preview_every)
        _positive_int("n_preview", self.n_preview, minimum=0)
        _positive_int("batch_size", self.batch_size, minimum=2)
        if self.disc_width is not None:
            _positive_int("disc_width", self.disc_width)
        for name in ("lr_g", "lr_d"):
            value = getattr(self, name)
            if not _finite(value) or value <= 0:
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        for name in ("w_cycle", "w_sim", "w_adv", "w_am"):
            value = getattr(self, name)
            if not _finite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if len(tuple(self.betas)) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        for name in ("norm", "disc_norm"):
            if getattr(self, name) not in ("group", "instance", "none"):
                raise ValueError(
                    f"{name} must be 'group', 'instance' or 'none', got {getattr(self, name)!r}"
                )
        if self.data_range is not None and (not _finite(self.data_range) or self.data_range <= 0):
            raise ValueError(f"data_range must be > 0 or None, got {self.data_range!r}")
        if self.split not in ("train", "val", "test"):
            raise ValueError(f"split must be 'train', 'val' or 'test', got {self.split!r}")
        if self.max_seconds is not None and not (
            _finite(self.max_seconds) and self.max_seconds > 0
        ):
            raise ValueError(f"max_seconds must be > 0 or None, got {self.max_seconds!r}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-like view (tuples as lists)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return json.loads(json.dumps(out, default=list))


def _positive_int(name: str, value: Any, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class CycleEvent:
    """What a progress callback receives.

    ``kind`` is ``"start"`` (``step`` = steps already done, non-zero when resuming),
    ``"step"`` (after each step; ``stats`` holds the losses and the classifier's mean
    positive probability on ``x_a``, ``G-(x_a)`` and ``G+(x_a)``), ``"checkpoint"``
    (``stats["path"]``), ``"preview"`` (``stats["path"]``) or ``"done"``.
    """

    kind: str
    step: int
    steps: int
    stats: dict[str, Any] = field(default_factory=dict)


Progress = Callable[[CycleEvent], None]


@dataclass(frozen=True, eq=False)
class CycleResult:
    """Trained generators and what the run wrote.

    ``reused`` is True when a finished run in ``out`` was returned without training.
    """

    generators: CounterfactualGenerators
    out: Path
    history: list[dict[str, float]]
    steps: int
    seconds: float
    previews: list[Path]
    loss_curves: Path
    reused: bool = False
    resumed_from: int = 0
    stop_reason: str = "steps"


# ----------------------------------------------------------------------------------------
# Inputs: the classifier and the images
# ----------------------------------------------------------------------------------------


def load_classifier(
    classifier: nn.Module | str | os.PathLike[str],
) -> tuple[nn.Module, dict[str, Any]]:
    """A frozen copy of ``classifier`` (a module or a trustmap checkpoint path) and what
    is known about it (``path``, ``input_size``, ``classes``)."""
    info: dict[str, Any] = {}
    if isinstance(classifier, (str, os.PathLike)):
        from trustmap.models import load_checkpoint

        path = Path(classifier).expanduser()
        if path.is_dir():
            path = path / "model.pt"
        if not path.is_file():
            raise FileNotFoundError(
                f"classifier checkpoint {path} does not exist; train one with `trustmap train`"
            )
        model, ck = load_checkpoint(path)
        extra = ck.get("extra") or {}
        info = {
            "path": str(path),
            "input_size": extra.get("input_size"),
            "classes": extra.get("classes"),
            "num_classes": ck.get("num_classes"),
        }
    elif isinstance(classifier, nn.Module):
        model = copy.deepcopy(classifier)
    else:
        raise TypeError(
            f"classifier must be a torch.nn.Module or a checkpoint path, got "
            f"{type(classifier).__name__}"
        )
    model.eval()
    model.requires_grad_(False)
    return model, info


def check_binary(classifier: nn.Module, x: torch.Tensor) -> int:
    """The classifier's output width on ``x`` (2 or 1); ValueError if it is not binary."""
    with torch.no_grad():
        out = classifier(x)
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"the classifier must return a tensor, got {type(out).__name__}")
    width = out.reshape(out.shape[0], -1).shape[1] if out.ndim > 1 else 1
    if out.ndim > 2 or width not in (1, 2):
        raise ValueError(
            f"cycle-consistent activation maximization explains a binary classifier (two "
            f"logits, or one for the positive class); this one returns {tuple(out.shape)} "
            f"for a batch of {x.shape[0]}"
        )
    return width


@dataclass
class _Images:
    name: str
    classes: tuple[str, str]
    images: torch.Tensor  # (N, C, *spatial) float32, all splits
    split: dict[str, np.ndarray]
    fingerprint: str


def load_images(dataset: Any, size: Any = None, *, split_seed: int = 0) -> _Images:
    """All images of a dataset (ImageDataset, directory or phantom name), resized once;
    the labels are not returned: training never sees them."""
    ds = open_training_dataset(dataset)
    td = ds.tensors()
    images = td.images
    if images.dim() not in (4, 5):
        raise ValueError(
            f"dataset images must be (N, C, H, W) or (N, C, D, H, W), got {tuple(images.shape)}"
        )
    target = normalize_size(size, images.dim() - 2, minimum=1)
    if target is not None:
        images = resize_images(images, target)
    split = {k: np.asarray(v, np.int64) for k, v in ds.split_indices(seed=split_seed).items()}
    classes = tuple(str(c) for c in getattr(ds, "classes", ("negative", "positive")))
    digest = hashlib.sha256()
    digest.update("\n".join(str(i) for i in td.ids).encode())
    digest.update(str(tuple(images.shape)).encode())
    for name in ("train", "val", "test"):
        digest.update(name.encode() + split[name].tobytes())
    # A sample of the pixels as well, so that regenerated data with the same ids differs.
    digest.update(images[:: max(1, len(images) // 16)].numpy().tobytes())
    return _Images(
        name=str(getattr(ds, "name", "dataset")),
        classes=(classes[0], classes[1]) if len(classes) == 2 else ("negative", "positive"),
        images=images.contiguous(),
        split=split,
        fingerprint=digest.hexdigest()[:16],
    )


def _model_fingerprint(model: nn.Module) -> str:
    digest = hashlib.sha256()
    for key, value in model.state_dict().items():
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


# ----------------------------------------------------------------------------------------
# One step
# ----------------------------------------------------------------------------------------


@dataclass
class _Nets:
    g_plus: UNetGenerator
    g_minus: UNetGenerator
    d_plus: PairDiscriminator
    d_minus: PairDiscriminator
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer

    def modules(self) -> dict[str, nn.Module]:
        return {
            "g_plus": self.g_plus,
            "g_minus": self.g_minus,
            "d_plus": self.d_plus,
            "d_minus": self.d_minus,
        }


def _build(spatial_dims: int, in_channels: int, config: CycleConfig, seed: int) -> _Nets:
    gen_kwargs = _generator_arch(spatial_dims, in_channels, config)
    disc_kwargs = {
        "spatial_dims": spatial_dims,
        "in_channels": in_channels,
        "width": config.disc_width or config.width,
        "convs_per_stage": config.convs_per_stage,
        "norm": config.disc_norm,
    }
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        g_plus, g_minus = UNetGenerator(**gen_kwargs), UNetGenerator(**gen_kwargs)
        d_plus, d_minus = PairDiscriminator(**disc_kwargs), PairDiscriminator(**disc_kwargs)
    device = torch.device(config.device)
    for net in (g_plus, g_minus, d_plus, d_minus):
        net.to(device)
    betas = (float(config.betas[0]), float(config.betas[1]))
    opt_g = torch.optim.Adam(
        [*g_plus.parameters(), *g_minus.parameters()], lr=config.lr_g, betas=betas
    )
    opt_d = torch.optim.Adam(
        [*d_plus.parameters(), *d_minus.parameters()], lr=config.lr_d, betas=betas
    )
    return _Nets(g_plus, g_minus, d_plus, d_minus, opt_g, opt_d)


def _generator_arch(spatial_dims: int, in_channels: int, config: CycleConfig) -> dict[str, Any]:
    return {
        "spatial_dims": spatial_dims,
        "in_channels": in_channels,
        "width": config.width,
        "depth": config.depth,
        "convs_per_stage": config.convs_per_stage,
        "norm": config.norm,
        "residual": config.residual,
    }


def _step(
    nets: _Nets,
    classifier: nn.Module,
    x_a: torch.Tensor,
    x_b: torch.Tensor,
    gen: torch.Generator,
    config: CycleConfig,
    data_range: float,
) -> dict[str, float]:
    """One discriminator step, then one generator step; the losses as floats."""
    ms = config.multiscale_ssim
    # Discriminators: the real x_b against the current fakes of x_a.
    with torch.no_grad():
        fake_plus, fake_minus = nets.g_plus(x_a), nets.g_minus(x_a)
    d_plus = L.discriminator_loss(nets.d_plus(fake_plus, x_b, gen))
    d_minus = L.discriminator_loss(nets.d_minus(fake_minus, x_b, gen))
    nets.opt_d.zero_grad(set_to_none=True)
    (d_plus + d_minus).backward()
    nets.opt_d.step()

    # Generators, through frozen discriminators and the frozen classifier.
    discriminators = (nets.d_plus, nets.d_minus)
    for d in discriminators:
        d.requires_grad_(False)
    try:
        plus = nets.g_plus(x_a)
        minus = nets.g_minus(x_a)
        terms: dict[str, torch.Tensor] = {}
        for sign, fake, other, disc, cls in (
            ("plus", plus, nets.g_minus, nets.d_plus, 1),
            ("minus", minus, nets.g_plus, nets.d_minus, 0),
        ):
            logits = classifier(fake)
            terms[f"cycle_{sign}"] = L.cycle_loss(
                x_a, other(fake), multiscale=ms, data_range=data_range
            )
            terms[f"sim_{sign}"] = L.similarity_loss(
                x_a, fake, multiscale=ms, data_range=data_range
            )
            terms[f"adv_{sign}"] = L.generator_adversarial_loss(disc(fake, x_b, gen))
            terms[f"am_{sign}"] = L.activation_maximization_loss(logits, cls)
            terms[f"p_{sign}"] = L.positive_probability(logits.detach()).mean()
        total = {
            sign: config.w_cycle * terms[f"cycle_{sign}"]
            + config.w_sim * terms[f"sim_{sign}"]
            + config.w_adv * terms[f"adv_{sign}"]
            + config.w_am * terms[f"am_{sign}"]
            for sign in ("plus", "minus")
        }
        nets.opt_g.zero_grad(set_to_none=True)
        (total["plus"] + total["minus"]).backward()
        nets.opt_g.step()
    finally:
        for d in discriminators:
            d.requires_grad_(True)
    with torch.no_grad():
        p_original = L.positive_probability(classifier(x_a)).mean()
    stats = {k: float(v.detach()) for k, v in terms.items()}
    stats.update(
        {
            "d_plus": float(d_plus.detach()),
            "d_minus": float(d_minus.detach()),
            "g_plus": float(total["plus"].detach()),
            "g_minus": float(total["minus"].detach()),
            "p_original": float(p_original),
        }
    )
    return stats


# ----------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------


def _identity(
    config: CycleConfig, seed: int, data: _Images, classifier_fp: str, dims: tuple[int, ...]
) -> dict[str, Any]:
    cfg = config.to_dict()
    return {
        "seed": seed,
        "dataset": data.name,
        "data": data.fingerprint,
        "classifier": classifier_fp,
        "input": list(dims),
        "config": {k: cfg[k] for k in _IDENTITY_FIELDS},
    }


def _read_state(path: Path) -> dict[str, Any]:
    return load_state(path, format=STATE_FORMAT, what="cyclegan_am training state")


def _save_state(
    path: Path,
    nets: _Nets,
    gen: torch.Generator,
    identity: dict[str, Any],
    step: int,
    history: list[dict[str, float]],
    seconds: float,
) -> None:
    state = {
        "format": STATE_FORMAT,
        "version": STATE_VERSION,
        "identity": identity,
        "step": step,
        "nets": {
            name: {k: v.detach().cpu() for k, v in net.state_dict().items()}
            for name, net in nets.modules().items()
        },
        "opt_g": nets.opt_g.state_dict(),
        "opt_d": nets.opt_d.state_dict(),
        "generator": gen.get_state(),
        "history": history,
        "seconds": seconds,
    }
    with atomic_path(path) as temp:
        torch.save(state, temp)


# ----------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------


def _figure(size: tuple[float, float]) -> Any:
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save_figure(fig: Any, path: Path) -> Path:
    with atomic_path(path) as temp:
        fig.savefig(temp, format="png", dpi=100)
    return path


def plot_loss_curves(history: Sequence[Mapping[str, float]], path: str | os.PathLike[str]) -> Path:
    """Loss terms of both generators, the discriminator losses and the classifier's mean
    positive probability per step (smoothed), as a PNG."""
    fig = _figure((12, 7))
    axes = fig.subplots(2, 3)
    steps = np.array([row["step"] for row in history], dtype=float)

    def smooth(key: str) -> np.ndarray:
        values = np.array([row.get(key, np.nan) for row in history], dtype=float)
        k = max(1, len(values) // 50)
        if k == 1:
            return values
        kernel = np.ones(k) / k
        padded = np.concatenate([np.full(k - 1, values[0]), values])
        return np.convolve(padded, kernel, mode="valid")

    panels = [
        ("cycle (eq. 2)", ("cycle_plus", "cycle_minus")),
        ("similarity (DSSIM)", ("sim_plus", "sim_minus")),
        ("adversarial (inverted labels)", ("adv_plus", "adv_minus")),
        ("activation maximization", ("am_plus", "am_minus")),
        ("discriminators", ("d_plus", "d_minus")),
        ("classifier P(positive)", ("p_plus", "p_original", "p_minus")),
    ]
    colours = {"plus": "tab:red", "minus": "tab:blue", "original": "0.3"}
    for ax, (title, keys) in zip(axes.flat, panels):
        for key in keys:
            if len(steps):
                suffix = key.rsplit("_", 1)[-1]
                label = {"plus": "G+ / D+", "minus": "G- / D-", "original": "x"}[suffix]
                ax.plot(steps, smooth(key), color=colours[suffix], label=label, lw=1.2)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes.flat[-1].set_ylim(-0.02, 1.02)
    fig.suptitle("cyclegan_am training (moving average)")
    return _save_figure(fig, Path(path))


def middle_slice(image: np.ndarray) -> np.ndarray:
    """``(C, *spatial)`` -> a 2D array: channel mean, middle slice of a volume."""
    arr = np.asarray(image, dtype=np.float64).mean(axis=0)
    while arr.ndim > 2:
        arr = arr[arr.shape[0] // 2]
    return arr


def plot_preview(
    x: torch.Tensor,
    minus: torch.Tensor,
    plus: torch.Tensor,
    probs: Mapping[str, Sequence[float]],
    path: str | os.PathLike[str],
    title: str = "",
) -> Path:
    """A grid with one row per image: ``x``, ``G-(x)``, ``G+(x)`` (each with the
    classifier's positive probability) and ``R = G+(x) - G-(x)`` (red: what ``G+`` adds,
    blue: what ``G-`` adds; symmetric limits). Volumes show their middle slice."""
    n = x.shape[0]
    fig = _figure((10, 2.5 * max(n, 1)))
    axes = np.atleast_2d(fig.subplots(max(n, 1), 4, squeeze=False))
    for i in range(n):
        images = [middle_slice(t[i].cpu().numpy()) for t in (x, minus, plus)]
        low, high = np.percentile(images[0], [0.5, 99.5])
        if high <= low:
            low, high = low - 0.5, high + 0.5
        r = images[2] - images[1]
        lim = float(np.abs(r).max()) or 1.0
        for j, (img, key, name) in enumerate(
            zip(images, ("original", "minus", "plus"), ("x", "G-(x)", "G+(x)"))
        ):
            ax = axes[i, j]
            ax.imshow(img, cmap="gray", vmin=low, vmax=high, interpolation="nearest")
            ax.set_title(f"{name}  P={probs[key][i]:.2f}", fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
        ax = axes[i, 3]
        shown = ax.imshow(r, cmap="bwr", vmin=-lim, vmax=lim, interpolation="nearest")
        ax.set_title("R = G+(x) - G-(x)", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        fig.colorbar(shown, ax=ax, fraction=0.046)
    if title:
        fig.suptitle(title)
    return _save_figure(fig, Path(path))


@torch.no_grad()
def counterfactuals(
    g_plus: nn.Module, g_minus: nn.Module, x: torch.Tensor, batch_size: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(G+(x), G-(x))`` in batches, on ``x``'s device."""
    plus, minus = [], []
    for start in range(0, x.shape[0], batch_size):
        chunk = x[start : start + batch_size]
        plus.append(g_plus(chunk))
        minus.append(g_minus(chunk))
    return torch.cat(plus), torch.cat(minus)


def _preview(nets: _Nets, classifier: nn.Module, x: torch.Tensor, path: Path, step: int) -> Path:
    flags = {n: m.training for n, m in nets.modules().items()}
    try:
        for m in nets.modules().values():
            m.eval()
        plus, minus = counterfactuals(nets.g_plus, nets.g_minus, x)
        with torch.no_grad():
            probs = {
                key: L.positive_probability(classifier(t)).cpu().tolist()
                for key, t in (("original", x), ("minus", minus), ("plus", plus))
            }
    finally:
        for n, m in nets.modules().items():
            m.train(flags[n])
    return plot_preview(x, minus, plus, probs, path, title=f"step {step}")


# ----------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------


def _derived_seed(seed: int, stream: int) -> int:
    return int(np.random.SeedSequence([seed, stream]).generate_state(1, np.uint64)[0] >> 1)


def _device(name: str) -> torch.device:
    try:
        dev = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {name!r}") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but torch sees no CUDA GPU; use cpu")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {name!r}")
    return dev


def train_counterfactual(
    classifier: nn.Module | str | os.PathLike[str],
    dataset: Any,
    *,
    out: str | os.PathLike[str],
    config: CycleConfig | None = None,
    seed: int = 0,
    progress: Progress | None = None,
) -> CycleResult:
    """Train ``G+`` and ``G-`` to explain a binary ``classifier`` (Katzmann et al. 2021).

    Parameters
    ----------
    classifier
        A binary classifier: a module, or a trustmap checkpoint (``model.pt`` or the
        directory holding it). It is copied and frozen; the caller's model is untouched.
    dataset
        An :class:`~trustmap.data.datasets.ImageDataset`, a dataset directory or a
        phantom name. Its images (``config.split``) are used; its labels are not.
    out
        Output directory: ``last.pt``, ``loss_curves.png``, ``previews/``,
        ``generators.pt``. Running again with the same arguments resumes or reuses.
    config
        :class:`CycleConfig` (the CPU default when None).
    seed
        Seeds the weights, the batches and the discriminators' patch shuffling.
    progress
        Called with a :class:`CycleEvent`. An exception it raises stops training;
        ``last.pt`` then holds the last checkpoint.

    Raises
    ------
    ValueError
        A classifier that is not binary or does not accept the images, an unknown dataset
        or split, invalid options, or a ``last.pt`` of another run in ``out``.
    FileNotFoundError
        A classifier checkpoint that does not exist.
    """
    config = config or CycleConfig()
    config.validate()
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    device = _device(config.device)
    model, clf_info = load_classifier(classifier)
    model.to(device)
    size = config.size
    if size is None and clf_info.get("input_size"):
        size = tuple(int(s) for s in clf_info["input_size"])
    data = load_images(dataset, size)
    if config.split not in data.split or len(data.split[config.split]) < 2:
        raise ValueError(f"the {config.split!r} split of {data.name} has fewer than 2 images")
    train_idx = torch.as_tensor(data.split[config.split])
    dims = tuple(int(s) for s in data.images.shape[1:])
    spatial_dims, in_channels = len(dims) - 1, dims[0]
    probe = data.images[train_idx[:2]].to(device)
    try:
        outputs = check_binary(model, probe)
    except RuntimeError as err:
        raise ValueError(
            f"the classifier does not accept the dataset's images {tuple(probe.shape[1:])}: "
            f"{str(err).splitlines()[0]}"
        ) from err
    images = data.images[train_idx]
    data_range = config.data_range or float(images.max() - images.min()) or 1.0
    preview_pool = data.split.get("val")
    if preview_pool is None or len(preview_pool) == 0:
        preview_pool = data.split[config.split]
    # Evenly spaced, not random and not by label: previews must not depend on either.
    picks = np.linspace(0, len(preview_pool) - 1, min(config.n_preview, len(preview_pool)))
    preview_x = data.images[torch.as_tensor(preview_pool[np.round(picks).astype(int)])].to(device)

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    last_path = out / "last.pt"
    curves_path = out / "loss_curves.png"
    preview_dir = out / "previews"
    identity = _identity(config, seed, data, _model_fingerprint(model), dims)
    state: dict[str, Any] | None = None
    if last_path.exists():
        state = _read_state(last_path)
        diffs = identity_diff(state.get("identity", {}), identity)
        if diffs:
            raise ValueError(
                f"{last_path} belongs to another training run ({'; '.join(diffs)}); use another "
                "--out directory or delete it to start afresh"
            )

    def result(
        step: int, history: list[dict[str, float]], seconds: float, **kw: Any
    ) -> CycleResult:
        return CycleResult(
            generators=load_generators(out, map_location=device),
            out=out,
            history=history,
            steps=step,
            seconds=seconds,
            previews=sorted(preview_dir.glob("step_*.png")) if preview_dir.exists() else [],
            loss_curves=curves_path,
            **kw,
        )

    budget_spent = (
        state is not None
        and config.max_seconds is not None
        and float(state["seconds"]) >= config.max_seconds
    )
    if (
        state is not None
        and (int(state["step"]) >= config.steps or budget_spent)
        and (out / GENERATORS_FILE).is_file()
    ):
        done = int(state["step"])
        return result(
            done, list(state["history"]), float(state["seconds"]), reused=True, resumed_from=done
        )

    nets = _build(spatial_dims, in_channels, config, _derived_seed(seed, 0))
    gen = torch.Generator().manual_seed(_derived_seed(seed, 1))
    step, seconds, history = 0, 0.0, []
    if state is not None:
        for name, net in nets.modules().items():
            net.load_state_dict(state["nets"][name])
        nets.opt_g.load_state_dict(state["opt_g"])
        nets.opt_d.load_state_dict(state["opt_d"])
        gen.set_state(state["generator"])
        step, seconds = int(state["step"]), float(state["seconds"])
        history = list(state["history"])
    resumed_from = step
    if progress:
        progress(CycleEvent("start", step, config.steps, {"resumed": state is not None}))
    for net in nets.modules().values():
        net.train()
    stop_reason = "steps"
    n_train = len(train_idx)
    while step < config.steps:
        started = time.perf_counter()
        pick = torch.randint(n_train, (2, config.batch_size), generator=gen)
        x_a = images[pick[0]].to(device, non_blocking=True)
        x_b = images[pick[1]].to(device, non_blocking=True)
        stats = _step(nets, model, x_a, x_b, gen, config, data_range)
        step += 1
        seconds += time.perf_counter() - started
        stats = {"step": step, **stats, "seconds": seconds}
        history.append(stats)
        if not all(math.isfinite(v) for v in stats.values()):
            # Raised before any checkpoint: last.pt keeps the last finite state.
            raise ValueError(
                f"training diverged at step {step} (a loss became NaN or Inf); lower lr_g/lr_d"
            )
        if config.max_seconds is not None and seconds >= config.max_seconds:
            stop_reason = "time budget"
        if progress:
            progress(CycleEvent("step", step, config.steps, dict(stats)))
        last = step >= config.steps or stop_reason != "steps"
        if config.n_preview > 0 and (step % config.preview_every == 0 or last):
            preview_dir.mkdir(exist_ok=True)
            path = _preview(nets, model, preview_x, preview_dir / f"step_{step:06d}.png", step)
            if progress:
                progress(CycleEvent("preview", step, config.steps, {"path": str(path)}))
        if step % config.checkpoint_every == 0 or last:
            _save_state(last_path, nets, gen, identity, step, history, seconds)
            plot_loss_curves(history, curves_path)
            if progress:
                progress(CycleEvent("checkpoint", step, config.steps, {"path": str(last_path)}))
        if stop_reason != "steps":
            break
    if not curves_path.exists():
        plot_loss_curves(history, curves_path)
    for net in nets.modules().values():
        net.eval()
    save_generators(
        out / GENERATORS_FILE,
        CounterfactualGenerators(
            plus=nets.g_plus,
            minus=nets.g_minus,
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            image_size=dims[1:],
            classifier_outputs=outputs,
            classes=data.classes,
            arch=_generator_arch(spatial_dims, in_channels, config),
            meta={
                "dataset": data.name,
                "data": data.fingerprint,
                "classifier": clf_info.get("path"),
                "classifier_fingerprint": identity["classifier"],
                "seed": seed,
                "steps": step,
                "seconds": round(seconds, 1),
                "data_range": data_range,
                "config": config.to_dict(),
            },
        ),
    )
    if progress:
        progress(CycleEvent("done", step, config.steps, {"seconds": seconds}))
    return result(step, history, seconds, resumed_from=resumed_from, stop_reason=stop_reason)
