"""The task as the engine sees it: the names of its federated state, and a detached copy for clients."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import torch


def state_names(module: torch.nn.Module) -> tuple[list[str], list[str]]:
    """Names of the parameters (shared ones once) and persistent buffers of ``module``."""
    params = [name for name, _ in module.named_parameters()]
    sd_keys = set(module.state_dict(keep_vars=True).keys())
    buffers = [name for name, _ in module.named_buffers() if name in sd_keys]
    return params, buffers


def make_replica(task: pl.LightningModule) -> pl.LightningModule:
    """A detached deep copy of ``task`` (no Trainer reference) for client-side training."""
    trainer = task._trainer
    task._trainer = None
    try:
        replica = copy.deepcopy(task)
    finally:
        task._trainer = trainer
    for module in replica.modules():
        if isinstance(module, pl.LightningModule):
            module._trainer = None
    return replica
