"""How cost grows (issue 37): epoch time with the data size, step time with the latent size and with K particles,
and ``log_likelihood``'s time and peak memory with S samples and with the image size — each with the slope of a
least-squares line through (log size, log cost), and one log-log figure per axis.

Rows (``axes[<axis>]``: the sizes, the median seconds, the slope; the time axes also an affine fit t = a + b·x
(least squares of relative residuals) and ``fixed_share``, a / t at the smallest size, the part of the cost that
does not grow):

  data        one ``ppl_vae.train`` epoch (quiet, no validation set, the second epoch of a 2-epoch run: the first
              runs Pyro's checks on its first step) vs N training images, batch 100 (N / 100 library steps)
  latent      one library step (``bench/_common.library_step``: ``elbo.loss_and_grads`` + Adam, the plan's default
              objective, the KL in closed form) vs the latent size, batch 100
  particles   the same step with ``train.objective: iwae``, ``train.num_particles`` K, latent 50, batch 100
  samples     ``ppl_vae.evaluate.log_likelihood`` (default chunking, 32 MiB budget) vs S (100 to 10,000), 100 images
              28×28; also its peak extra memory (``peak_mib``) and the (batch, chunk) ``plan_chunks`` chose
  image       the same vs the pixels D of the image (28×28, 56×56, 112×112; the MLP's input and output that size),
              S = 1000, 100 images

Model: the library's MLP VAE (``build_model(ModelConfig(name="vae", hidden=[200, 200], latent_dim=50))``: 784-200-
200-50 ReLU, Bernoulli likelihood), one torch thread; data: random binary images (timing does not depend on pixel
values). Step axes: interleaved rounds (sizes in alternating order), medians over rounds. Log-likelihood axes: each
point a fresh spawned process per repeat (median over repeats): build the model, one warm-up call (1 image, 10
samples), reset the peak resident set (``/proc/self/clear_refs``), time one call; ``peak_mib`` is VmHWM − VmRSS
just before the call (fallback without ``clear_refs``: the growth of ``ru_maxrss``, a lower bound). glibc's heap
keeps freed blocks, so ``peak_live_mib`` repeats the memory runs with ``MALLOC_MMAP_THRESHOLD_=131072`` (large
blocks go back to the system at once): the peak of the live tensors.

    python bench/cost_growth.py            # full: 3 epoch rounds, 9 step rounds of 10 steps, 3 repeats (17 min)
    python bench/cost_growth.py --quick    # fewer sizes, rounds and repeats, S = 200 on the image axis (1–2 min)
Full mode writes bench/results/cost_growth.json and bench/results/cost_growth_<axis>.png.
The last line of stdout is the JSON summary.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import resource
import statistics
import time
from pathlib import Path

import numpy as np
import pyro
import torch
from _common import RESULTS, finish, library_step, parser, start, time_calls

import ppl_vae
from ppl_vae import ModelConfig, TrainConfig, build_model, plan_for
from ppl_vae.data import DataBundle
from ppl_vae.evaluate import log_likelihood
from ppl_vae.evaluate.likelihood import DEFAULT_MAX_BYTES, bytes_per_sample, plan_chunks

BATCH, HIDDEN, LATENT, LL_IMAGES = 100, [200, 200], 50, 100
FULL = dict(
    data=[1000, 3000, 10000, 30000, 60000],
    latent=[2, 8, 32, 128, 512],
    particles=[1, 4, 16, 64],
    samples=[100, 300, 1000, 3000, 10000],
    image=[28, 56, 112],
    image_samples=1000,
    epoch_rounds=3,
    step_rounds=9,
    steps=10,
    repeats=3,
)
QUICK = dict(
    data=[1000, 3000, 10000],
    latent=[2, 32, 512],
    particles=[1, 4, 16],
    samples=[100, 1000],
    image=[28, 56],
    image_samples=200,
    epoch_rounds=2,
    step_rounds=3,
    steps=4,
    repeats=1,
)


def make_model(latent: int = LATENT, side: int = 28, seed: int = 0):
    pyro.clear_param_store()
    torch.manual_seed(seed)
    cfg = ModelConfig(name="vae", arch="mlp", hidden=list(HIDDEN), latent_dim=latent, likelihood="bernoulli")
    return build_model(cfg, (1, side, side), num_data=60000)


def images(n: int, side: int = 28, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, side, side, generator=g).bernoulli(generator=g)


def fit_slope(xs, ys) -> float | None:
    """Least-squares slope of log y on log x, over the points with y > 0 (None: fewer than two)."""
    keep = [(x, y) for x, y in zip(xs, ys, strict=True) if y > 0]
    if len(keep) < 2:
        return None
    return float(np.polyfit(np.log([x for x, _ in keep]), np.log([y for _, y in keep]), 1)[0])


def _round(v):
    return None if v is None else round(v, 3)


def affine(xs, ys) -> dict:
    """t = a + b·x by least squares of the relative residuals (every size weighs alike across the decades), and
    a / t at the smallest x (the share of the cost that does not grow)."""
    ys = np.asarray(ys, float)
    b, a = np.polyfit(np.asarray(xs, float), ys, 1, w=1 / ys)
    return {"a": float(a), "b": float(b), "fixed_share": float(a / ys[0])}


def summary(xs, per_size: dict, unit: str = "seconds") -> dict:
    med = [statistics.median(per_size[x]) for x in xs]
    out = {"sizes": list(xs), unit: med, "rounds": [per_size[x] for x in xs], "slope": fit_slope(xs, med)}
    if unit == "seconds":
        out["affine"] = affine(xs, med)
    return out


# ------------------------------------------------------------------------------------------------ time axes
def epoch_axis(sizes, rounds) -> dict:
    """Seconds of one ``ppl_vae.train`` epoch (the second of a 2-epoch run) per data size, interleaved rounds."""
    data = images(max(sizes), seed=1)
    per = {n: [] for n in sizes}
    for r in range(rounds):
        for n in sizes if r % 2 == 0 else sizes[::-1]:
            model = make_model(seed=r)
            cfg = TrainConfig(epochs=2, batch_size=BATCH, threads=1)
            res = ppl_vae.train(model, DataBundle.from_tensors(data[:n]), cfg, seed=r, progress=False)
            per[n].append(res.history[1]["seconds"])
    return summary(sizes, per)


def step_axis(makers: dict, steps: int, rounds: int) -> dict:
    """Seconds per library step for each size (``makers[size]()`` -> step), interleaved rounds after a warm-up."""
    sizes = list(makers)
    xs = [images(BATCH, seed=10 + k) for k in range(steps)]
    fns = {s: makers[s]() for s in sizes}
    for s in sizes:
        time_calls(fns[s], xs[:2])  # warm-up
    per = {s: [] for s in sizes}
    for r in range(rounds):
        for s in sizes if r % 2 == 0 else sizes[::-1]:
            per[s].append(time_calls(fns[s], xs))
    return summary(sizes, per)


def latent_step(latent: int):
    model = make_model(latent=latent)
    return library_step(model, plan_for(model).objective(TrainConfig()))


def particles_step(k: int):
    model = make_model()
    return library_step(model, plan_for(model).objective(TrainConfig(objective="iwae", num_particles=k)))


# ------------------------------------------------------------------------------------------------ log-likelihood
def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _ll_child(side: int, S: int, queue) -> None:
    """In a fresh process: (seconds, peak extra bytes, method) of one ``log_likelihood`` call."""
    torch.set_num_threads(1)
    model = make_model(side=side).eval()
    x = images(LL_IMAGES, side, seed=2)
    log_likelihood(model.model, model.guide, x[:1], num_samples=10)  # warm-up: lazy initialisations
    ru0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    try:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        method, before = "VmHWM", _status("VmRSS")
    except OSError:
        method, before = "ru_maxrss", None
    t0 = time.perf_counter()
    log_likelihood(model.model, model.guide, x, num_samples=S)
    seconds = time.perf_counter() - t0
    if method == "VmHWM":
        peak = _status("VmHWM") - before
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - ru0
    queue.put((seconds, peak, method))


def ll_point(side: int, S: int, live: bool) -> tuple[float, float, str]:
    """One fresh spawned process: (seconds, peak MiB, method); ``live``: with a fixed mmap threshold."""
    saved = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    try:
        if live:
            os.environ["MALLOC_MMAP_THRESHOLD_"] = "131072"  # read by the child's malloc at start-up
        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        proc = ctx.Process(target=_ll_child, args=(side, S, queue))
        proc.start()
        seconds, peak, method = queue.get(timeout=1200)
        proc.join()
    finally:
        if saved is None:
            os.environ.pop("MALLOC_MMAP_THRESHOLD_", None)
        else:
            os.environ["MALLOC_MMAP_THRESHOLD_"] = saved
    return seconds, peak / 2**20, method


def ll_axis(points: list[tuple[int, int]], sizes: list, repeats: int) -> dict:
    """Time and peak memory of ``log_likelihood`` at ``points`` [(side, S)], labelled by ``sizes``."""
    secs, peak, live = ({s: [] for s in sizes} for _ in range(3))
    methods = set()
    for r in range(repeats):
        order = list(zip(sizes, points, strict=True))
        for size, (side, S) in order if r % 2 == 0 else order[::-1]:
            t, p, m = ll_point(side, S, live=False)
            secs[size].append(t)
            peak[size].append(p)
            live[size].append(ll_point(side, S, live=True)[1])
            methods.add(m)
    out = summary(sizes, secs)
    mem, mem_live = summary(sizes, peak, "peak_mib"), summary(sizes, live, "peak_live_mib")
    out.update(
        peak_mib=mem["peak_mib"],
        peak_mib_rounds=mem["rounds"],
        peak_mib_slope=mem["slope"],
        peak_live_mib=mem_live["peak_live_mib"],
        peak_live_mib_rounds=mem_live["rounds"],
        peak_live_mib_slope=mem_live["slope"],
        memory_method=sorted(methods),
    )
    plans = []
    for side, S in points:
        b = bytes_per_sample(torch.zeros(1, 1, side, side))
        batch, chunk = plan_chunks(LL_IMAGES, S, bytes_per_sample=b)
        plans.append(
            {"batch_size": batch, "chunk_size": chunk, "bytes_per_sample": b, "budget_mib": b * batch * chunk / 2**20}
        )
    out["plan"] = plans
    return out


# ------------------------------------------------------------------------------------------------ figures
AXES = {
    "data": ("training images N", "seconds per epoch"),
    "latent": ("latent size", "seconds per step"),
    "particles": ("particles K (iwae)", "seconds per step"),
    "samples": ("samples S (100 images)", None),
    "image": ("pixels per image D", None),
}


def _panel(ax, xs, ys, slope, label, unit):
    xs, ys = np.asarray(xs, float), np.asarray(ys, float)
    xs, ys = xs[ys > 0], ys[ys > 0]  # a log axis shows positive values only
    (line,) = ax.loglog(xs, ys, "o", label=label)
    if slope is not None:
        intercept = np.mean(np.log(ys) - slope * np.log(xs))
        grid = np.geomspace(xs.min(), xs.max(), 50)
        ax.loglog(
            grid,
            np.exp(intercept) * grid**slope,
            "-",
            color=line.get_color(),
            alpha=0.6,
            label=f"fit, slope {slope:.2f}",
        )
    ax.set_ylabel(unit)


def figure(axis: str, res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xlabel, ylabel = AXES[axis]
    ll = ylabel is None
    fig, axes = plt.subplots(1, 2 if ll else 1, figsize=(9 if ll else 4.8, 3.6), squeeze=False)
    a = axes[0, 0]
    _panel(a, res["sizes"], res["seconds"], res["slope"], "median time", ylabel or "seconds per call")
    if ll:
        b = axes[0, 1]
        _panel(b, res["sizes"], res["peak_mib"], res["peak_mib_slope"], "peak RSS growth", "peak extra MiB")
        _panel(b, res["sizes"], res["peak_live_mib"], res["peak_live_mib_slope"], "peak live (mmap)", "peak extra MiB")
        b.set_xlabel(xlabel)
        b.legend(fontsize=7)
        b.set_title("log_likelihood peak memory", fontsize=9)
        a.set_title("log_likelihood time", fontsize=9)
    for ax in axes[0]:
        ax.set_xlabel(xlabel)
        ax.grid(True, which="both", alpha=0.3)
    a.legend(fontsize=7)
    fig.suptitle(f"cost_growth: {axis} (1 torch thread, 2-core CPU)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    args = start(parser(__doc__, seeds=None, threads=1), argv)
    if args.device != "cpu":
        args._parser.error("this study times the CPU (--device cpu)")
    s = QUICK if args.quick else FULL
    axes = {}
    axes["data"] = epoch_axis(s["data"], s["epoch_rounds"])
    axes["latent"] = step_axis({d: (lambda d=d: latent_step(d)) for d in s["latent"]}, s["steps"], s["step_rounds"])
    axes["particles"] = step_axis(
        {k: (lambda k=k: particles_step(k)) for k in s["particles"]}, s["steps"], s["step_rounds"]
    )
    axes["samples"] = ll_axis([(28, S) for S in s["samples"]], list(s["samples"]), s["repeats"])
    axes["image"] = ll_axis(
        [(side, s["image_samples"]) for side in s["image"]], [side * side for side in s["image"]], s["repeats"]
    )
    figures = {}
    for axis, res in axes.items():
        path = RESULTS / f"cost_growth_{axis}.png"
        if not args.quick:
            RESULTS.mkdir(parents=True, exist_ok=True)
            figure(axis, res, path)
        figures[axis] = None if args.quick else str(path.relative_to(RESULTS.parents[1]))
    result = {
        "settings": {
            **s,
            "batch": BATCH,
            "hidden": HIDDEN,
            "latent_dim": LATENT,
            "ll_images": LL_IMAGES,
            "max_bytes": DEFAULT_MAX_BYTES,
        },
        "model": f"vae MLP 784-{HIDDEN[0]}-{HIDDEN[1]}-latent ReLU, Bernoulli (image axis: D-200-200-50)",
        "slopes": {axis: _round(res["slope"]) for axis, res in axes.items()}
        | {f"{axis}_peak_mib": _round(axes[axis]["peak_mib_slope"]) for axis in ("samples", "image")}
        | {f"{axis}_peak_live_mib": _round(axes[axis]["peak_live_mib_slope"]) for axis in ("samples", "image")},
        "axes": axes,
        "figures": figures,
    }
    return finish("cost_growth", result, args, device="cpu")


if __name__ == "__main__":
    main()
