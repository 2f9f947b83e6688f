"""Small pieces shared by the model files."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..distributions.likelihoods import FlooredLaplace, build_likelihood
from ..errors import ConfigError
from ..nn.networks import build_encoder_decoder


def one_hot(y: torch.Tensor | None, num_classes: int | None, who: str) -> torch.Tensor | None:
    """One-hot float labels, or None for an unconditional model; a clear error for a missing or bad label."""
    if num_classes is None:
        return None
    if y is None:
        raise ValueError(f"{who} is conditional: call it with labels y (int64 tensor of shape (batch,))")
    y = torch.as_tensor(y)
    if y.dtype.is_floating_point or y.dim() != 1:
        raise ValueError(
            f"{who}: y must be an int64 tensor of shape (batch,), got dtype {y.dtype} shape {tuple(y.shape)}"
        )
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"{who}: labels must lie in [0, {num_classes - 1}], got min {int(y.min())} max {int(y.max())}")
    return F.one_hot(y.long(), num_classes).float()


def require_arch(cfg, *allowed: str) -> None:
    """ConfigError unless ``model.arch`` is one of ``allowed`` (the method's builder calls it first)."""
    if cfg.arch not in allowed:
        names = " or ".join(repr(a) for a in allowed)
        raise ConfigError(f"model.arch must be {names} for model.name={cfg.name!r}, got {cfg.arch!r}")


def require_hidden(cfg) -> None:
    """ConfigError unless ``model.hidden`` names at least one width (a ladder's step width is hidden[-1])."""
    if not cfg.hidden:
        raise ConfigError(f"model.hidden must name at least one layer width for model.name={cfg.name!r}, got []")


def outer_parts(cfg, data_shape, likelihood: str = "floored_laplace", laplace_init_scale: float = 0.02):
    """(encoder, decoder, likelihood) of a VAE x ↔ z from ``model.arch``/``hidden``/``latent_dim``, with LaDDer's
    floored Laplace likelihood (``likelihood="floored_laplace"``) or the one ``model.likelihood`` names
    (``"config"``); shared by LaDDer and WiSE-ALE."""
    require_arch(cfg, "mlp", "conv")
    enc, dec = build_encoder_decoder(
        cfg.arch, data_shape, cfg.latent_dim, tuple(cfg.hidden), cfg.activation, channels=cfg.channels
    )
    if likelihood == "floored_laplace":
        return enc, dec, FlooredLaplace(laplace_init_scale, link=cfg.link)
    return enc, dec, config_likelihood(cfg, data_shape)


def config_likelihood(cfg, data_shape=None):
    """The likelihood named by ``model.likelihood`` with ``model.sigma2``, ``laplace_scale``, ``link`` and, for
    ``pixelcnn``, ``pixelcnn_window``, ``pixelcnn_layers`` and ``channels`` on images of ``data_shape``."""
    return build_likelihood(
        cfg.likelihood,
        sigma2=cfg.sigma2,
        laplace_scale=cfg.laplace_scale,
        link=cfg.link,
        data_shape=data_shape,
        pixelcnn_window=cfg.pixelcnn_window,
        pixelcnn_layers=cfg.pixelcnn_layers,
        channels=cfg.channels,
    )


class LadderFigures:
    """The figure API of a ladder model (``encoder(x) -> [(μ_l, σ_l)]``, ``decoder([z_1..z_L])``, ``latent_dims``,
    ``likelihood``), with z = [z_1, …, z_L] concatenated: ``split``, ``encode``, ``decode``, ``reconstruct``."""

    def split(self, z: torch.Tensor) -> list[torch.Tensor]:
        return list(z.split(self.latent_dims, dim=-1))

    def encode(self, x, y=None):
        locs, scales = zip(*self.encoder(x), strict=True)
        return torch.cat(locs, -1), torch.cat(scales, -1)

    def decode(self, z, y=None):
        return self.likelihood.mean(self.decoder(self.split(z)))

    def reconstruct(self, x, y=None):
        return self.decode(self.encode(x)[0])
