"""PruneFL (Jiang et al., arXiv 1909.12326) as one pruning-plan contribution.

PruneFL prunes once early, then re-adjusts the masks every ``k`` rounds at a fixed size, ranking parameters by
the squared gradients the clients accumulated over their local iterations (divided by a per-parameter time cost,
uniform here), and finally trains with a fixed mask. On this library's data model:

* the initial pruning is a one-shot "ramp" at ``start_round``; the re-adjustments are a refinement every
  ``every_n_rounds`` rounds; ``freeze_round`` starts the fixed-mask phase (the masks frozen, the pruned values
  dropped for good);
* the importance is ``sq_gradient_l1``: per structure (the pattern's group) the sum of the accumulated squared
  gradients of its entries;
* with ``statistics="clients"`` (default, PruneFL's) the squared gradients come from the clients: in the
  ``window`` rounds before every mask computation each client of the round trains its pruned tensors
  masked-dense (so the gradient of a pruned entry, a zero weight, exists), adds ``g * g`` of every entry after
  every local step, and uploads the sums with its update (their bytes count in ``comm/bytes_up``); the server
  takes the mean over the cohort weighted as the strategy weights the updates, sums it over the window and
  ranks the groups by it (:class:`~lightning_fedprune.pruning.plan.ClientStatistics`). Pruned entries are scored
  on fresh evidence, so a pruned structure whose gradients grew comes back. ``statistics="server"`` uses the
  squared aggregated updates instead (no traffic; pruned entries keep the sum of the window in which they were
  last kept).

Where this differs from PruneFL's code (docs/ablation.md reviews it): the initial pruning runs on the server
from the cohort's statistics, not on one client before federated training; sampled clients are stateless, so
the sums cover the local iterations of the ``window`` rounds before a re-adjustment, not every iteration since
the last one; the size is fixed at ``target_sparsity`` instead of chosen by a time model (so it can be compared
with Federated Pruning at equal size); the time cost per parameter is uniform.
"""

from __future__ import annotations

from typing import Any, Literal

import lightning.pytorch as pl

from lightning_fedprune.callbacks._common import contribute
from lightning_fedprune.pruning.patterns import PATTERNS, PatternName
from lightning_fedprune.pruning.plan import ClientStatistics, Freeze, Ramp, Refinement, Selection
from lightning_fedprune.validation import check_choice, check_float, check_int, check_regex

#: PruneFL's importance: the accumulated squared gradients, summed over a group
PRUNEFL_IMPORTANCE = "sq_gradient_l1"
StatisticsSource = Literal["clients", "server"]


class PruneFL(pl.Callback):
    """PruneFL: prune once at ``start_round``, re-adjust the masks every ``every_n_rounds`` rounds at the same
    sparsity by the squared gradients the clients accumulated, then (``freeze_round``) train with fixed masks.

    Between the initial pruning and the first re-adjustment the logged ``prune/phase`` reads fine-tune (the plan's
    name for rounds after the ramp outside refinement); the masks are frozen only from ``freeze_round``.

    Contributes the ramp, selection, refinement, fine-tuning and client-statistics parts of the plan, so it
    replaces :class:`~lightning_fedprune.callbacks.SparsityRampCallback`,
    :class:`~lightning_fedprune.callbacks.MaskRefinementCallback` and
    :class:`~lightning_fedprune.callbacks.FineTuneFreeze` (use it alone, or with
    :class:`~lightning_fedprune.callbacks.AdaptiveLayerSparsity`).

    Args:
        target_sparsity: fraction of the selected parameters' entries pruned, in ``[0, 1)``.
        start_round: the round of the initial pruning (>= 1: the statistics of at least one round are needed).
        every_n_rounds: rounds between mask re-adjustments (PruneFL: every 50 of its many short rounds).
        until_round: last re-adjustment round, or None (until ``freeze_round`` or the end of training).
        freeze_round: the first round of the fixed-mask phase (masks frozen, pruned values dropped), or None
            (re-adjusted until the end); after ``start_round``.
        pattern: the pruning pattern (PruneFL prunes single weights, ``"unstructured"``; a structured pattern
            compares it with Federated Pruning at equal compactness).
        parameters: regular expression (``re.fullmatch``) of the parameters to prune; default every parameter with
            2 or more dimensions.
        exclude: optional regular expression of names to leave dense.
        statistics: where the squared gradients come from: ``"clients"`` (PruneFL: accumulated over the clients'
            local steps and uploaded) or ``"server"`` (the squared aggregated updates; no traffic).
        window: with ``statistics="clients"``, how many rounds before each mask computation the clients upload
            their sums (summed over those rounds); 1: the round just before.
    """

    def __init__(self, target_sparsity: float = 0.5, start_round: int = 1, every_n_rounds: int = 10,
                 until_round: int | None = None, freeze_round: int | None = None,
                 pattern: PatternName = "unstructured", parameters: str | None = None, exclude: str | None = None,
                 statistics: StatisticsSource = "clients", window: int = 1) -> None:
        target_sparsity = check_float(target_sparsity, "target_sparsity", min=0, max=1, max_open=True)
        start_round = check_int(start_round, "start_round", min=1)
        every_n_rounds = check_int(every_n_rounds, "every_n_rounds", min=1)
        until_round = check_int(until_round, "until_round", min=start_round + 1, optional=True)
        freeze_round = check_int(freeze_round, "freeze_round", min=start_round + 1, optional=True)
        if freeze_round is not None and until_round is not None and until_round >= freeze_round:
            raise ValueError(f"`until_round` ({until_round}) must be before `freeze_round` ({freeze_round}): the masks "
                             f"are fixed from round {freeze_round}.")
        check_choice(pattern, "pattern", PATTERNS)
        check_regex(parameters, "parameters")
        check_regex(exclude, "exclude")
        check_choice(statistics, "statistics", ("clients", "server"))
        window = check_int(window, "window", min=1)
        self._parts: dict[str, Any] = {
            "ramp": Ramp(target_sparsity, start_round, start_round, schedule="one_shot"),
            "selection": Selection(pattern, PRUNEFL_IMPORTANCE, parameters, exclude),
        }
        first_readjustment = start_round + every_n_rounds
        if freeze_round is None or first_readjustment < freeze_round:
            self._parts["refinement"] = Refinement(every_n_rounds, first_readjustment, until_round)
        if freeze_round is not None:
            self._parts["freeze"] = Freeze(freeze_round, make_permanent=True)
        if statistics == "clients":
            self._parts["statistics"] = ClientStatistics(window)

    def plan_parts(self) -> dict[str, Any]:
        """The one-shot ramp, the selection with PruneFL's importance, the periodic re-adjustment, the fixed-mask
        phase and, with client statistics, the clients' uploads."""
        return dict(self._parts)

    def setup(self, trainer: pl.Trainer, pl_module: Any, stage: str) -> None:
        if stage == "fit":
            contribute(pl_module, "PruneFL", **self.plan_parts())
