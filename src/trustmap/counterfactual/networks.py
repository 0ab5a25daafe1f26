"""Generators and pair discriminators of cycle-consistent activation maximization.

Katzmann et al. 2021, sections 2.3 and 3.2:

* **Generators** ``G+`` and ``G-`` are U-Nets of depth 3 (four stages, three
  down-samplings) with three convolutions per stage and ``w, 2w, 4w, 8w`` kernels at
  stages 0-3 (the paper: ``w = 48``).
* **Discriminators** ``D+`` and ``D-`` reuse the generator's encoder, cut after stages 2
  and 3: two PatchGAN likelihood maps at two receptive-field sizes. Each is fed a pair,
  one real and one generated image, through shared weights; at every patch position the
  two feature vectors are concatenated and a two-neuron softmax decides which of the two
  is real. The pair is shuffled per position before that layer and the outputs are put
  back in order afterwards, so that neither neuron can become "the real one".

Both work on ``(B, C, H, W)`` and ``(B, C, D, H, W)``. Convolutions with stride 2 round
odd sizes up and the decoder up-samples to the skip connection's size, so any input size
of at least one pixel per axis passes through.

>>> g = UNetGenerator(spatial_dims=2, in_channels=1, width=8)
>>> g(torch.zeros(2, 1, 64, 64)).shape
torch.Size([2, 1, 64, 64])
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trustmap.core.atomic import atomic_path

__all__ = [
    "GENERATORS_FILE",
    "GENERATORS_FORMAT",
    "CounterfactualGenerators",
    "PairDiscriminator",
    "UNetGenerator",
    "load_generators",
    "save_generators",
]

#: File name of the trained generators inside a training directory.
GENERATORS_FILE = "generators.pt"
GENERATORS_FORMAT = "trustmap-cyclegan-am"
GENERATORS_VERSION = 1

NORMS = ("group", "instance", "none")


def _conv_cls(spatial_dims: int) -> type[nn.Module]:
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
    return nn.Conv2d if spatial_dims == 2 else nn.Conv3d


def _norm(kind: str, channels: int, spatial_dims: int) -> nn.Module:
    if kind == "group":
        # Up to 8 groups: per-sample statistics (no batch dependence, identical in train
        # and eval mode) that still exist on a 1-voxel bottleneck, where instance norm
        # has nothing to normalise over.
        return nn.GroupNorm(math.gcd(channels, 8), channels)
    if kind == "instance":
        cls = nn.InstanceNorm2d if spatial_dims == 2 else nn.InstanceNorm3d
        return cls(channels, affine=True)
    return nn.Identity()


def _check_arch(
    spatial_dims: int, in_channels: int, width: int, convs_per_stage: int, norm: str
) -> None:
    _conv_cls(spatial_dims)
    for name, value in (
        ("in_channels", in_channels),
        ("width", width),
        ("convs_per_stage", convs_per_stage),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


class _Stage(nn.Sequential):
    """``convs`` times ``Conv(k=3) -> norm -> LeakyReLU(0.2)``; the first may stride 2."""

    def __init__(
        self, c_in: int, c_out: int, *, convs: int, stride: int, spatial_dims: int, norm: str
    ) -> None:
        conv = _conv_cls(spatial_dims)
        layers: list[nn.Module] = []
        for i in range(convs):
            layers += [
                conv(
                    c_in if i == 0 else c_out, c_out, 3, stride=stride if i == 0 else 1, padding=1
                ),
                _norm(norm, c_out, spatial_dims),
                nn.LeakyReLU(0.2),
            ]
        super().__init__(*layers)


def _encoder(
    spatial_dims: int, in_channels: int, widths: Sequence[int], convs: int, norm: str
) -> nn.ModuleList:
    stages = nn.ModuleList()
    c_in = in_channels
    for s, c_out in enumerate(widths):
        stages.append(
            _Stage(
                c_in,
                c_out,
                convs=convs,
                stride=1 if s == 0 else 2,
                spatial_dims=spatial_dims,
                norm=norm,
            )
        )
        c_in = c_out
    return stages


class UNetGenerator(nn.Module):
    """The U-Net generator of Katzmann et al. 2021 (section 3.2, Fig. 4), 2D or 3D.

    Stages ``0..depth`` with ``width * 2**s`` kernels and ``convs_per_stage`` convolutions
    each; stages after the first start with a stride-2 convolution. The decoder
    up-samples (nearest), concatenates the encoder's output of the same stage and applies
    ``convs_per_stage`` convolutions; a 1x1 convolution maps back to ``in_channels``.

    Parameters
    ----------
    spatial_dims : int
        2 or 3.
    in_channels : int
        Image channels (input and output).
    width : int
        Kernels of stage 0 (paper: 48, giving 48/96/192/384).
    depth : int
        Number of down-samplings (paper: 3).
    convs_per_stage : int
        Convolutions per stage (paper: 3).
    norm : str
        ``"group"`` (default), ``"instance"`` or ``"none"``. The paper does not say.
    residual : bool
        Output ``x + U(x)`` with the last convolution initialised to zero, so that an
        untrained generator is the identity. The paper does not say how its U-Net
        produces the image; starting from the identity makes the similarity and cycle
        losses zero at step 0, so training only has to learn the decision-relevant edit,
        which is what makes a CPU budget of minutes enough.
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        *,
        width: int = 16,
        depth: int = 3,
        convs_per_stage: int = 3,
        norm: str = "group",
        residual: bool = True,
    ) -> None:
        super().__init__()
        _check_arch(spatial_dims, in_channels, width, convs_per_stage, norm)
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 0:
            raise ValueError(f"depth must be an integer >= 0, got {depth!r}")
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.residual = residual
        widths = [width * 2**s for s in range(depth + 1)]
        self.down = _encoder(spatial_dims, in_channels, widths, convs_per_stage, norm)
        self.up = nn.ModuleList(
            _Stage(
                widths[s + 1] + widths[s],
                widths[s],
                convs=convs_per_stage,
                stride=1,
                spatial_dims=spatial_dims,
                norm=norm,
            )
            for s in reversed(range(depth))
        )
        self.head = _conv_cls(spatial_dims)(widths[0], in_channels, 1)
        if residual:
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        h = x
        for stage in self.down:
            h = stage(h)
            skips.append(h)
        h = skips.pop()
        for stage in self.up:
            skip = skips.pop()
            h = F.interpolate(h, size=skip.shape[2:], mode="nearest")
            h = stage(torch.cat([h, skip], dim=1))
        out = self.head(h)
        return x + out if self.residual else out


class PairDiscriminator(nn.Module):
    """Multiscale PatchGAN pair discriminator of Katzmann et al. 2021 (section 2.3, Fig. 5).

    The generator's encoder (stages ``0..max(scales)``) extracts features of both images
    of a pair with shared weights. At every position of the stages named in ``scales``
    (paper: 2 and 3) the two feature vectors are concatenated and a two-neuron dense
    layer (a 1x1 convolution) with softmax says which of the two is real.

    ``forward(a, b, generator)`` returns one logit map ``(B, 2, *patches)`` per scale;
    channel 0 is "``a`` is the real one", channel 1 "``b`` is". With a ``generator`` the
    order of the two feature vectors is drawn at random per sample and position before
    the dense layer, and the two logits are swapped back afterwards, so the layer cannot
    learn a constant answer for one input slot (the "real neuron" of the paper). Without
    a generator the order is kept (deterministic, for inspection).

    Parameters
    ----------
    spatial_dims, in_channels, width, convs_per_stage
        As for :class:`UNetGenerator`.
    norm : str
        ``"none"`` (default), ``"group"`` or ``"instance"``. Per-sample normalisation
        removes each image's mean intensity and contrast from the features, so a
        discriminator with it cannot see a generator that darkens or brightens the whole
        image, an edit that fools a classifier with batch norm easily.
    scales : sequence of int
        Encoder stages whose outputs are classified (paper: ``(2, 3)``).
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        *,
        width: int = 16,
        convs_per_stage: int = 3,
        norm: str = "none",
        scales: Sequence[int] = (2, 3),
    ) -> None:
        super().__init__()
        _check_arch(spatial_dims, in_channels, width, convs_per_stage, norm)
        scales = tuple(int(s) for s in scales)
        if not scales or min(scales) < 0 or len(set(scales)) != len(scales):
            raise ValueError(f"scales must be distinct stage indices >= 0, got {scales!r}")
        self.scales = tuple(sorted(scales))
        widths = [width * 2**s for s in range(max(self.scales) + 1)]
        self.encoder = _encoder(spatial_dims, in_channels, widths, convs_per_stage, norm)
        conv = _conv_cls(spatial_dims)
        self.heads = nn.ModuleList(conv(2 * widths[s], 2, 1) for s in self.scales)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The encoder's outputs at ``scales``, each ``(B, width * 2**s, *patches)``."""
        out = []
        h = x
        for s, stage in enumerate(self.encoder):
            h = stage(h)
            if s in self.scales:
                out.append(h)
        return out

    def forward(
        self, a: torch.Tensor, b: torch.Tensor, generator: torch.Generator | None = None
    ) -> list[torch.Tensor]:
        if a.shape != b.shape:
            raise ValueError(
                f"a pair must have one shape, got {tuple(a.shape)} and {tuple(b.shape)}"
            )
        # One pass over both images: the same weights (and, for group norm, per-sample
        # statistics) as two separate passes.
        feats = self.features(torch.cat([a, b], dim=0))
        n = a.shape[0]
        out = []
        for head, f in zip(self.heads, feats):
            fa, fb = f[:n], f[n:]
            if generator is None:
                out.append(head(torch.cat([fa, fb], dim=1)))
                continue
            draw = torch.rand((n, 1, *fa.shape[2:]), generator=generator, device=generator.device)
            swap = (draw < 0.5).to(fa.device)
            first = torch.where(swap, fb, fa)
            second = torch.where(swap, fa, fb)
            logits = head(torch.cat([first, second], dim=1))
            l0, l1 = logits[:, :1], logits[:, 1:]
            out.append(torch.cat([torch.where(swap, l1, l0), torch.where(swap, l0, l1)], dim=1))
        return out


# ----------------------------------------------------------------------------------------
# A trained pair and its file
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class CounterfactualGenerators:
    """Two trained generators and what they were trained for.

    Attributes
    ----------
    plus, minus:
        ``G+`` (pushes the classifier towards ``classes[1]``) and ``G-`` (towards
        ``classes[0]``).
    spatial_dims, in_channels, image_size:
        The input they were trained on: ``(B, in_channels, *image_size)``.
    classifier_outputs:
        Width of the classifier's output they were trained against: 2 (two logits) or 1
        (one logit).
    classes:
        Names of the negative and positive class.
    arch:
        Constructor arguments of :class:`UNetGenerator`.
    meta:
        Anything else recorded by training (dataset, steps, seed, ...).
    path:
        The file they were loaded from, or None.
    """

    plus: nn.Module
    minus: nn.Module
    spatial_dims: int
    in_channels: int
    image_size: tuple[int, ...]
    classifier_outputs: int = 2
    classes: tuple[str, str] = ("negative", "positive")
    arch: Mapping[str, Any] = field(default_factory=dict)
    meta: Mapping[str, Any] = field(default_factory=dict)
    path: str | None = None

    def describe(self) -> str:
        size = "x".join(str(s) for s in self.image_size)
        return f"{self.in_channels}-channel {size} images ({self.spatial_dims}D)"


def _arch_kwargs(arch: Mapping[str, Any]) -> dict[str, Any]:
    keys = ("spatial_dims", "in_channels", "width", "depth", "convs_per_stage", "norm", "residual")
    missing = [k for k in keys if k not in arch]
    if missing:
        raise ValueError(f"generator architecture lacks {missing}")
    return {k: arch[k] for k in keys}


def save_generators(path: str | os.PathLike[str], generators: CounterfactualGenerators) -> Path:
    """Write both generators' weights and their metadata to ``path`` atomically.

    The file holds only tensors and JSON-like values, so :func:`load_generators` reads it
    with ``torch.load(weights_only=True)``.
    """
    payload = {
        "format": GENERATORS_FORMAT,
        "version": GENERATORS_VERSION,
        "arch": dict(generators.arch),
        "spatial_dims": int(generators.spatial_dims),
        "in_channels": int(generators.in_channels),
        "image_size": [int(s) for s in generators.image_size],
        "classifier_outputs": int(generators.classifier_outputs),
        "classes": [str(c) for c in generators.classes],
        "meta": dict(generators.meta),
        "plus": {k: v.detach().cpu() for k, v in generators.plus.state_dict().items()},
        "minus": {k: v.detach().cpu() for k, v in generators.minus.state_dict().items()},
    }
    with atomic_path(path) as temp:
        torch.save(payload, temp)
    return Path(path)


def load_generators(
    path: str | os.PathLike[str],
    *,
    map_location: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> CounterfactualGenerators:
    """Load the generators written by training: a training directory or its
    ``generators.pt``.

    Returns the pair in eval mode on ``map_location`` (in ``dtype`` if given).

    Raises
    ------
    FileNotFoundError
        If the directory or file does not exist, or the directory holds no
        ``generators.pt`` (the message says whether an unfinished run is there).
    ValueError
        If the file is not a generator file of this format or its weights do not fit.
    """
    p = Path(path).expanduser()
    if p.is_dir():
        file = p / GENERATORS_FILE
        if not file.is_file():
            hint = (
                "; it holds an unfinished run (last.pt): resume it with `trustmap counterfactual "
                "train` to finish training"
                if (p / "last.pt").is_file()
                else "; train generators into it with `trustmap counterfactual train`"
            )
            raise FileNotFoundError(f"{p} has no {GENERATORS_FILE}{hint}")
    elif p.is_file():
        file = p
    else:
        raise FileNotFoundError(f"generators {p} do not exist (expected a training directory)")
    try:
        payload = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # a damaged or foreign file fails in many ways
        raise ValueError(f"{file} is not a readable generator file: {type(err).__name__}") from err
    if not isinstance(payload, dict) or payload.get("format") != GENERATORS_FORMAT:
        raise ValueError(f"{file} is not a trustmap cyclegan_am generator file")
    version = payload.get("version")
    if not isinstance(version, int) or not 1 <= version <= GENERATORS_VERSION:
        raise ValueError(f"{file} has version {version!r}; this trustmap reads up to 1")
    try:
        kwargs = _arch_kwargs(payload["arch"])
        nets = []
        for key in ("plus", "minus"):
            # The random initialisation is overwritten at once; forking keeps it from
            # advancing the caller's global generator.
            with torch.random.fork_rng(devices=[]):
                net = UNetGenerator(**kwargs)
            net.load_state_dict(payload[key])
            nets.append(net.to(map_location, dtype=dtype).eval())
    except (KeyError, RuntimeError, TypeError, ValueError) as err:
        raise ValueError(f"{file}: cannot rebuild the generators: {err}") from err
    classes = tuple(str(c) for c in payload.get("classes", ("negative", "positive")))
    return CounterfactualGenerators(
        plus=nets[0],
        minus=nets[1],
        spatial_dims=int(payload["spatial_dims"]),
        in_channels=int(payload["in_channels"]),
        image_size=tuple(int(s) for s in payload["image_size"]),
        classifier_outputs=int(payload.get("classifier_outputs", 2)),
        classes=(classes[0], classes[1]) if len(classes) == 2 else ("negative", "positive"),
        arch=dict(payload["arch"]),
        meta=dict(payload.get("meta", {})),
        path=str(file),
    )
