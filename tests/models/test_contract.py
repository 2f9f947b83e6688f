"""The contract every registered method keeps, checked for each name in ``model_names()`` from its shipped config
(on tiny data of the config's image shape): it builds; one SVI step with its plan's objective changes its weights;
a checkpoint round trip gives identical outputs; ``Predictive`` draws have the right shapes; ``TraceIWAE`` and
``log_likelihood`` are finite; a run killed after its first epoch resumes to the uninterrupted run's numbers;
``ppl_vae.save`` → ``ppl_vae.load`` rebuilds it from the folder alone, with identical outputs."""

import dataclasses
from pathlib import Path

import pyro
import pytest
import torch
from _interrupt import train_killed_after
from pyro import poutine
from pyro.infer import SVI, Predictive

import ppl_vae
from ppl_vae import load_config, plan_for, train
from ppl_vae.data import DataBundle
from ppl_vae.data.multimodal import make_multimodal
from ppl_vae.evaluate import log_likelihood
from ppl_vae.experiment import Run, build, load_params
from ppl_vae.infer import TraceIWAE
from ppl_vae.models import get_method, model_names
from ppl_vae.training.loop import CHECKPOINT

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))
SHAPES = {
    "digits": (1, 8, 8),
    "mnist": (1, 28, 28),
    "fashion_mnist": (1, 28, 28),
    "kmnist": (1, 28, 28),
    "omniglot": (1, 28, 28),
    "celeba": (3, 64, 64),
}
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")),
]
# small networks and short schedules; everything else (arch, likelihood, options, objective) as shipped
SMALL = {
    "model.hidden": [16],
    "model.channels": 8,
    "train.epochs": 2,
    "train.batch_size": 16,
    "train.eval_batch_size": 16,
    "train.patience": None,
    "train.min_epochs": 1,
    "model.options.fit_points": 64,
    "model.options.bgm_max_iter": 20,
    "model.options.inner_hidden": [8],
    "model.options.stage2_epochs": 2,
    "model.options.warmup_epochs": 1,
}


def shipped_config(name: str):
    for path in CONFIGS:
        cfg = load_config(path)
        if cfg.model.name == name:
            break
    else:
        raise AssertionError(f"model {name!r} has no shipped config in configs/")
    known = {f"model.options.{k}" for k in get_method(cfg.model.name).options.describe()}
    overrides = [
        f"{k}={v!r}" if not isinstance(v, list) else f"{k}={v}"
        for k, v in SMALL.items()
        if not k.startswith("model.options.") or k in known
    ]
    return path, load_config(path, [o.replace("None", "null") for o in overrides])


def tiny_data(cfg, n=48):
    g = torch.Generator().manual_seed(0)
    shape = SHAPES[cfg.data.name]
    binary = cfg.model.likelihood in ("bernoulli", "pixelcnn")

    def images(k):
        x = torch.rand(k, *shape, generator=g)
        return torch.bernoulli(x, generator=g) if binary else x

    def labels(k):
        return torch.randint(0, 10, (k,), generator=g)

    data = DataBundle.from_tensors(images(n), labels(n), images(16), labels(16), images(16), labels(16), num_classes=10)
    if cfg.data.multimodal is not None:  # the packed modalities and their masks (some missing)
        data = make_multimodal(
            data, cfg.data.multimodal, num_modalities=cfg.data.num_modalities, missing_rate=0.25, seed=0
        )
    return data


def library_methods():
    """Every method registered by the package itself (a test may register its own besides)."""
    return [n for n in model_names() if get_method(n).build.__module__.startswith("ppl_vae.")]


@pytest.fixture(params=library_methods())
def method(request):
    return request.param


@pytest.mark.parametrize("device", DEVICES)
def test_every_registered_method_keeps_the_contract(method, device, tmp_path):
    path, cfg = shipped_config(method)
    data = tiny_data(cfg)
    dev = torch.device(device)
    model = build(cfg, data, dev)
    plan = plan_for(model)
    x, y = data.train_x[:16].to(dev), data.train_y[:16].to(dev)

    # one SVI step with the plan's objective (first stage) changes the weights
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    stage = plan.stages(cfg.train)[0]
    pyro.clear_param_store()
    svi = SVI(model.model, model.guide, pyro.optim.Adam({"lr": 1e-2}), plan.objective(stage.train))
    assert torch.isfinite(torch.tensor(svi.step(x, y)))
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    params = [k for k, _ in model.named_parameters()]
    assert len(set(changed) & set(params)) >= len(params) // 2, f"{path.name}: only {changed} changed"

    # Predictive: every latent site of the guide has (num_samples, batch, ...) draws
    model.eval()
    with torch.no_grad():
        pred = Predictive(model.model, guide=model.guide, num_samples=3)(x[:4], y[:4])
    latents = [k for k, v in pred.items() if k != "x"]
    assert latents, f"{path.name}: no latent draws"
    for k in latents:
        assert pred[k].shape[:2] == (3, 4), (k, tuple(pred[k].shape))

    # TraceIWAE and the importance-sampled log-likelihood are finite
    with torch.no_grad():
        assert torch.isfinite(torch.tensor(TraceIWAE(num_particles=5).loss(model.model, model.guide, x, y)))
        ll = log_likelihood(
            model.model, model.guide, data.test_x[:6].to(dev), y=data.test_y[:6].to(dev), num_samples=8, seed=0
        )
    assert ll.shape == (6,) and torch.isfinite(ll).all()

    # an uninterrupted two-epoch run ...
    whole = train(build(cfg, data, dev), data, cfg, run_dir=tmp_path / "whole", device=dev, progress=False)
    # ... and one killed at the end of its second epoch, before that epoch's checkpoint
    train_killed_after(2, build(cfg, data, dev), data, cfg, run_dir=tmp_path / "killed", device=dev, progress=False)
    resumed_model = build(cfg, data, dev)
    resumed = train(resumed_model, data, cfg, run_dir=tmp_path / "killed", resume=True, device=dev, progress=False)
    keys = ("epoch", "train_elbo", "val_elbo")
    assert [h[k] for h in resumed.history for k in keys] == pytest.approx(
        [h[k] for h in whole.history for k in keys], rel=1e-5, abs=1e-4
    )

    # checkpoint round trip: a fresh model restored from the run's checkpoint gives identical outputs
    restored = build(cfg, data, dev)
    load_params(Run(cfg, data, restored, tmp_path / "killed", dev), CHECKPOINT)
    resumed_model.eval()
    restored.eval()
    for k, v in resumed_model.state_dict().items():
        assert torch.equal(v, restored.state_dict()[k]), k
    outs = []
    for m in (resumed_model, restored):
        pyro.set_rng_seed(7)
        with torch.no_grad():
            outs.append(TraceIWAE(num_particles=3).loss(m.model, m.guide, x, y))
    assert outs[0] == outs[1]


def test_every_registered_method_saves_and_loads_to_identical_outputs(method, tmp_path):
    _, cfg = shipped_config(method)
    data = tiny_data(cfg, n=16)
    model = build(cfg, data, torch.device("cpu"))
    with torch.no_grad():  # weights unlike those of a fresh build
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.eval()
    x, y = data.train_x[:4], data.train_y[:4]

    def outputs(m):
        pyro.set_rng_seed(7)
        with torch.no_grad():
            guide = poutine.trace(m.guide).get_trace(x, y)
            joint = poutine.trace(poutine.replay(m.model, trace=guide)).get_trace(x, y)
            iwae = TraceIWAE(num_particles=2).loss(m.model, m.guide, x, y)
        draws = {k: s["value"] for k, s in guide.nodes.items() if s["type"] == "sample"}
        return draws, joint.log_prob_sum(), iwae

    before = outputs(model)
    # every parameter the method uses lives in its module: save() needs nothing from Pyro's param store
    own = {id(p) for p in model.parameters()}
    assert all(id(v) in own for v in pyro.get_param_store().get_state()["params"].values())
    ppl_vae.save(model, tmp_path / "shared")
    loaded = ppl_vae.load(tmp_path / "shared")  # clears the param store: nothing of `model` is used
    assert type(loaded) is type(model) and not loaded.training
    for k, v in model.state_dict().items():  # bit for bit (a NaN buffer, a mixture not yet fitted, equals itself)
        torch.testing.assert_close(loaded.state_dict()[k], v, rtol=0, atol=0, equal_nan=True, msg=k)
    after = outputs(loaded)
    assert before[0].keys() == after[0].keys() and all(torch.equal(v, after[0][k]) for k, v in before[0].items())
    assert torch.equal(before[1], after[1]) and before[2] == after[2]


def test_every_registered_method_has_a_shipped_config():
    assert len(library_methods()) >= 9
    for name in library_methods():
        shipped_config(name)


def test_contract_settings_only_shrink_the_config(method):
    path, small = shipped_config(method)
    full = load_config(path)
    same = ("name", "likelihood", "arch", "latent_dim", "activation", "link", "sigma2")
    assert all(getattr(small.model, f) == getattr(full.model, f) for f in same)
    assert (
        dataclasses.replace(
            small.train,
            epochs=full.train.epochs,
            batch_size=full.train.batch_size,
            eval_batch_size=full.train.eval_batch_size,
            patience=full.train.patience,
            min_epochs=full.train.min_epochs,
        )
        == full.train
    )
