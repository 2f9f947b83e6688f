"""Faults met on the evaluation side (issue 33), each where the user met it — mostly ``ppl-vae`` in this process:

* ``gaps --nuts`` on a mixture prior (VLAC's) ran all the gap work, then failed inside NUTS; a latent NUTS cannot
  transform is now refused before any work, by name, and a real-valued mixture prior is sampled on the reals;
* ``gaps`` on a masked Gaussian guide (MMVM's, missing modalities) was refused unless one found ``family='diag'``;
  hints now speak the interface they appear in (``--family diag`` / ``data.download=true`` on the command line);
* ``sample`` on a method defined outside the package ended in "unexpected AttributeError";
* the library's own warnings (``pyro.module`` on frozen parameters in ``gap_report``) reached the user.
"""

from __future__ import annotations

import json
import math
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from PIL import Image

import ppl_vae
from ppl_vae.cli import main
from ppl_vae.config import TrainConfig
from ppl_vae.errors import ProgramError
from ppl_vae.evaluate import gap_report, nuts_posterior, optimised_guide
from ppl_vae.infer.trace_checks import IWAEError
from tests.infer.test_signature import TutorialVAE

TINY = ["--no-progress", "--no-figures", "train.epochs=1", "data.limit=300", "model.hidden=[16]", "model.latent_dim=2"]
GAPS = ["--num-images", "2", "--num-samples", "8", "--steps", "2", "--num-particles", "2", "--elbo-particles", "4"]
NUTS = ["--nuts", "1", "--nuts-chains", "2", "--nuts-samples", "6", "--nuts-warmup", "6"]
VLAC = ["model.name=vlac", "model.options.layers=1", "model.options.warmup_epochs=0", "model.options.num_components=3"]


def _train(run, *overrides):
    assert main(["train", "--run-dir", str(run), *TINY, *overrides]) == 0


# ---- 1. NUTS on a mixture prior; a latent NUTS cannot transform is refused first


def test_gaps_nuts_samples_a_real_valued_mixture_prior(tmp_path, capsys):
    run = tmp_path / "vlac"
    _train(run, *VLAC)  # p(z) = Σ_c π_c N(μ_c, σ_c): a MixtureSameFamily site
    capsys.readouterr()
    assert main(["gaps", str(run), *GAPS, *NUTS]) == 0, capsys.readouterr().err
    out = json.loads((run / "gaps.json").read_text())
    row = out["nuts"]["images"][0]
    assert out["sites"] == ["z1"] and math.isfinite(row["log_px_nuts_is"]) and len(row["nuts_mean"]) == 2
    assert len(set(row["nuts_mean"])) == 2 and all(v > 0 for v in row["nuts_var"])  # the chains moved


def test_nuts_on_a_gaussian_mixture_prior_matches_the_exact_posterior():
    """p(z) = ½ N(−½, 1) + ½ N(½, 1), x | z ~ N(z, 1), x = 1: the posterior is ½-½ reweighted, a mixture of
    N((μ_k + x)/2, ½) with weights ∝ N(x; μ_k, 2) — mean 0.561, variance 0.559."""
    components = dist.Normal(torch.tensor([[-0.5], [0.5]]), 1.0).to_event(1)

    def model(x, y=None):
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.MixtureSameFamily(dist.Categorical(logits=torch.zeros(2)), components))
            pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)

    w = torch.softmax(torch.tensor([-0.25, -2.25]) / 4, 0)  # log N(1; μ_k, 2) up to a constant, μ = (½, −½)
    means = torch.tensor([0.75, 0.25])
    mean, var = float(w @ means), float(w @ (0.5 + means**2) - (w @ means) ** 2)
    ref = nuts_posterior(model, torch.ones(1, 1), num_chains=2, num_samples=300, warmup_steps=150, seed=0)
    z = torch.as_tensor(ref["draws"]["z"]).flatten()
    assert z.mean().item() == pytest.approx(mean, abs=0.15) and z.var().item() == pytest.approx(var, rel=0.3)
    assert ref["divergences"] == 0 and ref["max_rhat"] < 1.1


def test_a_latent_nuts_cannot_transform_is_refused_by_name_before_any_work():
    """A mixture of Uniforms with bounds of their own has no one support to transform: named, before the work."""
    calls = []
    components = dist.Uniform(torch.tensor([[-3.0], [-1.0]]), torch.tensor([[1.0], [3.0]])).to_event(1)

    def model(x, y=None):
        calls.append(len(x))
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.MixtureSameFamily(dist.Categorical(logits=torch.zeros(2)), components))
            pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)

    def guide(x, y=None):
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Normal(0.1 * x, 0.1).to_event(1))

    x = torch.tensor([[0.5], [-0.2], [0.1]])
    with pytest.raises(
        ProgramError, match=r"latent site 'z': its MixtureSameFamily has the support .*\(nuts_images=0\)"
    ):
        gap_report(model, guide, x, num_samples=50, steps=50, elbo_particles=50, nuts_images=1)
    assert len(calls) <= 3  # one run per check, none of the work (log p̂, 50 optimisation steps, the ELBOs)
    with ppl_vae.errors.interface("cli"), pytest.raises(ProgramError, match=r"\(--nuts 0\)"):
        gap_report(model, guide, x, nuts_images=1)
    with pytest.raises(ProgramError, match="latent site 'z'"):
        nuts_posterior(model, x[:1], num_chains=1, num_samples=4, warmup_steps=2)
    assert gap_report(model, guide, x, num_samples=20, steps=5, elbo_particles=20)["sites"] == ["z"]  # without NUTS


# ---- 2. masked Gaussian guides; hints in the words of the interface


def test_gaps_takes_a_masked_gaussian_guide(tmp_path, capsys):
    run = tmp_path / "mmvm"
    mm = ["model.name=mmvm", "data.multimodal=poly", "data.num_modalities=2", "data.missing_rate=0.3"]
    _train(run, *mm)
    capsys.readouterr()
    assert main(["gaps", str(run), *GAPS]) == 0, capsys.readouterr().err  # no --family needed
    out = json.loads((run / "gaps.json").read_text())
    assert out["sites"] == ["z_m0", "z_m1"] and math.isfinite(out["amortisation"]["mean"])


def test_masked_latents_stay_masked_in_the_per_datapoint_guide():
    """Datapoint 1 lacks its latent (masked in the model and the guide): its log-weight is 0 for any q, so the
    per-datapoint Gaussian must leave it at 0 — unmasked, −log q(z) would grow without bound."""
    keep = torch.tensor([True, False])

    def model(x, y=None):
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(torch.zeros(len(x), 2), 1.0).to_event(1).mask(keep))
            pyro.sample("x", dist.Normal(z, 0.5).to_event(1).mask(keep), obs=x)

    def guide(x, y=None):
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Normal(0.5 * x, 0.8).to_event(1).mask(keep))

    x = torch.tensor([[1.0, -1.0], [0.3, 0.2]])
    g = ppl_vae.evaluate.amortisation_gap(model, guide, x, family="diag", steps=200, lr=5e-2, elbo_particles=2000)
    assert g["optimised"][1] == 0 and g["amortised"][1] == 0
    # datapoint 0: the exact posterior N(0.8 x, 0.2) is in the family; q* reaches it (gap = KL(q ‖ p(z|x)) > 0)
    assert g["gap"][0] > 0.05
    local = optimised_guide(model, guide, x, steps=2)  # no family given: the guide's own (diag), and its mask
    fn = pyro.poutine.trace(local).get_trace(x).nodes["z"]["fn"]
    assert isinstance(fn, dist.MaskedDistribution) and fn._mask.tolist() == [True, False]


def test_the_family_hint_speaks_the_interface_it_appears_in(tmp_path, capsys):
    run = tmp_path / "gamix"
    _train(run, "model.name=gamix", "model.options.num_components=2")  # a mixture guide: no Gaussian site
    capsys.readouterr()
    assert main(["gaps", str(run), *GAPS]) == 2
    err = capsys.readouterr().err
    assert "got DiagNormalMixture (site 'z'); for another family give --family diag or --family full" in err
    assert "family='diag'" not in err and "datapoint-draws" not in err  # the CLI's words, before any work
    assert main(["gaps", str(run), *GAPS, "--family", "diag"]) == 0
    m = ppl_vae.load_run(run).model
    x = ppl_vae.load_data("digits", limit=300).test_x[:2]
    with pytest.raises(IWAEError, match=r"give family='diag' or family='full'") as e:
        gap_report(m.model, m.guide, x, num_samples=8, steps=2, elbo_particles=4)
    assert "--family" not in str(e.value)


def test_the_data_download_hint_speaks_the_interface_it_appears_in(tmp_path, capsys):
    missing = tmp_path / "no_mnist"
    assert main(["train", "data.name=mnist", f"data.root={missing}", "--run-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "add data.download=true (needs internet" in err and "give it as data.root=FOLDER" in err
    assert "download=True" not in err and "pass it as root" not in err
    with pytest.raises(ppl_vae.errors.DataError) as e:
        ppl_vae.load_data("mnist", root=missing)
    assert "pass download=True" in str(e.value) and "data.download" not in str(e.value)


# ---- 3. `ppl-vae sample` on methods defined outside the package

METHODS = '''
import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule, pyro_method
from torch import nn

from ppl_vae import data_plate, register_model


class SamplingVAE(PyroModule):
    """A method with the figure API (encode/decode/sample) but no ``conditional`` or ``num_classes``."""

    def __init__(self, shape, latent_dim, hidden, num_data):
        super().__init__()
        self.shape, self.latent_dim, self.num_data = tuple(shape), latent_dim, num_data
        d = int(torch.tensor(shape).prod())
        self.enc = nn.Sequential(nn.Flatten(), nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, 2 * latent_dim))
        self.dec = nn.Sequential(nn.Linear(latent_dim, hidden), nn.ReLU(), nn.Linear(hidden, d))

    @pyro_method
    def model(self, x, y=None):
        with data_plate(x, self.num_data):
            z = pyro.sample("z", dist.Normal(x.new_zeros(len(x), self.latent_dim), 1.0).to_event(1))
            logits = self.dec(z).reshape(len(x), *self.shape)
            pyro.sample("x", dist.Bernoulli(logits=logits, validate_args=False).to_event(len(self.shape)), obs=x)

    @pyro_method
    def guide(self, x, y=None):
        with data_plate(x, self.num_data):
            loc, scale = self.encode(x)
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    def encode(self, x, y=None):
        loc, raw = self.enc(x).chunk(2, -1)
        return loc, nn.functional.softplus(raw) + 1e-4

    def decode(self, z, y=None):
        return torch.sigmoid(self.dec(z)).reshape(len(z), *self.shape)

    def reconstruct(self, x, y=None):
        return self.decode(self.encode(x)[0])

    def sample(self, n, y=None):
        return self.decode(torch.randn(n, self.latent_dim))


class ProgramVAE(nn.Module):
    """A Pyro program and nothing else: model(x) and guide(x) (Pyro's tutorial), no sample/encode/decode."""

    def __init__(self, shape, latent_dim, hidden):
        super().__init__()
        self.shape, self.latent_dim = tuple(shape), latent_dim
        d = int(torch.tensor(shape).prod())
        self.enc = nn.Sequential(nn.Flatten(), nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, 2 * latent_dim))
        self.dec = nn.Sequential(nn.Linear(latent_dim, hidden), nn.ReLU(), nn.Linear(hidden, d), nn.Sigmoid())

    def model(self, x):
        pyro.module("dec", self.dec)
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(x.new_zeros(len(x), self.latent_dim), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(self.dec(z), validate_args=False).to_event(1), obs=x.reshape(len(x), -1))

    def guide(self, x):
        pyro.module("enc", self.enc)
        with pyro.plate("data", len(x)):
            loc, raw = self.enc(x).chunk(2, -1)
            pyro.sample("z", dist.Normal(loc, nn.functional.softplus(raw) + 1e-4).to_event(1))


@register_model("faults_sampling_vae")
def build_sampling(cfg, options, data_shape, num_data, num_classes):
    return SamplingVAE(data_shape, cfg.latent_dim, cfg.hidden[0], num_data)


@register_model("faults_program_vae")
def build_program(cfg, options, data_shape, num_data, num_classes):
    return ProgramVAE(data_shape, cfg.latent_dim, cfg.hidden[0])
'''


@pytest.fixture(scope="module")
def methods_file(tmp_path_factory):
    """The file of the two methods (one file for both: a method is registered once per process)."""
    file = tmp_path_factory.mktemp("methods") / "faults_methods.py"
    file.write_text(METHODS)
    return file


@pytest.mark.parametrize("method", ["faults_sampling_vae", "faults_program_vae"])
def test_sample_draws_from_a_method_defined_outside_the_package(method, methods_file, tmp_path, capsys):
    run = tmp_path / "run"
    _train(run, f"imports=[{methods_file}]", f"model.name={method}", "data.pixels=binary_static")
    capsys.readouterr()
    assert main(["sample", str(run), "--n", "9", "--seed", "1"]) == 0, capsys.readouterr().err
    with Image.open(run / "samples.png") as img:
        first = img.convert("L").tobytes()
        assert img.size[0] > 3 * 8 and img.size[1] > 3 * 8  # 3 × 3 digits of 8 × 8 pixels, under a title
    assert main(["sample", str(run), "--n", "9", "--seed", "1"]) == 0  # seeded: the same grid again
    with Image.open(run / "samples.png") as img:
        assert img.convert("L").tobytes() == first
    agg = [
        "sample",
        str(run),
        "--n",
        "4",
        "--from",
        "aggregate",
        "--num-components",
        "2",
        "--out",
        str(tmp_path / "a.png"),
    ]
    if method == "faults_sampling_vae":
        assert main(agg) == 0
    else:  # refused by name, with what it lacks and the way that works
        assert main(agg) == 2
        err = capsys.readouterr().err
        assert "ProgramError: --from aggregate decodes draws of the aggregate posterior" in err
        assert "the method 'faults_program_vae' (ProgramVAE) has no encode or decode" in err
        assert "(--from prior)" in err and "unexpected" not in err


def test_sample_runs_a_multimodal_program_forwards_or_refuses_by_name(tmp_path, capsys):
    mm = ["data.multimodal=poly", "data.num_modalities=2"]
    run = tmp_path / "mvae"
    _train(run, "model.name=mvae", *mm)
    run_m = ppl_vae.load_run(run)
    images = ppl_vae.experiment.sample_run(run_m, 6, seed=0)
    assert images.shape == (12, 1, 8, 8)  # each draw's two modalities side by side
    assert torch.equal(images, ppl_vae.experiment.sample_run(run_m, 6, seed=0))
    mmvm = tmp_path / "mmvm"
    _train(mmvm, "model.name=mmvm", *mm)
    capsys.readouterr()
    assert main(["sample", str(mmvm), "--n", "4"]) == 2
    err = capsys.readouterr().err
    assert "ProgramError: the method 'mmvm' (MMVM) has no prior to sample: its prior depends on the data" in err


# ---- 4. no warning of the library's own reaches the user


def test_gamix_adversarial_training_and_gap_report_warn_nothing(tmp_path, capsys):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        adv = ["model.name=gamix", "model.options.adversarial=1.0", "model.options.disc_width=0.25"]
        _train(tmp_path / "gamix", *adv, "data.pixels=continuous", "model.likelihood=laplace")
        digits = ppl_vae.load_data("digits", pixels="binary_static", seed=0, limit=300)
        vae = TutorialVAE()  # pyro.module-registered networks, left in training mode after training
        ppl_vae.train(vae, digits, TrainConfig(epochs=1, batch_size=100, logger="none"), progress=False)
        assert vae.training
        report = gap_report(
            vae.model,
            vae.guide,
            digits.test_x[:2],
            num_samples=8,
            steps=2,
            num_particles=2,
            elbo_particles=4,
            parameters=list(vae.parameters()),
            nuts_images=1,
            nuts={"num_chains": 2, "num_samples": 10, "warmup_steps": 10},
        )
    assert [f"{w.filename}:{w.lineno}: {w.message}" for w in caught] == []
    assert math.isfinite(report["amortisation"]["mean"]) and len(report["nuts"]["images"]) == 1
    assert vae.training and all(p.requires_grad for p in vae.parameters())  # left as they were
