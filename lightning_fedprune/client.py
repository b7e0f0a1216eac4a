"""Local training of one client: a lean torch loop that calls the task's own Lightning hooks.

No Trainer is built per client. The client works on a *replica* of the task (a copy made once
per executor and refreshed with the global weights every round) and gives the task a small,
explicit stand-in for what Lightning normally provides inside ``training_step``:
``self.optimizers()``, ``self.lr_schedulers()``, ``self.manual_backward()``,
``self.clip_gradients()``, ``self.log()``/``self.log_dict()``, ``self.all_gather()``,
``self.device`` and ``self.trainer.<attribute>`` (round, epoch, limits).
"""

from __future__ import annotations

import copy
import math
import time
import traceback
from collections.abc import Iterable, Iterator
from typing import Any, Protocol

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.core.optimizer import (
    _configure_optimizers,
    _configure_schedulers_automatic_opt,
    _configure_schedulers_manual_opt,
)
from lightning.pytorch.utilities.data import extract_batch_size
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor

from lightning_fedprune.pruning.compact import compact_module
from lightning_fedprune.protocol import ClientConfig, ClientPlan, ClientResult, RoundPayload
from lightning_fedprune.wire import STRUCTURED_PATTERNS, decode_state, encode_state


class ClientData(Protocol):
    """What a client needs from the data side (implemented by :class:`FederatedDataModule`)."""

    def client_size(self, client_id: int) -> int: ...

    def client_loader(self, client_id: int, seed: int) -> Iterable[Any]: ...


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


class ClientTrainerView:
    """What ``self.trainer`` is inside client training: the attributes a task reasonably reads.

    Anything else raises an ``AttributeError`` that says why, instead of silently touching the
    server's Trainer (which does not exist in a worker process).
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
    logger = None
    loggers: list = []
    accumulate_grad_batches = 1
    precision = "32-true"

    def __init__(self, *, round: int, max_rounds: int, client_id: int, config: ClientConfig) -> None:
        self.global_step = round
        self.fed_round = round
        self.client_id = client_id
        self.max_steps = max_rounds
        self.current_epoch = 0
        self.max_epochs = config.local_epochs if config.local_epochs is not None else 1
        self.gradient_clip_val = config.gradient_clip_val
        self.gradient_clip_algorithm = config.gradient_clip_algorithm
        self.callback_metrics: dict[str, Tensor] = {}
        self.optimizers: list = []
        self.lr_scheduler_configs: list = []

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(
            f"`self.trainer.{name}` is not available inside federated client training (a client runs a lean "
            "loop, not a Trainer). Available: global_step (= federated round), current_epoch (local epoch), "
            "max_steps, max_epochs, client_id, world_size, is_global_zero, training, optimizers, callback_metrics."
        )


class ClientOptimizer:
    """Wraps a client optimiser like Lightning's ``LightningOptimizer``.

    ``step()`` masks the gradients of pruned entries before the update and re-zeroes them after it
    (momentum and weight decay would otherwise move pruned entries).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, masked: list[tuple[Tensor, Tensor]]) -> None:
        self._optimizer = optimizer
        ids = {id(p) for group in optimizer.param_groups for p in group["params"]}
        self._masked = [(p, m) for p, m in masked if id(p) in ids]
        self._grads_masked = False  # set when the loop already masked this step's gradients

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self._optimizer

    def __getattr__(self, name: str) -> Any:
        return getattr(self._optimizer, name)

    def mask_gradients(self) -> None:
        for p, m in self._masked:
            if p.grad is not None:
                p.grad.mul_(m)
        self._grads_masked = True

    def reapply_masks(self) -> None:
        with torch.no_grad():
            for p, m in self._masked:
                p.mul_(m)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._optimizer.zero_grad(set_to_none=set_to_none)

    def step(self, closure: Any = None, **kwargs: Any) -> Any:
        if closure is not None:
            user_closure = closure

            def closure() -> Any:
                out = user_closure()
                self.mask_gradients()
                return out

        if not self._grads_masked:
            self.mask_gradients()
        out = self._optimizer.step(closure, **kwargs) if closure is not None else self._optimizer.step(**kwargs)
        self._grads_masked = False
        self.reapply_masks()
        return out


class _ClientLog:
    """Collects what the task logs during local training: the mean per name over the client's steps."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.options: dict[str, dict[str, Any]] = {}

    def log(self, name: str, value: Any, prog_bar: bool = False, **kwargs: Any) -> None:
        if hasattr(value, "compute") and not isinstance(value, Tensor):  # a torchmetrics Metric
            value = value.compute()
        if isinstance(value, Tensor):
            if value.numel() != 1:
                raise ValueError(f"`self.log({name!r}, ...)` needs a scalar, got a tensor of shape {tuple(value.shape)}")
            value = value.item()
        value = float(value)
        self.sums[name] = self.sums.get(name, 0.0) + value
        self.counts[name] = self.counts.get(name, 0) + 1
        if name not in self.options:
            self.options[name] = {"prog_bar": bool(prog_bar)}

    def log_dict(self, dictionary: dict[str, Any], prog_bar: bool = False, **kwargs: Any) -> None:
        for name, value in dictionary.items():
            self.log(name, value, prog_bar=prog_bar)

    def means(self) -> dict[str, float]:
        return {name: self.sums[name] / self.counts[name] for name in self.sums}


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


_BOUND = (
    "optimizers",
    "lr_schedulers",
    "manual_backward",
    "clip_gradients",
    "log",
    "log_dict",
    "all_gather",
    "toggle_optimizer",
    "untoggle_optimizer",
)


class ClientRunner:
    """Runs clients one after another on one persistent replica of the task.

    One runner lives in the server process (sequential executor) or in each worker process
    (process-pool executor). Nothing is kept between clients except the replica's storage,
    which is overwritten with the global weights at the start of every client.
    """

    def __init__(self, task: pl.LightningModule, data: ClientData, config: ClientConfig, weighting: str = "num_samples") -> None:
        self.replica = make_replica(task)
        self.data = data
        self.config = config
        self.weighting = weighting
        self.param_names, self.buffer_names = state_names(self.replica)
        params = dict(self.replica.named_parameters())
        buffers = dict(self.replica.named_buffers())
        self._targets = [(n, params[n]) for n in self.param_names] + [(n, buffers[n]) for n in self.buffer_names]
        self._params = params
        self._manual = not self.replica.automatic_optimization
        self._clip_overridden = is_overridden("configure_gradient_clipping", self.replica, pl.LightningModule)
        # Lightning hooks the client loop calls, when the task overrides them (no-op calls cost per step)
        self._hooks = {h for h in ("on_train_batch_start", "on_before_backward", "on_after_backward",
                                   "on_before_optimizer_step", "on_train_batch_end")
                       if is_overridden(h, self.replica, pl.LightningModule)}

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
        result.check_finite(values=False)  # the values are checked once, on the server's average
        if result.ok:
            # what travels up: kept entries only (the server knows the masks, so no index is sent);
            # encoding copies the replica's live tensors, which the next client overwrites
            result.payload = encode_state(result.state, payload.masks, payload.patterns, send_index=False)
            result.bytes_up = result.payload.nbytes
            result.state = {}
        result.seconds = time.perf_counter() - start
        return result

    # ------------------------------------------------------------------ internals
    def _load(self, payload: RoundPayload) -> None:
        state = payload.state if payload.state else decode_state(payload.encoded)
        with torch.no_grad():
            for name, tensor in self._targets:
                tensor.copy_(state[name])

    def _train(self, payload: RoundPayload, plan: ClientPlan) -> ClientResult:
        task = self.replica
        self._load(payload)
        task.train()
        masks = payload.masks
        compacted = None
        if self.config.compact and any(payload.patterns.get(n) in STRUCTURED_PATTERNS for n in masks):
            # a physically smaller replica: structured-pruned nn.Linear layers hold only their kept slice
            compacted = compact_module(task, masks, payload.patterns, release=True)
            masks = compacted.fallback_masks
        params_now = dict(task.named_parameters()) if compacted is not None else self._params
        masked = [(params_now[n], m) for n, m in masks.items()]  # masked-dense: everything not compacted
        with torch.no_grad():
            for p, m in masked:
                p.mul_(m)
        try:
            optimizers, sched_configs = self._configure_optimizers(task)
            wrapped = [ClientOptimizer(o, masked) for o in optimizers]
            view = ClientTrainerView(round=plan.round, max_rounds=payload.max_rounds, client_id=plan.client_id,
                                     config=self.config)
            view.optimizers = [w.optimizer for w in wrapped]
            view.lr_scheduler_configs = sched_configs
            log = _ClientLog()
            self._bind(task, view, wrapped, sched_configs, log)
            try:
                loss_sum, num_losses, num_examples, num_steps = self._loop(task, plan, view, wrapped, sched_configs)
            finally:
                self._unbind(task)
        finally:
            if compacted is not None:
                compacted.restore(copy_back=True)  # trained values back in full coordinates, zeros where pruned
        # live views, encoded (copied) in run(); the upload carries kept entries only, so pruned
        # entries never leave the client whatever their value here
        state = {name: tensor.detach() for name, tensor in self._targets}
        size = self.data.client_size(plan.client_id)
        weight = float(size if self.weighting == "num_samples" else num_examples if self.weighting == "num_examples" else 1.0)
        return ClientResult(
            client_id=plan.client_id,
            round=plan.round,
            state=state,
            weight=weight,
            num_examples=num_examples,
            num_steps=num_steps,
            loss=(loss_sum / num_losses) if num_losses else float("nan"),
            metrics=log.means(),
            log_options=log.options,
        )

    def _configure_optimizers(self, task: pl.LightningModule) -> tuple[list, list]:
        conf = task.configure_optimizers()
        if conf is None:
            raise ValueError("The task's `configure_optimizers` returned None; a client needs an optimiser to train.")
        optimizers, schedulers, monitor = _configure_optimizers(conf)
        if self._manual:
            configs = _configure_schedulers_manual_opt(schedulers)
        else:
            if len(optimizers) > 1:
                raise ValueError(
                    "A task with automatic optimisation may return only one optimiser (as in Lightning 2.x); "
                    "use manual optimisation for several."
                )
            configs = _configure_schedulers_automatic_opt(schedulers, monitor)
        return optimizers, configs

    def _bind(self, task: pl.LightningModule, view: ClientTrainerView, wrapped: list, configs: list, log: _ClientLog) -> None:
        schedulers = [c.scheduler for c in configs]
        clip_defaults = (self.config.gradient_clip_val, self.config.gradient_clip_algorithm)

        def optimizers(use_pl_optimizer: bool = True) -> Any:
            opts = wrapped if use_pl_optimizer else [w.optimizer for w in wrapped]
            return opts[0] if len(opts) == 1 else opts

        def lr_schedulers() -> Any:
            if not schedulers:
                return None
            return schedulers[0] if len(schedulers) == 1 else schedulers

        def manual_backward(loss: Tensor, *args: Any, **kwargs: Any) -> None:
            loss.backward(*args, **kwargs)

        def clip_gradients(optimizer: Any, gradient_clip_val: float | None = None, gradient_clip_algorithm: str | None = None) -> None:
            val = gradient_clip_val if gradient_clip_val is not None else clip_defaults[0]
            algo = gradient_clip_algorithm or clip_defaults[1]
            if not val:
                return
            inner = optimizer.optimizer if isinstance(optimizer, ClientOptimizer) else optimizer
            params = [p for g in inner.param_groups for p in g["params"] if p.grad is not None]
            if algo == "value":
                torch.nn.utils.clip_grad_value_(params, val)
            else:
                torch.nn.utils.clip_grad_norm_(params, val)

        def all_gather(data: Any, group: Any = None, sync_grads: bool = False) -> Any:
            return data  # one simulated client is one process of world size 1

        def toggle_optimizer(optimizer: Any) -> None:
            return None

        def untoggle_optimizer(optimizer: Any) -> None:
            return None

        bound = dict(
            optimizers=optimizers,
            lr_schedulers=lr_schedulers,
            manual_backward=manual_backward,
            clip_gradients=clip_gradients,
            log=log.log,
            log_dict=log.log_dict,
            all_gather=all_gather,
            toggle_optimizer=toggle_optimizer,
            untoggle_optimizer=untoggle_optimizer,
        )
        for name, fn in bound.items():
            object.__setattr__(task, name, fn)
        object.__setattr__(task, "_trainer", view)

    def _unbind(self, task: pl.LightningModule) -> None:
        for name in _BOUND:
            task.__dict__.pop(name, None)
        object.__setattr__(task, "_trainer", None)

    def _batches(self, plan: ClientPlan, view: ClientTrainerView) -> Iterator[tuple[int, Any, bool]]:
        """Yields ``(batch_idx, batch, epoch_ends_after)`` for the configured amount of local work."""
        cfg = self.config
        loader = self.data.client_loader(plan.client_id, plan.seed)
        if cfg.local_epochs is not None:
            for epoch in range(cfg.local_epochs):
                view.current_epoch = epoch
                for batch_idx, batch in enumerate(loader):
                    yield batch_idx, batch, False
                yield -1, None, True
            return
        steps = 0
        epoch = 0
        while True:
            view.current_epoch = epoch
            empty = True
            for batch_idx, batch in enumerate(loader):
                empty = False
                yield batch_idx, batch, False
                steps += 1
                if steps >= cfg.local_steps:
                    return
            if empty:
                raise ValueError(f"client {plan.client_id} has no training batches")
            yield -1, None, True
            epoch += 1

    def _loop(self, task, plan, view, wrapped, configs) -> tuple[float, int, int, int]:
        device = task.device
        cfg = self.config
        hooks = self._hooks
        losses: list[Tensor] = []
        num_examples = num_steps = 0
        step_scheds = [c for c in configs if c.interval == "step"]
        epoch_scheds = [c for c in configs if c.interval == "epoch"]
        for batch_idx, batch, epoch_end in self._batches(plan, view):
            if epoch_end:
                if not self._manual:
                    for c in epoch_scheds:
                        if not c.reduce_on_plateau and (view.current_epoch + 1) % c.frequency == 0:
                            c.scheduler.step()
                continue
            if batch is None:  # e.g. a collate function that dropped every unreadable sample
                continue
            if device.type != "cpu":
                batch = move_data_to_device(batch, device)
            if "on_train_batch_start" in hooks and task.on_train_batch_start(batch, batch_idx) == -1:
                break
            num_examples += _batch_size(batch)
            if self._manual:
                out = task.training_step(batch, batch_idx)
                loss = _extract_loss(out) if out is not None else None
                for w in wrapped:
                    w.reapply_masks()
            else:
                opt = wrapped[0]
                opt.zero_grad()
                out = task.training_step(batch, batch_idx)
                loss = _extract_loss(out)
                if loss is not None:
                    if "on_before_backward" in hooks:
                        task.on_before_backward(loss)
                    loss.backward()
                    if "on_after_backward" in hooks:
                        task.on_after_backward()
                    opt.mask_gradients()
                    if "on_before_optimizer_step" in hooks:
                        task.on_before_optimizer_step(opt.optimizer)
                    if self._clip_overridden:
                        task.configure_gradient_clipping(opt, cfg.gradient_clip_val, cfg.gradient_clip_algorithm)
                    elif cfg.gradient_clip_val:
                        task.clip_gradients(opt, cfg.gradient_clip_val, cfg.gradient_clip_algorithm)
                    opt.step()
                    for c in step_scheds:
                        if not c.reduce_on_plateau and (num_steps + 1) % c.frequency == 0:
                            c.scheduler.step()
            if "on_train_batch_end" in hooks:
                task.on_train_batch_end(out, batch, batch_idx)
            num_steps += 1
            if loss is not None:
                losses.append(loss.detach())
        loss_value = float(torch.stack(losses).to(torch.float64).sum()) if losses else math.nan
        return loss_value, len(losses), num_examples, num_steps


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
