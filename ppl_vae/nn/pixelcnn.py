r"""PixelCNN likelihoods: p(x | z) = Π_i p(x_i | x_{<i}, h(z)) over pixels in raster order (binary images).

Two receptive fields, one interface (``net(x, h) -> logits`` of the shape of x):

* :class:`GatedPixelCNN` — the full receptive field of the gated PixelCNN (van den Oord, Kalchbrenner, Vinyals,
  Espeholt, Graves & Kavukcuoglu, "Conditional Image Generation with PixelCNN Decoders", NeurIPS 2016): a
  vertical stack (masked k×k convolutions that see the rows above) and a horizontal stack (1×k convolutions that
  see the pixels to the left in the current row), joined at every layer, with gates tanh(a) ⊙ σ(b) and a residual
  horizontal path; no blind spot, every preceding pixel within reach of the layers;
* :class:`LocalPixelCNN` — a small local window W(i): one masked k×k convolution of mask type A (the (k−1)/2
  rows above and the pixels to the left in the current row, within the window), then 1×1 layers, so the
  receptive field is exactly that window (the Variational Lossy Autoencoder's decoder, Chen et al. 2017). Chen
  et al.'s own window and conditioning could not be checked (only their abstract was reachable): the type-A k×k
  window, the 1×1 layers after it and the bias-map conditioning are our choices.

Conditioning on z is by **bias maps**: the model's decoder maps z to an image-shaped tensor h(z) (C×H×W, e.g. the
raw output of the library's MLP or conv decoders), and each layer adds a learned 1×1 projection of h(z) to its
pre-activations (van den Oord et al.'s location-dependent conditioning, with h(z) as the spatial map).

:class:`PixelCNNBernoulli` is the distribution: ``log_prob(x)`` runs the net once on x (teacher forcing; one
parallel pass); ``sample()`` fills the pixels in raster order, **one full forward pass per pixel and channel**
(H·W·C passes, batched over all samples drawn at once: 196 passes for a 14×14 image, 784 at 28×28; no cache of
the previous passes' activations). :class:`PixelCNNLikelihood` makes it a likelihood family for any model
(``model.likelihood: pixelcnn``; ``model.pixelcnn_window`` 0 = full, k = the local k×k window).
"""

from __future__ import annotations

import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.distributions.torch_distribution import TorchDistribution
from torch import nn
from torch.distributions import constraints

__all__ = [
    "MaskedConv2d",
    "GatedPixelCNN",
    "LocalPixelCNN",
    "PixelCNNBernoulli",
    "PixelCNNLikelihood",
    "build_pixelcnn",
]


class MaskedConv2d(nn.Conv2d):
    """A convolution whose kernel is multiplied by a fixed 0/1 ``mask`` of the kernel's (kh, kw) shape."""

    def __init__(self, in_channels: int, out_channels: int, mask: torch.Tensor, **kwargs):
        kh, kw = mask.shape
        super().__init__(in_channels, out_channels, (kh, kw), padding=(kh // 2, kw // 2), **kwargs)
        self.register_buffer("mask", mask.to(self.weight.dtype)[None, None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight * self.mask, self.bias, self.stride, self.padding)


def _vertical_mask(k: int, center: bool) -> torch.Tensor:
    """k×k: the rows above the centre (and the centre row when ``center``)."""
    m = torch.zeros(k, k)
    m[: k // 2 + (1 if center else 0)] = 1
    return m


def _horizontal_mask(k: int, center: bool) -> torch.Tensor:
    """1×k: the pixels left of the centre (and the centre when ``center``)."""
    m = torch.zeros(1, k)
    m[0, : k // 2 + (1 if center else 0)] = 1
    return m


def _window_mask(k: int) -> torch.Tensor:
    """k×k mask type A: the rows above the centre and the pixels left of the centre in its row."""
    m = torch.zeros(k, k)
    m[: k // 2] = 1
    m[k // 2, : k // 2] = 1
    return m


def _check_odd(name: str, k: int) -> None:
    if not isinstance(k, int) or k < 3 or k % 2 == 0:
        raise ValueError(f"{name} must be an odd integer >= 3, got {k!r}")


class _GatedLayer(nn.Module):
    def __init__(self, channels: int, cond_channels: int, k: int, first: bool, in_channels: int):
        super().__init__()
        c_in = in_channels if first else channels
        self.v = MaskedConv2d(c_in, 2 * channels, _vertical_mask(k, center=not first))
        self.h = MaskedConv2d(c_in, 2 * channels, _horizontal_mask(k, center=not first))
        self.v_to_h = nn.Conv2d(2 * channels, 2 * channels, 1)
        self.h_out = nn.Conv2d(channels, channels, 1)
        self.cond_v = nn.Conv2d(cond_channels, 2 * channels, 1)
        self.cond_h = nn.Conv2d(cond_channels, 2 * channels, 1)
        self.first = first

    def forward(self, v, h, cond):
        # v's features at row r see rows < r only (the first layer excludes the centre row; later layers include
        # it, but their inputs at row r already exclude row r), so they may enter the horizontal stack of row r
        # at the same position
        v_pre = self.v(v) + self.cond_v(cond)
        h_pre = self.h(h) + self.v_to_h(v_pre) + self.cond_h(cond)
        va, vb = v_pre.chunk(2, 1)
        ha, hb = h_pre.chunk(2, 1)
        v_out = torch.tanh(va) * torch.sigmoid(vb)
        h_gated = self.h_out(torch.tanh(ha) * torch.sigmoid(hb))
        h_out = h_gated if self.first else h + h_gated
        return v_out, h_out


class GatedPixelCNN(nn.Module):
    """The gated PixelCNN (full receptive field): ``layers`` gated layers of ``channels`` channels with k×k
    vertical and 1×k horizontal masked kernels, conditioned on bias maps ``cond`` (B, cond_channels, H, W)."""

    def __init__(
        self, in_channels: int = 1, cond_channels: int = 1, channels: int = 32, layers: int = 5, kernel: int = 3
    ):
        super().__init__()
        _check_odd("kernel", kernel)
        if layers < 1:
            raise ValueError(f"layers must be a positive integer, got {layers!r}")
        self.layers = nn.ModuleList(
            _GatedLayer(channels, cond_channels, kernel, i == 0, in_channels) for i in range(layers)
        )
        self.out = nn.Sequential(
            nn.ELU(), nn.Conv2d(channels, channels, 1), nn.ELU(), nn.Conv2d(channels, in_channels, 1)
        )
        self.receptive = "full"

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        v = h = x
        for layer in self.layers:
            v, h = layer(v, h, cond)
        return self.out(h)


class LocalPixelCNN(nn.Module):
    """A PixelCNN whose receptive field is the k×k window W(i) of preceding pixels (mask type A), followed by
    ``layers`` 1×1 layers of ``channels`` channels, each with its own bias map of ``cond``."""

    def __init__(
        self, in_channels: int = 1, cond_channels: int = 1, channels: int = 32, layers: int = 3, window: int = 3
    ):
        super().__init__()
        _check_odd("window", window)
        if layers < 1:
            raise ValueError(f"layers must be a positive integer, got {layers!r}")
        self.window = MaskedConv2d(in_channels, channels, _window_mask(window))
        self.hidden = nn.ModuleList(nn.Conv2d(channels, channels, 1) for _ in range(layers - 1))
        self.cond = nn.ModuleList(nn.Conv2d(cond_channels, channels, 1) for _ in range(layers))
        self.out = nn.Conv2d(channels, in_channels, 1)
        self.receptive = f"{window}x{window} window"

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        a = F.elu(self.window(x) + self.cond[0](cond))
        for layer, c in zip(self.hidden, self.cond[1:], strict=True):
            a = F.elu(layer(a) + c(cond))
        return self.out(a)


def build_pixelcnn(in_channels: int, *, window: int = 0, channels: int = 32, layers: int = 5) -> nn.Module:
    """``window`` 0: the full gated PixelCNN; k (odd, ≥ 3): the local k×k window. Bias maps of ``in_channels``."""
    if window == 0:
        return GatedPixelCNN(in_channels, in_channels, channels, layers)
    return LocalPixelCNN(in_channels, in_channels, channels, layers, window)


def _flat(t: torch.Tensor, event: int = 3):
    lead = t.shape[:-event]
    return t.reshape(-1, *t.shape[-event:]), lead


class PixelCNNBernoulli(TorchDistribution):
    """Binary images (event shape (C, H, W)) under a PixelCNN ``net(x, cond) -> logits`` with bias maps ``cond``
    of shape batch + (C', H, W). ``log_prob`` = teacher forcing (one pass); ``sample`` = raster-order sequential
    sampling (H·W·C passes)."""

    arg_constraints: dict = {}
    support = constraints.boolean
    has_rsample = False

    def __init__(self, net: nn.Module, cond: torch.Tensor, in_channels: int = 1, validate_args=None):
        self.net, self.cond, self.in_channels = net, cond, in_channels
        batch_shape = cond.shape[:-3]
        event_shape = torch.Size((in_channels, *cond.shape[-2:]))
        super().__init__(batch_shape, event_shape, validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        return PixelCNNBernoulli(
            self.net, self.cond.expand(*batch_shape, *self.cond.shape[-3:]), self.in_channels, validate_args=False
        )

    def logits(self, value: torch.Tensor) -> torch.Tensor:
        """Per-pixel logits of p(x_i = 1 | x_{<i}, z) with x = ``value`` (teacher forcing)."""
        shape = torch.broadcast_shapes(value.shape[:-3], self.cond.shape[:-3])
        v, _ = _flat(value.expand(*shape, *value.shape[-3:]).to(self.cond.dtype))
        c, _ = _flat(self.cond.expand(*shape, *self.cond.shape[-3:]))
        return self.net(v, c).reshape(*shape, *value.shape[-3:])

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        logits = self.logits(value)
        v = value.to(logits.dtype).expand_as(logits)
        return -F.binary_cross_entropy_with_logits(logits, v, reduction="none").sum((-3, -2, -1))

    @torch.no_grad()
    def sample_with_probs(self, sample_shape=torch.Size()) -> tuple[torch.Tensor, torch.Tensor]:
        """(a raster-order sample, the conditional probabilities p(x_i = 1 | sampled x_{<i}, z) it was drawn
        with), each of shape sample_shape + batch_shape + (C, H, W)."""
        shape = torch.Size(sample_shape) + self.batch_shape
        cond = self.cond.expand(*shape, *self.cond.shape[-3:])
        c, _ = _flat(cond)
        C, H, W = self.event_shape
        x = c.new_zeros(c.shape[0], C, H, W)
        probs = torch.zeros_like(x)
        for i in range(H):
            for j in range(W):
                for ch in range(C):
                    p = torch.sigmoid(self.net(x, c)[:, ch, i, j])
                    probs[:, ch, i, j] = p
                    x[:, ch, i, j] = torch.bernoulli(p)
        return x.reshape(*shape, C, H, W), probs.reshape(*shape, C, H, W)

    def sample(self, sample_shape=torch.Size()) -> torch.Tensor:
        return self.sample_with_probs(sample_shape)[0]


class PixelCNNLikelihood(nn.Module):
    """A likelihood family for any model: ``forward(h, event_dim, x)`` → :class:`PixelCNNBernoulli` with bias maps
    ``h`` (the decoder's image-shaped output); ``mean(h)`` → the conditional probabilities of one raster-order
    sample (E[x | z] has no closed form under an autoregressive decoder: a draw's probabilities stand in)."""

    def __init__(self, in_channels: int, *, window: int = 0, channels: int = 32, layers: int = 5):
        super().__init__()
        self.in_channels = in_channels
        self.net = build_pixelcnn(in_channels, window=window, channels=channels, layers=layers)
        self.window = window

    def forward(self, out: torch.Tensor, event_dim: int | None = None, x=None) -> dist.TorchDistribution:
        if out.dim() < 4:
            raise ValueError(
                f"a PixelCNN likelihood needs image-shaped decoder outputs (..., C, H, W), got shape "
                f"{tuple(out.shape)}: use model.arch 'mlp' or 'conv' on image data"
            )
        return PixelCNNBernoulli(self.net, out, self.in_channels)

    def mean(self, out: torch.Tensor) -> torch.Tensor:
        return PixelCNNBernoulli(self.net, out, self.in_channels).sample_with_probs()[1]
