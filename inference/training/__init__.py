"""The training engine: stochastic variational inference (``fit``), run directories, checkpoints."""

from .checkpoint import RunDir, load_checkpoint, save_checkpoint
from .train import TrainResult, fit

__all__ = ["RunDir", "TrainResult", "fit", "load_checkpoint", "save_checkpoint"]
