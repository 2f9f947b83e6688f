"""One-command GPU check (issue 37, item 7): on a CUDA machine, in under 8 minutes, the CUDA tests, the training
step's overhead against hand-written PyTorch, a full Fashion-MNIST epoch, ``log_likelihood`` at S = 5000 and a
2-process bf16-mixed run; writes bench/results/gpu.json.

Stages (each timed; one that fails is recorded with its error and the others still run; exit code 1 then):

  cuda_tests      ``pytest -m "not slow" -k "cuda or device_of_their_parameters"`` over the test files that mention
                  ``torch.cuda`` (in a subprocess; counts of passed / failed / skipped / errors and the failed ids)
  overhead        ``ppl_vae.train``'s step (its epoch ÷ its steps, as bench/overhead.py times it) for the default
                  objective (closed-form KL), ``train.objective: elbo`` (sampled KL), ``train.jit`` and, where
                  TrainConfig has it, ``train.compile`` — each ÷ a hand-written eager step and ÷ the same step under
                  ``torch.compile`` (same estimator, modules, batches and Adam; every step reads its loss as a float,
                  as the library does), batch 100 and 1024, medians of interleaved rounds, absolute ms per step
                  (CUDA synchronised). The library reads its batches from a bundle on the device
  fashion_epoch   a full epoch (60,000 images, ``data.val_fraction: 0``) of the shipped ``vae_fashion`` config's model
                  (784-200-200-50 tanh MLP, Bernoulli, dynamic binarisation) through ``ppl_vae.train`` at batch 128
                  and 1024: the second epoch's seconds (the first, with CUDA's warm-up, beside it). Data: Debian's
                  /usr/share/datasets/fashion-mnist if present, else random 8-bit IDX files of the same size
                  (``--synthetic-data`` forces them; timing does not depend on pixel values); ``data`` says which
  log_likelihood  ``ppl_vae.evaluate.log_likelihood`` with S = 5000 over the 10,000 test images (default chunking,
                  and with ``max_bytes`` = 1 GiB): seconds and peak GPU memory (torch.cuda.max_memory_allocated)
  ddp_bf16        with 2 or more GPUs: ``train.devices: 2, strategy: ddp, precision: bf16-mixed`` (2 processes, NCCL)
                  on the digits, val ELBO beside a 1-process 32-true run (within 2 nats); skipped with the reason
                  on one GPU

Needs, besides torch: pyro-ppl (and its pyro-api; opt_einsum and tqdm are in the CUDA image) and this repository on
PYTHONPATH; the other libraries it imports — numpy, scipy, scikit-learn, pandas, matplotlib, torchvision, pyyaml,
filelock, lightning (ddp only), pytest and pytest-timeout (cuda_tests) — are in the lent machine's image. arviz is
not imported. Offline, carry the two wheels (760 KiB, bench/gpu_wheels.sh fetches them into .whl/) and run through
the device tool, from the repository root:

    bash bench/gpu_wheels.sh                         # here, once: .whl/pyro_ppl-1.9.2-*.whl, .whl/pyro_api-0.1.2-*.whl
    run(command="bash bench/gpu.sh", carry=[".whl"], timeout_s=600)
    # bench/gpu.sh installs .whl/*.whl into /tmp/site, sets PYTHONPATH, runs python3 bench/gpu.py and copies
    # bench/results/gpu.json and the log to $OUT

    python bench/gpu.py                 # on a CUDA machine: writes bench/results/gpu.json (< 8 min on one H100)
    python bench/gpu.py --dry-run       # anywhere (CPU): every stage at tiny sizes, a few seconds each; writes the
                                        # same keys to --out or a temporary file, never bench/results/gpu.json
    python bench/gpu.py --quick         # the same dry run, writing nothing (the harness's quick mode)
    python bench/gpu.py --stages overhead,log_likelihood   # some stages only (a variant of the file)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from pathlib import Path

import pyro
import torch
import torch.nn.functional as F
from _common import RESULTS, ROOT, finish, parser, start, time_calls, write_idx

STAGES = ("cuda_tests", "overhead", "fashion_epoch", "log_likelihood", "ddp_bf16")
CUDA_TESTS_K = "cuda or device_of_their_parameters"
HIDDEN = "==SUPPRESS=="  # the command line's marker of an option left out of --help
TARGETS = {
    "overhead": "default ÷ hand eager <= 1.05 at batch 100 (CPU target); compiled ÷ hand compiled <= 1.0 on GPU",
    "fashion_epoch": "<= 2 s at batch 128 on GPU",
    "log_likelihood": "<= 60 s for S = 5000 over 10,000 images on GPU",
}
# full run / dry run: (batches, rounds, steps per round) of the overhead stage, epoch batch sizes, epochs,
# (train, test) images, (S, test images) of log_likelihood
FULL = dict(batches=(100, 1024), rounds=5, steps=20, epoch_batches=(128, 1024), epochs=2, images=(60000, 10000))
FULL.update(ll=(5000, 10000), ddp_timeout=300, test_timeout=300, budget_s=450)
DRY = dict(batches=(16,), rounds=2, steps=3, epoch_batches=(128, 1024), epochs=2, images=(512, 64))
DRY.update(ll=(20, 64), ddp_timeout=150, test_timeout=150, budget_s=3600)


def say(*msg) -> None:
    print("gpu.py:", *msg, file=sys.stderr, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _env() -> dict:
    """The environment of a subprocess: this repository importable, one CPU thread, no launcher variables."""
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("MPLBACKEND", "Agg")
    return env


# ------------------------------------------------------------------------------------------------ cuda_tests
def cuda_test_files() -> list[str]:
    """The test files that mention ``torch.cuda`` (the CUDA tests skip themselves without a device)."""
    return sorted(
        str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("test_*.py") if "torch.cuda" in p.read_text()
    )


def stage_cuda_tests(ctx) -> dict:
    files = cuda_test_files()
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not slow", "-k", CUDA_TESTS_K]
        cmd += [*files, f"--junitxml={xml}"]
        t0 = time.perf_counter()
        try:
            res = subprocess.run(
                cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=ctx["sizes"]["test_timeout"]
            )
            rc, output = res.returncode, res.stdout + res.stderr
        except subprocess.TimeoutExpired as e:
            rc, output = "timeout", e.stdout or ""
            output = output.decode(errors="replace") if isinstance(output, bytes) else output
        seconds = time.perf_counter() - t0
        counts = {"tests": 0, "passed": 0, "failed": 0, "errors": 0, "skipped": 0}
        failed, skip_reasons = [], {}
        if xml.is_file():
            for case in ET.parse(xml).getroot().iter("testcase"):
                name = f"{case.get('classname', '')}::{case.get('name', '')}"
                counts["tests"] += 1
                kinds = {child.tag for child in case}
                if "failure" in kinds or "error" in kinds:
                    counts["failed" if "failure" in kinds else "errors"] += 1
                    failed.append(name)
                elif "skipped" in kinds:
                    counts["skipped"] += 1
                    msg = case.find("skipped").get("message", "")
                    skip_reasons[msg] = skip_reasons.get(msg, 0) + 1
                else:
                    counts["passed"] += 1
    return {
        "command": shlex.join(["python", *cmd[1:-1]]),
        "returncode": rc,
        **counts,
        "failed_tests": failed,
        "skip_reasons": skip_reasons,
        "seconds": round(seconds, 1),
        "summary": (output.strip().splitlines() or [""])[-1],
        "output_tail": None if rc == 0 else output[-2000:],
        "ok": rc == 0 and counts["failed"] == 0 and counts["errors"] == 0 and counts["passed"] > 0,
    }


# ------------------------------------------------------------------------------------------------ overhead
def mlp_vae(device, num_data: int = 60000):
    """Burda et al.'s one-stochastic-layer MLP (784-200-200-50 tanh, Bernoulli): the vae_fashion config's model."""
    from ppl_vae import ModelConfig, build_model

    pyro.clear_param_store()
    return build_model(ModelConfig(name="vae", arch="burda1"), (1, 28, 28), num_data=num_data).to(device)


def images(n: int, seed: int, device) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 28, 28, generator=g).bernoulli(generator=g).to(device)


def hand_loss(model, analytic: bool):
    """The library VAE's estimator on its modules, in plain PyTorch: −(N/B) Σ (log p(x|z) − KL), z = μ + σ ε,
    the KL in closed form (``analytic``) or sampled at z."""
    enc, dec, n = model.encoder, model.decoder, model.num_data
    half_log_2pi = 0.5 * math.log(2 * math.pi)

    def loss_fn(x):
        loc, scale = enc(x)
        z = loc + scale * torch.randn_like(loc)
        log_px = -F.binary_cross_entropy_with_logits(dec(z), x, reduction="none").flatten(1).sum(-1)
        if analytic:
            kl = 0.5 * (scale.pow(2) + loc.pow(2) - 1 - 2 * scale.log()).sum(-1)
        else:
            log_q = (-0.5 * ((z - loc) / scale).pow(2) - scale.log() - half_log_2pi).sum(-1)
            kl = log_q - (-0.5 * z.pow(2) - half_log_2pi).sum(-1)
        return -(n / x.shape[0]) * (log_px - kl).sum()

    return loss_fn


def hand_step(model, analytic: bool, compile_backend: str | None):
    """One hand-written step: the loss (under ``torch.compile`` when ``compile_backend``), backward, Adam; the loss
    is read as a float every step, as ``ppl_vae.train`` does."""
    loss_fn = hand_loss(model, analytic)
    if compile_backend is not None:
        loss_fn = torch.compile(loss_fn, backend=compile_backend, dynamic=False)
    opt = torch.optim.Adam(list(model.encoder.parameters()) + list(model.decoder.parameters()), lr=1e-3)

    def step(x):
        loss = loss_fn(x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def library_rounds(model, xs, tc, rounds: int, others: dict, on_host: bool = False) -> dict:
    """``ppl_vae.train`` for ``rounds`` + 1 epochs over the batches ``xs`` (a bundle on their device, or in host
    memory with ``on_host``; same batch size); after each epoch every step of ``others`` runs over the same batches
    (order alternating): interleaved rounds. Returns the per-round seconds per step of the library and of each
    other (first epoch apart)."""
    import ppl_vae
    from ppl_vae import plan_for
    from ppl_vae.data import DataBundle

    data = DataBundle.from_tensors(torch.cat(xs).cpu() if on_host else torch.cat(xs))
    cfg = dataclasses.replace(tc, epochs=rounds + 1, batch_size=len(xs[0]), logger="none")
    plan = plan_for(model)
    original = plan.on_epoch_end
    lib, other = [], {k: [] for k in others}

    def on_epoch_end(epoch, record, d):
        original(epoch, record, d)
        lib.append(record["seconds"] / len(xs))
        for k in list(others) if epoch % 2 == 0 else list(others)[::-1]:
            other[k].append(time_calls(others[k], xs))

    plan.on_epoch_end = on_epoch_end
    ppl_vae.train(model, data, cfg, plan=plan, device=xs[0].device, progress=False)
    return {"library": lib, **other}


def _ms(v: float) -> float:
    return round(1000 * v, 3)


def stage_overhead(ctx) -> dict:
    from ppl_vae import TrainConfig
    from ppl_vae.errors import ConfigError

    device, sizes, seed = ctx["device"], ctx["sizes"], ctx["seed"]
    backend = ctx["compile_backend"]
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    variants = {
        "default": (TrainConfig(), True),
        "sampled_kl": (TrainConfig(objective="elbo"), False),
        "jit": (TrainConfig(objective="elbo", jit=True), False),
    }
    out = {
        "model": "burda1 MLP 784-200-200-50 tanh, Bernoulli, Adam 1e-3 (the vae_fashion config's model)",
        "rounds": sizes["rounds"],
        "steps_per_round": sizes["steps"],
        "compile_backend": backend,
        "library_variants": {
            "default": "TrainConfig() (objective auto: closed-form KL) vs hand-written closed-form KL",
            "sampled_kl": "objective elbo (Trace_ELBO) vs hand-written sampled KL",
            "jit": "jit: true, objective elbo (TorchScript tracing) vs hand-written sampled KL",
            "compile": "compile: true (present only if TrainConfig has it) vs the estimator it trains",
        },
        "library_data": f"a DataBundle of the batches on {device}",
        "per_batch": {},
    }
    if "compile" in fields:  # added by issue 37's item 2: the default objective if it compiles, else elbo
        tc = TrainConfig(compile=True)
        try:
            tc.validate()
            variants["compile"] = (tc, True)
        except ConfigError:
            variants["compile"] = (TrainConfig(compile=True, objective="elbo"), False)
    else:
        out["compile_skipped"] = "ppl_vae.config.TrainConfig has no field 'compile' (train.jit is the compiled path)"
    for batch in sizes["batches"]:
        pyro.set_rng_seed(seed)
        xs = [images(batch, seed * 1000 + k, device) for k in range(sizes["steps"])]
        hands, compile_seconds = {}, {}
        for analytic in (True, False):
            est = "analytic" if analytic else "sampled"
            torch.manual_seed(seed)
            hands[f"eager_{est}"] = hand_step(mlp_vae(device), analytic, None)
            torch.manual_seed(seed)
            hands[f"compiled_{est}"] = hand_step(mlp_vae(device), analytic, backend)
            for k in (f"eager_{est}", f"compiled_{est}"):  # warm-up; the compiled step compiles here
                sync(device)
                t0 = time.perf_counter()
                hands[k](xs[0])
                sync(device)
                if k.startswith("compiled"):
                    compile_seconds[est] = round(time.perf_counter() - t0, 2)
                time_calls(hands[k], xs[:3])
        rows = {}
        for name, (tc, analytic) in variants.items():
            est = "analytic" if analytic else "sampled"
            others = {"hand_eager": hands[f"eager_{est}"], "hand_compiled": hands[f"compiled_{est}"]}
            pyro.set_rng_seed(seed)
            try:
                t = library_rounds(mlp_vae(device), xs, tc, sizes["rounds"], others, on_host=ctx["on_host"])
            except Exception as e:  # a bundle on the GPU refused: time the library from host memory, and say so
                if ctx["on_host"] or device.type == "cpu":
                    raise
                ctx["on_host"] = True
                out["library_data"] = f"host memory (a bundle on {device} failed: {type(e).__name__}: {e})"
                pyro.set_rng_seed(seed)
                t = library_rounds(mlp_vae(device), xs, tc, sizes["rounds"], others, on_host=True)
            lib, eager, comp = t["library"][1:], t["hand_eager"][1:], t["hand_compiled"][1:]
            rows[name] = {
                "estimator": "closed-form KL" if analytic else "sampled KL",
                "library_ms": _ms(statistics.median(lib)),
                "library_first_epoch_ms": _ms(t["library"][0]),
                "hand_eager_ms": _ms(statistics.median(eager)),
                "hand_compiled_ms": _ms(statistics.median(comp)),
                "over_hand_eager": round(statistics.median(a / b for a, b in zip(lib, eager, strict=True)), 4),
                "over_hand_compiled": round(statistics.median(a / b for a, b in zip(lib, comp, strict=True)), 4),
                "over_hand_eager_rounds": [round(a / b, 4) for a, b in zip(lib, eager, strict=True)],
            }
            r = rows[name]
            say(f"overhead b{batch} {name}: {r['library_ms']} ms/step, ÷ eager {r['over_hand_eager']}")
        eager_over_compiled = [
            rows[v]["hand_eager_ms"] / rows[v]["hand_compiled_ms"] for v in rows if rows[v]["hand_compiled_ms"] > 0
        ]
        out["per_batch"][f"b{batch}"] = {
            **rows,
            "hand_compile_seconds": compile_seconds,
            "hand_eager_over_hand_compiled": round(statistics.median(eager_over_compiled), 4),
        }
    return out


# ------------------------------------------------------------------------------------------------ data
def fashion(ctx):
    """(config, data bundle, description) of the shipped vae_fashion config with ``val_fraction: 0``: Debian's
    Fashion-MNIST when present (and not ``--synthetic-data``), else random IDX files of the configured size."""
    if "fashion" in ctx:
        return ctx["fashion"]
    from ppl_vae.config import load_config
    from ppl_vae.data.sources import DEBIAN_FASHION_MNIST
    from ppl_vae.experiment import build_data

    n_train, n_test = ctx["sizes"]["images"]
    overrides = ["data.val_fraction=0", "train.logger=none", f"seed={ctx['seed']}"]
    if (DEBIAN_FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file() and not ctx["synthetic"]:
        root, what = DEBIAN_FASHION_MNIST, f"Debian's dataset-fashion-mnist ({DEBIAN_FASHION_MNIST})"
        if ctx["dry"]:
            overrides.append(f"data.limit={n_train}")
    else:
        root = write_idx(Path(ctx["tmp"]) / "fashion", n_train, n_test, seed=ctx["seed"])
        what = f"synthetic: random 8-bit IDX files, {n_train} train / {n_test} test images of 28×28"
    cfg = load_config("vae_fashion", overrides=[*overrides, f"data.root={root}"])
    data = build_data(cfg)
    ctx["fashion"] = (cfg, data, what)
    return ctx["fashion"]


# ------------------------------------------------------------------------------------------------ fashion_epoch
def stage_fashion_epoch(ctx) -> dict:
    import ppl_vae
    from ppl_vae.experiment import build

    device, sizes = ctx["device"], ctx["sizes"]
    cfg, data, what = fashion(ctx)
    out = {"data": what, "config": "vae_fashion (data.val_fraction: 0)", "num_train": len(data.train_x)}
    for batch in sizes["epoch_batches"]:
        run_cfg = dataclasses.replace(
            cfg, train=dataclasses.replace(cfg.train, epochs=sizes["epochs"], batch_size=batch, patience=None)
        )
        model = build(run_cfg, data, device)
        sync(device)
        t0 = time.perf_counter()
        res = ppl_vae.train(model, data, run_cfg, device=device, progress=False)
        sync(device)
        total = time.perf_counter() - t0
        hist = res.history
        out[f"b{batch}"] = {
            "seconds": round(hist[-1]["seconds"], 3),
            "first_epoch_seconds": round(hist[0]["seconds"], 3),
            "steps": math.ceil(len(data.train_x) / batch),
            "train_elbo": [round(r["train_elbo"], 2) for r in hist],
            "epochs": len(hist),
            "train_seconds_total": round(total, 2),
        }
        say(f"fashion epoch b{batch}: {out[f'b{batch}']['seconds']} s")
    out["target"] = TARGETS["fashion_epoch"]
    return out


# ------------------------------------------------------------------------------------------------ log_likelihood
def timed_log_likelihood(model, x, S: int, max_bytes: int, device) -> dict:
    """Seconds (CUDA synchronised) and peak GPU memory of one ``log_likelihood`` call with ``max_bytes``."""
    from ppl_vae.evaluate.likelihood import bytes_per_sample, log_likelihood, plan_chunks

    batch_size, chunk_size = plan_chunks(len(x), S, bytes_per_sample=bytes_per_sample(x), max_bytes=max_bytes)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    sync(device)
    t0 = time.perf_counter()
    log_px = log_likelihood(model.model, model.guide, x, num_samples=S, max_bytes=max_bytes)
    sync(device)
    row = {
        "seconds": round(time.perf_counter() - t0, 3),
        "num_images": len(x),
        "max_bytes": max_bytes,
        "batch_size": batch_size,
        "chunk_size": chunk_size,
        "passes": math.ceil(len(x) / batch_size) * math.ceil(S / chunk_size),
        "mean_log_px": round(float(log_px.double().mean()), 3),
        "finite": bool(torch.isfinite(log_px).all()),
        "peak_gpu_memory_mib": None,  # a CPU (dry) run has no GPU allocator to read
    }
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        row["peak_gpu_memory_mib"] = round(peak / 2**20, 1)
        row["peak_gpu_memory_above_start_mib"] = round((peak - base) / 2**20, 1)
    return row


def stage_log_likelihood(ctx) -> dict:
    """S = 5000 over the test images with ``max_bytes`` = 1 GiB, then with the default chunking (32 MiB: one image
    and 1,149 samples per pass, 50,000 passes). The latter is first timed on 1% of the images; if all of them would
    not fit in the run's time budget it is timed on as many as fit and ``seconds_estimated_all`` scales it up."""
    from ppl_vae.evaluate.likelihood import DEFAULT_MAX_BYTES
    from ppl_vae.experiment import build

    device = ctx["device"]
    S, n = ctx["sizes"]["ll"]
    cfg, data, what = fashion(ctx)
    pyro.set_rng_seed(ctx["seed"])
    model = build(cfg, data, device).eval()
    x = torch.cat([xb for xb, _ in data.batches("test", 1000, shuffle=False, device=device)])[:n]
    out = {"data": what, "num_images": len(x), "num_samples": S, "model": "vae_fashion, untrained (timing only)"}
    out["max_bytes_1gib"] = timed_log_likelihood(model, x, S, 2**30, device)
    say(f"log_likelihood max_bytes 1 GiB: {out['max_bytes_1gib']['seconds']} s")
    probe = timed_log_likelihood(model, x[: max(1, len(x) // 100)], S, DEFAULT_MAX_BYTES, device)
    per_image = probe["seconds"] / probe["num_images"]
    left = ctx["deadline"] - time.perf_counter() - 30  # keep 30 s for the stages after this one
    m = len(x) if per_image * len(x) <= left else max(probe["num_images"], min(len(x), int(left / per_image)))
    row = timed_log_likelihood(model, x[:m], S, DEFAULT_MAX_BYTES, device)
    if m < len(x):
        row["seconds_estimated_all"] = round(row["seconds"] * len(x) / m, 1)
        row["note"] = f"timed on the first {m} images (the run's time budget); seconds_estimated_all scales it"
    out["default_chunks"] = row
    say(f"log_likelihood default chunks: {row['seconds']} s on {m} images")
    out["target"] = TARGETS["log_likelihood"]
    return out


# ------------------------------------------------------------------------------------------------ ddp_bf16
def ddp_run(accelerator: str, devices: int, precision: str, seed: int) -> dict:
    """The digits VAE (latent 2, hidden 64) for 2 epochs on ``devices`` processes at ``precision``."""
    import ppl_vae
    from ppl_vae import ModelConfig, TrainConfig, build_model
    from ppl_vae.data import load_data

    data = load_data("digits")
    model = build_model(ModelConfig(name="vae", latent_dim=2, hidden=[64]), data.shape, num_data=len(data.train_x))
    if devices == 1:  # one process trains where its model is (Fabric places the models of several)
        model = model.to("cuda" if accelerator == "cuda" else "cpu")
    tc = TrainConfig(
        epochs=2,
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        accelerator=accelerator,
        precision=precision,
        logger="none",
    )
    t0 = time.perf_counter()
    res = ppl_vae.train(model, data, tc, seed=seed, progress=False)
    return {
        "rank": res.rank,
        "world_size": res.world_size,
        "precision": precision,
        "accelerator": accelerator,
        "val_elbo": [r.get("val_elbo") for r in res.history],
        "seconds": round(time.perf_counter() - t0, 2),
        "parameter_device": str(next(model.parameters()).device),
    }


def ddp_child(args) -> None:
    """In the processes Lightning launches (it re-runs this command in each): rank 0 writes its result."""
    res = ddp_run(args.ddp_accelerator, 2, "bf16-mixed", args.seeds[0])
    if res["rank"] == 0:
        Path(args.ddp_child).write_text(json.dumps(res))


def stage_ddp_bf16(ctx) -> dict:
    device, seed = ctx["device"], ctx["seed"]
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    if gpus >= 2:
        accelerator = "cuda"
    elif ctx["dry"]:
        accelerator = "cpu"  # the dry run checks the same path on 2 CPU processes (gloo)
    else:
        return {"status": "skipped", "reason": f"needs 2 or more GPUs, found {gpus}"}
    out_file = Path(ctx["tmp"]) / "ddp.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--ddp-child", str(out_file)]
    cmd += ["--ddp-accelerator", accelerator, "--seeds", str(seed), "--threads", "1"]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=ctx["sizes"]["ddp_timeout"])
    seconds = time.perf_counter() - t0
    if res.returncode != 0 or not out_file.is_file():
        raise RuntimeError(f"the 2-process run failed (exit {res.returncode}): {res.stderr[-1500:]}")
    two = json.loads(out_file.read_text())
    one = ddp_run("cuda" if accelerator == "cuda" else "cpu", 1, "32-true", seed)
    a, b = two["val_elbo"][-1], one["val_elbo"][-1]
    close = a is not None and b is not None and math.isfinite(a) and math.isfinite(b) and abs(a - b) < 2.0
    return {
        "status": "ok" if close else "failed",
        "accelerator": accelerator,
        "gpus": gpus,
        "two_process_bf16": two,
        "one_process_32_true": one,
        "val_elbo_difference": None if a is None or b is None else round(a - b, 4),
        "criterion": "both val ELBOs finite and within 2 nats",
        "seconds_with_launch": round(seconds, 1),
    }


# ------------------------------------------------------------------------------------------------ main
def cuda_environment() -> dict:
    if not torch.cuda.is_available():
        return {"available": False, "torch_cuda": torch.version.cuda}
    props = torch.cuda.get_device_properties(0)
    env = {
        "available": True,
        "gpu": torch.cuda.get_device_name(0),
        "device_count": torch.cuda.device_count(),
        "capability": ".".join(map(str, torch.cuda.get_device_capability(0))),
        "memory_gib": round(props.total_memory / 2**30, 1),
        "multiprocessors": props.multi_processor_count,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "driver": None,
    }
    try:
        q = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
        env["driver"] = subprocess.run(q, capture_output=True, text=True, timeout=30).stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        pass
    return env


def main(argv=None):
    ap = parser(__doc__, seeds="0", threads=1)
    ap.add_argument("--dry-run", action="store_true", help="every stage at tiny sizes; result to --out or a temp file")
    ap.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated stages of {', '.join(STAGES)}")
    ap.add_argument("--synthetic-data", action="store_true", help="random IDX files even where Fashion-MNIST is")
    ap.add_argument("--compile-backend", default=None, help="torch.compile backend (default inductor; dry: aot_eager)")
    ap.add_argument("--ddp-child", default=None, help=HIDDEN)  # internal: a process of the ddp_bf16 stage
    ap.add_argument("--ddp-accelerator", default="cpu", help=HIDDEN)
    args = start(ap, argv)
    if args.ddp_child:
        return ddp_child(args)
    stages = [s for s in args.stages.split(",") if s]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        ap.error(f"--stages: unknown stage(s) {unknown}; choose from {', '.join(STAGES)}")
    dry = args.dry_run or args.quick
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: torch sees no CUDA device")
    if not dry and device.type != "cuda":
        ap.error("the full run needs a CUDA device (torch sees none): use --dry-run to check the script on the CPU")
    out_path = None
    if args.dry_run and not args.quick:
        out_path = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="ppl_vae_gpu_")) / "gpu.json"
        if out_path.resolve() == (RESULTS / "gpu.json").resolve():
            ap.error("--dry-run never writes bench/results/gpu.json: give another --out")
    args.quick = dry  # the harness writes no file in quick mode; the dry run writes its own below
    sizes = DRY if dry else FULL
    backend = args.compile_backend or ("aot_eager" if dry else "inductor")
    result: dict = {"mode": "dry-run" if dry else "gpu", "device": str(device), "stages": {}}
    result["cuda_environment"] = cuda_environment()
    failed = False
    with tempfile.TemporaryDirectory(prefix="ppl_vae_gpu_") as tmp:
        ctx = dict(device=device, sizes=sizes, seed=args.seeds[0], dry=dry, tmp=tmp, synthetic=args.synthetic_data)
        ctx.update(compile_backend=backend, on_host=False, deadline=args._t0 + sizes["budget_s"])
        for name in STAGES:
            if name not in stages:
                result[name] = {"status": "skipped", "reason": "not in --stages"}
                result["stages"][name] = {"status": "skipped", "seconds": 0.0}
                continue
            say(f"stage {name} ...")
            t0 = time.perf_counter()
            try:
                row = globals()[f"stage_{name}"](ctx)
                status = row.get("status", "ok")
                if name == "cuda_tests" and not row["ok"]:
                    status = "failed"
            except Exception as e:  # a stage's failure is a result: recorded, and the other stages still run
                row = {"status": "error", "error": f"{type(e).__name__}: {e}"}
                row["traceback"] = traceback.format_exc()[-3000:]
                status = "error"
            seconds = round(time.perf_counter() - t0, 1)
            failed |= status in ("error", "failed")
            result[name] = row
            result["stages"][name] = {"status": status, "seconds": seconds}
            say(f"stage {name}: {status} in {seconds} s")
    result["targets"] = TARGETS
    result["total_seconds"] = round(time.perf_counter() - args._t0, 1)
    written = finish("gpu", result, args)
    if out_path is not None:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(written, indent=2) + "\n")
        say(f"dry run written to {out_path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
