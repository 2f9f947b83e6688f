"""A user's own Pyro program for the multi-process tests (tests/training/test_distributed.py).

A linear-Gaussian VAE whose guide's noise ε is carried with each datapoint (as its ``y``): z = μ(x) + σ(x)·ε,
sampled as a reparameterised ``Delta`` with the Gaussian log-density. A training step is then a deterministic
function of the batch, so 2 ranks that each take half of a global batch can be compared with one process that
takes all of it, to float64 rounding (the ranks' sums are added in another order). Run as a script it trains
every case on ``argv[1]`` processes per node (``argv[3]`` nodes, default 1) and saves rank 0's results to
``argv[2]``.
"""

from __future__ import annotations

import sys

import pyro
import pyro.distributions as dist
import torch

import ppl_vae
from ppl_vae.config import TrainConfig
from ppl_vae.data import DataBundle
from ppl_vae.distributions.plate import data_plate
from ppl_vae.training.optim import ParamOptimizer

N, D, Z, K = 24, 6, 2, 3

# name: (TrainConfig fields, particles the guide draws, data plate over the minibatch only)
CASES = {
    "step_elbo": (dict(epochs=1, batch_size=N, objective="elbo"), 1, False),
    "step_elbo_minibatch_plate": (dict(epochs=1, batch_size=N, objective="elbo"), 1, True),
    "step_iwae": (dict(epochs=1, batch_size=N, objective="iwae", num_particles=K), K, False),
    "step_dreg": (dict(epochs=1, batch_size=N, objective="iwae", num_particles=K, estimator="dreg"), K, False),
    "epochs_uneven_shards": (dict(epochs=2, batch_size=7, objective="elbo"), 1, False),
    "epochs_empty_shard": (dict(epochs=2, batch_size=23, objective="iwae", num_particles=K), K, False),
}


def make_data() -> DataBundle:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N + 8, D, generator=g, dtype=torch.float64)
    eps = torch.randn(N + 8, K, Z, generator=g, dtype=torch.float64)
    return DataBundle.from_tensors(x[:N], eps[:N], val_x=x[N:], val_y=eps[N:], test_x=x[N:], test_y=eps[N:])


class FixedNoiseVAE(torch.nn.Module):
    def __init__(self, num_data: int | None, particles: int):
        super().__init__()
        torch.manual_seed(1)
        self.enc = torch.nn.Linear(D, 2 * Z).double()
        self.dec = torch.nn.Linear(Z, D).double()
        self.log_scale = torch.nn.Parameter(torch.zeros(D, dtype=torch.float64))
        self.num_data, self.particles = num_data, particles

    def model(self, x, y=None):
        pyro.module("vae", self)  # Pyro's ELBOs backpropagate into registered parameters only
        with data_plate(x, self.num_data):
            z = pyro.sample("z", dist.Normal(torch.zeros(Z, dtype=x.dtype), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(self.dec(z), self.log_scale.exp()).to_event(1), obs=x)

    def guide(self, x, y=None):
        pyro.module("vae", self)
        mu, log_sigma = self.enc(x).chunk(2, -1)
        sigma = log_sigma.exp()
        eps = y[:, 0] if self.particles == 1 else y.transpose(0, 1)  # (B, Z) or (K, B, Z) under the particle plate
        with data_plate(x, self.num_data):
            z = mu + sigma * eps
            pyro.sample("z", dist.Delta(z, log_density=dist.Normal(mu, sigma).log_prob(z).sum(-1), event_dim=1))


def run_all(devices: int, nodes: int = 1) -> dict:
    """Every case trained on ``devices`` CPU processes: {case: (parameters, history, gradients of every step)}.
    The gradients are read just before each optimiser step (Adam's steps hardly depend on the gradients' scale,
    so the parameters alone would not show a wrongly scaled rank loss)."""
    data, out = make_data(), {}
    step = ParamOptimizer.step
    for name, (fields, particles, minibatch_plate) in CASES.items():
        vae = FixedNoiseVAE(None if minibatch_plate else N, particles)
        grads = []

        def recording(self, vae=vae, grads=grads):
            grads.append({k: p.grad.detach().clone() for k, p in vae.named_parameters()})
            step(self)

        ParamOptimizer.step = recording
        cfg = TrainConfig(
            lr=1e-2,
            devices=devices,
            num_nodes=nodes,
            strategy="ddp" if devices * nodes > 1 else "auto",
            accelerator="cpu",
            logger="none",
            **fields,
        )
        try:
            result = ppl_vae.train(vae, data, cfg, seed=0, progress=False)
        finally:
            ParamOptimizer.step = step
        out[name] = (
            {k: v.detach().clone() for k, v in vae.state_dict().items()},
            [{k: v for k, v in r.items() if k != "seconds"} for r in result.history],
            grads,
        )
        out["rank"] = result.rank
    return out


if __name__ == "__main__":
    res = run_all(int(sys.argv[1]), int(sys.argv[3]) if len(sys.argv) > 3 else 1)
    if res["rank"] == 0:
        torch.save(res, sys.argv[2])
