"""Drop-in behaviours beyond the one-client conformance suite: optimisers built in ``__init__`` with
compact clients and several clients, validation every N rounds, evaluation hooks, predict, the client
trainer's error for attributes without a client meaning."""

from __future__ import annotations

import pytest
import torch
from helpers import FreshOptimizerTask, checkpoint_and_stop, GaussianMixtureDataset, InitOptimizerTask, MLPClassifier, params_of, quiet_trainer
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint

from lightning_fedprune import FederatedDataModule, FederatedLightningModule
from lightning_fedprune.callbacks import SparsityRampCallback


def _fit(task_cls, pattern="row", executor="sequential", rounds=4, tmp_path=None, ckpt_path=None, stop_at=None):
    torch.manual_seed(0)
    task = task_cls(in_dim=16, hidden=32, num_classes=4, lr=0.1, momentum=0.9, weight_decay=1e-3)
    dm = FederatedDataModule(GaussianMixtureDataset(240, dim=16, num_classes=4), partition="dirichlet", num_clients=6,
                             alpha=0.5, batch_size=8)
    fed = FederatedLightningModule(task, clients_per_round=3, local_steps=3, executor=executor, num_workers=2)
    callbacks = [SparsityRampCallback(target_sparsity=0.5, start_round=1, pattern=pattern,
                                      parameters=r"body\..*\.weight")]
    extra, kw = checkpoint_and_stop(tmp_path, stop_at)
    callbacks += extra
    trainer = quiet_trainer(max_steps=rounds, callbacks=callbacks, **kw)
    trainer.fit(fed, datamodule=dm, ckpt_path=ckpt_path)
    return fed, trainer


@pytest.mark.parametrize("pattern", ["row", "column"])
def test_optimizer_built_in_init_trains_compact_layers_like_a_fresh_one(pattern):
    """The issue: an optimiser built in __init__ was shared by every client and round, and compacted
    layers got zero updates. Now it equals an optimiser built in configure_optimizers, bit for bit."""
    init_fed, _ = _fit(InitOptimizerTask, pattern)
    fresh_fed, _ = _fit(FreshOptimizerTask, pattern)
    start = params_of(MLPClassifier(in_dim=16, hidden=32, num_classes=4))
    for name, value in fresh_fed.task.state_dict().items():
        assert torch.equal(init_fed.task.state_dict()[name], value), name
    # the compacted layers really trained after pruning began (kept entries moved since round 1)
    mask = init_fed.masks["body.0.weight"]
    assert not torch.equal(init_fed.task.body[0].weight[mask], start["body.0.weight"][mask])
    # the server's task never took an optimiser step: the template keeps no state, the schedule moved on
    assert len(init_fed.task.opt.state) == 0
    assert init_fed.task.opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.9 ** 4)


def test_optimizer_built_in_init_agrees_across_executors_and_resume(tmp_path):
    seq, _ = _fit(InitOptimizerTask)
    proc, _ = _fit(InitOptimizerTask, executor="process")
    for name, value in seq.task.state_dict().items():
        assert torch.equal(proc.task.state_dict()[name], value), name
    _fit(InitOptimizerTask, tmp_path=tmp_path, stop_at=2)
    resumed, _ = _fit(InitOptimizerTask, ckpt_path=str(tmp_path / "step=2.ckpt"))
    for name, value in seq.task.state_dict().items():
        assert torch.equal(resumed.task.state_dict()[name], value), name
    assert resumed.task.opt.param_groups[0]["lr"] == pytest.approx(seq.task.opt.param_groups[0]["lr"])


def test_val_check_interval_counts_rounds_for_early_stopping_and_checkpoints(tmp_path):
    validated = []

    class Count(Callback):
        def on_validation_end(self, trainer, pl_module):
            validated.append(trainer.global_step)

    torch.manual_seed(0)
    dm = FederatedDataModule(GaussianMixtureDataset(200, dim=8, num_classes=3),
                             val_dataset=GaussianMixtureDataset(60, dim=8, num_classes=3, seed=2), num_clients=4,
                             batch_size=10)
    fed = FederatedLightningModule(MLPClassifier(in_dim=8, hidden=16, num_classes=3, lr=0.1), clients_per_round=2,
                                   local_steps=2)
    ckpt = ModelCheckpoint(dirpath=tmp_path, monitor="val/loss", save_top_k=3, filename="{step}")
    stop = EarlyStopping(monitor="val/loss", patience=1, min_delta=100.0)  # no round improves by 100: stops
    trainer = quiet_trainer(max_steps=30, val_check_interval=4, callbacks=[Count(), ckpt, stop],
                            enable_checkpointing=True)
    trainer.fit(fed, datamodule=dm)
    assert validated == [4, 8]  # every 4 rounds, and EarlyStopping acted on the second validation
    assert trainer.global_step == 8 and stop.stopped_epoch > 0
    assert len(list(tmp_path.glob("*.ckpt"))) == 2

    validated.clear()
    dm.rounds_per_epoch = 3  # an epoch of 3 rounds: check_val_every_n_epoch=2 validates every 6 rounds
    fed = FederatedLightningModule(MLPClassifier(in_dim=8, hidden=16, num_classes=3, lr=0.1), clients_per_round=2,
                                   local_steps=2)
    quiet_trainer(max_steps=12, check_val_every_n_epoch=2, callbacks=[Count()]).fit(fed, datamodule=dm)
    assert validated == [6, 12]


class EvalHooks(MLPClassifier):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.calls: list[str] = []

    def predict_step(self, batch, batch_idx):
        return self(batch[0]).argmax(-1)


for _hook in ("on_test_start", "on_test_epoch_start", "on_test_batch_start", "on_test_batch_end", "on_test_epoch_end",
              "on_test_end", "on_predict_start", "on_predict_epoch_start", "on_predict_batch_start",
              "on_predict_batch_end", "on_predict_epoch_end", "on_predict_end", "on_before_batch_transfer",
              "on_after_batch_transfer"):
    def _make(name):
        def hook(self, *args, **kwargs):
            self.calls.append(name)
            return getattr(MLPClassifier, name)(self, *args, **kwargs)
        return hook
    setattr(EvalHooks, _hook, _make(_hook))


def test_test_and_predict_run_the_tasks_hooks_on_the_global_model():
    dm = FederatedDataModule(GaussianMixtureDataset(80, dim=8, num_classes=3), num_clients=2, batch_size=20,
                             test_dataset=GaussianMixtureDataset(40, dim=8, num_classes=3, seed=4),
                             predict_dataset=GaussianMixtureDataset(30, dim=8, num_classes=3, seed=5))
    task = EvalHooks(in_dim=8, hidden=16, num_classes=3)
    fed = FederatedLightningModule(task, clients_per_round=2, local_steps=1)
    trainer = quiet_trainer(max_steps=2)
    trainer.fit(fed, datamodule=dm)
    assert task.calls == []  # training batch transfers are the cohort's, not the task's
    trainer.test(fed, datamodule=dm, verbose=False)
    assert task.calls[:3] == ["on_test_start", "on_test_epoch_start", "on_before_batch_transfer"]
    assert task.calls[-2:] == ["on_test_epoch_end", "on_test_end"]
    task.calls.clear()
    predictions = trainer.predict(fed, datamodule=dm)
    assert sum(len(p) for p in predictions) == 30
    assert {"on_predict_start", "on_predict_epoch_start", "on_predict_batch_start", "on_predict_batch_end",
            "on_predict_epoch_end", "on_predict_end"} <= set(task.calls)
    expected = task(dm.predict_dataset.x).argmax(-1)
    assert torch.equal(torch.cat(predictions), expected)


def test_predict_without_a_predict_dataset_names_it():
    dm = FederatedDataModule(GaussianMixtureDataset(40, dim=8, num_classes=3), num_clients=2, batch_size=20)
    fed = FederatedLightningModule(MLPClassifier(in_dim=8, hidden=16, num_classes=3), clients_per_round=1)
    with pytest.raises(ValueError, match="predict_dataset"):
        quiet_trainer().predict(fed, datamodule=dm)


def test_client_trainer_attributes_without_a_client_meaning_are_named():
    class Reads(MLPClassifier):
        def training_step(self, batch, batch_idx):
            return self.trainer.strategy

    fed = FederatedLightningModule(Reads(in_dim=8, hidden=16, num_classes=3), clients_per_round=1, local_steps=1)
    dm = FederatedDataModule(GaussianMixtureDataset(40, dim=8, num_classes=3), num_clients=1, batch_size=20)
    with pytest.warns(UserWarning), pytest.raises(RuntimeError, match=r"(?s)self.trainer.strategy.*no meaning.*"
                                                                      r"Available: global_step"):
        quiet_trainer(max_steps=1).fit(fed, datamodule=dm)


def test_task_attributes_are_visible_through_the_wrapper():
    task = MLPClassifier(in_dim=8, hidden=16, num_classes=3)
    fed = FederatedLightningModule(task, clients_per_round=1)
    assert fed.body is task.body and fed.head is task.head  # e.g. for the task's own callbacks
    with pytest.raises(AttributeError):
        fed.no_such_attribute
