"""The task's optimisers and schedulers in federated time, as both sides use them.

The server holds the task's optimisers and schedulers once (the *template*); every client builds fresh
optimiser state but starts from the template's hyper-parameters and scheduler positions
(:class:`~lightning_fedprune.federated.protocol.OptimState`), so a learning-rate schedule runs across rounds as
it would across epochs of centralised training. Here: reading and writing that position, calling the task's
``configure_optimizers`` as Lightning normalises it, and stepping ``ReduceLROnPlateau`` schedulers on the
server's metrics (which Lightning would step in automatic optimisation).
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.types import LRSchedulerConfig
from torch import Tensor

from lightning_fedprune._compat import (
    _configure_optimizers,
    _configure_schedulers_automatic_opt,
    _configure_schedulers_manual_opt,
)
from lightning_fedprune.federated.protocol import OptimState

__all__ = ["adopt_position", "configure_task_optimizers", "load_optim_state", "optim_state_copy", "optim_state_of",
           "step_plateau_schedulers"]


def _copied(value: Any) -> Any:
    """``value`` sharing nothing mutable with the original: what ``copy.deepcopy`` does for the plain
    containers of optimiser and scheduler states, without its memo bookkeeping (this runs twice per client)."""
    if isinstance(value, dict):
        return {k: _copied(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copied(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_copied(v) for v in value)
    if isinstance(value, Tensor):
        return value.clone()
    if isinstance(value, (int, float, str, bool, type(None))):
        return value
    return copy.deepcopy(value)


def optim_state_copy(state: OptimState) -> OptimState:
    """A copy that shares nothing mutable with ``state`` (tensors cloned, lists and dicts copied)."""
    return OptimState(_copied(state.param_groups), _copied(state.schedulers), state.global_step, state.epoch)


def optim_state_of(optimizers: list[torch.optim.Optimizer], configs: list[LRSchedulerConfig], global_step: int,
                   epoch: int) -> OptimState:
    """The hyper-parameters of every param group and every scheduler's state (copies)."""
    groups = [[{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] for opt in optimizers]
    return optim_state_copy(OptimState(groups, [c.scheduler.state_dict() for c in configs], global_step, epoch))


def load_optim_state(state: OptimState, optimizers: list[torch.optim.Optimizer], configs: list[LRSchedulerConfig]) -> None:
    """Set every param group's hyper-parameters and every scheduler's state from ``state`` (copied)."""
    state = optim_state_copy(state)
    if len(state.param_groups) != len(optimizers) or any(
            len(hp) != len(opt.param_groups) for hp, opt in zip(state.param_groups, optimizers)) \
            or len(state.schedulers) != len(configs):
        raise RuntimeError(
            "The task's `configure_optimizers` returned a different structure on the client than on the server "
            f"({[len(o.param_groups) for o in optimizers]} param groups / {len(configs)} schedulers here, "
            f"{[len(g) for g in state.param_groups]} / {len(state.schedulers)} on the server); it must not depend on "
            "where it runs."
        )
    for opt, groups in zip(optimizers, state.param_groups):
        for group, hp in zip(opt.param_groups, groups):
            group.update(hp)
    for config, sd in zip(configs, state.schedulers):
        config.scheduler.load_state_dict(sd)


def configure_task_optimizers(task: pl.LightningModule) -> tuple[list[torch.optim.Optimizer], list[LRSchedulerConfig]]:
    """Call the task's ``configure_optimizers`` and normalise the result as Lightning does."""
    conf = task.configure_optimizers()
    if conf is None:
        raise ValueError("The task's `configure_optimizers` returned None; a client needs an optimiser to train.")
    optimizers, schedulers, monitor = _configure_optimizers(conf)
    if task.automatic_optimization:
        if len(optimizers) > 1:
            raise ValueError(
                "A task with automatic optimisation may return only one optimiser (as in Lightning 2.x); "
                "use manual optimisation for several."
            )
        configs = _configure_schedulers_automatic_opt(schedulers, monitor)
    else:
        configs = _configure_schedulers_manual_opt(schedulers)
    return optimizers, configs


def adopt_position(ended: list[OptimState | None], optimizers: list[torch.optim.Optimizer],
                   configs: list[LRSchedulerConfig], clock: OptimState) -> OptimState:
    """The clients' schedule position after a round: that of the client that took the most optimiser steps (the
    first on ties), loaded into the template; ``clock`` when no client moved."""
    moved = [o for o in ended if o is not None]
    if not moved:
        return clock
    best = max(moved, key=lambda o: o.global_step)
    load_optim_state(best, optimizers, configs)
    return OptimState(global_step=best.global_step, epoch=best.epoch)


def step_plateau_schedulers(configs: list[LRSchedulerConfig], trainer: pl.Trainer, interval: str, index: int) -> None:
    """Step the task's ``ReduceLROnPlateau`` schedulers of ``interval`` (``"step"``: after a round, ``index`` the
    batch index; ``"epoch"``: after validation, ``index`` the epoch) on the server's metrics, as Lightning does."""
    for config in configs:
        if not config.reduce_on_plateau or config.interval != interval or (index + 1) % config.frequency:
            continue
        value = trainer.callback_metrics.get(config.monitor)
        if value is None:
            if config.strict:
                raise MisconfigurationException(
                    f"ReduceLROnPlateau conditioned on metric {config.monitor} which is not available. Available "
                    f"metrics are: {list(trainer.callback_metrics)}. Condition can be set using `monitor` key in "
                    "lr scheduler dict"
                )
            warnings.warn(f"ReduceLROnPlateau conditioned on metric {config.monitor} which is not available but "
                          "strict is set to `False`. Skipping learning rate update.", RuntimeWarning, stacklevel=3)
            continue
        config.scheduler.step(float(value))
