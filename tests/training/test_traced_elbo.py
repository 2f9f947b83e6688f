"""``train.compile``'s whole objective: the Pyro program, its ELBO and their backward pass traced once per batch
shape into one graph (issue 37). With the ``eager`` backend the graph runs the very operations of an eager step, in
the same order and with the same random draws, so every step must give the eager loss and gradients to float
rounding — also where autograd's semantics matter: a user's ``detach``, DReG's gradient hooks."""

import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from torch import nn

import ppl_vae
import ppl_vae.training.compiled as compiled
from ppl_vae import ModelConfig, TrainConfig
from ppl_vae.infer.analytic_kl import AnalyticKLELBO
from ppl_vae.infer.iwae import TraceIWAE

pytest.importorskip("torch._dynamo")


@pytest.fixture(autouse=True)
def _fresh():
    torch._dynamo.reset()
    pyro.clear_param_store()
    with pyro.validation_enabled(True):  # Pyro's checks run while tracing, as on a run's first step
        yield
    torch._dynamo.reset()
    pyro.clear_param_store()


@pytest.fixture(scope="module")
def data():
    return ppl_vae.load_data("digits", limit=300)


class TutorialVAE(nn.Module):
    """Pyro's VAE tutorial as a user writes it: ``pyro.module`` in model and guide, a plate over the minibatch."""

    def __init__(self, d=64, z=2, h=16, learned_scale=False, stop_gradient=False):
        super().__init__()
        self.z, self.learned_scale, self.stop_gradient = z, learned_scale, stop_gradient
        self.encoder = nn.Sequential(nn.Linear(d, h), nn.Softplus(), nn.Linear(h, 2 * z))
        self.decoder = nn.Sequential(nn.Linear(z, h), nn.Softplus(), nn.Linear(h, d))

    def model(self, x, y=None):
        pyro.module("decoder", self.decoder)
        x = x.reshape(len(x), -1)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(self.z), 1.0).to_event(1))
            if self.stop_gradient:  # a user's stop-gradient: the likelihood's path to the encoder is cut
                z = z.detach()
            if self.learned_scale:  # a parameter of the param store that no module owns
                scale = pyro.param("scale", torch.tensor(0.5), constraint=dist.constraints.positive)
                pyro.sample("x", dist.Normal(torch.sigmoid(self.decoder(z)), scale).to_event(1), obs=x)
            else:
                pyro.sample("x", dist.Bernoulli(logits=self.decoder(z)).to_event(1), obs=x)

    def guide(self, x, y=None):
        pyro.module("encoder", self.encoder)
        loc, s = self.encoder(x.reshape(len(x), -1)).chunk(2, -1)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(loc, nn.functional.softplus(s) + 1e-3).to_event(1))


def _library_vae(data):
    torch.manual_seed(0)
    return ppl_vae.build_model(ModelConfig(name="vae", latent_dim=2, hidden=[16]), data.shape, num_data=300)


def _steps(objective, model, x, n=3, seed=5):
    """(loss, gradients of the module and of the param store) of ``n`` steps from one seed, parameters fixed."""
    torch.manual_seed(seed)
    out = []
    for _ in range(n):
        params = list(model.parameters()) + [p for p in pyro.get_param_store()._params.values()]
        for p in params:
            p.grad = None
        loss = objective.loss_and_grads(model.model, model.guide, x)
        grads = {name: p.grad.clone() for name, p in pyro.get_param_store()._params.items() if p.grad is not None}
        grads.update({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        out.append((loss, grads))
    return out


OBJECTIVES = {
    "auto": lambda: AnalyticKLELBO(max_plate_nesting=1),
    "elbo": lambda: Trace_ELBO(max_plate_nesting=1),
    "meanfield": lambda: TraceMeanField_ELBO(max_plate_nesting=1),
    "iwae": lambda: TraceIWAE(num_particles=3),
    "dreg": lambda: TraceIWAE(num_particles=3, estimator="dreg"),
}


@pytest.mark.parametrize("objective", list(OBJECTIVES))
@pytest.mark.parametrize("which", ["library", "tutorial", "tutorial_learned_scale", "tutorial_stop_gradient"])
def test_each_step_gives_the_eager_loss_and_gradients(data, objective, which):
    x = (data.train_x[:50] > 0.5).float()
    runs = []
    for traced in (False, True):
        pyro.clear_param_store()
        torch.manual_seed(0)
        model = (
            _library_vae(data)
            if which == "library"
            else TutorialVAE(learned_scale=which.endswith("scale"), stop_gradient=which.endswith("gradient"))
        )
        base = OBJECTIVES[objective]()
        obj = compiled.TracedELBO(base, model, backend="eager") if traced else base
        runs.append(_steps(obj, model, x))
        if traced:
            assert obj.failed is None and obj.traces == 1
    for (l0, g0), (l1, g1) in zip(*runs, strict=True):
        assert l1 == pytest.approx(l0, rel=1e-6)
        assert g0.keys() == g1.keys() and g0
        for k in g0:
            torch.testing.assert_close(g1[k], g0[k], rtol=1e-5, atol=1e-6)
    if which == "tutorial_learned_scale":  # σ of the param store is an input of the graph: it gets its gradient
        assert "scale" in runs[1][0][1] and runs[1][0][1]["scale"].abs() > 0


def test_one_graph_without_a_break_and_one_trace_per_batch_shape(data):
    model = _library_vae(data)
    obj = compiled.TracedELBO(AnalyticKLELBO(max_plate_nesting=1), model, backend="eager")
    for n in (50, 50, 20, 50, 20):
        obj.loss_and_grads(model.model, model.guide, data.train_x[:n])
    assert obj.traces == 2
    graph = next(iter(obj.graphs.values()))
    explained = torch._dynamo.explain(graph.gm)(*graph.inputs(), data.train_x[:50])
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1
    # the graph holds the networks, the sampling, the likelihood and the KL: no Pyro Python at a step
    ops = {str(n.target) for n in graph.gm.graph.nodes if n.op == "call_function"}
    assert {"aten.addmm.default", "aten.normal_.default"} <= ops


class DiscreteGuide(TutorialVAE):
    """A guide with a Bernoulli site: no reparameterised sample, its gradient is Pyro's score function."""

    def model(self, x, y=None):
        pyro.module("decoder", self.decoder)
        x = x.reshape(len(x), -1)
        with pyro.plate("data", x.shape[0]):
            b = pyro.sample("b", dist.Bernoulli(x.new_full((), 0.5)))
            z = pyro.sample("z", dist.Normal(x.new_zeros(self.z), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(z) + b.unsqueeze(-1)).to_event(1), obs=x)

    def guide(self, x, y=None):
        pyro.module("encoder", self.encoder)
        loc, s = self.encoder(x.reshape(len(x), -1)).chunk(2, -1)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("b", dist.Bernoulli(logits=loc[:, 0]))
            pyro.sample("z", dist.Normal(loc, nn.functional.softplus(s) + 1e-3).to_event(1))


def test_a_guide_that_is_not_reparameterised_trains_eagerly_with_one_warning(data, monkeypatch):
    monkeypatch.setattr(compiled, "BACKEND", "eager")
    x = (data.train_x[:50] > 0.5).float()
    torch.manual_seed(0)
    model = DiscreteGuide()
    torch.manual_seed(0)
    want = _steps(Trace_ELBO(max_plate_nesting=1), model, x)
    pyro.clear_param_store()
    torch.manual_seed(0)
    model = DiscreteGuide()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with compiled.compiled_objective(Trace_ELBO(max_plate_nesting=1), model) as obj:
            got = _steps(obj, model, x)
            assert model.encoder._compiled_call_impl is not None  # the fallback: the networks compiled
        assert model.encoder._compiled_call_impl is None
    msgs = [str(w.message) for w in caught if issubclass(w.category, compiled.CompileFallbackWarning)]
    assert len(msgs) == 1, msgs
    assert "site 'b' (Bernoulli) is not reparameterised" in msgs[0] and "networks compiled" in msgs[0]
    for (l0, g0), (l1, g1) in zip(want, got, strict=True):
        assert l1 == pytest.approx(l0, rel=1e-6)
        for k in g0:
            torch.testing.assert_close(g1[k], g0[k], rtol=1e-5, atol=1e-6)


def test_objectives_of_a_methods_own_compile_the_networks_only():
    assert all(compiled.traceable(make()) for make in OBJECTIVES.values())
    assert not compiled.traceable(type("Trace_ELBO", (Trace_ELBO,), {})())  # a method's own subclass


@pytest.mark.parametrize(
    "cfg",
    [
        dict(epochs=2, batch_size=50),
        dict(epochs=3, batch_size=50, kl_warmup_epochs=2),  # warm-up epochs eager, then traced at β = 1
        dict(epochs=2, batch_size=64, objective="elbo", num_particles=2),
        dict(epochs=2, batch_size=50, objective="iwae", num_particles=4, estimator="dreg"),
    ],
    ids=["default", "kl_warmup", "two_particles", "dreg"],
)
def test_train_compile_gives_the_eager_run(data, monkeypatch, cfg):
    monkeypatch.setattr(compiled, "BACKEND", "eager")
    runs = {}
    for flag in (False, True):
        pyro.clear_param_store()
        model = _library_vae(data)
        with warnings.catch_warnings():
            warnings.simplefilter("error", compiled.CompileFallbackWarning)
            res = ppl_vae.train(model, data, TrainConfig(compile=flag, **cfg), seed=3, progress=False)
        runs[flag] = (res.history, {k: v.clone() for k, v in model.state_dict().items()})
    (h0, s0), (h1, s1) = runs[False], runs[True]
    for key in ("train_elbo", "val_elbo"):
        assert [r[key] for r in h1] == pytest.approx([r[key] for r in h0], rel=1e-6)
    for k in s0:
        torch.testing.assert_close(s1[k], s0[k], rtol=1e-5, atol=1e-6)


def test_a_user_model_traces_whole_through_ppl_vae_train(data, monkeypatch):
    monkeypatch.setattr(compiled, "BACKEND", "eager")
    made = []
    original = compiled.TracedELBO._trace

    def counting(self, *a):
        made.append(1)
        return original(self, *a)

    monkeypatch.setattr(compiled.TracedELBO, "_trace", counting)
    model = TutorialVAE()
    binary = ppl_vae.data.DataBundle.from_tensors((data.train_x > 0.5).float())
    with warnings.catch_warnings():
        warnings.simplefilter("error", compiled.CompileFallbackWarning)
        res = ppl_vae.train(model, binary, TrainConfig(epochs=2, batch_size=128, compile=True), progress=False)
    assert len(made) == 2  # batches of 128 and the last, smaller one; the second epoch reuses both graphs
    assert res.history[-1]["train_elbo"] > res.history[0]["train_elbo"] - 5


@pytest.mark.parametrize("backend", ["eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_a_resumed_compiled_run_continues_exactly(data, monkeypatch, tmp_path, backend):
    """The graph's random draws come from torch's generator (inductor draws its seeds from it), which every
    checkpoint saves: killed after an epoch and resumed, a compiled run ends where the uninterrupted one does."""
    monkeypatch.setattr(compiled, "BACKEND", backend)

    def run(epochs, run_dir, resume=False):
        pyro.clear_param_store()
        model = _library_vae(data)
        cfg = TrainConfig(epochs=epochs, batch_size=64, compile=True)
        res = ppl_vae.train(model, data, cfg, run_dir=run_dir, resume=resume, seed=2, progress=False)
        return res, model

    full, m_full = run(3, tmp_path / "full")
    run(1, tmp_path / "part")
    resumed, m_res = run(3, tmp_path / "part", resume=True)
    assert [r["train_elbo"] for r in resumed.history] == [r["train_elbo"] for r in full.history]
    for (name, p1), (_, p2) in zip(m_full.named_parameters(), m_res.named_parameters(), strict=True):
        assert torch.equal(p1, p2), name
