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
import time
import warnings
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor

from lightning_fedprune.aggregation import (
    is_plain_fedavg,
    make_server_optimizer,
    validate_server_optimizer,
    weighted_average,
)
from lightning_fedprune.client import state_names
from lightning_fedprune.executors import EXECUTORS, Executor, ExecutorTeardown, make_executor
from lightning_fedprune.hooks import RoundSummary
from lightning_fedprune.protocol import ClientConfig, ClientPlan, ClientResult, RoundPayload, derive_seed
from lightning_fedprune.pruning.state import PruningState
from lightning_fedprune.wire import decode_state, dense_nbytes, encode_state

WEIGHTINGS = ("num_samples", "num_examples", "uniform")

# A checkpoint taken after a round holds the state after the server step, which is what a round-level
# checkpoint should hold; Lightning's generic warning about manual optimisation does not apply.
warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization", category=UserWarning)


class FederatedLightningModule(pl.LightningModule):
    """Trains any LightningModule (the *task*) by federated learning across simulated clients.

    Args:
        task: the user's LightningModule. Its ``training_step`` and ``configure_optimizers``
            define client training (a fresh client optimiser every round, as in FedAvg); its
            ``validation_step``/``test_step`` evaluate the global model — the *pruned* model
            clients get (pruned entries are zeroed during evaluation and the server's kept
            values restored afterwards).
        clients_per_round: cohort size sampled each round (seeded by ``seed`` and the round).
        local_steps: optimiser steps per client per round (give this or ``local_epochs``).
        local_epochs: passes over the client's data per round (default 1 if neither is given).
        server_optimizer: ``"sgd"`` (``server_lr=1`` is FedAvg), ``"sgdm"`` (FedAvgM) or ``"adam"`` (FedAdam).
        server_lr, server_momentum, server_betas, server_eps: server optimiser settings.
        weighting: aggregation weight of a client: ``"num_samples"`` (its dataset size, FedAvg),
            ``"num_examples"`` (examples processed this round) or ``"uniform"``.
        executor: ``"sequential"`` (default), ``"process"`` (persistent worker processes) or an
            :class:`~lightning_fedprune.executors.Executor` instance.
        num_workers: worker processes for ``executor="process"``.
        start_method: multiprocessing start method for ``executor="process"``.
        client_gradient_clip_val / client_gradient_clip_algorithm: gradient clipping inside client
            training (``"norm"`` or ``"value"``); the Trainer's own clipping does not apply to
            clients.
        compact_clients: let clients train physically smaller sub-models where the pruning
            pattern allows it (row/column patterns on ``nn.Linear``).
        seed: seeds cohorts and every client's local randomness (data order, dropout) as pure
            functions of ``(seed, round, client)``.
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
        start_method: str = "spawn",
        client_gradient_clip_val: float | None = None,
        client_gradient_clip_algorithm: str = "norm",
        compact_clients: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not isinstance(task, pl.LightningModule):
            raise TypeError(f"`task` must be a lightning LightningModule, got {type(task).__name__}.")
        if not is_overridden("training_step", task, pl.LightningModule):
            raise ValueError(f"`task` ({type(task).__name__}) does not implement `training_step`; clients cannot train it.")
        if not isinstance(clients_per_round, int) or isinstance(clients_per_round, bool) or clients_per_round < 1:
            raise ValueError(f"`clients_per_round` must be a positive integer, got {clients_per_round!r}.")
        if local_steps is None and local_epochs is None:
            local_epochs = 1
        validate_server_optimizer(server_optimizer, server_lr, server_momentum, server_betas, server_eps)
        if weighting not in WEIGHTINGS:
            raise ValueError(f"`weighting` must be one of {WEIGHTINGS}, got {weighting!r}.")
        if not isinstance(executor, Executor) and executor not in EXECUTORS:
            raise ValueError(f"`executor` must be one of {EXECUTORS} or an Executor instance, got {executor!r}.")
        if not isinstance(seed, int):
            raise ValueError(f"`seed` must be an integer, got {seed!r}.")
        self.client_config = ClientConfig(
            local_steps=local_steps,
            local_epochs=local_epochs,
            gradient_clip_val=client_gradient_clip_val,
            gradient_clip_algorithm=client_gradient_clip_algorithm,
            compact=compact_clients,
        )
        self.executor = make_executor(executor, num_workers=num_workers, start_method=start_method)
        self.save_hyperparameters(ignore=["task", "executor"])
        self.automatic_optimization = False
        self.task = task
        self.clients_per_round = clients_per_round
        self.server_optimizer_name = server_optimizer
        self.server_lr = server_lr
        self.server_momentum = server_momentum
        self.server_betas = tuple(server_betas)
        self.server_eps = server_eps
        self.weighting = weighting
        self.seed = seed
        self.pruning = PruningState()
        self.last_summary: RoundSummary | None = None
        self._executor_ready = False
        self._stash: dict[str, Tensor] = {}
        self._param_names, self._buffer_names = state_names(task)

    # ------------------------------------------------------------------ convenience
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

    # ------------------------------------------------------------------ setup / teardown
    def setup(self, stage: str) -> None:
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

    def on_fit_start(self) -> None:
        self.executor.setup(self.task, self.trainer.datamodule, self.client_config, self.weighting)
        self._executor_ready = True
        self._delegate("on_fit_start")

    def on_fit_end(self) -> None:
        self._delegate("on_fit_end")

    def teardown(self, stage: str) -> None:
        if stage == "fit" and self._executor_ready:
            self.executor.teardown()
            self._executor_ready = False
        self._delegate("teardown", stage)

    def configure_callbacks(self) -> list[pl.Callback]:
        # Lightning skips `teardown` when fit raises; this callback's `on_exception` stops the executor then
        return [ExecutorTeardown()]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return make_server_optimizer(
            self.global_params().values(), self.server_optimizer_name, self.server_lr,
            self.server_momentum, self.server_betas, self.server_eps,
        )

    # ------------------------------------------------------------------ the round
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        start = time.perf_counter()
        rnd = int(self.global_step)
        if int(batch["round"]) != rnd:
            raise RuntimeError(f"cohort for round {int(batch['round'])} arrived at round {rnd}")
        cohort = [int(c) for c in batch["clients"].tolist()]
        self._call_fed_hook("on_fed_round_start", rnd, cohort)

        payload = self.build_payload(rnd)
        plans = [ClientPlan(cid, rnd, derive_seed(self.seed, rnd, cid)) for cid in cohort]
        results = self.executor.run(payload, plans, on_result=lambda r: self._call_fed_hook("on_fed_client_result", r))

        for r in results:
            if r.ok and r.payload is not None:
                r.state = decode_state(r.payload, payload.masks)
        ok = [r for r in results if r.ok]
        avg = self._average(ok)
        if avg is None and ok:  # some client sent NaN/Inf values: find it, leave it out
            for r in ok:
                r.check_finite()
            ok = [r for r in results if r.ok]
            avg = self._average(ok)
            if avg is None and ok:  # finite clients, non-finite average (overflow): skip the update
                for r in ok:
                    r.error = "the weighted average of the cohort's updates is not finite (overflow)"
                ok = []
        failed = [r for r in results if not r.ok]
        for r in failed:
            first_line = (r.error or "").strip().splitlines()[0] if r.error else "unknown error"
            warnings.warn(f"round {rnd}: client {r.client_id} failed and is left out of the aggregate: {first_line}", stacklevel=2)
        summary = RoundSummary(round=rnd, cohort=cohort, clients_ok=len(ok), clients_failed=len(failed))
        summary.bytes_down = payload.encoded.nbytes * len(plans)
        summary.bytes_up = sum(r.bytes_up for r in results)
        summary.dense_bytes = 2 * dense_nbytes(payload.state) * len(plans)
        optimizer = self.optimizers()
        if ok:
            summary.total_weight = float(sum(r.weight for r in ok))
            summary.train_loss = float(sum(r.loss * r.weight for r in ok) / summary.total_weight)
            summary.metrics = self._aggregate_metrics(ok)
            summary.pseudo_gradient = self._server_step(optimizer, avg)
        else:
            warnings.warn(f"round {rnd}: all {len(results)} clients failed; the global model is left unchanged.", stacklevel=2)
            for p in self.global_params().values():
                p.grad = None
            optimizer.step()  # no parameter has a gradient: nothing changes, the round is still counted
        self._call_fed_hook("on_fed_after_aggregate", summary)
        summary.seconds = time.perf_counter() - start
        self._log_round(summary, ok)
        self.last_summary = summary
        self._call_fed_hook("on_fed_round_end", summary)

    def build_payload(self, rnd: int) -> RoundPayload:
        """The broadcast of round ``rnd``: global weights with pruned entries zeroed, plus masks."""
        masks = self.pruning.masks
        state: dict[str, Tensor] = {}
        for name, p in self.global_params().items():
            t = p.detach()
            state[name] = t.masked_fill(~masks[name], 0) if name in masks else t
        for name, b in self.global_buffers().items():
            state[name] = b.detach()
        max_rounds = self.trainer.max_steps if self._trainer is not None else -1
        patterns = dict(self.pruning.patterns)
        encoded = encode_state(state, masks, patterns, send_index=True)
        return RoundPayload(round=rnd, state=state, masks=dict(masks), patterns=patterns, max_rounds=max_rounds,
                            encoded=encoded)

    def _average(self, ok: list[ClientResult]) -> dict[str, Tensor] | None:
        """Weighted average of the healthy results, or None if it is not finite.

        A NaN/Inf in any client makes the weighted sum non-finite, so one cheap check of the
        average (a sum per tensor; the exact scan only if that sum is not finite) replaces a
        scan of every client's every tensor.
        """
        if not ok:
            return None
        avg = weighted_average(ok, self._param_names + self._buffer_names)
        for t in avg.values():
            if t.is_floating_point() and not math.isfinite(float(t.sum())) and not bool(torch.isfinite(t).all()):
                return None
        return avg

    def _server_step(self, optimizer: Any, avg: dict[str, Tensor]) -> dict[str, Tensor]:
        masks = self.pruning.masks
        params = self.global_params()
        pseudo: dict[str, Tensor] = {}
        with torch.no_grad():
            if is_plain_fedavg(optimizer.optimizer):
                for name, p in params.items():
                    new = avg[name]
                    if name in masks:
                        new = torch.where(masks[name], new, p)
                    pseudo[name] = p - new
                    p.copy_(new)
                    p.grad = None
                optimizer.step()  # counts the round; no gradients, so it changes nothing
            else:
                kept_values = {}
                for name, p in params.items():
                    g = p - avg[name]
                    if name in masks:
                        g.mul_(masks[name])
                        kept_values[name] = p.detach().clone()
                    pseudo[name] = g
                    p.grad = g.clone()
                optimizer.step()
                for name, old in kept_values.items():
                    p = params[name]
                    p.copy_(torch.where(masks[name], p, old))
                for p in params.values():
                    p.grad = None
            for name, b in self.global_buffers().items():
                b.copy_(avg[name])
        return pseudo

    def _aggregate_metrics(self, ok: list[ClientResult]) -> dict[str, float]:
        sums: dict[str, float] = {}
        weights: dict[str, float] = {}
        for r in ok:
            for name, value in r.metrics.items():
                sums[name] = sums.get(name, 0.0) + value * r.weight
                weights[name] = weights.get(name, 0.0) + r.weight
        return {name: sums[name] / weights[name] for name in sums if weights[name] > 0}

    def _log_round(self, summary: RoundSummary, ok: list[ClientResult]) -> None:
        log = dict(on_step=True, on_epoch=False, batch_size=1)
        if ok:
            self.log("round/train_loss", summary.train_loss, prog_bar=True, **log)
        self.log("round/clients_ok", float(summary.clients_ok), **log)
        self.log("round/clients_failed", float(summary.clients_failed), **log)
        self.log("round/seconds", summary.seconds, **log)
        self.log("comm/bytes_down", float(summary.bytes_down), **log)
        self.log("comm/bytes_up", float(summary.bytes_up), **log)
        self.log("comm/dense_bytes", float(summary.dense_bytes), **log)
        if summary.dense_bytes:
            self.log("comm/ratio", (summary.bytes_down + summary.bytes_up) / summary.dense_bytes, **log)
        options: dict[str, dict[str, Any]] = {}
        for r in ok:
            options.update(r.log_options)
        for name, value in summary.metrics.items():
            self.log(name, value, prog_bar=options.get(name, {}).get("prog_bar", False), **log)

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

    def on_validation_epoch_start(self) -> None:
        self._mask_for_eval()
        self._delegate("on_validation_epoch_start")

    def on_validation_epoch_end(self) -> None:
        try:
            self._delegate("on_validation_epoch_end")
        finally:
            self._unmask_after_eval()  # before ModelCheckpoint's on_validation_end saves the server state

    def on_test_epoch_start(self) -> None:
        self._mask_for_eval()
        self._delegate("on_test_epoch_start")

    def on_test_epoch_end(self) -> None:
        try:
            self._delegate("on_test_epoch_end")
        finally:
            self._unmask_after_eval()

    def on_predict_epoch_start(self) -> None:
        self._mask_for_eval()

    def on_predict_epoch_end(self) -> None:
        self._unmask_after_eval()

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["fedprune"] = {"version": 1, "pruning": self.pruning.state_dict()}
        self.task.on_save_checkpoint(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("fedprune")
        if state is not None:
            self.pruning.load_state_dict(state["pruning"])
        self.task.on_load_checkpoint(checkpoint)
