"""FederatedLightningModule: one Trainer training step is one federated round.

The round, top to bottom, is :meth:`FederatedLightningModule.training_step`:

1. ``on_fed_round_start`` hooks (pruning callbacks update masks here);
2. the round payload: global weights with pruned entries zeroed, masks, patterns;
3. the executor trains every client of the cohort on a replica of the task;
4. failed clients (exception, NaN/Inf) are excluded and reported;
5. weighted FedAvg of the returned weights -> pseudo-gradient -> server optimiser step
   (pruned entries keep their server values);
6. ``on_fed_after_aggregate`` hooks, logging, ``on_fed_round_end`` hooks.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import time
import warnings
from typing import IO, Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.types import LRSchedulerConfig
from torch import Tensor
from typing_extensions import Self

from lightning_fedprune._compat import _MAP_LOCATION_TYPE, _PATH, _restricted_classmethod
from lightning_fedprune.federated.checkpoint import (
    RESUME_CONFIG_CHANGES,
    install_checkpoint_validation,
    instantiate_task,
    restore_federated_state,
    save_federated_state,
    task_spec,
    validate_checkpoint_file,
)
from lightning_fedprune.federated.client import (
    CLIENT_PRECISIONS,
    ClientTrainerView,
    client_precision_plugin,
    configure_task_optimizers,
    load_optim_state,
    optim_state_of,
)
from lightning_fedprune.federated.executors import (
    DEFAULT_START_METHOD,
    EXECUTORS,
    Executor,
    ExecutorTeardown,
    make_executor,
)
from lightning_fedprune.federated.hooks import RoundSummary
from lightning_fedprune.federated.replica import state_names
from lightning_fedprune.federated.protocol import ClientConfig, ClientPlan, ClientResult, OptimState, RoundPayload, derive_seed
from lightning_fedprune.pruning.plan import PruningPlan
from lightning_fedprune.pruning.state import PruningState
from lightning_fedprune.federated.strategy import Aggregate, FedAvg, Strategy, make_strategy
from lightning_fedprune.validation import check_choice, check_int, fail
from lightning_fedprune.federated.wire import Payload, decode_state, decode_tensor, encode_state

WEIGHTINGS = ("num_samples", "num_examples", "uniform")

# A checkpoint taken after a round holds the state after the server step, which is what a round-level
# checkpoint should hold; Lightning's generic warning about manual optimisation does not apply.
warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization", category=UserWarning)
# The wrapper forwards the batch-transfer hooks of evaluation batches to the task, so it always overrides them;
# Lightning's note that the module's hooks (not the data module's) are used is then always true and says nothing.
warnings.filterwarnings("ignore", message="You have overridden `(on_before_batch_transfer|transfer_batch_to_device|"
                                          "on_after_batch_transfer)` in `LightningModule` but have passed in a")


class FederatedLightningModule(pl.LightningModule):
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
        server_optimizer: ``"sgd"`` (``server_lr=1`` is FedAvg), ``"sgdm"`` (FedAvgM) or ``"adam"`` (FedAdam).
        server_lr: the server optimiser's learning rate on the pseudo-gradient (> 0); ``"sgd"`` with
            ``server_lr=1`` makes the new global model the clients' weighted average (FedAvg).
        server_momentum: ``"sgdm"``'s momentum, in ``[0, 1)`` (checked, and unused, with the others).
        server_betas: ``"adam"``'s two betas, each in ``[0, 1)`` (checked, and unused, with the others).
        server_eps: ``"adam"``'s epsilon, > 0 (1e-3 as in FedAdam's paper; checked, and unused, with
            the others).
        strategy: a :class:`~lightning_fedprune.federated.strategy.Strategy` instance (e.g. ``FedAdam(server_lr=0.01)``
            or your own subclass; in YAML a ``class_path``), used instead of ``server_optimizer`` and its
            settings: how the server aggregates a round and steps.
        weighting: aggregation weight of a client: ``"num_samples"`` (its dataset size, FedAvg),
            ``"num_examples"`` (examples processed this round) or ``"uniform"``.
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
            ways. Down: rounded to nearest, with the rounding error fed back into the next round's
            broadcast (a server-side residual), so the global model does not drift. Up: each client
            sends its change since the broadcast, rounded stochastically (unbiased). Masks and
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
        server_optimizer: str = "sgd",
        server_lr: float = 1.0,
        server_momentum: float = 0.9,
        server_betas: tuple[float, float] = (0.9, 0.99),
        server_eps: float = 1e-3,
        weighting: str = "num_samples",
        executor: str | Executor = "sequential",
        num_workers: int = 2,
        start_method: str = DEFAULT_START_METHOD,
        client_gradient_clip_val: float | None = None,
        client_gradient_clip_algorithm: str = "norm",
        compact_clients: bool = True,
        strategy: Strategy | None = None,
        payload_bits: int | None = None,
        max_failed_rounds: int = 3,
        seed: int = 0,
        resume_config_change: str = "error",
    ) -> None:
        super().__init__()
        if isinstance(task, dict):
            task = instantiate_task(task)
        if not isinstance(task, pl.LightningModule):
            raise TypeError(f"`task` must be a lightning LightningModule, got {type(task).__name__}.")
        if not is_overridden("training_step", task, pl.LightningModule):
            raise ValueError(f"`task` ({type(task).__name__}) does not implement `training_step`; clients cannot train it.")
        clients_per_round = check_int(clients_per_round, "clients_per_round", min=1)
        if local_steps is None and local_epochs is None:
            local_epochs = 1
        if isinstance(strategy, dict):  # as recorded in the hyperparameters (Strategy.spec)
            strategy = Strategy.from_spec(strategy)
        if strategy is not None and not isinstance(strategy, Strategy):
            fail("strategy", "a lightning_fedprune.federated.strategy.Strategy instance or None", strategy)
        default_strategy = make_strategy(server_optimizer, server_lr, server_momentum, server_betas, server_eps)
        check_choice(weighting, "weighting", WEIGHTINGS)
        if not isinstance(executor, Executor) and not (isinstance(executor, str) and executor in EXECUTORS):
            fail("executor", f"one of {EXECUTORS} or an Executor instance", executor)
        # checked whatever the executor: a bad value is a typo even where it is not used
        num_workers = check_int(num_workers, "num_workers", min=1)
        check_choice(start_method, "start_method", mp.get_all_start_methods())
        max_failed_rounds = check_int(max_failed_rounds, "max_failed_rounds", min=1)
        seed = check_int(seed, "seed")
        check_choice(resume_config_change, "resume_config_change", RESUME_CONFIG_CHANGES)
        self.client_config = ClientConfig(
            local_steps=local_steps,
            local_epochs=local_epochs,
            gradient_clip_val=client_gradient_clip_val,
            gradient_clip_algorithm=client_gradient_clip_algorithm,
            compact=compact_clients,
            payload_bits=payload_bits,
        )
        self.executor = make_executor(executor, num_workers=num_workers, start_method=start_method)
        # the task is recorded as its class path and its own hyperparameters (checkpoint, loggers' hparams.yaml);
        # LightningCLI's `_instantiator` is dropped so that every checkpoint loads the same way; plain lists
        # keep hparams.yaml readable by yaml.safe_load
        self.save_hyperparameters(ignore=["task", "executor", "strategy", "_instantiator"])
        self.save_hyperparameters({"task": task_spec(task), "server_betas": list(server_betas),
                                   "strategy": strategy.spec() if strategy is not None else None})
        self.resume_config_change = resume_config_change
        self.automatic_optimization = False
        self.task = task
        self.clients_per_round = clients_per_round
        self.strategy = strategy if strategy is not None else default_strategy
        self.weighting = weighting
        self.max_failed_rounds = max_failed_rounds
        self.seed = seed
        self.pruning = PruningState()
        self.last_summary: RoundSummary | None = None
        self._executor_ready = False
        self._stash: dict[str, Tensor] = {}
        self._param_names, self._buffer_names = state_names(task)
        # the task's optimisers and schedulers on the server: the client schedule's position (see OptimState)
        self._template: tuple[list[torch.optim.Optimizer], list[LRSchedulerConfig]] = ([], [])
        self._clock = OptimState()  # client optimiser steps / local epochs so far, in federated time
        self._failed_streak = 0
        self._rounds_this_fit = 0
        self._reapply_plan = False
        self._residual: dict[str, Tensor] = {}  # quantised broadcasts: what rounding left out, sent next round

    # ------------------------------------------------------------------ convenience
    @property
    def masks(self) -> dict[str, Tensor]:
        """``{parameter name: bool tensor}`` of pruned parameters, ``True`` = kept."""
        return self.pruning.masks

    @property
    def server_optimizer(self) -> torch.optim.Optimizer:
        """The server optimiser (the first of the Trainer's optimisers; the others are the task's)."""
        opts = self.optimizers(use_pl_optimizer=False)
        return opts[0] if isinstance(opts, list) else opts

    def global_params(self) -> dict[str, Tensor]:
        params = dict(self.task.named_parameters())
        return {n: params[n] for n in self._param_names}

    def global_buffers(self) -> dict[str, Tensor]:
        buffers = dict(self.task.named_buffers())
        return {n: buffers[n] for n in self._buffer_names}

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.task(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        """Attributes this wrapper does not have are read from the task (e.g. by the task's own callbacks)."""
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
        """The task's own callbacks; also maps the Trainer's client-side settings onto client training.

        Runs before Lightning validates the loop configuration: ``gradient_clip_val`` /
        ``gradient_clip_algorithm`` and ``accumulate_grad_batches`` (which Lightning refuses for the
        manually optimised server) move into the clients' configuration, and an integer
        ``val_check_interval`` longer than an epoch counts rounds across epochs.
        """
        self._adopt_trainer_settings(self.trainer)
        self.pruning.plan = PruningPlan()  # the pruning callbacks contribute theirs in `setup`, before ours
        task_callbacks = self._delegate("configure_callbacks") or []
        if isinstance(task_callbacks, pl.Callback):
            task_callbacks = [task_callbacks]
        # Lightning skips `teardown` when fit raises; ExecutorTeardown's `on_exception` stops the executor then
        return [*task_callbacks, ExecutorTeardown()]

    def _adopt_trainer_settings(self, trainer: pl.Trainer) -> None:
        cfg = self.client_config
        manual = not self.task.automatic_optimization
        clip = trainer.gradient_clip_val
        if clip is not None and clip > 0:
            if manual:
                raise MisconfigurationException(
                    f"`Trainer(gradient_clip_val={clip!r})`: the task uses manual optimisation, for which Lightning "
                    "does not clip automatically; call `self.clip_gradients(opt, gradient_clip_val=...)` in its "
                    "`training_step` instead."
                )
            if cfg.gradient_clip_val is not None and cfg.gradient_clip_val != clip:
                raise MisconfigurationException(
                    f"`Trainer(gradient_clip_val={clip!r})` and `FederatedLightningModule(client_gradient_clip_val="
                    f"{cfg.gradient_clip_val!r})` disagree; give only one of them (both clip inside the clients)."
                )
            cfg.gradient_clip_val = float(clip)
            if trainer.gradient_clip_algorithm is not None:
                cfg.gradient_clip_algorithm = str(trainer.gradient_clip_algorithm.value)
            trainer.gradient_clip_val = None  # the server itself never clips (its step is an average)
            trainer.gradient_clip_algorithm = None
        accumulate = trainer.accumulate_grad_batches
        if accumulate != 1:
            if manual:
                raise MisconfigurationException(
                    f"`Trainer(accumulate_grad_batches={accumulate})`: the task uses manual optimisation, for which "
                    "Lightning does not accumulate automatically; accumulate in its `training_step` instead."
                )
            cfg.accumulate_grad_batches = int(accumulate)
            trainer.accumulate_grad_batches = 1
        dm = trainer.datamodule
        rounds_per_epoch = getattr(dm, "rounds_per_epoch", None) or 1
        interval = trainer.val_check_interval
        if isinstance(interval, int) and trainer.check_val_every_n_epoch is not None and interval > rounds_per_epoch:
            # `val_check_interval=N` means "every N rounds", also when an epoch has fewer rounds
            trainer.check_val_every_n_epoch = None

    def setup(self, stage: str) -> None:
        install_checkpoint_validation(self.trainer)  # `ckpt_path` is loaded after setup: check the file first
        self._delegate("setup", stage)
        if stage != "fit":
            return
        dm = self.trainer.datamodule
        if dm is None or not hasattr(dm, "client_data"):
            raise TypeError(
                "FederatedLightningModule needs a FederatedDataModule (or a data module with `client_data()`): "
                "call `trainer.fit(fed, datamodule=FederatedDataModule(...))`."
            )
        population = len(dm.population)
        if self.clients_per_round > population:
            raise ValueError(
                f"`clients_per_round` ({self.clients_per_round}) is larger than the number of clients "
                f"available for sampling ({population})."
            )
        self._param_names, self._buffer_names = state_names(self.task)
        self._configure_client_time(self.trainer, dm)
        # every callback has contributed its part of the plan: check it as a whole and take its configuration
        self.pruning.apply_plan(self.pruning.plan, [(n, tuple(p.shape)) for n, p in self.task.named_parameters()])
        if self.pruning.plan.active and self.pruning.momentum_source == "server_optimizer" \
                and self.pruning.importance.startswith("momentum") and type(self.strategy) is FedAvg:
            raise ValueError("`momentum_source='server_optimizer'` needs server_optimizer 'sgdm' or 'adam' (plain 'sgd' "
                             "has no momentum).")

    def _configure_client_time(self, trainer: pl.Trainer, dm: Any) -> None:
        """The clients' precision and their view of the run's length (``max_steps``, ``estimated_stepping_batches``)."""
        cfg = self.client_config
        precision = str(trainer.precision)
        if precision not in CLIENT_PRECISIONS:
            raise ValueError(f"`Trainer(precision={precision!r})`: clients train in one of {CLIENT_PRECISIONS}.")
        cfg.precision = precision
        rounds_per_epoch = getattr(dm, "rounds_per_epoch", None) or 1
        max_epochs = trainer.max_epochs if trainer.max_epochs is not None else -1
        if trainer.max_steps is not None and trainer.max_steps > 0:
            max_rounds = trainer.max_steps
        elif max_epochs > 0:
            max_rounds = max_epochs * rounds_per_epoch
        else:
            max_rounds = -1
        epochs_per_round = cfg.local_epochs or 1
        if cfg.local_steps is not None:
            steps = cfg.local_steps
        else:
            batches = getattr(dm, "max_client_batches", 0) or 0
            steps = cfg.local_epochs * math.ceil(batches / cfg.accumulate_grad_batches) if batches else 0
        cfg.max_rounds = max_rounds
        cfg.steps_per_round = steps
        cfg.max_steps = max_rounds * steps if trainer.max_steps is not None and trainer.max_steps > 0 and steps else -1
        cfg.max_epochs = max_epochs * rounds_per_epoch * epochs_per_round if max_epochs > 0 else -1

    def on_fit_start(self) -> None:
        self._rounds_this_fit = 0
        self._failed_streak = 0
        self._delegate("on_fit_start")

    def on_train_start(self) -> None:
        if self._reapply_plan:  # a resume that applies a changed configuration: before any round
            self._reapply_plan = False
            self.pruning.reapply_plan(int(self.global_step), self.global_params(), self._server_momentum())
        self._delegate("on_train_start")
        # after the task's on_train_start, so the clients' replicas start from what it set up
        # both executors get the same picklable view of the clients' data (no Trainer, no data module)
        self.executor.setup(self.task, self.trainer.datamodule.client_data(), self.client_config, self.weighting)
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

    def make_server_optimizer(self) -> torch.optim.Optimizer:
        """A new server optimiser over the global parameters, from this module's settings."""
        return self.strategy.make_optimizer(list(self.global_params().values()))

    def configure_optimizers(self) -> Any:
        """The server optimiser, then the task's optimisers and schedulers (the clients' *template*).

        The template is what ``LearningRateMonitor`` reports (the task's names; the server's is
        ``lr-Server<Optimizer>``), what checkpoints carry and what every client's fresh optimiser
        starts from (see :class:`~lightning_fedprune.federated.protocol.OptimState`). It is never stepped with
        gradients on the server.
        """
        server = self.make_server_optimizer()
        task = self.task
        trainer = task._trainer
        view = ClientTrainerView(self.client_config, client_precision_plugin(self.client_config.precision), task)
        task._trainer = view  # configure_optimizers sees the clients' trainer (e.g. estimated_stepping_batches)
        try:
            optimizers, configs = configure_task_optimizers(task)
        finally:
            task._trainer = trainer
        self._template = (optimizers, configs)
        schedulers = [{"scheduler": c.scheduler, "interval": c.interval, "frequency": c.frequency, "name": c.name}
                      for c in configs]
        return [server, *optimizers], schedulers

    # ------------------------------------------------------------------ the round
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """One federated round, in six steps."""
        start = time.perf_counter()
        rnd, cohort = self._cohort(batch)
        # 1. the plan: this round's masks (pruning callbacks contributed the plan), then the round-start hooks
        self.pruning.begin_round(rnd, self.global_params(), self._server_momentum())
        self._call_fed_hook("on_fed_round_start", rnd, cohort)
        # 2. the broadcast: global weights with pruned entries zeroed, in wire form, and the clients' schedule
        payload = self.build_payload(rnd)
        plans, plan_masks = self._plans(rnd, cohort)
        # 3. the clients train (the executor decides where)
        results = self.executor.run(payload, plans, on_result=lambda r: self._call_fed_hook("on_fed_client_result", r))
        # 4. aggregation (the strategy): failed and non-finite results left out, weighted average, metrics
        states = [self._upload_state(r.payload, masks) if r.ok else None for r, masks in zip(results, plan_masks)]
        agg = self.strategy.aggregate(results, states, self._param_names + self._buffer_names)
        self._check_failures(rnd, results, agg)
        # 5. the server step (the strategy), the pruning statistics, the clients' schedule position
        summary = self._summary(rnd, cohort, [p.payload or payload for p in plans], results, agg)
        measured = self.executor.traffic()  # an executor that measures its transport (Flower) counts real bytes
        if measured is not None:
            summary.bytes_down, summary.bytes_up = measured
        optimizer = self.optimizers()[0]
        if agg.ok:
            summary.pseudo_gradient = self.strategy.step(optimizer.optimizer, self.global_params(), self.global_buffers(),
                                                         agg.average, self.pruning.masks)
            optimizer.step()  # counts the round for Lightning; no parameter has a gradient left, so it changes nothing
            self.pruning.end_round(summary.pseudo_gradient)
            self._advance_client_clock([results[i] for i in agg.ok])
        else:
            optimizer.step()  # the round is still counted; no gradients, the global model stays as it is
        self._call_fed_hook("on_fed_after_aggregate", summary)
        # 6. logging, and the round-end hooks
        summary.seconds = time.perf_counter() - start
        summary.metrics = self._log_round(summary, agg)
        self.last_summary = summary
        self._call_fed_hook("on_fed_round_end", summary)

    def _cohort(self, batch: dict[str, Any]) -> tuple[int, list[int]]:
        rnd = int(self.global_step)
        if int(batch["round"]) != rnd:
            raise RuntimeError(f"cohort for round {int(batch['round'])} arrived at round {rnd}")
        return rnd, [int(c) for c in batch["clients"].tolist()]

    def _check_failures(self, rnd: int, results: list[ClientResult], agg: Aggregate) -> None:
        """Warn about every client left out; raise when clients keep failing (a run never ends "successfully"
        with an untrained model): every client of the first round, or of ``max_failed_rounds`` rounds in a row."""
        for i, reason in sorted(agg.failed.items()):
            first_line = reason.strip().splitlines()[0] if reason.strip() else "unknown error"
            warnings.warn(f"round {rnd}: client {results[i].client_id} failed and is left out of the aggregate: "
                          f"{first_line}", stacklevel=2)
        self._rounds_this_fit += 1
        if agg.ok:
            self._failed_streak = 0
            return
        warnings.warn(f"round {rnd}: all {len(results)} clients failed; the global model is left unchanged.", stacklevel=2)
        self._failed_streak += 1
        if self._rounds_this_fit > 1 and self._failed_streak < self.max_failed_rounds:
            return
        why = (f"every client of the first round ({rnd}) failed" if self._rounds_this_fit == 1
               else f"every client failed in {self._failed_streak} consecutive rounds (up to round {rnd}; "
                    f"max_failed_rounds={self.max_failed_rounds})")
        first = min(agg.failed, default=None)
        detail = f"client {results[first].client_id}: {agg.failed[first]}" if first is not None else "no client ran"
        raise RuntimeError(f"Federated training stopped: {why}. The first client's error:\n{detail}")

    @staticmethod
    def _summary(rnd: int, cohort: list[int], sent: list[RoundPayload], results: list[ClientResult],
                 agg: Aggregate) -> RoundSummary:
        summary = RoundSummary(round=rnd, cohort=cohort, clients_ok=len(agg.ok), clients_failed=len(agg.failed),
                               train_loss=agg.train_loss, total_weight=agg.weight)
        summary.bytes_down = sum(p.encoded.nbytes for p in sent)
        summary.bytes_up = sum(r.bytes_up for r in results)
        summary.dense_bytes = 2 * sum(p.encoded.dense_nbytes for p in sent)
        return summary

    def _plans(self, rnd: int, cohort: list[int]) -> tuple[list[ClientPlan], list[dict[str, Tensor]]]:
        """Every client's plan, and the masks its upload is decoded with: the round's, or the sub-model the
        strategy gives it (:meth:`Strategy.client_masks`), with a broadcast of its own."""
        plans, plan_masks = [], []
        params = self.global_params()
        for cid in cohort:
            seed = derive_seed(self.seed, rnd, cid)
            custom = self.strategy.client_masks(rnd, cid, seed, self.pruning.masks, self.pruning.patterns, params)
            if custom is None:
                plans.append(ClientPlan(cid, rnd, seed))
                plan_masks.append(self.pruning.masks)
            else:
                plans.append(ClientPlan(cid, rnd, seed, self.build_payload(rnd, *custom)))
                plan_masks.append(custom[0])
        return plans, plan_masks

    def build_payload(self, rnd: int, masks: dict[str, Tensor] | None = None,
                      patterns: dict[str, str] | None = None) -> RoundPayload:
        """The broadcast of round ``rnd``: the global weights in wire form (the kept values of ``masks``,
        default the pruning state's, and their indices) and the clients' schedule position."""
        state = {name: p.detach() for name, p in self.global_params().items()}
        state.update((name, b.detach()) for name, b in self.global_buffers().items())
        round_broadcast = masks is None
        masks = self.pruning.masks if masks is None else masks
        patterns = self.pruning.patterns if patterns is None else patterns
        bits = self.client_config.payload_bits
        if bits is None:
            encoded = encode_state(state, masks, patterns, send_index=True)  # kept values only
        else:
            floats = self._float_params()
            if round_broadcast:  # error feedback: what rounding left out last round goes out with this one
                for name in floats:
                    if name in self._residual:
                        state[name] = state[name] + self._residual[name]
            encoded = encode_state(state, masks, patterns, send_index=True, bits=bits, quantized=floats)
            if round_broadcast:
                for name in floats:
                    residual = state[name] - decode_tensor(encoded[name])
                    self._residual[name] = residual.masked_fill(~masks[name], 0) if name in masks else residual
        optimizers, configs = self._template
        return RoundPayload(rnd, encoded, optim_state_of(optimizers, configs, self._clock.global_step, self._clock.epoch))

    def _float_params(self) -> list[str]:
        """The parameters that travel quantised with ``payload_bits`` (floating point ones)."""
        params = self.global_params()
        return [n for n in self._param_names if params[n].is_floating_point()]

    def _upload_state(self, upload: Payload, masks: dict[str, Tensor]) -> dict[str, Tensor]:
        """A client's parameters and buffers from its upload; a relative (quantised) tensor is the client's
        change since the broadcast, added to the server's own weights (so the rounding of the broadcast does
        not stay in the global model). Pruned entries are exact zeros either way."""
        state = decode_state(upload, masks)
        params = self.global_params()
        for name, enc in upload.items():
            if enc.relative:
                value = params[name].detach() + state[name]
                state[name] = value.masked_fill(~masks[name], 0) if name in masks else value
        return state

    def _advance_client_clock(self, ok: list[ClientResult]) -> None:
        """Adopt the schedule position of the client that took the most optimiser steps (the first on ties)."""
        moved = [r for r in ok if r.optim is not None]
        if not moved:
            return
        best = max(moved, key=lambda r: r.optim.global_step)
        optimizers, configs = self._template
        load_optim_state(best.optim, optimizers, configs)
        self._clock = OptimState(global_step=best.optim.global_step, epoch=best.optim.epoch)

    def _server_momentum(self) -> dict[str, Tensor] | None:
        """The server optimiser's momentum (``sgdm``) or first moment (``adam``) of the pruned parameters,
        for ``momentum_*`` importance with ``momentum_source="server_optimizer"``."""
        state = self.pruning
        if not state.plan.active or state.momentum_source != "server_optimizer" or self._trainer is None:
            return None
        opt = self.server_optimizer
        params = self.global_params()
        out = {}
        for name in state.targets:
            st = opt.state.get(params[name], {})
            buf = st.get("momentum_buffer", st.get("exp_avg"))
            if buf is not None:
                out[name] = buf
        return out

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._step_plateau_schedulers("step")

    def on_train_epoch_end(self) -> None:
        # after validation: ReduceLROnPlateau schedulers of the task follow the server's metrics
        self._step_plateau_schedulers("epoch")

    def _step_plateau_schedulers(self, interval: str) -> None:
        _, configs = self._template
        trainer = self.trainer
        index = trainer.fit_loop.epoch_loop.batch_idx if interval == "step" else trainer.current_epoch
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
                              "strict is set to `False`. Skipping learning rate update.", RuntimeWarning, stacklevel=2)
                continue
            config.scheduler.step(float(value))

    def _log_round(self, summary: RoundSummary, agg: Aggregate) -> dict[str, float]:
        """Log the round (``round/*``, ``comm/*``) and the cohort's values of what the task logged.

        A name the task logged with ``self.log`` in client training is logged here once per round
        with the task's options, its value the cohort's reduction: for ``reduce_fx="mean"`` the mean
        weighted by the examples behind each client's value, so Lightning's epoch mean over rounds
        (``X_epoch``) weights every example alike.
        """
        log = dict(on_step=True, on_epoch=False, batch_size=1)
        if agg.ok:
            self.log("round/train_loss", summary.train_loss, prog_bar=True, **log)
        self.log("round/clients_ok", float(summary.clients_ok), **log)
        self.log("round/clients_failed", float(summary.clients_failed), **log)
        self.log("round/seconds", summary.seconds, **log)
        self.log("comm/bytes_down", float(summary.bytes_down), **log)
        self.log("comm/bytes_up", float(summary.bytes_up), **log)
        self.log("comm/dense_bytes", float(summary.dense_bytes), **log)
        if summary.dense_bytes:
            self.log("comm/ratio", (summary.bytes_down + summary.bytes_up) / summary.dense_bytes, **log)
        state = self.pruning
        if state.plan.active:
            # every value every round (flips are 0 without a recomputation): Lightning repeats a step value
            # until it is logged again, so a value logged only in some rounds would look stale in the others
            change = state.last_change
            self.log("prune/sparsity", state.sparsity() if state.masks else 0.0, prog_bar=True, **log)
            self.log("prune/target_sparsity", state.target_sparsity, **log)
            self.log("prune/phase", float(state.phase), **log)
            self.log("prune/mask_flips", float(change.flips), **log)
            self.log("prune/restored", float(change.restored), **log)
            for name, value in state.actual_layer_sparsity().items():
                self.log(f"prune/layer_sparsity/{name}", value, **log)
        for name, v in agg.logged.items():
            self.log(name, v.value, on_step=v.on_step, on_epoch=v.on_epoch, reduce_fx=v.reduce_fx, prog_bar=v.prog_bar,
                     logger=v.logger, batch_size=max(1, int(round(v.weight))))
        return {name: v.value for name, v in agg.logged.items()}

    def _call_fed_hook(self, hook: str, *args: Any) -> None:
        if self._trainer is None:
            return
        for callback in self.trainer.callbacks:
            fn = getattr(callback, hook, None)
            if fn is not None:
                fn(self.trainer, self, *args)

    # ------------------------------------------------------------------ evaluation: the task's own steps
    def _delegate(self, hook: str, *args: Any, **kwargs: Any) -> Any:
        task = self.task
        if hook != "setup" and hook != "teardown":
            task._current_fx_name = self._current_fx_name
        return getattr(task, hook)(*args, **kwargs)

    def validation_step(self, *args: Any, **kwargs: Any) -> Any:
        return self._delegate("validation_step", *args, **kwargs)

    def test_step(self, *args: Any, **kwargs: Any) -> Any:
        return self._delegate("test_step", *args, **kwargs)

    def predict_step(self, *args: Any, **kwargs: Any) -> Any:
        return self._delegate("predict_step", *args, **kwargs)

    def _mask_for_eval(self) -> None:
        """Evaluate the pruned model clients get: pruned entries zeroed (the server's values are stashed)."""
        self._stash = {}
        if self.pruning.masks and not self.pruning.permanent:
            params = self.global_params()
            self._stash = {name: params[name].detach().clone() for name in self.pruning.masks}
            self.pruning.zero_pruned_(params)

    def _unmask_after_eval(self) -> None:
        stash, self._stash = self._stash, {}
        if stash:
            params = self.global_params()
            with torch.no_grad():
                for name, value in stash.items():
                    params[name].copy_(value)

    # batches: the training "batches" are cohorts (client ids), only evaluation batches are the task's
    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        return batch if self.trainer.training else self._delegate("on_before_batch_transfer", batch, dataloader_idx)

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        if self.trainer.training:
            return super().transfer_batch_to_device(batch, device, dataloader_idx)
        return self._delegate("transfer_batch_to_device", batch, device, dataloader_idx)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        return batch if self.trainer.training else self._delegate("on_after_batch_transfer", batch, dataloader_idx)

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """``state_dict`` holds the pruned model; the server's pruned values, masks and configuration go
        into ``checkpoint["fedprune"]`` (see :mod:`lightning_fedprune.federated.checkpoint`)."""
        save_federated_state(self, checkpoint)
        checkpoint["fedprune"]["client_clock"] = {"global_step": self._clock.global_step, "epoch": self._clock.epoch}
        checkpoint["fedprune"]["downlink_residual"] = {n: t.clone() for n, t in self._residual.items()}
        self.task.on_save_checkpoint(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restores the masks before Lightning loads ``state_dict``; when resuming a fit, first compares the
        configuration (``resume_config_change``), then puts the server's pruned values back."""
        restore_federated_state(self, checkpoint)
        clock = checkpoint.get("fedprune", {}).get("client_clock", {})
        self._clock = OptimState(global_step=int(clock.get("global_step", 0)), epoch=int(clock.get("epoch", 0)))
        self._residual = {n: t.clone() for n, t in checkpoint.get("fedprune", {}).get("downlink_residual", {}).items()}
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
        hyperparameters recorded in the checkpoint unless ``task=`` is given."""
        validate_checkpoint_file(checkpoint_path)
        return super().load_from_checkpoint(checkpoint_path, map_location, hparams_file, strict, weights_only, **kwargs)


#: The task's hooks around evaluation of the global model (validation, test, predict), forwarded as they are.
EVALUATION_HOOKS = (
    "on_validation_start", "on_validation_end", "on_validation_batch_start", "on_validation_batch_end",
    "on_validation_model_eval", "on_validation_model_train", "on_validation_model_zero_grad",
    "on_test_start", "on_test_end", "on_test_batch_start", "on_test_batch_end", "on_test_model_eval",
    "on_test_model_train", "on_predict_start", "on_predict_end", "on_predict_batch_start", "on_predict_batch_end",
    "on_predict_model_eval",
)


def _forward_to_task(hook: str) -> Any:
    def forward(self: FederatedLightningModule, *args: Any, **kwargs: Any) -> Any:
        return self._delegate(hook, *args, **kwargs)

    forward.__name__ = forward.__qualname__ = hook
    forward.__doc__ = f"Runs the task's ``{hook}`` (evaluation of the global model)."
    return forward


def _masked_epoch(stage: str, start: bool) -> Any:
    """``on_<stage>_epoch_start``/``_end``: evaluate the pruned model clients get — pruned entries zeroed
    from the epoch's start, the server's values back at its end (before ModelCheckpoint's
    ``on_validation_end`` saves), around the task's own hook."""
    hook = f"on_{stage}_epoch_{'start' if start else 'end'}"

    def epoch_hook(self: FederatedLightningModule) -> None:
        if start:
            self._mask_for_eval()
            self._delegate(hook)
            return
        try:
            self._delegate(hook)
        finally:
            self._unmask_after_eval()

    epoch_hook.__name__ = epoch_hook.__qualname__ = hook
    epoch_hook.__doc__ = f"Runs the task's ``{hook}`` on the pruned global model."
    return epoch_hook


for _hook in EVALUATION_HOOKS:
    setattr(FederatedLightningModule, _hook, _forward_to_task(_hook))
for _stage in ("validation", "test", "predict"):
    for _start in (True, False):
        _method = _masked_epoch(_stage, _start)
        setattr(FederatedLightningModule, _method.__name__, _method)
