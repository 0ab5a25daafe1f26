"""Convolutional autoencoders for anomaly maps (Huff et al. 2021, section 2.3), 2D and 3D.

An autoencoder trained on normal images only learns to reconstruct normal anatomy; an
abnormality is reconstructed poorly, so the reconstruction error ``|x - D(E(x))|``
localizes it (Uzunova et al. 2019 with a VAE, Chen et al. 2020). ``create("autoencoder")``
and ``create("vae")`` build the models; :func:`train_autoencoder` trains them on the
normal images of a dataset's train split with the training loop of
:mod:`trustmap.models.training` (seeded, resumable, early stopping, a card); the
``ae_anomaly`` explainer returns their error maps.

Both models share one shape: ``depth`` stages of ``Conv(3, stride 2) -> BatchNorm ->
ReLU`` with ``w, 2w, 4w, ...`` kernels down to ``1 / 2^depth`` of the input, a 1x1
convolution to ``latent_channels`` (the bottleneck: ``latent_channels`` numbers per
position of a ``2^depth`` times smaller grid), and a mirrored decoder (nearest-neighbour
upsampling, ``Conv(3) -> BatchNorm -> ReLU``) ending in a linear 1x1 convolution back to
the input's channels. Inputs whose size is not a multiple of ``2^depth`` are padded
(replicate) and the output is cropped back.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trustmap.errors import InputError
from trustmap.models.localizers import _pad_to_multiple

__all__ = ["AUTOENCODERS", "ConvAutoencoder", "is_autoencoder"]

AUTOENCODERS = ("autoencoder", "vae")


def _block(dims: int, c_in: int, c_out: int, stride: int) -> nn.Sequential:
    conv = {2: nn.Conv2d, 3: nn.Conv3d}[dims]
    norm = {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims]
    return nn.Sequential(
        OrderedDict(
            conv=conv(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=False),
            bn=norm(c_out),
            relu=nn.ReLU(),
        )
    )


class ConvAutoencoder(nn.Module):
    """Convolutional autoencoder, or variational autoencoder with ``variational=True``.

    ``forward(x)`` returns the reconstruction ``(B, C, *spatial)``. A VAE encodes a
    Gaussian ``N(mu, exp(logvar))`` per latent entry; in training mode ``forward`` decodes
    a sample (reparameterisation trick), in eval mode the mean, so its maps are
    deterministic.

    Loss (:meth:`loss`): mean squared reconstruction error; the VAE adds ``beta`` times
    the KL divergence to ``N(0, 1)`` per input element (Kingma and Welling 2014).

    Parameters
    ----------
    spatial_dims, in_channels
        Image rank (2 or 3) and channels.
    width
        Kernels of the first stage (doubled per stage).
    depth
        Number of stride-2 stages (the input must have at least ``2^depth`` pixels per
        axis after padding).
    latent_channels
        Channels of the bottleneck.
    variational
        Build a VAE.
    beta
        Weight of the KL term (VAE only).
    """

    target_kind = "reconstruction"

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        *,
        width: int = 16,
        depth: int = 4,
        latent_channels: int = 16,
        variational: bool = False,
        beta: float = 1e-3,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise InputError(f"autoencoder: spatial_dims must be 2 or 3, got {spatial_dims!r}")
        sizes = {"width": width, "depth": depth, "latent_channels": latent_channels}
        for name, value in sizes.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"autoencoder: {name} must be a positive integer, got {value!r}")
        if not (isinstance(beta, (int, float)) and beta >= 0):
            raise InputError(f"autoencoder: beta must be >= 0, got {beta!r}")
        conv = {2: nn.Conv2d, 3: nn.Conv3d}[spatial_dims]
        self.spatial_dims = spatial_dims
        self.variational = bool(variational)
        self.beta = float(beta)
        self.size_multiple = 2**depth
        chans = [width * 2**i for i in range(depth)]
        enc: OrderedDict[str, nn.Module] = OrderedDict()
        c = in_channels
        for i, c_out in enumerate(chans, start=1):
            enc[f"stage{i}"] = _block(spatial_dims, c, c_out, 2)
            c = c_out
        self.encoder = nn.Sequential(enc)
        self.to_latent = conv(c, latent_channels * (2 if self.variational else 1), kernel_size=1)
        self.from_latent = _block(spatial_dims, latent_channels, c, 1)
        dec: OrderedDict[str, nn.Module] = OrderedDict()
        for i, c_out in enumerate(reversed([width, *chans[:-1]]), start=1):
            dec[f"stage{i}"] = _block(spatial_dims, c, c_out, 1)
            c = c_out
        self.decoder = nn.ModuleDict(dec)
        self.head = conv(c, in_channels, kernel_size=1)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(mu, logvar)`` of the latent (``logvar`` None for a plain autoencoder); ``x``
        already padded to a multiple of ``2^depth``."""
        z = self.to_latent(self.encoder(x))
        if not self.variational:
            return z, None
        mu, logvar = z.chunk(2, dim=1)
        return mu, logvar.clamp(-12.0, 12.0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        h = self.from_latent(z)
        for stage in self.decoder.values():
            h = stage(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.head(h)

    def _reconstruct(
        self, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        spatial = x.shape[2:]
        mu, logvar = self.encode(_pad_to_multiple(x, self.size_multiple))
        z = mu
        if logvar is not None and self.training:
            z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        out = self.decode(z)
        return out[(..., *(slice(0, s) for s in spatial))], mu, logvar

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._reconstruct(x)[0]

    def loss(self, x: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        """Mean squared error of the reconstruction of ``x`` against ``target`` (``x`` if
        None), plus ``beta`` KL per element for a VAE."""
        recon, mu, logvar = self._reconstruct(x)
        target = x if target is None else target
        loss = F.mse_loss(recon, target)
        if logvar is not None:
            kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
            loss = loss + self.beta * kl / target.numel()
        return loss


def is_autoencoder(model: object) -> bool:
    """True for the models :func:`trustmap.models.create` builds as ``autoencoder``/``vae``."""
    return isinstance(model, ConvAutoencoder)


def build_autoencoder(
    spatial_dims: int, in_channels: int, num_classes: int, *, variational: bool, **kwargs: Any
) -> ConvAutoencoder:
    """The ``create()`` builder; ``num_classes`` must be 1 (an autoencoder has no classes;
    1 is what its checkpoint records)."""
    name = "vae" if variational else "autoencoder"
    if num_classes != 1:
        raise InputError(f"{name} reconstructs images and has no classes: num_classes must be 1")
    if "variational" in kwargs:
        raise InputError(f"{name}: 'variational' is set by the architecture name")
    return ConvAutoencoder(spatial_dims, in_channels, variational=variational, **kwargs)
