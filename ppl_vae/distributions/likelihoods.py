"""Observation models p(x | z) as small ``nn.Module`` s.

A likelihood turns the decoder's raw output ``out`` (shape ``(B, *event_shape)``) into a Pyro distribution
whose batch shape is ``(B,)`` and whose event shape is the data shape, ready for
``pyro.sample("x", likelihood(out, event_dim=x.dim() - 1, x=x), obs=x)`` inside the data plate; ``mean(out)`` is
E[x | z] in data space. ``x`` (the observation, optional) is read only by likelihoods whose scale adapts to the
batch (:class:`FlooredLaplace`).
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.nn import PyroModule, PyroParam
from torch import nn
from torch.distributions import constraints, transform_to

from ..errors import ConfigError
from ..nn.pixelcnn import PixelCNNLikelihood

_LINKS = {"sigmoid": torch.sigmoid, "identity": lambda t: t}


def _event_dim(out: torch.Tensor, event_dim: int | None) -> int:
    """Event dims of p(x|z): given by the caller (the data's ``x.dim() - 1``, which stays right when particle
    plates add batch dims on the left), else all dims of ``out`` but the first."""
    return out.dim() - 1 if event_dim is None else event_dim


def _link(name: str):
    if name not in _LINKS:
        raise ConfigError(f"model.link must be one of {sorted(_LINKS)}, got {name!r}")
    return _LINKS[name]


class BernoulliLikelihood(nn.Module):
    """p(x|z) = Π_k Bernoulli(x_k; sigmoid(out_k)).

    Grey levels in [0, 1] are accepted as targets (the cross-entropy of Kingma & Welling's MNIST
    experiments); the log-density is a proper log-likelihood only for binary data.
    """

    def forward(self, out: torch.Tensor, event_dim: int | None = None, x=None) -> dist.TorchDistribution:
        return dist.Bernoulli(logits=out, validate_args=False).to_event(_event_dim(out, event_dim))

    def mean(self, out: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(out)


class CategoricalLikelihood(nn.Module):
    """p(y|z) = OneHotCategorical(y; softmax(out)) for a label modality stored one-hot (event dim 1); ``mean`` is
    the vector of class probabilities."""

    def forward(self, out: torch.Tensor, event_dim: int | None = None, x=None) -> dist.TorchDistribution:
        return dist.OneHotCategorical(logits=out, validate_args=False)

    def mean(self, out: torch.Tensor) -> torch.Tensor:
        return torch.softmax(out, dim=-1)


SIGMA2_MODES = ("fixed", "learned", "closed_form")


class GaussianLikelihood(PyroModule):
    r"""p(x|z) = N(x; link(out), σ² I), the Gaussian likelihood of Lin, Roberts, Trigoni & Clark, "Balancing
    Reconstruction Quality and Regularisation in Evidence Lower Bound for Variational Autoencoders" (eq. 7):

        log p(x|z) = −(d/2) log(2π σ²) − ‖g(z) − x‖² / (2σ²).

    ``mode`` says where σ² comes from:

    * ``"fixed"``: a constant (``sigma2``); σ² = 0.5 is the original VAE's weighting, σ² = 1 a β-VAE with β = 2.
    * ``"learned"``: a ``pyro.param`` with a positive constraint (a :class:`~pyro.nn.PyroParam` named
      ``<module>.sigma2``, initialised at ``sigma2``), trained by gradient on the ELBO with everything else.
    * ``"closed_form"``: the same ``pyro.param``, but the model sets it to the optimum for the current θ, φ
      (eq. 9), σ*² = (1/d)·E_q[Σ_k (g_k(z) − x_k)²] = the mean squared error of the current reconstructions,
      with :meth:`set_sigma2`, which writes *in place* into the unconstrained tensor so that the optimiser's
      state for it (keyed by that tensor) survives.

    ``forward(out, event_dim=None, variance=None)``: a ``variance`` tensor (e.g. the per-pixel σ²_k(z) of
    :class:`PixelVarianceNet`) replaces the global σ²; ``event_dim`` as for every likelihood here.
    """

    def __init__(self, sigma2: float = 1.0, link: str = "sigmoid", mode: str = "fixed"):
        super().__init__()
        if not (
            isinstance(sigma2, (int, float)) and not isinstance(sigma2, bool) and sigma2 > 0 and math.isfinite(sigma2)
        ):
            raise ConfigError(f"model.sigma2 must be a positive number, got {sigma2!r}")
        if mode not in SIGMA2_MODES:
            raise ConfigError(
                f"model.options.sigma2_mode must be one of {list(SIGMA2_MODES) + ['per_pixel']}, got {mode!r}"
            )
        self.mode = mode
        self.sigma2_init = float(sigma2)
        self.link = link
        self._f = _link(link)
        if mode == "fixed":
            self.sigma2 = float(sigma2)
        else:
            self.sigma2 = PyroParam(torch.tensor(float(sigma2)), constraint=constraints.positive)

    @property
    def learnable(self) -> bool:
        return self.mode != "fixed"

    def forward(
        self, out: torch.Tensor, event_dim: int | None = None, variance: torch.Tensor | None = None, x=None
    ) -> dist.TorchDistribution:
        loc = self._f(out)
        if variance is not None:
            scale = variance.sqrt()
        elif self.mode == "fixed":
            scale = math.sqrt(self.sigma2)
        else:
            self._claim_store_entry()
            scale = self.sigma2.sqrt()  # a pyro.param statement inside a model
        return dist.Normal(loc, scale).to_event(_event_dim(out, event_dim))

    def mean(self, out: torch.Tensor) -> torch.Tensor:
        return self._f(out)

    # -- σ² outside a model: read, and write in place ---------------------------------------------------------
    def _own(self) -> torch.Tensor:
        return self._parameters["sigma2_unconstrained"]

    def _claim_store_entry(self) -> None:
        """Make the param store's ``<module>.sigma2`` this module's own tensor. Pyro's store is global and keyed
        by name, so another model with the same layout may have left its σ² there; PyroModule would then adopt
        that tensor and silently lose ours. The stale entry is dropped instead (its owner keeps its tensor)."""
        try:
            name = self._pyro_get_fullname("sigma2")
        except AssertionError:  # not yet run inside a model: nothing registered
            return
        store = pyro.get_param_store()
        if name in store and store[name].unconstrained() is not self._own():
            del store[name]

    def sigma2_value(self) -> torch.Tensor:
        """The current global σ² as a detached 0-d tensor."""
        if self.mode == "fixed":
            return torch.tensor(self.sigma2)
        return transform_to(constraints.positive)(self._own()).detach()

    def set_sigma2(self, value) -> None:
        """σ² ← value, written in place into the unconstrained tensor (the module's, which is the param store's
        once the model has run), under ``torch.no_grad``.

        Assigning ``param_store[name] = value`` would create a new leaf tensor and orphan the optimiser's state
        (Pyro's optimisers are keyed by the tensor); ``unconstrained.copy_(transform.inv(value))`` keeps it.
        """
        if self.mode == "fixed":
            raise ValueError(
                "set_sigma2: the likelihood has a fixed σ² (mode='fixed'); build it with "
                "mode='learned' or 'closed_form'"
            )
        u = self._own()
        v = torch.as_tensor(value, dtype=u.dtype, device=u.device).detach().reshape(u.shape)
        if not bool(torch.isfinite(v).all()) or not bool((v > 0).all()):
            raise ValueError(f"set_sigma2: σ² must be a positive finite number, got {v.tolist()}")
        with torch.no_grad():
            u.copy_(transform_to(constraints.positive).inv(v))

    def variance(self, out: torch.Tensor) -> torch.Tensor:
        """σ² broadcast to the shape of the mean (an uncertainty map that is constant for a global σ²)."""
        return self.sigma2_value().to(out.device, out.dtype).expand(out.shape)


def closed_form_sigma2(mean: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    r"""σ*² = (1/d) E_q[Σ_k (g_k(z) − x_k)²] (Lin et al., eq. 9), averaged over the datapoints (and particles):
    the mean squared error of the reconstructions ``mean`` = g(z), z ~ q(z|x), against ``x``. Detached."""
    return (mean.detach() - x.detach()).pow(2).mean()


class PixelVarianceNet(nn.Module):
    r"""The stage-2 variance network of Lin et al. (Algorithm 1): σ²_k(z) = v_k(z) + σ²_dataset / 2, with
    v_k(z) = softplus(net(z)_k) ≥ 0, so the per-pixel variance never falls below the floor σ²_dataset / 2.

    ``net`` maps z (and an optional one-hot label) to a raw tensor of the data's shape, like a decoder.
    The floor is a buffer (saved in checkpoints); :meth:`start_from` sets it from the stage-1 σ² and makes the
    initial prediction ≈ σ²_dataset everywhere, so stage 2 starts from the stage-1 likelihood.
    """

    def __init__(self, net: nn.Module, floor: float = 0.0):
        super().__init__()
        self.net = net
        self.register_buffer("floor", torch.tensor(float(floor)))

    def forward(self, z: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        return F.softplus(self.net(z, c)) + self.floor

    @property
    def sigma2_dataset(self) -> float:
        return 2.0 * float(self.floor)

    def start_from(self, sigma2_dataset: float, weight_scale: float = 0.01) -> None:
        """floor ← σ²_dataset/2; last layer: bias = softplus⁻¹(σ²_dataset/2), weights × ``weight_scale``."""
        s2 = float(sigma2_dataset)
        if not (s2 > 0 and math.isfinite(s2)):
            raise ValueError(f"start_from: σ²_dataset must be a positive finite number, got {sigma2_dataset!r}")
        with torch.no_grad():
            self.floor.fill_(s2 / 2)
            last = [m for m in self.net.modules() if getattr(m, "bias", None) is not None]
            if last:
                layer = last[-1]
                layer.weight.mul_(weight_scale)
                half = torch.tensor(s2 / 2, dtype=layer.bias.dtype)
                layer.bias.fill_(float(half + torch.log(-torch.expm1(-half))))  # softplus⁻¹(s2/2)


class LaplaceLikelihood(nn.Module):
    """p(x|z) = Π_k Laplace(x_k; link(out_k), b) with a fixed scale b."""

    def __init__(self, scale: float = 0.1, link: str = "sigmoid"):
        super().__init__()
        if not (isinstance(scale, (int, float)) and scale > 0 and math.isfinite(scale)):
            raise ConfigError(f"model.laplace_scale must be a positive number, got {scale!r}")
        self.scale = float(scale)
        self.link = link
        self._f = _link(link)

    def forward(self, out: torch.Tensor, event_dim: int | None = None, x=None) -> dist.TorchDistribution:
        return dist.Laplace(self._f(out), self.scale).to_event(_event_dim(out, event_dim))

    def mean(self, out: torch.Tensor) -> torch.Tensor:
        return self._f(out)


class FlooredLaplace(nn.Module):
    """p(x|z) = Π_k Laplace(x_k; link(out_k), b), b = max(exp(log_b), floor): one learned scale floored at the
    reconstruction error (LaDDer's outer likelihood, Lin & Clark 2020, official code's Supplementary Material C).

    In training mode the floor is the mean absolute error of this call's batch (``x`` given), the per-batch
    closed-form optimum of b (so the gradient of the floored objective is the gradient with the floor held
    fixed); in eval mode it is the buffer ``eval_floor`` (the training-set MAE, set by :meth:`set_eval_floor`), so
    that p(x|z) is a fixed density for log-likelihood evaluation.
    """

    def __init__(self, init_scale: float = 0.02, link: str = "sigmoid", floor: bool = True):
        super().__init__()
        if not (isinstance(init_scale, (int, float)) and not isinstance(init_scale, bool) and init_scale > 0):
            raise ConfigError(f"model.options.laplace_init_scale must be a positive number, got {init_scale!r}")
        self.link = link
        self._f = _link(link)
        self.floor = bool(floor)
        self.log_scale = nn.Parameter(torch.tensor(math.log(init_scale)))
        self.register_buffer("eval_floor", torch.zeros(()))

    def scale(self, mean: torch.Tensor | None = None, x: torch.Tensor | None = None) -> torch.Tensor:
        b = self.log_scale.exp()
        if not self.floor:
            return b
        if self.training and x is not None and mean is not None:
            return torch.maximum(b, (mean - x).abs().mean())
        return torch.maximum(b, self.eval_floor)

    def forward(self, out: torch.Tensor, event_dim: int | None = None, x=None) -> dist.TorchDistribution:
        mean = self._f(out)
        return dist.Laplace(mean, self.scale(mean, x)).to_event(_event_dim(out, event_dim))

    def mean(self, out: torch.Tensor) -> torch.Tensor:
        return self._f(out)

    @torch.no_grad()
    def set_eval_floor(self, abs_errors: torch.Tensor) -> None:
        """eval floor ← mean of the per-datapoint mean absolute reconstruction errors ``abs_errors``."""
        self.eval_floor.fill_(abs_errors.mean())


def build_likelihood(
    name: str,
    *,
    sigma2: float = 1.0,
    laplace_scale: float = 0.1,
    link: str = "sigmoid",
    sigma2_mode: str = "fixed",
    data_shape=None,
    pixelcnn_window: int = 0,
    pixelcnn_layers: int = 5,
    channels: int = 32,
) -> nn.Module:
    """A likelihood by name: ``bernoulli``, ``gaussian`` (σ² ``fixed``, ``learned`` or ``closed_form``, see
    :class:`GaussianLikelihood`), ``laplace`` or ``pixelcnn`` (binary images of ``data_shape`` (C, H, W); full
    receptive field or a local ``pixelcnn_window``; :mod:`ppl_vae.nn.pixelcnn`)."""
    if name == "pixelcnn":
        if data_shape is None or len(data_shape) != 3:
            raise ConfigError(
                f"model.likelihood='pixelcnn' needs image data of shape (C, H, W), got "
                f"{None if data_shape is None else tuple(data_shape)}"
            )
        return PixelCNNLikelihood(int(data_shape[0]), window=pixelcnn_window, channels=channels, layers=pixelcnn_layers)
    if name == "bernoulli":
        return BernoulliLikelihood()
    if name == "gaussian":
        return GaussianLikelihood(sigma2=sigma2, link=link, mode=sigma2_mode)
    if name == "laplace":
        return LaplaceLikelihood(scale=laplace_scale, link=link)
    raise ConfigError(f"model.likelihood must be one of ['bernoulli', 'gaussian', 'laplace', 'pixelcnn'], got {name!r}")


def sigmoid_links(module: nn.Module) -> list[str]:
    """The names of ``module``'s Gaussian / Laplace likelihoods whose mean passes through the sigmoid link (their
    means cannot leave (0, 1), so data outside [0, 1] cannot be fitted)."""
    kinds = (GaussianLikelihood, LaplaceLikelihood, FlooredLaplace)
    return [name or "likelihood" for name, m in module.named_modules() if isinstance(m, kinds) and m.link == "sigmoid"]
