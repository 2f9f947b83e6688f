"""The recursive mixture's stage-wise schedule (models/rme.py, options.schedule = 'stagewise'): stage m trains
h_m, ε_m and the decoder with h_{<m}, ε_{<m} frozen — checked exactly: frozen parameters do not move."""

import pyro
import pytest
import torch

from ppl_vae import ModelConfig, build_model, plan_for, train
from ppl_vae.config import TrainConfig
from ppl_vae.data import DataBundle
from ppl_vae.errors import ConfigError


def _data(n=60):
    g = torch.Generator().manual_seed(0)
    x = torch.bernoulli(torch.rand(n + 20, 1, 6, 6, generator=g), generator=g)
    y = torch.zeros(n + 20, dtype=torch.long)
    return DataBundle.from_tensors(x[:n], y[:n], x[n : n + 10], y[n : n + 10], x[n + 10 :], y[n + 10 :], num_classes=1)


def _rme(**options):
    pyro.clear_param_store()
    torch.manual_seed(0)
    cfg = ModelConfig(name="rme", latent_dim=2, hidden=[8], options={"num_components": 3, **options})
    return build_model(cfg, (1, 6, 6), num_data=60)


def _snapshot(m):
    return {n: p.detach().clone() for n, p in m.named_parameters()}


@pytest.mark.parametrize("freeze_decoder", [False, True])
def test_each_stage_freezes_the_earlier_components_exactly(freeze_decoder):
    m = _rme(schedule="stagewise", freeze_decoder=freeze_decoder)
    plan = plan_for(m)
    snaps, begin = {}, plan.begin_stage

    def spy(stage):  # the parameters as the previous stage left them
        snaps[stage.name] = _snapshot(m)
        begin(stage)

    plan.begin_stage = spy
    res = train(m, _data(), TrainConfig(epochs=4, batch_size=20), plan=plan, progress=False)
    final = _snapshot(m)
    assert [r["stage"] for r in res.history] == [1, 1, 2, 3]  # epochs 2 + 1 + 1: the remainder to stage 0
    assert [r["num_components_active"] for r in res.history] == [1, 1, 2, 3]
    assert [r["num_components_frozen"] for r in res.history] == [0, 0, 1, 2]

    def moved(a, b, prefix):
        return {n: not torch.equal(a[n], b[n]) for n in a if n.startswith(prefix)}

    # h_0 and its weights: trained in stage 0, untouched by stages 1 and 2
    after0, after1 = snaps["component_1"], snaps["component_2"]
    assert any(moved(snaps["component_0"], after0, "encoder.components.0.").values())
    assert not any(moved(after0, final, "encoder.components.0.").values())
    # h_1 and ε_1: trained in stage 1 only
    assert any(moved(after0, after1, "encoder.components.1.").values())
    assert any(moved(after0, after1, "encoder.mixing.0.").values())
    assert not any(moved(after1, final, "encoder.components.1.").values())
    assert not any(moved(after1, final, "encoder.mixing.0.").values())
    # h_2 and ε_2 train in the last stage; never before it
    assert not any(moved(snaps["component_0"], after1, "encoder.components.2.").values())
    assert any(moved(after1, final, "encoder.components.2.").values())
    assert any(moved(after1, final, "encoder.mixing.1.").values())
    decoder = moved(snaps["component_0"], final, "decoder.")
    assert (not any(decoder.values())) if freeze_decoder else all(decoder.values())


def test_stagewise_settings_are_checked():
    m = _rme(schedule="stagewise")
    with pytest.raises(ConfigError, match="train.epochs must be at least"):
        plan_for(m).stages(TrainConfig(epochs=2))
    with pytest.raises(ConfigError, match="grow_every must be 0"):
        _rme(schedule="stagewise", grow_every=2)
    assert len(plan_for(_rme()).stages(TrainConfig(epochs=2))) == 1  # concurrent: one stage, as before


@pytest.mark.parametrize("init", ["random", "previous"])
def test_component_init_previous_starts_h_m_as_h_m_minus_1(init):
    m = _rme(schedule="stagewise", freeze_decoder=True, component_init=init)
    plan = plan_for(m)
    snaps, begin = {}, plan.begin_stage

    def spy(stage):  # the parameters as stage m starts, after the plan's own begin_stage
        begin(stage)
        snaps[stage.name] = _snapshot(m)

    plan.begin_stage = spy
    train(m, _data(), TrainConfig(epochs=3, batch_size=20), plan=plan, progress=False)
    for k in (1, 2):
        s = snaps[f"component_{k}"]
        new = {n.split(".", 3)[3]: p for n, p in s.items() if n.startswith(f"encoder.components.{k}.")}
        old = {n.split(".", 3)[3]: p for n, p in s.items() if n.startswith(f"encoder.components.{k - 1}.")}
        assert new.keys() == old.keys() and new
        same = all(torch.equal(new[n], old[n]) for n in new)
        assert same == (init == "previous")


def test_component_init_is_checked():
    with pytest.raises(ConfigError, match="model.options.component_init must be one of"):
        _rme(schedule="stagewise", component_init="copy")
    with pytest.raises(ConfigError, match="model.options.component_init='previous' needs schedule='stagewise'"):
        _rme(component_init="previous")
