"""Observers of a federated run: they watch and report, and change nothing (progress bar, end-of-run
summary, TensorBoard pictures of the masks, the plot of a finished run)."""

from lightning_fedprune.observers.progress import FederatedProgressBar
from lightning_fedprune.observers.summary import RunSummary
from lightning_fedprune.observers.tensorboard import PruningImages

__all__ = ["FederatedProgressBar", "PruningImages", "RunSummary"]
