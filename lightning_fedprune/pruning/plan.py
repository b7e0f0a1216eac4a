"""The pruning schedule as a value: a :class:`PruningPlan` and pure functions of ``(round, plan)``.

Each pruning callback contributes one part of the plan when fit is set up — the ramp
(:class:`Ramp` and :class:`Selection`: which parameters, pattern, importance, how the sparsity rises),
the refinement (:class:`Refinement`), adaptive allocation (:class:`Allocation`) and fine-tuning
(:class:`Freeze`). Nothing else decides *when* anything happens: the phase of a round is
:func:`phase_at`, and whether the masks are recomputed at a round, and at which sparsity, is
:func:`update_at`. One component applies the plan each round
(:meth:`~lightning_fedprune.pruning.state.PruningState.begin_round`), and the callbacks never call
each other, so their order does not matter by construction.

This follows ``torch.ao.pruning``'s split: the plan (scheduler: how much, when) points at the pruning
state (sparsifier: what to mask); never the other way.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

from lightning_fedprune.pruning.schedules import Schedule
from lightning_fedprune.pruning.structure import Structure

__all__ = ["Allocation", "ClientStatistics", "Freeze", "Phase", "PruningPlan", "Ramp", "Refinement", "Selection",
           "frozen_at", "phase_at", "update_at"]


class Phase(IntEnum):
    """The phase of a round (an int, so it logs as ``prune/phase`` 0-3 and checkpoints as a number)."""

    DENSE = 0
    RAMP = 1
    REFINE = 2
    FINETUNE = 3

    @property
    def label(self) -> str:
        """``dense``, ``ramp``, ``refine`` or ``fine-tune``."""
        return ("dense", "ramp", "refine", "fine-tune")[self]


@dataclass(frozen=True)
class Selection:
    """What is pruned and how it is scored (contributed by ``SparsityRampCallback``).

    ``groups`` names groups of the task's ``pruning_groups()`` (e.g. ``("ffn", "attention")``);
    ``parameters``/``exclude`` are regular expressions over the task's parameter names
    (``re.fullmatch``). The selection is the union of the groups' parameters and the ``parameters``
    matches, minus ``exclude``; with neither ``groups`` nor ``parameters``: every parameter with 2 or more
    dimensions. ``structure`` is the task's groups and links (read from the task when fit starts; not a
    setting, so not part of :meth:`PruningPlan.config`): with ``dependent_masks`` the links derive the
    dependent masks.
    """

    pattern: str = "unstructured"
    importance: str = "weight_l2"
    parameters: str | None = None
    exclude: str | None = None
    momentum_beta: float = 0.9
    momentum_source: str = "ema"
    groups: tuple[str, ...] | None = None
    dependent_masks: bool = True
    structure: Structure | None = field(default=None, compare=False, repr=False)

    def resolve(self, named_shapes: list[tuple[str, tuple[int, ...]]]) -> list[str]:
        """The names this selection prunes, in the task's parameter order (raises naming the argument)."""
        chosen: set[str] = set()
        if self.groups is not None:
            structure = self.structure or Structure()
            available = structure.group_names
            if not available:
                raise ValueError(
                    f"`groups={list(self.groups)!r}` needs a task that names its pruning groups (a `pruning_groups()` "
                    "method, as the ConformerTransducer has); this task has none: select with `parameters=` (a regex).")
            unknown = [g for g in self.groups if g not in available]
            if unknown:
                raise ValueError(f"`groups` has {unknown!r}, which this task does not have; its groups are "
                                 f"{list(available)!r}.")
            for g in self.groups:
                chosen.update(structure.members(g))
        pattern = re.compile(self.parameters) if self.parameters is not None else None
        if pattern is not None:
            chosen.update(n for n, _ in named_shapes if pattern.fullmatch(n))
        elif self.groups is None:
            chosen.update(n for n, shape in named_shapes if len(shape) >= 2)
        selected = [n for n, _ in named_shapes if n in chosen]
        parts = ([f"`groups={list(self.groups)!r}`"] if self.groups is not None else []) + \
            ([f"`parameters={self.parameters!r}`"] if self.parameters is not None else [])
        what = " and ".join(parts) or "the default (tensors with >= 2 dims)"
        if not selected:
            sample = ", ".join(n for n, _ in named_shapes[:8])
            raise ValueError(f"{what} matches no parameter of the task. Some parameter names: {sample} ...")
        exclude = re.compile(self.exclude) if self.exclude is not None else None
        names = [n for n in selected if exclude is None or exclude.fullmatch(n) is None]
        if not names:
            raise ValueError(
                f"`exclude={self.exclude!r}` removes every parameter that {what} selects ({', '.join(selected[:8])}"
                f"{' ...' if len(selected) > 8 else ''}): nothing is left to prune."
            )
        return names

    def settings(self) -> dict[str, Any]:
        """The user's settings (everything but the task's structure; ``groups`` only when given and
        ``dependent_masks`` only when off, so a configuration without them reads as it did before they existed)."""
        skip = ("structure", "groups", "dependent_masks")
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip}
        if self.groups is not None:
            out["groups"] = list(self.groups)
        if not self.dependent_masks:
            out["dependent_masks"] = False
        return out


@dataclass(frozen=True)
class Ramp:
    """Phase (a): the sparsity rises from 0 at ``start_round`` to ``target_sparsity`` at ``end_round``,
    the masks recomputed every ``every_n_rounds`` rounds (and at ``end_round``)."""

    target_sparsity: float = 0.5
    start_round: int = 0
    end_round: int = 0
    schedule: str = "cubic"
    power: float = 3.0
    num_steps: int = 4
    every_n_rounds: int = 1

    def sparsity_at(self, round: int) -> float:
        return Schedule(self.target_sparsity, self.start_round, self.end_round, self.schedule, self.power,
                        self.num_steps).at(round)


@dataclass(frozen=True)
class Refinement:
    """Phase (b): masks recomputed at the target sparsity every ``every_n_rounds`` rounds from
    ``start_round`` (default: the round after the ramp) to ``until_round`` (inclusive; default: until
    fine-tuning or the end of training)."""

    every_n_rounds: int = 10
    start_round: int | None = None
    until_round: int | None = None


@dataclass(frozen=True)
class Freeze:
    """Phase (c): from ``start_round`` the masks and sparsity are frozen; with ``make_permanent`` the
    pruned values are dropped from the server's model when it starts."""

    start_round: int = 0
    make_permanent: bool = True


@dataclass(frozen=True)
class Allocation:
    """Adaptive per-layer sparsity: ``method="power"`` is
    :func:`~lightning_fedprune.pruning.allocation.adaptive_allocation`, ``"global"`` is
    :func:`~lightning_fedprune.pruning.allocation.global_allocation` (``temperature`` unused)."""

    max_layer_sparsity: float = 0.9
    temperature: float = 1.0
    normalize: str = "fan_in"
    method: str = "power"


@dataclass(frozen=True)
class ClientStatistics:
    """The statistic the importance needs comes from the clients, not from the server's aggregated updates:
    in the ``window`` rounds before every mask recomputation each client of the round accumulates it over its
    local steps for every pruned tensor (pruned entries included: those tensors train masked-dense in these
    rounds) and uploads the sums with its update; the server merges them with the strategy's client weights,
    sums them over the window, and the recomputation scores the masks from that sum
    (:mod:`lightning_fedprune.pruning.statistics`). Contributed by
    :class:`~lightning_fedprune.baselines.PruneFL`."""

    window: int = 1


#: The callback that contributes each part (named in messages and in the checkpoint's configuration).
CONTRIBUTORS = {
    "ramp": "SparsityRampCallback",
    "refinement": "MaskRefinementCallback",
    "allocation": "AdaptiveLayerSparsity",
    "freeze": "FineTuneFreeze",
    "statistics": "ClientStatistics",
}


@dataclass(frozen=True)
class PruningPlan:
    """The whole pruning schedule of a run. Empty (no ramp) means no pruning."""

    ramp: Ramp | None = None
    selection: Selection = field(default_factory=Selection)
    refinement: Refinement | None = None
    allocation: Allocation | None = None
    freeze: Freeze | None = None
    statistics: ClientStatistics | None = None

    def with_part(self, **parts: Any) -> PruningPlan:
        """This plan with more parts; a part may be given once (one callback of each kind per Trainer)."""
        for name, value in parts.items():
            if name != "selection" and getattr(self, name) is not None:
                who = CONTRIBUTORS.get(name, name)
                raise ValueError(f"Only one {who} may be used per Trainer; found more than one.")
        return dataclasses.replace(self, **parts)

    @property
    def active(self) -> bool:
        return self.ramp is not None

    def refine_start(self) -> int | None:
        """First refinement round, or None without refinement."""
        if self.refinement is None or self.ramp is None:
            return None
        r = self.refinement
        return r.start_round if r.start_round is not None else self.ramp.end_round + 1

    def validate(self) -> None:
        """Reject parts without a ramp and schedules that contradict each other, naming the rounds."""
        if self.ramp is None:
            for name in ("refinement", "allocation", "freeze", "statistics"):
                if getattr(self, name) is not None:
                    reason = " (it refines its masks)" if name == "refinement" else ""
                    raise ValueError(f"{CONTRIBUTORS[name]} needs a SparsityRampCallback in the same Trainer{reason}.")
            return
        ramp, refine, freeze = self.ramp, self.refinement, self.freeze
        if freeze is not None and freeze.start_round <= ramp.end_round:
            raise ValueError(f"FineTuneFreeze `start_round` ({freeze.start_round}) must be after the ramp's `end_round` "
                             f"({ramp.end_round}).")
        if self.allocation is not None and ramp.target_sparsity > self.allocation.max_layer_sparsity:
            raise ValueError(
                f"The ramp's `target_sparsity` ({ramp.target_sparsity}) exceeds AdaptiveLayerSparsity's "
                f"`max_layer_sparsity` ({self.allocation.max_layer_sparsity}): no allocation can reach it."
            )
        if refine is None:
            return
        if refine.start_round is not None and refine.start_round <= ramp.end_round:
            raise ValueError(
                f"MaskRefinementCallback `start_round` ({refine.start_round}) must be after the ramp's `end_round` "
                f"({ramp.end_round}): refinement works at the final sparsity."
            )
        if refine.until_round is not None and refine.until_round <= ramp.end_round:
            raise ValueError(f"`until_round` ({refine.until_round}) must be after the ramp's `end_round` ({ramp.end_round}).")
        if freeze is None:
            return
        # refinement rounds at or after the freeze would be silently skipped: a contradiction
        frozen = freeze.start_round
        if refine.start_round is not None and refine.start_round >= frozen:
            raise ValueError(
                f"MaskRefinementCallback `start_round` ({refine.start_round}) must be before FineTuneFreeze `start_round` "
                f"({frozen}): the masks are frozen from round {frozen}, so refinement would never run."
            )
        if refine.until_round is not None and refine.until_round >= frozen:
            raise ValueError(
                f"MaskRefinementCallback `until_round` ({refine.until_round}) must be before FineTuneFreeze `start_round` "
                f"({frozen}): the masks are frozen from round {frozen}, so refinement would stop there, not at "
                f"round {refine.until_round}."
            )
        first = self.refine_start()
        if first is not None and first >= frozen:
            raise ValueError(
                f"MaskRefinementCallback would never run: it starts at round {first} (the round after the ramp's "
                f"`end_round`) and FineTuneFreeze `start_round` ({frozen}) freezes the masks from round {frozen}. "
                "Move the freeze later or remove the MaskRefinementCallback."
            )

    def config(self) -> dict[str, dict[str, Any]]:
        """The plan by contributing callback (stored in checkpoints and compared on resume)."""
        out: dict[str, dict[str, Any]] = {}
        if self.ramp is not None:
            out["SparsityRampCallback"] = {**dataclasses.asdict(self.ramp), **self.selection.settings()}
        for name in ("refinement", "allocation", "freeze", "statistics"):
            part = getattr(self, name)
            if part is not None:
                out[CONTRIBUTORS[name]] = dataclasses.asdict(part)
        return out


def phase_at(round: int, plan: PruningPlan) -> Phase:
    """The phase of ``round`` under ``plan``.

    >>> plan = PruningPlan(Ramp(0.5, start_round=2, end_round=5), refinement=Refinement(2, until_round=8),
    ...                    freeze=Freeze(10))
    >>> [phase_at(r, plan).label for r in (0, 2, 5, 6, 8, 9, 10)]
    ['dense', 'ramp', 'ramp', 'refine', 'refine', 'fine-tune', 'fine-tune']
    """
    ramp = plan.ramp
    if ramp is None:
        return Phase.DENSE
    if plan.freeze is not None and round >= plan.freeze.start_round:
        return Phase.FINETUNE
    if round < ramp.start_round:
        return Phase.DENSE
    if round <= ramp.end_round:
        return Phase.RAMP
    first = plan.refine_start()
    refine = plan.refinement
    if first is not None and round >= first and (refine.until_round is None or round <= refine.until_round):
        return Phase.REFINE
    return Phase.FINETUNE


def frozen_at(round: int, plan: PruningPlan) -> bool:
    """Whether the masks are frozen in ``round``: from the :class:`Freeze` part's ``start_round`` on (a round
    after the ramp outside refinement is in the fine-tuning phase, but frozen only from there).

    >>> plan = PruningPlan(Ramp(0.5, start_round=2, end_round=2), refinement=Refinement(5, start_round=7),
    ...                    freeze=Freeze(20))
    >>> [(r, phase_at(r, plan).label, frozen_at(r, plan)) for r in (3, 7, 20)]
    [(3, 'fine-tune', False), (7, 'refine', False), (20, 'fine-tune', True)]
    """
    return plan.ramp is not None and plan.freeze is not None and round >= plan.freeze.start_round


def update_at(round: int, plan: PruningPlan, current_target: float) -> float | None:
    """The sparsity the masks are recomputed at in ``round``, or None when they stay as they are.

    Ramp: every ``every_n_rounds`` rounds from its start and at ``end_round``, at the schedule's
    sparsity. Refinement: every ``every_n_rounds`` rounds from its start, at the target. After the
    ramp, while the masks are not frozen, once more at the target if the last update fell short of
    it (``every_n_rounds`` skipped the end).

    >>> plan = PruningPlan(Ramp(0.5, start_round=2, end_round=5, schedule="linear", every_n_rounds=2),
    ...                    refinement=Refinement(3))
    >>> [(r, update_at(r, plan, 0.5)) for r in range(2, 10) if update_at(r, plan, 0.5) is not None]
    [(2, 0.0), (4, 0.3333333333333333), (5, 0.5), (6, 0.5), (9, 0.5)]
    """
    ramp = plan.ramp
    if ramp is None:
        return None
    phase = phase_at(round, plan)
    if phase == Phase.RAMP:
        due = (round - ramp.start_round) % ramp.every_n_rounds == 0 or round == ramp.end_round
        return ramp.sparsity_at(round) if due else None
    if phase == Phase.REFINE and (round - plan.refine_start()) % plan.refinement.every_n_rounds == 0:
        return ramp.target_sparsity
    if phase in (Phase.REFINE, Phase.FINETUNE) and not frozen_at(round, plan) and current_target != ramp.target_sparsity:
        return ramp.target_sparsity
    return None
