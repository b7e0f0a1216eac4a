"""Phase (b): at fixed sparsity, recompute masks from fresh importance so wrongly pruned entries come back."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl

from lightning_fedprune.callbacks._common import contribute
from lightning_fedprune.pruning.plan import Refinement
from lightning_fedprune.validation import check_int


class MaskRefinementCallback(pl.Callback):
    """Phase (b) of Federated Pruning: mask refinement at the ramp's target sparsity ``S``.

    Every ``every_n_rounds`` rounds from ``start_round`` (default: the round after the ramp ends)
    until ``until_round`` (default: until fine-tuning starts, or the end of training), the masks
    are recomputed from fresh importance at ``S``. Kept and pruned entries are ranked together:
    pruned entries received no client update, so their score is stale (for weight importance,
    their server-side value; for gradient/momentum importance, the last statistic from when they
    were kept), and an entry comes back (0 -> 1) when its score beats a kept entry's, which is
    then pruned to keep ``S``. Logs ``prune/mask_flips`` and ``prune/restored``.

    Args:
        every_n_rounds: rounds between recomputations (>= 1).
        start_round: first refinement round; must be after the ramp's ``end_round`` and before
            :class:`FineTuneFreeze`'s ``start_round``.
        until_round: last refinement round (inclusive), or None; must be before
            :class:`FineTuneFreeze`'s ``start_round`` (the masks are frozen from there).
    """

    def __init__(self, every_n_rounds: int = 10, start_round: int | None = None, until_round: int | None = None) -> None:
        every_n_rounds = check_int(every_n_rounds, "every_n_rounds", min=1)
        start_round = check_int(start_round, "start_round", min=0, optional=True)
        until_round = check_int(until_round, "until_round", min=0, optional=True)
        if start_round is not None and until_round is not None and until_round < start_round:
            raise ValueError(f"`until_round` ({until_round}) must be >= `start_round` ({start_round}).")
        self.every_n_rounds = every_n_rounds
        self.start_round = start_round
        self.until_round = until_round

    def setup(self, trainer: pl.Trainer, pl_module: Any, stage: str) -> None:
        if stage == "fit":
            contribute(pl_module, "MaskRefinementCallback",
                       refinement=Refinement(self.every_n_rounds, self.start_round, self.until_round))
