r"""NUTS reference posteriors p(z | x) of a trained model with its decoder held fixed, and the guide against them.

For one image x, ``pyro.infer.MCMC(NUTS(model))`` runs on the model's own program called with x (the
observation is the model's ``obs=x``, so the program *is* conditioned on x): every latent sample site is
sampled, every parameter (``pyro.param`` / ``pyro.module``) stays at its trained value — frozen
(``requires_grad`` off) during the run, so only z moves. Two things differ from the training program:

* **no subsample scale**: the data plate scales log-densities by N/B during training; the posterior of one
  image is the unscaled p(z | x) ∝ p(z) p(x | z), so every site's scale is reset to 1 (:class:`Unscaled`), as
  the importance weights of :mod:`ppl_vae.infer.importance` are unscaled;
* **eval mode** (dropout off, batch norm with its running statistics).

NUTS moves in an unconstrained space: every latent's support must have a transform to the reals
(``torch.distributions.biject_to``). A mixture prior whose components share one fixed support (a
``MixtureSameFamily`` of Gaussians: the reals) is sampled on that support (:class:`NutsSupports`);
:func:`check_nuts` names a site whose support has none (a discrete site, say) before any work starts.

Chains run one after another (one ``MCMC`` per chain, seeds ``seed``, ``seed + 1``, ...; chain c starts at a
draw of the guide, so the chains start dispersed over the guide's spread), which keeps them reproducible and
out of multiprocessing; :func:`ppl_vae.evaluate.azcompat.from_pyro_mcmc` stacks them into one ArviZ container
with ``sample_stats.diverging`` and ``log_likelihood`` (log p(x | z) of every draw). R-hat and bulk ESS come from
ArviZ.

:func:`compare_to_reference` sets the guide beside the NUTS draws: per-dimension means and variances, and the
KL(q ‖ p(z | x)) = log p(x) − ELBO(q) with log p(x) estimated two ways — (a) importance sampling from the guide
(:func:`ppl_vae.evaluate.log_likelihood`) and (b) importance sampling from a multivariate Student-t (ν = 5)
fitted to the NUTS draws (their mean and covariance), a proposal that does not depend on the guide — each with
its PSIS k̂ so that the trustworthy one can be told apart.
"""

from __future__ import annotations

import inspect
import math
import time

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer import MCMC, NUTS
from pyro.infer.autoguide.initialization import init_to_value
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample
from torch.distributions import biject_to, constraints

from ..distributions.plate import DATA_PLATE
from ..errors import ProgramError, spell
from ..infer.importance import fork_rng, importance_log_weights
from ..infer.signature import adapt
from ..infer.trace_checks import IWAEError
from ..nn.device import eval_mode
from . import azcompat
from .diagnostics import psis_diagnostics
from .gaps import _args, _trace, data_plate_size

__all__ = [
    "Unscaled",
    "NutsSupports",
    "nuts_support",
    "check_nuts",
    "nuts_posterior",
    "compare_to_reference",
    "latent_sites",
]

PROPOSAL_DF = 5.0


class Unscaled(Messenger):
    """Resets every sample site's scale to 1 (the data plate's N/B, ``poutine.scale``); masks are kept. Used
    outermost, so it acts after every scale the program applied."""

    def _process_message(self, msg):
        if msg["type"] == "sample":
            msg["scale"] = 1.0


_MIXTURE_SUPPORT = getattr(constraints, "MixtureSameFamilyConstraint", None)  # torch >= 2.6 (before: the components')


def _parameter_free(c) -> bool:
    """Whether the constraint ``c`` is one set for every parameter value (the reals, the positive numbers, [0, 1])
    rather than one per component (a Uniform's interval holds tensors of bounds)."""
    while isinstance(c, constraints.independent):
        c = c.base_constraint
    return not constraints.is_dependent(c) and not any(torch.is_tensor(v) for v in vars(c).values())


def nuts_support(support):
    """The support NUTS transforms for a latent of support ``support``: itself, or for a mixture whose components
    share one support that does not depend on their parameters (``MixtureSameFamily`` of Normals: the reals), that
    support — the mixture's support is the union of its components' and so equals it."""
    if isinstance(support, constraints.independent):
        inner = nuts_support(support.base_constraint)
        if inner is support.base_constraint:
            return support
        return constraints.independent(inner, support.reinterpreted_batch_ndims)
    if (
        _MIXTURE_SUPPORT is not None
        and isinstance(support, _MIXTURE_SUPPORT)
        and _parameter_free(support.base_constraint)
    ):
        return nuts_support(support.base_constraint)
    return support


class _OnSupport(dist.TorchDistribution):
    """``base`` declared on the support :func:`nuts_support` gives it (sampling and densities are the base's)."""

    arg_constraints: dict = {}

    def __init__(self, base, support):
        self.base, self._support = base, support
        super().__init__(base.batch_shape, base.event_shape, validate_args=False)

    @property
    def support(self):
        return self._support

    @property
    def has_rsample(self):
        return self.base.has_rsample

    @property
    def mean(self):
        return self.base.mean

    @property
    def variance(self):
        return self.base.variance

    def expand(self, batch_shape, _instance=None):
        return _OnSupport(self.base.expand(batch_shape), self._support)

    def sample(self, sample_shape=torch.Size()):
        return self.base.sample(sample_shape)

    def rsample(self, sample_shape=torch.Size()):
        return self.base.rsample(sample_shape)

    def log_prob(self, value):
        return self.base.log_prob(value)


class NutsSupports(Messenger):
    """Declares every latent site on the support NUTS can transform (:func:`nuts_support`): a real-valued mixture
    prior (VLAC's, a VampPrior-like ``MixtureSameFamily``) is sampled on the reals."""

    def _process_message(self, msg):
        if msg["type"] != "sample" or msg["is_observed"] or site_is_subsample(msg):
            return
        try:
            support = msg["fn"].support
        except NotImplementedError:  # a distribution that declares none: check_nuts names it
            return
        mapped = nuts_support(support)
        if mapped is not support:
            msg["fn"] = _OnSupport(msg["fn"], mapped)


def check_nuts(model, x, y=None) -> list[str]:
    """The model's latent sites, once it is checked — from one run of the program, before any work — that NUTS
    can sample each (its support, after :func:`nuts_support`, has a transform to the reals); a
    :class:`~ppl_vae.errors.ProgramError` naming the site, its distribution and support and what to do
    otherwise."""
    tr = _trace(NutsSupports()(adapt(model, "model")), x, y)
    names = []
    for name, site in tr.nodes.items():
        if (
            site["type"] != "sample"
            or site["is_observed"]
            or site["infer"].get("_do_not_trace")
            or site_is_subsample(site)
        ):
            continue
        fn, support = getattr(site["fn"], "base", site["fn"]), None
        try:
            support = site["fn"].support
            biject_to(support)
        except NotImplementedError:  # no transform registered (or no support declared)
            discrete = " (a discrete latent)" if getattr(support, "is_discrete", False) else ""
            raise ProgramError(
                f"NUTS cannot sample the model's latent site {name!r}{discrete}: its {type(fn).__name__} has the "
                f"support {' '.join(str(support).split())}, which has no transform to the unconstrained space NUTS "
                "moves in (torch.distributions.biject_to). Run the gaps without the NUTS reference "
                f"({spell('nuts_images=0', '--nuts 0')}), or give that site a distribution on the reals (or on an "
                "interval, or the positive numbers)"
            ) from None
        names.append(name)
    if not names:
        raise IWAEError("the model has no latent sample site for NUTS to sample")
    return names


def latent_sites(model, x, y=None) -> dict[str, torch.Tensor]:
    """Names and values of the model's latent (unobserved, non-subsample) sample sites in one prior run."""
    tr = _trace(model, x, y)
    return {
        n: s["value"]
        for n, s in tr.nodes.items()
        if s["type"] == "sample"
        and not s["is_observed"]
        and not s["infer"].get("_do_not_trace")
        and not site_is_subsample(s)
    }


def _guide_draw(guide, x, y, names) -> dict[str, torch.Tensor]:
    """One draw of the guide's ``names`` (from the current RNG: it starts a chain)."""
    with torch.no_grad(), poutine.block():
        tr = poutine.trace(adapt(guide, "guide")).get_trace(*_args(x, y))
    return {k: tr.nodes[k]["value"].detach().clone() for k in names if k in tr.nodes}


def _check_one(x, y):
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[0] != 1:
        raise IWAEError(
            f"nuts_posterior takes one datapoint with its batch dim, shape (1, ...); got "
            f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}"
        )
    if y is not None and torch.as_tensor(y).shape[:1] != (1,):
        raise IWAEError(f"y must hold one label for the one datapoint, got shape {tuple(torch.as_tensor(y).shape)}")


@torch.no_grad()
def _log_lik_of_draws(model, x, y, draws: dict[str, np.ndarray], chunk: int = 256) -> dict[str, np.ndarray]:
    """log p(x | z) of every draw (chain, draw, ...) per observed site: x repeated along the batch dim (in
    chunks no larger than the data plate)."""
    chunk = max(1, min(chunk, data_plate_size(_trace(model, x, y), default=len(x))))
    some = next(iter(draws.values()))
    C, T = some.shape[:2]
    flat = {
        k: torch.as_tensor(v.reshape(C * T, *v.shape[3:]), dtype=x.dtype, device=x.device) for k, v in draws.items()
    }  # draws are (chain, draw, 1, ...): drop the datapoint dim
    out: dict[str, list] = {}
    for i in range(0, C * T, chunk):
        n = min(chunk, C * T - i)
        xr = x.expand(n, *x.shape[1:])
        yr = None if y is None else torch.as_tensor(y, device=x.device).expand(n, *torch.as_tensor(y).shape[1:])
        cond = poutine.condition(model, {k: v[i : i + n] for k, v in flat.items()})
        with fork_rng(), poutine.block():
            tr = poutine.trace(Unscaled()(cond)).get_trace(*_args(xr, yr))
        for name, site in tr.nodes.items():
            if site["type"] == "sample" and site["is_observed"]:
                lp = site["fn"].log_prob(site["value"])
                out.setdefault(name, []).append(lp.reshape(n, -1).sum(-1).cpu().numpy())
    return {k: np.concatenate(v).reshape(C, T) for k, v in out.items()}


def nuts_posterior(
    model,
    x: torch.Tensor,
    *,
    y=None,
    guide=None,
    num_chains: int = 4,
    num_samples: int = 500,
    warmup_steps: int = 500,
    seed: int = 0,
    parameters=(),
    target_accept_prob: float = 0.8,
    max_tree_depth: int = 10,
    progress: bool = False,
) -> dict:
    """NUTS draws from p(z | x) for one datapoint ``x`` (shape (1, ...)) with the model's parameters fixed.

    ``guide`` (optional) gives each chain its starting point (a guide draw; otherwise the prior's).
    ``parameters``: accepted for compatibility and not touched — the decoder is held fixed because NUTS moves only
    the sample sites (its gradients are taken with respect to them alone), so no parameter's ``requires_grad``
    is switched off (which made ``pyro.module`` warn). The modules behind ``model`` and ``guide`` run in eval
    mode. A latent NUTS cannot transform is refused before any work (:func:`check_nuts`). Returns a dict:
    ``data`` (the ArviZ container: posterior, sample_stats.diverging, log_likelihood), ``draws`` ({site: array
    (chain, draw, ...)}, the datapoint dim dropped), ``rhat`` and ``ess`` ({site: array over the site's dims}),
    ``max_rhat``, ``min_ess``, ``divergences`` (count over all chains), ``num_chains``, ``num_samples``, ``seconds``.
    """
    _check_one(x, y)
    if num_chains < 1 or num_samples < 2 or warmup_steps < 0:
        raise IWAEError(
            f"nuts_posterior needs num_chains >= 1, num_samples >= 2 and warmup_steps >= 0; got "
            f"{num_chains}, {num_samples}, {warmup_steps}"
        )
    modules = [inspect.unwrap(f) for f in (model, guide) if f is not None]  # the methods behind adapt's wrappers
    model = adapt(model, "model")  # model(x), model(x, y), model(batch), ...: called as (x, y) below
    unscaled = Unscaled()(NutsSupports()(model))
    t0 = time.perf_counter()
    runs = []
    with eval_mode(*modules), fork_rng():
        names = check_nuts(model, x, y)
        for c in range(num_chains):
            pyro.set_rng_seed(seed + c)
            init = _guide_draw(guide, x, y, names) if guide is not None else {}
            kernel = NUTS(
                unscaled,
                target_accept_prob=target_accept_prob,
                max_tree_depth=max_tree_depth,
                init_strategy=init_to_value(values=init)
                if init
                else pyro.infer.autoguide.initialization.init_to_sample,
                jit_compile=False,
            )
            mcmc = MCMC(
                kernel,
                num_samples=num_samples,
                warmup_steps=warmup_steps,
                num_chains=1,
                disable_progbar=not progress,
            )
            mcmc.run(*_args(x, y))
            runs.append(mcmc)
        draws = {
            k: np.concatenate([m.get_samples(group_by_chain=True)[k].cpu().numpy() for m in runs], 0) for k in names
        }
        loglik = _log_lik_of_draws(model, x, y, draws)
    squeezed = {k: v.reshape(v.shape[0], v.shape[1], *v.shape[3:]) for k, v in draws.items()}
    data = azcompat.from_pyro_mcmc(
        runs,
        log_likelihood=loglik,
        attrs={"method": "NUTS on p(z | x), parameters fixed, unscaled", "num_chains": num_chains, "seed": int(seed)},
    )
    rhat = {k: azcompat.rhat(v) for k, v in squeezed.items()}
    ess = {k: azcompat.ess(v) for k, v in squeezed.items()}
    divergences = int(np.asarray(data["sample_stats"]["diverging"].values).sum())
    return {
        "data": data,
        "draws": squeezed,
        "rhat": rhat,
        "ess": ess,
        "max_rhat": float(max(np.nanmax(r) for r in rhat.values())),
        "min_ess": float(min(np.nanmin(e) for e in ess.values())),
        "divergences": divergences,
        "num_chains": num_chains,
        "num_samples": num_samples,
        "seconds": time.perf_counter() - t0,
    }


def _t_proposal(mean: torch.Tensor, cov: torch.Tensor, site: str, size: int):
    L = torch.linalg.cholesky(cov + 1e-6 * cov.diagonal().mean() * torch.eye(len(mean), dtype=cov.dtype))

    def proposal(xb, y=None):
        with pyro.plate(DATA_PLATE, size, subsample=torch.arange(len(xb), device=xb.device)):
            pyro.sample(
                site,
                dist.MultivariateStudentT(
                    torch.tensor(PROPOSAL_DF, dtype=mean.dtype), mean.to(xb.device), L.to(xb.device)
                ),
            )

    return proposal


@torch.no_grad()
def compare_to_reference(
    model,
    guide,
    x: torch.Tensor,
    reference: dict,
    *,
    y=None,
    num_samples: int = 2000,
    elbo_samples: int = 2000,
    seed: int = 0,
) -> dict:
    """The guide q(z | x) of one datapoint against its NUTS reference (:func:`nuts_posterior`); one latent site.

    Returns floats and lists: ``nuts_mean``/``guide_mean`` and ``nuts_var``/``guide_var`` (per dimension),
    ``mean_abs_error`` and ``var_log_ratio`` (mean ``|log(var_q / var_p)|``), ``elbo`` (``elbo_samples`` draws),
    ``log_px_guide_is`` and ``log_px_nuts_is`` (log p̂(x) from ``num_samples`` importance draws of the guide and of
    a Student-t(ν = 5) fitted to the NUTS draws), their PSIS k̂ (``khat_guide_is``, ``khat_nuts_is``) and the
    two estimates of KL(q ‖ p(z | x)) = log p(x) − ELBO (``kl_guide_is``, ``kl_nuts_is``)."""
    _check_one(x, y)
    draws = reference["draws"]
    if len(draws) != 1:
        raise IWAEError(f"compare_to_reference handles one latent site; the reference has {sorted(draws)}")
    site, z = next(iter(draws.items()))
    z = torch.as_tensor(z.reshape(-1, *z.shape[2:]), dtype=torch.float64)
    if z.dim() != 2:
        raise IWAEError(f"site {site!r} must be a vector per datapoint, got draws of shape {tuple(z.shape[1:])}")
    mean, cov = z.mean(0), torch.cov(z.T).reshape(z.shape[1], z.shape[1])
    args = _args(x, y)
    with eval_mode(inspect.unwrap(model), inspect.unwrap(guide)), fork_rng():
        torch.manual_seed(seed)
        lw = importance_log_weights(
            model, guide, args, num_particles=elbo_samples, max_plate_nesting=1, keep_values=True
        )
        zq = lw.values[site].reshape(elbo_samples, -1).double()
        elbo = float(lw.log_w.mean())
        size = data_plate_size(_trace(guide, x, y), site, len(x))
        proposal = _t_proposal(mean.to(x.dtype), cov.to(x.dtype), site, size)
        out = {}
        for name, q in (("guide_is", guide), ("nuts_is", proposal)):
            torch.manual_seed(seed + 1)
            w = importance_log_weights(model, q, args, num_particles=num_samples, max_plate_nesting=1).log_w
            out[f"log_px_{name}"] = float(torch.logsumexp(w.double(), 0).squeeze() - math.log(num_samples))
            out[f"khat_{name}"] = float(psis_diagnostics(w)["khat"][0])
    gv = zq.var(0)
    return {
        "site": site,
        "nuts_mean": mean.tolist(),
        "guide_mean": zq.mean(0).tolist(),
        "nuts_var": cov.diagonal().tolist(),
        "guide_var": gv.tolist(),
        "mean_abs_error": float((zq.mean(0) - mean).abs().mean()),
        "var_log_ratio": float((gv / cov.diagonal()).log().abs().mean()),
        "elbo": elbo,
        **out,
        "kl_guide_is": out["log_px_guide_is"] - elbo,
        "kl_nuts_is": out["log_px_nuts_is"] - elbo,
    }
