"""Phase (a): sparsity rises from 0 to the target, in one shot or by a schedule."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Literal, get_args

import lightning.pytorch as pl

from lightning_fedprune.callbacks._common import contribute
from lightning_fedprune.pruning.importance import IMPORTANCE, ImportanceName, get_importance
from lightning_fedprune.pruning.patterns import PATTERNS, PatternName
from lightning_fedprune.pruning.plan import Ramp, Selection
from lightning_fedprune.pruning.schedules import SCHEDULES, ScheduleName, validate_schedule
from lightning_fedprune.pruning.structure import structure_of
from lightning_fedprune.validation import check_bool, check_choice, check_float, check_int, check_regex, check_str, fail

MomentumSource = Literal["ema", "server_optimizer"]
MOMENTUM_SOURCES: tuple[str, ...] = get_args(MomentumSource)


class SparsityRampCallback(pl.Callback):
    """Phase (a) of Federated Pruning: ramp the sparsity of the chosen parameters from 0 to ``target_sparsity``.

    It contributes the ramp and the selection (which parameters, pattern, importance) to the run's
    :class:`~lightning_fedprune.pruning.plan.PruningPlan`; at the start of every round the server
    applies the plan (the masks are recomputed before the payload is built), so the round's clients
    already receive the pruned model.

    Args:
        target_sparsity: final fraction ``S`` of pruned entries over the prunable parameters, in ``[0, 1)``.
        start_round: first round at which masks are computed (before it the model is dense).
        end_round: round from which the sparsity stays at ``S`` (default: ``start_round``, i.e. one shot).
        schedule: ``"one_shot"``, ``"linear"``, ``"cubic"`` (polynomial, Zhu & Gupta 2017) or ``"step"``.
        power: exponent of the ``cubic`` schedule.
        num_steps: number of increments of the ``step`` schedule.
        every_n_rounds: during the ramp, recompute the masks every this many rounds (the final
            ``end_round`` update always happens).
        pattern: ``"unstructured"``, ``"row"``, ``"column"``, ``"half_row"`` or ``"half_column"``
            (see docs/concepts.md for the 2-D view of >2-D tensors and the half split).
        importance: ``"weight_l1"``, ``"weight_l2"``, ``"gradient_l1"``, ``"gradient_l2"``,
            ``"momentum_l1"``, ``"momentum_l2"`` or ``"weight_x_gradient"``. Gradients and momenta
            are server-side statistics that cost no traffic: the aggregated pseudo-gradient and its
            exponential moving average (or the server optimiser's momentum, see ``momentum_source``).
        parameters: regular expression (``re.fullmatch``) over the task's parameter names
            (``encoder.layers.0.ffn.linear1.weight``); default (without ``groups``): every parameter with 2
            or more dimensions (weights of Linear, Conv, Embedding, attention projections; no biases or norms).
        exclude: optional regular expression of names to leave dense.
        groups: names of the task's pruning groups (its ``pruning_groups()``), e.g. ``["ffn", "attention",
            "conv", "predictor", "joiner"]`` for the ConformerTransducer; with ``parameters`` the selection is
            the union of both. An unknown name is refused when fit starts, listing the task's groups.
            Whatever the selection, the task's ``pruning_links()`` add the dependent masks (a pruned input
            feature of a layer removes the matching output of the layer that makes it; see
            :mod:`lightning_fedprune.pruning.structure`).
        dependent_masks: derive the dependent masks from the task's links (default); ``False`` prunes exactly the
            selection (the dead rows and bias entries then stay, are trained, sent and kept masked-dense).
        momentum_beta: EMA factor of the pseudo-gradient momentum (``momentum_source="ema"``).
        momentum_source: ``"ema"`` (default) or ``"server_optimizer"`` (``sgdm``'s momentum buffer /
            ``adam``'s first moment).
    """

    def __init__(
        self,
        target_sparsity: float = 0.5,
        start_round: int = 0,
        end_round: int | None = None,
        schedule: ScheduleName = "cubic",
        power: float = 3.0,
        num_steps: int = 4,
        every_n_rounds: int = 1,
        pattern: PatternName = "unstructured",
        importance: ImportanceName = "weight_l2",
        parameters: str | None = None,
        exclude: str | None = None,
        momentum_beta: float = 0.9,
        momentum_source: MomentumSource = "ema",
        groups: Sequence[str] | None = None,
        dependent_masks: bool = True,
    ) -> None:
        target_sparsity = check_float(target_sparsity, "target_sparsity", min=0, max=1, max_open=True)
        start_round = check_int(start_round, "start_round", min=0)
        end_round = check_int(end_round, "end_round", min=0, optional=True)
        check_choice(schedule, "schedule", SCHEDULES)
        if end_round is None:
            end_round = start_round
        if end_round < start_round:
            raise ValueError(f"`end_round` ({end_round}) must be >= `start_round` ({start_round}).")
        validate_schedule(target=target_sparsity, start_round=start_round, end_round=end_round, schedule=schedule,
                          power=power, num_steps=num_steps)
        every_n_rounds = check_int(every_n_rounds, "every_n_rounds", min=1)
        check_choice(pattern, "pattern", PATTERNS)
        check_choice(importance, "importance", IMPORTANCE)
        if get_importance(importance).needs is not None and start_round < 1:
            raise ValueError(
                f"`importance={importance!r}` uses server-side gradient statistics, which exist only after a round has "
                f"been aggregated: `start_round` must be >= 1, got {start_round}."
            )
        check_regex(parameters, "parameters")  # checked now; the plan compiles them when fit starts
        check_regex(exclude, "exclude")
        momentum_beta = check_float(momentum_beta, "momentum_beta", min=0, max=1, max_open=True)
        check_choice(momentum_source, "momentum_source", MOMENTUM_SOURCES)
        if groups is not None:
            if isinstance(groups, str) or not isinstance(groups, Sequence) or not groups:
                fail("groups", "a non-empty list of group names (e.g. ['ffn', 'attention'])", groups)
            groups = tuple(check_str(g, f"groups[{i}]") for i, g in enumerate(groups))
            if len(set(groups)) != len(groups):
                fail("groups", "a list without repeated names", list(groups))
        check_bool(dependent_masks, "dependent_masks")
        self.target_sparsity, self.start_round, self.end_round = target_sparsity, start_round, end_round
        self.schedule, self.power, self.num_steps, self.every_n_rounds = schedule, power, num_steps, every_n_rounds
        self.pattern, self.importance, self.parameters, self.exclude = pattern, importance, parameters, exclude
        self.momentum_beta, self.momentum_source = momentum_beta, momentum_source
        self.groups, self.dependent_masks = groups, dependent_masks

    def plan_parts(self) -> dict[str, Any]:
        """This callback's part of the plan: the ramp and the selection (from its settings)."""
        return {"ramp": Ramp(self.target_sparsity, self.start_round, self.end_round, self.schedule, self.power,
                             self.num_steps, self.every_n_rounds),
                "selection": Selection(self.pattern, self.importance, self.parameters, self.exclude, self.momentum_beta,
                                       self.momentum_source, self.groups, self.dependent_masks)}

    def setup(self, trainer: pl.Trainer, pl_module: Any, stage: str) -> None:
        if stage == "fit":
            parts = self.plan_parts()
            task = getattr(pl_module, "task", None)
            if task is not None:  # the task's groups and links (the dependent masks) go with the selection
                parts["selection"] = dataclasses.replace(parts["selection"], structure=structure_of(task))
            contribute(pl_module, "SparsityRampCallback", **parts)
