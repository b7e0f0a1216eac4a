"""lightning-fedprune: Federated Pruning (Lin et al., Interspeech 2022) as a PyTorch Lightning plugin."""

from lightning_fedprune.data import CohortLoader, FederatedDataModule
from lightning_fedprune.executors import Executor, ProcessPoolExecutor, SequentialExecutor
from lightning_fedprune.hooks import FederatedCallback, RoundSummary
from lightning_fedprune.module import FederatedLightningModule
from lightning_fedprune.protocol import ClientConfig, ClientPlan, ClientResult, RoundPayload

__version__ = "0.1.0"

__all__ = [
    "ClientConfig",
    "ClientPlan",
    "ClientResult",
    "CohortLoader",
    "Executor",
    "FederatedCallback",
    "FederatedDataModule",
    "FederatedLightningModule",
    "ProcessPoolExecutor",
    "RoundPayload",
    "RoundSummary",
    "SequentialExecutor",
    "__version__",
]
