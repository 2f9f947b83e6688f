"""Why the Laplace guide loses with a 2-D latent: exact posteriors by quadrature for the VAE and the Laplace guide.

``bench/guides_2d.py`` found the Laplace guide (VLAE) 6 nats *below* the VAE with 2 latents, while it is 4.8 nats
above with 16 (``bench/guides.py``). With 2 latents the posterior p(z|x) ∝ N(z; 0, I) p(x|z) can be computed on a
grid, so nothing here is estimated by the guides themselves:

    log p(x) = log Σ_g w_g N(z_g; 0, I) p(x|z_g)     (trapezoid rule on [−R, R]², spacing h, w_g = h²)

and with it the posterior mean m, covariance C and grid mode z* of each test image. The same settings as
``bench/guides_2d.py`` (784-200-200-2 ReLU MLP, Bernoulli likelihood, dynamically binarised Fashion-MNIST, 10,000
training images, 20 epochs (``--epochs``), Adam 1e-3, batch 100, training seed 0) train a VAE and a Laplace-guide VAE
(``train_elbo_by_epoch`` records each epoch's training ELBO); on the
first ``n`` test images each model reports:

  exact_log_px           quadrature log p(x) (``quadrature_check``: the largest change with twice the spacing,
                         and from there with a box 2 wider on each side)
  is_log_px_minus_exact  the k = 5000 importance-sampling estimate with the model's own guide, minus the exact
  elbo, kl_q_posterior   the amortised guide's ELBO and KL(q ‖ p(z|x)) = log p(x) − ELBO (exact)
  optimised_elbo         the best Gaussian of the guide's family per image (Adam from the amortised q; diagonal
                         for the VAE, full covariance for Laplace): amortisation gap = optimised − amortised,
                         approximation gap = exact − optimised
  q_mean_offset          √((μ_q − m)ᵀ C⁻¹ (μ_q − m)), the guide mean's distance from the posterior mean in
                         posterior standard deviations; ``q_logdet_ratio`` = log det Σ_q − log det C
  VAE only: ``laplace_guide_on_this_decoder_elbo``, the Laplace guide's ELBO (4 damped steps from the VAE
  encoder's mean) on the VAE's trained decoder, and its difference to the VAE encoder's ELBO.
  ``laplace_detached`` (ablation): the Laplace guide with the decoder's weights detached inside the guide, so
  the decoder learns only through E_q[log p(x|z)], as a VAE's decoder does.
  ``laplace_ls``: the Laplace guide with line-searched steps (``damping="line_search"``: per image the η of
  {1, ½, ¼, ⅛, 0} with the highest exact log joint) instead of the VLAE schedule; the VAE row also reports this
  guide on the VAE's decoder (``laplace_ls_guide_on_this_decoder_minus_encoder_elbo``).
  Laplace rows only: ``mode_offset`` (μ_T to the grid mode, same units) and ``laplace_at_mode_elbo``, the ELBO of
  N(z*, Λ(z*)⁻¹) — the Laplace approximation at the true mode, i.e. what perfect mode finding would give.

    python bench/laplace_2d.py --threads 1                               # full
    python bench/laplace_2d.py --threads 1 --epochs 60 --runs vae,laplace   # variants, stored in the same file
    python bench/laplace_2d.py --threads 1 --runs vae,laplace_ls
    python bench/laplace_2d.py --quick                                   # < 5 min
The last line of stdout is the JSON summary (full mode also writes bench/results/laplace_2d.json).
"""

from __future__ import annotations

import math
import statistics
import time

import torch
import torch.nn.functional as F
from _common import finish, measured_chunks, one_seed, paired, parser, start
from _guide_runs import train
from torch.func import functional_call

from ppl_vae.config import TrainConfig
from ppl_vae.data import load_data
from ppl_vae.evaluate import amortisation_gap, elbo_per_datapoint, log_likelihood
from ppl_vae.guides.laplace import (
    laplace_posterior,
    precision_to_scale_tril,
    relu_mlp_layers,
    vlae_damping,
)
from ppl_vae.guides.laplace import log_joint as lib_log_joint

LATENT = 2
FULL = dict(
    limit=10000, epochs=20, n=200, S=5000, radius=8.0, grid=1601, gap_steps=300, gap_particles=16, elbo_particles=1000
)
RUNS = ("vae", "laplace", "laplace_detached", "laplace_ls")
QUICK = dict(
    limit=1000, epochs=2, n=20, S=1000, radius=8.0, grid=481, gap_steps=30, gap_particles=8, elbo_particles=200
)


@torch.no_grad()
def grid_posterior(model, x: torch.Tensor, radius: float, n: int, chunk: int = 20000) -> dict:
    """Quadrature of p(x) = ∫ N(z; 0, I) p(x|z) dz on an n × n grid over [−radius, radius]² (trapezoid weights),
    streamed in chunks of grid points: log p(x), posterior mean, covariance and grid mode per image."""
    g = torch.linspace(-radius, radius, n)
    h = float(g[1] - g[0])
    w1 = torch.full((n,), math.log(h))
    w1[0] = w1[-1] = math.log(h / 2)
    zs = torch.cartesian_prod(g, g)
    log_prior = -0.5 * (zs**2).sum(-1) - math.log(2 * math.pi)
    log_quad = torch.cartesian_prod(w1, w1).sum(-1)
    xf = x.reshape(len(x), -1)
    B = len(x)
    m = torch.full((B,), -math.inf, dtype=torch.float64)
    s0 = torch.zeros(B, dtype=torch.float64)
    s1 = torch.zeros(B, 2, dtype=torch.float64)
    s2 = torch.zeros(B, 2, 2, dtype=torch.float64)
    best, mode = torch.full((B,), -math.inf), torch.zeros(B, 2)
    for i in range(0, len(zs), chunk):
        z = zs[i : i + chunk]
        f = model.decoder(z).reshape(len(z), -1)
        lj = xf @ f.T - F.softplus(f).sum(-1) + log_prior[i : i + chunk]  # (B, C): log p(x, z)
        lw = (lj + log_quad[i : i + chunk]).double()  # log of each quadrature term
        cmax, arg = lj.max(-1)
        upd = cmax > best
        best = torch.where(upd, cmax, best)
        mode[upd] = z[arg[upd]]
        new_m = torch.maximum(m, lw.max(-1).values)
        scale = torch.exp(m - new_m)
        e = torch.exp(lw - new_m[:, None])
        zd = z.double()
        s0 = s0 * scale + e.sum(-1)
        s1 = s1 * scale[:, None] + e @ zd
        s2 = s2 * scale[:, None, None] + torch.einsum("bc,ci,cj->bij", e, zd, zd)
        m = new_m
    mean = s1 / s0[:, None]
    cov = s2 / s0[:, None, None] - mean[:, :, None] * mean[:, None, :]
    return {"log_px": m + s0.log(), "mean": mean, "cov": cov, "mode": mode.double(), "spacing": h}


@torch.no_grad()
def log_joint(model, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """log N(z; 0, I) + log p(x|z) for z of shape (S, B, 2) and images x (B, …): (S, B)."""
    f = model.decoder(z.reshape(-1, z.shape[-1])).reshape(*z.shape[:2], -1)
    return lib_log_joint(x.reshape(len(x), -1), f, z, "bernoulli") - math.log(2 * math.pi)


@torch.no_grad()
def gaussian_elbo(model, x, loc, scale_tril, particles: int, batch: int = 20) -> torch.Tensor:
    """Monte Carlo ELBO E_q[log p(x, z) − log q(z)] of q = N(loc, L Lᵀ) per image (float64)."""
    q = torch.distributions.MultivariateNormal(loc.float(), scale_tril=scale_tril.float())
    z = q.sample((particles,))
    out = torch.cat([log_joint(model, x[i : i + batch], z[:, i : i + batch]) for i in range(0, len(x), batch)], 1)
    return (out - q.log_prob(z)).double().mean(0)


def mahalanobis(d: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    return torch.sqrt((d.unsqueeze(-2) @ torch.linalg.solve(cov, d.unsqueeze(-1))).reshape(-1))


@torch.no_grad()
def laplace_q(model, x, mu0: torch.Tensor, num_steps: int = 4, damping=vlae_damping):
    """(μ, scale_tril) of the Laplace guide on ``model``'s decoder: ``num_steps`` steps from ``mu0`` with the VLAE
    schedule or ``damping="line_search"`` (0 steps: the Laplace approximation N(mu0, Λ(mu0)⁻¹) at that point)."""
    mu, prec = laplace_posterior(
        x,
        mu0,
        lambda z: model.decoder(z).reshape(len(z), -1),
        likelihood="bernoulli",
        num_steps=num_steps,
        layers=relu_mlp_layers(model.decoder),
        damping=damping,
    )
    return mu, precision_to_scale_tril(prec)


def detach_decoder_in_guide(model) -> None:
    """Ablation ``laplace_detached``: the guide's iterations and Λ read the decoder's weights detached, so the decoder
    learns only through E_q[log p(x|z)] as in a VAE, while μ₀'s encoder still learns through the iterations."""

    def posterior(x, c=None):
        params = {k: v.detach() for k, v in model.decoder.named_parameters()}
        fn = lambda z: functional_call(model.decoder, params, (z,)).reshape(z.shape[0], -1)  # noqa: E731
        mu, prec = laplace_posterior(
            x, model.encoder(x, c), fn, likelihood="bernoulli", num_steps=model.num_steps, damping=model.damping
        )
        return mu, precision_to_scale_tril(prec)

    model.posterior = posterior


def mean_se(v: torch.Tensor) -> list[float]:
    """[mean, standard error] over images, rounded."""
    return [round(a, 3) for a in paired(v.double(), 0.0)]


def evaluate(run: str, model, x, s: dict) -> tuple[dict, dict]:
    """The exact-posterior report of one trained model (see the module docstring) and per-image tensors."""
    t0 = time.perf_counter()
    exact = grid_posterior(model, x, s["radius"], s["grid"])
    coarse = grid_posterior(model, x, s["radius"], (s["grid"] + 1) // 2)
    wide = grid_posterior(model, x, s["radius"] + 2, (s["grid"] + 1) // 2 + int(2 / coarse["spacing"]) * 2)
    post_sd = torch.linalg.eigvalsh(exact["cov"]).clamp_min(0).sqrt()
    ll_is = log_likelihood(
        model.model, model.guide, x, num_samples=s["S"], **measured_chunks(len(x), s["S"], 10), seed=0
    ).double()
    elbo = elbo_per_datapoint(model.model, model.guide, x, s["elbo_particles"]).double()
    with torch.no_grad():
        q = model.guide_dist(x)
        q_loc, q_cov = q.mean.double(), (q.covariance_matrix if run != "vae" else torch.diag_embed(q.variance)).double()
    # the guide's own family optimised per image, from the amortised q (as in bench/guides.py)
    optimised = amortisation_gap(
        model.model,
        model.guide,
        x,
        family="diag" if run == "vae" else "full",
        steps=s["gap_steps"],
        num_particles=s["gap_particles"],
        elbo_particles=s["elbo_particles"],
        parameters=model.parameters(),
    )["optimised"].double()
    lp = exact["log_px"]
    rep = {
        "exact_log_px": mean_se(lp),
        "quadrature_check": {
            "spacing": round(exact["spacing"], 4),
            "coarse_spacing": round(coarse["spacing"], 4),
            "max_abs_diff_log_px": float((lp - coarse["log_px"]).abs().max()),
            "wider_box_radius": s["radius"] + 2,
            "max_abs_diff_log_px_wider_box": float((wide["log_px"] - coarse["log_px"]).abs().max()),
            "min_posterior_sd": float(post_sd.min()),
        },
        "is_log_px_minus_exact": mean_se(ll_is - lp),
        "elbo": mean_se(elbo),
        "kl_q_posterior": mean_se(lp - elbo),
        "optimised_elbo": mean_se(optimised),
        "amortisation_gap": mean_se(optimised - elbo),
        "approximation_gap": mean_se(lp - optimised),
        "q_mean_offset": mean_se(mahalanobis(q_loc - exact["mean"], exact["cov"])),
        "q_logdet_ratio": mean_se(torch.logdet(q_cov) - torch.logdet(exact["cov"])),
        "posterior_sd_median": round(float(post_sd.median()), 4),
    }
    if run == "vae":
        # the Laplace guide (T = 4 damped steps from the VAE encoder's mean) on the VAE's own decoder
        with torch.no_grad():
            mu0 = model.encoder(x)[0]
            lap = gaussian_elbo(model, x, *laplace_q(model, x, mu0), s["elbo_particles"])
            lap_ls = gaussian_elbo(model, x, *laplace_q(model, x, mu0, damping="line_search"), s["elbo_particles"])
        rep["laplace_guide_on_this_decoder_elbo"] = mean_se(lap)
        rep["laplace_guide_on_this_decoder_minus_encoder_elbo"] = mean_se(lap - elbo)
        rep["laplace_ls_guide_on_this_decoder_minus_encoder_elbo"] = mean_se(lap_ls - elbo)
    else:
        rep["mode_offset"] = mean_se(mahalanobis(q_loc - exact["mode"], exact["cov"]))
        z_star, tril = laplace_q(model, x, exact["mode"].float(), num_steps=0)
        rep["laplace_at_mode_elbo"] = mean_se(gaussian_elbo(model, x, z_star, tril, s["elbo_particles"]))
        rep["laplace_at_mode_logdet_ratio"] = mean_se(
            2 * tril.double().diagonal(dim1=-2, dim2=-1).log().sum(-1) - torch.logdet(exact["cov"])
        )
        rep["mode_to_mean_offset"] = mean_se(mahalanobis(exact["mode"] - exact["mean"], exact["cov"]))
    rep["seconds"] = round(time.perf_counter() - t0, 1)
    return rep, {"log_px": lp, "is": ll_is, "elbo": elbo}


def main(argv=None):
    ap = parser(__doc__, seeds="0")
    ap.add_argument("--epochs", type=int, default=None, help="training epochs (default: 20 full, 2 quick)")
    ap.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated, from {', '.join(RUNS)}; vae first")
    args = start(ap, argv)
    seed = one_seed(args)
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    if not runs or runs[0] != "vae" or any(r not in RUNS for r in runs):
        ap.error(f"--runs must start with vae and name runs from {RUNS}, got {args.runs!r}")
    if args.epochs is not None and args.epochs < 1:
        ap.error(f"--epochs must be a positive integer, got {args.epochs}")
    s = dict(QUICK if args.quick else FULL)
    if args.epochs is not None:
        s["epochs"] = args.epochs
    data = load_data("fashion_mnist", pixels="binary_dynamic", limit=s["limit"], seed=0)
    tc = TrainConfig(objective="elbo", epochs=s["epochs"], batch_size=100, lr=1e-3)
    x = data.test_x[: s["n"]]
    out, per = {"by_run": {}}, {}
    for run in runs:
        t0 = time.perf_counter()
        model, hist = train(
            "laplace" if run == "laplace_detached" else run,
            data,
            tc,
            seed,
            latent=LATENT,
            prepare=detach_decoder_in_guide if run == "laplace_detached" else None,
        )
        train_s = time.perf_counter() - t0
        # the matrix form of log p(x|z) used on the grid must be the model's own likelihood
        with torch.no_grad():
            z = torch.randn(3, 4, LATENT)
            ref = (
                model.likelihood(model.decoder(z.reshape(-1, LATENT)), event_dim=x.dim() - 1)
                .log_prob(x[:4].repeat(3, *([1] * (x.dim() - 1))))
                .reshape(3, 4)
            )
            mine = log_joint(model, x[:4], z) + 0.5 * (z**2).sum(-1) + math.log(2 * math.pi)
            assert torch.allclose(ref, mine, atol=1e-3), "grid likelihood differs from the model's"
        rep, per[run] = evaluate(run, model, x, s)
        rep["train_seconds"] = round(train_s, 1)
        rep["seconds_per_epoch"] = round(statistics.mean(h["seconds"] for h in hist), 3)
        rep["final_train_elbo"] = round(hist[-1]["train_elbo"], 3)
        rep["final_val_elbo"] = round(hist[-1]["val_elbo"], 3)
        rep["train_elbo_by_epoch"] = [round(h["train_elbo"], 2) for h in hist]
        out["by_run"][run] = rep
        print(
            f"[{run}] exact log p(x) {rep['exact_log_px'][0]:.3f}  ELBO {rep['elbo'][0]:.3f}  "
            f"KL(q||p) {rep['kl_q_posterior'][0]:.3f}",
            flush=True,
        )
    out["minus_vae"] = {
        run: {k: [round(v, 3) for v in paired(per[run][k], per["vae"][k])] for k in ("log_px", "is", "elbo")}
        for run in runs
        if run != "vae"
    }
    out["test_ll_exact"] = {run: out["by_run"][run]["exact_log_px"][0] for run in out["by_run"]}
    out.update(
        {
            "training_seed": seed,
            "data": {
                "name": "fashion_mnist",
                "pixels": "binary_dynamic",
                "limit": s["limit"],
                "train": len(data.train_x),
                "test_images": len(x),
            },
            "sizes": {
                "latent_dim": LATENT,
                "hidden": [200, 200],
                "epochs": s["epochs"],
                "batch_size": 100,
                "lr": 1e-3,
                "ll_num_samples": s["S"],
                "grid": f"{s['grid']}x{s['grid']} on [-{s['radius']}, {s['radius']}]^2",
                "laplace_options": {"num_steps": 4, "damping": "vlae"},
                "laplace_ls_options": {"num_steps": 4, "damping": "line_search"},
            },
        }
    )
    finish("laplace_2d", out, args, device="cpu")


if __name__ == "__main__":
    main()
