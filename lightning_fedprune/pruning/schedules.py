"""Sparsity schedules: the target sparsity as a function of the federated round.

With ``p = (round - start_round) / (end_round - start_round)`` clipped to ``[0, 1]``:

* before ``start_round`` the sparsity is 0;
* ``one_shot``: ``target`` from ``start_round`` on (``end_round`` is not used);
* ``linear``: ``target * p``;
* ``cubic`` (Zhu & Gupta 2017, "To prune, or not to prune"): ``target * (1 - (1 - p) ** power)``
  (fast at first, slowing down as fewer redundant weights remain);
* ``step``: ``num_steps`` equal increments at equally spaced rounds,
  ``target * floor(p * num_steps) / num_steps`` (computed in exact integer arithmetic), so the
  first increment is at ``start + (end - start) / num_steps`` and the last at ``end_round``;
* from ``end_round`` on every schedule is at ``target``.

At ``start_round`` itself the gradual schedules are still at 0 (``p = 0``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, get_args

from lightning_fedprune.validation import check_choice, check_float, check_int, fail

__all__ = ["SCHEDULES", "Schedule", "sparsity_at", "validate_schedule"]

ScheduleName = Literal["one_shot", "linear", "cubic", "step"]
SCHEDULES: tuple[str, ...] = get_args(ScheduleName)


@dataclass(frozen=True)
class Schedule:
    """A sparsity schedule, checked when it is made (each argument named in the error).

    Requires ``0 <= target < 1``, integers ``0 <= start_round <= end_round``, ``schedule`` in
    :data:`SCHEDULES`, ``power > 0`` and an integer ``num_steps >= 1``.

    Args:
        target: final sparsity ``S`` in ``[0, 1)``.
        start_round: first round of the pruning phase.
        end_round: round from which the sparsity stays at ``target``.
        schedule: one of :data:`SCHEDULES`.
        power: exponent of the ``cubic`` schedule.
        num_steps: number of increments of the ``step`` schedule.

    Example:
        >>> from lightning_fedprune.pruning.schedules import Schedule
        >>> Schedule(target=0.5, start_round=0, end_round=100, schedule="cubic").at(50)
        0.4375
        >>> Schedule(target=0.5, start_round=10, end_round=5, schedule="linear")
        Traceback (most recent call last):
        ...
        ValueError: `end_round` must be an integer >= `start_round` (10), got 5.
    """

    target: float
    start_round: int
    end_round: int
    schedule: str = "cubic"
    power: float = 3.0
    num_steps: int = 4

    def __post_init__(self) -> None:
        check_choice(self.schedule, "schedule", SCHEDULES)
        check_float(self.target, "target", min=0, max=1, max_open=True)
        start_round = check_int(self.start_round, "start_round", min=0)
        if check_int(self.end_round, "end_round", min=0) < start_round:
            fail("end_round", f"an integer >= `start_round` ({start_round})", self.end_round)
        check_float(self.power, "power", min=0, min_open=True)
        check_int(self.num_steps, "num_steps", min=1)

    def at(self, round: int) -> float:  # noqa: A002 - the natural name in a federated setting
        """Target sparsity at federated ``round`` (an integer >= 0; see the module docstring for the formulas).

        Example:
            >>> from lightning_fedprune.pruning.schedules import Schedule
            >>> ramp = Schedule(target=0.5, start_round=0, end_round=100, schedule="linear")
            >>> [ramp.at(r) for r in (0, 50, 100, 200)]
            [0.0, 0.25, 0.5, 0.5]
            >>> step = Schedule(target=0.5, start_round=0, end_round=100, schedule="step", num_steps=2)
            >>> [step.at(r) for r in (49, 50, 99, 100)]
            [0.0, 0.25, 0.25, 0.5]
        """
        check_int(round, "round", min=0)
        target = float(self.target)
        if round < self.start_round:
            return 0.0
        if self.schedule == "one_shot" or round >= self.end_round:
            return target
        done, span = round - self.start_round, self.end_round - self.start_round  # 0 <= done < span
        if self.schedule == "step":
            return target * ((done * self.num_steps) // span) / self.num_steps
        p = done / span
        if self.schedule == "linear":
            return target * p
        return target * (1.0 - (1.0 - p) ** float(self.power))


def validate_schedule(**schedule: Any) -> None:
    """Raise ``ValueError`` (naming the argument) for an invalid schedule: the keyword arguments of
    :class:`Schedule`; call it at construction.

    Example:
        >>> from lightning_fedprune.pruning import validate_schedule
        >>> validate_schedule(target=0.5, start_round=10, end_round=100, schedule="cubic")
    """
    Schedule(**schedule)


def sparsity_at(round: int, **schedule: Any) -> float:  # noqa: A002
    """Target sparsity at federated ``round`` of the schedule given by :class:`Schedule`'s keyword arguments.

    Example:
        >>> from lightning_fedprune.pruning import sparsity_at
        >>> sparsity_at(50, target=0.5, start_round=0, end_round=100, schedule="cubic")
        0.4375
    """
    return Schedule(**schedule).at(round)
