r"""WiSE-ALE (Lin, Clark, Birke, Trigoni & Roberts, "WiSE-ALE: Wide Sample Estimator for Approximate Latent
Embedding", arXiv:1902.06160, 2019): the prior constraint on the *aggregate* posterior of a batch.

Generative model and guide are those of a VAE: z ~ p(z) = N(0, I), x | z ~ p_θ(x|z), q_φ(z|x) = N(μ_i, diag s_i²).
Only the objective differs. For a batch D_B = {x_1..x_B} with aggregate posterior
q(z|D_B) = (1/B) Σ_i q(z|x_i), the bound treats the batch as one observation:

    L(D_B) = Σ_{i∈B} E_{q(z|x_i)}[log p(x_i|z)]  −  KL( q(z|D_B) ‖ p(z) )                    (the WiSE-ALE bound)

("wide sample": each x_i is reconstructed from samples of its own posterior; the KL is paid once for the batch's
aggregate, instead of once per datapoint as in the VAE's Σ_i KL(q(z|x_i) ‖ p(z)).) With ``kl_scale="batch"`` the
full-data objective is the sum of L over the N/B batches of an epoch, so one SVI step uses (N/B)·L(D_B);
``kl_scale="dataset"`` pays the KL once for the whole data set instead: (N/B) Σ_i E[log p(x_i|z)] − KL(q(z|D_B)‖p).

KL(mixture ‖ Gaussian) has no closed form. Estimators (``kl_approx``):

* ``"product"`` (default; the analytic upper bound): Jensen's inequality on the mixture's negative entropy,
  E_{q_i}[log q_B(z)] ≤ log E_{q_i}[q_B(z)] = log (1/B) Σ_j ∫ q_i q_j dz, with the Gaussian product integral
  ∫ q_i q_j dz = N(μ_i; μ_j, diag(s_i² + s_j²)), gives
      KL(q_B ‖ p) ≤ (1/B) Σ_i E_{q_i}[−log p(z)] + (1/B) Σ_i log[(1/B) Σ_j N(μ_i; μ_j, diag(s_i² + s_j²))],
  so L stays a lower bound. This is the closed form used by a public re-implementation of WiSE-ALE
  (its ``WiSE_UB`` loss); we could not check it against the paper's full text.
* ``"pairwise"``: with KL_ij = KL(q_i ‖ q_j) in closed form,
      KL(q_B ‖ p) ≈ (1/B) Σ_i KL(q_i ‖ p) + (1/B) Σ_i log[(1/B) Σ_j exp(−KL_ij)].
  The cross-entropy part (1/B) Σ_i E_{q_i}[−log p] is exact; the mixture entropy is replaced by its pairwise-KL
  estimate H ≈ (1/B)Σ_i H[q_i] − (1/B)Σ_i log (1/B)Σ_j e^{−KL_ij}, which is an upper bound on H[q_B]
  (Kolchinsky & Tracey, Entropy 2017), so this value is ≤ the exact KL. It lies in
  [(1/B)Σ_i KL(q_i‖p) − log B, (1/B)Σ_i KL(q_i‖p)]: well-separated posteriors earn up to log B nats.
* ``"jensen"``: (1/B) Σ_i KL(q_i ‖ p) ≥ KL(q_B ‖ p) (convexity of KL), keeping L a lower bound.
* ``"moment"``: KL(N(μ̄, diag v̄) ‖ p) for the moment-matched Gaussian, μ̄ = mean_i μ_i,
  v̄ = mean_i (s_i² + μ_i²) − μ̄² (also ≤ the exact KL: the Gaussian has the largest entropy for its moments).
* ``"mc"``: the stratified Monte Carlo estimate (1/B) Σ_i [log q_B(z_i) − log p(z_i)], z_i ~ q(z|x_i) the
  guide's own draws, log q_B(z) = log (1/B)Σ_j q_j(z); unbiased for KL(q_B ‖ p).

Caveat: the seed documents hold only the paper's abstract. The bound above is the one the abstract describes; the
exact form of the paper's analytic approximation could not be checked here; ``"product"`` is our reading of it and
the alternatives are provided (and compared with ``"mc"`` in the tests).

Usage: ``SVI(model.model, model.guide, optim, WiseAleELBO())`` with any VAE whose latent site ``z`` is a diagonal
Normal in model and guide (``model.name: wise_ale`` is a VAE trained with it); the model itself is a plain VAE, so
``ppl_vae.evaluate.log_likelihood`` evaluates it like any other.
"""

from __future__ import annotations

import math

import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from pyro.infer.enum import get_importance_trace
from pyro.poutine.util import prune_subsample_sites
from pyro.util import warn_if_nan

from ..errors import ConfigError
from .base import Objective

__all__ = ["WiseAleELBO", "aggregate_posterior_kl", "gaussian_kl", "pairwise_gaussian_kl", "KL_APPROX", "KL_SCALES"]

KL_APPROX = ("product", "pairwise", "jensen", "moment", "mc")
KL_SCALES = ("batch", "dataset")


def gaussian_kl(m1, s1, m2, s2) -> torch.Tensor:
    """KL(N(m1, diag s1²) ‖ N(m2, diag s2²)), summed over the last dim."""
    return (torch.log(s2 / s1) + (s1**2 + (m1 - m2) ** 2) / (2 * s2**2) - 0.5).sum(-1)


def pairwise_gaussian_kl(loc, scale) -> torch.Tensor:
    """(B, B) matrix KL_ij = KL(q_i ‖ q_j) of diagonal Gaussians (B, d)."""
    return gaussian_kl(loc.unsqueeze(1), scale.unsqueeze(1), loc.unsqueeze(0), scale.unsqueeze(0))


def aggregate_posterior_kl(loc, scale, prior_loc, prior_scale, approx: str = "pairwise", z=None) -> torch.Tensor:
    """KL(q_B ‖ p) for q_B = (1/B)Σ_i N(loc_i, diag scale_i²) and p = N(prior_loc, diag prior_scale²) (see the
    module docstring for ``approx``). ``loc``, ``scale``: (B, d); prior parameters broadcast to (B, d);
    ``z`` (B, d): one draw from each q_i, needed by ``"mc"``."""
    B = loc.shape[0]
    prior_loc, prior_scale = torch.broadcast_tensors(prior_loc, prior_scale, loc)[:2]
    if approx == "jensen":
        return gaussian_kl(loc, scale, prior_loc, prior_scale).mean()
    if approx == "product":
        cross_entropy = (
            (
                torch.log(prior_scale)
                + 0.5 * math.log(2 * math.pi)
                + (scale**2 + (loc - prior_loc) ** 2) / (2 * prior_scale**2)
            )
            .sum(-1)
            .mean()
        )
        var = scale.unsqueeze(1) ** 2 + scale.unsqueeze(0) ** 2  # (i, j, d)
        log_overlap = dist.Normal(loc.unsqueeze(0), var.sqrt()).log_prob(loc.unsqueeze(1)).sum(-1)  # (i, j)
        return cross_entropy + (torch.logsumexp(log_overlap, dim=1) - math.log(B)).mean()
    if approx == "pairwise":
        kl_p = gaussian_kl(loc, scale, prior_loc, prior_scale).mean()
        kl_ij = pairwise_gaussian_kl(loc, scale)
        return kl_p + (torch.logsumexp(-kl_ij, dim=1) - math.log(B)).mean()
    if approx == "moment":
        mu = loc.mean(0)
        var = (scale**2 + loc**2).mean(0) - mu**2
        return gaussian_kl(mu, var.clamp_min(1e-12).sqrt(), prior_loc[0], prior_scale[0])
    if approx == "mc":
        if z is None:
            z = dist.Normal(loc, scale).rsample()
        log_qj = dist.Normal(loc.unsqueeze(0), scale.unsqueeze(0)).log_prob(z.unsqueeze(1)).sum(-1)  # (i, j)
        log_qb = torch.logsumexp(log_qj, dim=1) - math.log(B)
        log_p = dist.Normal(prior_loc, prior_scale).log_prob(z).sum(-1)
        return (log_qb - log_p).mean()
    raise ConfigError(f"aggregate_posterior_kl: approx must be one of {list(KL_APPROX)}, got {approx!r}")


def _diag_normal(fn) -> tuple[torch.Tensor, torch.Tensor]:
    d = fn
    while isinstance(d, (dist.Independent, dist.ExpandedDistribution)):
        d = d.base_dist
    if not isinstance(d, dist.Normal):
        raise ValueError(f"WiseAleELBO needs a diagonal Normal at the latent site, got {type(fn).__name__}")
    loc, scale = torch.broadcast_tensors(d.loc, d.scale)
    return loc, scale


class WiseAleELBO(Objective):
    r"""The WiSE-ALE objective as a Pyro ELBO (see the module docstring).

    ``loss = −[ Σ_obs scaled log p(x|z) − c · KL̂(q(z|D_B) ‖ p(z)) ]`` averaged over ``num_particles`` draws, where
    the observed sites carry the data plate's N/B scale and c = β·N/B (``kl_scale="batch"``) or β
    (``"dataset"``); β is the latent site's extra scale (KL warm-up, 1 otherwise). The model's and guide's
    ``latent_site`` must be diagonal Normals in the plate ``data_plate``; other latent sites are an error.
    """

    def __init__(
        self,
        num_particles: int = 1,
        kl_approx: str = "product",
        kl_scale: str = "batch",
        latent_site: str = "z",
        data_plate: str = "data",
        max_plate_nesting: int = 1,
    ):
        if kl_approx not in KL_APPROX:
            raise ConfigError(f"WiseAleELBO kl_approx must be one of {list(KL_APPROX)}, got {kl_approx!r}")
        if kl_scale not in KL_SCALES:
            raise ConfigError(f"WiseAleELBO kl_scale must be one of {list(KL_SCALES)}, got {kl_scale!r}")
        super().__init__(num_particles=num_particles, max_plate_nesting=max_plate_nesting)
        self.kl_approx, self.kl_scale = kl_approx, kl_scale
        self.couples_datapoints = "kl_scale='batch' (one KL per minibatch)" if kl_scale == "batch" else False
        self.latent_site, self.data_plate = latent_site, data_plate

    def _get_trace(self, model, guide, args, kwargs):
        return get_importance_trace("flat", self.max_plate_nesting, model, guide, args, kwargs)

    def objective_terms(self, model, guide, *args, **kwargs) -> dict:
        """One particle: {'recon': scaled Σ log p(obs), 'kl': KL̂(q_B‖p), 'kl_weight': c, 'objective'}."""
        gt = poutine.trace(guide).get_trace(*args, **kwargs)
        mt = poutine.trace(poutine.replay(model, trace=gt)).get_trace(*args, **kwargs)
        gt, mt = prune_subsample_sites(gt), prune_subsample_sites(mt)
        mt.compute_log_prob()
        recon: float | torch.Tensor = 0.0
        for name, site in mt.nodes.items():
            if site["type"] != "sample":
                continue
            if site["is_observed"]:
                recon = recon + site["log_prob_sum"]
            elif name != self.latent_site:
                raise ValueError(
                    f"WiseAleELBO supports one latent site {self.latent_site!r}; the model also has {name!r}"
                )
        if self.latent_site not in gt.nodes:
            raise ValueError(f"the guide has no site {self.latent_site!r}")
        g, m = gt.nodes[self.latent_site], mt.nodes[self.latent_site]
        q_loc, q_scale = _diag_normal(g["fn"])
        p_loc, p_scale = _diag_normal(m["fn"])
        if q_loc.dim() != 2:
            raise ValueError(
                f"WiseAleELBO expects the latent site to have shape (batch, dim), got "
                f"{tuple(q_loc.shape)} (vectorised particles are not supported)"
            )
        frame = next((f for f in g["cond_indep_stack"] if f.name == self.data_plate), None)
        B = q_loc.shape[0]
        N = (frame.full_size or frame.size) if frame is not None else B
        beta = float(g["scale"]) * B / N
        kl = aggregate_posterior_kl(q_loc, q_scale, p_loc, p_scale, self.kl_approx, z=g["value"])
        weight = beta * (N / B) if self.kl_scale == "batch" else beta
        return {"recon": recon, "kl": kl, "kl_weight": weight, "objective": recon - weight * kl}

    def loss_and_surrogate(self, model, guide, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        total = 0.0
        for _ in range(self.num_particles):
            total = total - self.objective_terms(model, guide, *args, **kwargs)["objective"]
        loss = total / self.num_particles
        warn_if_nan(loss, "loss")
        return loss, loss.detach()
