"""Seconds per SVI step of the library's VAE vs the same networks and loss hand-written in plain PyTorch.

Both sides: Burda et al.'s one-stochastic-layer MLP (784-200-200-50, tanh), Bernoulli likelihood, the
single-sample Monte Carlo ELBO  log p(x|z) + log p(z) − log q(z|x)  with z = μ + σ·ε, Adam. The Pyro side is
``pyro.infer.SVI(model.model, model.guide, pyro.optim.Adam, Trace_ELBO())``; the PyTorch side computes the same
estimator with torch.distributions and one torch.optim.Adam. Timed side by side in one process, interleaved in
rounds (A B, B A, ...), so machine noise hits both; the figure is the median over rounds of the per-round ratio.
Data: random binary 28×28 images (timing does not depend on pixel values).

    python bench/pyro_overhead.py            # full: 15 rounds × 50 steps, batch 100 and 128
    python bench/pyro_overhead.py --quick    # 5 rounds × 20 steps

``--seeds N`` seeds the parameters and the random images (default 0); ``--device cuda`` times on a GPU.
"""

from __future__ import annotations

import statistics
import time

import pyro
import pyro.optim
import torch
import torch.distributions as td
from _common import finish, one_seed, parser, start
from pyro.infer import SVI, Trace_ELBO

from ppl_vae.config import ModelConfig
from ppl_vae.models import build_model


def torch_step_fn(model, batch):
    """The same estimator as Trace_ELBO for this model, in plain PyTorch, on the same modules."""
    params = list(model.encoder.parameters()) + list(model.decoder.parameters())
    opt = torch.optim.Adam(params, lr=1e-3)
    num_data = model.num_data

    def step(x):
        opt.zero_grad()
        loc, scale = model.encoder(x)
        z = loc + scale * torch.randn_like(loc)
        logits = model.decoder(z)
        log_px = td.Bernoulli(logits=logits).log_prob(x).flatten(1).sum(-1)
        log_pz = td.Normal(0.0, 1.0).log_prob(z).sum(-1)
        log_qz = td.Normal(loc, scale).log_prob(z).sum(-1)
        loss = -(num_data / batch) * (log_px + log_pz - log_qz).sum()
        loss.backward()
        opt.step()
        return loss.item()

    return step


def time_steps(step, xs) -> float:
    t0 = time.perf_counter()
    for x in xs:
        step(x)
    if xs[0].is_cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / len(xs)


def main(argv=None):
    ap = parser(__doc__, seeds="0", threads=2)
    args = start(ap, argv)
    seed = one_seed(args)
    rounds, steps = (5, 20) if args.quick else (15, 50)
    device = torch.device(args.device)
    pyro.set_rng_seed(seed)
    out = {"ratio_pyro_over_torch": {}, "sec_per_step_pyro": {}, "sec_per_step_torch": {},
           "rounds": rounds, "steps_per_round": steps, "model": "burda1 MLP 784-200-200-50 tanh, Bernoulli",
           "elbo": "Trace_ELBO (1 particle)"}
    for batch in (100, 128):
        pyro.clear_param_store()
        model = build_model(ModelConfig(name="vae", arch="burda1"), (1, 28, 28), num_data=60000).to(device)
        g = torch.Generator().manual_seed(seed)
        xs = [torch.rand(batch, 1, 28, 28, generator=g).bernoulli(generator=g).to(device) for _ in range(steps)]
        svi = SVI(model.model, model.guide, pyro.optim.Adam({"lr": 1e-3}), Trace_ELBO(max_plate_nesting=1))
        step_torch = torch_step_fn(model, batch)
        time_steps(svi.step, xs[:5]), time_steps(step_torch, xs[:5])          # warm-up
        ratios, tp, tt = [], [], []
        for r in range(rounds):
            if r % 2 == 0:
                a, b = time_steps(svi.step, xs), time_steps(step_torch, xs)
            else:
                b, a = time_steps(step_torch, xs), time_steps(svi.step, xs)
            ratios.append(a / b), tp.append(a), tt.append(b)
        key = f"{device.type}_b{batch}"
        out["ratio_pyro_over_torch"][key] = round(statistics.median(ratios), 3)
        out["sec_per_step_pyro"][key] = statistics.median(tp)
        out["sec_per_step_torch"][key] = statistics.median(tt)
    finish("pyro_overhead", out, args)


if __name__ == "__main__":
    main()
