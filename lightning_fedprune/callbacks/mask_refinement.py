"""Phase (b): at fixed sparsity, recompute masks from fresh importance so wrongly pruned entries come back."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl

from lightning_fedprune.callbacks._common import find_callback
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
        self.total_flips = 0
        self.total_restored = 0

    def config(self) -> dict[str, Any]:
        """The settings, stored in checkpoints and compared on resume."""
        return {"every_n_rounds": self.every_n_rounds, "start_round": self.start_round, "until_round": self.until_round}

    def first_round(self, ramp: Any) -> int:
        return self.start_round if self.start_round is not None else ramp.end_round + 1

    def active_at(self, round: int, ramp: Any) -> bool:
        start = self.first_round(ramp)
        return round >= start and (self.until_round is None or round <= self.until_round)

    def setup(self, trainer: pl.Trainer, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        from lightning_fedprune.callbacks.finetune import FineTuneFreeze
        from lightning_fedprune.callbacks.sparsity_ramp import SparsityRampCallback

        ramp = find_callback(trainer, SparsityRampCallback)
        if ramp is None:
            raise ValueError("MaskRefinementCallback needs a SparsityRampCallback in the same Trainer (it refines its masks).")
        if self.start_round is not None and self.start_round <= ramp.end_round:
            raise ValueError(
                f"MaskRefinementCallback `start_round` ({self.start_round}) must be after the ramp's `end_round` "
                f"({ramp.end_round}): refinement works at the final sparsity."
            )
        if self.until_round is not None and self.until_round <= ramp.end_round:
            raise ValueError(f"`until_round` ({self.until_round}) must be after the ramp's `end_round` ({ramp.end_round}).")
        self._check_against_freeze(find_callback(trainer, FineTuneFreeze), ramp)
        self._ramp = ramp

    def _check_against_freeze(self, freeze: Any, ramp: Any) -> None:
        """Refinement rounds at or after the freeze would be silently skipped (the masks are frozen there):
        a schedule that asks for them is a contradiction, rejected with the rounds named."""
        if freeze is None:
            return
        frozen = freeze.start_round
        if self.start_round is not None and self.start_round >= frozen:
            raise ValueError(
                f"MaskRefinementCallback `start_round` ({self.start_round}) must be before FineTuneFreeze `start_round` "
                f"({frozen}): the masks are frozen from round {frozen}, so refinement would never run."
            )
        if self.until_round is not None and self.until_round >= frozen:
            raise ValueError(
                f"MaskRefinementCallback `until_round` ({self.until_round}) must be before FineTuneFreeze `start_round` "
                f"({frozen}): the masks are frozen from round {frozen}, so refinement would stop there, not at "
                f"round {self.until_round}."
            )
        first = self.first_round(ramp)
        if first >= frozen:
            raise ValueError(
                f"MaskRefinementCallback would never run: it starts at round {first} (the round after the ramp's "
                f"`end_round`) and FineTuneFreeze `start_round` ({frozen}) freezes the masks from round {frozen}. "
                "Move the freeze later or remove the MaskRefinementCallback."
            )

    def on_fed_round_start(self, trainer: pl.Trainer, pl_module: Any, round: int, cohort: list[int]) -> None:
        ramp = self._ramp
        if ramp.phase_at(round) != 2:
            return
        if (round - self.first_round(ramp)) % self.every_n_rounds != 0:
            return
        change = ramp.recompute(pl_module, round, ramp.target_sparsity)
        self.total_flips += change.flips
        self.total_restored += change.restored

    def state_dict(self) -> dict[str, Any]:
        return {"total_flips": self.total_flips, "total_restored": self.total_restored}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.total_flips = int(state_dict.get("total_flips", 0))
        self.total_restored = int(state_dict.get("total_restored", 0))
