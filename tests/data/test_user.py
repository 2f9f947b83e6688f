"""Your own data (ppl_vae.data.as_data): tensors, arrays, a Dataset, a DataLoader, a config function, a run on
data passed in — the same numbers as the equivalent DataBundle, exact resume, one clear line for bad data."""

from __future__ import annotations

import numpy as np
import pyro
import pytest
import torch

import ppl_vae
from ppl_vae import DataBundle, ModelConfig, TrainConfig, as_data
from ppl_vae.errors import ConfigError, DataError, PplVaeError

G = torch.Generator().manual_seed(0)
X = (torch.rand(300, 1, 8, 8, generator=G) > 0.5).float()
Y = torch.randint(0, 10, (300,), generator=G)


class PairDataset(torch.utils.data.Dataset):
    def __len__(self):
        return len(X)

    def __getitem__(self, i):
        return X[i], int(Y[i])


class DictDataset(PairDataset):
    def __getitem__(self, i):
        return {"x": X[i].numpy(), "y": Y[i]}


def _train(data, run_dir=None, epochs=2, resume=False):
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    model = ppl_vae.build_model(ModelConfig(name="vae", latent_dim=2, hidden=[16]), (1, 8, 8), num_data=240)
    cfg = TrainConfig(epochs=epochs, batch_size=50, logger="none")
    res = ppl_vae.train(model, data, cfg, seed=3, run_dir=run_dir, resume=resume, progress=False)
    return [(h["train_elbo"], h["val_elbo"]) for h in res.history]


def test_every_form_trains_with_the_numbers_of_the_equivalent_bundle():
    reference = _train(as_data((X, Y), seed=3))
    assert _train((X, Y)) == reference
    assert _train((X.numpy(), Y.numpy())) == reference
    assert _train(PairDataset()) == reference
    assert _train(DictDataset()) == reference
    loader = torch.utils.data.DataLoader(PairDataset(), batch_size=7, shuffle=True)
    with pytest.warns(UserWarning, match="seeded order that a checkpoint can replay"):
        assert _train(loader) == reference
    # x alone: the same values, no labels
    assert _train(X) == _train(X.numpy()) == _train(as_data(X, seed=3))


def test_a_dataset_run_resumes_exactly(tmp_path):
    whole = _train(PairDataset(), tmp_path / "whole")
    _train(PairDataset(), tmp_path / "killed", epochs=1)
    assert _train(PairDataset(), tmp_path / "killed", resume=True) == whole


def test_splits_are_seeded_and_the_test_split_is_fixed():
    a, b, c = as_data((X, Y), seed=0), as_data((X, Y), seed=0), as_data((X, Y), seed=1)
    assert (len(a.train_x), len(a.val_x), len(a.test_x)) == (240, 30, 30)
    assert torch.equal(a.val_x, b.val_x) and torch.equal(a.train_y, b.train_y)
    assert torch.equal(a.test_x, c.test_x) and not torch.equal(a.val_y, c.val_y)  # test fixed, val from the seed
    # together the splits are the data, each row once
    rows = torch.cat([a.train_x, a.val_x, a.test_x]).reshape(300, -1)
    assert sorted(map(tuple, rows.tolist())) == sorted(map(tuple, X.reshape(300, -1).tolist()))
    assert a.num_classes == int(Y.max()) + 1 and a.train_y.dtype == torch.int64
    given = as_data({"train": X[:200], "test": (X[200:], Y[200:])})
    assert (len(given.train_x), len(given.val_x), len(given.test_x)) == (200, 0, 100)
    assert as_data(a) is a


def test_values_are_kept_exactly():
    x64 = torch.rand(50, 3, dtype=torch.float64)
    got = as_data(x64, val_fraction=0, test_fraction=0)
    assert got.train_x.dtype == torch.float32 and torch.equal(got.train_x, x64.float())
    assert torch.equal(as_data(x64 > 0.5, val_fraction=0, test_fraction=0).train_x, (x64 > 0.5).float())


@pytest.mark.parametrize(
    "data, match",
    [
        (
            torch.randint(0, 256, (20, 1, 4, 4), dtype=torch.uint8),
            r"holds integers \(torch.uint8, values .*x.float\(\) / 255",
        ),
        (torch.rand(20), r"shape \(20,\).*x.reshape\(-1, 1\)"),
        (torch.rand(0, 3), r"N >= 1"),
        ((torch.rand(20, 3), torch.zeros(19)), r"19 labels for 20 datapoints"),
        (np.array([object()] * 4), "Python objects"),
        ("images/", "not a tensor, array or number"),
        ({"val": torch.rand(4, 2)}, "keys 'train'"),
        ({"train": torch.rand(4, 2), "test": torch.rand(4, 3)}, "different shapes"),
    ],
)
def test_bad_data_get_one_clear_line(data, match):
    with pytest.raises(DataError, match=match) as e:
        as_data(data)
    assert "\n" not in str(e.value)


def test_bad_datasets_name_the_item():
    class Ragged(PairDataset):
        def __getitem__(self, i):
            return torch.rand(3 if i < 5 else 4)

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            yield torch.rand(3)

    class Triples(PairDataset):
        def __getitem__(self, i):
            return X[i], 1, 2

    with pytest.raises(DataError, match=r"data\[5\] has shape \(4,\), item 0 \(3,\)"):
        as_data(Ragged())
    with pytest.raises(DataError, match="IterableDataset"):
        as_data(Stream())
    with pytest.raises(DataError, match=r"data\[0\] is a tuple of 3 values"):
        as_data(Triples())
    with pytest.raises(DataError, match="non-finite"):
        as_data(torch.tensor([[0.0], [float("nan")]] * 5))


def test_pixels_binarise_values_in_the_unit_interval():
    probs = torch.rand(100, 4, generator=torch.Generator().manual_seed(1))
    d = as_data(probs, pixels="binary_dynamic", seed=0)
    assert d.pixels == "binary_dynamic" and torch.equal(d.train_x, as_data(probs, seed=0).train_x)
    assert set(d.test_x.unique().tolist()) <= {0.0, 1.0}
    with pytest.raises(DataError, match=r"needs values in \[0, 1\]"):
        as_data(probs * 3, pixels="binary_static")


def test_a_config_names_your_function_and_a_run_keeps_data_passed_in(tmp_path, monkeypatch):
    source = tmp_path / "mydata.py"
    source.write_text(
        "import torch\n"
        "def load():\n"
        "    g = torch.Generator().manual_seed(0)\n"
        "    return (torch.rand(120, 1, 8, 8, generator=g) > 0.5).float(), torch.arange(120) % 10\n"
        "def broken():\n"
        "    raise RuntimeError('disk not mounted')\n"
    )
    base = [f"imports=[{source}]", "model.hidden=[16]", "train.epochs=1", "train.batch_size=40", "train.logger=none"]
    cfg = ppl_vae.load_config(None, [*base, "data.name=mydata:load"])
    run = ppl_vae.run_experiment(cfg, tmp_path / "fn", progress=False, figures=False)
    assert run.data.num_classes == 10 and len(run.data.train_x) == 96
    again = ppl_vae.load_run(tmp_path / "fn")
    assert torch.equal(again.data.test_x, run.data.test_x)

    with pytest.raises(DataError, match="'mydata:broken': the function raised RuntimeError: disk not mounted"):
        ppl_vae.run_experiment(ppl_vae.load_config(None, [*base, "data.name=mydata:broken"]), tmp_path / "b")
    with pytest.raises(ConfigError, match="names the module 'other', which is not listed under imports"):
        ppl_vae.run_experiment(ppl_vae.load_config(None, [*base, "data.name=other:load"]), tmp_path / "c")
    with pytest.raises(ConfigError, match="data.limit = 5 applies to the named datasets"):
        ppl_vae.load_config(None, [*base, "data.name=mydata:load", "data.limit=5"])

    # data passed in: the run folder keeps them, so the run loads and evaluates like any other
    plain = ppl_vae.load_config(None, base[1:])
    given = ppl_vae.run_experiment(plain, tmp_path / "given", data=(X, Y), progress=False, figures=False)
    assert plain.data.name == "digits" and given.cfg.data.name == "given"
    back = ppl_vae.load_run(tmp_path / "given")
    assert torch.equal(back.data.train_x, given.data.train_x) and torch.equal(back.data.test_y, given.data.test_y)
    assert ppl_vae.evaluate_run(back, num_samples=4)["num_test"] == 30
    with pytest.raises(PplVaeError, match="differ from those the run"):
        ppl_vae.run_experiment(plain, tmp_path / "given", data=X[:200], resume=True, progress=False)
    assert isinstance(given.data, DataBundle)
