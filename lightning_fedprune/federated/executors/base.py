"""The executor seam: where clients run. ``setup`` once per fit, ``run`` once per round, ``teardown`` at the end.

* :class:`~lightning_fedprune.federated.executors.sequential.SequentialExecutor` (default) runs the cohort's
  clients one after another in-process on one persistent replica of the task.
* :class:`~lightning_fedprune.federated.executors.pool.ProcessPoolExecutor` runs them in persistent worker
  processes (optionally one per GPU), fault-contained.
* ``FlowerExecutor`` (:mod:`lightning_fedprune.federated.flower`, the optional ``flower`` extra) turns the same
  plans and results into Flower messages inside a Flower ServerApp.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

import lightning.pytorch as pl

from lightning_fedprune.federated.client import ClientData
from lightning_fedprune.federated.protocol import ClientConfig, ClientPlan, ClientResult, RoundPayload

__all__ = ["Executor", "ExecutorTeardown", "ResultCallback"]

ResultCallback = Callable[[ClientResult], None]


class Executor(ABC):
    """Where the clients of a round train.

    ``teardown`` runs on every exit of ``fit``, also when it raises (see :class:`ExecutorTeardown`),
    and may run more than once: it must be idempotent.
    """

    @abstractmethod
    def setup(self, task: pl.LightningModule, data: ClientData, config: ClientConfig) -> None:
        """Prepare the clients' side once per fit: the task, the clients' data and their configuration."""

    @abstractmethod
    def run(self, payload: RoundPayload, plans: Sequence[ClientPlan],
            on_result: ResultCallback | None = None) -> list[ClientResult]:
        """Train every plan's client on its broadcast (``plan.payload``, or the round's ``payload``); the results
        in plan order (``on_result`` is called with each as it arrives)."""

    def teardown(self) -> None:
        """Release what :meth:`setup` made (idempotent)."""

    def traffic(self) -> tuple[int, int] | None:
        """Bytes ``(down, up)`` the last ``run`` really sent and received, for an executor that measures them
        on its transport (Flower: serialized message sizes); None: ``comm/*`` counts the payloads' arrays."""
        return None


class ExecutorTeardown(pl.Callback):
    """Tears the module's executor down when ``fit`` raises.

    Lightning calls no LightningModule hook on an exception (``teardown`` is skipped), only
    ``Callback.on_exception``; :class:`FederatedLightningModule` returns this callback from
    ``configure_callbacks`` so worker processes never outlive a failed fit.
    """

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        executor = getattr(pl_module, "executor", None)
        if isinstance(executor, Executor):
            executor.teardown()
