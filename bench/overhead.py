"""The library's training path against the same work written by hand, side by side (issue 14's table).

Rows (each a median over interleaved rounds of the per-round ratio, one torch thread by default; CPU figures are
ratios only, a GPU run adds absolute milliseconds):

  ratio_pyro_over_torch      ``ppl_vae.train``'s epoch (quiet, no validation set) ÷ the same epoch in plain PyTorch:
                             the same modules (Burda et al.'s 784-200-200-50 tanh MLP, Bernoulli likelihood), batches
                             and estimator (the default objective: the ELBO with the KL in closed form), one
                             ``torch.optim.Adam``; batch 100, 256 and 1024
  ratio_sampled_kl_over_torch  the same with ``train.objective: elbo`` (every term sampled, Pyro's Trace_ELBO) against
                             hand-written sampled-KL steps
  ratio_jit_over_torch       the same with ``train.jit: true`` (``train.objective: elbo``)
  ratio_compile_over_torch   the default objective with ``train.compile: true`` (the objective traced once through
                             the Pyro program and compiled) ÷ the hand-written eager step, batch 100;
                             ``ratio_torch_compiled_over_torch``: the hand-written step with its whole loss under
                             torch.compile ÷ the eager one; ``ratio_compile_over_torch_compiled``: ``train.compile``
                             ÷ that compiled hand step (each side's compilation falls in the dropped warm-up round)
  *_over_torch_fused_adam    the default objective and ``train.compile`` ÷ the hand-written eager step with
                             ``torch.optim.Adam(fused=True)``, the optimiser ``ppl_vae.train`` runs (batch 100): how
                             much of each ratio is the optimiser
  ratio_svi_over_torch       ``pyro.infer.SVI`` + ``pyro.optim.Adam`` + ``Trace_ELBO`` (plain Pyro, one optimiser
                             per tensor) ÷ the hand-written sampled-KL step
  fit_epoch_over_bare        ``ppl_vae.train``'s epoch quiet / with the progress bar / with checkpoints ÷ a bare loop of
                             the same steps (``elbo.loss_and_grads`` + Adam), batch 100
  laplace_step_over_vae      a ``vlae`` epoch ÷ a ``vae`` epoch (784-200-200-16 ReLU MLP, batch 100)
  gap_ms                     library − hand-written, ms per step, default objective, per batch size
  fixed_ms                   the same at tiny sizes (2 × 2 images, 8 hidden units, 2 latents, batch 100), where the
                             tensor work vanishes: the library's per-step cost that does not grow with the networks

Data: random binary 28×28 images (timing does not depend on pixel values). Every row runs with denormal floats
flushed to zero on the CPU, on both sides, as ``ppl_vae.train`` trains (``train.flush_denormal``). ``--profile``
prints the top entries of a cProfile of ``ppl_vae.train`` steps instead (no JSON). IWAE, DReG and
``log_likelihood`` against hand-written code: ``bench/iwae_speed.py``.

    python bench/overhead.py            # full: 15 rounds, 20 steps each
    python bench/overhead.py --quick    # 5 rounds
    python bench/overhead.py --profile  # where the time goes
"""

from __future__ import annotations

import contextlib
import cProfile
import dataclasses
import io
import os
import pstats
import statistics
import tempfile

import pyro
import pyro.optim
import torch
import torch.distributions as td
from _common import (
    finish,
    interleaved,
    library_step,
    one_seed,
    parser,
    start,
    time_calls,
)
from pyro.infer import SVI, Trace_ELBO

import ppl_vae
from ppl_vae import ModelConfig, TrainConfig, build_model, plan_for
from ppl_vae.data import DataBundle
from ppl_vae.nn.device import flush_denormals

STEPS = 20


def vae(arch="burda1", latent=16, hidden=(200, 200), name="vae", num_data=60000, device="cpu"):
    pyro.clear_param_store()
    cfg = ModelConfig(name=name, arch=arch, latent_dim=latent, hidden=list(hidden), activation="relu")
    return build_model(cfg, (1, 28, 28), num_data=num_data).to(device)


def images(n, seed, device):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 28, 28, generator=g).bernoulli(generator=g).to(device)


def torch_step(model, analytic: bool, compiled: bool = False, fused: bool = False):
    """One hand-written step of the library VAE's estimator on the same modules; ``compiled``: its loss — networks,
    sampling, likelihood and KL, the likelihood's argument checks off — under ``torch.compile`` (backward through the
    compiled graph, the same Adam); ``fused``: ``torch.optim.Adam(fused=True)`` (as ``ppl_vae.train``) instead of
    the default ``torch.optim.Adam``."""
    params = list(model.encoder.parameters()) + list(model.decoder.parameters())
    opt = torch.optim.Adam(params, lr=1e-3, fused=True if fused else None)
    n = model.num_data

    def loss_fn(x):
        loc, scale = model.encoder(x)
        z = loc + scale * torch.randn_like(loc)
        log_px = td.Bernoulli(logits=model.decoder(z), validate_args=False if compiled else None)
        log_px = log_px.log_prob(x).flatten(1).sum(-1)
        if analytic:
            kl = 0.5 * (scale.pow(2) + loc.pow(2) - 1 - 2 * scale.log()).sum(-1)
        else:
            kl = td.Normal(loc, scale).log_prob(z).sum(-1) - td.Normal(0.0, 1.0).log_prob(z).sum(-1)
        return -(n / len(x)) * (log_px - kl).sum()

    loss_of = torch.compile(loss_fn) if compiled else loss_fn

    def step(x):
        loss = loss_of(x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def laplace_floor_step(model, lr: float = 1e-3):
    """The floor of a Laplace-guide step (T = ``model.num_steps``): the T + 1 Jacobians of the decoder and their
    Gauss–Newton precisions Jᵀ diag(w) J at the encoder's mean, with the backward of their sum and one Adam step —
    what any implementation of the T + 1 precisions the guide needs must do — without the Newton solves, the
    Cholesky factors, the likelihood of the sample and Pyro's trace."""
    from ppl_vae.guides.laplace import _jacobian_t, _precision_terms, relu_mlp_layers

    opt = torch.optim.Adam(model.parameters(), lr=lr)
    layers = relu_mlp_layers(model.decoder)

    def fn(z):
        return model.decoder(z).reshape(z.shape[0], -1)

    def step(x):
        opt.zero_grad(set_to_none=True)
        mu, x_flat, total = model.encoder(x, None), x.reshape(x.shape[0], -1), 0.0
        for _ in range(model.num_steps + 1):
            Jt, out = _jacobian_t(fn, mu, layers, None)
            prec, vec = _precision_terms(x_flat, out, Jt, "bernoulli", 1.0)
            total = total + prec.sum() + vec.sum()
        total.backward()
        opt.step()

    return step


def svi_step(model):
    svi = SVI(model.model, model.guide, pyro.optim.Adam({"lr": 1e-3}), Trace_ELBO(max_plate_nesting=1))
    return svi.step


def train_epochs(model, xs, tc, rounds, hook, **kw):
    """``ppl_vae.train`` for ``rounds`` + 1 epochs over the batches ``xs`` (same order each epoch); ``hook(epoch,
    seconds)`` runs after each epoch (the other side of the comparison runs there: interleaved rounds)."""
    data = DataBundle.from_tensors(torch.cat(xs).cpu())
    cfg = dataclasses.replace(tc, epochs=rounds + 1, batch_size=len(xs[0]))
    plan = plan_for(model)
    original = plan.on_epoch_end

    def on_epoch_end(epoch, record, d):
        original(epoch, record, d)
        hook(epoch, record["seconds"])

    plan.on_epoch_end = on_epoch_end
    ppl_vae.train(model, data, cfg, plan=plan, device=xs[0].device, **kw)


def ratio_vs(model, other_step, xs, tc, rounds, **kw) -> tuple[float, float, float, float, float]:
    """(median ratio train-epoch ÷ other-epoch, min, max, median seconds per step of the library, of the other)
    over rounds, the first (warm-up) round dropped."""
    ratios, mine, theirs = [], [], []

    def hook(epoch, seconds):
        other = time_calls(other_step, xs) * len(xs)
        if epoch > 0:
            ratios.append(seconds / other)
            mine.append(seconds / len(xs))
            theirs.append(other / len(xs))

    train_epochs(model, xs, tc, rounds, hook, **kw)
    return statistics.median(ratios), min(ratios), max(ratios), statistics.median(mine), statistics.median(theirs)


def fixed_cost_ms(tc, rounds: int, device, analytic: bool) -> dict:
    """Milliseconds per step of ``ppl_vae.train``'s epoch and of the hand-written step at tiny sizes (2 × 2 images,
    8 hidden units, 2 latents, batch 100), and their difference: the per-step work of the library (Pyro's trace,
    the objective's bookkeeping) that does not grow with the networks."""
    pyro.clear_param_store()
    cfg = ModelConfig(name="vae", arch="mlp", latent_dim=2, hidden=[8], activation="relu")
    model = build_model(cfg, (1, 2, 2), num_data=60000).to(device)
    g = torch.Generator().manual_seed(0)
    xs = [torch.rand(100, 1, 2, 2, generator=g).bernoulli(generator=g).to(device) for _ in range(STEPS)]
    _, _, _, mine, theirs = ratio_vs(model, torch_step(model, analytic), xs, tc, rounds, progress=False)
    return {
        "library": round(mine * 1e3, 3),
        "hand": round(theirs * 1e3, 3),
        "difference": round((mine - theirs) * 1e3, 3),
    }


def pair_ratio(step_a, step_b, xs, rounds) -> tuple[float, float, float, float]:
    """(median ratio a ÷ b, min, max, median seconds per step of a) over interleaved rounds, after a warm-up."""
    time_calls(step_a, xs[:3]), time_calls(step_b, xs[:3])
    ratio, ta, _, ratios = interleaved(step_a, step_b, xs, rounds)
    return ratio, min(ratios), max(ratios), ta


def _r(t):
    return {"median": round(t[0], 3), "min": round(t[1], 3), "max": round(t[2], 3)}


def profile(args, device):
    torch.manual_seed(0)
    xs = [images(100, k, device) for k in range(STEPS)]
    model = vae(device=device)
    prof = cProfile.Profile()
    data = DataBundle.from_tensors(torch.cat(xs).cpu())
    prof.enable()
    ppl_vae.train(model, data, TrainConfig(epochs=5, batch_size=100), progress=False, device=device)
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(35)
    print(out.getvalue())


def main(argv=None):
    ap = parser(__doc__, seeds="0", threads=1)
    ap.add_argument("--profile", action="store_true", help="print a cProfile of ppl_vae.train steps (no JSON)")
    args = start(ap, argv)
    seed = one_seed(args)
    device = torch.device(args.device)
    if args.profile:
        return profile(args, device)
    with flush_denormals(device.type == "cpu"):  # both sides' arithmetic as ppl_vae.train's (it flushes on a CPU)
        return _main(args, seed, device)


def _main(args, seed: int, device):
    rounds = 5 if args.quick else 15
    out = {
        "ratio_pyro_over_torch": {},
        "ratio_sampled_kl_over_torch": {},
        "ratio_jit_over_torch": {},
        "ratio_svi_over_torch": {},
        "sec_per_step_torch": {},
        "gap_ms": {},
        "fit_epoch_over_bare": {},
        "rounds": rounds,
        "steps_per_round": STEPS,
        "model": "burda1 MLP 784-200-200-50 tanh, Bernoulli, Adam 1e-3",
        "estimators": {
            "ratio_pyro_over_torch": "default objective (auto: closed-form KL) vs hand-written closed-form KL",
            "others": "sampled KL on both sides",
        },
    }
    quiet = dict(progress=False)
    for batch in (100, 256, 1024):
        key = f"{device.type}_b{batch}"
        pyro.set_rng_seed(seed)
        xs = [images(batch, seed * 1000 + k, device) for k in range(STEPS)]
        m = vae(device=device)
        r = ratio_vs(m, torch_step(m, True), xs, TrainConfig(), rounds, **quiet)
        out["ratio_pyro_over_torch"][key] = _r(r)
        out["gap_ms"][key] = round((r[3] - r[4]) * 1e3, 3)  # library − hand-written, ms per step
        m = vae(device=device)
        out["ratio_sampled_kl_over_torch"][key] = _r(
            ratio_vs(m, torch_step(m, False), xs, TrainConfig(objective="elbo"), rounds, **quiet)
        )
        m = vae(device=device)
        out["ratio_jit_over_torch"][key] = _r(
            ratio_vs(m, torch_step(m, False), xs, TrainConfig(objective="elbo", jit=True), rounds, **quiet)
        )
        m, m2 = vae(device=device), vae(device=device)
        r = pair_ratio(svi_step(m), torch_step(m2, False), xs, rounds)
        out["ratio_svi_over_torch"][key] = _r(r)
        out["sec_per_step_torch"][key] = round(pair_ratio(torch_step(m2, False), torch_step(m2, False), xs, 1)[3], 5)
        if device.type == "cuda":
            out.setdefault("ms_per_step_library", {})[key] = round(
                1000 * pair_ratio(library_step(m, Trace_ELBO(max_plate_nesting=1)), torch_step(m2, False), xs, 3)[3], 3
            )
    # torch.compile at batch 100 (the target's): train.compile, and the hand-written step compiled whole
    pyro.set_rng_seed(seed)
    xs = [images(100, seed * 1000 + k, device) for k in range(STEPS)]
    key = f"{device.type}_b100"
    m = vae(device=device)
    out["ratio_compile_over_torch"] = {
        key: _r(ratio_vs(m, torch_step(m, True), xs, TrainConfig(compile=True), rounds, **quiet))
    }
    m, m2 = vae(device=device), vae(device=device)
    out["ratio_torch_compiled_over_torch"] = {
        key: _r(pair_ratio(torch_step(m, True, compiled=True), torch_step(m2, True), xs, rounds))
    }
    m, m2 = vae(device=device), vae(device=device)
    out["ratio_compile_over_torch_compiled"] = {
        key: _r(ratio_vs(m, torch_step(m2, True, compiled=True), xs, TrainConfig(compile=True), rounds, **quiet))
    }
    m, m2 = vae(device=device), vae(device=device)
    out["ratio_pyro_over_torch_fused_adam"] = {
        key: _r(ratio_vs(m, torch_step(m2, True, fused=True), xs, TrainConfig(), rounds, **quiet))
    }
    m, m2 = vae(device=device), vae(device=device)
    out["ratio_compile_over_torch_fused_adam"] = {
        key: _r(ratio_vs(m, torch_step(m2, True, fused=True), xs, TrainConfig(compile=True), rounds, **quiet))
    }
    out["fixed_ms"] = {
        "default": fixed_cost_ms(TrainConfig(), rounds, device, analytic=True),
        "sampled_kl": fixed_cost_ms(TrainConfig(objective="elbo"), rounds, device, analytic=False),
    }
    # the epoch's bookkeeping: quiet, with the bar (to /dev/null), with checkpoints
    pyro.set_rng_seed(seed)
    xs = [images(100, seed * 1000 + k, device) for k in range(STEPS)]
    tc = TrainConfig(objective="elbo")
    m = vae(device=device)
    out["fit_epoch_over_bare"]["quiet"] = _r(
        ratio_vs(m, library_step(vae(device=device), Trace_ELBO(max_plate_nesting=1)), xs, tc, rounds, **quiet)
    )
    with open(os.devnull, "w") as sink, contextlib.redirect_stderr(sink):
        m = vae(device=device)
        out["fit_epoch_over_bare"]["progress_bar"] = _r(
            ratio_vs(
                m, library_step(vae(device=device), Trace_ELBO(max_plate_nesting=1)), xs, tc, rounds, progress=True
            )
        )
    with tempfile.TemporaryDirectory() as tmp:
        m = vae(device=device)
        out["fit_epoch_over_bare"]["checkpoints"] = _r(
            ratio_vs(
                m,
                library_step(vae(device=device), Trace_ELBO(max_plate_nesting=1)),
                xs,
                tc,
                rounds,
                progress=False,
                run_dir=tmp,
            )
        )
    # the Laplace guide's step against the VAE's (784-200-200-16 ReLU)
    lap, v = vae("mlp", name="vlae", device=device), vae("mlp", device=device)
    lap_elbo, vae_elbo = plan_for(lap).objective(tc), plan_for(v).objective(tc)
    out["laplace_step_over_vae"] = _r(
        pair_ratio(library_step(lap, lap_elbo), library_step(v, vae_elbo), xs[:5], max(3, rounds // 2))
    )
    lap2, v2 = vae("mlp", name="vlae", device=device), vae("mlp", device=device)
    out["laplace_floor_over_vae"] = _r(
        pair_ratio(laplace_floor_step(lap2), library_step(v2, plan_for(v2).objective(tc)), xs[:5], max(3, rounds // 2))
    )
    out["laplace_model"] = (
        "vlae (T = 4 damped steps) vs vae, MLP 784-200-200-16 ReLU, Bernoulli, batch 100; the floor: the T + 1 "
        "Jacobians and Gauss-Newton precisions with their backward and Adam, nothing else"
    )
    out["targets"] = {
        "ratio_pyro_over_torch": "<= 1.10 at batch 100, <= 1.05 at 256",
        "ratio_jit_over_torch": "<= 1.00",
        "ratio_compile_over_torch": "<= 0.90 at batch 100 on CPU (the measured floor otherwise)",
        "fit_epoch_over_bare.progress_bar": "<= 1.05",
        "laplace_step_over_vae": "<= 12",
    }
    finish("overhead", out, args)


if __name__ == "__main__":
    main()
