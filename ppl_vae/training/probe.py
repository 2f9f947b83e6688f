"""What the loop reads from a model without looking inside it: the data plate's size during each call
(:class:`PlateProbe`, so a loss becomes an ELBO per datapoint under either plate convention) and KL warm-up
(:class:`ScaleLatents`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.poutine.messenger import Messenger

from ..distributions.plate import DATA_PLATE
from ..infer.importance import fork_rng
from ..infer.signature import adapt

if TYPE_CHECKING:
    from .distributed import Sharded


class ScaleLatents(Messenger):
    """Multiplies the log-density of every *latent* (unobserved) site by β, in model and guide alike:
    ELBO_β = E_q[log p(x|z)] + β·E_q[log p(z) − log q(z|x)]  (KL warm-up; Bowman et al. 2016, Sønderby et al. 2016).
    """

    def __init__(self, beta: float = 1.0):
        super().__init__()
        self.beta = beta

    def _pyro_sample(self, msg):
        if not msg["is_observed"] and self.beta != 1.0:
            msg["scale"] = self.beta * msg["scale"]


class PlateProbe(Messenger):
    """Reads, during each model/guide call it wraps, the full size of the data plate — so a loss can be turned into
    a per-datapoint ELBO whatever convention the plate follows, without an extra call of the model.

    The data plate is the plate named ``name`` if given, else the one called ``"data"``, else the first plate of
    an observed site whose size is the batch size. After a call: ``full_size`` (None when no plate was seen) and
    ``sites`` (0 when the objective did not run the model or guide at all, e.g. a :class:`DirectObjective`).
    """

    def __init__(self, name: str | None = None):
        super().__init__()
        self.name = name
        self.unit_interval_sites: set[str] = set()  # observed sites whose likelihood needs data in [0, 1]
        self.reset(0)

    def reset(self, batch: int) -> None:
        self.batch, self.full_size, self.plate_name, self.sites = int(batch), None, None, 0

    def _pyro_sample(self, msg):
        self.sites += 1
        if msg["is_observed"] and isinstance(_base(msg["fn"]), (dist.Bernoulli, dist.ContinuousBernoulli)):
            self.unit_interval_sites.add(msg["name"])
        if self.full_size is not None:
            return
        frames = [f for f in msg["cond_indep_stack"] if f.vectorized]
        want = self.name or DATA_PLATE
        frame = next((f for f in frames if f.name == want), None)
        if frame is None and self.name is None and msg["is_observed"]:
            frame = next((f for f in frames if f.size == self.batch), None)
        if frame is not None:
            self.full_size = int(frame.full_size if frame.full_size is not None else frame.size)
            self.plate_name = frame.name


def _base(fn):
    while isinstance(fn, (dist.Independent, dist.ExpandedDistribution, dist.MaskedDistribution)):
        fn = fn.base_dist
    return fn


def data_plate_summary(probe: PlateProbe, num_train: int) -> dict:
    """Which data-plate convention a probe saw on a training batch: subsampled to N or over the minibatch."""
    if probe.full_size is None:
        convention = "no data plate found: the loss is taken as the minibatch's"
    elif probe.full_size != probe.batch:
        convention = f"subsampled to N = {probe.full_size}"
    elif probe.batch < num_train:
        convention = "over the minibatch only"
    else:
        convention = f"over the minibatch, which is the whole training set (N = {num_train})"
    return {"name": probe.plate_name, "size": probe.full_size, "batch": probe.batch, "convention": convention}


class _Divisor:
    """loss → per-datapoint ELBO for one call: ELBO per datapoint = −loss / divisor. The divisor is the data
    plate's full size read by the probe during the call; objectives that do not run the model (a
    :class:`DirectObjective`) scale by the model's own plate, read once from a trace of model and guide."""

    def __init__(self, model, guide, name: str | None):
        self.model, self.guide = model, guide
        self.probe = PlateProbe(name)
        self._traced: int | None = None

    def wrap(self, fn):
        return self.probe(fn)

    def start(self, batch: int) -> None:
        self.probe.reset(batch)

    def __call__(self, x, y) -> int:
        p = self.probe
        if p.sites == 0:  # the objective computed its loss without the model: trace the model's plate once
            if self._traced is None:
                with torch.no_grad(), fork_rng(), poutine.block():
                    p.reset(x.shape[0])
                    gt = poutine.trace(p(self.guide)).get_trace(x, y)
                    poutine.replay(p(self.model), trace=gt)(x, y)
                self._traced = p.full_size if p.full_size is not None and p.full_size != x.shape[0] else 0
            return self._traced or int(x.shape[0])
        return p.full_size if p.full_size is not None else int(x.shape[0])


def evaluate_elbo(
    model,
    guide,
    data,
    elbo,
    split: str,
    batch_size: int,
    device,
    num_data: int | None = None,
    *,
    data_plate: str | None = None,
    sharded: Sharded | None = None,
) -> float:
    """Mean ELBO per datapoint over a split, whichever data-plate convention the pair uses (the plate's size is
    read during every call, see :class:`~ppl_vae.training.probe.PlateProbe`). Batches are at most ``num_data``
    (default: the training-set size) long, so a plate subsampled to N never sees a minibatch larger than N. With
    ``sharded`` (several ranks) each rank scores its share of every batch and the sums are reduced over ranks."""
    model, guide = adapt(model, "model"), adapt(guide, "guide")
    cap = min(batch_size, int(num_data) if num_data is not None else len(data.train_x))
    divisor = _Divisor(model, guide, data_plate)
    m, g = divisor.wrap(model), divisor.wrap(guide)
    total, count = 0.0, 0.0
    with torch.no_grad():
        for x, y in data.batches(
            split, cap, shuffle=False, device=device, part=None if sharded is None else (sharded.rank, sharded.world)
        ):
            if x.shape[0] == 0:
                continue
            divisor.start(x.shape[0])
            loss = elbo.loss(m, g, x, y)
            total += -loss / divisor(x, y) * x.shape[0]
            count += x.shape[0]
    if sharded is not None:
        total, count = sharded.total(total, count)
    return total / max(count, 1)
