"""The ``ppl-vae`` command: ``train``, ``evaluate``, ``diagnose``, ``gaps``, ``sample`` and ``configs``.

    ppl-vae train                                   # embedded digits data, default VAE
    ppl-vae train vae_fashion train.epochs=5        # a shipped config by name, or a YAML file's path
    ppl-vae train --resume runs/vae_digits-20261122-101500
    ppl-vae evaluate RUN_DIR [--num-samples 5000]
    ppl-vae diagnose RUN_DIR [--num-images 100]    # PSIS k-hat of the guide (ArviZ), worst images
    ppl-vae gaps RUN_DIR [--num-images 200] [--nuts 3]   # amortisation / approximation gaps (+ NUTS)
    ppl-vae sample RUN_DIR [--n 64] [--from aggregate]
    ppl-vae configs [list]                          # the shipped configs: name, method, data
    ppl-vae configs show NAME                       # print one
    ppl-vae configs copy NAME [DEST]                # copy one to edit (never over an existing file)
    ppl-vae configs fields [METHOD]                 # every config field (or METHOD's model.options), documented
    ppl-vae compare SPEC.yaml [--out DIR] [--workers N]   # runs over seeds: paired differences, table, figure

Every expected fault ends in one line, ``ppl-vae: error: <kind>: <what, which file or field, what to do>``, with exit
code 2 for bad input (a configuration, a flag, a file, the data) and 1 for a run that failed (diverged, a disk that
filled up, an unexpected error); ``--debug`` shows the traceback instead.

Why this module is long: it is the whole command line — every subcommand's options with their help texts (each
shows its default) and the one place where faults become one-line messages and exit codes; the work is elsewhere.
"""

from __future__ import annotations

import argparse
import errno
import json
import sys
from pathlib import Path

from .errors import CheckpointError, LoggerError, PplVaeError, TrainingDiverged, interface

_SEED_MAX = 2**32 - 1  # numpy's largest seed (pyro.set_rng_seed seeds numpy too)


def _int(minimum: int, maximum: int | None = None):
    """An argparse type: an integer >= ``minimum`` (and <= ``maximum``; no silent clamping)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if value < minimum or (maximum is not None and value > maximum):
            bound = f"in [{minimum}, {maximum}]" if maximum is not None else f">= {minimum}"
            raise argparse.ArgumentTypeError(f"must be an integer {bound}, got {value}")
        return value

    return parse


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default, unless the text already says it (``default: the run's ...``) or
    there is none to show (a flag that is off, a value that defaults to the run's own)."""

    def _get_help_string(self, action):
        text = action.help or ""
        unshown = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if "default" in text or unshown or not action.option_strings:
            return text
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """argparse's parser whose error line shows the control characters of an argument escaped (``'\\r0'``): the
    error stays one line, and no escape sequence of an argument reaches the terminal. Its subcommands' help shows
    every option's default (:class:`_HelpFormatter`)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        super().error("".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in message))


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="ppl-vae", description="Variational autoencoders as Pyro programs.")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    threads_help = "CPU threads of the command (default: the run's train.threads; null there: half the cores, 1 to 4)"
    p.add_argument("--threads", type=_int(1, None), default=None, help=threads_help)
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model from a YAML config (default: VAE on the embedded digits)")
    t.add_argument(
        "config",
        nargs="?",
        help="a YAML config file, or the name of a shipped config (`ppl-vae configs` lists them; default: vae_digits)",
    )
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.epochs=5 model.latent_dim=8")
    t.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue a killed run from its folder (overrides: only fields that may change, e.g. train.epochs; "
        "default: a new run)",
    )
    t.add_argument("--run-dir", help="run folder (default: <output_dir>/<name>-<timestamp>)")
    t.add_argument("--overwrite", action="store_true", help="replace the run in --run-dir instead of refusing")
    t.add_argument("--device", help="cpu, cuda or cuda:N (default: the config's device, 'auto')")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument("--no-figures", action="store_true", help="skip the PNG figures")

    e = sub.add_parser("evaluate", help="test ELBO (and the importance-sampled log-likelihood) of a run")
    e.add_argument("run_dir")
    e.add_argument(
        "--num-samples",
        type=_int(0),
        default=None,
        help="importance samples per test image for log p(x) (0: ELBO only; 5000 for papers; "
        "default: the run's eval.num_samples)",
    )
    e.add_argument(
        "--max-test",
        type=_int(1),
        default=None,
        help="evaluate on the first N test images only (default: the run's eval.max_test)",
    )
    _checkpoint_option(e)
    _trust_option(e)
    _device_option(e)
    e.add_argument("--seed", type=_int(0, _SEED_MAX), default=0, help="seed of the ELBO's and the estimate's draws")

    d = sub.add_parser("diagnose", help="PSIS k-hat and ESS of the guide on test images, an ArviZ file and a plot")
    d.add_argument("run_dir")
    d.add_argument("--num-images", type=_int(1), default=100, help="test images to diagnose (the first N)")
    d.add_argument(
        "--num-samples", type=_int(2), default=None, help="guide draws per image (default: the run's eval.num_samples)"
    )
    _checkpoint_option(d)
    _trust_option(d)
    _device_option(d)
    d.add_argument("--seed", type=_int(0, _SEED_MAX), default=0, help="seed of the guide's draws")

    g = sub.add_parser(
        "gaps",
        help="inference-gap report: amortisation and approximation gaps of the guide "
        "(gaps.json, gaps.png), optionally with NUTS reference posteriors",
    )
    g.add_argument("run_dir")
    g.add_argument("--num-images", type=_int(1), default=200, help="test images (the first N)")
    g.add_argument(
        "--num-samples",
        type=_int(1),
        default=None,
        help="importance draws per image for log p(x) (default: the run's eval.num_samples)",
    )
    g.add_argument("--steps", type=_int(1), default=300, help="Adam steps of the per-image optimisation")
    g.add_argument("--num-particles", type=_int(1), default=16, help="draws per step of that optimisation")
    g.add_argument("--elbo-particles", type=_int(1), default=1000, help="draws for each image's ELBO")
    g.add_argument(
        "--family",
        choices=["diag", "full"],
        default=None,
        help="the per-image Gaussian family (default: the guide's own)",
    )
    g.add_argument(
        "--nuts",
        type=_int(0),
        default=0,
        metavar="N",
        help="NUTS reference posteriors for the first N images (default 0: none)",
    )
    g.add_argument(
        "--log-px",
        choices=("is", "best"),
        default="is",
        help="log p̂(x) of the approximation gap: is (importance sampling from the amortised guide) or best (the "
        "largest of that, IS from the per-image q* and annealed importance sampling, as Cremer et al.)",
    )
    g.add_argument("--ais-steps", type=_int(1), default=200, help="AIS annealing steps per image (--log-px best)")
    g.add_argument("--ais-chains", type=_int(1), default=8, help="AIS chains per image (--log-px best)")
    g.add_argument("--nuts-chains", type=_int(1), default=4, help="NUTS chains per image")
    g.add_argument("--nuts-samples", type=_int(2), default=500, help="NUTS draws per chain, after the warm-up")
    g.add_argument("--nuts-warmup", type=_int(0), default=500, help="NUTS warm-up steps per chain")
    _checkpoint_option(g)
    _trust_option(g)
    _device_option(g)
    g.add_argument("--seed", type=_int(0, _SEED_MAX), default=0, help="seed of every draw of the report")

    s = sub.add_parser("sample", help="draw images from a trained run's prior into a PNG grid")
    s.add_argument("run_dir")
    s.add_argument("--n", type=_int(1), default=64, help="images to draw")
    s.add_argument(
        "--seed",
        type=_int(0, _SEED_MAX),
        default=None,
        help="seed of the draws (default: the run's seed; with the defaults the grid is the run's prior_samples.png)",
    )
    s.add_argument("--out", help="PNG path (default: RUN_DIR/samples.png)")
    s.add_argument(
        "--from",
        dest="source",
        choices=["prior", "aggregate"],
        default="prior",
        help="z from the prior or from a Gaussian mixture fitted to the aggregate posterior q(z)",
    )
    s.add_argument("--num-components", type=_int(1), default=32, help="mixture components for --from aggregate")
    _checkpoint_option(s)
    _trust_option(s)
    _device_option(s)

    c = sub.add_parser(
        "configs",
        help="the configs shipped with the package: list them, show one, copy one to edit",
        description="The configs shipped with the package. `ppl-vae train NAME` trains one by name; copy one to "
        "edit it (a file's path always wins over a name).",
    )
    csub = c.add_subparsers(dest="action")
    csub.add_parser("list", help="one line per shipped config: its name, method and data (the default)")
    cs = csub.add_parser("show", help="print a shipped config")
    cs.add_argument("name", help="a shipped config's name, e.g. vae_fashion")
    cc = csub.add_parser("copy", help="copy a shipped config to a file to edit (refuses to overwrite one)")
    cc.add_argument("name", help="a shipped config's name, e.g. vae_fashion")
    cc.add_argument("dest", nargs="?", help="the file (or an existing folder) to copy to (default: ./NAME.yaml)")
    cf = csub.add_parser(
        "fields",
        help="every field of data/model/train/eval (or a method's model.options): type, default, allowed values, "
        "what it does",
        description="The configuration reference, read from the code (the documentation site shows the same): "
        "every field of the top level and of the data, model, train and eval sections; with METHOD, the fields of "
        "that method's model.options.",
    )
    cf.add_argument("method", nargs="?", help="a method's name (model.name), e.g. ladder: list its model.options")

    k = sub.add_parser(
        "compare",
        help="train and compare runs over seeds: mean ± s.e., paired differences to a baseline, a table and a figure",
        description="Train what is missing of every (run, seed) of a spec (never retraining a finished run, resuming "
        "a killed one), evaluate each once and write compare.json, compare.md, compare.csv and compare.png.",
    )
    k.add_argument("spec", help="the compare spec (YAML): runs, seeds, baseline, metrics")
    k.add_argument("--out", help="output folder (default: the spec's path without .yaml)")
    k.add_argument("--workers", type=_int(1), default=1, help="jobs in parallel (processes, one torch thread each)")
    k.add_argument("--progress", action="store_true", help="show each run's progress bar")
    for name in ("train", "evaluate", "diagnose", "gaps", "sample"):  # --threads after the command works too
        sub.choices[name].add_argument("--threads", type=_int(1, None), default=argparse.SUPPRESS, help=threads_help)
    return p


def _load_run(args):
    """The run of an evaluate/diagnose/gaps/sample command, as its options ask."""
    from .experiment import load_run

    which = "best" if args.checkpoint == "best" else "last"
    return load_run(args.run_dir, which, device=args.device, trusted=args.trust_pickle, threads=args.threads)


def _train(args) -> int:
    from .config.sections import check_resume_overrides, load_config
    from .experiment import CONFIG_FILE, run_experiment

    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config and not Path(config).exists():
        overrides.insert(0, config)  # `ppl-vae train train.epochs=3`: no file, only overrides
        config = None
    if args.resume:
        run_dir = Path(args.resume)
        if not (run_dir / CONFIG_FILE).is_file():
            raise PplVaeError(f"--resume: {str(run_dir)!r} is not a run folder (no {CONFIG_FILE} in it)")
        if config is not None or args.run_dir or args.overwrite:
            raise PplVaeError(
                "--resume takes its config from the run folder: give no config file, --run-dir or --overwrite with it"
            )
        check_resume_overrides(overrides, load_config(run_dir / CONFIG_FILE))  # before anything is written
        cfg = load_config(run_dir / CONFIG_FILE, overrides)
    else:
        cfg = load_config(config, overrides)
        run_dir = Path(args.run_dir) if args.run_dir else None
    run = run_experiment(
        cfg,
        run_dir,
        resume=bool(args.resume),
        overwrite=args.overwrite,
        device=args.device,
        progress=not args.no_progress,
        figures=not args.no_figures,
    )
    if run.rank > 0:  # another process of a multi-process job: rank 0 reports
        return 0
    summary = json.loads((run.run_dir / "metrics.json").read_text())
    at = (
        f"best epoch {summary['best_epoch']}"
        if summary["best_epoch"] is not None
        else f"last epoch {summary['epochs_run']}: no epoch was scored for best.pt"
    )
    print(f"test ELBO: {summary['test_elbo']:.3f} nats per image ({at})")
    print(f"run folder: {run.run_dir}")
    return 0


def _evaluate(args) -> int:
    from .experiment import evaluate_run

    run = _load_run(args)
    out = {
        "checkpoint": run.checkpoint,  # what was read: a run without best.pt is evaluated at its last epoch
        **evaluate_run(run, args.num_samples, args.max_test, seed=args.seed, write=False),
    }
    (run.run_dir / "evaluation.json").write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))
    _wrote(run.run_dir, ["evaluation.json"])
    return 0


def _compare(args) -> int:
    from .compare import compare

    out = Path(args.out) if args.out else Path(args.spec).with_suffix("")
    if out == Path(args.spec):
        out = Path(args.spec + ".out")  # a spec without a suffix: its output folder beside it
    result = compare(args.spec, out, workers=args.workers, progress=args.progress)
    print((out / "compare.md").read_text(), end="")
    _wrote(out, ["compare.json", "compare.md", "compare.csv", "compare.png"])
    return 0 if result else 1


def _wrote(run_dir: Path, files: list[str]) -> None:
    """One line on stderr naming the files a command wrote (stdout stays the JSON report)."""
    print("wrote " + ", ".join(str(Path(run_dir) / f) for f in files), file=sys.stderr)


def _diagnose(args) -> int:
    from .experiment import diagnose_run

    run = _load_run(args)
    out = diagnose_run(run, args.num_images, args.num_samples, seed=args.seed)
    print(json.dumps(out, indent=2))
    _wrote(run.run_dir, ["diagnostics.json", *out["files"]])
    return 0


def _gaps(args) -> int:
    from .experiment import gaps_run

    run = _load_run(args)
    out = gaps_run(
        run,
        args.num_images,
        num_samples=args.num_samples,
        steps=args.steps,
        num_particles=args.num_particles,
        elbo_particles=args.elbo_particles,
        family=args.family,
        nuts_images=args.nuts,
        seed=args.seed,
        nuts={"num_chains": args.nuts_chains, "num_samples": args.nuts_samples, "warmup_steps": args.nuts_warmup},
        checkpoint=run.checkpoint,
        log_px_from=args.log_px,
        ais={"num_steps": args.ais_steps, "num_chains": args.ais_chains},
    )
    brief = {k: out[k] for k in ("model", "num_images", "amortisation", "approximation", "inference")}
    if "nuts" in out:
        brief["nuts"] = {k: v for k, v in out["nuts"].items() if k != "images"}
    print(json.dumps({**brief, "files": out["files"]}, indent=2))
    _wrote(run.run_dir, out["files"])
    return 0


def _sample(args) -> int:
    from .experiment import sample_run

    if args.out is not None and Path(args.out).is_dir():
        raise PplVaeError(f"--out {args.out!r} is a folder: give the path of a .png file to write")
    run = _load_run(args)
    out = args.out or str(run.run_dir / "samples.png")
    seed = run.cfg.seed if args.seed is None else args.seed  # the run's own: the grid of its prior_samples.png
    sample_run(run, args.n, seed=seed, source=args.source, num_components=args.num_components, path=out)
    print(f"wrote {out}")
    return 0


def _configs(args) -> int:
    from .config.sections import config_from_dict, load_yaml, shipped_config, shipped_configs

    if args.action == "fields":
        return _fields(args.method)
    if args.action in (None, "list"):
        rows = []
        for name, file in shipped_configs().items():
            cfg = config_from_dict(load_yaml(file.read_text()))
            d = cfg.data
            data = [d.name + (f" {d.image_size}x{d.image_size}" if d.image_size else ""), f"{d.pixels} pixels"]
            if d.multimodal == "poly":
                data.append(f"poly multimodal ({d.num_modalities} modalities)")
            elif d.multimodal:
                data.append(f"{d.multimodal} multimodal")
            rows.append((name, cfg.model.name, ", ".join(data)))
        width = [max(len(r[i]) for r in [("NAME", "METHOD", ""), *rows]) for i in range(2)]
        for name, method, data in [("NAME", "METHOD", "DATA"), *rows]:
            print(f"{name:<{width[0]}}  {method:<{width[1]}}  {data}")
        print("train one: ppl-vae train NAME [overrides]; edit one: ppl-vae configs copy NAME [DEST]")
        return 0
    name, file = shipped_config(args.name)
    if args.action == "show":
        print(file.read_text(), end="")
        return 0
    dest = Path(args.dest) if args.dest else Path(f"{name}.yaml")
    if dest.is_dir():
        dest = dest / f"{name}.yaml"
    if dest.exists():
        raise PplVaeError(f"{str(dest)!r} exists already: not overwritten (give another DEST, or remove it first)")
    with open(dest, "x") as f:  # "x": never over a file that appeared meanwhile
        f.write(file.read_text())
    print(f"copied {name} to {dest}; train it with: ppl-vae train {dest}")
    return 0


def _fields(method: str | None) -> int:
    from .config.field_docs import config_fields, fields_of, format_fields

    if method is None:
        for section, rows in config_fields().items():
            print(f"# {section or 'top level'}")
            print(format_fields(rows, section))
            print()
        print("a method's own fields (model.options): ppl-vae configs fields METHOD")
        return 0
    from .models.registry import get_method

    rows = fields_of(get_method(method).options)  # an unknown name: ConfigError listing the known ones
    print(f"# model.options of {method}")
    print(format_fields(rows, "model.options") if rows else "(none: model.options stays empty)")
    return 0


def _gather_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """``ppl-vae train cfg.yaml --no-progress train.epochs=1``: dotted overrides may stand anywhere after
    ``train``; they are taken out of the argument list (argparse cannot interleave positionals with flags)."""
    command = next((k for k, a in enumerate(argv) if not a.startswith("-")), None)  # before it: only --debug, -h
    if command is None or argv[command] != "train":  # `ppl-vae evaluate train`: a run folder called train
        return argv, []
    i = command + 1
    head, rest = argv[:i], argv[i:]
    takes_value = {"--resume", "--run-dir", "--device"}
    keep, overrides, k = [], [], 0
    while k < len(rest):
        tok = rest[k]
        if tok in takes_value and k + 1 < len(rest):
            keep += [tok, rest[k + 1]]
            k += 2
            continue
        (overrides if ("=" in tok and not tok.startswith("-")) else keep).append(tok)
        k += 1
    return head + keep, overrides


def _exit_code(e: BaseException) -> int:
    if isinstance(e, TrainingDiverged):
        return 1
    if isinstance(e, CheckpointError) and "could not write" in str(e):
        return 1
    if isinstance(e, OSError) and e.errno in _FULL:
        return 1
    if isinstance(e, LoggerError):  # a server that failed during the run: not the user's input
        return 1
    return 2


# a write that failed for want of room: the disk, a quota, the process's file-size limit
_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _message(e: BaseException) -> str:
    if isinstance(e, PermissionError):
        return (
            f"PermissionError: cannot write or read {e.filename!r} (permission denied or a read-only folder): "
            "choose another --run-dir or output_dir"
        )
    if isinstance(e, OSError) and not isinstance(e, FileNotFoundError) and e.errno in _FULL:
        why = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is reached"}.get(
            e.errno, "the file-size limit of this process is reached (ulimit -f)"
        )
        return f"OSError: {why} while writing {e.filename!r}: free space, or write elsewhere"
    return f"{type(e).__name__}: {e}"


def _checkpoint_option(p) -> None:
    p.add_argument(
        "--checkpoint",
        choices=["best", "last"],
        default="best",
        help="best.pt (the best validation epoch; a run without one: its last) or last (checkpoint.pt)",
    )


def _device_option(p) -> None:
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: the run's configured device)")


def _trust_option(p) -> None:
    p.add_argument(
        "--trust-pickle",
        action="store_true",
        help="read a checkpoint of an older release that holds Python objects (unpickling can run code from the "
        "file: only for a run whose origin you trust)",
    )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    argv, overrides = _gather_overrides(argv)
    args = _parser().parse_args(argv)
    if args.command == "train":
        args.overrides = [*args.overrides, *overrides]
        if args.threads is not None:
            args.overrides.append(f"train.threads={args.threads}")
    commands = {
        "train": _train,
        "evaluate": _evaluate,
        "diagnose": _diagnose,
        "gaps": _gaps,
        "sample": _sample,
        "configs": _configs,
        "compare": _compare,
    }
    try:
        with interface("cli"):  # hints name flags and dotted overrides, not keyword arguments
            return commands[args.command](args)
    except KeyboardInterrupt:
        print(
            "ppl-vae: interrupted; the last complete checkpoint is kept (continue with --resume RUN_DIR)",
            file=sys.stderr,
        )
        return 130
    except (PplVaeError, OSError, ValueError) as e:  # the expected faults: bad input, files, a failed run
        if args.debug:
            raise
        print(f"ppl-vae: error: {_message(e)}", file=sys.stderr)
        return _exit_code(e)
    except Exception as e:  # a fault nobody foresaw: one line, and how to see more
        if args.debug:
            raise
        from .models import out_of_memory

        if out_of_memory(e):  # a resource, not a bug: say which settings size the memory
            print(
                f"ppl-vae: error: out of memory ({type(e).__name__}): lower train.batch_size, eval.batch_size or "
                "the model's sizes (model.hidden, model.latent_dim, model.channels), or choose another --device",
                file=sys.stderr,
            )
            return 1
        print(
            f"ppl-vae: error: unexpected {type(e).__name__}: {e} (run again with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
