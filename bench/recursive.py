"""Recursive mixture guide (Kim & Pavlovic 2020): its inference claim on a fixed decoder, its joint-training
sweep, and its inference time — dynamically binarised Fashion-MNIST, the sizes of bench/guides.py
(784–200–200–16 ReLU MLPs, Bernoulli likelihood, Adam 1e-3, batch 100; ``bench/_guide_runs.py``).

Parts (``--parts``, default all three):
  fixed_decoder     train a VAE; freeze its decoder; on it train the K = 5 recursive mixture stage-wise
                    (``options.schedule: stagewise, freeze_decoder: true``: stage 0 fine-tunes h_0, initialised as
                    the VAE's encoder; stage m adds h_m with h_{<m} frozen). Per test image: ELBO(q_m) − ELBO(q_0) for
                    m = 1 … 4; beside them, on the
                    same decoder, the VAE's amortised q, the per-image optimised diagonal and full-covariance
                    Gaussians (``ppl_vae.evaluate.amortisation_gap``: Adam from the amortised q) and the Laplace
                    guide (4 damped Newton steps from the VAE encoder's mean); log p̂(x) by importance sampling
                    from the Laplace guide. Reported: the amortisation gap (optimised diagonal − amortised VAE),
                    the share of it the mixture closes, the approximation gaps (log p̂ − each ELBO).
                    ``per_stage``: for each stage m, the mean test ELBO of the mixture q_m and of h_m alone, and
                    the mean mixing weight ε_m(x) (m ≥ 1; frozen after stage m, so read at the end). Study
                    options: ``--component-init`` (comma-separated ``random``/``previous``: each init trains its
                    own mixture on the same VAE; the first gives the top-level keys, all are in
                    ``by_component_init``) and ``--stage-epochs`` (epochs per stage; default the mode's).
  inference_seconds per image: the amortised guides (VAE, 5-component mixture, Laplace guide) and the per-image
                    optimisation, timed side by side in one process (one torch thread).
  joint             λ ∈ lambdas × cap ∈ caps × K ∈ joint_K trained jointly (concurrent schedule, ``joint_epochs``
                    epochs) for every seed in ``--seeds``, with the VAE and the capacity-matched wide VAE
                    (``bench/guides_large.py``'s ``vae_wide`` rule at the largest K) as controls, and at λ = 0.5,
                    cap = 5 and the largest K the two other schedules: ``grown`` (component m switched on after
                    m·grow_every epochs) and ``stagewise`` (one stage per component, earlier ones frozen) — the study
                    the former ``recursive_seeds.py`` ran (20 epochs there; its results stay in
                    ``bench/results/recursive_seeds.json``). Paired differences of the test log p̂(x) to the VAE and to
                    the wide VAE of the same seed, combined over seeds (``_common.over_seeds``). The runs go to
                    ``--workers`` processes of one torch thread each; the full sweep is 34 runs × 10 seeds.

    python bench/recursive.py --threads 1 --workers 2              # full (all parts, seeds 0–9)
    python bench/recursive.py --parts fixed_decoder,inference_seconds --seeds 0   # the fixed-decoder study
    python bench/recursive.py --parts fixed_decoder --seeds 0 --component-init random,previous   # both inits
    python bench/recursive.py --quick                              # < 5 min
The last line of stdout is the JSON summary (full mode also writes bench/results/recursive.json).
"""

from __future__ import annotations

import math
import statistics
import time

import pyro
import torch
from _common import finish, over_seeds, paired, parser, run_jobs, start, subset_arg
from _guide_runs import HIDDEN, LATENT, wide_width

import ppl_vae
from ppl_vae import ModelConfig, build_model
from ppl_vae.config import TrainConfig
from ppl_vae.data import load_data
from ppl_vae.distributions.plate import data_plate
from ppl_vae.errors import TrainingDiverged
from ppl_vae.evaluate import amortisation_gap, elbo_per_datapoint, log_likelihood
from ppl_vae.guides.laplace import LaplaceGuide
from ppl_vae.models.rme import COMPONENT_INITS
from ppl_vae.nn.networks import MLPEncoder

FULL = dict(
    limit=10000,
    epochs=20,
    stage_epochs=4,
    n_test=200,
    S=2000,
    gap_steps=300,
    gap_particles=16,
    elbo_particles=1000,
    K=5,
    lambdas=(0.25, 0.5, 1.0),
    caps=(5.0, 0.0),
    joint_K=(1, 2, 3, 4, 5),
    joint_epochs=10,
    grow_every=1,
    n_ll=500,
    ll_S=1000,
    timing_images=100,
)
QUICK = dict(
    limit=600,
    epochs=2,
    stage_epochs=1,
    n_test=20,
    S=200,
    gap_steps=20,
    gap_particles=4,
    elbo_particles=100,
    K=3,
    lambdas=(0.5,),
    caps=(5.0,),
    joint_K=(3,),
    joint_epochs=3,
    grow_every=1,
    n_ll=50,
    ll_S=100,
    timing_images=20,
)
PARTS = ("fixed_decoder", "inference_seconds", "joint")


def model(name: str, data, seed: int, hidden=None, **options):
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    cfg = ModelConfig(
        name=name,
        likelihood="bernoulli",
        arch="mlp",
        latent_dim=LATENT,
        hidden=list(hidden or HIDDEN),
        activation="relu",
        options=options,
    )
    return build_model(cfg, data.shape, num_data=len(data.train_x))


def fit(m, data, epochs: int, seed: int):
    ppl_vae.train(
        m, data, TrainConfig(objective="elbo", epochs=epochs, batch_size=100, lr=1e-3), seed=seed, progress=False
    )
    m.eval()
    return m


def laplace_on(vae, num_data: int) -> LaplaceGuide:
    """The Laplace guide on the VAE's decoder, started at the VAE encoder's mean (no parameters of its own)."""
    return LaplaceGuide(
        lambda x: vae.encoder(x)[0],
        lambda z: vae.decoder(z).reshape(z.shape[0], -1),
        LATENT,
        likelihood="bernoulli",
        num_data=num_data,
    )


def _mean_se(v: torch.Tensor) -> dict:
    v = v.double()
    return {"mean": round(float(v.mean()), 4), "std_error": round(float(v.std() / math.sqrt(len(v))), 4)}


def component_guide(rme, m: int):
    """h_m alone (its encoder's diagonal Gaussian) as a guide of ``rme.model``."""

    def guide(x, y=None):
        locs, scales, _ = rme.encoder(x, None, m + 1)
        with data_plate(x, rme.num_data):
            pyro.sample("z", pyro.distributions.Normal(locs[:, m], scales[:, m]).to_event(1))

    return guide


def train_mixture(vae, data, s: dict, seed: int, x, init: str) -> tuple[object, dict[str, torch.Tensor], list[dict]]:
    """The K-component mixture trained stage-wise on the VAE's frozen decoder, h_0 started as the VAE's encoder.
    Returns (model, {"mixture_k": ELBO(q_{k−1}) per test image}, per-stage records)."""
    rme = model(
        "rme", data, seed, num_components=s["K"], schedule="stagewise", freeze_decoder=True, component_init=init
    )
    rme.decoder.load_state_dict(vae.decoder.state_dict())
    # h_0 starts as the VAE's encoder (the same 784-200-200-32 layers, softplus scale): q_0 = the VAE's q
    src = [m for m in vae.encoder.modules() if isinstance(m, torch.nn.Linear)]
    dst = [m for m in rme.encoder.components[0].modules() if isinstance(m, torch.nn.Linear)]
    for a, b in zip(src, dst, strict=True):
        b.load_state_dict(a.state_dict())
    elbos: dict[str, torch.Tensor] = {}
    plan = ppl_vae.plan_for(rme)
    begin = plan.begin_stage

    def record(stage):  # q_{k−1}, as stage k finds it
        k = int(stage.name.rsplit("_", 1)[1])
        if k > 0:
            rme.eval()
            elbos[f"mixture_{k}"] = elbo_per_datapoint(rme.model, rme.guide, x, s["elbo_particles"]).double()
            rme.train()
        begin(stage)

    plan.begin_stage = record
    ppl_vae.train(
        rme,
        data,
        TrainConfig(objective="elbo", epochs=s["K"] * s["stage_epochs"], batch_size=100, lr=1e-3),
        plan=plan,
        seed=seed,
        progress=False,
    )
    rme.eval()
    elbos[f"mixture_{s['K']}"] = elbo_per_datapoint(rme.model, rme.guide, x, s["elbo_particles"]).double()
    assert all(
        torch.equal(a, b)
        for a, b in zip(rme.decoder.state_dict().values(), vae.decoder.state_dict().values(), strict=False)
    )  # the decoder did not move
    # Per stage: h_m and ε_m are frozen after stage m, so their final state is the one stage m left. Drawn on a
    # forked RNG so that the evaluations after this one see the same stream as without it.
    stages = []
    with torch.random.fork_rng(), torch.no_grad():
        eps = torch.sigmoid(rme.encoder(x)[2]).double()  # (B, K − 1): ε_1 … ε_{K−1}
        for k in range(s["K"]):
            h = elbo_per_datapoint(rme.model, component_guide(rme, k), x, s["elbo_particles"]).double()
            stages.append(
                {
                    "stage": k,
                    "elbo_mixture": _mean_se(elbos[f"mixture_{k + 1}"]),
                    "elbo_component": _mean_se(h),
                    "eps_mean": None if k == 0 else round(float(eps[:, k - 1].mean()), 4),
                }
            )
    return rme, elbos, stages


def fixed_decoder(data, s: dict, seed: int, inits=("random",)) -> tuple[dict, dict]:
    x = data.test_x[: s["n_test"]]
    vae = fit(model("vae", data, seed), data, s["epochs"], seed)
    mixtures = {inits[0]: train_mixture(vae, data, s, seed, x, inits[0])}
    for init in inits[1:]:  # on a forked RNG: the evaluations below see the stream of a one-init run
        with torch.random.fork_rng():
            mixtures[init] = train_mixture(vae, data, s, seed, x, init)
    rme, elbos, _ = mixtures[inits[0]]
    elbos = dict(elbos)
    lap = laplace_on(vae, len(data.train_x))
    elbos["vae"] = elbo_per_datapoint(vae.model, vae.guide, x, s["elbo_particles"]).double()
    elbos["laplace"] = elbo_per_datapoint(vae.model, lap, x, s["elbo_particles"]).double()
    timing = {}
    for family in ("diag", "full"):
        t0 = time.perf_counter()
        g = amortisation_gap(
            vae.model,
            vae.guide,
            x,
            family=family,
            steps=s["gap_steps"],
            num_particles=s["gap_particles"],
            elbo_particles=s["elbo_particles"],
            parameters=list(vae.parameters()),
        )
        timing[f"optimised_{family}"] = (time.perf_counter() - t0) / len(x)
        elbos[f"optimised_{family}"] = g["optimised"].double()
    log_px = log_likelihood(vae.model, lap, x, num_samples=s["S"], seed=seed).double()
    q0 = elbos["mixture_1"]  # h_0 alone, trained on the fixed decoder
    amort = elbos["optimised_diag"] - elbos["vae"]

    def share(mix: dict) -> float:  # of the gap between h_0 (trained on the fixed decoder) and the optimised diag
        q0 = mix["mixture_1"]
        return round(float((mix[f"mixture_{s['K']}"] - q0).mean() / (elbos["optimised_diag"] - q0).mean()), 4)

    out = {
        "num_images": len(x),
        "K": s["K"],
        "stage_epochs": s["stage_epochs"],
        "elbo": {k: _mean_se(v) for k, v in elbos.items()},
        "gain_over_q0": {k: _mean_se(v - q0) for k, v in elbos.items() if k.startswith("mixture_")},
        "amortisation_gap_vae": _mean_se(amort),
        "amortisation_gap_h0": _mean_se(elbos["optimised_diag"] - q0),
        "share_of_amortisation_gap_closed": share(elbos),
        "log_likelihood_laplace_is": _mean_se(log_px),
        "approximation_gap": {k: _mean_se(log_px - v) for k, v in elbos.items()},
        "mixture_beats_optimised_diag": float((elbos[f"mixture_{s['K']}"] - elbos["optimised_diag"]).mean()) > 0,
        "component_init": list(inits),
        "per_stage": mixtures[inits[0]][2],
        "by_component_init": {
            init: {
                "elbo": {k: _mean_se(v) for k, v in mix.items()},
                "gain_over_q0": {k: _mean_se(v - mix["mixture_1"]) for k, v in mix.items()},
                "amortisation_gap_h0": _mean_se(elbos["optimised_diag"] - mix["mixture_1"]),
                "share_of_amortisation_gap_closed": share(mix),
                "share_of_vae_amortisation_gap_closed": round(
                    float((mix[f"mixture_{s['K']}"] - elbos["vae"]).mean() / amort.mean()), 4
                ),
                "per_stage": stages,
            }
            for init, (_, mix, stages) in mixtures.items()
        },
    }
    return out, {"vae": vae, "rme": rme, "laplace": lap, "timing": timing}


def inference_seconds(parts: dict, data, s: dict) -> dict:
    x = data.test_x[: s["timing_images"]]
    out = {k: v for k, v in parts["timing"].items()}
    with torch.no_grad():
        for name, fn in (("vae", lambda: parts["vae"].guide_dist(x)), ("mixture", lambda: parts["rme"].guide_dist(x))):
            fn()
            t0 = time.perf_counter()
            for _ in range(5):
                fn()
            out[name] = (time.perf_counter() - t0) / 5 / len(x)
    parts["laplace"].posterior(x)
    t0 = time.perf_counter()
    for _ in range(5):
        parts["laplace"].posterior(x)
    out["laplace"] = (time.perf_counter() - t0) / 5 / len(x)
    out = {k: round(v, 7) for k, v in out.items()}
    out["relative_to_vae"] = {k: round(v / out["vae"], 2) for k, v in out.items() if isinstance(v, float)}
    return out


def joint_run(job: tuple) -> dict:
    """One joint-training run of the sweep (a worker's job): train, then the per-image test log p̂(x)."""
    s, seed, name, opts, width = job
    torch.set_num_threads(1)
    data = load_data("fashion_mnist", pixels="binary_dynamic", limit=s["limit"], seed=0)
    x = data.test_x[: s["n_ll"]]
    m = model("vae" if name.startswith("vae") else "rme", data, seed, **opts)
    if name == "vae_wide":
        m.encoder = MLPEncoder(data.shape, LATENT, (width, width), "relu")
    t0 = time.perf_counter()
    try:
        fit(m, data, s["joint_epochs"], seed)
    except TrainingDiverged as e:  # a result of the setting, not a failure of the sweep
        print(f"[joint {name} seed {seed}] diverged: {e}", flush=True)
        return {"name": name, "seed": seed, "ll": None, "seconds_per_epoch": None, "diverged": str(e)}
    seconds = time.perf_counter() - t0
    ll = log_likelihood(m.model, m.guide, x, num_samples=s["ll_S"], seed=0).double()
    print(f"[joint {name} seed {seed}] {seconds:.0f}s  test LL {float(ll.mean()):.3f}", flush=True)
    return {"name": name, "seed": seed, "ll": ll, "seconds_per_epoch": seconds / s["joint_epochs"]}


def joint_runs(s: dict) -> dict[str, dict]:
    """The runs of one seed: the VAE, the wide VAE, the λ × cap × K grid (concurrent schedule) and, at the default
    λ = 0.5, cap = 5 and the largest K, the grown and the stage-wise schedules (the former recursive_seeds.py)."""
    runs = {"vae": {}, "vae_wide": {}}
    for lam in s["lambdas"]:
        for cap in s["caps"]:
            for K in s["joint_K"]:
                runs[f"rme_K{K}_lambda{lam}_cap{cap or 'none'}"] = dict(
                    num_components=K, divergence_weight=lam, log_ratio_cap=cap
                )
    K = max(s["joint_K"])
    runs[f"rme_K{K}_grown"] = dict(num_components=K, grow_every=s["grow_every"])
    runs[f"rme_K{K}_stagewise"] = dict(num_components=K, schedule="stagewise")
    return runs


def joint(data, s: dict, seeds, workers: int) -> dict:
    width = wide_width(data, max(s["joint_K"]))
    runs = joint_runs(s)
    # the most expensive runs first, so the workers finish close together
    jobs = sorted(
        ((s, seed, name, opts, width) for seed in seeds for name, opts in runs.items()),
        key=lambda j: (-j[3].get("num_components", 4 if j[2] == "vae_wide" else 0), j[1]),
    )
    lls: dict[str, dict[int, torch.Tensor]] = {}
    seconds: dict[str, list[float]] = {}
    diverged: dict[str, list[int]] = {}
    for r in run_jobs(joint_run, jobs, workers):
        if r["ll"] is None:
            diverged.setdefault(r["name"], []).append(r["seed"])
            continue
        lls.setdefault(r["name"], {})[r["seed"]] = r["ll"]
        seconds.setdefault(r["name"], []).append(r["seconds_per_epoch"])
    out = {
        "runs": {k: v for k, v in runs.items()},
        "seeds": list(seeds),
        "epochs": s["joint_epochs"],
        "diverged": diverged,
        "vae_wide_hidden": width,
        "n_test": s["n_ll"],
        "S": s["ll_S"],
        "test_ll": {k: round(float(torch.stack([x.mean() for x in v.values()]).mean()), 3) for k, v in lls.items()},
        "diff_vs_vae": {},
        "diff_vs_vae_by_seed": {},
        "relative_seconds_per_epoch": {
            k: round(statistics.mean(v) / statistics.mean(seconds["vae"]), 2) for k, v in seconds.items()
        },
    }
    for name, d in lls.items():
        if name == "vae":
            continue
        per_seed = [paired(d[sd], lls["vae"][sd]) for sd in seeds if sd in d]  # seeds that did not diverge
        m, se = over_seeds(per_seed)
        out["diff_vs_vae"][name] = {
            "mean": round(m, 3),
            "std_error": round(se, 3),
            "seeds_better": f"{sum(p[0] > 0 for p in per_seed)}/{len(per_seed)}",
        }
        out["diff_vs_vae_by_seed"][name] = [round(p[0], 3) for p in per_seed]
    # each mixture against the capacity-matched wide VAE of the same seed
    out["diff_vs_vae_wide"] = {}
    for name, d in lls.items():
        if name.startswith("rme"):
            m, se = over_seeds([paired(d[sd], lls["vae_wide"][sd]) for sd in seeds if sd in d])
            out["diff_vs_vae_wide"][name] = {"mean": round(m, 3), "std_error": round(se, 3)}
    return out


def main(argv=None):
    ap = parser(__doc__, seeds="0,1,2,3,4,5,6,7,8,9", workers=2)
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {list(PARTS)}")
    ap.add_argument(
        "--component-init",
        default="random",
        help=f"fixed_decoder: comma-separated inits of h_m, each of {list(COMPONENT_INITS)} (first: top-level keys)",
    )
    ap.add_argument("--stage-epochs", type=int, default=None, help="fixed_decoder: epochs per stage (default: mode's)")
    args = start(ap, argv)
    parts = subset_arg(ap, "--parts", args.parts, PARTS)
    inits = tuple(subset_arg(ap, "--component-init", args.component_init, COMPONENT_INITS, allow_empty=False))
    if args.stage_epochs is not None and args.stage_epochs < 1:
        ap.error(f"--stage-epochs must be a positive integer, got {args.stage_epochs}")
    s = QUICK if args.quick else FULL
    if args.stage_epochs is not None:
        s = {**s, "stage_epochs": args.stage_epochs}
    seeds = args.seeds[:1] if args.quick else args.seeds
    data = load_data("fashion_mnist", pixels="binary_dynamic", limit=s["limit"], seed=0)
    out = {"settings": {k: v for k, v in s.items()}, "fixed_decoder": None, "inference_seconds": None, "joint": None}
    if "fixed_decoder" in parts or "inference_seconds" in parts:
        fd, models = fixed_decoder(data, s, seeds[0], inits)
        out["fixed_decoder"] = {**fd, "seed": seeds[0]}
        if "inference_seconds" in parts:
            out["inference_seconds"] = inference_seconds(models, data, s)
    if "joint" in parts:
        out["joint"] = joint(data, s, seeds, args.workers)
    finish("recursive", out, args, device="cpu")


if __name__ == "__main__":
    main()
