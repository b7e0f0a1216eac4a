"""Phase (c): masks and sparsity frozen, pruning made permanent; export of the pruned model at the end."""

from __future__ import annotations

import warnings
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_fedprune.callbacks._common import contribute
from lightning_fedprune.pruning.plan import Freeze
from lightning_fedprune.validation import check_bool, check_int, check_path


class FineTuneFreeze(pl.Callback):
    """Phase (c) of Federated Pruning: from ``start_round`` the masks and the sparsity are frozen
    and only the remaining weights are trained.

    Args:
        start_round: first fine-tuning round; must be after the ramp's ``end_round``.
        make_permanent: when fine-tuning starts, drop the pruned values from the global model (set
            them to exact zeros): the pruned parameters are removed for good, as in the method's
            phase (c). The masks are frozen from then on, so training is the same either way; with
            ``False`` the server keeps the pruned values (restorable) and only the checkpoints'
            ``state_dict`` and evaluation see zeros.
        export_path: if set, write the pruned model there at the end of fit (``torch.save`` of
            :func:`lightning_fedprune.pruning.export.export_pruned`: a state_dict with zeros, and a
            compact form for structured patterns). For a checkpoint that ``Task.load_from_checkpoint``
            reads, see :func:`lightning_fedprune.federated.checkpoint.export_task_checkpoint`.
    """

    def __init__(self, start_round: int, make_permanent: bool = True, export_path: str | None = None) -> None:
        self.start_round = check_int(start_round, "start_round", min=0)
        self.make_permanent = check_bool(make_permanent, "make_permanent")
        # checked now, not when the export is written after training
        check_path(export_path, "export_path", kind="file", parent_must_exist=True)
        self.export_path = export_path

    def setup(self, trainer: pl.Trainer, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        check_path(self.export_path, "export_path", kind="file", parent_must_exist=True)  # again: fit may come much later
        contribute(pl_module, "FineTuneFreeze", freeze=Freeze(self.start_round, self.make_permanent))

    def on_fit_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        state = pl_module.pruning
        if not state.masks:
            return
        if trainer.global_step <= self.start_round:
            warnings.warn(
                f"Training ended at round {trainer.global_step}, before fine-tuning (round {self.start_round}); "
                "pruning is not made permanent.", stacklevel=2)
            return
        if self.export_path is not None:
            from lightning_fedprune.pruning.export import export_pruned

            torch.save(export_pruned(pl_module.task, state.masks, state.patterns), self.export_path)

