"""Helpers shared by the pruning callbacks."""

from __future__ import annotations

from typing import Any

from lightning_fedprune.pruning.state import PruningState


def contribute(pl_module: Any, who: str, **parts: Any) -> None:
    """Add this callback's part to the module's :class:`~lightning_fedprune.pruning.plan.PruningPlan`.

    The module validates the whole plan after every callback's ``setup`` (and applies it once per
    round); callbacks never look each other up, so their order does not matter.
    """
    state = getattr(pl_module, "pruning", None)
    if not isinstance(state, PruningState):
        raise TypeError(f"{who} works with a FederatedLightningModule; got {type(pl_module).__name__}.")
    state.plan = state.plan.with_part(**parts)
