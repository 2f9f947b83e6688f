"""The ``ppl-vae`` command: ``train``, ``evaluate`` and ``sample``.

    ppl-vae train                                   # embedded digits data, default VAE
    ppl-vae train configs/vae_fashion.yaml train.epochs=5
    ppl-vae train --resume runs/vae_digits-20261122-101500
    ppl-vae evaluate RUN_DIR [--num-samples 5000]
    ppl-vae diagnose RUN_DIR [--num-images 100]    # PSIS k-hat of the guide (ArviZ)
    ppl-vae sample RUN_DIR [--n 64] [--from aggregate]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import PplVaeError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ppl-vae", description="Variational autoencoders as Pyro programs.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model from a YAML config (default: VAE on the embedded digits)")
    t.add_argument("config", nargs="?", help="YAML config file (optional)")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.epochs=5 model.latent_dim=8")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue a killed run from its folder")
    t.add_argument("--run-dir", help="run folder (default: <output_dir>/<name>-<timestamp>)")
    t.add_argument("--device", help="cpu, cuda or cuda:N (default: the config's device, 'auto')")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument("--no-figures", action="store_true", help="skip the PNG figures")

    e = sub.add_parser("evaluate", help="test ELBO (and the importance-sampled log-likelihood) of a run")
    e.add_argument("run_dir")
    e.add_argument("--num-samples", type=int, default=0,
                   help="importance samples per test image for log p(x) (0: ELBO only; 5000 for papers)")
    e.add_argument("--max-test", type=int, default=None, help="evaluate on the first N test images only")
    e.add_argument("--checkpoint", choices=["best", "last"], default="best")
    e.add_argument("--device")
    e.add_argument("--seed", type=int, default=0)

    d = sub.add_parser("diagnose", help="PSIS k-hat and ESS of the guide on test images, an ArviZ file and a plot")
    d.add_argument("run_dir")
    d.add_argument("--num-images", type=int, default=100, help="test images to diagnose (the first N)")
    d.add_argument("--num-samples", type=int, default=1000, help="guide draws per image")
    d.add_argument("--checkpoint", choices=["best", "last"], default="best")
    d.add_argument("--device")
    d.add_argument("--seed", type=int, default=0)

    s = sub.add_parser("sample", help="draw images from a trained run's prior into a PNG grid")
    s.add_argument("run_dir")
    s.add_argument("--n", type=int, default=64)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", help="PNG path (default: RUN_DIR/samples.png)")
    s.add_argument("--from", dest="source", choices=["prior", "aggregate"], default="prior",
                   help="z from the prior or from a Gaussian mixture fitted to the aggregate posterior q(z)")
    s.add_argument("--num-components", type=int, default=32, help="mixture components for --from aggregate")
    s.add_argument("--checkpoint", choices=["best", "last"], default="best")
    s.add_argument("--device")
    return p


def _train(args) -> int:
    from .config import load_config
    from .experiment import CONFIG_FILE, train

    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config and not Path(config).exists():
        overrides.insert(0, config)   # `ppl-vae train train.epochs=3`: no file, only overrides
        config = None
    if args.resume:
        run_dir = Path(args.resume)
        if not (run_dir / CONFIG_FILE).is_file():
            raise PplVaeError(f"--resume: {str(run_dir)!r} is not a run folder (no {CONFIG_FILE} in it)")
        cfg = load_config(run_dir / CONFIG_FILE, overrides)
    else:
        cfg = load_config(config, overrides)
        run_dir = Path(args.run_dir) if args.run_dir else None
    run = train(cfg, run_dir, resume=bool(args.resume), device=args.device, progress=not args.no_progress,
                figures=not args.no_figures)
    summary = json.loads((run.run_dir / "metrics.json").read_text())
    print(f"test ELBO: {summary['test_elbo']:.3f} nats per image (best epoch {summary['best_epoch']})")
    print(f"run folder: {run.run_dir}")
    return 0


def _evaluate(args) -> int:
    from .experiment import load_run, test_elbo

    run = load_run(args.run_dir, "best" if args.checkpoint == "best" else "last", device=args.device)
    if args.max_test is not None:
        run.data.test_x = run.data.test_x[: args.max_test]
        run.data.test_y = run.data.test_y[: args.max_test] if run.data.test_y is not None else None
    out = {"checkpoint": args.checkpoint, "num_test": len(run.data.test_x), "test_elbo": test_elbo(run)}
    if args.num_samples > 0:
        from .evaluate import bits_per_dim, log_likelihood

        y = run.data.test_y.to(run.device) if run.data.test_y is not None and run.model.conditional else None
        ll = log_likelihood(run.model.model, run.model.guide, run.data.test_x.to(run.device), y=y,
                            num_samples=args.num_samples, batch_size=run.cfg.eval.batch_size, seed=args.seed,
                            progress=True)
        out.update({"num_samples": args.num_samples, "test_log_likelihood": float(ll.mean()),
                    "test_log_likelihood_sem": float(ll.std() / len(ll) ** 0.5) if len(ll) > 1 else 0.0,
                    "bits_per_dim": float(bits_per_dim(ll, run.data.data_dim).mean())})
    (run.run_dir / "evaluation.json").write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))
    return 0


def _diagnose(args) -> int:
    import numpy as np

    from .evaluate.diagnostics import plot_khat, posterior_diagnostics, psis_diagnostics
    from .experiment import load_run

    if args.num_images <= 0 or args.num_samples < 2:
        raise PplVaeError(f"--num-images must be positive and --num-samples at least 2, got {args.num_images} and "
                          f"{args.num_samples}")
    run = load_run(args.run_dir, "best" if args.checkpoint == "best" else "last", device=args.device)
    x = run.data.test_x[: args.num_images].to(run.device)
    y = run.data.test_y[: args.num_images].to(run.device) if run.model.conditional else None
    idata = posterior_diagnostics(run.model.model, run.model.guide, x, num_samples=args.num_samples,
                                  seed=args.seed, y=y)
    diag = psis_diagnostics(idata)
    idata.to_netcdf(str(run.run_dir / "diagnostics.nc"))
    plot_khat(diag, run.run_dir / "khat.png")
    khat = diag["khat"]
    out = {"num_images": len(x), "num_samples": args.num_samples, "khat_median": float(np.median(khat)),
           "fraction_khat_above_0.7": float(np.mean(khat > 0.7)), "ess_median": float(np.median(diag["ess"])),
           "worst_images": [int(i) for i in np.argsort(-khat)[:10]],
           "files": ["diagnostics.nc", "khat.png"]}
    (run.run_dir / "diagnostics.json").write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))
    return 0


def _sample(args) -> int:
    import torch

    from .experiment import load_run
    from .viz import save_image_grid

    run = load_run(args.run_dir, "best" if args.checkpoint == "best" else "last", device=args.device)
    if args.n <= 0:
        raise PplVaeError(f"--n must be a positive integer, got {args.n}")
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        y = None
        if run.model.conditional:
            y = torch.arange(args.n, device=run.device) % run.model.num_classes
        if args.source == "aggregate":
            from .priors import sample_aggregate

            images = sample_aggregate(run, args.n, seed=args.seed, num_components=args.num_components)
        else:
            images = run.model.sample(args.n, y)
    out = args.out or str(run.run_dir / "samples.png")
    save_image_grid(images.cpu(), out, nrow=int(args.n**0.5) or 1)
    print(f"samples: {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        commands = {"train": _train, "evaluate": _evaluate, "diagnose": _diagnose, "sample": _sample}
        return commands[args.command](args)
    except (PplVaeError, FileNotFoundError, ValueError) as e:
        print(f"ppl-vae: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
