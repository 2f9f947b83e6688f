import os

import pyro
import pytest
import torch

os.environ.setdefault("MPLBACKEND", "Agg")
# Tiny models: one intra-op thread avoids spin-waiting threads on a loaded 2-core machine (8-20x faster per step).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def clean_pyro():
    """Pyro's param store is global: every test starts from an empty store and a fixed seed."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    yield
    pyro.clear_param_store()
