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

A plan may ask the client for **statistics** it accumulates over its local steps (``ClientPlan.statistics``,
e.g. PruneFL's squared gradients): they are added up on the device once per optimiser step, after the backward
pass and before the gradients of pruned entries are masked (so those count too: the tensors concerned train
masked-dense, never compact), and travel up with the update. ``ClientPlan.forward_scales`` makes the forward
read some parameters scaled (:mod:`~lightning_fedprune.federated.forward_scales`).

Every client gets **fresh optimiser state** (FedAvg: no momentum carried between clients or rounds)
bound to the parameters it really trains (compact sub-layers included), whatever the task's
``configure_optimizers`` returns (objects created in ``__init__`` included). Hyper-parameters and
learning-rate schedules continue in federated time: see :class:`~lightning_fedprune.federated.protocol.OptimState`.
"""

from __future__ import annotations

import contextlib
import math
import time
import traceback
from collections.abc import Iterable, Iterator
from typing import Any, Protocol

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.apply_func import convert_to_tensors, move_data_to_device
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.utilities.data import extract_batch_size
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor

from lightning_fedprune.federated.channel import Channel
from lightning_fedprune.federated.client_view import ClientLog, ClientTrainerView
from lightning_fedprune.federated.forward_scales import ForwardScales
from lightning_fedprune.federated.optim_state import configure_task_optimizers, load_optim_state, optim_state_of
from lightning_fedprune.federated.precision import client_precision_plugin
from lightning_fedprune.federated.protocol import ClientConfig, ClientPlan, ClientResult, OptimState, RoundPayload
from lightning_fedprune.federated.replica import make_replica, state_names
from lightning_fedprune.pruning.compact import CompactedModule, MaskedDense, compact_module
from lightning_fedprune.pruning.patterns import COMPACT_PATTERNS
from lightning_fedprune.pruning.statistics import StatisticAccumulators

__all__ = ["CLIENT_HOOKS", "ClientData", "ClientOptimizer", "ClientRunner"]

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
        self._statistics = StatisticAccumulators({}, {})
        self._closure_once = _evaluates_closure_once(optimizer)  # the optimiser's class never changes

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self._optimizer

    def __getattr__(self, name: str) -> Any:
        return getattr(self._optimizer, name)

    def set_masks(self, masked: MaskedDense, statistics: StatisticAccumulators | None = None) -> None:
        """This client's masked-dense parameters that this optimiser trains (and the statistics of its parameters
        the plan asked for)."""
        params = [p for group in self._optimizer.param_groups for p in group["params"]]
        self._masked = masked.subset(params)
        self._statistics = statistics.subset(params) if statistics else StatisticAccumulators({}, {})

    def accumulate_statistics(self) -> None:
        self._statistics.update_()

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

    def __init__(self, task: pl.LightningModule, data: ClientData, config: ClientConfig,
                 device: torch.device | str | None = None) -> None:
        self.device = torch.device(device if device is not None else config.device)
        self.replica = replica = make_replica(task).to(self.device)
        self.data = data
        self.config = config
        self.param_names, self.buffer_names = state_names(replica)
        params = dict(replica.named_parameters())
        buffers = dict(replica.named_buffers())
        self._targets = [(n, params[n]) for n in self.param_names] + [(n, buffers[n]) for n in self.buffer_names]
        self._params = params
        self.automatic = replica.automatic_optimization
        if not self.automatic and config.accumulate_grad_batches != 1:
            raise ValueError("Gradient accumulation (`accumulate_grad_batches`) is not supported with manual "
                             "optimisation (as in Lightning): accumulate in the task's `training_step`.")
        params_all = dict(replica.named_parameters())
        self.channel = Channel(config.payload_bits, [n for n in self.param_names if params_all[n].is_floating_point()])
        self.plugin = client_precision_plugin(config.precision, self.device.type)
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
        """Between the closure and the update: the client statistics (every entry's gradient), mask gradients,
        ``on_before_optimizer_step``, clipping (automatic)."""
        opt.accumulate_statistics()
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
            with self._seeded(plan.seed):
                result = self._train(payload, plan)
        except Exception as err:  # a failing client must not take the round down
            tb = traceback.format_exc(limit=-3)
            result = ClientResult(plan.client_id, plan.round, error=f"{type(err).__name__}: {err}\n{tb}")
        result.seconds = time.perf_counter() - start
        return result

    # ------------------------------------------------------------------ internals
    @contextlib.contextmanager
    def _seeded(self, seed: int) -> Iterator[None]:
        """The client's randomness (data order, dropout) from ``seed`` alone: the CPU generator and the
        generator of the CUDA device it trains on (only those: ``torch.manual_seed`` would also reseed, lazily
        and expensively, every accelerator generator of the process), restored afterwards."""
        cuda = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda, device_type="cuda"):
            torch.default_generator.manual_seed(seed)
            for index in cuda:
                torch.cuda.default_generators[index].manual_seed(seed)
            yield

    def _read(self, payload: RoundPayload) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, str]]:
        """The round's global state, masks and patterns, decoded from the wire once per round onto the
        client's device."""
        key = (payload.round, id(payload.encoded))
        if self._round_key != key:
            self._round = self.channel.read_broadcast(payload.encoded, self.device)
            self._round_key = key
        return self._round

    def _load(self, state: dict[str, Tensor]) -> None:
        with torch.no_grad():
            for name, tensor in self._targets:
                tensor.copy_(state[name])

    def _fresh_optimizers(self, optim: OptimState, compacted: CompactedModule | None, masked: MaskedDense,
                          statistics: StatisticAccumulators | None = None) -> None:
        """Empty optimiser state, the schedule position of ``optim``, params = what this client trains."""
        remap: dict[int, list[Tensor]] = compacted.param_map() if compacted is not None else {}
        for opt, groups, wrapped in zip(self.optimizers, self._orig_groups, self.wrapped):
            opt.state.clear()
            for group, params in zip(opt.param_groups, groups):
                group["params"] = [q for p in params for q in remap.get(id(p), (p,))] if remap else params
            wrapped.set_masks(masked, statistics)
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
        # the tensors whose statistics the plan asks for keep every entry: a compact layer has no pruned entry to
        # take a gradient of
        dense = {n for names in plan.statistics.values() for n in names}
        # (the round's own dict when nothing is excluded: compact_module reuses its decisions for the same objects)
        compactable = masks if not dense else {n: m for n, m in masks.items() if n not in dense}
        if self.config.compact and any(patterns.get(n) in COMPACT_PATTERNS for n in compactable):
            # a physically smaller replica: structured-pruned nn.Linear layers hold only their kept slice
            compacted = compact_module(task, compactable, patterns, release=True)
            masks = {**compacted.fallback_masks, **{n: m for n, m in masks.items() if n in dense}}
        scales = None
        try:
            params_now = dict(task.named_parameters()) if compacted is not None else self._params
            masked = MaskedDense((params_now[n], m) for n, m in masks.items())  # everything not compacted
            masked.apply_()
            statistics = StatisticAccumulators(plan.statistics, params_now) if plan.statistics else None
            if plan.forward_scales:
                scales = ForwardScales(task, plan.forward_scales, compacted)
            # the server's schedule position (a payload without one, e.g. built by hand, starts where
            # `configure_optimizers` started)
            start = payload.optim if payload.optim.param_groups else self._initial_optim
            self._fresh_optimizers(start, compacted, masked, statistics)
            view = self.view
            view.fed_round, view.client_id = plan.round, plan.client_id
            view.base_step, view.local_steps, view.should_stop = start.global_step, 0, False
            view.callback_metrics = {}
            self.log.reset()
            loss_sum, num_losses, num_examples, epochs = self._loop(plan, start.epoch)
            logged = self.log.results(num_examples)
            optim = optim_state_of(self.optimizers, self.sched_configs, view.global_step, start.epoch + epochs)
        finally:
            if scales is not None:
                scales.remove()
            if compacted is not None:
                compacted.restore(copy_back=True)  # trained values back in full coordinates, zeros where pruned
            self._restore_param_groups()
        loss = float(loss_sum) / num_losses if num_losses else math.nan  # the client's one read of its losses
        if not math.isfinite(loss):  # the values are checked once, on the server's average
            return ClientResult(plan.client_id, plan.round, loss=loss, error=f"non-finite loss {loss}")
        # what travels up: the kept entries only; encoding copies the replica's live tensors (the next client
        # overwrites them)
        trained = {name: t.detach() for name, t in self._targets}
        upload = self.channel.upload(trained, state, round_masks, patterns, plan.seed)
        return ClientResult(
            client_id=plan.client_id,
            round=plan.round,
            payload=upload,
            num_samples=int(self.data.client_size(plan.client_id)),
            num_examples=num_examples,
            loss=loss,
            logged=logged,
            optim=optim,
            statistics=self.channel.upload_statistics(statistics.values) if statistics is not None else {},
        )

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
        hooks = self.hooks
        batch = self.plugin.convert_input(batch)
        if "on_before_batch_transfer" in hooks:
            batch = self.call("on_before_batch_transfer", batch, 0)
        if "transfer_batch_to_device" in hooks:
            batch = self.call("transfer_batch_to_device", batch, self.device, 0)
        elif self.device.type != "cpu":
            batch = move_data_to_device(batch, self.device)  # non-blocking from pinned memory
        if "on_after_batch_transfer" in hooks:
            batch = self.call("on_after_batch_transfer", batch, 0)
        return batch

    def _loop(self, plan: ClientPlan, base_epoch: int) -> tuple[Tensor | None, int, int, int]:
        """The local epochs of one client: returns (sum of losses, on the device; number of losses, examples,
        epochs run). Nothing here waits for the device."""
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
        # the losses stay on the device: read once, by the caller, when the client is done
        loss_sum = torch.stack(losses).to(torch.float64).sum() if losses else None
        return loss_sum, len(losses), num_examples, epochs_run

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
        return batch.shape[0]
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor) and batch[0].dim() > 0:
        return batch[0].shape[0]
    if isinstance(batch, dict):  # the first batched tensor (e.g. ASR: features, lengths, texts, ...)
        for value in batch.values():
            if isinstance(value, Tensor) and value.dim() > 0:
                return value.shape[0]
    return extract_batch_size(batch)
