r"""An adversarial term on a model's reconstructions, added to any objective, and the discriminator's own step.

Generator (the model, trained with the base objective and this term, Rivera 2023 after Isola et al. 2017):

    loss_G = loss_base + λ_G · (N/B) Σ_{i ∈ batch} mean_patches BCE(1, D(x̂_i)),    x̂_i = E[x | z_i], z_i ~ q(z | x_i)

(one reparameterised draw per image; D's parameters are held fixed in this term, so the model's optimiser never
moves them). Discriminator, one step after every model step with its own optimiser (:class:`DiscriminatorStep`):

    loss_D = λ_D · [mean BCE(1, D(x)) + mean BCE(0, D(x̂))],    x̂ drawn again without gradients.

``loss`` and the values the training loop reports include the adversarial term: with λ_G > 0 they are not an
ELBO (evaluate the ELBO itself with ``Trace_ELBO`` or ``ppl-vae evaluate``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.func import functional_call

from ..errors import CheckpointError
from .base import Objective, surrogate_and_value

__all__ = ["AdversarialELBO", "DiscriminatorStep"]


def _real_target(logits: torch.Tensor, value: float) -> torch.Tensor:
    return torch.full_like(logits, value)


class AdversarialELBO(Objective):
    """``base`` plus λ_G times the generator's patch BCE (module docstring).

    :param base: the model's objective (any Pyro ELBO-shaped object with ``loss``/``loss_and_grads``).
    :param reconstruct: ``reconstruct(x, y) -> x̂`` differentiable in the model's parameters (one draw from q).
    :param discriminator: the patch discriminator (an ``nn.Module``; its parameters get no gradient here).
    :param float weight: λ_G.
    :param num_data: ``num_data() -> N`` (the data plate's size; None: the batch).
    """

    def __init__(
        self,
        base,
        reconstruct: Callable,
        discriminator: torch.nn.Module,
        weight: float,
        num_data: Callable | None = None,
    ):
        super().__init__(num_particles=1)
        self.base, self.reconstruct, self.discriminator = base, reconstruct, discriminator
        self.weight = float(weight)
        self.num_data = num_data
        self._sum, self._count = 0.0, 0  # the adversarial term per image over this epoch's training steps

    def _get_trace(self, model, guide, args, kwargs):
        return self.base._get_trace(model, guide, args, kwargs)

    def per_image(self, x, y=None) -> torch.Tensor:
        """mean_patches BCE(1, D(x̂_i)) per image, shape (B,), D's parameters detached."""
        params = {k: v.detach() for k, v in self.discriminator.named_parameters()}
        logits = functional_call(self.discriminator, params, (self.reconstruct(x, y),))
        return (
            F.binary_cross_entropy_with_logits(logits, _real_target(logits, 1.0), reduction="none").flatten(1).mean(1)
        )

    def _scale(self, x) -> float:
        n = self.num_data() if self.num_data is not None else None
        return (n or len(x)) / len(x)

    def adversarial(self, x, y=None) -> torch.Tensor:
        """(N/B) Σ_i mean_patches BCE(1, D(x̂_i))."""
        return self._scale(x) * self.per_image(x, y).sum()

    def epoch_mean(self) -> float:
        """The adversarial term per image over the training steps since the last call (then reset)."""
        mean = self._sum / max(self._count, 1)
        self._sum, self._count = 0.0, 0
        return mean

    def loss(self, model, guide, x, y=None, *args, **kwargs) -> float:
        with torch.no_grad():
            return float(self.base.loss(model, guide, x, y, *args, **kwargs)) + self.weight * float(
                self.adversarial(x, y)
            )

    def loss_and_surrogate(self, model, guide, x, y=None, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        surrogate, value = surrogate_and_value(self.base, model, guide, x, y, *args, **kwargs)
        adv = self.weight * self.adversarial(x, y)
        return surrogate + adv, value + adv.detach()

    def loss_and_grads(self, model, guide, x, y=None, *args, **kwargs) -> float:
        """Two passes: the base's own ``loss_and_grads``, then the adversarial term (its per-image mean recorded
        for :meth:`epoch_mean`)."""
        loss = float(self.base.loss_and_grads(model, guide, x, y, *args, **kwargs))
        if self.weight == 0:
            return loss
        per = self.per_image(x, y)
        adv = self._scale(x) * per.sum()
        (self.weight * adv).backward()
        self._sum += float(per.detach().sum())
        self._count += len(x)
        return loss + self.weight * float(adv.detach())


class DiscriminatorStep:
    """One Adam step of the discriminator on a minibatch: λ_D [BCE(1, D(x)) + BCE(0, D(x̂))] with x̂ =
    ``generate(x, y)`` (no gradient to the model). ``state_dict``/``load_state_dict`` carry the optimiser (its
    weights live in the model's module). :meth:`epoch_means` gives the epoch's record."""

    def __init__(
        self,
        discriminator: torch.nn.Module,
        generate: Callable,
        weight: float = 1.0,
        lr: float = 1e-4,
        betas=(0.5, 0.999),
    ):
        self.discriminator, self.generate, self.weight = discriminator, generate, float(weight)
        self.optim = torch.optim.Adam(discriminator.parameters(), lr=lr, betas=tuple(betas))
        self._totals = self._zeros()

    @staticmethod
    def _zeros() -> dict:
        return {"d_loss": 0.0, "d_real": 0.0, "d_fake": 0.0, "steps": 0}

    def epoch_means(self) -> dict:
        """Mean loss, D(x) and D(x̂) over the steps since the last call (then reset)."""
        t, self._totals = self._totals, self._zeros()
        return {k: t[k] / max(t["steps"], 1) for k in ("d_loss", "d_real", "d_fake")}

    def __call__(self, x, y=None) -> float:
        with torch.no_grad():
            fake = self.generate(x, y)
        self.discriminator.train()
        real_logits, fake_logits = self.discriminator(x), self.discriminator(fake)
        real = F.binary_cross_entropy_with_logits(real_logits, _real_target(real_logits, 1.0))
        fake_loss = F.binary_cross_entropy_with_logits(fake_logits, _real_target(fake_logits, 0.0))
        loss = self.weight * (real + fake_loss)
        self.optim.zero_grad(set_to_none=True)
        loss.backward()
        self.optim.step()
        self.optim.zero_grad(set_to_none=True)
        t = self._totals
        t["d_loss"] += float(loss.detach())
        t["d_real"] += float(torch.sigmoid(real_logits.detach()).mean())
        t["d_fake"] += float(torch.sigmoid(fake_logits.detach()).mean())
        t["steps"] += 1
        return float(loss.detach())

    def state_dict(self) -> dict:
        return {"optim": self.optim.state_dict()}

    def load_state_dict(self, state: dict | None) -> None:
        if not state or "optim" not in state:  # the resume would restart this optimiser: not the same run
            raise CheckpointError(
                "the checkpoint holds no state of the discriminator's optimiser (its plan_state is empty: written "
                "by an older release, or edited), so resuming would restart that optimiser and not continue the "
                "run exactly; start a new run (--overwrite), or evaluate the checkpoint as it is"
            )
        self.optim.load_state_dict(state["optim"])
