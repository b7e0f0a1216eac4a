"""lightning-fedprune: Federated Pruning (Lin et al., Interspeech 2022) as a PyTorch Lightning plugin.

The house: :mod:`lightning_fedprune.federated` (the engine: the round, clients, executors, server
strategies, messages and wire format, client data, checkpoints), :mod:`lightning_fedprune.pruning`
(the functional core, the plan and the pruning state, compact layers), :mod:`lightning_fedprune.callbacks`
(the four pruning controls), :mod:`lightning_fedprune.observers` (progress, summary, TensorBoard) and
:mod:`lightning_fedprune.asr` (the speech task and data). The names below are the public API.
"""

from lightning_fedprune.federated.checkpoint import export_task_checkpoint
from lightning_fedprune.federated.data import CohortLoader, FederatedDataModule
from lightning_fedprune.federated.executors import (
    Executor,
    ProcessPoolExecutor,
    SequentialExecutor,
    WorkerStartupError,
)
from lightning_fedprune.federated.hooks import FederatedCallback, RoundSummary
from lightning_fedprune.federated.module import FederatedLightningModule
from lightning_fedprune.federated.protocol import ClientConfig, ClientPlan, ClientResult, RoundPayload
from lightning_fedprune.federated.strategies import FedAdam, FedAvg, FedAvgM, Strategy

__version__ = "0.1.0"

__all__ = [
    "ClientConfig",
    "ClientPlan",
    "ClientResult",
    "CohortLoader",
    "Executor",
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "FederatedCallback",
    "FederatedDataModule",
    "FederatedLightningModule",
    "ProcessPoolExecutor",
    "RoundPayload",
    "RoundSummary",
    "SequentialExecutor",
    "Strategy",
    "WorkerStartupError",
    "__version__",
    "export_task_checkpoint",
]
