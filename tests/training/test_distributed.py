"""Training on several processes through Lightning Fabric (ppl_vae.training.distributed), on the CPU with the gloo
backend and real processes, and the experiment loggers (ppl_vae.training.loggers)."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch

import ppl_vae
from ppl_vae.config import TrainConfig
from ppl_vae.errors import CheckpointError, ConfigError, RunFolderError
from ppl_vae.training.runlock import RunLock

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS))
import _dist_program as prog  # noqa: E402
from _images import write_idx  # noqa: E402

TOL = 1e-12  # float64: the two ranks' sums are added in another order than one process's (rounding ~1e-16)


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS.parent), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    return env


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> dict:
    """Every case of tests/_dist_program.py trained by 2 processes (rank 0's parameters, history, gradients)."""
    out = tmp_path_factory.mktemp("ddp") / "two.pt"
    res = subprocess.run(
        [sys.executable, str(TESTS / "_dist_program.py"), "2", str(out)],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return torch.load(out, weights_only=False)


@pytest.fixture(scope="module")
def one_rank() -> dict:
    return prog.run_all(1)


def _max_diff(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.parametrize("case", ["step_elbo", "step_elbo_minibatch_plate", "step_iwae", "step_dreg"])
def test_one_step_on_two_ranks_equals_one_process_with_the_global_batch(case, one_rank, two_ranks):
    (p1, h1, g1), (p2, h2, g2) = one_rank[case], two_ranks[case]
    init = prog.FixedNoiseVAE(prog.N, 1).state_dict()
    assert len(g1) == len(g2) == 1
    assert _max_diff(g1[0], g2[0]) < TOL  # DDP's mean of the scaled rank gradients
    assert min(float(g.abs().max()) for g in g1[0].values()) > 1e-3
    assert _max_diff(p1, p2) < TOL
    assert _max_diff(p1, init) > 1e-3  # the step moved the parameters
    assert h1[0]["train_elbo"] == pytest.approx(h2[0]["train_elbo"], abs=TOL)
    assert h1[0]["val_elbo"] == pytest.approx(h2[0]["val_elbo"], abs=TOL)  # validation reduced over ranks


@pytest.mark.parametrize("case", ["epochs_uneven_shards", "epochs_empty_shard"])
def test_two_epochs_on_two_ranks_give_the_single_process_metrics(case, one_rank, two_ranks):
    """Uneven shards (7 = 4 + 3, the last batch 3 = 2 + 1) and a last batch of one row (rank 1 holds none)."""
    (p1, h1, g1), (p2, h2, g2) = one_rank[case], two_ranks[case]
    assert len(h1) == len(h2) == 2 and len(g1) == len(g2) == 2 * h1[0]["steps"]
    for a, b in zip(g1, g2, strict=False):
        assert _max_diff(a, b) < TOL
    for a, b in zip(h1, h2, strict=False):
        assert a.keys() == b.keys()
        for k in ("train_elbo", "val_elbo"):
            assert a[k] == pytest.approx(b[k], abs=TOL)
    assert _max_diff(p1, p2) < TOL


def test_the_module_objective_reports_what_loss_and_grads_reports():
    """A penalised ELBO reports the base ELBO's value (the penalty only in the gradient), through DDP's module too."""
    from pyro.infer import Trace_ELBO

    from ppl_vae.infer.penalised import PenalisedELBO
    from ppl_vae.training.distributed import _Objective

    data, vae = prog.make_data(), prog.FixedNoiseVAE(prog.N, 1)
    elbo = PenalisedELBO(Trace_ELBO(), lambda x, y: vae.log_scale.sum().expand(len(x)) + 1.0, 0.5, lambda: prog.N)
    x, y = data.train_x[:8], data.train_y[:8]
    surrogate, value = _Objective(vae, elbo, vae.model, vae.guide)(x, y)
    assert float(value) == pytest.approx(elbo.loss_and_grads(vae.model, vae.guide, x, y), abs=1e-12)
    assert float((surrogate - value).detach()) == pytest.approx(
        0.5 * prog.N / 8 * 8 * 1.0, abs=1e-12
    )  # (N/B)·Σ penalty


def test_the_fabric_path_in_one_process_is_the_plain_loop():
    data = prog.make_data()
    runs = []
    for strategy in ("auto", "single_device"):
        vae = prog.FixedNoiseVAE(prog.N, 1)
        res = ppl_vae.train(
            vae,
            data,
            TrainConfig(
                epochs=2, batch_size=7, lr=1e-2, objective="elbo", strategy=strategy, accelerator="cpu", logger="none"
            ),
            seed=0,
            progress=False,
        )
        runs.append((vae.state_dict(), res.history))
    assert _max_diff(runs[0][0], runs[1][0]) == 0
    assert [r["train_elbo"] for r in runs[0][1]] == [r["train_elbo"] for r in runs[1][1]]


def test_bf16_mixed_precision_trains_a_library_model_on_the_cpu():
    """The forward under bfloat16 autocast (Fabric's precision plugin), validation in float32; ELBOs finite and
    within a few nats of the float32 run's."""
    from ppl_vae import ModelConfig, build_model
    from ppl_vae.data import load_data

    data = load_data("digits", limit=300)
    elbos = []
    for precision in ("32-true", "bf16-mixed"):
        m = build_model(ModelConfig(name="vae", latent_dim=2, hidden=[64]), data.shape, num_data=len(data.train_x))
        res = ppl_vae.train(m, data, TrainConfig(epochs=2, precision=precision, logger="none"), seed=0, progress=False)
        elbos.append(res.history[-1]["val_elbo"])
    assert all(map(math.isfinite, elbos)) and abs(elbos[0] - elbos[1]) < 2.0


def test_settings_are_checked_with_the_field_and_the_value():
    with pytest.raises(ConfigError, match=r"train.devices must be a positive integer, got 0"):
        TrainConfig(devices=0).validate()
    with pytest.raises(ConfigError, match=r"train.strategy must be one of .*'ddp'.*got 'dp'"):
        TrainConfig(strategy="dp").validate()
    with pytest.raises(ConfigError, match=r"train.batch_size must be at least train.devices × train.num_nodes \(4\)"):
        TrainConfig(devices=4, batch_size=3).validate()
    with pytest.raises(
        ConfigError, match=r"train.precision must be one of \['32-true', 'bf16-mixed', '16-mixed'\], got '16'"
    ):
        TrainConfig(precision="16").validate()
    from ppl_vae import ModelConfig, build_model, plan_for
    from ppl_vae.training.distributed import refuse_coupled

    for name, options, what in (
        ("wise_ale", {}, "kl_scale='batch'"),
        ("gamix", {"kl": "aggregate"}, "kl='aggregate'"),
        ("vae_epanechnikov", {}, "objective='kernel_bound'"),
    ):
        m = build_model(
            ModelConfig(name=name, arch="mlp", latent_dim=2, hidden=[8], options=options), (1, 8, 8), num_data=10
        )
        elbo = plan_for(m).objective(TrainConfig())
        assert what in elbo.couples_datapoints  # declared by the objective
        refuse_coupled(elbo, world=1)  # one process: fine
        with pytest.raises(ConfigError, match=rf"train.devices must be 1 with {re.escape(what)}.*couples"):
            refuse_coupled(elbo, world=2)  # the loop's one check
    vae = build_model(ModelConfig(name="vae", latent_dim=2, hidden=[8]), (1, 8, 8), num_data=10)
    refuse_coupled(plan_for(vae).objective(TrainConfig()), world=2)  # a per-datapoint ELBO: fine

    gan = build_model(
        ModelConfig(
            name="gamix", arch="conv", latent_dim=4, hidden=[8], options={"adversarial": 1.0, "disc_width": 0.125}
        ),
        (1, 16, 16),
        num_data=10,
    )
    with pytest.raises(ConfigError, match=r"adversarial must be 0 with train.devices > 1"):
        plan_for(gan).objective(TrainConfig(devices=2))


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


def _cli(*args, run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "ppl_vae", "train", *args, "--run-dir", str(run_dir), "--no-progress"]


def _epochs(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in lines]


def test_a_killed_rank_stops_the_job_clearly_and_resume_continues_exactly(tmp_path):
    """Digits VAE on 2 processes: the run-folder lock is held while it runs; killing rank 1 stops
    rank 0 with a message that names --resume; the resumed job's metrics equal an unbroken 2-process run's."""
    args = ("train.epochs=30", "train.devices=2", "train.strategy=ddp", "train.accelerator=cpu", "data.limit=600")
    ref = subprocess.run(_cli(*args, run_dir=tmp_path / "ref"), env=_env(), capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr[-3000:]
    run = tmp_path / "killed"
    job = subprocess.Popen(
        _cli(*args, run_dir=run), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.time() + 240
        while len(_epochs(run)) < 2 and job.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        assert job.poll() is None, "the job ended before it could be interrupted"
        with pytest.raises(RunFolderError, match=r"is being written by PID"):  # what a second job meets
            RunLock(run).__enter__()
        ranks = _children(job.pid)
        assert len(ranks) == 1
        os.kill(ranks[0], 9)
        _, err = job.communicate(timeout=120)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode != 0
    assert "lost the other processes" in err and "--resume" in err, err[-2000:]
    done = len(_epochs(run))
    assert 2 <= done < 30
    res = subprocess.run(
        [sys.executable, "-m", "ppl_vae", "train", "--resume", str(run), "--no-progress"],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert _epochs(run) == _epochs(tmp_path / "ref")  # the same numbers as the unbroken job
    with open(run / "logs" / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == list(range(1, 31))  # each epoch once in the CSV log


def test_two_processes_streaming_their_shares_from_memory_mapped_files_train_as_from_float32(tmp_path):
    """Each rank reads only its share of every batch from the memory-mapped IDX files, through its own DataLoader
    worker: the 2-process run's metrics equal, bit for bit, those of the 2-process run on float32 tensors (which
    equal one process's to float tolerance: the tests above)."""
    root = write_idx(tmp_path / "idx", n_train=150, n_test=40)
    env = {**_env(), "PPL_VAE_CACHE_DIR": str(tmp_path / "cache")}
    runs = {}
    for storage in ("memory", "mmap"):
        extra = [f"data.storage={storage}"] + (["data.workers=1"] if storage != "memory" else [])
        res = subprocess.run(
            _cli(
                "data.name=fashion_mnist",
                f"data.root={root}",
                "data.pixels=binary_dynamic",
                "train.epochs=2",
                "train.batch_size=25",
                "train.devices=2",
                "train.strategy=ddp",
                "train.accelerator=cpu",
                "eval.num_samples=2",
                "train.logger=none",
                *extra,
                run_dir=tmp_path / storage,
            ),
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert res.returncode == 0, res.stderr[-3000:]
        runs[storage] = _epochs(tmp_path / storage)
    assert len(runs["memory"]) == 2 and runs["mmap"] == runs["memory"]


def test_the_process_group_is_released_at_exit(tmp_path):
    """A launched job destroys its process group before the interpreter's finalisation (gloo's threads abort the
    process otherwise): what the exit handler runs, on a one-process gloo group."""
    from ppl_vae.training.distributed import release_process_group

    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    assert torch.distributed.is_initialized()
    release_process_group()
    assert not torch.distributed.is_initialized()
    release_process_group()  # nothing to release: a no-op


def test_resume_with_another_number_of_processes_is_refused(tmp_path):
    data = prog.make_data()
    cfg = TrainConfig(epochs=1, batch_size=7, lr=1e-2, objective="elbo", logger="none")
    ppl_vae.train(prog.FixedNoiseVAE(prog.N, 1), data, cfg, run_dir=tmp_path, progress=False)
    ck = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    ck["world_size"] = 2
    torch.save(ck, tmp_path / "checkpoint.pt")
    with pytest.raises(CheckpointError, match=r"written by 2 process\(es\), this job has 1"):
        ppl_vae.train(
            prog.FixedNoiseVAE(prog.N, 1),
            data,
            TrainConfig(**{**cfg.__dict__, "epochs": 2}),
            run_dir=tmp_path,
            resume=True,
            progress=False,
        )


def _run(tmp_path, logger: str, epochs: int = 2):
    from ppl_vae.config import load_config
    from ppl_vae.experiment import run_experiment

    cfg = load_config(None, ["data.limit=300", f"train.epochs={epochs}", f"train.logger={logger}"])
    return run_experiment(cfg, tmp_path / logger, progress=False)


def test_csv_and_tensorboard_logs_hold_the_scalars_and_the_figures(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = _run(tmp_path, "tensorboard")
    history = [json.loads(line) for line in (run.run_dir / "metrics.jsonl").read_text().splitlines()]
    with open(run.run_dir / "logs" / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [1, 2]
    for rec, row in zip(history, rows, strict=False):
        for k in ("train_elbo", "val_elbo", "lr", "beta"):
            assert float(row[k]) == pytest.approx(rec[k], rel=1e-12)
    acc = EventAccumulator(str(run.run_dir / "logs" / "tensorboard"), size_guidance={"images": 0}).Reload()
    for k in ("train_elbo", "val_elbo"):
        events = acc.Scalars(k)
        assert [e.step for e in events] == [1, 2]
        assert [e.value for e in events] == pytest.approx([r[k] for r in history], rel=1e-6)  # stored as float32
    figures = {p.stem for p in run.run_dir.glob("*.png")}
    assert {"training_curves", "reconstructions"} <= figures
    assert set(acc.Tags()["images"]) == figures  # every figure of the run


def test_mlflow_logs_the_scalars_and_the_figures(tmp_path):
    mlflow = pytest.importorskip("mlflow")
    run = _run(tmp_path, "mlflow")
    history = [json.loads(line) for line in (run.run_dir / "metrics.jsonl").read_text().splitlines()]
    client = mlflow.tracking.MlflowClient(tracking_uri=f"file:{(run.run_dir / 'logs' / 'mlruns').resolve()}")
    run_id = (run.run_dir / "logs" / "mlflow_run_id").read_text().strip()
    points = sorted(client.get_metric_history(run_id, "train_elbo"), key=lambda m: m.step)
    assert [m.step for m in points] == [1, 2]
    assert [m.value for m in points] == pytest.approx([r["train_elbo"] for r in history], rel=1e-12)
    assert "training_curves.png" in {a.path for a in client.list_artifacts(run_id)}


def test_an_unknown_logger_is_refused():
    with pytest.raises(ConfigError, match=r"train.logger must be one of .*got 'comet'"):
        TrainConfig(logger="comet").validate()


def test_a_staged_plan_with_frozen_parts_trains_on_two_ranks(tmp_path):
    """The recursive mixture's stage-wise schedule on 2 processes: frozen components get no gradient (DDP's unused
    parameters), every stage writes its folder, and the frozen component ends exactly where its stage left it."""
    run = tmp_path / "rme"
    res = subprocess.run(
        _cli(
            "model.name=rme",
            "model.options.num_components=2",
            "model.options.schedule=stagewise",
            "train.epochs=4",
            "train.devices=2",
            "train.strategy=ddp",
            "train.accelerator=cpu",
            "data.limit=300",
            run_dir=run,
        ),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    first = torch.load(run / "component_0" / "checkpoint.pt", weights_only=False)["module"]
    last = torch.load(run / "checkpoint.pt", weights_only=False)["module"]
    h0 = [k for k in first if k.startswith("encoder.components.0.")]
    h1 = [k for k in first if k.startswith("encoder.components.1.")]
    assert h0 and h1
    assert all(torch.equal(first[k], last[k]) for k in h0)  # frozen in stage 1 on both ranks
    assert not all(torch.equal(first[k], last[k]) for k in h1)  # trained in stage 1
    assert len(_epochs(run)) == 2 and len(_epochs(run / "component_0")) == 2


def test_two_nodes_of_one_process_each_train_as_one_process(tmp_path, one_rank):
    """train.num_nodes: two 'machines' simulated on this one (NODE_RANK 0 and 1, one process each), as SLURM or
    torchrun would start them, give rank 0 the single-process parameters and metrics."""
    env = _env() | {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    cmd = [sys.executable, str(TESTS / "_dist_program.py"), "1"]
    with subprocess.Popen(
        [*cmd, str(tmp_path / "n1.pt"), "2"],
        env=env | {"NODE_RANK": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    ) as node1:
        node0 = subprocess.run(
            [*cmd, str(tmp_path / "n0.pt"), "2"],
            env=env | {"NODE_RANK": "0"},
            capture_output=True,
            text=True,
            timeout=300,
        )
        err1 = node1.communicate(timeout=60)[1]
    assert node1.returncode == 0, err1[-3000:]
    assert node0.returncode == 0, node0.stderr[-3000:]
    two_nodes = torch.load(tmp_path / "n0.pt", weights_only=False)
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in node0.stderr
    for case in prog.CASES:
        assert _max_diff(two_nodes[case][0], one_rank[case][0]) < TOL
        assert [h["train_elbo"] for h in two_nodes[case][1]] == pytest.approx(
            [h["train_elbo"] for h in one_rank[case][1]], rel=1e-12
        )


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_float16_training_is_refused_on_the_cpu_and_ddp_in_a_notebook(monkeypatch):
    from ppl_vae.training import distributed

    with pytest.raises(ConfigError, match=r"'16-mixed' is float16 autocast .*bf16-mixed"):
        distributed.launch(TrainConfig(precision="16-mixed", accelerator="cpu"), torch.device("cpu"))
    with pytest.raises(ConfigError, match="num_nodes > 1"):
        TrainConfig(num_nodes=2).validate()
    monkeypatch.setitem(sys.modules, "ipykernel", types.ModuleType("ipykernel"))
    monkeypatch.setitem(sys.modules, "__main__", types.ModuleType("__main__"))  # a kernel's: no __file__
    with pytest.raises(ConfigError, match="a notebook kernel cannot be: put the training in a script"):
        distributed.launch(TrainConfig(devices=2, strategy="ddp", accelerator="cpu"), torch.device("cpu"))


def test_the_optimiser_unscales_float16_gradients_and_keeps_the_loss_scale():
    """With 16-mixed the gradients arrive multiplied by the loss scale: the step must equal the unscaled one."""
    from ppl_vae.training.optim import ParamOptimizer

    def stepped(scaler):
        torch.manual_seed(0)
        net = torch.nn.Linear(3, 1)
        opt = ParamOptimizer(net, lr=0.1, clip_norm=0.5, scaler=scaler)
        loss = net(torch.ones(4, 3)).pow(2).sum()
        (loss if scaler is None else scaler.scale(loss)).backward()
        opt.step()
        return net.weight.detach().clone(), opt.state()

    plain, _ = stepped(None)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    scaled, state = stepped(scaler)
    assert torch.allclose(plain, scaled, atol=1e-7) and state["grad_scaler"]["scale"] == 2.0**10
    fresh = ParamOptimizer(torch.nn.Linear(3, 1), lr=0.1, scaler=torch.amp.GradScaler("cpu", init_scale=1.0))
    fresh.load_state(state)
    assert fresh.scaler.get_scale() == 2.0**10  # resume goes on with the scale it had


def test_wandb_logs_offline_the_scalars_and_the_figures(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)  # offline is the default: nothing leaves the machine
    run = _run(tmp_path, "wandb")
    history = [json.loads(line) for line in (run.run_dir / "metrics.jsonl").read_text().splitlines()]
    logs = run.run_dir / "logs"
    run_id = (logs / "wandb_run_id").read_text().strip()
    records = sorted((logs / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert records, "no offline W&B run"
    scalars = records[0].read_bytes()  # the training's run: its history records hold the values as JSON
    for rec in history:
        assert json.dumps(rec["train_elbo"]).encode() in scalars
    images = list((logs / "wandb").glob(f"offline-run-*-{run_id}/files/media/images/figures_*.png"))
    assert len(images) == len(list(run.run_dir.glob("*.png")))
