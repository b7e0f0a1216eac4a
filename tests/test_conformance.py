"""Differential drop-in conformance: the same LightningModule under a plain Trainer and under
FederatedLightningModule with one client, full participation, one local epoch per round and server
SGD with lr 1 — where federated training is the same computation as centralised training.

Everything observable is compared: weights (exact), hooks and their order, logged names and values
(callback_metrics and the CSV logger), learning rates seen by LearningRateMonitor, EarlyStopping and
ModelCheckpoint decisions, the Trainer attributes the task reads during training. The differences
that remain are the documented ones (docs/dropin.md, "What differs"), each asserted here as such.
"""

from __future__ import annotations

import copy
import csv
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import lightning.pytorch as pl
import pytest
import torch
from conformance_tasks import (
    CALLS,
    AutoEncoder,
    Blobs,
    CallbacksStyle,
    ClipAccumulate,
    HydraStyle,
    LBFGSTask,
    OfflineTransformer,
    RecordedBoring,
    StepLogRecorder,
    TorchaudioStyle,
)
from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.demos.boring_classes import RandomDataset
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, Dataset

from lightning_fedprune import FederatedDataModule, FederatedLightningModule
from lightning_fedprune.federated.client import ClientTrainerView

FED_ONLY = re.compile(r"^(round/|comm/|prune/|lr-Server)")


@dataclass
class Pair:
    plain_task: pl.LightningModule
    fed_task: pl.LightningModule
    plain: pl.Trainer
    fed: pl.Trainer
    plain_calls: list[str]
    fed_calls: list[str]

    def csv(self, which: str, with_step: bool = False) -> dict[str, list[tuple[int, float]]]:
        """``{name: [(epoch, value), ...]}`` of the CSV logger, in row order (epoch -1 where a row has none,
        e.g. LearningRateMonitor's); ``with_step`` gives the step column instead of the epoch."""
        trainer = self.plain if which == "plain" else self.fed
        rows = list(csv.DictReader(open(Path(trainer.logger.log_dir) / "metrics.csv")))
        out: dict[str, list[tuple[int, float]]] = {}
        for row in rows:
            for name, value in row.items():
                if name not in ("epoch", "step") and value != "":
                    key = int(row["step"]) if with_step else int(row.get("epoch") or -1)
                    out.setdefault(name, []).append((key, float(value)))
        return out


def run_pair(tmp_path: Path, factory: Callable[[], pl.LightningModule], train: Dataset, val: Dataset | None, *,
             epochs: int = 3, batch_size: int = 12, callbacks: Callable[[], list] = lambda: [],
             trainer_kwargs: dict[str, Any] | None = None, fed_kwargs: dict[str, Any] | None = None) -> Pair:
    torch.manual_seed(0)
    plain_task = factory()
    fed_task = copy.deepcopy(plain_task)  # the same initial weights
    kw = dict(max_epochs=epochs, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
              log_every_n_steps=1, enable_checkpointing=False)
    kw.update(trainer_kwargs or {})
    CALLS.clear()
    plain = pl.Trainer(logger=CSVLogger(tmp_path, name="plain"), **{**kw, "callbacks": [LearningRateMonitor(), *callbacks()]})
    plain.fit(plain_task, DataLoader(train, batch_size=batch_size),
              DataLoader(val, batch_size=batch_size) if val is not None else None)
    plain_calls = list(CALLS)
    CALLS.clear()
    dm = FederatedDataModule(train, val_dataset=val, num_clients=1, batch_size=batch_size, shuffle=False)
    fed_module = FederatedLightningModule(fed_task, clients_per_round=1, local_epochs=1, **(fed_kwargs or {}))
    fed = pl.Trainer(logger=CSVLogger(tmp_path, name="fed"), **{**kw, "callbacks": [LearningRateMonitor(), *callbacks()]})
    fed.fit(fed_module, datamodule=dm)
    return Pair(plain_task, fed_task, plain, fed, plain_calls, list(CALLS))


def assert_same_weights(pair: Pair, exact: bool = True) -> None:
    for (name, a), (_, b) in zip(pair.plain_task.state_dict().items(), pair.fed_task.state_dict().items()):
        if exact:
            assert torch.equal(a, b), (name, (a.float() - b.float()).abs().max())
        else:
            torch.testing.assert_close(a, b, msg=name)


def task_metrics(trainer: pl.Trainer) -> dict[str, float]:
    return {k: float(v) for k, v in trainer.callback_metrics.items() if not FED_ONLY.match(k)}


def _distinct(values: list[float]) -> list[float]:
    return [v for i, v in enumerate(values) if i == 0 or v != values[i - 1]]


def assert_epoch_level_logs_equal(pair: Pair, epochs: int) -> tuple[set[str], set[str]]:
    """The logger sees the same names. Names logged as often by both (epoch-level values, validation)
    match in epochs and values; names the plain Trainer logs per training batch are logged once per
    round (= epoch) by federation (documented: the Trainer step is a round). Learning rates are
    compared as the sequence of values they take (LearningRateMonitor's cadence follows the steps).
    Returns (names compared value by value, per-batch names)."""
    plain, fed = pair.csv("plain"), pair.csv("fed")
    fed_task_names = {n for n in fed if not FED_ONLY.match(n)}
    assert set(plain) == fed_task_names, (set(plain) ^ fed_task_names)
    same, step_level = set(), set()
    for name, rows in plain.items():
        if name.startswith("lr-"):
            if len(rows) == len(fed[name]):
                same.add(name)
            else:
                step_level.add(name)
            continue
        if len(rows) == len(fed[name]):
            same.add(name)
            assert [e for e, _ in fed[name]] == [e for e, _ in rows], name
            torch.testing.assert_close(torch.tensor([v for _, v in fed[name]]), torch.tensor([v for _, v in rows]),
                                       rtol=1e-5, atol=1e-6, msg=name)
        else:
            step_level.add(name)
            assert len(fed[name]) == epochs, (name, fed[name])
    return same, step_level


def _normalise_plain_order(calls: list[str]) -> list[str]:
    """Lightning runs the epoch-end validation before ``on_train_epoch_end``; a client's epoch ends
    before the server validates (documented), so move each ``on_train_epoch_end`` before its validation."""
    out = list(calls)
    i = 0
    while i < len(out):
        if out[i] == "on_train_epoch_end":
            j = i
            while j > 0 and out[j - 1] != "on_train_batch_end":
                j -= 1
            out.insert(j, out.pop(i))
        i += 1
    return out


# ------------------------------------------------------------------ Lightning's BoringModel, every hook recorded
def test_boring_model_hooks_weights_logs_and_lr(tmp_path):
    pair = run_pair(tmp_path, RecordedBoring, RandomDataset(32, 48), RandomDataset(32, 16), epochs=3)
    assert_same_weights(pair)
    # hooks and their order: the same, but for the two documented differences
    fed = list(pair.fed_calls)
    assert fed.count("configure_optimizers") == 2  # the server's template, then the client's replica
    del fed[fed.index("configure_optimizers", fed.index("configure_optimizers") + 1)]  # the client's call
    assert fed == _normalise_plain_order(pair.plain_calls)
    # LearningRateMonitor: the task's StepLR under Lightning's name, per epoch (the server's optimiser is the
    # strategy's, not a Trainer optimiser: it is not reported as one)
    plain_lr, fed_lr = pair.csv("plain")["lr-SGD"], pair.csv("fed")["lr-SGD"]
    assert fed_lr == plain_lr and [round(v, 6) for _, v in plain_lr] == [0.1, 0.01, 0.001]
    assert not any(key.startswith("lr-Server") for key in pair.csv("fed"))


# ------------------------------------------------------------------ torchaudio's recipe: optimiser built in __init__
def test_torchaudio_style_optimizer_in_init_manual_all_gather_is_last_batch(tmp_path):
    pair = run_pair(tmp_path, TorchaudioStyle, Blobs(48), Blobs(16, seed=1), epochs=4)
    assert_same_weights(pair)
    epoch_level, step_level = assert_epoch_level_logs_equal(pair, epochs=4)
    assert {"Losses/train_loss_epoch", "Gathered batch size_epoch", "Losses/val_loss_epoch", "Losses/val_loss_step",
            "lr-SGD"} <= epoch_level
    assert {"Losses/train_loss_step", "Gathered batch size_step"} <= step_level
    # the schedule stepped by the task itself (manual, on is_last_batch) continues across rounds
    lrs = [v for _, v in pair.csv("fed")["lr-SGD"]]
    assert lrs == [v for _, v in pair.csv("plain")["lr-SGD"]] and len(set(lrs)) > 2
    assert set(task_metrics(pair.fed)) == set(task_metrics(pair.plain))


def test_all_gather_returns_what_lightning_returns(tmp_path):
    seen: dict[str, Any] = {}

    class Gather(TorchaudioStyle):
        def training_step(self, batch, batch_idx):
            seen.setdefault(self._where, []).append((self.all_gather(7), self.all_gather({"a": 1.5, "b": [2]})))
            return super().training_step(batch, batch_idx)

    def make():
        task = Gather()
        task._where = "plain" if "plain" not in seen else "fed"
        return task

    torch.manual_seed(0)
    plain_task = make()
    pl.Trainer(max_epochs=1, logger=False, enable_progress_bar=False, enable_checkpointing=False,
               enable_model_summary=False).fit(plain_task, DataLoader(Blobs(24), batch_size=12))
    fed_task = make()
    fed_task._where = "fed"
    pl.Trainer(max_epochs=1, logger=False, enable_progress_bar=False, enable_checkpointing=False,
               enable_model_summary=False).fit(
        FederatedLightningModule(fed_task, clients_per_round=1),
        datamodule=FederatedDataModule(Blobs(24), num_clients=1, batch_size=12, shuffle=False))
    (p_int, p_dict), (f_int, f_dict) = seen["plain"][0], seen["fed"][0]
    for a, b in ((p_int, f_int), (p_dict["a"], f_dict["a"]), (p_dict["b"][0], f_dict["b"][0])):
        assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
        assert a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)


def test_optimizer_built_in_init_is_fresh_for_every_client_and_round():
    """Adam built in __init__: every client starts from step 0 (the issue saw 2, 4, ... 12 shared across clients)."""
    task = TorchaudioStyle(adam=True)
    dm = FederatedDataModule(Blobs(48), num_clients=4, batch_size=6, shuffle=False)  # 2 batches per client
    fed = FederatedLightningModule(task, clients_per_round=2, local_epochs=1)
    pl.Trainer(max_steps=3, logger=False, enable_progress_bar=False, enable_checkpointing=False,
               enable_model_summary=False).fit(fed, datamodule=dm)
    assert task.adam_steps == []  # the server's task never trains
    # the template optimiser on the server holds no state either (only the schedule's hyper-parameters)
    assert len(task.optimizer.state) == 0


# ------------------------------------------------------------------ lightning-hydra-template: torchmetrics objects
def test_hydra_style_metrics_objects_and_plateau_scheduler(tmp_path):
    pair = run_pair(tmp_path, HydraStyle, Blobs(48), Blobs(16, seed=1), epochs=4)
    assert_same_weights(pair)
    epoch_level, _ = assert_epoch_level_logs_equal(pair, epochs=4)
    assert {"train/loss", "train/acc", "val/loss", "val/acc", "val/acc_best", "lr-SGD"} <= epoch_level
    plain, fed = task_metrics(pair.plain), task_metrics(pair.fed)
    assert set(plain) == set(fed)
    for name in plain:
        assert fed[name] == pytest.approx(plain[name], rel=1e-5, abs=1e-6), name
    # ReduceLROnPlateau on val/loss stepped from the server's validation, as Lightning steps it
    assert len({v for _, v in pair.csv("plain")["lr-SGD"]}) > 1


def test_metric_objects_are_reset_per_client_and_weighted_across_the_cohort():
    """Two clients of different sizes, several rounds: the logged train/loss is the exact mean over the
    round's examples (a MeanMetric that is never reset drifts, as the issue reported)."""

    class Probe(pl.Callback):
        def __init__(self):
            self.logged, self.truth = [], []

        def on_fed_client_result(self, trainer, pl_module, result):
            self.truth.append((result.round, result.logged["train/loss"].value, result.num_examples))

        def on_fed_round_end(self, trainer, pl_module, summary):
            self.logged.append(summary.metrics["train/loss"])  # what the round logs (on_epoch: at epoch end)

    keys = [0] * 30 + [1] * 12
    train = Blobs(42)
    train.partition_keys = keys
    probe = Probe()
    torch.manual_seed(0)
    fed = FederatedLightningModule(HydraStyle(lr=0.05), clients_per_round=2, local_epochs=1)
    dm = FederatedDataModule(train, val_dataset=Blobs(16, seed=1), partition="by_key", batch_size=8, shuffle=True)
    pl.Trainer(max_steps=4, logger=False, enable_progress_bar=False, enable_checkpointing=False,
               enable_model_summary=False, callbacks=[probe]).fit(fed, datamodule=dm)
    for r in range(4):
        clients = [(v, n) for rr, v, n in probe.truth if rr == r]
        expected = sum(v * n for v, n in clients) / sum(n for _, n in clients)
        assert probe.logged[r] == pytest.approx(expected, rel=1e-6)
    # each client's value is its own epoch mean: recompute it from scratch for round 3's first client
    losses = [v for rr, v, _ in probe.truth]
    assert max(losses) < 2.0 and len(set(round(v, 6) for v in losses)) == len(losses)


# ------------------------------------------------------------------ configure_callbacks, X_step/X_epoch, BatchNorm
def test_configure_callbacks_step_epoch_names_batchnorm_and_trainer_attributes(tmp_path):
    pair = run_pair(tmp_path, CallbacksStyle, Blobs(48), Blobs(16, seed=1), epochs=5)
    assert_same_weights(pair)  # BatchNorm running stats included
    epoch_level, step_level = assert_epoch_level_logs_equal(pair, epochs=pair.plain.current_epoch)
    assert {"train/loss_epoch", "val/loss", "trainer/global_step"} <= epoch_level
    assert "train/loss_step" in step_level and "lr-SGD" in step_level
    # the task's callbacks were attached and acted alike: EarlyStopping stopped at the same epoch
    for trainer in (pair.plain, pair.fed):
        assert any(isinstance(cb, StepLogRecorder) for cb in trainer.callbacks)
    stops = [next(cb for cb in t.callbacks if isinstance(cb, EarlyStopping)).stopped_epoch for t in (pair.plain, pair.fed)]
    assert stops[0] == stops[1] > 0
    assert pair.plain.current_epoch == pair.fed.current_epoch < 5
    # what the task read from self.trainer during training: the same numbers, batch by batch
    assert pair.fed_task.seen == [] and len(pair.plain_task.seen) > 0  # the server's task never trains
    # per-step scheduler with frequency 2 carried across rounds: the lr at each round's start is the
    # plain run's lr at the first batch of that epoch
    plain_lr = dict(pair.csv("plain", with_step=True)["lr-SGD"])  # {step: lr}, 4 batches per epoch
    fed_lr = [v for _, v in pair.csv("fed")["lr-SGD"]]
    assert fed_lr == pytest.approx([plain_lr[4 * epoch] for epoch in range(len(fed_lr))])
    assert len(set(fed_lr)) == len(fed_lr)


def test_trainer_attributes_seen_by_the_client_equal_a_plain_trainer(tmp_path):
    seen: dict[str, list] = {"plain": [], "fed": []}

    class Reader(CallbacksStyle):
        def training_step(self, batch, batch_idx):
            t = self.trainer
            seen["fed" if isinstance(t, ClientTrainerView) else "plain"].append((t.global_step, t.current_epoch, t.num_training_batches,
                                     t.estimated_stepping_batches, t.is_last_batch, t.max_epochs, t.max_steps,
                                     t.world_size, t.precision, t.accumulate_grad_batches, t.is_global_zero,
                                     len(t.optimizers), len(t.lr_scheduler_configs), t.training))
            return super().training_step(batch, batch_idx)

        def configure_callbacks(self):
            return []

    pair = run_pair(tmp_path, Reader, Blobs(40), None, epochs=3, batch_size=12)
    assert seen["plain"] and seen["plain"] == seen["fed"]
    assert_same_weights(pair)


# ------------------------------------------------------------------ Trainer(gradient_clip_val, accumulate_grad_batches)
def test_trainer_clipping_and_accumulation_apply_inside_clients(tmp_path):
    pair = run_pair(tmp_path, ClipAccumulate, Blobs(60), Blobs(16, seed=1), epochs=3, batch_size=8,
                    trainer_kwargs=dict(gradient_clip_val=0.05, accumulate_grad_batches=3))
    assert_same_weights(pair)
    assert_epoch_level_logs_equal(pair, epochs=3)
    fed_module = pair.fed.lightning_module
    assert fed_module.client_config.gradient_clip_val == 0.05
    assert fed_module.client_config.accumulate_grad_batches == 3
    # without clipping the result differs (the clip was really applied)
    other = run_pair(tmp_path / "noclip", ClipAccumulate, Blobs(60), None, epochs=3, batch_size=8,
                     trainer_kwargs=dict(accumulate_grad_batches=3))
    assert not torch.equal(other.fed_task.net[0].weight, pair.fed_task.net[0].weight)


def test_trainer_clipping_with_a_manual_task_fails_like_lightning(tmp_path):
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    for make_trainer in (lambda: pl.Trainer(gradient_clip_val=1.0, max_epochs=1, logger=False),
                         lambda: pl.Trainer(accumulate_grad_batches=2, max_epochs=1, logger=False)):
        with pytest.raises(MisconfigurationException):
            make_trainer().fit(TorchaudioStyle(), DataLoader(Blobs(24), batch_size=12))
        with pytest.raises(MisconfigurationException, match="manual optimisation"):
            make_trainer().fit(FederatedLightningModule(TorchaudioStyle(), clients_per_round=1),
                               datamodule=FederatedDataModule(Blobs(24), num_clients=1, batch_size=12))


def test_clip_given_twice_with_different_values_is_refused():
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    fed = FederatedLightningModule(ClipAccumulate(), clients_per_round=1, client_gradient_clip_val=0.5)
    with pytest.raises(MisconfigurationException, match="disagree"):
        pl.Trainer(gradient_clip_val=1.0, max_epochs=1, logger=False).fit(
            fed, datamodule=FederatedDataModule(Blobs(24), num_clients=1, batch_size=12))


def test_an_optimiser_that_reevaluates_the_closure_gets_it(tmp_path):
    calls = {"plain": 0, "fed": 0}

    class Counted(LBFGSTask):
        def training_step(self, batch, batch_idx):
            calls["fed" if isinstance(self.trainer, ClientTrainerView) else "plain"] += 1
            return super().training_step(batch, batch_idx)

    pair = run_pair(tmp_path, Counted, Blobs(48), None, epochs=2)
    assert_same_weights(pair)
    assert calls["plain"] == calls["fed"] > 2 * 4  # LBFGS called the closure more than once per batch


# ------------------------------------------------------------------ precision
def test_bf16_mixed_precision_runs_the_client_like_lightning(tmp_path):
    pair = run_pair(tmp_path, ClipAccumulate, Blobs(48), None, epochs=2, trainer_kwargs=dict(precision="bf16-mixed"))
    assert_same_weights(pair)
    reference = run_pair(tmp_path / "fp32", ClipAccumulate, Blobs(48), None, epochs=2)
    assert not torch.equal(reference.fed_task.net[0].weight, pair.fed_task.net[0].weight)  # autocast changed numerics

    seen = []

    class Precise(ClipAccumulate):
        def training_step(self, batch, batch_idx):
            seen.append((self.trainer.precision, self(batch[0]).dtype))
            return super().training_step(batch, batch_idx)

    pl.Trainer(precision="bf16-mixed", max_epochs=1, logger=False, enable_progress_bar=False,
               enable_checkpointing=False, enable_model_summary=False).fit(
        FederatedLightningModule(Precise(), clients_per_round=1),
        datamodule=FederatedDataModule(Blobs(24), num_clients=1, batch_size=12))
    assert set(seen) == {("bf16-mixed", torch.bfloat16)}


def test_double_precision_client(tmp_path):
    pair = run_pair(tmp_path, ClipAccumulate, Blobs(48), None, epochs=2, trainer_kwargs=dict(precision="64-true"))
    assert pair.fed_task.net[0].weight.dtype == torch.float64
    assert_same_weights(pair)


# ------------------------------------------------------------------ Adam, checkpoints and decisions
def test_autoencoder_adam_differs_only_by_fresh_optimizer_state(tmp_path):
    """Adam's moments are fresh for every client each round (FedAvg): with one local epoch the first
    round equals centralised training; later rounds differ (documented)."""
    one = run_pair(tmp_path / "one", AutoEncoder, Blobs(48), Blobs(16, seed=1), epochs=1)
    assert_same_weights(one)
    three = run_pair(tmp_path / "three", AutoEncoder, Blobs(48), Blobs(16, seed=1), epochs=3)
    assert not torch.equal(three.plain_task.encoder[0].weight, three.fed_task.encoder[0].weight)
    assert set(task_metrics(three.fed)) == set(task_metrics(three.plain)) == {"train_loss", "val_loss", "lr-Adam"}


def test_model_checkpoint_top_k_and_last_decisions_match(tmp_path):
    def callbacks():
        return [ModelCheckpoint(dirpath=None, monitor="val/loss", save_top_k=2, save_last=True,
                                filename="{epoch}")]

    pair = run_pair(tmp_path, HydraStyle, Blobs(48), Blobs(16, seed=1), epochs=5, callbacks=callbacks,
                    trainer_kwargs=dict(enable_checkpointing=True))
    ckpts = [next(cb for cb in t.callbacks if isinstance(cb, ModelCheckpoint)) for t in (pair.plain, pair.fed)]
    picked = [sorted(Path(p).name for p in cb.best_k_models) for cb in ckpts]
    assert picked[0] == picked[1] and len(picked[0]) == 2
    scores = [sorted(float(v) for v in cb.best_k_models.values()) for cb in ckpts]
    assert scores[0] == pytest.approx(scores[1], rel=1e-5)
    assert all(Path(cb.last_model_path).exists() for cb in ckpts)


def test_lightning_transformer_demo_runs_and_logs_like_lightning(tmp_path):
    class Tokens(Dataset):
        def __init__(self, n: int = 24, length: int = 12, vocab: int = 50) -> None:
            g = torch.Generator().manual_seed(0)
            self.data = torch.randint(0, vocab, (n, length + 1), generator=g)

        def __len__(self) -> int:
            return len(self.data)

        def __getitem__(self, i):
            return self.data[i, :-1], self.data[i, 1:]

    pair = run_pair(tmp_path, lambda: OfflineTransformer(vocab_size=50), Tokens(), None, epochs=2, batch_size=8)
    assert set(task_metrics(pair.fed)) == set(task_metrics(pair.plain))
    for (name, a), (_, b) in zip(pair.plain_task.state_dict().items(), pair.fed_task.state_dict().items()):
        assert a.shape == b.shape, name  # dropout draws differ (client randomness is seeded per round and client)
