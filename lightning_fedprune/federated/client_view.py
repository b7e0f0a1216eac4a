"""What the task sees of Lightning during client training: ``self.trainer`` and ``self.log``.

A client runs a lean loop, not a Trainer; :class:`ClientTrainerView` stands in for ``self.trainer`` (every
attribute with a meaning for a client, in federated time) and :class:`ClientLog` collects what the task logs,
reduced as Lightning reduces an epoch. The server uses the view too, when it calls the task's
``configure_optimizers`` (which may read ``self.trainer.estimated_stepping_batches``).
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.trainer.states import RunningStage, TrainerFn, TrainerState, TrainerStatus
from lightning.pytorch.utilities.enums import GradClipAlgorithmType
from lightning.pytorch.utilities.types import LRSchedulerConfig
from torch import Tensor
from torchmetrics import Metric

from lightning_fedprune._compat import _FxValidator
from lightning_fedprune.federated.metrics import reduce_values
from lightning_fedprune.federated.protocol import ClientConfig, LoggedValue

__all__ = ["ClientLog", "ClientTrainerView"]


class ClientTrainerView:
    """What ``self.trainer`` is inside client training: every Trainer attribute with a meaning for a client.

    Time is *federated time*: ``global_step`` counts the client optimiser steps of the run so far
    (the steps of the previous rounds, as the schedule saw them, plus this client's), and
    ``current_epoch`` the local epochs (a round of ``local_steps`` is one epoch). With one client per
    round and one local epoch per round they equal a centralised run's values. ``fed_round`` and
    ``client_id`` say which round and client this is. Anything else raises an ``AttributeError``
    naming what is available, instead of silently touching the server's Trainer (which does not
    exist in a worker process).
    """

    world_size = 1
    num_nodes = 1
    num_devices = 1
    local_rank = 0
    global_rank = 0
    node_rank = 0
    is_global_zero = True
    training = True
    sanity_checking = False
    validating = False
    testing = False
    predicting = False
    fast_dev_run = False
    interrupted = False
    logger = None
    loggers: tuple = ()
    datamodule = None

    def __init__(self, config: ClientConfig, precision_plugin: Precision, model: pl.LightningModule) -> None:
        self.precision = config.precision
        self.precision_plugin = precision_plugin
        self.lightning_module = model
        self.model = model
        self.accumulate_grad_batches = config.accumulate_grad_batches
        self.gradient_clip_val = config.gradient_clip_val
        self.gradient_clip_algorithm = (GradClipAlgorithmType(config.gradient_clip_algorithm)
                                        if config.gradient_clip_val else None)
        self.max_steps = config.max_steps
        self.max_epochs = config.max_epochs
        if config.max_rounds > 0 and config.steps_per_round > 0:
            self.estimated_stepping_batches: float = config.max_rounds * config.steps_per_round
        else:
            self.estimated_stepping_batches = float("inf")
        self.state = TrainerState(status=TrainerStatus.RUNNING, fn=TrainerFn.FITTING, stage=RunningStage.TRAINING)
        self.optimizers: list[torch.optim.Optimizer] = []
        self.lr_scheduler_configs: list[LRSchedulerConfig] = []
        self.fed_round = 0
        self.client_id = -1
        self.base_step = 0
        self.local_steps = 0  # optimiser steps this client has taken
        self.current_epoch = 0
        self.num_training_batches: int | float = 0
        self.is_last_batch = False
        self.should_stop = False
        self.train_dataloader: Any = None
        self.callback_metrics: dict[str, Any] = {}

    @property
    def global_step(self) -> int:
        return self.base_step + self.local_steps

    @property
    def logged_metrics(self) -> dict[str, Any]:
        return self.callback_metrics

    @property
    def progress_bar_metrics(self) -> dict[str, Any]:
        return self.callback_metrics

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(
            f"`self.trainer.{name}` has no meaning inside federated client training (a client runs a lean loop, "
            "not a Trainer; server-side hooks such as validation see the real Trainer). Available: global_step, "
            "current_epoch, max_steps, max_epochs, estimated_stepping_batches, num_training_batches, is_last_batch, "
            "should_stop, train_dataloader, optimizers, lr_scheduler_configs, precision, precision_plugin, "
            "accumulate_grad_batches, gradient_clip_val, gradient_clip_algorithm, callback_metrics, logged_metrics, "
            "progress_bar_metrics, lightning_module, model, state, training, world_size, num_nodes, num_devices, "
            "local_rank, global_rank, node_rank, is_global_zero, logger (None), loggers (empty), datamodule (None), "
            "fed_round, client_id."
        )


_REDUCE_NAMES = {"mean": "mean", "avg": "mean", "sum": "sum", "max": "max", "min": "min"}


def _reduce_name(reduce_fx: Any) -> str:
    if isinstance(reduce_fx, str):
        name = _REDUCE_NAMES.get(reduce_fx.lower())
    else:
        name = {torch.mean: "mean", torch.sum: "sum", torch.max: "max", torch.min: "min"}.get(reduce_fx)
    if name is None:
        raise ValueError(f"`self.log(reduce_fx={reduce_fx!r})` in client training: use 'mean', 'sum', 'max' or 'min'.")
    return name


class ClientLog:
    """Collects what the task logs during one client's local training, reduced as Lightning reduces an epoch.

    Plain values are reduced over the client's steps with ``reduce_fx`` (``mean`` weighted by batch
    size, as Lightning's epoch mean); a torchmetrics object is ``compute()``-d at the end of the
    client and reset (Lightning resets logged metric objects at the end of every epoch). Defaults
    and checks of ``on_step``/``on_epoch`` follow Lightning's for the hook that logs.
    """

    def __init__(self, view: ClientTrainerView) -> None:
        self.view = view
        self.fx = "training_step"
        self.batch_size = 1
        self._levels: dict[tuple[str, Any, Any], tuple[bool, bool]] = {}
        self.reset()

    def reset(self) -> None:
        self.values: dict[str, list[tuple[Any, int]]] = {}
        self.options: dict[str, tuple[bool, bool, str, bool, bool | None]] = {}
        self.metrics: dict[str, Metric] = {}
        for metric in getattr(self, "_seen_metrics", ()):
            metric.reset()
        self._seen_metrics: list[Metric] = []

    def log(self, name: str, value: Any, prog_bar: bool = False, logger: bool | None = None, on_step: bool | None = None,
            on_epoch: bool | None = None, reduce_fx: Any = "mean", enable_graph: bool = False, sync_dist: bool = False,
            sync_dist_group: Any = None, add_dataloader_idx: bool = True, batch_size: int | None = None,
            metric_attribute: str | None = None, rank_zero_only: bool = False) -> None:
        key = (self.fx, on_step, on_epoch)
        levels = self._levels.get(key)
        if levels is None:
            levels = self._levels[key] = _FxValidator.check_logging_and_get_default_levels(self.fx, on_step, on_epoch)
        self.options[name] = (levels[0], levels[1], _reduce_name(reduce_fx), bool(prog_bar),
                              None if logger is None else bool(logger))
        if isinstance(value, Metric):
            self.metrics[name] = value
            if not any(seen is value for seen in self._seen_metrics):  # identity: Metric overloads ==
                self._seen_metrics.append(value)
            return
        if isinstance(value, Tensor):
            if value.numel() != 1:
                raise ValueError(f"`self.log({name!r}, ...)` was called with a tensor of shape {tuple(value.shape)}; "
                                 "values must be scalars (one element).")
            value = value.detach().clone()  # the task may change the tensor in place after logging it
        elif not isinstance(value, numbers.Number) or isinstance(value, bool):
            raise ValueError(f"`self.log({name!r}, {value!r})` was called with a {type(value).__name__}; log a number, "
                             "a one-element tensor or a torchmetrics Metric.")
        entries = self.values.get(name)
        if entries is None:
            entries = self.values[name] = []
        entries.append((value, self.batch_size if batch_size is None else int(batch_size)))
        self.view.callback_metrics[name] = value

    def log_dict(self, dictionary: dict[str, Any], prog_bar: bool = False, logger: bool | None = None,
                 on_step: bool | None = None, on_epoch: bool | None = None, reduce_fx: Any = "mean",
                 enable_graph: bool = False, sync_dist: bool = False, sync_dist_group: Any = None,
                 add_dataloader_idx: bool = True, batch_size: int | None = None, rank_zero_only: bool = False) -> None:
        for name, value in dictionary.items():
            self.log(name, value, prog_bar=prog_bar, logger=logger, on_step=on_step, on_epoch=on_epoch,
                     reduce_fx=reduce_fx, batch_size=batch_size)

    def results(self, num_examples: int) -> dict[str, LoggedValue]:
        """The client's value of every logged name (:func:`~lightning_fedprune.federated.metrics.reduce_values`
        over its steps); resets the logged metric objects."""
        out: dict[str, LoggedValue] = {}
        for name, entries in self.values.items():
            reduce = self.options[name][2]
            weights = [float(w) for _, w in entries]
            value = reduce_values(_floats([v for v, _ in entries]), weights, reduce)
            out[name] = LoggedValue(value, math.fsum(weights) if reduce == "mean" else float(num_examples),
                                    *self.options[name])
        for name, metric in self.metrics.items():
            out[name] = LoggedValue(float(metric.compute()), float(num_examples), *self.options[name])
        for metric in self._seen_metrics:
            metric.reset()
        return out


def _floats(values: list[Any]) -> list[float]:
    """The logged values as floats; tensors on an accelerator are read at once (one synchronisation per name, not
    one per logged step), host values one by one (cheaper than a stack)."""
    on_device = [v for v in values if isinstance(v, Tensor) and v.device.type != "cpu"]
    if not on_device:
        return [float(v) for v in values]
    read = iter(torch.stack([t.reshape(()).to(torch.float64) for t in on_device]).tolist())
    return [next(read) if isinstance(v, Tensor) and v.device.type != "cpu" else float(v) for v in values]
