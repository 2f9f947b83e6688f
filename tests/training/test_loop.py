"""The training loop against the exact linear-Gaussian oracle; resume, divergence, early stopping, warm-up."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO

from ppl_vae.config import ConfigError, TrainConfig
from ppl_vae.data import DataBundle
from ppl_vae.errors import TrainingDiverged
from ppl_vae.models import LinearGaussianVAE
from ppl_vae.training import ScaleLatents, TrainingPlan, evaluate_elbo, fit, load_checkpoint
from ppl_vae.training.checkpoint import atomic_save

REPO = Path(__file__).resolve().parents[2]


def lg_data(n=400, seed=0):
    truth = LinearGaussianVAE(6, 2, sigma=0.5, seed=100 + seed)
    g = torch.Generator().manual_seed(seed)
    x = truth.simulate(n + 100, g)
    return DataBundle.from_tensors(x[:n], val_x=x[n:])


def ppca_max_loglik(x: torch.Tensor, d: int, sigma: float) -> float:
    """max over W, b of Σ log N(x; b, WWᵀ + σ²I) with σ fixed (Tipping & Bishop 1999): b = x̄,
    W = U_d (Λ_d − σ²I)^{1/2} for the top-d eigenpairs of the sample covariance."""
    xbar = x.mean(0)
    S = (x - xbar).T @ (x - xbar) / len(x)
    evals, evecs = torch.linalg.eigh(S.double())
    lam, U = evals[-d:], evecs[:, -d:]
    W = U * (lam - sigma**2).clamp_min(0).sqrt()
    C = W @ W.T + sigma**2 * torch.eye(x.shape[1], dtype=torch.double)
    return dist.MultivariateNormal(xbar.double(), covariance_matrix=C).log_prob(x.double()).sum().item()


def test_fit_with_exact_guide_reaches_the_maximum_likelihood_and_reports_exact_elbos(tmp_path):
    data = lg_data()
    model = LinearGaussianVAE(6, 2, sigma=0.5, num_data=len(data.train_x), seed=7)
    before = model.log_marginal(data.train_x).mean().item()
    cfg = TrainConfig(epochs=100, batch_size=100, lr=0.1)
    res = fit((model.model, model.guide), data, cfg, objective=Trace_ELBO(), run_dir=tmp_path, progress=False)
    with torch.no_grad():
        after = model.log_marginal(data.train_x).mean().item()
        best = ppca_max_loglik(data.train_x, 2, 0.5) / len(data.train_x)
        # the guide is the exact posterior, so the reported validation ELBO is exactly the mean log evidence
        val = evaluate_elbo(model.model, model.guide, data, Trace_ELBO(), "val", 500, "cpu", len(data.train_x))
        torch.testing.assert_close(torch.tensor(val), model.log_marginal(data.val_x).mean(), atol=1e-4, rtol=1e-6)
        assert res.history[-1]["val_elbo"] == pytest.approx(val, abs=1e-4)
    assert before < best - 1.0
    assert best - 0.005 < after <= best + 1e-6
    lines = [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == list(range(1, 101))
    assert (tmp_path / "checkpoint.pt").exists() and (tmp_path / "best.pt").exists()


def _history(records):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


def test_resume_in_process_reproduces_an_uninterrupted_run(tmp_path):
    data = lg_data(200)
    kw = dict(batch_size=50, lr=0.02, lr_schedule="step", lr_step=2, lr_gamma=0.5, kl_warmup_epochs=2)

    def run(epochs, run_dir, resume=False):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        m = LinearGaussianVAE(6, 2, sigma=0.5, num_data=200, guide_type="amortized", seed=3)
        return fit(
            (m.model, m.guide),
            data,
            TrainConfig(epochs=epochs, **kw),
            objective=Trace_ELBO(),
            run_dir=run_dir,
            resume=resume,
            seed=5,
            progress=False,
        ), m

    full, m_full = run(6, tmp_path / "full")
    run(3, tmp_path / "part")
    resumed, m_res = run(6, tmp_path / "part", resume=True)
    assert _history(resumed.history) == _history(full.history)
    for (n1, p1), (_n2, p2) in zip(m_full.named_parameters(), m_res.named_parameters(), strict=False):
        assert torch.equal(p1, p2), n1
    assert [r["lr"] for r in full.history] == [0.02, 0.02, 0.01, 0.01, 0.005, 0.005]
    assert [r["beta"] for r in full.history] == [0.5, 1.0, 1.0, 1.0, 1.0, 1.0]


def _train_cmd(run_dir, *extra):
    return [
        sys.executable,
        "-m",
        "ppl_vae",
        "train",
        "--run-dir",
        str(run_dir),
        "--no-figures",
        "--no-progress",
        "train.epochs=40",
        "model.hidden=[64,64]",
        *extra,
    ]


def test_resume_after_killing_a_real_process_matches_an_uninterrupted_run(tmp_path):
    env = {**os.environ, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(killed), cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    metrics = killed / "metrics.jsonl"
    while time.time() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        assert proc.poll() is None, "the training process ended before it could be killed"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done_before = load_checkpoint(killed / "checkpoint.pt")["epoch"]
    assert 3 <= done_before < 40, "the run was killed part-way"

    subprocess.run(
        [sys.executable, "-m", "ppl_vae", "train", "--resume", str(killed), "--no-figures", "--no-progress"],
        cwd=REPO,
        env=env,
        check=True,
        capture_output=True,
    )
    whole = tmp_path / "whole"
    subprocess.run(_train_cmd(whole), cwd=REPO, env=env, check=True, capture_output=True)
    a = [json.loads(s) for s in (killed / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(s) for s in (whole / "metrics.jsonl").read_text().splitlines()]
    assert len(a) == len(b) == 40
    assert _history(a) == _history(b)
    assert (
        json.loads((killed / "metrics.json").read_text())["test_elbo"]
        == json.loads((whole / "metrics.json").read_text())["test_elbo"]
    )


class Exploding:
    """A user's own model/guide pair whose likelihood turns NaN from the 7th call on."""

    def __init__(self):
        self.calls = 0
        self.loc = torch.nn.Parameter(torch.zeros(3))

    def model(self, x, y=None):
        self.calls += 1
        loc = pyro.param("loc", torch.zeros(3))
        bad = float("nan") if self.calls >= 7 else 1.0
        with pyro.plate("data", 20, subsample=torch.arange(len(x))):
            pyro.sample("x", dist.Normal(loc * bad, 1.0).to_event(1), obs=x)

    def guide(self, x, y=None):
        pass


@pytest.mark.filterwarnings("ignore:Encountered NaN:UserWarning")  # the NaN is what the test makes
@pytest.mark.parametrize("validation", [True, False])
def test_nan_loss_stops_with_epoch_and_step_and_keeps_the_last_good_checkpoint(tmp_path, validation):
    data = DataBundle.from_tensors(torch.randn(20, 3))
    m = Exploding()
    with (
        pyro.validation_enabled(validation),
        pytest.raises(TrainingDiverged, match=r"epoch 2, step 2;.*checkpoint\.pt"),
    ):
        fit(
            (m.model, m.guide),
            data,
            TrainConfig(epochs=5, batch_size=4),
            objective=Trace_ELBO(),
            run_dir=tmp_path,
            progress=False,
        )
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    assert ckpt["epoch"] == 1
    assert torch.isfinite(ckpt["param_store"]["params"]["loc"]).all()


def test_early_stopping_after_patience_epochs_without_improvement(tmp_path):
    data = DataBundle.from_tensors(torch.randn(20, 3), val_x=torch.randn(10, 3))

    def model(x, y=None):  # nothing to learn: the validation ELBO never improves after epoch 1
        with pyro.plate("data", 20, subsample=torch.arange(len(x))):
            pyro.sample("x", dist.Normal(0.0, 1.0).expand([len(x), 3]).to_event(1), obs=x)

    def guide(x, y=None):
        pass

    res = fit(
        (model, guide),
        data,
        TrainConfig(epochs=10, batch_size=10, patience=2),
        objective=Trace_ELBO(),
        run_dir=tmp_path,
        progress=False,
    )
    assert res.stopped_early and len(res.history) == 3 and res.best_epoch == 1


def test_best_from_epoch_keeps_earlier_epochs_out_of_best_and_patience(tmp_path):
    """A constant validation ELBO: best.pt is the first *scored* epoch and patience counts from there."""
    data = DataBundle.from_tensors(torch.randn(20, 3), val_x=torch.randn(10, 3))

    def model(x, y=None):
        with pyro.plate("data", 20, subsample=torch.arange(len(x))):
            pyro.sample("x", dist.Normal(0.0, 1.0).expand([len(x), 3]).to_event(1), obs=x)

    def guide(x, y=None):
        pass

    res = fit(
        (model, guide),
        data,
        TrainConfig(epochs=10, batch_size=10, patience=2, best_from_epoch=4),
        objective=Trace_ELBO(),
        run_dir=tmp_path,
        progress=False,
    )
    assert res.best_epoch == 4 and res.stopped_early and len(res.history) == 6
    assert load_checkpoint(tmp_path / "best.pt")["epoch"] == 4


def test_kl_warmup_scales_only_the_latent_sites():
    m = LinearGaussianVAE(4, 2, sigma=0.5, guide_type="exact", guide_shift=0.3)
    x = m.simulate(5)
    beta = 0.25
    pyro.set_rng_seed(1)
    loss = Trace_ELBO().loss(ScaleLatents(beta)(m.model), ScaleLatents(beta)(m.guide), x)
    pyro.set_rng_seed(1)
    gtr = poutine.trace(m.guide).get_trace(x)
    mtr = poutine.trace(poutine.replay(m.model, trace=gtr)).get_trace(x)
    z = gtr.nodes["z"]["value"]
    expected = mtr.nodes["x"]["fn"].log_prob(x).sum() + beta * (
        mtr.nodes["z"]["fn"].log_prob(z).sum() - gtr.nodes["z"]["fn"].log_prob(z).sum()
    )
    assert -loss == pytest.approx(expected.item(), rel=1e-6)


def test_atomic_save_never_leaves_a_broken_file(tmp_path):
    path = tmp_path / "ckpt.pt"
    atomic_save({"a": 1}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        atomic_save({"a": Unpicklable()}, path)
    assert torch.load(path, weights_only=False) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_lr_schedules_and_warmup_are_functions_of_the_epoch():
    cfg = TrainConfig(epochs=11, lr=1.0, lr_schedule="exponential", lr_gamma=0.01)
    assert cfg.lr_at(0) == 1.0 and cfg.lr_at(10) == pytest.approx(0.01)
    cfg = TrainConfig(epochs=10, lr=1.0, lr_schedule="cosine")
    assert cfg.lr_at(0) == 1.0 and cfg.lr_at(5) == pytest.approx(0.5)
    cfg = TrainConfig(kl_warmup_epochs=4)
    assert [cfg.beta_at(e) for e in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    cfg = TrainConfig(kl_warmup_epochs=4, kl_weight=4.0)  # a β-VAE warmed up to β = 4
    assert [cfg.beta_at(e) for e in range(5)] == [1.0, 2.0, 3.0, 4.0, 4.0]
    with pytest.raises(ConfigError, match="kl_weight must be 1 with train.objective='iwae'"):
        TrainConfig(objective="iwae", kl_weight=0.5).check("train")


def test_kl_weight_scales_the_latent_terms_and_epochs_still_count_for_best(tmp_path):
    data = lg_data(200)
    m = LinearGaussianVAE(6, 2, sigma=0.5, num_data=200, seed=7)
    cfg = TrainConfig(epochs=2, batch_size=100, kl_weight=0.25)
    res = fit((m.model, m.guide), data, cfg, objective=Trace_ELBO(), progress=False)
    assert [r["beta"] for r in res.history] == [0.25, 0.25] and res.best_epoch is not None
    # the objective trained is the β-weighted one (rec − β KL > rec − KL at the same start), validation the ELBO
    m1 = LinearGaussianVAE(6, 2, sigma=0.5, num_data=200, seed=7)
    plain = fit(
        (m1.model, m1.guide), data, TrainConfig(epochs=2, batch_size=100), objective=Trace_ELBO(), progress=False
    )
    assert res.history[0]["train_elbo"] > plain.history[0]["train_elbo"] + 0.5
    assert abs(res.history[0]["val_elbo"] - plain.history[0]["val_elbo"]) < 0.5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fit_on_cuda(tmp_path):
    data = lg_data(200)
    m = LinearGaussianVAE(6, 2, sigma=0.5, num_data=200, seed=7).to("cuda")
    res = fit((m.model, m.guide), data, TrainConfig(epochs=2, batch_size=100), objective=Trace_ELBO(), progress=False)
    assert math.isfinite(res.history[-1]["val_elbo"])


def test_stop_delta_ends_training_when_the_elbo_stops_improving(tmp_path):
    data = lg_data(200)
    m = LinearGaussianVAE(6, 2, sigma=0.5, num_data=200, seed=7)
    cfg = TrainConfig(epochs=200, batch_size=100, lr=0.1, stop_delta=1e-3, min_epochs=5)
    res = fit((m.model, m.guide), data, cfg, objective=Trace_ELBO(), run_dir=tmp_path, progress=False)
    assert res.stopped_early and 5 <= len(res.history) < 200
    gains = [b["val_elbo"] - a["val_elbo"] for a, b in zip(res.history, res.history[1:], strict=False)]
    assert gains[-1] < 1e-3 and all(g >= 1e-3 for g in gains[3:-1])
    again = fit((m.model, m.guide), data, cfg, objective=Trace_ELBO(), run_dir=tmp_path, resume=True, progress=False)
    assert len(again.history) == len(res.history), "a finished run stays finished when resumed"


def test_module_buffers_are_checkpointed_and_restored(tmp_path):
    data = lg_data(100)
    m = LinearGaussianVAE(6, 2, sigma=0.5, num_data=100, seed=7)
    m.register_buffer("fitted", torch.zeros(3))

    class Bump(TrainingPlan):
        def on_epoch_end(self, epoch, record, data):
            m.fitted += 1.0

    fit(
        Bump((m.model, m.guide)),
        data,
        TrainConfig(epochs=2, batch_size=50),
        objective=Trace_ELBO(),
        run_dir=tmp_path,
        progress=False,
    )
    m2 = LinearGaussianVAE(6, 2, sigma=0.5, num_data=100, seed=8)
    m2.register_buffer("fitted", torch.zeros(3))
    fit(
        (m2.model, m2.guide),
        data,
        TrainConfig(epochs=2, batch_size=50),
        objective=Trace_ELBO(),
        run_dir=tmp_path,
        resume=True,
        progress=False,
    )
    assert torch.equal(m2.fitted, torch.full((3,), 2.0)) and torch.equal(m2.W, m.W)


def test_fit_takes_a_plan_and_the_earlier_form_still_works_with_a_warning(tmp_path):
    """fit(plan, data, config) runs the plan's hooks; fit(model_fn, guide_fn, data, elbo, config) of earlier
    releases gives the same run (bit for bit) and says it is deprecated."""
    data = lg_data()
    calls = []

    class Counting(TrainingPlan):
        def on_step_end(self, x, y):
            calls.append("step")

        def on_epoch_end(self, epoch, record, data):
            record["mine"] = epoch

    m = LinearGaussianVAE(6, 2, sigma=0.5, num_data=len(data.train_x), seed=7)
    cfg = TrainConfig(epochs=2, batch_size=100, objective="elbo")
    new = fit(Counting(m), data, cfg, progress=False)
    assert [h["mine"] for h in new.history] == [0, 1] and len(calls) == 2 * data.num_batches("train", 100)
    m2 = LinearGaussianVAE(6, 2, sigma=0.5, num_data=len(data.train_x), seed=7)
    with pytest.warns(DeprecationWarning, match=r"fit\(model_fn, guide_fn, data, elbo, config\) is deprecated"):
        old = fit(m2.model, m2.guide, data, Trace_ELBO(), cfg, progress=False)
    assert [h["train_elbo"] for h in old.history] == [h["train_elbo"] for h in new.history]


def test_validation_runs_in_eval_mode_and_leaves_batch_norm_statistics_as_trained():
    """The validation ELBO sees the modules in eval mode (no dropout; batch norm with its running statistics, which
    validation images never update), and training goes on in train mode."""
    import pyro.distributions as dist
    from torch import nn

    import ppl_vae
    from ppl_vae import TrainConfig

    class BNModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm1d(4)
            self.loc = nn.Parameter(torch.zeros(4))
            self.modes: list[bool] = []

        def model(self, x, y=None):
            self.modes.append(self.training)
            h = self.bn(x.reshape(len(x), -1)[:, :4])
            with pyro.plate("data", len(x)):
                pyro.sample("obs", dist.Normal(self.loc, 1.0).to_event(1), obs=h)

        def guide(self, x, y=None):
            pass

    torch.manual_seed(0)
    train_x = torch.randn(60, 1, 2, 2)
    val_x = 5.0 + torch.randn(40, 1, 2, 2)  # far from the training images: they would move the running mean
    data = ppl_vae.data.DataBundle.from_tensors(train_x, val_x=val_x, test_x=val_x[:4])
    m = BNModel()
    steps = []
    real_step = ppl_vae.training.loop._Loop.step

    def step(self, *args, **kwargs):
        out = real_step(self, *args, **kwargs)
        steps.append(m.bn.running_mean.clone())
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ppl_vae.training.loop._Loop, "step", step)
        res = ppl_vae.train(m, data, TrainConfig(epochs=1, batch_size=20), progress=False)
    assert "val_elbo" in res.history[0]
    torch.testing.assert_close(m.bn.running_mean, steps[-1])  # validation moved nothing
    assert m.bn.running_mean.abs().max() < 1.0 and m.training
    assert True in m.modes and False in m.modes  # trained in train mode, validated in eval mode
