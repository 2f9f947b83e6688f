"""``train.compile``: the objective traced whole (``test_traced_elbo.py``), else the networks compiled with
torch.compile while the Pyro program stays as written (issue 37).

Dynamo's capture is checked with the ``eager`` backend (no code generation: seconds, not minutes); one slow test
runs inductor itself."""

import warnings

import pytest
import torch
from torch import nn

import ppl_vae
import ppl_vae.training.compiled as compiled
from ppl_vae import ModelConfig, TrainConfig
from ppl_vae.errors import ConfigError

pytest.importorskip("torch._dynamo")


@pytest.fixture
def eager_backend(monkeypatch):
    monkeypatch.setattr(compiled, "BACKEND", "eager")
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _model(data, name="vae", **kw):
    torch.manual_seed(0)
    cfg = ModelConfig(name=name, latent_dim=2, hidden=[16], **kw)
    return ppl_vae.build_model(cfg, data.shape, num_data=len(data.train_x))


@pytest.fixture(scope="module")
def data():
    return ppl_vae.load_data("digits", limit=300)


@pytest.mark.parametrize(("name", "kw"), [("vae", {}), ("vlae", {}), ("sigma_vae", {"likelihood": "gaussian"})])
def test_the_networks_of_the_vae_family_compile_without_a_graph_break(data, name, kw):
    model = _model(data, name, **kw)
    nets = compiled.compiled_networks(model)
    assert set(nets) == {"encoder", "decoder"}
    x = data.train_x[:8]
    with torch.no_grad():
        out = model.encoder(x)
    z = out[0] if isinstance(out, tuple) else out
    for net, arg in ((model.encoder, x), (model.decoder, torch.zeros(8, z.shape[-1]))):
        explained = torch._dynamo.explain(net)(arg)
        assert explained.graph_break_count == 0, explained.break_reasons
        assert explained.graph_count == 1


def test_compiled_training_gives_the_eager_numbers_and_leaves_the_networks_eager(data, eager_backend):
    runs = {}
    for flag in (False, True):
        model = _model(data)
        res = ppl_vae.train(model, data, TrainConfig(epochs=2, batch_size=50, compile=flag), seed=3, progress=False)
        runs[flag] = (res.history, {k: v.clone() for k, v in model.state_dict().items()})
        assert model.encoder._compiled_call_impl is None and model.decoder._compiled_call_impl is None
    (h0, s0), (h1, s1) = runs[False], runs[True]
    assert [r["train_elbo"] for r in h0] == pytest.approx([r["train_elbo"] for r in h1], rel=1e-6)
    assert [r["val_elbo"] for r in h0] == pytest.approx([r["val_elbo"] for r in h1], rel=1e-6)
    assert s0.keys() == s1.keys()  # the same parameter names: checkpoints are those of an eager run
    for k in s0:
        torch.testing.assert_close(s0[k], s1[k], rtol=1e-5, atol=1e-6)


def test_the_networks_run_compiled_inside_the_block(data, eager_backend):
    model = _model(data)
    with compiled.compile_networks(model) as names:
        assert names == ["encoder", "decoder"]
        assert model.encoder._compiled_call_impl is not None
        before = dict(torch._dynamo.utils.counters["stats"])
        model.encoder(data.train_x[:4])
        assert torch._dynamo.utils.counters["stats"]["calls_captured"] > before.get("calls_captured", 0)
    assert model.encoder._compiled_call_impl is None


def test_a_network_that_cannot_be_compiled_runs_eagerly_with_one_warning(data, monkeypatch):
    class Boom(Exception):
        pass

    def failing_backend(gm, example_inputs):
        raise Boom("no code for this machine")

    monkeypatch.setattr(compiled, "BACKEND", failing_backend)
    torch._dynamo.reset()
    model = _model(data)
    x = data.train_x[:4]
    with torch.no_grad():
        want = model.encoder(x)
    with compiled.compile_networks(model), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = model.encoder(x)
        again = model.encoder(x)
    msgs = [str(w.message) for w in caught if issubclass(w.category, compiled.CompileFallbackWarning)]
    assert len(msgs) == 1 and "'encoder'" in msgs[0] and "runs eagerly" in msgs[0] and "no code" in msgs[0]
    for a, b in zip(want, got, strict=True):
        torch.testing.assert_close(a, b)
    for a, b in zip(want, again, strict=True):
        torch.testing.assert_close(a, b)
    torch._dynamo.reset()


def test_a_model_without_networks_is_traced_whole_else_trains_eagerly_with_a_warning(data, eager_backend):
    import pyro
    import pyro.distributions as dist

    loc = nn.Parameter(torch.zeros(64))

    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.loc = loc

        def model(self, x, y=None):
            with pyro.plate("data", x.shape[0]):
                pyro.sample("x", dist.Normal(self.loc, 1.0).to_event(1), obs=x.reshape(len(x), -1))

        def guide(self, x, y=None):
            pass

    with warnings.catch_warnings():  # the default objective: traced whole, whatever the model's attributes
        warnings.simplefilter("error", compiled.CompileFallbackWarning)
        ppl_vae.train(Plain(), data, TrainConfig(epochs=1, batch_size=100, compile=True), progress=False)
    with pytest.warns(compiled.CompileFallbackWarning, match="has no networks to compile"):  # where it is not
        with compiled.compile_networks(Plain()) as names:
            assert names == []


def test_compile_and_jit_together_are_refused_in_one_line():
    with pytest.raises(ConfigError, match="jit and train.compile are two ways of compiling"):
        TrainConfig(jit=True, compile=True, objective="elbo").validate()


@pytest.mark.slow
def test_inductor_compiles_the_vae_and_trains_to_the_eager_numbers(data, monkeypatch):
    import torch._inductor.config

    monkeypatch.setattr(torch._inductor.config, "fallback_random", True)  # torch's draws, not inductor's own
    torch._dynamo.reset()
    runs = {}
    for flag in (False, True):
        model = _model(data)
        res = ppl_vae.train(model, data, TrainConfig(epochs=1, batch_size=50, compile=flag), seed=1, progress=False)
        runs[flag] = res.history[-1]
    assert runs[True]["train_elbo"] == pytest.approx(runs[False]["train_elbo"], rel=1e-4)
    torch._dynamo.reset()
