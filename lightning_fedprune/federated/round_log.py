"""What a round logs: ``round/*``, ``comm/*``, ``prune/*`` and the cohort's values of what the task logged.

A round is one Trainer step. Its own scalars are logged as ``self.log(..., on_step=True, on_epoch=False)``
would log them (every logger at ``log_every_n_steps``, ``callback_metrics``, the progress bar), in one call
(:func:`~lightning_fedprune._compat.log_step_metrics`); the names the task logged in client training go through
``self.log`` with the task's own options (epoch reductions included).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl

from lightning_fedprune._compat import log_step_metrics
from lightning_fedprune.federated.executors import Executor
from lightning_fedprune.federated.hooks import RoundSummary
from lightning_fedprune.federated.protocol import ClientResult, RoundPayload
from lightning_fedprune.federated.strategies import Aggregate
from lightning_fedprune.pruning.state import PruningState

__all__ = ["log_round", "round_summary"]

_PROG_BAR = ("round/train_loss", "prune/sparsity")


def round_summary(rnd: int, cohort: list[int], sent: list[RoundPayload], results: list[ClientResult], agg: Aggregate,
                  executor: Executor) -> RoundSummary:
    """What happened in a round, for the federated hooks and the logs: the cohort's outcome and the bytes each way
    (counted from the encoded arrays, or measured on its transport by an executor that can: Flower)."""
    summary = RoundSummary(round=rnd, cohort=cohort, clients_ok=len(agg.ok), clients_failed=len(agg.failed),
                           train_loss=agg.train_loss, total_weight=agg.weight)
    summary.bytes_down = sum(p.encoded.nbytes for p in sent)
    summary.bytes_up = sum(r.bytes_up for r in results)
    summary.dense_bytes = 2 * sum(p.encoded.dense_nbytes for p in sent)
    measured = executor.traffic()
    if measured is not None:
        summary.bytes_down, summary.bytes_up = measured
    return summary


def log_round(module: pl.LightningModule, summary: RoundSummary, agg: Aggregate, pruning: PruningState) -> dict[str, float]:
    """Log the round and return the cohort's values of the names the task logged in client training.

    A name the task logged with ``self.log`` in client training is logged here once per round with the task's
    options, its value the cohort's reduction: for ``reduce_fx="mean"`` the mean weighted by the examples behind
    each client's value, so Lightning's epoch mean over rounds (``X_epoch``) weights every example alike.
    """
    values: dict[str, Any] = {}
    if agg.ok:
        values["round/train_loss"] = summary.train_loss
    values["round/clients_ok"] = float(summary.clients_ok)
    values["round/clients_failed"] = float(summary.clients_failed)
    values["round/seconds"] = summary.seconds
    values["comm/bytes_down"] = float(summary.bytes_down)
    values["comm/bytes_up"] = float(summary.bytes_up)
    values["comm/dense_bytes"] = float(summary.dense_bytes)
    if summary.dense_bytes:
        values["comm/ratio"] = (summary.bytes_down + summary.bytes_up) / summary.dense_bytes
    if pruning.plan.active:
        # every value every round (flips are 0 without a recomputation): Lightning repeats a step value until it
        # is logged again, so a value logged only in some rounds would look stale in the others
        change = pruning.last_change
        values["prune/sparsity"] = pruning.sparsity() if pruning.masks else 0.0
        values["prune/target_sparsity"] = pruning.target_sparsity
        values["prune/phase"] = float(pruning.phase)
        values["prune/mask_flips"] = float(change.flips)
        values["prune/restored"] = float(change.restored)
        for name, value in pruning.actual_layer_sparsity().items():
            values[f"prune/layer_sparsity/{name}"] = value
    log_step_metrics(module.trainer, values, prog_bar=_PROG_BAR)
    for name, v in agg.logged.items():
        module.log(name, v.value, on_step=v.on_step, on_epoch=v.on_epoch, reduce_fx=v.reduce_fx, prog_bar=v.prog_bar,
                   logger=v.logger, batch_size=max(1, int(round(v.weight))))
    return {name: v.value for name, v in agg.logged.items()}
