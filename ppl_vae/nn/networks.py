"""Encoder and decoder networks, sized from the data shape.

Encoders map ``x`` (and an optional one-hot label) to the ``(loc, scale)`` of a diagonal Gaussian; decoders map
``z`` (and an optional one-hot label) to the raw output that a likelihood turns into p(x|z).
Burda, Grosse & Salakhutdinov (2016) architectures are available by name (``burda1``, ``burda2``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError

ACTIVATIONS = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "elu": nn.ELU,
    "softplus": nn.Softplus,
    "leaky_relu": nn.LeakyReLU,
    "identity": nn.Identity,
}  # identity: affine networks (linear-Gaussian test oracles)
MIN_SCALE = 1e-4


def activation(name: str) -> type[nn.Module]:
    if name not in ACTIVATIONS:
        raise ConfigError(f"model.activation must be one of {sorted(ACTIVATIONS)}, got {name!r}")
    return ACTIVATIONS[name]


class FlatBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d over the last dimension of an input of any leading shape (particles × batch × features are
    normalised as one batch), so a network with it also takes the importance samples of an IWAE or a log p(x)
    estimate."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if h.dim() == 2:
            return super().forward(h)
        return super().forward(h.reshape(-1, h.shape[-1])).reshape(h.shape)


def mlp(in_dim: int, hidden: Sequence[int], out_dim: int, act: str = "relu", batch_norm: bool = False) -> nn.Sequential:
    """Linear → act → ... → Linear (no activation after the last layer); ``batch_norm``: Linear → BatchNorm → act
    in every hidden layer (the last Linear has none)."""
    layers: list[nn.Module] = []
    d = in_dim
    for h in hidden:
        layers += [nn.Linear(d, h), *([FlatBatchNorm1d(h)] if batch_norm else []), activation(act)()]
        d = h
    layers.append(nn.Linear(d, out_dim))
    return nn.Sequential(*layers)


def _cat(x: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
    if c is None:
        return x
    c = c.to(x.dtype).expand(*x.shape[:-1], c.shape[-1])  # labels broadcast over particle dims of z
    return torch.cat([x, c], dim=-1)


class GaussianHead(nn.Module):
    """(loc, scale) of a diagonal Gaussian from an MLP: scale = softplus(raw) + 1e-4."""

    def __init__(self, in_dim: int, hidden: Sequence[int], out_dim: int, act: str = "relu", batch_norm: bool = False):
        super().__init__()
        self.net = mlp(in_dim, hidden, 2 * out_dim, act, batch_norm)
        self.out_dim = out_dim

    def forward(self, h: torch.Tensor, c: torch.Tensor | None = None):
        loc, raw = self.net(_cat(h, c)).chunk(2, dim=-1)
        return loc, F.softplus(raw) + MIN_SCALE


class MLPEncoder(nn.Module):
    """q(z|x) parameters from the flattened image (optionally concatenated with a one-hot label)."""

    def __init__(
        self, data_shape, latent_dim: int, hidden=(256, 256), act="relu", cond_dim: int = 0, batch_norm: bool = False
    ):
        super().__init__()
        self.data_shape = tuple(data_shape)
        self.head = GaussianHead(math.prod(data_shape) + cond_dim, hidden, latent_dim, act, batch_norm)

    def forward(self, x: torch.Tensor, c: torch.Tensor | None = None):
        return self.head(x.reshape(x.shape[0], -1), c)


class MLPDecoder(nn.Module):
    """Raw output ``(B, *data_shape)`` from z (optionally concatenated with a one-hot label)."""

    def __init__(
        self, data_shape, latent_dim: int, hidden=(256, 256), act="relu", cond_dim: int = 0, batch_norm: bool = False
    ):
        super().__init__()
        self.data_shape = tuple(data_shape)
        self.net = mlp(latent_dim + cond_dim, hidden, math.prod(data_shape), act, batch_norm)

    def forward(self, z: torch.Tensor, c: torch.Tensor | None = None):
        out = self.net(_cat(z, c))
        return out.reshape(*z.shape[:-1], *self.data_shape)


def _num_downsamples(size: int) -> int:
    """Stride-2 steps that keep an even size and end at ≥ 4 pixels: 28→14→7, 64→…→4, 8→4."""
    n = 0
    while size % 2 == 0 and size // 2 >= 4 and n < 4:
        size //= 2
        n += 1
    return n


def conv_trunk(data_shape, channels: int = 32, act: str = "relu") -> tuple[nn.Sequential, int]:
    """Stride-2 4×4 convolutions (channels, 2·channels, …) down to a small feature map; (trunk, flat size)."""
    c, h, w = data_shape
    n = min(_num_downsamples(h), _num_downsamples(w))
    layers: list[nn.Module] = []
    ch = c
    for i in range(n):
        out_ch = channels * 2**i
        layers += [nn.Conv2d(ch, out_ch, 4, stride=2, padding=1), activation(act)()]
        ch = out_ch
    return nn.Sequential(*layers), ch * (h // 2**n) * (w // 2**n)


class ConvEncoder(nn.Module):
    """Stride-2 convolutions down to a small feature map, then a Gaussian head."""

    def __init__(self, data_shape, latent_dim: int, channels: int = 32, hidden=(256,), act="relu", cond_dim: int = 0):
        super().__init__()
        self.conv, self.feat_dim = conv_trunk(data_shape, channels, act)
        self.head = GaussianHead(self.feat_dim + cond_dim, hidden, latent_dim, act)

    def forward(self, x: torch.Tensor, c: torch.Tensor | None = None):
        return self.head(self.conv(x).flatten(1), c)


class ConvDecoder(nn.Module):
    """A linear map to a small feature map, then stride-2 transposed convolutions back to the data shape."""

    def __init__(self, data_shape, latent_dim: int, channels: int = 32, hidden=(256,), act="relu", cond_dim: int = 0):
        super().__init__()
        c, h, w = data_shape
        self.data_shape = tuple(data_shape)
        n = min(_num_downsamples(h), _num_downsamples(w))
        self.n = n
        self.ch0 = channels * 2 ** max(n - 1, 0)
        self.hw0 = (h // 2**n, w // 2**n)
        self.fc = nn.Sequential(
            mlp(latent_dim + cond_dim, hidden, self.ch0 * self.hw0[0] * self.hw0[1], act), activation(act)()
        )
        layers: list[nn.Module] = []
        ch = self.ch0
        for i in reversed(range(n)):
            out_ch = c if i == 0 else channels * 2 ** (i - 1)
            layers.append(nn.ConvTranspose2d(ch, out_ch, 4, stride=2, padding=1))
            if i > 0:
                layers.append(activation(act)())
            ch = out_ch
        if n == 0:
            layers.append(nn.Conv2d(ch, c, 3, padding=1))
        self.deconv = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor, c: torch.Tensor | None = None):
        batch = z.shape[:-1]
        h = self.fc(_cat(z, c)).reshape(-1, self.ch0, *self.hw0)
        return self.deconv(h).reshape(*batch, *self.data_shape)


class PreActBlock(nn.Module):
    """A pre-activation residual block (He et al. 2016, "Identity Mappings in Deep Residual Networks"):
    x + conv(act(norm(conv(act(norm(x)))))), with a stride-2 convolution (``down``) or a nearest ×2 upsampling
    (``up``) and a 1×1 projection on the skip path when the shape changes. GroupNorm, not BatchNorm: a datapoint's
    output never depends on the rest of its batch, so per-datapoint bounds (IWAE, DReG, log p(x)) stay exact."""

    def __init__(self, in_ch: int, out_ch: int, resample: str = "none", act: str = "relu"):
        super().__init__()
        if resample not in ("none", "down", "up"):
            raise ValueError(f"resample must be 'none', 'down' or 'up', got {resample!r}")
        self.resample = resample
        stride = 2 if resample == "down" else 1
        self.norm1, self.norm2 = nn.GroupNorm(_groups(in_ch), in_ch), nn.GroupNorm(_groups(out_ch), out_ch)
        self.act = activation(act)()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1, stride=stride) if (in_ch != out_ch or resample == "down") else None

    def forward(self, x):
        if self.resample == "up":
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        h = self.act(self.norm1(x))
        skip = x if self.skip is None else self.skip(h)
        h = self.conv1(h)
        return skip + self.conv2(self.act(self.norm2(h)))


def _groups(ch: int) -> int:
    return next(g for g in (8, 4, 2, 1) if ch % g == 0)


class ResNetEncoder(nn.Module):
    """A 3×3 stem, then one down-sampling pre-activation block per stride-2 step (channels doubling), then a
    Gaussian head on the flattened feature map."""

    def __init__(self, data_shape, latent_dim: int, channels: int = 32, hidden=(256,), act="relu", cond_dim: int = 0):
        super().__init__()
        c, h, w = data_shape
        n = min(_num_downsamples(h), _num_downsamples(w))
        layers: list[nn.Module] = [nn.Conv2d(c, channels, 3, padding=1)]
        ch = channels
        for i in range(n):
            layers.append(PreActBlock(ch, channels * 2 ** (i + 1), "down", act))
            ch = channels * 2 ** (i + 1)
        layers += [nn.GroupNorm(_groups(ch), ch), activation(act)()]
        self.net = nn.Sequential(*layers)
        self.feat_dim = ch * (h // 2**n) * (w // 2**n)
        self.head = GaussianHead(self.feat_dim + cond_dim, hidden, latent_dim, act)

    def forward(self, x: torch.Tensor, c: torch.Tensor | None = None):
        return self.head(self.net(x).flatten(1), c)


class ResNetDecoder(nn.Module):
    """A linear map to the smallest feature map, one up-sampling pre-activation block per stride-2 step
    (channels halving), then a 3×3 convolution to the data's channels (the raw output)."""

    def __init__(self, data_shape, latent_dim: int, channels: int = 32, hidden=(256,), act="relu", cond_dim: int = 0):
        super().__init__()
        c, h, w = data_shape
        self.data_shape = tuple(data_shape)
        n = min(_num_downsamples(h), _num_downsamples(w))
        self.ch0, self.hw0 = channels * 2**n, (h // 2**n, w // 2**n)
        self.fc = mlp(latent_dim + cond_dim, hidden, self.ch0 * self.hw0[0] * self.hw0[1], act)
        layers: list[nn.Module] = []
        ch = self.ch0
        for _ in range(n):
            layers.append(PreActBlock(ch, ch // 2, "up", act))
            ch //= 2
        layers += [nn.GroupNorm(_groups(ch), ch), activation(act)(), nn.Conv2d(ch, c, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor, c: torch.Tensor | None = None):
        batch = z.shape[:-1]
        h = self.fc(_cat(z, c)).reshape(-1, self.ch0, *self.hw0)
        return self.net(h).reshape(*batch, *self.data_shape)


def image_trunk(arch: str, data_shape, channels: int = 32, act: str = "relu") -> tuple[nn.Module, int]:
    """The feature extractor of the ``conv`` or ``resnet`` encoder (without its Gaussian head); (trunk, flat size)."""
    if arch == "conv":
        return conv_trunk(data_shape, channels, act)
    if arch == "resnet":
        enc = ResNetEncoder(data_shape, 1, channels, (1,), act)
        return enc.net, enc.feat_dim
    raise ConfigError(f"model.arch must be 'conv' or 'resnet' for an image trunk, got {arch!r}")


# Burda et al. (2016), section 5: one stochastic layer = 2×200 tanh units and 50 latents;
# two stochastic layers = 2×100 tanh → 100 latents → 2×50 tanh → 50 latents (and the mirror image to decode).
BURDA = {
    "burda1": {"hidden": (200, 200), "latent_dim": 50, "act": "tanh"},
    "burda2": {"hidden": (100, 100), "latent_dim": 100, "hidden2": (50, 50), "latent_dim2": 50, "act": "tanh"},
}


def build_encoder_decoder(
    arch: str, data_shape, latent_dim: int, hidden=(256, 256), act="relu", cond_dim: int = 0, channels: int = 32
):
    """(encoder, decoder) for ``arch`` in {"mlp", "conv", "resnet", "burda1"}; Burda sizes override
    latent_dim/hidden."""
    if arch == "mlp":
        return (
            MLPEncoder(data_shape, latent_dim, hidden, act, cond_dim),
            MLPDecoder(data_shape, latent_dim, hidden, act, cond_dim),
        )
    if arch == "conv":
        hid = tuple(hidden[:1]) if hidden else (256,)
        return (
            ConvEncoder(data_shape, latent_dim, channels, hid, act, cond_dim),
            ConvDecoder(data_shape, latent_dim, channels, hid, act, cond_dim),
        )
    if arch == "resnet":
        hid = tuple(hidden[:1]) if hidden else (256,)
        return (
            ResNetEncoder(data_shape, latent_dim, channels, hid, act, cond_dim),
            ResNetDecoder(data_shape, latent_dim, channels, hid, act, cond_dim),
        )
    if arch == "burda1":
        b = BURDA["burda1"]
        return (
            MLPEncoder(data_shape, b["latent_dim"], b["hidden"], b["act"], cond_dim),
            MLPDecoder(data_shape, b["latent_dim"], b["hidden"], b["act"], cond_dim),
        )
    if arch == "burda2":
        raise ConfigError(
            "model.arch='burda2' is the two-stochastic-layer architecture of model.name='vae2'; this model has one "
            "stochastic layer: use mlp, conv, resnet or burda1"
        )
    raise ConfigError(f"model.arch must be one of ['mlp', 'conv', 'resnet', 'burda1', 'burda2'], got {arch!r}")
