"""PruneFL-style adaptive pruning (Jiang et al., arXiv 1909.12326) as one pruning-plan contribution.

PruneFL prunes once early, then re-adjusts the masks every ``k`` rounds at a fixed size, ranking
parameters by their squared gradients accumulated since the last adjustment (divided by a per-
parameter time cost, which is uniform here). There is no ramp and no fine-tuning phase. On this
library's data model that is: a one-shot "ramp" at ``start_round``, a refinement every
``every_n_rounds`` rounds until the end, and the ``sq_gradient_l1`` importance: the server-side
squared pseudo-gradients (no traffic) summed since the masks last changed
(:class:`~lightning_fedprune.pruning.state.PruningState`).

Where this differs from PruneFL's code: its initial pruning runs on one client before federated
training (here: on the server from the dense rounds' accumulated statistics); its clients report the
squared gradients of *all* parameters, so pruned ones can grow back on fresh evidence (here pruned
entries get no update, so they keep the sum of the window in which they were last kept and come back
when that beats a kept entry's new window); it also picks the model size by a time model (here the
size is fixed at ``target_sparsity``, so it can be compared with Federated Pruning at equal size).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl

from lightning_fedprune.callbacks._common import contribute
from lightning_fedprune.pruning.patterns import PATTERNS, PatternName
from lightning_fedprune.pruning.plan import Ramp, Refinement, Selection
from lightning_fedprune.validation import check_choice, check_float, check_int, check_regex

#: PruneFL's importance: the accumulated squared gradients, summed over a group
PRUNEFL_IMPORTANCE = "sq_gradient_l1"


class PruneFL(pl.Callback):
    """PruneFL-style adaptive pruning: prune once at ``start_round``, re-adjust the masks every
    ``every_n_rounds`` rounds at the same sparsity, by accumulated squared gradients.

    Between the initial pruning and the first re-adjustment the logged ``prune/phase`` reads
    fine-tune (the plan's name for rounds after the ramp outside refinement); the masks are not frozen
    there (no :class:`~lightning_fedprune.callbacks.FineTuneFreeze`) and are re-adjusted from
    ``start_round + every_n_rounds`` on.

    Contributes the ramp, selection and refinement parts of the plan, so it replaces
    :class:`~lightning_fedprune.callbacks.SparsityRampCallback` and
    :class:`~lightning_fedprune.callbacks.MaskRefinementCallback` (use it alone, or with
    :class:`~lightning_fedprune.callbacks.AdaptiveLayerSparsity`).

    Args:
        target_sparsity: fraction of the selected parameters' entries pruned, in ``[0, 1)``.
        start_round: the round of the initial pruning (>= 1: the squared gradients of at least one
            aggregated round are needed).
        every_n_rounds: rounds between mask re-adjustments (PruneFL: 50 with many short rounds).
        until_round: last re-adjustment round, or None (until the end of training).
        pattern: the pruning pattern (PruneFL prunes single weights, ``"unstructured"``; a structured
            pattern compares it with Federated Pruning at equal compactness).
        parameters: regular expression (``re.fullmatch``) of the parameters to prune; default every
            parameter with 2 or more dimensions.
        exclude: optional regular expression of names to leave dense.
    """

    def __init__(self, target_sparsity: float = 0.5, start_round: int = 1, every_n_rounds: int = 10,
                 until_round: int | None = None, pattern: PatternName = "unstructured", parameters: str | None = None,
                 exclude: str | None = None) -> None:
        target_sparsity = check_float(target_sparsity, "target_sparsity", min=0, max=1, max_open=True)
        start_round = check_int(start_round, "start_round", min=1)
        every_n_rounds = check_int(every_n_rounds, "every_n_rounds", min=1)
        until_round = check_int(until_round, "until_round", min=start_round + 1, optional=True)
        check_choice(pattern, "pattern", PATTERNS)
        check_regex(parameters, "parameters")
        check_regex(exclude, "exclude")
        self._parts = {
            "ramp": Ramp(target_sparsity, start_round, start_round, schedule="one_shot"),
            "selection": Selection(pattern, PRUNEFL_IMPORTANCE, parameters, exclude),
            "refinement": Refinement(every_n_rounds, start_round + every_n_rounds, until_round),
        }

    def plan_parts(self) -> dict[str, Any]:
        """The one-shot ramp, the selection with PruneFL's importance, and the periodic re-adjustment."""
        return dict(self._parts)

    def setup(self, trainer: pl.Trainer, pl_module: Any, stage: str) -> None:
        if stage == "fit":
            contribute(pl_module, "PruneFL", **self.plan_parts())
