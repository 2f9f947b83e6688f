"""MMVAE's training step against a hand-written stratified IWAE on the same networks: what the Pyro program and
:class:`~ppl_vae.infer.stratified.StratifiedIWAE` cost over the plain PyTorch code of the same objective.

Rows (medians over interleaved rounds, one torch thread): for each estimator (``iwae``, ``dreg``) and K,

  library_over_hand        the library's step ÷ the hand-written step (≤ 1.05: the issue's target)
  loop_over_hand           the same with the strata one Pyro pass each (``vectorize_strata=False``, before)
  step_seconds             seconds per step of each
  fixed_ms                 library − hand in ms at tiny sizes (2×2-pixel modalities, 8 hidden units, 4 latents),
                           where the tensor work is negligible: the per-step cost of Pyro's trace, independent of
                           the networks' sizes

The library's step is the one ``ppl_vae.train`` takes without its bookkeeping (``bench/_common.library_step``:
``elbo.loss_and_grads`` + Adam, Pyro's checks off). The hand-written step (:func:`hand_loss`) uses the model's own
expert and decoder modules and an Adam over the same parameters, and computes the same objective: each expert once,
then for every modality m at once (one pass of each decoder over the M·K draws), K draws z ~ q_m(z | x_m)
(reparameterised),

    log w = log p(z) + Σ_n log p(x_n | z) − log((1/M) Σ_m' q_m'(z | x_m')),
    loss  = −(N/B) Σ_i (1/M) Σ_m logmeanexp_K log w,

with the exact gradient (``iwae``) or Tucker et al.'s doubly reparameterised one (``dreg``: log q with the experts'
parameters detached, the draws' gradients times the normalised weights, the surrogate Σ_k sg(w̃) log w). Before
timing, the script checks that at the same weights and the same RNG draws the two give the same loss and the same
gradients to float rounding (``check``: in float64 to 1e-10 relative, in float32 to 1e-3, where the normalised
weights of log-weights near −1600 round), so the timing compares equal work.

Model: ``mmvae`` on PolyFashion's layout (3 × 784 Bernoulli pixels), MLP experts and decoders with one hidden layer
of 256, 16 latents, batch 100, N = 60000; data: random binary images (timing does not depend on pixel values).

    python bench/mmvae_cost.py            # full: 11 rounds of 16 steps per row
    python bench/mmvae_cost.py --quick    # 5 rounds of 10 steps
    python bench/mmvae_cost.py --profile  # cProfile of the library's dreg step (K = 4), top entries
The last line of stdout is the JSON summary (full mode also writes bench/results/mmvae_cost.json).
"""

from __future__ import annotations

import copy
import math

import pyro
import torch
from _common import finish, interleaved, library_step, parser, start

from ppl_vae import ModelConfig, build_model, plan_for
from ppl_vae.config import TrainConfig
from ppl_vae.data.multimodal import Layout

BATCH, M, NUM_DATA = 100, 3, 60000
COMMON = dict(latent_dim=16, hidden=[256], arch="mlp", likelihood="bernoulli")


def build(hidden=(256,), latent_dim: int = 16, modalities: int = M, num_data: int = NUM_DATA, shape=(1, 28, 28)):
    pyro.clear_param_store()
    layout = Layout(tuple(f"m{i}" for i in range(modalities)), (tuple(shape),) * modalities, ("image",) * modalities)
    cfg = ModelConfig(name="mmvae", **{**COMMON, "latent_dim": latent_dim, "hidden": list(hidden)})
    return build_model(cfg, layout, num_data=num_data)


def library_objective(model, K: int, estimator: str, vectorize_strata: bool = True):
    """The objective ``ppl_vae.train`` builds for ``model`` (its strata in one pass); ``vectorize_strata=False``
    runs them one pass each, as before."""
    objective = plan_for(model).objective(TrainConfig(objective="iwae", num_particles=K, estimator=estimator))
    objective.vectorize_strata = vectorize_strata
    return objective


def hand_loss(
    model, x: torch.Tensor, K: int, estimator: str, draws: str = "joint"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(the differentiable loss, its value) of the stratified IWAE of ``model`` (an MMVAE of Bernoulli image
    modalities of one shape, every modality observed) written in plain PyTorch on the model's modules, every
    stratum at once (one pass of each decoder over the M·K draws of a datapoint). The draws are
    ``torch.randn(M·K, B, D)`` (``draws="joint"``, as the library's one-pass guide makes them) or
    ``torch.randn(K, B, D)`` per modality in order (``"per_stratum"``, as its one-pass-per-stratum guide does)."""
    B, n_mod, shape = x.shape[0], model.layout.num_modalities, model.layout.shapes[0]
    size, event = math.prod(shape), tuple(range(-len(shape), 0))
    xs = [x[:, m * size : (m + 1) * size].reshape(B, *shape) for m in range(n_mod)]
    experts = [enc(xm) for enc, xm in zip(model.encoders, xs, strict=True)]
    locs = torch.stack([e[0] for e in experts], -2)  # (B, M, D)
    scales = torch.stack([e[1] for e in experts], -2)
    D = locs.shape[-1]
    if draws == "joint":
        eps = torch.randn(n_mod * K, B, D).reshape(n_mod, K, B, D)
    else:
        eps = torch.stack([torch.randn(K, B, D) for _ in range(n_mod)])
    # stratum m draws from expert m: (M, K, B, D), flattened to M·K particles
    z = (locs.transpose(0, 1).unsqueeze(1) + scales.transpose(0, 1).unsqueeze(1) * eps).reshape(n_mod * K, B, D)
    dreg = estimator == "dreg"
    q_locs, q_scales = (locs.detach(), scales.detach()) if dreg else (locs, scales)
    z_in = z
    if dreg:
        z_in = z.view_as(z)
        z_in.register_hook(_times_weights_hook(holder := {}))
    log_pz = _normal(torch.zeros(()), torch.ones(())).log_prob(z_in).sum(-1)
    log_q = _normal(q_locs, q_scales).log_prob(z_in.unsqueeze(-2)).sum(-1)  # (M·K, B, M)
    log_w = log_pz - (torch.logsumexp(log_q, -1) - math.log(n_mod))
    for n in range(n_mod):
        logits = model.decoders[n](z_in)
        log_w = log_w + torch.distributions.Bernoulli(logits=logits, validate_args=False).log_prob(xs[n]).sum(event)
    log_w = log_w.reshape(n_mod, K, B)
    scale = model.num_data / B
    bound = scale * (torch.logsumexp(log_w, 1) - math.log(K)).sum() / n_mod
    if not dreg:
        return -bound, -bound.detach()
    w = torch.softmax(log_w.detach(), 1)
    holder["w"] = w.reshape(n_mod * K, B, 1)
    sur = scale * (w * log_w).sum() / n_mod
    return -(bound.detach() + sur - sur.detach()), -bound.detach()


def _normal(loc, scale):
    return torch.distributions.Normal(loc, scale, validate_args=False)  # no argument checks, as the library's step


def _times_weights_hook(holder: dict):
    return lambda grad: grad * holder["w"]


def hand_step(model, K: int, estimator: str, lr: float = 1e-3):
    opt = torch.optim.Adam(model.parameters(), lr=lr)

    def step(x):
        loss, value = hand_loss(model, x, K, estimator)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(value)

    return step


def _grads(model) -> list[torch.Tensor]:
    out = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return out


def check(
    model, x: torch.Tensor, K: int, estimator: str, seed: int = 0, dtype=torch.float64, vectorize_strata: bool = True
) -> dict:
    """The library's and the hand-written loss and gradients at the weights of ``model`` (a copy in ``dtype``) and
    the same RNG draws: {"loss_rel_diff": |Δ loss| / |loss|, "grad_rel_diff": max over parameters of
    ‖Δ g‖ / ‖g‖}. ``vectorize_strata=False`` checks the library's one-pass-per-stratum objective."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        return _check(copy.deepcopy(model).to(dtype), x.to(dtype), K, estimator, seed, vectorize_strata)
    finally:
        torch.set_default_dtype(old)


def _check(model, x, K, estimator, seed, vectorize_strata) -> dict:
    model.zero_grad(set_to_none=True)
    elbo = library_objective(model, K, estimator, vectorize_strata)
    torch.manual_seed(seed)
    with pyro.validation_enabled(False):
        lib = elbo.loss_and_grads(model.model, model.guide, x)
    g_lib = _grads(model)
    torch.manual_seed(seed)
    loss, value = hand_loss(model, x, K, estimator, "joint" if vectorize_strata else "per_stratum")
    loss.backward()
    g_hand = _grads(model)
    grad_diff = max(float((a - b).norm() / b.norm().clamp_min(1e-30)) for a, b in zip(g_lib, g_hand, strict=True))
    return {"loss_rel_diff": abs(lib - float(value)) / abs(float(value)), "grad_rel_diff": grad_diff}


def profile(K: int = 4, estimator: str = "dreg", steps: int = 50, top: int = 30) -> None:
    import cProfile
    import pstats

    model = build()
    step = library_step(model, library_objective(model, K, estimator))
    batches = [torch.rand(BATCH, M * 784).bernoulli() for _ in range(steps)]
    for x in batches[:3]:
        step(x)
    prof = cProfile.Profile()
    prof.enable()
    for x in batches:
        step(x)
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(top)
    pstats.Stats(prof).sort_stats("cumulative").print_stats(top)


def fixed_cost_ms(K: int, estimator: str, rounds: int) -> dict:
    """Milliseconds per step of the library's and the hand-written step at tiny sizes, and their difference."""
    torch.manual_seed(1)
    model = build(hidden=(8,), latent_dim=4, shape=(1, 2, 2))
    xs = [torch.rand(BATCH, M * 4).bernoulli() for _ in range(20)]
    lib, hand = library_step(model, library_objective(model, K, estimator)), hand_step(model, K, estimator)
    for x in xs[:3]:
        lib(x)
        hand(x)
    _, t_lib, t_hand, _ = interleaved(lib, hand, xs, rounds)
    return {
        "library": round(t_lib * 1e3, 3),
        "hand": round(t_hand * 1e3, 3),
        "difference": round((t_lib - t_hand) * 1e3, 3),
    }


def main(argv=None) -> dict:
    ap = parser(__doc__, seeds=None, threads=1)
    ap.add_argument("--particles", default="1,4", help="comma-separated K (default 1,4)")
    ap.add_argument("--estimators", default="iwae,dreg", help="comma-separated estimators (default iwae,dreg)")
    ap.add_argument("--profile", action="store_true", help="print a cProfile of the library's dreg step and stop")
    args = start(ap, argv)
    if args.profile:
        profile()
        return {}
    rounds, steps = (5, 10) if args.quick else (11, 16)
    torch.manual_seed(0)
    batches = [torch.rand(BATCH, M * 784).bernoulli() for _ in range(steps)]
    rows, checks = {}, {}
    for estimator in args.estimators.split(","):
        for K in map(int, args.particles.split(",")):
            name = f"{estimator}_K{K}"
            model = build()
            checks[name] = {
                "float64": check(model, batches[0], K, estimator),
                "float32": check(model, batches[0], K, estimator, dtype=torch.float32),
            }
            if max(checks[name]["float64"].values()) > 1e-10 or max(checks[name]["float32"].values()) > 1e-3:
                raise SystemExit(f"{name}: the hand-written step does not compute our objective: {checks[name]}")
            lib = library_step(model, library_objective(model, K, estimator))
            loop = library_step(model, library_objective(model, K, estimator, vectorize_strata=False))
            hand = hand_step(model, K, estimator)
            for x in batches[:3]:  # warm-up
                lib(x)
                loop(x)
                hand(x)
            ratio, t_lib, t_hand, ratios = interleaved(lib, hand, batches, rounds)
            ratio_loop, t_loop, _, _ = interleaved(loop, hand, batches, rounds)
            rows[name] = {
                "library_over_hand": round(ratio, 4),
                "loop_over_hand": round(ratio_loop, 4),
                "step_seconds": {"library": round(t_lib, 5), "loop": round(t_loop, 5), "hand": round(t_hand, 5)},
                "rounds": [round(r, 4) for r in ratios],
                "fixed_ms": fixed_cost_ms(K, estimator, rounds),
            }
    result = {
        "settings": {"rounds": rounds, "steps": steps, "batch": BATCH, "modalities": M, "num_data": NUM_DATA, **COMMON},
        "rows": rows,
        "checks": checks,
        "target": 1.05,
    }
    return finish("mmvae_cost", result, args)


if __name__ == "__main__":
    main()
