"""The default executor: the cohort's clients one after another, in the server process."""

from __future__ import annotations

from collections.abc import Sequence

import lightning.pytorch as pl

from lightning_fedprune.federated.client import ClientData, ClientRunner
from lightning_fedprune.federated.executors.base import Executor, ResultCallback
from lightning_fedprune.federated.protocol import ClientConfig, ClientPlan, ClientResult, RoundPayload

__all__ = ["SequentialExecutor"]


class SequentialExecutor(Executor):
    """Runs clients one after another in the server process, on one replica of the task (on the device the
    server's model is on)."""

    def __init__(self) -> None:
        self.runner: ClientRunner | None = None

    def setup(self, task: pl.LightningModule, data: ClientData, config: ClientConfig) -> None:
        self.runner = ClientRunner(task, data, config)

    def run(self, payload: RoundPayload, plans: Sequence[ClientPlan],
            on_result: ResultCallback | None = None) -> list[ClientResult]:
        if self.runner is None:
            raise RuntimeError("SequentialExecutor.run called before setup")
        results = []
        for plan in plans:
            result = self.runner.run(plan.payload or payload, plan)
            if on_result is not None:
                on_result(result)
            results.append(result)
        return results

    def teardown(self) -> None:
        self.runner = None
