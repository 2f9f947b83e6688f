"""Speed of the importance-weighted objectives and of the log-likelihood estimate against the same computations
hand-written in plain PyTorch, on the same networks.

Networks: Burda et al.'s one-stochastic-layer MLP (``build_model(ModelConfig(name="vae", arch="burda1"), (1, 28,
28), num_data=60000)``: 784-200-200-50, tanh, Bernoulli likelihood); data: random binary 28×28 images (timing does
not depend on pixel values).

(a) ``iwae``: the library's training step with ``TraceIWAE(num_particles=K)`` (``loss_and_grads`` with Pyro's
    validation off, as ``ppl_vae.train`` runs every step after the first, and one ``torch.optim.Adam`` over the
    model's parameters) ÷ one hand-written IWAE step (z = μ + σ·ε for K particles, log w = log p(x|z) + log p(z) −
    log q(z|x), −(N/B) Σ_i logmeanexp_k log w, torch.optim.Adam), batch 100, K = 1, 5, 50. ``ratio_svi_*``: plain
    ``pyro.infer.SVI`` + ``pyro.optim.Adam`` (one optimiser per tensor, validation on) at K = 5.
(b) ``dreg``: the same with ``TraceIWAE(num_particles=K, estimator="dreg")`` ÷ a hand-written one-pass DReG step
(Tucker et al.
    2018): log q at the live z with detached μ, σ, and a tensor hook on the decoder's copy of z that multiplies its
    gradient by w̃, so the surrogate Σ w̃ log p(x, z) − Σ w̃² log q(z; sg φ) gives the decoder Σ w̃ ∇θ log p and the
    encoder Σ w̃² ∂log w/∂z ∂z/∂φ in one forward and one backward pass. K = 1, 5, 50.
(b') ``*_compile_*``: the same library steps as ``train.compile: true`` takes them (the objective and its backward
    traced once, compiled by inductor; Adam's fused kernel) ÷ the same hand-written eager steps.
(c) ``loglik``: ``ppl_vae.evaluate.log_likelihood`` with its default chunking ÷ a hand-written chunked loop with the
    *same* (batch_size, chunk_size) (the encoder once per batch, running logsumexp over chunks), S = 5000 samples on
    500 images (quick: S = 500 on 50); ``_all_samples``: ÷ a hand-written loop that draws all S samples of one image
    at once (100 images; quick: 20). Also the old rule (``max_elements=100_000``) ÷ the new default (50 images).
    Peak extra memory: the growth of the process's peak resident set (VmHWM, reset through /proc/self/clear_refs just
    before the call, minus VmRSS at that moment) in a fresh spawned process per variant (median of 3; glibc's heap
    makes it vary by ±10 MiB from run to run), after a small warm-up call (one image, 10 samples);
    torch's CPU allocator has no statistics and tracemalloc does not see it. Where /proc/self/clear_refs is missing
    the growth of ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` is used instead (a lower bound). Memory runs use 20
    images (the peak depends on the chunk, not on N; the old rule holds 20 × 5000 datapoint-samples at once).
    ``loglik_peak_live_mib``: the same with a fixed mmap threshold (``MALLOC_MMAP_THRESHOLD_=131072``), so that
    freed large blocks leave the RSS at once: the peak of the live tensors, deterministic.

(d) ``fixed_ms``: the library's and the hand-written cost at tiny sizes (2 × 2 images, 8 hidden units, 2 latents),
    where the tensor work vanishes: per training step (iwae, dreg at K = 1 and 5, batch 100) and per
    ``log_likelihood`` chunk (the plan of (c), one image and 1,149 samples per chunk): the library's cost that does
    not grow with the networks. ``gap_ms``: library − hand-written at the real sizes, per step and per chunk.

Every pair is timed side by side in one process, interleaved in rounds (A B, B A, ...); the figure is the median over
rounds of the per-round ratio. One torch thread by default (``--threads``).

    python bench/iwae_speed.py            # full: writes bench/results/iwae_speed.json
    python bench/iwae_speed.py --quick    # a small run; prints the JSON only
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import resource
import statistics
from pathlib import Path

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
from pyro.infer import SVI

from ppl_vae.config import ModelConfig
from ppl_vae.evaluate import log_likelihood
from ppl_vae.evaluate.likelihood import bytes_per_sample, plan_chunks
from ppl_vae.infer.iwae import TraceIWAE
from ppl_vae.models import build_model
from ppl_vae.training.compiled import TracedELBO

KS = (1, 5, 50)
BATCH = 100


def make_model(seed: int):
    pyro.clear_param_store()
    torch.manual_seed(seed)
    return build_model(ModelConfig(name="vae", arch="burda1"), (1, 28, 28), num_data=60000)


def images(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 28, 28, generator=g).bernoulli(generator=g)


# --------------------------------------------------------------------------------------------- hand-written steps
def hand_step_fn(model, K: int, dreg: bool):
    """One IWAE (``dreg=False``) or one-pass DReG step on the model's encoder and decoder, in plain PyTorch."""
    params = list(model.encoder.parameters()) + list(model.decoder.parameters())
    opt = torch.optim.Adam(params, lr=1e-3)
    N = model.num_data

    def step(x):
        opt.zero_grad()
        B = x.shape[0]
        loc, scale = model.encoder(x)
        z = loc + scale * torch.randn((K,) + loc.shape)
        zm = z.view_as(z) if dreg else z  # the decoder's copy of z (hooked for DReG)
        logits = model.decoder(zm)
        log_px = td.Bernoulli(logits=logits, validate_args=False).log_prob(x).flatten(-3).sum(-1)
        log_p = log_px + td.Normal(0.0, 1.0).log_prob(zm).sum(-1)
        if dreg:
            log_q = td.Normal(loc.detach(), scale.detach()).log_prob(z).sum(-1)
        else:
            log_q = td.Normal(loc, scale).log_prob(z).sum(-1)
        log_w = log_p - log_q
        bound = (N / B) * (torch.logsumexp(log_w, 0) - math.log(K)).sum()
        if dreg:
            w = torch.softmax(log_w.detach(), 0)
            zm.register_hook(lambda g: g * w.unsqueeze(-1))
            surrogate = (N / B) * ((w * log_p).sum() - (w.pow(2) * log_q).sum())
            loss = -(bound.detach() + surrogate - surrogate.detach())
        else:
            loss = -bound
        loss.backward()
        opt.step()
        return loss.item()

    return step


def library_step_fn(model, K: int, estimator: str):
    """The step ``ppl_vae.train`` takes with ``train.objective: iwae`` (``_common.library_step``)."""
    return library_step(model, TraceIWAE(num_particles=K, vectorize_particles=True, estimator=estimator))


def compiled_step_fn(model, K: int, estimator: str):
    """The step ``ppl_vae.train`` takes with ``train.compile: true``: ``TraceIWAE`` with its backward traced once
    and compiled (:class:`~ppl_vae.training.compiled.TracedELBO`, inductor) and Adam's fused kernel."""
    elbo = TracedELBO(TraceIWAE(num_particles=K, vectorize_particles=True, estimator=estimator), model)
    return library_step(model, elbo, fused=True)


def svi_step_fn(model, K: int, estimator: str):
    """Plain Pyro: ``SVI`` + ``pyro.optim.Adam`` (one optimiser per tensor) + ``TraceIWAE``, validation on."""
    elbo = TraceIWAE(num_particles=K, vectorize_particles=True, estimator=estimator)
    return SVI(model.model, model.guide, pyro.optim.Adam({"lr": 1e-3}), elbo).step


# --------------------------------------------------------------------------------------------- log-likelihood
@torch.no_grad()
def hand_log_likelihood(model, data, S: int, batch_size: int, chunk_size: int, seed: int = 0) -> torch.Tensor:
    """logmeanexp over S draws from q(z|x) of log p(x|z) + log p(z) − log q(z|x), in chunks, in plain PyTorch."""
    model.eval()
    torch.manual_seed(seed)
    out = []
    for start_ in range(0, data.shape[0], batch_size):
        xb = data[start_ : start_ + batch_size]
        loc, scale = model.encoder(xb)
        q = td.Normal(loc, scale)
        acc, done = None, 0
        while done < S:
            c = min(chunk_size, S - done)
            z = loc + scale * torch.randn((c,) + loc.shape)
            logits = model.decoder(z)
            log_w = (
                td.Bernoulli(logits=logits, validate_args=False).log_prob(xb).flatten(-3).sum(-1)
                + td.Normal(0.0, 1.0).log_prob(z).sum(-1)
                - q.log_prob(z).sum(-1)
            )
            s1 = torch.logsumexp(log_w.double(), 0)
            acc = s1 if acc is None else torch.logaddexp(acc, s1)
            done += c
        out.append((acc - math.log(S)).float())
    return torch.cat(out)


def default_plan(data, S):
    return plan_chunks(data.shape[0], S, bytes_per_sample=bytes_per_sample(data))


def _rss(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _memory_child(kind: str, seed: int, n: int, S: int, threads: int, queue) -> None:
    """In a fresh process: the peak RSS growth (bytes) of one log-likelihood call of ``kind``."""
    torch.set_num_threads(threads)
    model = make_model(seed).eval()
    x = images(n, seed + 1)

    def run(data, samples):
        if kind == "library":
            return log_likelihood(model.model, model.guide, data, num_samples=samples)
        if kind == "old_rule":
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                return log_likelihood(model.model, model.guide, data, num_samples=samples, max_elements=100_000)
        return hand_log_likelihood(model, data, samples, *default_plan(data, samples))

    run(x[:1], 10)  # warm-up: imports, lazy initialisations
    ru0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        method, before = "VmHWM", _rss("VmRSS")
    except OSError:
        method, before = "ru_maxrss", None
    run(x, S)
    if method == "VmHWM":
        peak = _rss("VmHWM") - before
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - ru0
    queue.put((method, peak))


def peak_extra_mib(
    kind: str, seed: int, n: int, S: int, threads: int, repeats: int, live: bool = False
) -> tuple[str, list]:
    """The peak RSS growth in MiB of ``repeats`` fresh processes (glibc's heap makes it vary from run to run).
    ``live``: with a fixed mmap threshold (MALLOC_MMAP_THRESHOLD_=131072), so that every large block goes back to
    the system when freed and the RSS follows the live tensors (deterministic)."""
    ctx = mp.get_context("spawn")
    peaks = []
    saved = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    try:
        if live:
            os.environ["MALLOC_MMAP_THRESHOLD_"] = "131072"  # read by the child's malloc at start-up
        for _ in range(repeats):
            queue = ctx.Queue()
            proc = ctx.Process(target=_memory_child, args=(kind, seed, n, S, threads, queue))
            proc.start()
            method, peak = queue.get(timeout=600)
            proc.join()
            peaks.append(round(peak / 2**20, 1))
    finally:
        if saved is None:
            os.environ.pop("MALLOC_MMAP_THRESHOLD_", None)
        else:
            os.environ["MALLOC_MMAP_THRESHOLD_"] = saved
    return method, peaks


# --------------------------------------------------------------------------------------------- main
def tiny_model(seed: int):
    pyro.clear_param_store()
    torch.manual_seed(seed)
    cfg = ModelConfig(name="vae", arch="mlp", latent_dim=2, hidden=[8], activation="relu")
    return build_model(cfg, (1, 2, 2), num_data=60000)


def fixed_costs(seed: int, rounds: int, steps: int, ll: tuple[int, int, int, int]) -> dict:
    """(d): ms per step / per chunk of the library and the hand-written code at tiny sizes, and the difference."""
    g = torch.Generator().manual_seed(seed)
    xs = [torch.rand(BATCH, 1, 2, 2, generator=g).bernoulli(generator=g) for _ in range(steps)]
    out = {}
    for est in ("iwae", "dreg"):
        for K in (1, 5):
            model = tiny_model(seed)
            lib, hand = library_step_fn(model, K, est), hand_step_fn(model, K, dreg=est == "dreg")
            time_calls(lib, xs[:2]), time_calls(hand, xs[:2])
            _, t_lib, t_hand, _ = interleaved(lib, hand, xs, rounds)
            out[f"{est}_K{K}"] = _ms(t_lib, t_hand)
    n, S, bs, cs = ll
    model = tiny_model(seed).eval()
    x = torch.rand(n, 1, 2, 2, generator=g).bernoulli(generator=g)
    chunks = math.ceil(n / bs) * math.ceil(S / cs)
    lib = lambda data: log_likelihood(model.model, model.guide, data, num_samples=S, batch_size=bs, chunk_size=cs)  # noqa: E731
    hand = lambda data: hand_log_likelihood(model, data, S, bs, cs)  # noqa: E731
    lib(x[:1]), hand(x[:1])
    _, t_lib, t_hand, _ = interleaved(lib, hand, [x], rounds)
    out["loglik_chunk"] = _ms(t_lib / chunks, t_hand / chunks)
    return out


def _ms(t_lib: float, t_hand: float) -> dict:
    return {
        "library": round(t_lib * 1e3, 3),
        "hand": round(t_hand * 1e3, 3),
        "difference": round((t_lib - t_hand) * 1e3, 3),
    }


def main(argv=None):
    ap = parser(__doc__, seeds="0", threads=1)
    args = start(ap, argv)
    seed = one_seed(args)
    if args.device != "cpu":
        ap.error("this study times the CPU (--device cpu)")
    quick = args.quick
    rounds, steps = (3, 4) if quick else (11, 10)
    ll_rounds, ll_n, ll_S, old_n, all_n = (3, 50, 500, 10, 20) if quick else (3, 500, 5000, 50, 100)
    out = {
        "model": "burda1 MLP 784-200-200-50 tanh, Bernoulli",
        "batch": BATCH,
        "rounds": rounds,
        "steps_per_round": steps,
        "ratio_iwae_over_handwritten": {},
        "ratio_dreg_over_handwritten": {},
        "ratio_iwae_compile_over_handwritten": {},
        "ratio_dreg_compile_over_handwritten": {},
        "sec_per_step": {},
        "per_round_ratios": {},
    }
    xs = [images(BATCH, seed + 10 + i) for i in range(steps)]
    for est, key in (("iwae", "ratio_iwae_over_handwritten"), ("dreg", "ratio_dreg_over_handwritten")):
        for K in KS:
            model = make_model(seed)
            lib, hand = library_step_fn(model, K, est), hand_step_fn(model, K, dreg=est == "dreg")
            time_calls(lib, xs[:2]), time_calls(hand, xs[:2])  # warm-up
            n = steps if K < 50 else max(2, steps // 2)
            ratio, t_lib, t_hand, per_round = interleaved(lib, hand, xs[:n], rounds)
            out[key][f"K{K}"] = round(ratio, 3)
            out["sec_per_step"][f"{est}_K{K}"] = {"library": t_lib, "handwritten": t_hand}
            out["per_round_ratios"][f"{est}_K{K}"] = [round(r, 3) for r in per_round]
        for K in KS:  # train.compile against the same hand-written eager step
            model = make_model(seed)
            lib, hand = compiled_step_fn(model, K, est), hand_step_fn(model, K, dreg=est == "dreg")
            time_calls(lib, xs[:2]), time_calls(hand, xs[:2])  # warm-up: the compilation
            n = steps if K < 50 else max(2, steps // 2)
            ratio, t_lib, t_hand, _ = interleaved(lib, hand, xs[:n], rounds)
            out[f"ratio_{est}_compile_over_handwritten"][f"K{K}"] = round(ratio, 3)
        model = make_model(seed)  # plain SVI, K = 5
        svi, hand = svi_step_fn(model, 5, est), hand_step_fn(model, 5, dreg=est == "dreg")
        time_calls(svi, xs[:2]), time_calls(hand, xs[:2])
        out[f"ratio_svi_{est}_over_handwritten"] = {"K5": round(interleaved(svi, hand, xs, rounds)[0], 3)}

    # (c) log-likelihood: library default chunking vs the same chunks hand-written
    model = make_model(seed).eval()
    x = images(ll_n, seed + 1)
    bs, cs = default_plan(x, ll_S)
    lib = lambda data: log_likelihood(model.model, model.guide, data, num_samples=ll_S)  # noqa: E731
    hand = lambda data: hand_log_likelihood(model, data, ll_S, bs, cs)  # noqa: E731
    hand_all = lambda data: hand_log_likelihood(model, data, ll_S, 1, ll_S)  # noqa: E731
    lib(x[:2]), hand(x[:2]), hand_all(x[:2])  # warm-up
    ratio, t_lib, t_hand, per_round = interleaved(lib, hand, [x], ll_rounds)
    ratio_all, _, t_hand_all, _ = interleaved(lib, hand_all, [x[:all_n]], ll_rounds)
    lp_lib, lp_hand = lib(x[:20]).double(), hand(x[:20]).double()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        old = lambda data: log_likelihood(  # noqa: E731
            model.model,
            model.guide,
            data,
            num_samples=ll_S,  # noqa: E731
            max_elements=100_000,
        )
        ratio_old, t_old, t_new, _ = interleaved(old, lib, [x[:old_n]], ll_rounds)
    mem = {
        kind: peak_extra_mib(kind, seed, 20, ll_S, args.threads, 1 if quick else 3)
        for kind in ("library", "handwritten", "old_rule")
    }
    live = {
        kind: peak_extra_mib(kind, seed, 20, ll_S, args.threads, 1, live=True)[1][0]
        for kind in ("library", "handwritten", "old_rule")
    }
    out.update(
        {
            "loglik_num_samples": ll_S,
            "loglik_num_images": ll_n,
            "loglik_plan": {"batch_size": bs, "chunk_size": cs},
            "ratio_loglik_over_handwritten": round(ratio, 3),
            "sec_loglik": {"library": t_lib, "handwritten": t_hand},
            "per_round_ratios_loglik": [round(r, 3) for r in per_round],
            "loglik_mean_first20": {"library": lp_lib.mean().item(), "handwritten": lp_hand.mean().item()},
            "ratio_loglik_over_handwritten_all_samples": round(ratio_all, 3),
            "loglik_all_samples_images": all_n,
            "ratio_loglik_old_rule_over_default": round(ratio_old, 3),
            "loglik_old_rule_images": old_n,
            "loglik_peak_extra_mib": statistics.median(mem["library"][1]),
            "loglik_peak_extra_mib_handwritten": statistics.median(mem["handwritten"][1]),
            "loglik_peak_extra_mib_old_rule": statistics.median(mem["old_rule"][1]),
            "loglik_peak_extra_mib_runs": {k: v[1] for k, v in mem.items()},
            "loglik_peak_live_mib": live,
            "loglik_memory_method": mem["library"][0] + " growth in fresh processes (median), 20 images",
        }
    )
    out["fixed_ms"] = fixed_costs(seed, rounds, steps, (20 if quick else 50, ll_S, bs, cs))
    chunks = math.ceil(ll_n / bs) * math.ceil(ll_S / cs)
    out["gap_ms"] = {
        **{
            name: round((t["library"] - t["handwritten"]) * 1e3, 3)
            for name, t in out["sec_per_step"].items()
            if name.endswith(("K1", "K5"))
        },
        "loglik_chunk": round((t_lib - t_hand) / chunks * 1e3, 3),
    }
    out["targets"] = {
        "iwae_K5_le_1.10": out["ratio_iwae_over_handwritten"]["K5"] <= 1.10,
        "dreg_K5_le_1.15": out["ratio_dreg_over_handwritten"]["K5"] <= 1.15,
        "dreg_K50_le_1.15": out["ratio_dreg_over_handwritten"]["K50"] <= 1.15,
        "loglik_le_1.0": out["ratio_loglik_over_handwritten"] <= 1.0,
        "loglik_peak_le_100MB": out["loglik_peak_extra_mib"] * 2**20 <= 100e6,
    }
    finish("iwae_speed", out, args, device="cpu")


if __name__ == "__main__":
    main()
