"""Federated callback hooks.

Any ``lightning.Callback`` may implement these methods; :class:`FederatedLightningModule` calls them
on every callback of ``trainer.callbacks`` that has them (duck typing, so a plain Callback works).
:class:`FederatedCallback` only documents them with no-op defaults.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
from torch import Tensor

if TYPE_CHECKING:
    from lightning_fedprune.federated.protocol import ClientResult


@dataclass
class RoundSummary:
    """What happened in one round (passed to ``on_fed_after_aggregate`` and ``on_fed_round_end``).

    Attributes:
        round: the round (``trainer.global_step`` when it started).
        cohort: the client ids sampled for the round.
        clients_ok: clients whose result was aggregated.
        clients_failed: clients left out (an exception, NaN/Inf, a lost worker or node).
        train_loss: the aggregated clients' mean training loss, weighted like their updates (NaN when
            none succeeded).
        seconds: wall time of the round on the server (set before ``on_fed_round_end``; 0 in
            ``on_fed_after_aggregate``).
        total_weight: sum of the aggregated clients' weights.
        pseudo_gradient: ``w_before - w_new`` per parameter name (zero at pruned entries); empty when no
            client succeeded.
        metrics: the cohort's values of what the task logged in client training (set before
            ``on_fed_round_end``).
        bytes_down: bytes of the payloads sent to the cohort.
        bytes_up: bytes of the clients' uploads.
        dense_bytes: what plain dense FedAvg would send for this cohort, both ways.
    """

    round: int
    cohort: list[int]
    clients_ok: int = 0
    clients_failed: int = 0
    train_loss: float = float("nan")
    seconds: float = 0.0
    total_weight: float = 0.0
    pseudo_gradient: dict[str, Tensor] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    bytes_down: int = 0
    bytes_up: int = 0
    dense_bytes: int = 0


class FederatedCallback(pl.Callback):
    """A Lightning callback with the federated hooks (all optional)."""

    def on_fed_round_start(self, trainer: pl.Trainer, pl_module: Any, round: int, cohort: list[int]) -> None:
        """Before the round's broadcast is built, after the pruning state applied the plan (the round's masks are
        ``pl_module.masks``; the pruning callbacks change them through the plan, not here)."""

    def on_fed_client_result(self, trainer: pl.Trainer, pl_module: Any, result: ClientResult) -> None:
        """Each client result as it arrives (before aggregation; failed ones too)."""

    def on_fed_after_aggregate(self, trainer: pl.Trainer, pl_module: Any, summary: RoundSummary) -> None:
        """After the server step; ``summary.pseudo_gradient`` holds ``w_before - w_average``."""

    def on_fed_round_end(self, trainer: pl.Trainer, pl_module: Any, summary: RoundSummary) -> None:
        """At the end of the round, after logging."""
