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
    e.add_argument("--num-samples", type=int, default=None,
                   help="importance samples per test image for log p(x) (0: ELBO only; 5000 for papers; "
                        "default: the run's eval.num_samples)")
    e.add_argument("--max-test", type=int, default=None,
                   help="evaluate on the first N test images only (default: the run's eval.max_test)")
    e.add_argument("--checkpoint", choices=["best", "last"], default="best")
    e.add_argument("--device")
    e.add_argument("--seed", type=int, default=0)

    d = sub.add_parser("diagnose", help="PSIS k-hat and ESS of the guide on test images, an ArviZ file and a plot")
    d.add_argument("run_dir")
    d.add_argument("--num-images", type=int, default=100, help="test images to diagnose (the first N)")
    d.add_argument("--num-samples", type=int, default=None,
                   help="guide draws per image (default: the run's eval.num_samples)")
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
    from .experiment import CONFIG_FILE, run_experiment

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
    run = run_experiment(cfg, run_dir, resume=bool(args.resume), device=args.device, progress=not args.no_progress,
                         figures=not args.no_figures)
    summary = json.loads((run.run_dir / "metrics.json").read_text())
    print(f"test ELBO: {summary['test_elbo']:.3f} nats per image (best epoch {summary['best_epoch']})")
    print(f"run folder: {run.run_dir}")
    return 0


def _evaluate(args) -> int:
    from .experiment import evaluate_run, load_run

    run = load_run(args.run_dir, "best" if args.checkpoint == "best" else "last", device=args.device)
    out = {"checkpoint": args.checkpoint, **evaluate_run(run, args.num_samples, args.max_test, seed=args.seed,
                                                         write=False)}
    (run.run_dir / "evaluation.json").write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))
    return 0


def _diagnose(args) -> int:
    from .experiment import diagnose_run, load_run

    run = load_run(args.run_dir, "best" if args.checkpoint == "best" else "last", device=args.device)
    out = diagnose_run(run, args.num_images, args.num_samples, seed=args.seed)
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
