"""Helpers shared by the pruning callbacks."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl

from lightning_fedprune.pruning.state import PruningState


def fed_module(pl_module: Any, who: str) -> Any:
    if not hasattr(pl_module, "pruning") or not isinstance(pl_module.pruning, PruningState):
        raise TypeError(f"{who} works with a FederatedLightningModule; got {type(pl_module).__name__}.")
    return pl_module


def find_callback(trainer: pl.Trainer, cls: type) -> Any:
    found = [cb for cb in trainer.callbacks if isinstance(cb, cls)]
    if len(found) > 1:
        raise ValueError(f"Only one {cls.__name__} may be used per Trainer; found {len(found)}.")
    return found[0] if found else None


def log_round(pl_module: Any, flips: int, restored: int) -> None:
    """Log the round's pruning statistics. Everything is logged every round (flips are 0 in rounds
    without a recomputation): Lightning repeats a step value until it is logged again, so a value
    logged only in some rounds would show up as stale in the others."""
    state: PruningState = pl_module.pruning
    opts = dict(on_step=True, on_epoch=False, batch_size=1)
    pl_module.log("prune/sparsity", state.sparsity() if state.masks else 0.0, prog_bar=True, **opts)
    pl_module.log("prune/target_sparsity", state.target_sparsity, **opts)
    pl_module.log("prune/phase", float(state.phase), **opts)
    pl_module.log("prune/mask_flips", float(flips), **opts)
    pl_module.log("prune/restored", float(restored), **opts)
    if state.masks:
        for name, value in state.actual_layer_sparsity().items():
            pl_module.log(f"prune/layer_sparsity/{name}", value, **opts)
