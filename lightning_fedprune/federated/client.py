"""Local training of one client: a lean torch loop that runs the task's own Lightning hooks in Lightning's order.

No Trainer is built per client. A client works on a *replica* of the task (a copy made once per
executor, refreshed with the global weights at the start of every client) and gives the task a
small, explicit stand-in for what Lightning provides during training:

* ``self.trainer`` is a :class:`ClientTrainerView` (round, client, federated step and epoch,
  limits, precision, the client's optimisers and loader, ...);
* ``self.optimizers()`` / ``self.lr_schedulers()`` / ``self.manual_backward()`` /
  ``self.clip_gradients()`` / ``self.log()`` / ``self.log_dict()`` / ``self.all_gather()`` behave as
  in Lightning (world size 1);
* the training hooks run in the order Lightning runs them (see ``docs/dropin.md``), automatic
  optimisation goes through ``optimizer_step`` with a closure (so overrides of ``optimizer_step``,
  ``optimizer_zero_grad``, ``backward`` and ``configure_gradient_clipping`` work), with gradient
  accumulation, clipping and the Trainer's precision (autocast / dtype) as Lightning applies them.

Every client gets **fresh optimiser state** (FedAvg: no momentum carried between clients or rounds)
bound to the parameters it really trains (compact sub-layers included), whatever the task's
``configure_optimizers`` returns (objects created in ``__init__`` included). Hyper-parameters and
learning-rate schedules continue in federated time: see :class:`~lightning_fedprune.federated.protocol.OptimState`.
"""

from __future__ import annotations

import contextlib
import copy
import math
import numbers
import time
import traceback
from collections.abc import Iterable, Iterator
from typing import Any, Protocol

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.apply_func import convert_to_tensors, move_data_to_device
from lightning.pytorch.core.optimizer import (
    _configure_optimizers,
    _configure_schedulers_automatic_opt,
    _configure_schedulers_manual_opt,
)
from lightning.pytorch.plugins.precision import DoublePrecision, HalfPrecision, MixedPrecision, Precision
from lightning.pytorch.trainer.connectors.logger_connector.fx_validator import _FxValidator
from lightning.pytorch.trainer.states import RunningStage, TrainerFn, TrainerState, TrainerStatus
from lightning.pytorch.utilities.data import extract_batch_size
from lightning.pytorch.utilities.enums import GradClipAlgorithmType
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.types import LRSchedulerConfig
from torch import Tensor
from torchmetrics import Metric

from lightning_fedprune.federated.replica import make_replica, state_names
from lightning_fedprune.federated.protocol import (
    ClientConfig,
    ClientPlan,
    ClientResult,
    LoggedValue,
    OptimState,
    RoundPayload,
    derive_seed,
)
from lightning_fedprune.pruning.compact import CompactedModule, MaskedDense, compact_module
from lightning_fedprune.pruning.patterns import COMPACT_PATTERNS
from lightning_fedprune.federated.wire import Payload, encode_state

#: Mixed into the client's seed for the stochastic rounding of its quantised upload (a stream of its own).
QUANT_STREAM = 0x5155414E

#: Precisions a client can train in (``Trainer(precision=...)`` after Lightning's normalisation).
CLIENT_PRECISIONS = ("32-true", "64-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true")

#: The task's hooks that run inside client training (the others run on the server, see docs/dropin.md).
CLIENT_HOOKS = (
    "on_train_epoch_start", "on_train_epoch_end", "on_train_batch_start", "on_train_batch_end",
    "on_before_batch_transfer", "transfer_batch_to_device", "on_after_batch_transfer",
    "on_before_zero_grad", "optimizer_zero_grad", "on_before_backward", "backward", "on_after_backward",
    "on_before_optimizer_step", "configure_gradient_clipping", "optimizer_step",
)


class ClientData(Protocol):
    """What a client needs from the data side (implemented by :class:`FederatedDataModule`)."""

    def client_size(self, client_id: int) -> int: ...

    def client_loader(self, client_id: int, seed: int) -> Iterable[Any]: ...


def client_precision_plugin(precision: str, device_type: str = "cpu") -> Precision:
    """Lightning's precision plugin for ``precision`` (autocast / dtype, input conversion, clipping)."""
    if precision in ("32-true", "32"):
        return Precision()
    if precision in ("64-true", "64"):
        return DoublePrecision()
    if precision in ("bf16-true", "16-true"):
        return HalfPrecision(precision)  # type: ignore[arg-type]
    if precision in ("bf16-mixed", "16-mixed"):
        return MixedPrecision(precision, device=device_type)  # type: ignore[arg-type]
    raise ValueError(
        f"Federated clients support the Trainer precisions {CLIENT_PRECISIONS}; got {precision!r} "
        "(plugins such as DeepSpeed, FSDP, bitsandbytes or Transformer Engine need a Trainer per client)."
    )


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
        """The client's value of every logged name; resets the logged metric objects."""
        out: dict[str, LoggedValue] = {}
        for name, entries in self.values.items():
            values = [float(v) for v, _ in entries]
            reduce = self.options[name][2]
            if reduce == "mean":
                weights = [w for _, w in entries]
                total = float(sum(weights))
                value = math.fsum(v * w for v, w in zip(values, weights)) / total if total > 0 else math.nan
                weight = total
            else:
                value = math.fsum(values) if reduce == "sum" else max(values) if reduce == "max" else min(values)
                weight = float(num_examples)
            out[name] = LoggedValue(value, weight, *self.options[name])
        for name, metric in self.metrics.items():
            out[name] = LoggedValue(float(metric.compute()), float(num_examples), *self.options[name])
        for metric in self._seen_metrics:
            metric.reset()
        return out


class ClientOptimizer:
    """Lightning's ``LightningOptimizer`` for a client.

    ``step(closure)`` hands the optimiser a closure that, after the user's closure (forward and
    backward), masks the gradients of pruned entries, calls ``on_before_optimizer_step`` and, with
    automatic optimisation, the gradient clipping hook — Lightning's order — and re-zeroes pruned
    entries after the update (momentum and weight decay would otherwise move them).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, runner: ClientRunner) -> None:
        self._optimizer = optimizer
        self._runner = runner
        self._masked = MaskedDense()
        self._closure_once = _evaluates_closure_once(optimizer)  # the optimiser's class never changes

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self._optimizer

    def __getattr__(self, name: str) -> Any:
        return getattr(self._optimizer, name)

    def set_masks(self, masked: MaskedDense) -> None:
        """This client's masked-dense parameters that this optimiser trains."""
        self._masked = masked.subset(p for group in self._optimizer.param_groups for p in group["params"])

    def mask_gradients(self) -> None:
        self._masked.mask_grads_()

    def reapply_masks(self) -> None:
        self._masked.apply_()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._optimizer.zero_grad(set_to_none=set_to_none)

    def step(self, closure: Any = None, **kwargs: Any) -> Any:
        runner = self._runner
        scaler = runner.scaler
        if scaler is not None:  # 16-mixed: Lightning's MixedPrecision.optimizer_step
            result = closure() if closure is not None else None
            scaler.unscale_(self._optimizer)
            runner.after_closure(self)
            out = None
            if not runner.automatic or result is not None:
                out = scaler.step(self._optimizer, **kwargs)
                scaler.update()
        elif not self._closure_once:  # e.g. LBFGS, SAM: hand the closure over, as Lightning does
            def wrapped() -> Any:
                result = closure() if closure is not None else None
                runner.after_closure(self)
                return result

            out = self._optimizer.step(closure=wrapped, **kwargs)
        else:  # torch's first-order optimisers evaluate it once: the same, without grad-mode switches per step
            out = closure() if closure is not None else None
            runner.after_closure(self)
            self._optimizer.step(**kwargs)
        self.reapply_masks()
        runner.view.local_steps += 1
        return out


def _evaluates_closure_once(optimizer: torch.optim.Optimizer) -> bool:
    """True for torch's own optimisers other than LBFGS: ``step(closure)`` calls the closure exactly once,
    before the update, so calling it first and then ``step()`` is the same computation."""
    cls = type(optimizer)
    return cls.__module__.startswith("torch.optim") and not issubclass(cls, torch.optim.LBFGS)


def _extract_loss(output: Any) -> Tensor | None:
    if output is None:
        return None
    if isinstance(output, Tensor):
        return output
    if isinstance(output, dict):
        if "loss" not in output:
            raise ValueError("`training_step` returned a dict without a 'loss' key.")
        return output["loss"]
    raise TypeError(f"`training_step` must return a Tensor, a dict with 'loss', or None; got {type(output).__name__}.")


def _batch_outputs(output: Any, loss: Tensor | None) -> Any:
    """What ``on_train_batch_end`` gets as ``outputs`` (Lightning: the step output with a detached loss)."""
    if output is None:
        return None
    if isinstance(output, Tensor):
        return {"loss": output.detach()}
    if isinstance(output, dict):
        return {**output, "loss": loss.detach()} if loss is not None else dict(output)
    return output


class ClientRunner:
    """Runs clients one after another on one persistent replica of the task.

    One runner lives in the server process (sequential executor) or in each worker process
    (process-pool executor). Nothing is kept between clients except the replica's storage (which is
    overwritten with the global weights at the start of every client) and the optimiser objects
    (whose state is cleared and whose hyper-parameters and schedulers are reset for every client).
    """

    def __init__(self, task: pl.LightningModule, data: ClientData, config: ClientConfig, weighting: str = "num_samples") -> None:
        self.replica = replica = make_replica(task)
        self.data = data
        self.config = config
        self.weighting = weighting
        self.param_names, self.buffer_names = state_names(replica)
        params = dict(replica.named_parameters())
        buffers = dict(replica.named_buffers())
        self._targets = [(n, params[n]) for n in self.param_names] + [(n, buffers[n]) for n in self.buffer_names]
        self._params = params
        self.automatic = replica.automatic_optimization
        if not self.automatic and config.accumulate_grad_batches != 1:
            raise ValueError("Gradient accumulation (`accumulate_grad_batches`) is not supported with manual "
                             "optimisation (as in Lightning): accumulate in the task's `training_step`.")
        self.plugin = client_precision_plugin(config.precision, replica.device.type)
        # full precision needs no context around training_step (and its generator costs a few us a step)
        self.step_context = contextlib.nullcontext if type(self.plugin) is Precision else self.plugin.train_step_context
        self.scaler = getattr(self.plugin, "scaler", None)
        self.view = ClientTrainerView(config, self.plugin, replica)
        self.log = ClientLog(self.view)
        self.hooks = {h for h in CLIENT_HOOKS if is_overridden(h, replica, pl.LightningModule)}
        self._bind()
        self.optimizers, self.sched_configs = configure_task_optimizers(replica)
        self.view.optimizers = self.optimizers
        self.view.lr_scheduler_configs = self.sched_configs
        self.wrapped = [ClientOptimizer(o, self) for o in self.optimizers]
        self._orig_groups = [[list(g["params"]) for g in o.param_groups] for o in self.optimizers]
        self._initial_optim = optim_state_of(self.optimizers, self.sched_configs, 0, 0)
        self._round_key: tuple[int, int] | None = None
        self._round: tuple[dict[str, Tensor], dict[str, Tensor], dict[str, str]] = ({}, {}, {})

    # ------------------------------------------------------------------ the task's Lightning stand-ins
    def _bind(self) -> None:
        task = self.replica
        runner = self

        def optimizers(use_pl_optimizer: bool = True) -> Any:
            opts = runner.wrapped if use_pl_optimizer else runner.optimizers
            return opts[0] if len(opts) == 1 else opts

        def manual_backward(loss: Tensor, *args: Any, **kwargs: Any) -> None:
            runner.backward(loss, *args, **kwargs)

        def all_gather(data: Any, group: Any = None, sync_grads: bool = False) -> Any:
            return convert_to_tensors(data, device=task.device)  # world size 1: no new dimension, as in Lightning

        for name, fn in dict(optimizers=optimizers, manual_backward=manual_backward, log=self.log.log,
                             log_dict=self.log.log_dict, all_gather=all_gather).items():
            object.__setattr__(task, name, fn)
        object.__setattr__(task, "_trainer", self.view)

    def call(self, hook: str, *args: Any) -> Any:
        """Call one of the task's hooks (logging from it uses the hook's Lightning defaults)."""
        self.log.fx = hook
        return getattr(self.replica, hook)(*args)

    def backward(self, loss: Tensor, *args: Any, **kwargs: Any) -> None:
        """Lightning's strategy.backward: ``on_before_backward``, ``backward`` (scaled for 16-mixed), ``on_after_backward``."""
        hooks = self.hooks
        if "on_before_backward" in hooks:
            self.call("on_before_backward", loss)
        scaled = self.scaler.scale(loss) if self.scaler is not None else loss
        if "backward" in hooks:
            self.log.fx = "backward"
            self.replica.backward(scaled, *args, **kwargs)
        else:
            scaled.backward(*args, **kwargs)
        if "on_after_backward" in hooks:
            self.call("on_after_backward")

    def after_closure(self, opt: ClientOptimizer) -> None:
        """Between the closure and the update: mask gradients, ``on_before_optimizer_step``, clipping (automatic)."""
        opt.mask_gradients()
        if "on_before_optimizer_step" in self.hooks:
            self.call("on_before_optimizer_step", opt.optimizer)
        if not self.automatic:
            return  # Lightning never clips for manual optimisation: the task calls self.clip_gradients
        view = self.view
        if "configure_gradient_clipping" in self.hooks:
            self.call("configure_gradient_clipping", opt, view.gradient_clip_val, view.gradient_clip_algorithm)
        elif view.gradient_clip_val:
            self.log.fx = "clip_gradients"
            self.replica.clip_gradients(opt, view.gradient_clip_val, view.gradient_clip_algorithm)

    # ------------------------------------------------------------------ public
    def run(self, payload: RoundPayload, plan: ClientPlan) -> ClientResult:
        start = time.perf_counter()
        try:
            with torch.random.fork_rng(devices=[]):
                # seed only the CPU generator that fork_rng restores (torch.manual_seed would also
                # reseed, lazily and expensively, every accelerator generator of the process)
                torch.default_generator.manual_seed(plan.seed)
                result = self._train(payload, plan)
        except Exception as err:  # a failing client must not take the round down
            tb = traceback.format_exc(limit=-3)
            result = ClientResult(plan.client_id, plan.round, error=f"{type(err).__name__}: {err}\n{tb}")
        result.seconds = time.perf_counter() - start
        return result

    # ------------------------------------------------------------------ internals
    def _read(self, payload: RoundPayload) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, str]]:
        """The round's global state, masks and patterns, decoded from the wire once per round."""
        key = (payload.round, id(payload.encoded))
        if self._round_key != key:
            self._round = payload.encoded.read()
            self._round_key = key
        return self._round

    def _load(self, state: dict[str, Tensor]) -> None:
        with torch.no_grad():
            for name, tensor in self._targets:
                tensor.copy_(state[name])

    def _fresh_optimizers(self, optim: OptimState, compacted: CompactedModule | None, masked: MaskedDense) -> None:
        """Empty optimiser state, the schedule position of ``optim``, params = what this client trains."""
        remap: dict[int, list[Tensor]] = compacted.param_map() if compacted is not None else {}
        for opt, groups, wrapped in zip(self.optimizers, self._orig_groups, self.wrapped):
            opt.state.clear()
            for group, params in zip(opt.param_groups, groups):
                group["params"] = [q for p in params for q in remap.get(id(p), (p,))] if remap else params
            wrapped.set_masks(masked)
        load_optim_state(optim, self.optimizers, self.sched_configs)

    def _restore_param_groups(self) -> None:
        for opt, groups in zip(self.optimizers, self._orig_groups):
            opt.state.clear()  # nothing of this client's state survives it
            for group, params in zip(opt.param_groups, groups):
                group["params"] = params

    def _train(self, payload: RoundPayload, plan: ClientPlan) -> ClientResult:
        task = self.replica
        state, round_masks, patterns = self._read(payload)
        self._load(state)
        task.train()
        masks = round_masks
        compacted = None
        if self.config.compact and any(patterns.get(n) in COMPACT_PATTERNS for n in masks):
            # a physically smaller replica: structured-pruned nn.Linear layers hold only their kept slice
            compacted = compact_module(task, masks, patterns, release=True)
            masks = compacted.fallback_masks
        try:
            params_now = dict(task.named_parameters()) if compacted is not None else self._params
            masked = MaskedDense((params_now[n], m) for n, m in masks.items())  # everything not compacted
            masked.apply_()
            # the server's schedule position (a payload without one, e.g. built by hand, starts where
            # `configure_optimizers` started)
            start = payload.optim if payload.optim.param_groups else self._initial_optim
            self._fresh_optimizers(start, compacted, masked)
            view = self.view
            view.fed_round, view.client_id = plan.round, plan.client_id
            view.base_step, view.local_steps, view.should_stop = start.global_step, 0, False
            view.callback_metrics = {}
            self.log.reset()
            loss_sum, num_losses, num_examples, epochs = self._loop(plan, start.epoch)
            logged = self.log.results(num_examples)
            optim = optim_state_of(self.optimizers, self.sched_configs, view.global_step, start.epoch + epochs)
        finally:
            if compacted is not None:
                compacted.restore(copy_back=True)  # trained values back in full coordinates, zeros where pruned
            self._restore_param_groups()
        loss = (loss_sum / num_losses) if num_losses else math.nan
        if not math.isfinite(loss):  # the values are checked once, on the server's average
            return ClientResult(plan.client_id, plan.round, loss=loss, error=f"non-finite loss {loss}")
        # what travels up: the kept entries only (the server knows the masks, so no index is sent), so
        # pruned entries never leave the client whatever their value here; encoding copies the
        # replica's live tensors, which the next client overwrites
        upload = self._upload(state, round_masks, patterns, plan)
        size = self.data.client_size(plan.client_id)
        weight = float(size if self.weighting == "num_samples" else num_examples if self.weighting == "num_examples" else 1.0)
        return ClientResult(
            client_id=plan.client_id,
            round=plan.round,
            payload=upload,
            weight=weight,
            num_examples=num_examples,
            loss=loss,
            logged=logged,
            optim=optim,
        )

    def _upload(self, start: dict[str, Tensor], masks: dict[str, Tensor], patterns: dict[str, str],
                plan: ClientPlan) -> Payload:
        """What travels up: the kept entries only (the server knows the masks, so no index is sent), so
        pruned entries never leave the client whatever their value here. With ``payload_bits`` the
        floating-point parameters go as their change since the broadcast (``start``), quantised with
        unbiased stochastic rounding seeded by the client's seed. Encoding copies the replica's live
        tensors, which the next client overwrites."""
        bits = self.config.payload_bits
        if bits is None:
            return encode_state({name: t.detach() for name, t in self._targets}, masks, patterns, send_index=False)
        floats = [n for n in self.param_names if self._params[n].is_floating_point()]
        values = {name: t.detach() - start[name] if name in floats else t.detach() for name, t in self._targets}
        generator = torch.Generator().manual_seed(derive_seed(plan.seed, QUANT_STREAM))
        return encode_state(values, masks, patterns, send_index=False, bits=bits, quantized=floats,
                            generator=generator, relative=True)

    def _batches(self, loader: Iterable[Any], budget: int | None, client_id: int) -> Iterator[tuple[int, Any, bool]]:
        """``(batch_idx, batch, is_last_batch)`` of one local epoch: one pass over the loader, or, with a
        ``budget`` (``local_steps``), exactly that many batches (the loader restarts when it runs out)."""
        done = 0
        batch_idx = 0
        while True:
            iterator = iter(loader)
            try:
                current = next(iterator)
            except StopIteration:
                raise ValueError(f"client {client_id} has no training batches") from None
            while True:
                done += 1
                last_of_budget = budget is not None and done >= budget
                try:
                    upcoming = next(iterator) if not last_of_budget else None
                    exhausted = False
                except StopIteration:
                    upcoming, exhausted = None, True
                yield batch_idx, current, last_of_budget or (exhausted and budget is None)
                batch_idx += 1
                if last_of_budget:
                    return
                if exhausted:
                    break
                current = upcoming
            if budget is None:
                return

    def _transfer(self, batch: Any) -> Any:
        """Lightning's batch path: precision conversion, ``on_before_batch_transfer``, device, ``on_after_batch_transfer``."""
        task = self.replica
        hooks = self.hooks
        batch = self.plugin.convert_input(batch)
        if "on_before_batch_transfer" in hooks:
            batch = self.call("on_before_batch_transfer", batch, 0)
        if "transfer_batch_to_device" in hooks:
            batch = self.call("transfer_batch_to_device", batch, task.device, 0)
        elif task.device.type != "cpu":
            batch = move_data_to_device(batch, task.device)
        if "on_after_batch_transfer" in hooks:
            batch = self.call("on_after_batch_transfer", batch, 0)
        return batch

    def _loop(self, plan: ClientPlan, base_epoch: int) -> tuple[float, int, int, int]:
        """The local epochs of one client: returns (sum of losses, number of losses, examples, epochs run)."""
        task, cfg, view, hooks, log = self.replica, self.config, self.view, self.hooks, self.log
        loader = self.data.client_loader(plan.client_id, plan.seed)
        view.train_dataloader = loader
        accumulate = cfg.accumulate_grad_batches
        if cfg.local_steps is not None:
            epochs, budget = 1, cfg.local_steps * (accumulate if self.automatic else 1)
        else:
            epochs, budget = cfg.local_epochs, None
        step_scheds = [c for c in self.sched_configs if c.interval == "step" and not c.reduce_on_plateau]
        epoch_scheds = [c for c in self.sched_configs if c.interval == "epoch" and not c.reduce_on_plateau]
        losses: list[Tensor] = []
        num_examples = 0
        epochs_run = 0
        for local_epoch in range(epochs):
            epoch = base_epoch + local_epoch
            view.current_epoch = epoch
            if budget is not None:
                view.num_training_batches = budget
            else:
                try:
                    view.num_training_batches = len(loader)  # type: ignore[arg-type]
                except TypeError:
                    view.num_training_batches = float("inf")
            view.is_last_batch = False
            if "on_train_epoch_start" in hooks:
                self.call("on_train_epoch_start")
            for batch_idx, batch, is_last in self._batches(loader, budget, plan.client_id):
                view.is_last_batch = is_last
                batch = self._transfer(batch)
                if batch is None:  # e.g. a collate function that dropped every unreadable sample (Lightning skips it)
                    continue
                if "on_train_batch_start" in hooks and self.call("on_train_batch_start", batch, batch_idx) == -1:
                    view.is_last_batch = True
                    break
                n = _batch_size(batch)
                num_examples += n
                log.batch_size = n
                if self.automatic:
                    out, loss = self._automatic_step(batch, batch_idx, epoch, is_last)
                    stepped = (batch_idx + 1) % accumulate == 0 or is_last
                    if stepped:
                        for c in step_scheds:
                            if (batch_idx + 1) % c.frequency == 0:
                                c.scheduler.step()
                    if is_last:
                        for c in epoch_scheds:
                            if (epoch + 1) % c.frequency == 0:
                                c.scheduler.step()
                else:
                    log.fx = "training_step"
                    with self.step_context():
                        out = task.training_step(batch, batch_idx)
                    loss = _extract_loss(out)
                if "on_train_batch_end" in hooks:
                    self.call("on_train_batch_end", _batch_outputs(out, loss), batch, batch_idx)
                if loss is not None:
                    losses.append(loss.detach())
                if view.should_stop:
                    break
            if "on_train_epoch_end" in hooks:
                self.call("on_train_epoch_end")
            epochs_run += 1
            if view.should_stop:
                break
        loss_value = float(torch.stack(losses).to(torch.float64).sum()) if losses else math.nan
        return loss_value, len(losses), num_examples, epochs_run

    def _automatic_step(self, batch: Any, batch_idx: int, epoch: int, is_last: bool) -> tuple[Any, Tensor | None]:
        """One batch of automatic optimisation, as Lightning's ``_AutomaticOptimization`` runs it."""
        task, hooks, log = self.replica, self.hooks, self.log
        opt = self.wrapped[0]
        accumulate = self.config.accumulate_grad_batches
        first_of_window = batch_idx % accumulate == 0
        holder: list[Any] = [None, None]

        def closure() -> Tensor | None:
            log.fx = "training_step"
            with self.step_context():
                out = task.training_step(batch, batch_idx)
            loss = _extract_loss(out)
            holder[0], holder[1] = out, loss
            if first_of_window:
                if "on_before_zero_grad" in hooks:
                    self.call("on_before_zero_grad", opt.optimizer)
                if "optimizer_zero_grad" in hooks:
                    self.call("optimizer_zero_grad", epoch, batch_idx, opt.optimizer)
                else:
                    opt.optimizer.zero_grad()
            if loss is None:
                return None
            scaled = loss / accumulate if accumulate > 1 else loss
            self.backward(scaled)
            return scaled.detach()

        if not ((batch_idx + 1) % accumulate == 0 or is_last):
            closure()  # accumulate: forward and backward, no step
        elif "optimizer_step" in hooks:
            self.call("optimizer_step", epoch, batch_idx, opt, closure)
        else:
            opt.step(closure=closure)
        return holder[0], holder[1]


def _batch_size(batch: Any) -> int:
    """Examples in a batch: the fast common cases, else Lightning's own inference."""
    if isinstance(batch, Tensor):
        return len(batch)
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor) and batch[0].dim() > 0:
        return len(batch[0])
    if isinstance(batch, dict):  # the first batched tensor (e.g. ASR: features, lengths, texts, ...)
        for value in batch.values():
            if isinstance(value, Tensor) and value.dim() > 0:
                return len(value)
    return extract_batch_size(batch)
