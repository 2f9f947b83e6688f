"""The training plan and the one training path: reported ELBOs for every data-plate convention a Pyro user writes
(against the linear-Gaussian model's exact ELBO), plan lookup, multi-stage plans and their resume, no probing of
models, no import cycles."""

import ast
import importlib
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO

import ppl_vae
from ppl_vae import Stage, TrainConfig, TrainingPlan, plan_for, train, training_plan
from ppl_vae.data import DataBundle
from ppl_vae.infer import TraceIWAE
from ppl_vae.models import LinearGaussianVAE
from ppl_vae.training import evaluate_elbo

REPO = Path(__file__).resolve().parents[2]
D, d, N, B = 5, 2, 60, 20


class UserPPCA:
    """A user's own probabilistic PCA written outside the library, with a fixed exact posterior guide (so every
    ELBO equals log p(x) exactly), in one of three data-plate conventions:
    ``"subsampled"`` — ``pyro.plate("data", N, subsample=...)``, Pyro's scaling to the data set;
    ``"minibatch"`` — ``pyro.plate("data", len(x))``, as in Pyro's VAE example (no scaling);
    ``"renamed"`` — the minibatch convention with a plate called ``"batch"``."""

    def __init__(self, convention, exact: LinearGaussianVAE):
        self.convention, self.exact = convention, exact

    def plate(self, x):
        if self.convention == "subsampled":
            return pyro.plate("data", N, subsample=torch.arange(len(x)))
        return pyro.plate("batch" if self.convention == "renamed" else "data", len(x))

    def model(self, x, y=None):
        W = pyro.param("W", self.exact.W.detach().clone())
        with self.plate(x):
            z = pyro.sample("z", dist.Normal(torch.zeros(len(x), d), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ W.T + self.exact.b.detach(), self.exact.sigma).to_event(1), obs=x)

    def guide(self, x, y=None):
        with self.plate(x):
            mu, cov = self.exact.posterior(x)
            pyro.sample("z", dist.MultivariateNormal(mu.detach(), covariance_matrix=cov.detach()))


def _exact_setup():
    exact = LinearGaussianVAE(D, d, sigma=0.5, seed=0)
    g = torch.Generator().manual_seed(1)
    data = DataBundle.from_tensors(exact.simulate(N, g), val_x=exact.simulate(30, g))
    return exact, data


@pytest.mark.parametrize("objective", ["elbo", "iwae"])
@pytest.mark.parametrize("convention", ["subsampled", "minibatch", "renamed"])
def test_reported_elbos_are_per_datapoint_for_every_plate_convention(convention, objective):
    exact, data = _exact_setup()
    user = UserPPCA(convention, exact)
    cfg = TrainConfig(epochs=1, batch_size=B, lr=1e-9, eval_batch_size=7, objective=objective, num_particles=3)
    res = train(
        (user.model, user.guide),
        data,
        cfg,
        progress=False,
        plan=None if convention != "renamed" else RenamedPlan((user.model, user.guide)),
    )
    with torch.no_grad():
        want_train = float(exact.log_marginal(data.train_x).mean())
        want_val = float(exact.log_marginal(data.val_x).mean())
    rec = res.history[0]
    # exact guide: each ELBO / IWAE bound is log p(x) for every draw, so the reports are exact (float32 error)
    assert rec["train_elbo"] == pytest.approx(want_train, abs=1e-3)
    assert rec["val_elbo"] == pytest.approx(want_val, abs=1e-3)  # batches of 7, the last one of 2
    expected = {
        "subsampled": f"subsampled to N = {N}",
        "minibatch": "over the minibatch only",
        "renamed": "over the minibatch only",
    }[convention]
    assert res.data_plate["convention"] == expected
    assert res.data_plate["name"] == ("batch" if convention == "renamed" else "data")


class RenamedPlan(TrainingPlan):
    """The plate is not called "data": TraceIWAE must be told its name (Trace_ELBO finds it by its size)."""

    def objective(self, train):
        if train.objective == "iwae":
            return TraceIWAE(num_particles=train.num_particles, data_plate="batch")
        return super().objective(train)


def test_the_old_factor_b_over_n_error_is_gone_for_a_minibatch_plate():
    """Pyro's VAE example convention used to be reported (B/N) too small; it now matches the subsampled model."""
    exact, data = _exact_setup()
    reports = {}
    for convention in ("subsampled", "minibatch"):
        user = UserPPCA(convention, exact)
        pyro.clear_param_store()
        reports[convention] = train(
            (user.model, user.guide), data, TrainConfig(epochs=1, batch_size=B, lr=1e-9), progress=False
        ).history[0]["train_elbo"]
    assert reports["minibatch"] == pytest.approx(reports["subsampled"], abs=1e-3)
    with torch.no_grad():
        assert evaluate_elbo(*_pair("minibatch", exact), data, Trace_ELBO(), "val", 9, "cpu") == pytest.approx(
            float(exact.log_marginal(data.val_x).mean()), abs=1e-3
        )


def _pair(convention, exact):
    u = UserPPCA(convention, exact)
    return u.model, u.guide


class Tracked(torch.nn.Module):
    """A user's module with a plan of two stages; records what the plan was asked to do."""

    def __init__(self):
        super().__init__()
        self.loc = torch.nn.Parameter(torch.zeros(3))
        self.register_buffer("stage", torch.tensor(1))
        self.calls = []

    def model(self, x, y=None):
        pyro.module("tracked", self)
        with pyro.plate("data", 40, subsample=torch.arange(len(x))):
            pyro.sample("x", dist.Normal(self.loc * self.stage, 1.0).to_event(1), obs=x)

    def guide(self, x, y=None):
        pass


@training_plan(Tracked)
class TrackedPlan(TrainingPlan):
    def stages(self, train):
        return [
            Stage("warm", train),
            Stage("main", TrainConfig(**{**train.__dict__, "epochs": 3}), first_scored_epoch=2),
        ]

    def begin_stage(self, stage):
        self.model.calls.append(("begin", stage.name))
        if stage.name == "main":
            self.model.stage.fill_(2)

    def on_epoch_end(self, epoch, record, data):
        self.model.calls.append(("epoch", epoch))
        record["stage_buffer"] = int(self.model.stage)


def test_a_registered_plan_is_found_by_class_and_runs_its_stages(tmp_path):
    data = DataBundle.from_tensors(torch.randn(40, 3) + 1.0, val_x=torch.randn(10, 3) + 1.0)
    m = Tracked()
    assert isinstance(plan_for(m), TrackedPlan) and type(plan_for(torch.nn.Linear(1, 1))) is TrainingPlan
    res = train(m, data, TrainConfig(epochs=2, batch_size=20, lr=0.1), run_dir=tmp_path, progress=False)
    assert m.calls == [
        ("begin", "warm"),
        ("epoch", 0),
        ("epoch", 1),
        ("begin", "main"),
        ("epoch", 0),
        ("epoch", 1),
        ("epoch", 2),
    ]
    assert [h["stage"] for h in res.history] == [1, 1, 2, 2, 2]
    assert [h["epoch"] for h in res.history] == [1, 2, 3, 4, 5]
    assert [h["stage_buffer"] for h in res.history] == [1, 1, 2, 2, 2]
    assert res.best_epoch >= 4  # stage "main" scores from its 2nd epoch
    assert (tmp_path / "warm" / "checkpoint.pt").is_file() and (tmp_path / "best.pt").is_file()
    assert set(res.stages) == {"warm", "main"}


def test_a_killed_multi_stage_run_resumes_in_the_stage_it_was_in(tmp_path):
    data = DataBundle.from_tensors(torch.randn(40, 3) + 1.0, val_x=torch.randn(10, 3) + 1.0)
    cfg = TrainConfig(epochs=2, batch_size=20, lr=0.1)
    pyro.set_rng_seed(0)
    whole = train(Tracked(), data, cfg, run_dir=tmp_path / "whole", progress=False)

    class Killed(Exception):
        pass

    m = Tracked()
    plan = plan_for(m)
    original = plan.on_epoch_end

    def dies(epoch, record, data):
        original(epoch, record, data)
        if len(m.calls) == 6:  # the second epoch of stage "main", before its checkpoint
            raise Killed

    plan.on_epoch_end = dies
    with pytest.raises(Killed):
        train(m, data, cfg, plan=plan, run_dir=tmp_path / "killed", progress=False)
    fresh = Tracked()
    resumed = train(fresh, data, cfg, run_dir=tmp_path / "killed", resume=True, progress=False)
    assert ("begin", "main") not in fresh.calls  # the stage had begun: not begun again
    assert [h["train_elbo"] for h in resumed.history] == [h["train_elbo"] for h in whole.history]
    assert resumed.best_epoch == whole.best_epoch


def _source(path):
    return path.read_text()


def test_no_probing_of_models_in_the_training_path():
    training = [REPO / "ppl_vae" / "training" / f for f in ("loop.py", "stages.py", "plan.py", "probe.py")]
    for path in [REPO / "ppl_vae" / "experiment.py", *training, *sorted((REPO / "ppl_vae" / "infer").glob("*.py"))]:
        for node in ast.walk(ast.parse(_source(path))):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id in ("hasattr", "getattr")
            ):
                raise AssertionError(f"{path.name}:{node.lineno}: {node.func.id}(...) in the training path")


def _modules():
    names = ["ppl_vae"]
    for info in pkgutil.walk_packages(ppl_vae.__path__, "ppl_vae."):
        if info.name != "ppl_vae.__main__":  # (runs the command line)
            names.append(info.name)
    return sorted(names)


def test_every_module_imports_on_its_own_in_a_fresh_interpreter():
    """An import cycle shows up as an ImportError when the cycle's second module is imported first."""
    code = (
        "import importlib, sys\n"
        "for name in sys.argv[1:]:\n"
        "    for m in [k for k in sys.modules if k == 'ppl_vae' or k.startswith('ppl_vae.')]:\n"
        "        del sys.modules[m]\n"
        "    importlib.import_module(name)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, *_modules()], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]


def test_no_imports_inside_functions_and_no_private_cross_imports_between_method_files():
    # optional or slow dependencies loaded on first use (ais.py: evaluate/reference.py, which imports ArviZ)
    lazy_ok = {"cli.py", "evaluate/__init__.py", "data/sources.py", "evaluate/ais.py"}
    pkg = REPO / "ppl_vae"
    for path in sorted(pkg.rglob("*.py")):
        rel = str(path.relative_to(pkg))
        tree = ast.parse(_source(path))
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) and rel not in lazy_ok:
                for node in ast.walk(fn):
                    if isinstance(node, ast.ImportFrom) and node.module and node.level > 0:
                        raise AssertionError(f"{rel}:{node.lineno}: a package import inside a function")
        if rel.startswith("models/") and rel != "models/__init__.py":
            for node in ast.walk(tree):
                if (
                    isinstance(node, ast.ImportFrom)
                    and node.level == 1
                    and node.module not in ("_common", "registry", "vae", "multimodal_base")
                ):
                    raise AssertionError(
                        f"{rel}:{node.lineno}: method files import only the shared parts "
                        f"(_common, registry, multimodal_base) and the base VAE, not {node.module!r}"
                    )
                if isinstance(node, ast.ImportFrom):
                    for alias in node.names:
                        assert not alias.name.startswith("_") or alias.name == "annotations", (rel, alias.name)
    assert not re.search(
        r"from \.+experiment|import experiment", "".join(_source(p) for p in (pkg / "models").glob("*.py"))
    )


def test_old_method_names_still_build_with_a_deprecation_warning():
    from ppl_vae import ModelConfig, build_model

    for old, cls in (
        ("vae_laplace", ppl_vae.models.VLAE),
        ("vae_recursive", ppl_vae.models.RME),
        ("vae_gamix", ppl_vae.models.GAMIX),
    ):
        with pytest.warns(DeprecationWarning, match="is now called"):
            m = build_model(ModelConfig(name=old, latent_dim=2, hidden=[8]), (1, 4, 4), num_data=10)
        assert type(m) is cls


def test_models_package_exports_every_model_class():
    names = set(ppl_vae.models.__all__)
    for cls in ("VAE", "VAE2", "LinearGaussianVAE", "VLAE", "RME", "GAMIX", "LaDDer", "WiseALE", "SigmaVAE"):
        assert cls in names and isinstance(getattr(ppl_vae.models, cls), type)
    for entry in (
        "train",
        "load_run",
        "evaluate_run",
        "diagnose_run",
        "build_model",
        "run_experiment",
        "TraceIWAE",
        "WiseAleELBO",
        "TrainingPlan",
        "register_model",
    ):
        assert callable(getattr(ppl_vae, entry)), entry
    evaluate = importlib.import_module("ppl_vae.evaluate")
    assert callable(evaluate.FrechetDistance) and callable(evaluate.inference_gaps)
