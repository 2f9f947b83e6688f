r"""WiSE-ALE (Lin, Clark, Birke, Trigoni & Roberts, "WiSE-ALE: Wide Sample Estimator for Approximate Latent
Embedding", arXiv:1902.06160, 2019): a VAE whose prior constraint is on the *aggregate* posterior of a batch.

Generative model and guide are those of a VAE: z ~ p(z) = N(0, I), x | z ~ p_θ(x|z), q_φ(z|x) = N(μ_i, diag s_i²).
Only the objective differs. For a batch D_B = {x_1..x_B} with aggregate posterior q(z|D_B) = (1/B) Σ_i q(z|x_i),

    L(D_B) = Σ_{i∈B} E_{q(z|x_i)}[log p(x_i|z)]  −  KL( q(z|D_B) ‖ p(z) )                    (the WiSE-ALE bound)

— :class:`ppl_vae.infer.wise_ale_elbo.WiseAleELBO`, with the KL estimators (``kl_approx``) and scalings
(``kl_scale``) documented there. The networks and the default likelihood are LaDDer's outer VAE (a Laplace
likelihood whose scale is floored at the reconstruction error,
:class:`~ppl_vae.distributions.likelihoods.FlooredLaplace`);
``likelihood: config`` uses ``model.likelihood`` instead. The model is a plain VAE, so
``ppl_vae.evaluate.log_likelihood`` evaluates it like any other.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config.options import Options, option
from ..config.sections import ModelConfig
from ..distributions.likelihoods import FlooredLaplace
from ..infer.wise_ale_elbo import KL_APPROX, KL_SCALES, WiseAleELBO
from ..nn.device import device_of
from ..training.plan import TrainingPlan, training_plan
from ._common import outer_parts
from .registry import register_model
from .vae import VAE

__all__ = ["WiseALE", "WiseALEOptions", "WiseALEPlan"]


class WiseALE(VAE):
    """A :class:`~ppl_vae.models.VAE` that its plan trains with :class:`WiseAleELBO`; ``fit_points`` training images
    set the floored likelihood's evaluation floor after every epoch."""

    def __init__(
        self,
        encoder,
        decoder,
        likelihood,
        latent_dim: int,
        *,
        kl_approx: str = "product",
        kl_scale: str = "batch",
        fit_points: int = 5000,
        num_data: int | None = None,
    ):
        super().__init__(encoder, decoder, likelihood, latent_dim, num_data=num_data)
        self.kl_approx, self.kl_scale, self.fit_points = kl_approx, kl_scale, int(fit_points)
        self.register_load_state_dict_pre_hook(_from_ladder_state)


def _from_ladder_state(module, state_dict, prefix, *args):
    """Runs saved before WiSE-ALE became a VAE (it was an N(0, I)-prior LaDDer) hold ``ladder_on`` and lack the
    prior's buffer: load them as they are now."""
    state_dict.pop(prefix + "ladder_on", None)
    state_dict.setdefault(prefix + "prior._zero", torch.zeros(()))


@training_plan(WiseALE)
class WiseALEPlan(TrainingPlan):
    """The WiSE-ALE bound with ``train.num_particles``; after every epoch the floored likelihood's evaluation floor
    (the MAE of reconstructions from z ~ q(z|x) on up to ``fit_points`` training images)."""

    def objective(self, train):
        m = self.model
        return WiseAleELBO(num_particles=train.num_particles, kl_approx=m.kl_approx, kl_scale=m.kl_scale)

    @torch.no_grad()
    def on_epoch_end(self, epoch, record, data):
        m = self.model
        if not isinstance(m.likelihood, FlooredLaplace):
            return
        train_x = data if isinstance(data, torch.Tensor) else data.train_x
        x = train_x[torch.randperm(len(train_x))[: min(m.fit_points, len(train_x))]].to(device_of(m))
        err = [(m.decode(m.guide_dist(xb).sample()) - xb).abs().flatten(1).mean(1) for xb in x.split(500)]
        m.likelihood.set_eval_floor(torch.cat(err))
        record["laplace_scale"] = float(m.likelihood.scale())


@dataclass
class WiseALEOptions(Options):
    kl_approx: str = option("product", choices=KL_APPROX, doc="estimator of KL(q(z|D_B) ‖ p(z))")
    kl_scale: str = option("batch", choices=KL_SCALES, doc="pay the KL once per batch or once per data set")
    likelihood: str = option(
        "floored_laplace",
        choices=("floored_laplace", "config"),
        doc="floored_laplace (LaDDer's Laplace with its scale floored at the batch's mean absolute error) or config "
        "(model.likelihood)",
    )
    laplace_init_scale: float = option(0.02, gt=0, doc="initial scale b of the floored Laplace likelihood")


@register_model("wise_ale", options=WiseALEOptions)
def build_wise_ale(cfg: ModelConfig, o: WiseALEOptions, data_shape, num_data, num_classes) -> WiseALE:
    enc, dec, lik = outer_parts(cfg, data_shape, o.likelihood, o.laplace_init_scale)
    return WiseALE(enc, dec, lik, cfg.latent_dim, kl_approx=o.kl_approx, kl_scale=o.kl_scale, num_data=num_data)
