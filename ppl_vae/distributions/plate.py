"""The data plate: ``pyro.plate("data", N, subsample=...)`` over a minibatch, shared by models and guides."""

from __future__ import annotations

import pyro
import torch

DATA_PLATE = "data"

__all__ = ["DATA_PLATE", "data_plate"]


def data_plate(x: torch.Tensor, num_data: int | None = None) -> pyro.plate:
    """``pyro.plate("data", N, subsample=...)`` for a minibatch ``x`` of a dataset of size ``num_data``.

    Sites inside are scaled by N/B, so one minibatch gives an unbiased estimate of the full-data ELBO.
    With ``num_data=None`` the plate is the batch itself (scale 1).
    """
    batch = x.shape[0]
    size = batch if num_data is None else int(num_data)
    if size < batch:
        raise ValueError(
            f"num_data ({size}) is smaller than the minibatch ({batch}); set the model's num_data "
            "to the size of the training set"
        )
    return pyro.plate(DATA_PLATE, size, subsample=_arange(batch, x.device))


_ARANGES: dict = {}


def _arange(n: int, device) -> torch.Tensor:
    """``torch.arange(n)`` on ``device``, made once per (n, device): the subsample indices are only read."""
    key = (n, str(device))
    if key not in _ARANGES:
        if len(_ARANGES) > 64:
            _ARANGES.clear()
        _ARANGES[key] = torch.arange(n, device=device)
    return _ARANGES[key]
