"""What the task logs during client training, reduced as Lightning reduces an epoch: one rule for a client's
steps and for the cohort's clients."""

from __future__ import annotations

import math
from collections.abc import Sequence

from lightning_fedprune.federated.protocol import LoggedValue

__all__ = ["reduce_logged", "reduce_values"]


def reduce_values(values: Sequence[float], weights: Sequence[float], reduce_fx: str) -> float:
    """``mean`` weighted by ``weights`` (Lightning's epoch mean weights by batch size), or ``sum``/``max``/``min``.

    >>> reduce_values([1.0, 3.0], [3.0, 1.0], "mean"), reduce_values([1.0, 3.0], [3.0, 1.0], "sum")
    (1.5, 4.0)
    """
    if reduce_fx == "mean":
        total = math.fsum(weights)
        return math.fsum(v * w for v, w in zip(values, weights)) / total if total > 0 else math.nan
    if reduce_fx == "sum":
        return math.fsum(values)
    return (max if reduce_fx == "max" else min)(values)


def reduce_logged(logged: Sequence[LoggedValue]) -> LoggedValue:
    """The cohort's value of one logged name: :func:`reduce_values` over the clients' values, weighted by the
    examples behind each (so Lightning's epoch mean over rounds weighs every example alike), with the options of
    the first client that logged it."""
    first = logged[0]
    value = reduce_values([v.value for v in logged], [v.weight for v in logged], first.reduce_fx)
    return LoggedValue(value, math.fsum(v.weight for v in logged), first.on_step, first.on_epoch, first.reduce_fx,
                       first.prog_bar, first.logger)
