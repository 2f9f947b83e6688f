"""The runs of the guide studies (``guides.py``, ``guides_2d.py``, ``guides_large.py``, ``gamix_samples.py``,
``laplace_ls.py``, ``laplace_2d.py``): their sizes, the registered method and options of
each run, and how a run is built, trained (``ppl_vae.train``) and scored (``ppl_vae.evaluate``)."""

from __future__ import annotations

import math
import statistics
import time

import pyro
import torch

import ppl_vae
from ppl_vae import ModelConfig, build_model, plan_for
from ppl_vae.evaluate import inference_gaps

FULL = dict(
    limit=10000,
    epochs=20,
    n_ll=1000,
    S=5000,
    n_gap=200,
    gap_steps=300,
    gap_particles=16,
    elbo_particles=1000,
    timing_rounds=5,
    timing_steps=3,
    seeds=(0, 1, 2),
)
QUICK = dict(
    limit=1000,
    epochs=2,
    n_ll=60,
    S=5000,
    n_gap=60,
    gap_steps=40,
    gap_particles=8,
    elbo_particles=200,
    timing_rounds=2,
    timing_steps=2,
    seeds=(0, 1),
)
LATENT, HIDDEN = 16, [200, 200]
RUNS = {
    "vae": ("vae", {}),
    "laplace": ("vlae", {"num_steps": 4, "damping": "vlae"}),
    "recursive_1": ("rme", {"num_components": 1}),
    "recursive_3": ("rme", {"num_components": 3}),
    "recursive_5": ("rme", {"num_components": 5}),
    "gamix": ("gamix", {"num_components": 3, "var_reg": 0.1}),
    "gamix_noreg": ("gamix", {"num_components": 3, "var_reg": 0.0}),
}
# Runs that other scripts train through make_model/train but bench/guides.py itself does not (its outputs keep their
# keys): bench/laplace_ls.py's line-searched Laplace steps, the grown recursive mixture (once
# bench/recursive_seeds.py's,
# now bench/recursive.py's joint part),
# bench/gamix_samples.py's one-component GAMIX (the variance-collapse regulariser alone) and Rivera's own objective.
EXTRA_RUNS = {
    "laplace_ls": ("vlae", {"num_steps": 4, "damping": "line_search"}),
    "laplace_last_step": ("vlae", {"num_steps": 4, "damping": "vlae", "gradient": "last_step"}),
    "laplace_implicit": ("vlae", {"num_steps": 4, "damping": "vlae", "gradient": "implicit"}),
    "recursive_5_grown": ("rme", {"num_components": 5, "grow_every": 3}),
    "gamix_k1": ("gamix", {"num_components": 1, "var_reg": 0.1}),
    "rivera": ("gamix", {"num_components": 1, "var_reg": 0.1, "kl": "aggregate"}),
    "rivera_k3": ("gamix", {"num_components": 3, "var_reg": 0.1, "kl": "aggregate"}),
    "rivera_g05": ("gamix", {"num_components": 1, "var_reg": 0.5, "kl": "aggregate"}),
    "rivera_g25": ("gamix", {"num_components": 1, "var_reg": 2.5, "kl": "aggregate"}),
}


def run_config(run: str) -> tuple[str, dict]:
    """(registered model name, options) of a run of RUNS or EXTRA_RUNS."""
    return RUNS[run] if run in RUNS else EXTRA_RUNS[run]


# Runs repeated for every training seed (the seed sets initialisation, minibatch order and binarisation); the
# Laplace guide (25x the VAE's step time, +4.8 nats at seed 0) and the recursive_1 control run at the first seed.
SEEDED = ("vae", "recursive_3", "recursive_5", "gamix", "gamix_noreg")


def make_model(run: str, data, seed: int = 0, latent: int = LATENT, hidden=None):
    """The model of ``run`` (784-hidden-latent ReLU MLPs, Bernoulli likelihood), initialised from ``seed``."""
    name, opts = run_config(run)
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    cfg = ModelConfig(
        name=name,
        likelihood="bernoulli",
        arch="mlp",
        latent_dim=latent,
        hidden=list(HIDDEN if hidden is None else hidden),
        activation="relu",
        options=dict(opts),
    )
    return build_model(cfg, data.shape, num_data=len(data.train_x))


def n_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def wide_width(data, components: int = 5, latent: int = LATENT, hidden=None) -> int:
    """Hidden width H of a d-H-H-2·latent encoder with at least as many parameters as the recursive mixture's
    ``components`` encoders (plus its mixing heads): the capacity-matched control ``vae_wide``."""
    target = n_params(make_model(f"recursive_{components}", data, latent=latent, hidden=hidden).encoder)
    d, out = math.prod(data.shape), 2 * latent
    # parameters of d-H-H-out: (d+1)H + (H+1)H + (H+1)out = H^2 + (d+2+out)H + out; smallest H reaching target
    b = d + 2 + out
    return math.ceil((-b + math.sqrt(b * b + 4 * (target - out))) / 2)


def train(run, data, tc, seed=0, latent: int = LATENT, hidden=None, prepare=None):
    """Train ``run`` with its training plan (``ppl_vae.train``); ``prepare(model)`` is applied before training (a
    control's or an ablation's change to the model, e.g. a wider encoder). Returns (model in eval mode, history)."""
    model = make_model(run, data, seed, latent, hidden)
    if prepare is not None:
        prepare(model)
    history = ppl_vae.train(model, data, tc, seed=seed, progress=False).history
    model.eval()
    return model, history


def step_timing(runs, data, tc, rounds: int, steps: int) -> dict:
    """Median seconds per SVI step of each run (its plan's objective), interleaved rounds on one minibatch."""
    x = next(iter(data.batches("train", tc.batch_size, shuffle=True, seed=123)))[0]
    svis = {}
    for run in runs:
        m = make_model(run, data)
        svis[run] = pyro.infer.SVI(m.model, m.guide, pyro.optim.Adam({"lr": 1e-3}), plan_for(m).objective(tc))
        svis[run].step(x)  # warm-up (and parameter registration)
    times = {run: [] for run in runs}
    for _ in range(rounds):
        for run, svi in svis.items():
            t0 = time.perf_counter()
            for _ in range(steps):
                svi.step(x)
            times[run].append((time.perf_counter() - t0) / steps)
    return {run: statistics.median(t) for run, t in times.items()}


def beats_vae(out: dict, richer) -> dict:
    """The claim flags of the guide benchmarks: each richer guide's mean difference to the VAE is > 0, > 2 s.e."""
    diff, se = out["test_ll_diff_vs_vae"], out["test_ll_diff_vs_vae_std_error"]
    return {
        "richer_guide_beats_vae_test_ll": {r: diff[r] > 0 for r in richer},
        "richer_guide_beats_vae_by_2_std_errors": {r: diff[r] > 2 * se[r] for r in richer},
    }


def gap_report(model, x, family: str, s: dict, ll: torch.Tensor) -> dict:
    """The amortisation gap (q optimised per image, Adam lr 1e-2 with cosine decay, from the amortised q), the
    approximation gap log p̂ − optimised ELBO with the importance-sampled log p̂(x) ``ll`` of the same images, and
    ``_amortised`` (per image, for the inference gap) — ``ppl_vae.evaluate.inference_gaps`` rounded for a result
    file."""
    g = inference_gaps(
        model.model,
        model.guide,
        x,
        ll,
        family=family,
        steps=s["gap_steps"],
        num_particles=s["gap_particles"],
        elbo_particles=s["elbo_particles"],
        parameters=model.parameters(),
    )
    n = len(x)
    return {
        "family": "diagonal Gaussian" if family == "diag" else "full-covariance Gaussian",
        "amortised_elbo": round(g["amortised_elbo"], 3),
        "optimised_elbo": round(g["optimised_elbo"], 3),
        "gap": round(g["gap_mean"], 3),
        "gap_std_error": round(float(g["gap"].std() / n**0.5), 3),
        "images_where_optimisation_lost": g["datapoints_where_optimisation_lost"],
        "log_likelihood": round(g["log_likelihood"], 3),
        "approximation_gap": round(g["approximation_gap"], 3),
        "_amortised": g["amortised"].double(),
    }
