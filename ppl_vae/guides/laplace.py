r"""Amortised Laplace guide (Park, Kim & Kim, "Variational Laplace Autoencoders", ICML 2019).

A ReLU decoder is piecewise linear, so around the current point μ it *is* a linear model g(z) ≈ W z + b with
W = ∂g/∂z(μ) and b = g(μ) − W μ, and the posterior of that local linear model is Gaussian in closed form.

Mode iterations (from the encoder's μ₀, t = 0 … T−1; official code T = 4, η_t = 0.5/(t+1)):

    Gaussian output  x ~ N(g(z), σ² I), g = link∘decoder:
        μ̂ = (WᵀW/σ² + I)⁻¹ Wᵀ(x − b)/σ²
    Bernoulli output x ~ Bernoulli(sigmoid(f(z))), f = decoder logits, W = ∂f/∂z, p = sigmoid(f(μ)):
        the log-likelihood is not quadratic in the logits, so it is linearised to second order in f around
        f(μ) (IRLS / Newton): x·f − softplus(f) ≈ const + (x − p)(f − f(μ)) − ½ p(1−p)(f − f(μ))², a Gaussian in
        f with precision D = diag p(1−p) and working response f(μ) + D⁻¹(x − p); its posterior mean is
        μ̂ = (WᵀDW + I)⁻¹ WᵀD(f(μ) + D⁻¹(x − p) − b)
    Both are one Newton step on log p(x, z) with the Gauss–Newton Hessian, written
        Λ(μ) = WᵀDW + I   (D = I/σ² or diag p(1−p)),   μ̂ = μ + Λ⁻¹(Wᵀ r − μ)   (r = (x − g(μ))/σ² or x − p)
    and the damped update is μ ← (1 − η_t) μ + η_t μ̂.

Line search (``damping="line_search"``, our addition, not in the paper): instead of the fixed schedule η_t, each
step takes, per data point, the η ∈ {1, ½, ¼, ⅛, 0} that maximises the exact log joint log p(x, μ + η(μ̂ − μ))
(one decoder pass per candidate; η = 0 keeps μ), so log p(x, μ_t) never decreases — a batched backtracking
search on the Newton direction. Gradients flow through the chosen candidate. Measured (``bench/laplace_ls.py``,
``bench/laplace_2d.py``): a smaller amortisation gap than the schedule at 16 latents (1.19 vs 1.71 nats), but
SVI through it trains less stably (−0.81 nats test log-likelihood at 16 latents, no better at 2), so the VLAE
schedule stays the default.

Guide: q(z|x) = N(μ_T, Λ(μ_T)⁻¹), the Laplace approximation at the final point (W recomputed there: T + 1
Jacobians per call), a full-covariance ``MultivariateNormal(scale_tril=chol(Λ⁻¹))`` inside the data plate.
Everything is differentiable: gradients reach the encoder through μ₀ and the decoder through every W and g(μ).
For a sigmoid link with Gaussian output the Hessian drops the link's curvature (Gauss–Newton), as for any
non-piecewise-linear decoder; for a linear decoder (the linear-Gaussian model) one undamped step gives the exact
posterior and Λ⁻¹ is the exact posterior covariance.

Measured behaviour of the VLAE schedule (``bench/laplace_2d.py``, exact posteriors by quadrature, 784-200-200-2
Bernoulli MLP on Fashion-MNIST): with 2 latents this guide is the better posterior on any fixed decoder (half the
VAE encoder's KL(q‖p)), but SVI *through* it trains unstably — the training ELBO collapses in spikes and the
decoder ends 6.7 nats (20 epochs) to 16.4 nats (60 epochs) below a VAE's; with 16 latents (``bench/guides.py``) it
trains smoothly and beats the VAE by 4.8 nats.

Jacobians: for an ``nn.Sequential`` of ``Linear``/``ReLU`` layers (``ppl_vae.nn.networks.MLPDecoder``) the ReLU-mask
identity W = W_L diag(m_{L−1}) W_{L−1} ⋯ diag(m_1) W_1 (masks m at the current point) is used; any other
decoder goes through ``torch.func.vmap(torch.func.jacfwd(·))``. Both run on any device. W is kept as Wᵀ (B, d, D),
and the Bernoulli terms (WᵀDW, Wᵀr) have a hand-written backward (same derivatives, fewer buffers). The T + 1
Jacobians' matrix products and their backward are most of a step: the floor of the unrolled gradient (bench/README).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule, pyro_method
from torch import nn
from torch.func import jacfwd, vmap

from ..distributions.plate import data_plate
from ..errors import ConfigError
from ..nn.networks import mlp

__all__ = [
    "LaplaceGuide",
    "MeanEncoder",
    "laplace_posterior",
    "batch_jacobian",
    "vlae_damping",
    "log_joint",
    "GRADIENTS",
    "relu_mlp_layers",
    "precision_to_scale_tril",
    "LIKELIHOODS",
    "LINE_SEARCH_STEPS",
]

LIKELIHOODS = ("gaussian", "bernoulli")
LINE_SEARCH_STEPS = (1.0, 0.5, 0.25, 0.125)


def vlae_damping(t: int) -> float:
    """η_t = 0.5 / (t + 1), the step sizes of the official VLAE code."""
    return 0.5 / (t + 1)


def relu_mlp_layers(fn) -> list[nn.Module] | None:
    """The layers of an ``nn.Sequential`` of Linear/ReLU layers ending in Linear, else None."""
    net = getattr(fn, "net", fn)
    if not isinstance(net, nn.Sequential) or len(net) == 0 or not isinstance(net[-1], nn.Linear):
        return None
    if not all(isinstance(m, (nn.Linear, nn.ReLU)) for m in net):
        return None
    return list(net)


def batch_jacobian(fn: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor, layers=None, link: str | None = None):
    """(J, out): out = link(fn(z)) flattened to (B, D) and J = ∂out/∂z of shape (B, D, d), per row of z (B, d).

    ``layers``: the Linear/ReLU layers of an MLP equal to ``fn`` (ReLU-mask identity); otherwise jacfwd + vmap.
    ``link``: None/"identity" or "sigmoid", applied elementwise after ``fn`` (chain rule).
    """
    Jt, out = _jacobian_t(fn, z, layers, link)
    return Jt.transpose(-1, -2), out


def _jacobian_t(fn, z, layers, link):
    """(Jᵀ, out) with Jᵀ = (∂out/∂z)ᵀ of shape (B, d, D), contiguous in D (see :func:`batch_jacobian`)."""
    Jt, out = _raw_jacobian_t(fn, z, layers)
    if link == "sigmoid":
        out = torch.sigmoid(out)
        Jt = Jt * (out * (1 - out)).unsqueeze(-2)
    elif link not in (None, "identity"):
        raise ConfigError(f"the Laplace guide supports link 'identity' or 'sigmoid', got {link!r}")
    return Jt, out


def _raw_jacobian_t(fn, z, layers):
    if layers is not None:
        # forward mode on the d tangent directions at once: Jᵀ is (B, d, width), each layer one matrix product
        # (B·d, width) @ Wᵀ, and a ReLU multiplies by its mask
        h, Jt = z, None
        for m in layers:
            if isinstance(m, nn.Linear):
                Jt = m.weight.t().expand(z.shape[0], *m.weight.t().shape) if Jt is None else Jt @ m.weight.t()
                h = m(h)
            else:
                mask = (h > 0).to(h.dtype)
                h = h * mask
                Jt = Jt * mask.unsqueeze(-2)
        return Jt, h

    def single(v):
        out = fn(v.unsqueeze(0)).reshape(-1)
        return out, out

    J, out = vmap(jacfwd(single, has_aux=True))(z)
    return J.transpose(-1, -2).contiguous(), out


class _WeightedGram(torch.autograd.Function):
    """(Jᵀ diag(w) J, Jᵀ r) per row from Jᵀ (B, d, D), w (B, D) and r (B, D), with a hand-written backward.

    Autograd's backward of ``Wᵀ @ (W * w)`` and ``Wᵀ @ r`` allocates five (B, d, D) buffers per call and runs three
    small batched products in shapes the CPU BLAS is slow at; this one allocates one buffer, writes into it in place
    and runs one (B, d, d) @ (B, d, D) product: the same derivatives to rounding
    (``tests/guides/test_laplace_speed.py``)."""

    @staticmethod
    def forward(ctx, Jt, w, r):
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(Jt, w, r)
        prec = torch.bmm(Jt * w.unsqueeze(-2), Jt.transpose(-1, -2))
        return prec, torch.bmm(r.unsqueeze(-2), Jt.transpose(-1, -2)).squeeze(-2)

    @staticmethod
    def backward(ctx, g_prec, g_vec):
        Jt, w, r = ctx.saved_tensors
        g_jt = g_w = g_r = None
        if g_prec is not None:
            # with S = g + gᵀ and M = S Jᵀ:  ∂/∂Jᵀ Σ g_ij (Jᵀ W J)_ij = M W  and  ∂/∂w_k = ½ Σ_i M_ik Jᵀ_ik
            M = torch.bmm(g_prec + g_prec.transpose(-1, -2), Jt)
            if ctx.needs_input_grad[1]:  # Σ_i M_i ⊙ Jᵀ_i row by row: no (B, d, D) temporary
                g_w = M[:, 0] * Jt[:, 0]
                for i in range(1, Jt.shape[1]):
                    g_w.addcmul_(M[:, i], Jt[:, i])
                g_w.mul_(0.5)
            if ctx.needs_input_grad[0]:
                g_jt = M.mul_(w.unsqueeze(-2))
        if g_vec is not None:
            if ctx.needs_input_grad[0]:
                u, v = g_vec.unsqueeze(-1), r.unsqueeze(-2)  # the outer product g rᵀ, added in place
                g_jt = u * v if g_jt is None else g_jt.addcmul_(u, v)
            if ctx.needs_input_grad[2]:
                g_r = torch.bmm(g_vec.unsqueeze(-2), Jt).squeeze(-2)
        return g_jt, g_w, g_r


def _precision_terms(x_flat, out, Jt, likelihood: str, sigma2: float):
    """(WᵀDW, Wᵀr) of the local Gaussian approximation at one point (see the module docstring); ``Jt`` = Wᵀ."""
    if likelihood == "gaussian":
        r = (x_flat - out) / sigma2
        WtDW = Jt @ Jt.transpose(-1, -2) / sigma2
        return WtDW, (r.unsqueeze(-2) @ Jt.transpose(-1, -2)).squeeze(-2)
    p = torch.sigmoid(out)
    return _WeightedGram.apply(Jt, p * (1 - p), x_flat - p)


def log_joint(x_flat: torch.Tensor, out: torch.Tensor, z: torch.Tensor, likelihood: str, sigma2: float = 1.0):
    r"""log p(x, z) up to a constant in z: −½‖z‖² − ‖x − g(z)‖²/(2σ²) (Gaussian, ``out`` = g(z)) or
    −½‖z‖² + Σ [x·f − softplus(f)] (Bernoulli, ``out`` = logits f(z)); shapes (B, D), (B, D), (B, d) → (B,)."""
    prior = -0.5 * z.pow(2).sum(-1)
    if likelihood == "gaussian":
        return prior - 0.5 * (x_flat - out).pow(2).sum(-1) / sigma2
    return prior + (x_flat * out - torch.nn.functional.softplus(out)).sum(-1)


def _line_search(x_flat, mu, out, step, fn, likelihood, sigma2, link):
    """Per row, μ + η·step for the η ∈ LINE_SEARCH_STEPS ∪ {0} with the largest log p(x, ·)."""
    cands = [mu] + [mu + eta * step for eta in LINE_SEARCH_STEPS]
    vals = [log_joint(x_flat, out, mu, likelihood, sigma2)]
    for z in cands[1:]:
        o = fn(z).reshape(z.shape[0], -1)
        vals.append(log_joint(x_flat, torch.sigmoid(o) if link == "sigmoid" else o, z, likelihood, sigma2))
    best = torch.stack(vals).detach().nan_to_num(nan=-math.inf).argmax(0)  # (B,)
    return torch.stack(cands).gather(0, best.view(1, -1, 1).expand(1, *mu.shape)).squeeze(0)


GRADIENTS = ("unrolled", "last_step", "implicit")


def laplace_posterior(
    x: torch.Tensor,
    mu0: torch.Tensor,
    fn: Callable[[torch.Tensor], torch.Tensor],
    *,
    likelihood: str = "gaussian",
    sigma2: float = 1.0,
    num_steps: int = 4,
    damping: Callable[[int], float] | float = vlae_damping,
    layers=None,
    link: str | None = None,
    gradient: str = "unrolled",
):
    r"""Damped Newton/Laplace iterations: returns (μ_T, Λ(μ_T)) with Λ the (B, d, d) precision.

    ``fn(z)``: the decoder output that the likelihood reads — the mean g(z) for ``"gaussian"`` (σ² =
    ``sigma2``), the logits f(z) for ``"bernoulli"``; ``x`` is flattened to (B, D) like ``fn``'s output.
    ``damping``: η_t as a function of t, a constant (1.0 = undamped Newton), or ``"line_search"`` (per-row best
    η of :data:`LINE_SEARCH_STEPS` or 0 by the exact log joint). ``layers``/``link``: see :func:`batch_jacobian`
    (the Gaussian mean may be ``link(fn(z))``).

    ``gradient`` says how the gradient reaches the networks through the iterations (the values are the same):
    ``"unrolled"`` (the official code's): backpropagation through every step; ``"last_step"``: the first T − 1
    steps run without a graph and the gradient passes through the last step only; ``"implicit"``: every step runs
    without a graph and the decoder's gradient at μ_T is the implicit-function one of the mode condition
    ∇_z log p(x, z) = 0 (Gauss–Newton: dμ/dθ = Λ⁻¹ ∂(Wᵀr − μ)/∂θ, Λ held fixed). The encoder's μ₀ gets, in both
    cheaper modes, the gradient of μ_T as if dμ_T/dμ₀ = I (straight-through): at an exact mode μ_T would not depend
    on μ₀ at all, and the encoder would never learn where to start.
    """
    if gradient not in GRADIENTS:
        raise ConfigError(f"gradient must be one of {list(GRADIENTS)}, got {gradient!r}")
    if likelihood not in LIKELIHOODS:
        raise ConfigError(f"the Laplace guide needs a Gaussian or Bernoulli likelihood, got {likelihood!r}")
    if damping == "line_search":
        eta = None
    elif isinstance(damping, str):
        raise ConfigError(f"damping must be a callable, a number or 'line_search', got {damping!r}")
    else:
        eta = damping if callable(damping) else (lambda t, c=float(damping): c)
    x_flat = x.reshape(x.shape[0], -1)
    d = mu0.shape[-1]
    eye = torch.eye(d, dtype=mu0.dtype, device=mu0.device)

    def newton(mu, t):
        Jt, out = _jacobian_t(fn, mu, layers, link)
        WtDW, Wtr = _precision_terms(x_flat, out, Jt, likelihood, sigma2)
        L = torch.linalg.cholesky(WtDW + eye)
        step = torch.cholesky_solve((Wtr - mu).unsqueeze(-1), L).squeeze(-1)  # μ̂ − μ
        return _line_search(x_flat, mu, out, step, fn, likelihood, sigma2, link) if eta is None else mu + eta(t) * step

    if gradient == "unrolled" or num_steps == 0:
        mu = mu0
        for t in range(num_steps):
            mu = newton(mu, t)
    else:
        free = num_steps - 1 if gradient == "last_step" else num_steps
        with torch.no_grad():
            mu = mu0.detach()
            for t in range(free):
                mu = newton(mu, t)
        mu = mu + (mu0 - mu0.detach())  # straight-through to the encoder
        if gradient == "last_step":
            mu = newton(mu, num_steps - 1)
        else:
            at = mu.detach()
            Jt, out = _jacobian_t(fn, at, layers, link)
            WtDW, Wtr = _precision_terms(x_flat, out, Jt, likelihood, sigma2)
            prec = WtDW + eye
            g = Wtr - at  # ∇_z log p(x, z) at μ_T (Gauss–Newton), live in θ
            mu = mu + torch.cholesky_solve(
                (g - g.detach()).unsqueeze(-1), torch.linalg.cholesky(prec.detach())
            ).squeeze(-1)
            return mu, prec
    Jt, out = _jacobian_t(fn, mu, layers, link)
    WtDW, _ = _precision_terms(x_flat, out, Jt, likelihood, sigma2)
    return mu, WtDW + eye


def precision_to_scale_tril(prec: torch.Tensor) -> torch.Tensor:
    """Lower-triangular S with S Sᵀ = Λ⁻¹ (Λ symmetric positive definite, (…, d, d))."""
    cov = torch.cholesky_inverse(torch.linalg.cholesky(prec))
    cov = 0.5 * (cov + cov.transpose(-1, -2))
    return torch.linalg.cholesky(cov)


class MeanEncoder(nn.Module):
    """μ₀(x) of the Laplace guide: an MLP from the flattened image (and an optional one-hot label) to d values."""

    def __init__(self, data_shape, latent_dim: int, hidden=(256, 256), act: str = "relu", cond_dim: int = 0):
        super().__init__()
        self.net = mlp(math.prod(data_shape) + cond_dim, hidden, latent_dim, act)

    def forward(self, x: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        h = x.reshape(x.shape[0], -1)
        if c is not None:
            h = torch.cat([h, c.to(h.dtype)], dim=-1)
        return self.net(h)


class LaplaceGuide(PyroModule):
    r"""A stand-alone Laplace guide ``guide(x, y=None)`` for any model whose site ``"z"`` (inside the data
    plate) is a d-dimensional N(0, I) latent and whose likelihood reads ``fn(z)`` (see :func:`laplace_posterior`).

    ``init``: x ↦ μ₀ (an ``nn.Module`` or a callable); ``fn``: z ↦ decoder output (mean or logits), e.g. the
    linear map z ↦ W z + b of :class:`~ppl_vae.models.LinearGaussianVAE`. ``num_data`` scales the data plate.
    """

    def __init__(
        self,
        init,
        fn,
        latent_dim: int,
        *,
        likelihood: str = "gaussian",
        sigma2: float = 1.0,
        num_steps: int = 4,
        damping: Callable[[int], float] | float = vlae_damping,
        num_data: int | None = None,
    ):
        super().__init__()
        if likelihood not in LIKELIHOODS:
            raise ConfigError(f"LaplaceGuide likelihood must be one of {list(LIKELIHOODS)}, got {likelihood!r}")
        self.init = init
        self.fn = fn
        self.latent_dim = latent_dim
        self.likelihood, self.sigma2 = likelihood, float(sigma2)
        self.num_steps, self.damping, self.num_data = int(num_steps), damping, num_data

    def posterior(self, x: torch.Tensor):
        """(μ, scale_tril) of q(z|x)."""
        mu, prec = laplace_posterior(
            x,
            self.init(x),
            self.fn,
            likelihood=self.likelihood,
            sigma2=self.sigma2,
            num_steps=self.num_steps,
            damping=self.damping,
            layers=relu_mlp_layers(self.fn),
        )
        return mu, precision_to_scale_tril(prec)

    @pyro_method
    def forward(self, x: torch.Tensor, y=None):
        with data_plate(x, self.num_data):
            mu, tril = self.posterior(x)
            return pyro.sample("z", dist.MultivariateNormal(mu, scale_tril=tril))
