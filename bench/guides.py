"""Richer guides on dynamically binarised Fashion-MNIST: VAE vs Laplace (VLAE) vs recursive mixture (1, 3, 5
components) vs Gaussian mixture with the variance-collapse regulariser (GAMIX).

Every run has the same generative model and networks (ReLU MLP, 784–200–200–16 decoder, the mirror encoder; the
recursive mixture has one such encoder per component, GAMIX one trunk with K = 3 heads, the Laplace guide an
encoder for the initial mean only), Bernoulli likelihood, Adam lr 1e-3, batch 100, the same epochs.
``gamix_noreg`` is GAMIX's mixture guide with the variance-collapse penalty switched off (γ = 0: the plain ELBO),
an ablation that separates the mixture family from the regulariser.
Training seeds: the runs in SEEDED are trained with every seed in ``seeds`` (initialisation, minibatch order and
the dynamic binarisation change with the seed), the others with the first; ``test_ll`` etc. are means over seeds,
``by_seed`` holds every run, and a difference to the VAE is paired with the VAE of the same seed.
Measures:
  test_ll       importance-sampled log p(x) with S = 5000 draws of each model's own guide (nats/image) on a
                fixed subset of test images, with the paired difference to the VAE and its standard error
  test_elbo     the guide's ELBO on the same images (1000 draws)
  seconds per epoch (the fit loop's epoch time: training pass + validation ELBO) and its ratio to the VAE's,
                plus a side-by-side step timing (median over interleaved rounds; less sensitive to a shared machine)
  amortisation gap (Cremer, Li & Duvenaud 2018) for the VAE (diagonal-Gaussian family) and the Laplace guide
                (full-covariance family) on the first 200 of those test images: the ELBO after optimising q per
                datapoint (Adam from the amortised q) minus the amortised ELBO; with log p̂(x) also the
                approximation gap log p̂(x) − optimised ELBO.

    flock /tmp/ppl_vae_bench.lock nice -n 5 /work/venv/bin/python bench/guides.py --threads 1   # full
    /work/venv/bin/python bench/guides.py --quick                                        # < 5 min
The last line of stdout is the JSON summary (full mode also writes bench/results/guides.json).
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _common import environment, finish, ll_mc_std_error, over_seeds, paired, parser  # noqa: E402

from ppl_vae.config import ModelConfig, TrainConfig  # noqa: E402
from ppl_vae.data import load_data  # noqa: E402
from ppl_vae.evaluate.likelihood import log_likelihood  # noqa: E402
from ppl_vae.experiment import build_objective  # noqa: E402
from ppl_vae.infer import fit  # noqa: E402
from ppl_vae.infer.iwae import importance_log_weights  # noqa: E402
from ppl_vae.models import build_model  # noqa: E402
from ppl_vae.models._common import data_plate  # noqa: E402

FULL = dict(limit=10000, epochs=20, n_ll=1000, S=5000, n_gap=200, gap_steps=300, gap_particles=16,
            elbo_particles=1000, timing_rounds=5, timing_steps=3, seeds=(0, 1, 2))
QUICK = dict(limit=1000, epochs=2, n_ll=60, S=5000, n_gap=60, gap_steps=40, gap_particles=8, elbo_particles=200,
             timing_rounds=2, timing_steps=2, seeds=(0, 1))
LATENT, HIDDEN = 16, [200, 200]
RUNS = {
    "vae": ("vae", {}),
    "laplace": ("vae_laplace", {"num_steps": 4, "damping": "vlae"}),
    "recursive_1": ("vae_recursive", {"num_components": 1}),
    "recursive_3": ("vae_recursive", {"num_components": 3}),
    "recursive_5": ("vae_recursive", {"num_components": 5}),
    "gamix": ("vae_gamix", {"num_components": 3, "var_reg": 0.1}),
    "gamix_noreg": ("vae_gamix", {"num_components": 3, "var_reg": 0.0}),
}
# Runs that other scripts train through make_model/train but bench/guides.py itself does not (its outputs keep their
# keys): bench/laplace_ls.py's line-searched Laplace steps, bench/recursive_seeds.py's grown recursive mixture,
# bench/gamix_samples.py's one-component GAMIX (the variance-collapse regulariser alone) and Rivera's own objective.
EXTRA_RUNS = {
    "laplace_ls": ("vae_laplace", {"num_steps": 4, "damping": "line_search"}),
    "recursive_5_grown": ("vae_recursive", {"num_components": 5, "grow_every": 3}),
    "gamix_k1": ("vae_gamix", {"num_components": 1, "var_reg": 0.1}),
    "rivera": ("vae_gamix", {"num_components": 1, "var_reg": 0.1, "kl": "aggregate"}),
    "rivera_k3": ("vae_gamix", {"num_components": 3, "var_reg": 0.1, "kl": "aggregate"}),
    "rivera_g05": ("vae_gamix", {"num_components": 1, "var_reg": 0.5, "kl": "aggregate"}),
    "rivera_g25": ("vae_gamix", {"num_components": 1, "var_reg": 2.5, "kl": "aggregate"}),
}


def run_config(run: str) -> tuple[str, dict]:
    """(registered model name, options) of a run of RUNS or EXTRA_RUNS."""
    return RUNS[run] if run in RUNS else EXTRA_RUNS[run]


# Runs repeated for every training seed (the seed sets initialisation, minibatch order and binarisation); the
# Laplace guide (25x the VAE's step time, +4.8 nats at seed 0) and the recursive_1 control run at the first seed.
SEEDED = ("vae", "recursive_3", "recursive_5", "gamix", "gamix_noreg")


def make_model(run: str, data, seed: int = 0, latent: int = LATENT, hidden=None):
    name, opts = run_config(run)
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    cfg = ModelConfig(name=name, likelihood="bernoulli", arch="mlp", latent_dim=latent,
                      hidden=list(HIDDEN if hidden is None else hidden),
                      activation="relu", options=dict(opts))
    return build_model(cfg, data.shape, num_data=len(data.train_x))


def objective(model, tc: TrainConfig):
    return model.make_objective(tc) if hasattr(model, "make_objective") else build_objective(tc)


def train(run, data, tc, seed=0, latent: int = LATENT, hidden=None, prepare=None):
    """Train ``run`` with SVI; ``prepare(model)`` is applied before training (a control's or an ablation's change to
    the model, e.g. a wider encoder or a detached decoder inside the guide)."""
    model = make_model(run, data, seed, latent, hidden)
    if prepare is not None:
        prepare(model)
    hook = getattr(model, "on_epoch_end", None)
    res = fit(model.model, model.guide, data, objective(model, tc), tc, seed=seed, progress=False,
              on_epoch_end=(lambda e, r: hook(e, r, data)) if hook else None, module=model)
    model.eval()
    return model, res.history


def beats_vae(out: dict, richer) -> dict:
    """The claim flags of the guide benchmarks: each richer guide's mean difference to the VAE is > 0, > 2 s.e."""
    diff, se = out["test_ll_diff_vs_vae"], out["test_ll_diff_vs_vae_std_error"]
    return {"richer_guide_beats_vae_test_ll": {r: diff[r] > 0 for r in richer},
            "richer_guide_beats_vae_by_2_std_errors": {r: diff[r] > 2 * se[r] for r in richer}}


def step_timing(data, tc, rounds: int, steps: int) -> dict:
    """Median seconds per SVI step of each run, measured in interleaved rounds on the same minibatch."""
    x = next(iter(data.batches("train", tc.batch_size, shuffle=True, seed=123)))[0]
    svis = {}
    for run in RUNS:
        m = make_model(run, data)
        svis[run] = pyro.infer.SVI(m.model, m.guide, pyro.optim.Adam({"lr": 1e-3}), objective(m, tc))
        svis[run].step(x)   # warm-up (and parameter registration)
    times = {run: [] for run in RUNS}
    for _ in range(rounds):
        for run, svi in svis.items():
            t0 = time.perf_counter()
            for _ in range(steps):
                svi.step(x)
            times[run].append((time.perf_counter() - t0) / steps)
    return {run: statistics.median(t) for run, t in times.items()}


@torch.no_grad()
def elbo_per_image(model, guide, x, particles: int, batch: int = 50) -> torch.Tensor:
    """Mean over ``particles`` draws of log p(x, z) − log q(z|x) per image (unscaled), in batches of images
    (``batch=len(x)`` for a guide with per-image parameters of all of x)."""
    out = []
    for i in range(0, len(x), batch):
        xb = x[i:i + batch]
        acc = torch.zeros(len(xb))
        for done in range(0, particles, 100):
            k = min(100, particles - done)
            lw = importance_log_weights(model.model, guide, (xb,), num_particles=k, max_plate_nesting=1).log_w
            acc += lw.sum(0)
        out.append(acc / particles)
    return torch.cat(out)


def local_guide(family: str, loc, raw, num_data):
    """A per-datapoint guide: diagonal N(loc, diag exp(raw)²) or full-covariance N(loc, L Lᵀ), L from raw."""
    def guide(x, y=None):
        with data_plate(x, num_data):
            if family == "diag":
                pyro.sample("z", dist.Normal(loc, raw.exp()).to_event(1))
            else:
                L = torch.tril(raw, -1) + torch.diag_embed(raw.diagonal(dim1=-2, dim2=-1).exp())
                pyro.sample("z", dist.MultivariateNormal(loc, scale_tril=L))
    return guide


def amortisation_gap(model, x, family: str, s: dict) -> dict:
    """ELBO of q optimised per datapoint (Adam, from the amortised q) minus the amortised ELBO."""
    model.eval()
    amortised = elbo_per_image(model, model.guide, x, s["elbo_particles"])
    with torch.no_grad():
        if family == "diag":
            loc, scale = model.encode(x)
            raw = scale.log()
        else:
            loc, tril = model.posterior(x)
            raw = torch.tril(tril, -1) + torch.diag_embed(tril.diagonal(dim1=-2, dim2=-1).log())
    loc, raw = loc.clone().requires_grad_(), raw.clone().requires_grad_()
    for p in model.parameters():
        p.requires_grad_(False)
    opt = torch.optim.Adam([loc, raw], lr=1e-2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, s["gap_steps"])
    guide = local_guide(family, loc, raw, model.num_data)
    for _ in range(s["gap_steps"]):
        opt.zero_grad()
        lw = importance_log_weights(model.model, guide, (x,), num_particles=s["gap_particles"],
                                    max_plate_nesting=1).log_w
        (-lw.mean(0).sum()).backward()
        opt.step()
        sched.step()
    for p in model.parameters():
        p.requires_grad_(True)
    optimised = elbo_per_image(model, guide, x, s["elbo_particles"], batch=len(x))
    gap = optimised - amortised
    n = len(x)
    return {"family": "diagonal Gaussian" if family == "diag" else "full-covariance Gaussian",
            "amortised_elbo": round(float(amortised.mean()), 3), "optimised_elbo": round(float(optimised.mean()), 3),
            "gap": round(float(gap.mean()), 3), "gap_std_error": round(float(gap.std() / math.sqrt(n)), 3),
            "images_where_optimisation_lost": int((gap < 0).sum()), "_per_image": (amortised, optimised)}


def gap_report(model, x, family: str, s: dict, ll: torch.Tensor) -> dict:
    """:func:`amortisation_gap` on ``x`` plus, with the importance-sampled log p̂(x) ``ll`` of the same images, the
    approximation gap log p̂ − optimised ELBO; ``_amortised`` (per image) is left in for the inference gap."""
    g = amortisation_gap(model, x, family, s)
    amortised, optimised = g.pop("_per_image")
    ll = ll.double()
    g["log_likelihood"] = round(float(ll.mean()), 3)
    g["approximation_gap"] = round(float((ll - optimised.double()).mean()), 3)
    g["_amortised"] = amortised.double()
    return g


def main(argv=None):
    ap = parser(__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2, help="torch threads (1 lets another benchmark share the box)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    s = QUICK if args.quick else FULL
    t_start = time.perf_counter()
    data = load_data("fashion_mnist", pixels="binary_dynamic", limit=s["limit"], seed=0)
    tc = TrainConfig(epochs=s["epochs"], batch_size=100, lr=1e-3)
    x_ll = data.test_x[: s["n_ll"]]
    x_gap = x_ll[: s["n_gap"]]
    out = {"test_ll": {}, "test_ll_std_error": {}, "test_ll_mc_std_error": {}, "test_ll_diff_vs_vae": {},
           "test_ll_diff_vs_vae_std_error": {}, "test_elbo": {}, "final_train_elbo": {}, "final_val_elbo": {},
           "seconds_per_epoch": {}, "relative_seconds_per_epoch": {}, "step_seconds": {}, "relative_step_seconds": {},
           "amortisation_gap": {}, "by_seed": {}}
    seeds = [args.seed + k for k in s["seeds"]]
    lls, models, per = {}, {}, {}
    for seed in seeds:
        for run in RUNS:
            if run not in SEEDED and seed != seeds[0]:
                continue
            t0 = time.perf_counter()
            model, hist = train(run, data, tc, seed)
            if seed == seeds[0]:
                models[run] = model
            r = {"seconds_per_epoch": statistics.mean(h["seconds"] for h in hist),
                 "final_train_elbo": hist[-1]["train_elbo"], "final_val_elbo": hist[-1]["val_elbo"]}
            ll, ess = log_likelihood(model.model, model.guide, x_ll, num_samples=s["S"], batch_size=10, seed=0,
                                     return_ess=True)
            lls[run, seed] = ll.double()
            r["test_ll"] = float(ll.mean())
            r["test_ll_std_error"] = float(ll.std() / math.sqrt(len(ll)))
            r["test_ll_mc_std_error"] = ll_mc_std_error(ess, s["S"])
            r["test_elbo"] = float(elbo_per_image(model, model.guide, x_ll, 100).mean())
            per[run, seed] = r
            print(f"[{run} seed {seed}] {time.perf_counter() - t0:.0f}s  {r['seconds_per_epoch']:.2f} s/epoch  "
                  f"test LL {r['test_ll']:.3f}  test ELBO {r['test_elbo']:.3f}", flush=True)
    # per seed: each run's LL and its paired difference to the VAE trained with the same seed (same test images)
    for (run, seed), r in per.items():
        r["diff_vs_vae"], r["diff_vs_vae_std_error"] = paired(lls[run, seed], lls["vae", seed])
        out["by_seed"].setdefault(run, {})[str(seed)] = {k: round(v, 4) for k, v in r.items()}
    # summaries over seeds: the mean; the difference's standard error from ``over_seeds``
    out["seeds"] = {run: [sd for sd in seeds if (run, sd) in per] for run in RUNS}
    out["diff_vs_vae_seeds_positive"] = {}
    for run in RUNS:
        rs = [per[run, sd] for sd in out["seeds"][run]]
        mean = lambda k: statistics.mean(r[k] for r in rs)  # noqa: E731
        out["test_ll"][run] = round(mean("test_ll"), 3)
        out["test_ll_std_error"][run] = round(mean("test_ll_std_error"), 3)
        out["test_ll_mc_std_error"][run] = round(mean("test_ll_mc_std_error"), 4)
        out["test_elbo"][run] = round(mean("test_elbo"), 3)
        out["final_train_elbo"][run] = round(mean("final_train_elbo"), 2)
        out["final_val_elbo"][run] = round(mean("final_val_elbo"), 2)
        out["seconds_per_epoch"][run] = round(mean("seconds_per_epoch"), 2)
        d = [(r["diff_vs_vae"], r["diff_vs_vae_std_error"]) for r in rs]
        m, se = over_seeds(d)
        out["test_ll_diff_vs_vae"][run] = round(m, 3)
        out["test_ll_diff_vs_vae_std_error"][run] = round(se, 3)
        out["diff_vs_vae_seeds_positive"][run] = f"{sum(v > 0 for v, _ in d)}/{len(d)}"
    for run in RUNS:
        out["relative_seconds_per_epoch"][run] = round(out["seconds_per_epoch"][run] / out["seconds_per_epoch"]["vae"],
                                                       2)
    lls = {run: lls[run, seeds[0]] for run in RUNS}
    for run, family in (("vae", "diag"), ("laplace", "full")):
        t0 = time.perf_counter()
        g = gap_report(models[run], x_gap, family, s, lls[run][: s["n_gap"]])
        g["inference_gap"] = round(float((lls[run][: s["n_gap"]] - g.pop("_amortised")).mean()), 3)
        out["amortisation_gap"][run] = g
        print(f"[gap {run}] {time.perf_counter() - t0:.0f}s {g}", flush=True)
    step = step_timing(data, tc, s["timing_rounds"], s["timing_steps"])
    out["step_seconds"] = {k: round(v, 4) for k, v in step.items()}
    out["relative_step_seconds"] = {k: round(v / step["vae"], 2) for k, v in step.items()}
    richer = [r for r in RUNS if r not in ("vae", "recursive_1")]
    out["claims"] = {
        **beats_vae(out, richer),
        "laplace_shrinks_amortisation_gap": out["amortisation_gap"]["laplace"]["gap"]
        < out["amortisation_gap"]["vae"]["gap"],
    }
    env = environment("cpu")
    out.update({
        "command": ("flock /tmp/ppl_vae_bench.lock nice -n 5 /work/venv/bin/python bench/guides.py --threads "
                    f"{args.threads}" if not args.quick else "/work/venv/bin/python bench/guides.py --quick"),
        "training_seeds": seeds, "seeded_runs": list(SEEDED),
        "diff_std_error_note": "paired difference to the VAE of the same seed on the same test images; over seeds "
                               "sqrt(stdev(diffs)^2/n + mean(paired s.e.)^2/n)",
        "mode": "quick" if args.quick else "full",
        "data": {"name": "fashion_mnist", "pixels": "binary_dynamic (train re-binarised every epoch; val/test "
                 "binarised once, seed 0)", "limit": s["limit"], "train": len(data.train_x), "val": len(data.val_x),
                 "test": len(data.test_x), "test_used_for_ll": len(x_ll), "test_used_for_gap": len(x_gap),
                 "source": data.source},
        "sizes": {"latent_dim": LATENT, "hidden": HIDDEN, "activation": "relu", "likelihood": "bernoulli",
                  "encoders": "recursive_K: K encoders of this size; gamix: one trunk with K heads; laplace: a mean "
                              "encoder + T=4 damped Newton steps (eta_t = 0.5/(t+1))",
                  "recursive_options": {"divergence_weight": 0.5, "log_ratio_cap": 5.0, "grow_every": 0},
                  "gamix_options": {"num_components": 3, "var_reg": 0.1},
                  "gamix_noreg_options": {"num_components": 3, "var_reg": 0.0}, "batch_size": 100, "lr": 1e-3,
                  "ll_num_samples": s["S"], "elbo_particles": s["elbo_particles"], "gap_steps": s["gap_steps"],
                  "gap_particles": s["gap_particles"], "gap_optimiser": "Adam lr 1e-2, cosine decay",
                  "note": "VLAE's 2x500 hidden / 50 latents is too heavy for 2 shared CPU cores; 2x200 / 16 used"},
        "epochs": s["epochs"],
        "timing_note": "seconds_per_epoch: mean epoch time of each run's fit loop (training pass + validation "
                       "ELBO), runs one after the other in this process on a shared 2-core machine; step_seconds: "
                       "median SVI step on one minibatch over interleaved rounds (same process)",
        "hardware": {"platform": env["platform"], "processor": env["processor"], "cpu_count": env["cpu_count"],
                     "torch_threads": torch.get_num_threads()},
        "environment": env,
        "date": env["date"],
        "total_seconds": round(time.perf_counter() - t_start, 1),
    })
    finish("guides", out, args.quick)


if __name__ == "__main__":
    main()
