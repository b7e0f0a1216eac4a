"""The task as the engine sees it: the names of its federated state, and a copy for clients."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
import torch

__all__ = ["make_replica", "state_names", "trainer_set"]


def state_names(module: torch.nn.Module) -> tuple[list[str], list[str]]:
    """Names of the parameters (shared ones once) and persistent buffers of ``module``."""
    params = [name for name, _ in module.named_parameters()]
    sd_keys = set(module.state_dict(keep_vars=True).keys())
    buffers = [name for name, _ in module.named_buffers() if name in sd_keys]
    return params, buffers


@contextlib.contextmanager
def trainer_set(task: pl.LightningModule, trainer: Any) -> Iterator[pl.LightningModule]:
    """``task`` with ``task._trainer`` set to ``trainer`` (None: detached, e.g. to copy or pickle the task without
    the server's Trainer), restored afterwards."""
    saved = task._trainer
    task._trainer = trainer
    try:
        yield task
    finally:
        task._trainer = saved


def make_replica(task: pl.LightningModule) -> pl.LightningModule:
    """A detached deep copy of ``task`` (no Trainer reference, also in nested LightningModules) for client training."""
    with trainer_set(task, None):
        replica = copy.deepcopy(task)
    for module in replica.modules():
        if isinstance(module, pl.LightningModule):
            module._trainer = None
    return replica
