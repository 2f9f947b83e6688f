"""Objectives (Pyro ELBOs) and the training loop."""

from .checkpoint import load_checkpoint, restore_params
from .iwae import TraceIWAE
from .staged import StagedResult, train_staged
from .train import FitResult, ScaleLatents, evaluate_elbo, fit

__all__ = ["fit", "FitResult", "ScaleLatents", "evaluate_elbo", "load_checkpoint", "restore_params", "TraceIWAE",
           "train_staged", "StagedResult"]
