"""FederatedLightningModule: one Trainer training step is one federated round.

The round, top to bottom, is :meth:`FederatedLightningModule.training_step`:

1. the pruning state applies the plan (the masks of the round), then the ``on_fed_round_start`` hooks;
2. the strategy says what each client gets; the channel encodes the broadcast (kept values and indices);
3. the executor trains every client of the cohort;
4. the channel decodes the replies; the strategy aggregates them (failed and non-finite ones left out);
5. the strategy's server step, the pruning statistics, the clients' schedule position;
6. ``on_fed_after_aggregate`` hooks, logging, ``on_fed_round_end`` hooks.
"""

from __future__ import annotations

import multiprocessing as mp
import time
from typing import IO, Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.types import LRSchedulerConfig
from torch import Tensor
from typing_extensions import Self

from lightning_fedprune._compat import _MAP_LOCATION_TYPE, _PATH, _restricted_classmethod, count_optimizer_step
from lightning_fedprune.federated.channel import Channel
from lightning_fedprune.federated.checkpoint import (
    RESUME_CONFIG_CHANGES,
    ResumeConfigChange,
    install_checkpoint_validation,
    instantiate_task,
    restore_federated_state,
    save_federated_state,
    module_layout_file,
    task_spec,
    validate_checkpoint_file,
)
from lightning_fedprune.federated.client_config import (ClientSettings, adopt_trainer_settings, check_one_device,
                                                        client_config_for)
from lightning_fedprune.federated.client_view import ClientTrainerView
from lightning_fedprune.federated.delegation import TaskEvaluation
from lightning_fedprune.federated.failures import FailureGuard
from lightning_fedprune.federated.executors import (
    DEFAULT_START_METHOD,
    EXECUTORS,
    Executor,
    ExecutorName,
    ExecutorTeardown,
    StartMethod,
    make_executor,
)
from lightning_fedprune.federated.hooks import RoundSummary
from lightning_fedprune.federated.optim_state import (
    adopt_position,
    configure_task_optimizers,
    optim_state_of,
    step_plateau_schedulers,
)
from lightning_fedprune.federated.precision import client_precision_plugin
from lightning_fedprune.federated.protocol import ClientPlan, OptimState, RoundPayload, derive_seed
from lightning_fedprune.federated.replica import state_names, trainer_set
from lightning_fedprune.federated.round_log import log_round, round_summary
from lightning_fedprune.federated.strategies import (
    RoundContext,
    ServerOptimizerName,
    Strategy,
    WeightingName,
    make_strategy,
)
from lightning_fedprune.pruning.plan import PruningPlan
from lightning_fedprune.pruning.state import PruningState
from lightning_fedprune.validation import check_choice, check_int, fail

class FederatedLightningModule(TaskEvaluation):
    """Trains any LightningModule (the *task*) by federated learning across simulated clients.

    Args:
        task: the user's LightningModule. Its ``training_step``, ``configure_optimizers`` and
            training hooks define client training (fresh client optimiser state every client, as in
            FedAvg; learning-rate schedules continue across rounds); its
            ``validation_step``/``test_step``/``predict_step`` and evaluation hooks evaluate the
            global model — the *pruned* model clients get (pruned entries are zeroed during
            evaluation and the server's kept values restored afterwards). See docs/dropin.md for
            where each Lightning hook runs.
            It may also be given as ``{"class_path": "pkg.mod.Task", "init_args": {...}}``; this is how
            it is recorded in the hyperparameters (its class and its own ``save_hyperparameters``), so
            ``load_from_checkpoint(path)`` rebuilds it.
        clients_per_round: cohort size sampled each round (seeded by ``seed`` and the round).
        local_steps: optimiser steps per client per round (``training_step`` calls with manual
            optimisation); give this or ``local_epochs``.
        local_epochs: passes over the client's data per round (default 1 if neither is given).
        server_optimizer: ``"sgd"`` (default; with ``server_lr=1`` FedAvg), ``"sgdm"`` (FedAvgM) or ``"adam"``
            (FedAdam). With ``strategy`` the strategy's own is used (a different value here is an error).
        server_lr: the server optimiser's learning rate; default (None) the strategy's own: 1.0 for ``"sgd"`` and
            ``"sgdm"`` (the new global model is the clients' average itself), 0.01 for ``"adam"``.
        server_momentum: momentum of ``"sgdm"`` (FedAvgM), in ``[0, 1)``; default 0.9.
        server_betas: Adam's two betas for ``"adam"`` (FedAdam), each in ``[0, 1)``; default ``(0.9, 0.99)``.
        server_eps: Adam's epsilon for ``"adam"`` (FedAdam; default 1e-3 as in Reddi et al. 2021), > 0.
        strategy: a :class:`~lightning_fedprune.federated.strategies.Strategy` instance (e.g.
            ``FedAdam(server_lr=0.01)``, ``FederatedDropout(...)`` or your own subclass; in YAML a
            ``class_path``), used instead of ``server_optimizer``, its settings and ``weighting``: what each
            client gets, how the server aggregates a round and steps.
        weighting: aggregation weight of a client: ``"num_samples"`` (default: its dataset size, FedAvg),
            ``"num_examples"`` (examples processed this round) or ``"uniform"``. With ``strategy`` the strategy's.
        executor: ``"sequential"`` (default), ``"process"`` (persistent worker processes), ``"flower"``
            (Flower nodes, inside a Flower ServerApp: see docs/flower.md; needs the ``flower`` extra) or an
            :class:`~lightning_fedprune.federated.executors.Executor` instance.
        num_workers: worker processes for ``executor="process"``.
        start_method: multiprocessing start method for ``executor="process"`` (default ``"forkserver"``
            where the platform has it: workers forked from a server that imported torch once; see
            :class:`~lightning_fedprune.federated.executors.ProcessPoolExecutor`).
        client_gradient_clip_val: clip every client's gradients before each of its optimiser steps at
            this value (> 0; ``None``: no clipping). ``Trainer(gradient_clip_val=...)`` means the same
            (give one of the two); ``Trainer(accumulate_grad_batches=...)`` accumulates inside
            every client, and ``Trainer(precision=...)`` is the clients' precision too.
        client_gradient_clip_algorithm: how ``client_gradient_clip_val`` clips, as Lightning's
            ``gradient_clip_algorithm``: ``"norm"`` (the gradients' total 2-norm is scaled down to at
            most the value) or ``"value"`` (every entry is clamped to ``[-value, value]``).
        compact_clients: let clients train physically smaller sub-models where the pruning
            pattern allows it: ``nn.Linear`` layers with the row, column, half_row or half_column
            pattern (any pattern with a compact forward, ``COMPACT_PATTERNS``); the rest masked-dense.
        payload_bits: ``None`` (default: values travel as they are), ``8`` or ``4``: the kept values of the
            floating-point parameters travel as ``payload_bits``-bit codes with a scale per row, both
            ways (:class:`~lightning_fedprune.federated.channel.Channel`). Down: rounded to nearest, with the
            rounding error fed back into the next round's broadcast, so the global model does not drift. Up:
            each client sends its change since the broadcast, rounded stochastically (unbiased). Masks and
            indices are exact; pruned entries stay exact zeros; buffers travel as they are.
        max_failed_rounds: fit raises (with the first client's traceback) when every client of the
            first round fails, or every client of this many consecutive rounds.
        seed: seeds cohorts and every client's local randomness (data order, dropout) as pure
            functions of ``(seed, round, client)``.
        resume_config_change: what resuming from a checkpoint (``trainer.fit(ckpt_path=...)``) does when
            this module's settings or the pruning callbacks' differ from the checkpoint's: ``"error"``
            (default) refuses, listing every differing field; ``"apply"`` warns with the list and
            continues with the new settings (masks are recomputed at the first resumed round when
            the pruning settings changed; a change of pattern or sparsity after fine-tuning started
            is refused). See docs/troubleshooting.md.
    """

    def __init__(
        self,
        task: pl.LightningModule,
        clients_per_round: int = 10,
        local_steps: int | None = None,
        local_epochs: int | None = None,
        server_optimizer: ServerOptimizerName | None = None,
        server_lr: float | None = None,
        server_momentum: float | None = None,
        server_betas: tuple[float, float] | None = None,
        server_eps: float | None = None,
        weighting: WeightingName | None = None,
        executor: ExecutorName | Executor = "sequential",
        num_workers: int = 2,
        start_method: StartMethod = DEFAULT_START_METHOD,
        client_gradient_clip_val: float | None = None,
        client_gradient_clip_algorithm: Literal["norm", "value"] = "norm",
        compact_clients: bool = True,
        strategy: Strategy | None = None,
        payload_bits: Literal[8, 4] | None = None,
        max_failed_rounds: int = 3,
        seed: int = 0,
        resume_config_change: ResumeConfigChange = "error",
    ) -> None:
        super().__init__()
        if isinstance(task, dict):
            task = instantiate_task(task)
        if not isinstance(task, pl.LightningModule):
            raise TypeError(f"`task` must be a lightning LightningModule, got {type(task).__name__}.")
        if not is_overridden("training_step", task, pl.LightningModule):
            raise ValueError(f"`task` ({type(task).__name__}) does not implement `training_step`; clients cannot train it.")
        clients_per_round = check_int(clients_per_round, "clients_per_round", min=1)
        if isinstance(strategy, dict):  # as recorded in the hyperparameters (Strategy.spec)
            strategy = Strategy.from_spec(strategy)
        if strategy is not None and not isinstance(strategy, Strategy):
            fail("strategy", "a lightning_fedprune.federated.strategies.Strategy instance or None", strategy)
        settings = {"server_optimizer": server_optimizer, "server_lr": server_lr, "server_momentum": server_momentum,
                    "server_betas": server_betas, "server_eps": server_eps, "weighting": weighting}
        recorded = None if strategy is None else strategy.spec()  # a strategy given is a hyperparameter of its own
        if strategy is None:
            strategy = make_strategy(server_optimizer, server_lr, server_momentum, server_betas, server_eps, weighting)
        elif conflicts := [name for name, value in settings.items()
                           if value is not None and _plain(getattr(strategy, name, None)) != _plain(value)]:
            raise ValueError(
                f"`{conflicts[0]}={settings[conflicts[0]]!r}` contradicts `strategy` ({type(strategy).__name__} has "
                f"{conflicts[0]}={getattr(strategy, conflicts[0], None)!r}): a strategy brings its own server optimiser "
                "and weighting; set them on the strategy (e.g. `FedAdam(server_lr=...)`, "
                "`FederatedDropout(server_optimizer=...)`) or leave them out here.")
        if not isinstance(executor, Executor) and not (isinstance(executor, str) and executor in EXECUTORS):
            fail("executor", f"one of {EXECUTORS} or an Executor instance", executor)
        # checked whatever the executor: a bad value is a typo even where it is not used
        num_workers = check_int(num_workers, "num_workers", min=1)
        check_choice(start_method, "start_method", mp.get_all_start_methods())
        self.failures = FailureGuard(check_int(max_failed_rounds, "max_failed_rounds", min=1))
        self.seed = check_int(seed, "seed")
        self.resume_config_change = check_choice(resume_config_change, "resume_config_change", RESUME_CONFIG_CHANGES)
        self.client_settings = ClientSettings(local_steps, local_epochs, client_gradient_clip_val,
                                              client_gradient_clip_algorithm, compact_clients, payload_bits)
        self.executor = make_executor(executor, num_workers=num_workers, start_method=start_method)
        # the task is recorded as its class path and its own hyperparameters (checkpoint, loggers' hparams.yaml);
        # LightningCLI's `_instantiator` is dropped so that every checkpoint loads the same way; plain lists
        # keep hparams.yaml readable by yaml.safe_load
        self.save_hyperparameters(ignore=["task", "executor", "strategy", "_instantiator"])
        self.save_hyperparameters({"task": task_spec(task), "server_betas": None if server_betas is None else list(server_betas),
                                   "strategy": recorded})
        self.automatic_optimization = False
        self.task = task
        self.clients_per_round = clients_per_round
        self.strategy = strategy
        self.pruning = PruningState()
        self.last_summary: RoundSummary | None = None
        self._param_names, self._buffer_names = state_names(task)
        params = dict(task.named_parameters())
        self.channel = Channel(payload_bits, [n for n in self._param_names if params[n].is_floating_point()])
        self.client_config = None  # built when fit starts (client_config_for)
        self._adopted = None  # the Trainer's client-side settings, taken in configure_callbacks
        # the task's optimisers and schedulers on the server: the client schedule's position (see OptimState)
        self._template: tuple[list[torch.optim.Optimizer], list[LRSchedulerConfig]] = ([], [])
        self.client_clock = OptimState()  # client optimiser steps / local epochs so far, in federated time
        self._reapply_plan = False
        self._executor_ready = False

    # ------------------------------------------------------------------ the global model
    @property
    def masks(self) -> dict[str, Tensor]:
        """``{parameter name: bool tensor}`` of pruned parameters, ``True`` = kept."""
        return self.pruning.masks

    def global_params(self) -> dict[str, Tensor]:
        params = dict(self.task.named_parameters())
        return {n: params[n] for n in self._param_names}

    def global_buffers(self) -> dict[str, Tensor]:
        buffers = dict(self.task.named_buffers())
        return {n: buffers[n] for n in self._buffer_names}

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.task(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        """Attributes this wrapper does not have are read from the task: callbacks written for the task (its own
        ``configure_callbacks``, a user's) get this module as ``pl_module`` and read the task's attributes."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules")
            task = modules.get("task") if modules is not None else None
            if task is None or name.startswith("_"):
                raise
            return getattr(task, name)

    # ------------------------------------------------------------------ setup / teardown
    def prepare_data(self) -> None:
        self._delegate("prepare_data")

    def configure_callbacks(self) -> Any:
        """The task's own callbacks. Runs before Lightning validates the loop configuration, so the Trainer's
        client-side settings (clipping, accumulation) move into the clients' configuration here."""
        self._adopted = adopt_trainer_settings(self.trainer, self.client_settings, not self.task.automatic_optimization)
        self.pruning.plan = PruningPlan()  # the pruning callbacks contribute theirs in `setup`, before ours
        task_callbacks = self._delegate("configure_callbacks") or []
        if isinstance(task_callbacks, pl.Callback):
            task_callbacks = [task_callbacks]
        # Lightning skips `teardown` when fit raises; ExecutorTeardown's `on_exception` stops the executor then
        return [*task_callbacks, ExecutorTeardown()]

    def setup(self, stage: str) -> None:
        install_checkpoint_validation(self.trainer)  # `ckpt_path` is loaded after setup: check the file first
        self._delegate("setup", stage)
        if stage != "fit":
            return
        trainer, dm = self.trainer, self.trainer.datamodule
        if dm is None or not hasattr(dm, "client_data"):
            raise TypeError(
                "FederatedLightningModule needs a FederatedDataModule (or a data module with `client_data()`): "
                "call `trainer.fit(fed, datamodule=FederatedDataModule(...))`."
            )
        check_one_device(trainer)
        population = len(dm.population)
        if self.clients_per_round > population:
            raise ValueError(f"`clients_per_round` ({self.clients_per_round}) is larger than the number of clients "
                             f"available for sampling ({population}).")
        self._param_names, self._buffer_names = state_names(self.task)
        self.client_config = client_config_for(self.client_settings, self._adopted, trainer, dm,
                                               device=trainer.strategy.root_device)
        # every callback has contributed its part of the plan: check it as a whole and take it
        self.pruning.apply_plan(self.pruning.plan, [(n, tuple(p.shape)) for n, p in self.task.named_parameters()])
        if self.pruning.plan.active and self.pruning.momentum_source == "server_optimizer" \
                and self.pruning.needs_statistics == "momentum" and not self.strategy.has_momentum:
            raise ValueError("`momentum_source='server_optimizer'` needs a server optimiser with momentum ('sgdm' or "
                             "'adam'); plain 'sgd' has none.")

    def on_fit_start(self) -> None:
        self.failures.reset()
        self._delegate("on_fit_start")

    def on_train_start(self) -> None:
        device = self.trainer.strategy.root_device
        self.pruning.to(device)  # restored from a checkpoint before the model moved there
        self.channel.to(device)
        if self._reapply_plan:  # a resume that applies a changed configuration: before any round
            self._reapply_plan = False
            self.pruning.reapply_plan(int(self.global_step), self.global_params(), self._server_momentum())
        self._delegate("on_train_start")
        # after the task's on_train_start, so the clients' replicas start from what it set up; every executor
        # gets the same picklable view of the clients' data (no Trainer, no data module)
        self.executor.setup(self.task, self.trainer.datamodule.client_data(), self.client_config)
        self._executor_ready = True

    def on_train_end(self) -> None:
        self._delegate("on_train_end")

    def on_fit_end(self) -> None:
        self._delegate("on_fit_end")

    def teardown(self, stage: str) -> None:
        if stage == "fit" and self._executor_ready:
            self.executor.teardown()
            self._executor_ready = False
        self._delegate("teardown", stage)

    def configure_optimizers(self) -> Any:
        """The task's optimisers and schedulers: the clients' *template* (binds the strategy's server optimiser
        to the global parameters too).

        The template is what ``LearningRateMonitor`` reports, what checkpoints carry and what every client's
        fresh optimiser starts from (see :class:`~lightning_fedprune.federated.protocol.OptimState`). It is never
        stepped with gradients on the server; the server's own step is the strategy's.
        """
        self.strategy.setup(self.global_params())
        view = ClientTrainerView(self.client_config, client_precision_plugin(self.client_config.precision), self.task)
        with trainer_set(self.task, view):  # configure_optimizers sees the clients' trainer (e.g. estimated_stepping_batches)
            optimizers, configs = configure_task_optimizers(self.task)
        self._template = (optimizers, configs)
        schedulers = [{"scheduler": c.scheduler, "interval": c.interval, "frequency": c.frequency, "name": c.name}
                      for c in configs]
        return optimizers, schedulers

    # ------------------------------------------------------------------ the round
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """One federated round, in six steps."""
        start = time.perf_counter()
        rnd, cohort = self._cohort(batch)
        params, buffers = self.global_params(), self.global_buffers()
        # 1. the plan: this round's masks (the pruning callbacks contributed the plan), then the round-start hooks
        self.pruning.begin_round(rnd, params, self._server_momentum())
        self._call_fed_hook("on_fed_round_start", rnd, cohort)
        ctx = RoundContext(rnd, params, buffers, self.pruning.masks, self.pruning.patterns, self.task)
        # 2. what each client gets (the strategy) and the broadcasts in wire form (the channel)
        seeds = [derive_seed(self.seed, rnd, cid) for cid in cohort]
        sub_models = self.strategy.configure(ctx, cohort, seeds)
        state = {**{n: p.detach() for n, p in params.items()}, **buffers}
        optim = optim_state_of(*self._template, self.client_clock.global_step, self.client_clock.epoch)
        payload = RoundPayload(rnd, self.channel.broadcast(state, ctx.masks, ctx.patterns), optim)
        request = self.pruning.client_statistics(rnd)  # statistics the clients accumulate and upload (PruneFL)
        plans = [ClientPlan(cid, rnd, seed, None if sub is None else RoundPayload(
                     rnd, self.channel.broadcast(state, sub.masks, sub.patterns, feedback=False), optim),
                     statistics=request, forward_scales={} if sub is None else dict(sub.forward_scales))
                 for cid, seed, sub in zip(cohort, seeds, sub_models)]
        # 3. the clients train (the executor decides where)
        results = self.executor.run(payload, plans, on_result=lambda r: self._call_fed_hook("on_fed_client_result", r))
        # 4. the replies decoded (the channel) and aggregated (the strategy)
        states = [self.channel.read_upload(r.payload, ctx.masks if sub is None else sub.masks, state) if r.ok else None
                  for r, sub in zip(results, sub_models)]
        agg = self.strategy.aggregate(ctx, results, states, sub_models)
        self.failures.check(rnd, results, agg)
        # 5. the server step (the strategy), the pruning statistics, the clients' schedule position
        summary = round_summary(rnd, cohort, [p.payload or payload for p in plans], results, agg, self.executor)
        if agg.ok:
            summary.pseudo_gradient = self.strategy.apply(ctx, agg, params, buffers)
            client_stats = self.strategy.aggregate_statistics(results, [
                self.channel.read_statistics(r.statistics, state) if r.ok and r.statistics else None for r in results],
                agg.ok) if request else None
            self.pruning.end_round(summary.pseudo_gradient, client_stats)
            self.client_clock = adopt_position([results[i].optim for i in agg.ok], *self._template, self.client_clock)
        count_optimizer_step(self.trainer)  # the round is one Trainer step, also when every client failed
        self._call_fed_hook("on_fed_after_aggregate", summary)
        # 6. logging, and the round-end hooks
        summary.seconds = time.perf_counter() - start
        summary.metrics = log_round(self, summary, agg, self.pruning)
        self.last_summary = summary
        self._call_fed_hook("on_fed_round_end", summary)

    def _cohort(self, batch: dict[str, Any]) -> tuple[int, list[int]]:
        rnd = int(self.global_step)
        if int(batch["round"]) != rnd:
            raise RuntimeError(f"cohort for round {int(batch['round'])} arrived at round {rnd}")
        return rnd, [int(c) for c in batch["clients"].tolist()]

    def _server_momentum(self) -> dict[str, Tensor] | None:
        """The server optimiser's momentum of the pruned parameters, for ``momentum_*`` importance with
        ``momentum_source="server_optimizer"``."""
        state = self.pruning
        if not state.plan.active or state.momentum_source != "server_optimizer":
            return None
        return self.strategy.momentum(state.targets, self.global_params())

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        step_plateau_schedulers(self._template[1], self.trainer, "step", self.trainer.fit_loop.epoch_loop.batch_idx)

    def on_train_epoch_end(self) -> None:
        # after validation: ReduceLROnPlateau schedulers of the task follow the server's metrics
        step_plateau_schedulers(self._template[1], self.trainer, "epoch", self.trainer.current_epoch)

    def _call_fed_hook(self, hook: str, *args: Any) -> None:
        if self._trainer is None:
            return
        for callback in self.trainer.callbacks:
            fn = getattr(callback, hook, None)
            if fn is not None:
                fn(self.trainer, self, *args)

    # ------------------------------------------------------------------ checkpoints (checkpoint.py owns them)
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """A checkpoint of the task (its keys, its hyperparameters; the pruned model) with the federated state in
        ``checkpoint["fedprune"]`` (see :mod:`lightning_fedprune.federated.checkpoint`)."""
        save_federated_state(self, checkpoint)
        self.task.on_save_checkpoint(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restores the federated state before Lightning loads ``state_dict``; when resuming a fit, first compares
        the configuration (``resume_config_change``), then puts the server's pruned values back."""
        self._reapply_plan = restore_federated_state(self, checkpoint)
        self.task.on_load_checkpoint(checkpoint)

    @_restricted_classmethod
    def load_from_checkpoint(
        cls,
        checkpoint_path: _PATH | IO,
        map_location: _MAP_LOCATION_TYPE = None,
        hparams_file: _PATH | None = None,
        strict: bool | None = None,
        weights_only: bool | None = None,
        **kwargs: Any,
    ) -> Self:
        """Lightning's ``load_from_checkpoint`` after a check of the file (a clear error naming it when it is
        empty, truncated, not a checkpoint or damaged). The task is rebuilt from the class path and
        hyperparameters recorded in the checkpoint unless ``task=`` is given. (The file is a checkpoint of the
        task, which ``MyTask.load_from_checkpoint`` reads as it is; here it is read back into the module's
        layout first: :func:`~lightning_fedprune.federated.checkpoint.to_module_layout`.)"""
        validate_checkpoint_file(checkpoint_path)
        buffer = module_layout_file(checkpoint_path, map_location, weights_only)
        return super().load_from_checkpoint(buffer, map_location, hparams_file, strict, weights_only, **kwargs)


def _plain(value: Any) -> Any:
    """A setting as compared with a strategy's (tuples and lists alike)."""
    return list(value) if isinstance(value, (tuple, list)) else value
