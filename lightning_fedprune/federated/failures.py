"""A run never ends "successfully" with an untrained model: failed clients are reported, and fit stops when
clients keep failing."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

from lightning_fedprune.federated.protocol import ClientResult
from lightning_fedprune.federated.strategies import Aggregate

__all__ = ["FailureGuard"]


class FailureGuard:
    """Warns about every client left out of a round; raises (with the first client's error) when every client of
    the first round of a fit fails, or every client of ``max_failed_rounds`` consecutive rounds."""

    def __init__(self, max_failed_rounds: int) -> None:
        self.max_failed_rounds = max_failed_rounds
        self.reset()

    def reset(self) -> None:
        """A new fit starts."""
        self.rounds = 0
        self.streak = 0

    def check(self, rnd: int, results: Sequence[ClientResult], agg: Aggregate) -> None:
        for i, reason in sorted(agg.failed.items()):
            first_line = reason.strip().splitlines()[0] if reason.strip() else "unknown error"
            warnings.warn(f"round {rnd}: client {results[i].client_id} failed and is left out of the aggregate: "
                          f"{first_line}", stacklevel=3)
        self.rounds += 1
        if agg.ok:
            self.streak = 0
            return
        warnings.warn(f"round {rnd}: all {len(results)} clients failed; the global model is left unchanged.", stacklevel=3)
        self.streak += 1
        if self.rounds > 1 and self.streak < self.max_failed_rounds:
            return
        why = (f"every client of the first round ({rnd}) failed" if self.rounds == 1
               else f"every client failed in {self.streak} consecutive rounds (up to round {rnd}; "
                    f"max_failed_rounds={self.max_failed_rounds})")
        first = min(agg.failed, default=None)
        detail = f"client {results[first].client_id}: {agg.failed[first]}" if first is not None else "no client ran"
        raise RuntimeError(f"Federated training stopped: {why}. The first client's error:\n{detail}")
