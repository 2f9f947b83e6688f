"""ppl_vae.save / ppl_vae.load: a flat folder (safetensors, JSON, model card) that loads back to identical outputs,
without pickle and without running code from the folder (every registered method: tests/models/test_contract.py)."""

import json
import pickle

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributions import constraints

import ppl_vae
from ppl_vae import ModelConfig, build_model
from ppl_vae.config import Config
from ppl_vae.data import DataBundle, make_multimodal
from ppl_vae.errors import CheckpointError
from ppl_vae.experiment import Run
from ppl_vae.infer import TraceIWAE

FILES = ["README.md", "config.json", "model.safetensors"]


def tiny_images(n, shape=(1, 8, 8), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.bernoulli(torch.rand(n, *shape, generator=g), generator=g), torch.randint(0, 10, (n,), generator=g)


def tiny(name: str, **fields):
    """A small model with weights unlike a fresh build's, in eval mode, and a batch for it."""
    x, y = tiny_images(24)
    if name in ("mvae", "mmvae"):
        data = make_multimodal(DataBundle.from_tensors(x, y, num_classes=10), "poly", num_modalities=2, seed=0)
        shape, num_classes, x, y = data.shape, None, data.train_x[:6], data.train_y[:6]
    else:
        shape, num_classes = (1, 8, 8), 10
    cfg = ModelConfig(name=name, hidden=[16], latent_dim=2, **fields)
    model = build_model(cfg, shape, num_data=24, num_classes=num_classes)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval(), x[:6], y[:6]


def outputs(model, *args) -> dict:
    """Under one seed: the guide's draws, the model's log density at them, the decoder on fixed z and an IWAE loss."""
    pyro.set_rng_seed(7)
    with torch.no_grad():
        guide = poutine.trace(model.guide).get_trace(*args)
        joint = poutine.trace(poutine.replay(model.model, trace=guide)).get_trace(*args)
        out = {f"guide:{k}": s["value"] for k, s in guide.nodes.items() if s["type"] == "sample"}
        out["log_joint"] = joint.log_prob_sum()
        out["iwae"] = torch.tensor(TraceIWAE(num_particles=3).loss(model.model, model.guide, *args))
        if (
            hasattr(model, "decode")
            and isinstance(getattr(model, "latent_dim", None), int)
            and not getattr(model, "conditional", True)
        ):
            out["decode"] = model.decode(torch.linspace(-1, 1, 2 * model.latent_dim).view(2, -1))
    return out


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize(
    "name, fields",
    [
        ("vae", {}),
        ("cvae", {}),  # conditional: num_classes travels in config.json
        ("sigma_vae", {"likelihood": "gaussian", "options": {"sigma2_mode": "learned"}}),  # a PyroParam
        ("mvae", {}),  # multimodal: the data's Layout travels in config.json
    ],
)
def test_a_saved_model_loads_back_to_identical_outputs(name, fields, tmp_path):
    model, x, y = tiny(name, **fields)
    args = (x, y) if name != "vae" else (x,)
    before = outputs(model, *args)
    assert ppl_vae.save(model, tmp_path / "m") == tmp_path / "m"
    loaded = ppl_vae.load(tmp_path / "m")  # Pyro's param store is cleared: nothing of `model` is left in it
    assert type(loaded) is type(model) and not loaded.training
    assert loaded.ppl_vae_recipe == model.ppl_vae_recipe
    for k, v in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v, rtol=0, atol=0, equal_nan=True, msg=k)
    assert_same(before, outputs(loaded, *args))


def test_the_folder_is_flat_plain_files_without_pickle_and_has_a_model_card(tmp_path):
    model, _, _ = tiny("vae")
    folder = ppl_vae.save(model, tmp_path / "m", metrics={"test_elbo": -61.25}, data_name="digits")
    assert sorted(p.name for p in folder.iterdir()) == FILES  # no temporary files, no sub-folders
    for p in folder.iterdir():
        assert p.is_file() and not p.is_symlink()
        head = p.read_bytes()[:8]
        assert not head.startswith(b"\x80") and not head.startswith(b"PK\x03\x04"), p.name  # pickle / torch zip
    assert (folder / "model.safetensors").read_bytes()[8:9] == b"{"  # safetensors: header length, JSON header
    info = json.loads((folder / "config.json").read_text())
    assert info["method"] == "vae" and info["model_config"]["hidden"] == [16] and info["data_shape"] == [1, 8, 8]
    assert info["num_data"] == 24 and info["num_classes"] == 10 and info["metrics"] == {"test_elbo": -61.25}
    assert set(info["versions"]) == {"ppl_vae", "torch", "pyro"} and info["versions"]["ppl_vae"] == ppl_vae.__version__
    assert info["parameters"] == sorted(model.state_dict())
    card = (folder / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: ppl-vae\ntags:\n")
    assert "# vae (ppl-vae)" in card and "digits" in card and "| test_elbo | -61.2500 |" in card


def test_loading_never_unpickles(tmp_path, monkeypatch):
    model, x, _ = tiny("vae")
    before = outputs(model, x)
    ppl_vae.save(model, tmp_path / "m")

    def refuse(*a, **k):
        raise AssertionError("load unpickled")

    for owner, fn in ((torch, "load"), (pickle, "load"), (pickle, "loads")):
        monkeypatch.setattr(owner, fn, refuse)
    assert_same(before, outputs(ppl_vae.load(tmp_path / "m"), x))


def test_a_folder_copied_file_by_file_loads_the_same(tmp_path):
    """What upload_folder / snapshot_download do: each file's bytes under its name in another place."""
    model, x, y = tiny("cvae")
    before = outputs(model, x, y)
    ppl_vae.save(model, tmp_path / "here")
    (tmp_path / "there").mkdir()
    for p in (tmp_path / "here").iterdir():
        (tmp_path / "there" / p.name).write_bytes(p.read_bytes())
        p.unlink()
    (tmp_path / "here").rmdir()
    assert_same(before, outputs(ppl_vae.load(tmp_path / "there"), x, y))


def test_a_method_not_registered_here_is_one_clear_error(tmp_path):
    model, _, _ = tiny("vae")
    ppl_vae.save(model, tmp_path / "m")
    info = json.loads((tmp_path / "m" / "config.json").read_text())
    info["method"] = info["model_config"]["name"] = "someone_elses_vae"
    (tmp_path / "m" / "config.json").write_text(json.dumps(info))
    with pytest.raises(CheckpointError, match=r"'someone_elses_vae'.*not registered.*Import the module.*model="):
        ppl_vae.load(tmp_path / "m")
    # the weights still go into an instance of the right architecture
    assert ppl_vae.load(tmp_path / "m", model=tiny("vae")[0]) is not None


def test_a_tampered_shape_or_another_configuration_is_one_clear_error(tmp_path):
    model, _, _ = tiny("vae")
    ppl_vae.save(model, tmp_path / "m")
    weights = load_file(tmp_path / "m" / "model.safetensors")
    key = next(k for k in weights if k.endswith("weight"))
    saved = tuple(weights[key].shape)
    weights[key] = torch.zeros(saved[0] + 1, *saved[1:])
    save_file(weights, tmp_path / "m" / "model.safetensors")
    expected = (saved[0] + 1, *saved[1:])
    with pytest.raises(CheckpointError, match=rf"'{key}' has shape \({expected[0]}, .*in the folder, \({saved[0]}, "):
        ppl_vae.load(tmp_path / "m")
    ppl_vae.save(model, tmp_path / "m", overwrite=True)
    wider = build_model(ModelConfig(name="vae", hidden=[32], latent_dim=2), (1, 8, 8), num_data=24, num_classes=10)
    with pytest.raises(CheckpointError, match=r"has shape .* in the folder, .*32.* in the model"):
        ppl_vae.load(tmp_path / "m", model=wider)


class MyProgram(nn.Module):
    """A Pyro program of a user's own (not registered), with param-store entries outside its module."""

    def __init__(self):
        super().__init__()
        self.decoder = nn.Linear(2, 4)

    def model(self, x):
        pyro.module("mine", self)
        scale = pyro.param("noise", torch.tensor(0.5), constraint=constraints.positive)
        shift = pyro.param("shift", torch.tensor(1.0), constraint=constraints.interval(0.0, 3.0))
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
            pyro.sample("x", dist.Normal(self.decoder(z) + shift, scale).to_event(1), obs=x)

    def guide(self, x):
        loc = pyro.param("q_loc", torch.zeros(2))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(loc, 1.0).to_event(1))


def test_a_users_own_program_loads_into_its_instance_with_its_param_store(tmp_path):
    x = torch.randn(5, 4)
    mine = MyProgram()
    svi = pyro.infer.SVI(mine.model, mine.guide, pyro.optim.Adam({"lr": 0.1}), pyro.infer.Trace_ELBO())
    for _ in range(3):
        svi.step(x)
    before = outputs(mine, x)
    ppl_vae.save(mine, tmp_path / "m")
    info = json.loads((tmp_path / "m" / "config.json").read_text())
    assert info["method"] is None and info["model_class"].endswith("MyProgram")
    assert info["param_store"] == {
        "noise": {"constraint": "positive"},
        "shift": {"constraint": {"name": "interval", "lower_bound": 0.0, "upper_bound": 3.0}},
        "q_loc": {"constraint": "real"},
    }
    with pytest.raises(CheckpointError, match=r"MyProgram that build_model did not build.*model=my_model"):
        ppl_vae.load(tmp_path / "m")
    loaded = ppl_vae.load(tmp_path / "m", model=MyProgram())
    store = pyro.get_param_store()
    assert sorted(store.keys()) == ["noise", "q_loc", "shift"] and store._constraints["shift"].upper_bound == 3.0
    assert_same(before, outputs(loaded, x))
    # the store is global: param_store= picks the program's own entries among others'
    pyro.param("someone_elses", torch.ones(3))
    ppl_vae.save(loaded, tmp_path / "m", param_store=["noise", "shift", "q_loc"], overwrite=True)
    assert sorted(json.loads((tmp_path / "m" / "config.json").read_text())["param_store"]) == [
        "noise",
        "q_loc",
        "shift",
    ]
    with pytest.raises(CheckpointError, match=r"param_store names \['nosie'\], which are not entries"):
        ppl_vae.save(loaded, tmp_path / "m", param_store=["nosie"], overwrite=True)


def test_a_registered_model_saves_none_of_the_entries_other_models_left_in_the_store(tmp_path):
    other, x, y = tiny("cvae")
    outputs(other, x, y)  # its parameters are in Pyro's global param store now
    pyro.param("someone_elses", torch.ones(3))
    model, x, y = tiny("mvae")
    before = outputs(model, x, y)
    ppl_vae.save(model, tmp_path / "m")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["param_store"] == {}
    assert sorted(load_file(tmp_path / "m" / "model.safetensors")) == sorted(model.state_dict())
    assert_same(before, outputs(ppl_vae.load(tmp_path / "m"), x, y))


def test_a_run_is_saved_with_its_metrics_and_data_on_the_card(tmp_path):
    model, _, _ = tiny("vae")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.json").write_text(json.dumps({"test_elbo": -70.0, "stopped_early": False}))
    (tmp_path / "run" / "evaluation.json").write_text(json.dumps({"test_log_likelihood": -65.5, "latents": {}}))
    cfg = Config()
    cfg.data.name = "digits"
    run = Run(cfg, DataBundle.from_tensors(*tiny_images(24), num_classes=10), model, tmp_path / "run", "cpu")
    folder = ppl_vae.save(run, tmp_path / "m", metrics={"test_elbo": -69.0})
    info = json.loads((folder / "config.json").read_text())
    assert info["metrics"] == {"test_elbo": -69.0, "test_log_likelihood": -65.5} and info["data_name"] == "digits"
    card = (folder / "README.md").read_text()
    assert "| test_log_likelihood | -65.5000 |" in card and '- "digits"' in card
    with pytest.raises(CheckpointError, match="holds a saved model already.*overwrite=True"):
        ppl_vae.save(run, tmp_path / "m")
