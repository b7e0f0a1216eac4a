"""The federated engine: equivalences with plain PyTorch, resume, failures, errors, executors."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import (
    BNTask,
    FailingTask,
    GaussianMixtureDataset,
    ListOptTask,
    ManualTask,
    MLPClassifier,
    NoTrainingStep,
    PoisonTask,
    ScheduledTask,
    params_of,
    quiet_trainer,
)
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightning_fedprune import FederatedDataModule, FederatedLightningModule
from lightning_fedprune.federated.strategy import weighted_average
from lightning_fedprune.federated.data import dirichlet_partition, iid_partition, key_partition, sample_cohort


def _dm(n=64, num_clients=1, batch_size=None, **kw):
    ds = GaussianMixtureDataset(n, dim=8, num_classes=3, seed=3)
    kw.setdefault("partition", "iid")
    return FederatedDataModule(ds, num_clients=num_clients, batch_size=batch_size or n, shuffle=False, **kw)


def _task(**kw):
    torch.manual_seed(0)
    kw.setdefault("in_dim", 8)
    kw.setdefault("hidden", 16)
    kw.setdefault("num_classes", 3)
    return MLPClassifier(**kw)


# ------------------------------------------------------------------ equivalence with plain PyTorch
def test_one_client_one_step_equals_one_sgd_step_exactly():
    task = _task(lr=0.3)
    ref = copy.deepcopy(task)
    dm = _dm(n=48)
    fed = FederatedLightningModule(task, clients_per_round=1, local_steps=1, server_optimizer="sgd", server_lr=1.0)
    quiet_trainer(max_steps=1).fit(fed, datamodule=dm)

    x, y = dm.train_dataset.x, dm.train_dataset.targets
    opt = torch.optim.SGD(ref.parameters(), lr=0.3)
    F.cross_entropy(ref(x), y).backward()
    opt.step()
    for (name, a), (_, b) in zip(fed.task.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(a, b), name
    assert not torch.equal(params_of(fed.task)["head.weight"], params_of(_task(lr=0.3))["head.weight"])


def test_n_clients_full_batch_gd_equals_centralised_gd_on_union():
    task = _task(lr=0.2)
    ref = copy.deepcopy(task)
    ds = GaussianMixtureDataset(90, dim=8, num_classes=3, seed=5)
    # unequal client sizes: by_key partition on index % 3 with a skew
    keys = [0 if i < 50 else 1 if i < 75 else 2 for i in range(90)]
    ds.partition_keys = keys
    dm = FederatedDataModule(ds, partition="by_key", batch_size=100, shuffle=False)
    fed = FederatedLightningModule(task, clients_per_round=3, local_steps=1)
    quiet_trainer(max_steps=1).fit(fed, datamodule=dm)
    assert dm.client_sizes == [50, 25, 15]

    opt = torch.optim.SGD(ref.parameters(), lr=0.2)
    F.cross_entropy(ref(ds.x), ds.targets).backward()  # mean over the union == size-weighted mean of client means
    opt.step()
    for (name, a), (_, b) in zip(fed.task.state_dict().items(), ref.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_step_scheduler_in_dict_config_matches_plain_loop():
    task = ScheduledTask(in_dim=8, hidden=16, num_classes=3, lr=0.4)
    ref = copy.deepcopy(task)
    dm = _dm(n=40)
    fed = FederatedLightningModule(task, clients_per_round=1, local_steps=3)
    quiet_trainer(max_steps=1).fit(fed, datamodule=dm)
    opt = torch.optim.SGD(ref.parameters(), lr=0.4)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, 0.5)
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(ref(dm.train_dataset.x), dm.train_dataset.targets).backward()
        opt.step()
        sched.step()
    for (name, a), (_, b) in zip(fed.task.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(a, b), name


def test_manual_optimisation_task_matches_automatic_and_logs():
    torch.manual_seed(0)
    manual = ManualTask(in_dim=8, hidden=16, num_classes=3, lr=0.4)
    auto = ScheduledTask(in_dim=8, hidden=16, num_classes=3, lr=0.4)
    auto.load_state_dict(manual.state_dict())
    fed_m = FederatedLightningModule(manual, clients_per_round=2, local_steps=3)
    fed_a = FederatedLightningModule(auto, clients_per_round=2, local_steps=3)
    tm = quiet_trainer(max_steps=2)
    tm.fit(fed_m, datamodule=_dm(n=40, num_clients=2))
    quiet_trainer(max_steps=2).fit(fed_a, datamodule=_dm(n=40, num_clients=2))
    for (name, a), (_, b) in zip(fed_m.task.state_dict().items(), fed_a.task.state_dict().items()):
        torch.testing.assert_close(a, b, msg=name)
    # client-side self.log values reach the Trainer, aggregated per round
    assert "manual/loss" in tm.callback_metrics
    assert tm.callback_metrics["manual/round"].item() == 1.0  # self.trainer.fed_round inside the client
    # self.trainer.global_step counts client optimiser steps in federated time: 3 in round 0, then 4, 5, 6
    assert tm.callback_metrics["manual/global_step"].item() == 5.0


def test_manual_task_with_clipping_runs_and_clips():
    torch.manual_seed(0)
    task = ManualTask(clip=1e-6, in_dim=8, hidden=16, num_classes=3, lr=1.0)
    before = params_of(task)
    fed = FederatedLightningModule(task, clients_per_round=1, local_steps=2)
    quiet_trainer(max_steps=1).fit(fed, datamodule=_dm(n=40))
    delta = max((fed.task.state_dict()[n] - before[n]).abs().max().item() for n in before)
    assert 0 < delta < 1e-5  # gradients clipped to a tiny norm


@pytest.mark.parametrize("task_cls", [ListOptTask, ScheduledTask, MLPClassifier])
def test_optimizer_config_forms(task_cls):
    task = task_cls(in_dim=8, hidden=16, num_classes=3)
    fed = FederatedLightningModule(task, clients_per_round=2, local_epochs=1)
    quiet_trainer(max_steps=2).fit(fed, datamodule=_dm(n=40, num_clients=4, batch_size=5))
    assert fed.last_summary.clients_ok == 2


@pytest.mark.parametrize("server_optimizer", ["sgdm", "adam"])
def test_server_optimizers_step_on_pseudo_gradient(server_optimizer):
    task = _task()
    ref_task = copy.deepcopy(task)
    fed = FederatedLightningModule(task, clients_per_round=1, local_steps=1, server_optimizer=server_optimizer, server_lr=0.5)
    quiet_trainer(max_steps=1).fit(fed, datamodule=_dm(n=32))
    # reference: client does one SGD step, server applies its optimiser to (w - w_client)
    client = copy.deepcopy(ref_task)
    opt = torch.optim.SGD(client.parameters(), lr=client.hparams.lr)
    F.cross_entropy(client(_dm(n=32).train_dataset.x), _dm(n=32).train_dataset.targets).backward()
    opt.step()
    params = list(ref_task.parameters())
    server = (torch.optim.SGD(params, lr=0.5, momentum=0.9) if server_optimizer == "sgdm"
              else torch.optim.Adam(params, lr=0.5, betas=(0.9, 0.99), eps=1e-3))
    for p, c in zip(params, client.parameters()):
        p.grad = (p - c).detach()
    server.step()
    for (name, a), (_, b) in zip(fed.task.state_dict().items(), ref_task.state_dict().items()):
        torch.testing.assert_close(a, b, msg=name)


def test_buffers_are_averaged():
    torch.manual_seed(0)
    task = BNTask(dim=8, num_classes=3)
    fed = FederatedLightningModule(task, clients_per_round=3, local_steps=1)
    dm = _dm(n=60, num_clients=3, batch_size=20)
    quiet_trainer(max_steps=1).fit(fed, datamodule=dm)
    # reference: each client's BN running mean after one batch, weighted by size (equal here)
    means = []
    for c in range(3):
        t = BNTask(dim=8, num_classes=3)
        torch.manual_seed(0)
        t = BNTask(dim=8, num_classes=3)
        idx = dm.partitions[c]
        t.net(dm.train_dataset.x[idx])
        means.append(t.net[1].running_mean.clone())
    expected = sum(means) / 3
    torch.testing.assert_close(fed.task.net[1].running_mean, expected, rtol=1e-4, atol=1e-5)
    assert fed.task.net[1].num_batches_tracked.item() == 1


# ------------------------------------------------------------------ rounds, logging, hooks
class _Recorder(Callback):
    def __init__(self):
        self.events = []

    def on_fed_round_start(self, trainer, pl_module, round, cohort):
        self.events.append(("start", round, tuple(cohort)))

    def on_fed_client_result(self, trainer, pl_module, result):
        self.events.append(("client", result.round, result.client_id))

    def on_fed_after_aggregate(self, trainer, pl_module, summary):
        self.events.append(("aggregate", summary.round, summary.clients_ok))

    def on_fed_round_end(self, trainer, pl_module, summary):
        self.events.append(("end", summary.round, trainer.global_step))


def test_rounds_are_steps_hooks_and_logged_metrics():
    rec = _Recorder()
    dm = FederatedDataModule(GaussianMixtureDataset(200, dim=8, num_classes=3), partition="dirichlet", num_clients=10,
                             alpha=0.5, batch_size=8)
    fed = FederatedLightningModule(_task(), clients_per_round=3, local_steps=2, seed=7)
    trainer = quiet_trainer(max_steps=4, callbacks=[rec])
    trainer.fit(fed, datamodule=dm)
    assert trainer.global_step == 4
    starts = [e for e in rec.events if e[0] == "start"]
    assert [e[1] for e in starts] == [0, 1, 2, 3]
    for r, cohort in [(e[1], e[2]) for e in starts]:
        assert list(cohort) == sample_cohort(dm.population, 3, 7, r).tolist()
        assert len(set(cohort)) == 3
    kinds = [e[0] for e in rec.events[:6]]
    assert kinds == ["start", "client", "client", "client", "aggregate", "end"]
    for key in ["round/train_loss", "round/clients_ok", "round/clients_failed", "round/seconds", "train/loss"]:
        assert key in trainer.callback_metrics, key
    assert trainer.callback_metrics["round/clients_ok"].item() == 3


def test_validation_runs_task_validation_step_on_global_model():
    dm = FederatedDataModule(GaussianMixtureDataset(300, dim=8, num_classes=3), val_dataset=GaussianMixtureDataset(100, dim=8, num_classes=3, seed=9),
                             num_clients=5, batch_size=16)
    fed = FederatedLightningModule(_task(lr=0.2), clients_per_round=3, local_steps=5)
    trainer = quiet_trainer(max_steps=10, val_check_interval=5)
    trainer.fit(fed, datamodule=dm)
    assert trainer.callback_metrics["val/acc"].item() > 0.8
    res = trainer.validate(fed, datamodule=dm, verbose=False)
    assert res[0]["val/acc"] > 0.8


# ------------------------------------------------------------------ failures
def test_failing_and_nan_clients_are_excluded_and_reported():
    task = FailingTask(fail_clients=(0,), nan_clients=(1,), in_dim=8, hidden=16, num_classes=3)
    fed = FederatedLightningModule(task, clients_per_round=4, local_steps=1)
    trainer = quiet_trainer(max_steps=1)
    with pytest.warns(UserWarning) as record:
        trainer.fit(fed, datamodule=_dm(n=40, num_clients=4, batch_size=10))
    messages = [str(w.message) for w in record]
    assert any("client 0 failed" in m and "boom on client 0" in m for m in messages)
    assert any("client 1 failed" in m and "non-finite" in m for m in messages)
    assert trainer.callback_metrics["round/clients_failed"].item() == 2
    assert trainer.callback_metrics["round/clients_ok"].item() == 2
    assert all(torch.isfinite(p).all() for p in fed.task.parameters())


def _assert_fedavg_of_one_step(fed, init, dm, clients):
    """The global model equals the mean of one full-batch SGD step from ``init`` on each of ``clients``
    (equal-size clients), i.e. FedAvg over exactly those clients."""
    outs = []
    for c in clients:
        t = MLPClassifier(in_dim=8, hidden=16, num_classes=3)
        t.load_state_dict(init)
        opt = torch.optim.SGD(t.parameters(), lr=t.hparams.lr)
        idx = dm.partitions[c]
        F.cross_entropy(t(dm.train_dataset.x[idx]), dm.train_dataset.targets[idx]).backward()
        opt.step()
        outs.append(params_of(t))
    for name, value in fed.task.state_dict().items():
        torch.testing.assert_close(value, sum(o[name] for o in outs) / len(outs), msg=name)


def test_aggregate_uses_only_healthy_clients():
    torch.manual_seed(0)
    base = FailingTask(fail_clients=(0,), in_dim=8, hidden=16, num_classes=3)
    init = params_of(base)
    fed = FederatedLightningModule(base, clients_per_round=3, local_steps=1)
    dm = _dm(n=30, num_clients=3, batch_size=10)
    with pytest.warns(UserWarning):
        quiet_trainer(max_steps=1).fit(fed, datamodule=dm)
    # reference: clients 1 and 2 only
    _assert_fedavg_of_one_step(fed, init, dm, clients=(1, 2))


def test_client_with_non_finite_weights_is_found_and_excluded():
    torch.manual_seed(0)
    task = PoisonTask(poison_clients=(2,), in_dim=8, hidden=16, num_classes=3)
    init = params_of(task)
    fed = FederatedLightningModule(task, clients_per_round=3, local_steps=1)
    dm = _dm(n=30, num_clients=3, batch_size=10)
    trainer = quiet_trainer(max_steps=1)
    with pytest.warns(UserWarning, match=r"client 2 failed .*non-finite values in 'head.weight'"):
        trainer.fit(fed, datamodule=dm)
    assert trainer.callback_metrics["round/clients_failed"].item() == 1
    _assert_fedavg_of_one_step(fed, init, dm, clients=(0, 1))


def test_every_client_of_the_first_round_failing_raises_with_the_traceback():
    task = FailingTask(fail_clients=(0, 1), in_dim=8, hidden=16, num_classes=3)
    fed = FederatedLightningModule(task, clients_per_round=2, local_steps=1)
    trainer = quiet_trainer(max_steps=5)
    with pytest.warns(UserWarning), pytest.raises(RuntimeError, match=r"(?s)every client of the first round \(0\) "
                                                                    r"failed.*client 0: RuntimeError: boom on client 0"):
        trainer.fit(fed, datamodule=_dm(n=20, num_clients=2, batch_size=10))
    assert trainer.global_step == 0


@pytest.mark.parametrize("max_failed_rounds, raises", [(2, True), (3, False)])
def test_consecutive_all_failed_rounds_raise_after_max_failed_rounds(max_failed_rounds, raises):
    """Rounds 1 and 2 fail completely: with max_failed_rounds=2 fit raises, with 3 it finishes (model unchanged)."""
    task = FailingTask(fail_clients=(0, 1), fail_from_round=1, in_dim=8, hidden=16, num_classes=3)
    fed = FederatedLightningModule(task, clients_per_round=2, local_steps=1, server_optimizer="adam", server_lr=0.1,
                                   max_failed_rounds=max_failed_rounds)
    snapshots = []

    class Snap(Callback):
        def on_fed_round_end(self, trainer, pl_module, summary):
            snapshots.append(params_of(pl_module.task))

    trainer = quiet_trainer(max_steps=3, callbacks=[Snap()])
    dm = _dm(n=20, num_clients=2, batch_size=10)
    if raises:
        with pytest.warns(UserWarning, match="all 2 clients failed"), \
                pytest.raises(RuntimeError, match=r"every client failed in 2 consecutive rounds \(up to round 2"):
            trainer.fit(fed, datamodule=dm)
        assert len(snapshots) == 2  # round 0 trained, round 1 failed (streak 1), round 2 raised
    else:
        with pytest.warns(UserWarning, match="all 2 clients failed"):
            trainer.fit(fed, datamodule=dm)
        assert trainer.global_step == 3  # failed rounds are still counted, the model unchanged by them
        for name, value in snapshots[2].items():
            assert torch.equal(value, snapshots[0][name]), name
            assert torch.equal(fed.task.state_dict()[name], snapshots[0][name]), name


# ------------------------------------------------------------------ resume
@pytest.mark.parametrize("server_optimizer", ["sgd", "adam"])
def test_resume_is_bit_identical(tmp_path, server_optimizer):
    def make():
        torch.manual_seed(0)
        task = MLPClassifier(in_dim=8, hidden=16, num_classes=3, lr=0.1, momentum=0.9)
        dm = FederatedDataModule(GaussianMixtureDataset(200, dim=8, num_classes=3), partition="dirichlet", num_clients=8,
                                 alpha=0.3, batch_size=8)
        fed = FederatedLightningModule(task, clients_per_round=3, local_steps=3, server_optimizer=server_optimizer,
                                       server_lr=1.0 if server_optimizer == "sgd" else 0.05)
        return fed, dm

    fed_full, dm = make()
    quiet_trainer(max_steps=6).fit(fed_full, datamodule=dm)

    fed_a, dm_a = make()
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_top_k=-1)
    trainer = quiet_trainer(max_steps=6, enable_checkpointing=True, callbacks=[ckpt])
    # interrupt after 3 rounds: a run with the same max_steps that we stop via a callback
    class Stop(Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 3:
                trainer.should_stop = True
    trainer.callbacks.append(Stop())
    trainer.fit(fed_a, datamodule=dm_a)
    assert trainer.global_step == 3
    path = next(tmp_path.glob("*step=3*.ckpt"))

    fed_b, dm_b = make()
    quiet_trainer(max_steps=6).fit(fed_b, datamodule=dm_b, ckpt_path=str(path))
    for (name, a), (_, b) in zip(fed_full.task.state_dict().items(), fed_b.task.state_dict().items()):
        assert torch.equal(a, b), name


# ------------------------------------------------------------------ executors
def test_process_pool_agrees_with_sequential():
    def run(executor):
        torch.manual_seed(0)
        task = MLPClassifier(in_dim=8, hidden=16, num_classes=3, lr=0.1)
        dm = FederatedDataModule(GaussianMixtureDataset(120, dim=8, num_classes=3), num_clients=6, batch_size=8)
        fed = FederatedLightningModule(task, clients_per_round=4, local_steps=3, executor=executor, num_workers=2)
        trainer = quiet_trainer(max_steps=3)
        trainer.fit(fed, datamodule=dm)
        return fed, trainer

    seq, t1 = run("sequential")
    par, t2 = run("process")
    for (name, a), (_, b) in zip(seq.task.state_dict().items(), par.task.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)
    assert t2.callback_metrics["round/clients_ok"].item() == 4


# ------------------------------------------------------------------ partitions
def test_partitioners():
    parts = iid_partition(103, 10, seed=0)
    assert sorted(np.concatenate(parts).tolist()) == list(range(103))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1

    labels = np.repeat(np.arange(5), 40)
    skewed = dirichlet_partition(labels, 8, alpha=0.1, seed=0)
    flat = dirichlet_partition(labels, 8, alpha=1000.0, seed=0)
    assert sorted(np.concatenate(skewed).tolist()) == list(range(200))
    classes_skewed = np.mean([len(np.unique(labels[p])) for p in skewed if len(p)])
    classes_flat = np.mean([len(np.unique(labels[p])) for p in flat if len(p)])
    assert classes_skewed < classes_flat

    groups, keys = key_partition(["b", "a", "b", "c"])
    assert keys == ["a", "b", "c"] and [g.tolist() for g in groups] == [[1], [0, 2], [3]]


def test_by_key_with_field_name_and_small_clients_reported():
    samples = [{"x": torch.zeros(2), "spk": s} for s in ["a"] * 5 + ["b"] * 1 + ["c"] * 4]

    class DS(torch.utils.data.Dataset):
        def __len__(self):
            return len(samples)

        def __getitem__(self, i):
            return samples[i]

    dm = FederatedDataModule(DS(), partition="by_key", partition_key="spk", min_client_samples=2, batch_size=2)
    with pytest.warns(UserWarning, match="fewer than min_client_samples=2"):
        assert dm.client_sizes == [5, 1, 4]
    assert dm.small_clients == [1]
    assert dm.population.tolist() == [0, 2]
    assert dm.client_keys == ["a", "b", "c"]


def test_weighted_average_single_client_is_exact():
    x = torch.randn(5, 3)
    assert torch.equal(weighted_average([{"w": x}], [7.0], ["w"])["w"], x)


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(clients_per_round=0), "clients_per_round"),
        (dict(local_steps=0), "local_steps"),
        (dict(local_steps=2, local_epochs=1), "exactly one of `local_steps` or `local_epochs`"),
        (dict(local_epochs=-1), "local_epochs"),
        (dict(server_optimizer="rmsprop"), "server_optimizer"),
        (dict(server_lr=0), "server_lr"),
        (dict(server_optimizer="sgdm", server_momentum=1.5), "server_momentum"),
        (dict(weighting="bytes"), "weighting"),
        (dict(executor="threads"), "executor"),
        (dict(client_gradient_clip_algorithm="l3"), "client_gradient_clip_algorithm"),
    ],
)
def test_constructor_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FederatedLightningModule(_task(), **kwargs)


def test_task_errors():
    with pytest.raises(ValueError, match="does not implement `training_step`"):
        FederatedLightningModule(NoTrainingStep())
    with pytest.raises(TypeError, match="`task` must be a lightning LightningModule"):
        FederatedLightningModule(torch.nn.Linear(2, 2))


def test_data_errors():
    ds = GaussianMixtureDataset(10, dim=4, num_classes=2)
    with pytest.raises(ValueError, match="partition"):
        FederatedDataModule(ds, partition="random")
    with pytest.raises(ValueError, match="num_clients"):
        FederatedDataModule(ds, num_clients=0)
    with pytest.raises(ValueError, match="alpha"):
        FederatedDataModule(ds, partition="dirichlet", alpha=0)
    with pytest.raises(ValueError, match="partition_key"):
        FederatedDataModule(ds, partition="by_key")
    with pytest.raises(ValueError, match="batch_size"):
        FederatedDataModule(ds, batch_size=0)
    with pytest.raises(ValueError, match="train_dataset"):
        FederatedDataModule(torch.utils.data.TensorDataset(torch.zeros(0, 2)))
    with pytest.raises(ValueError, match="exceeds the 10 training samples"):
        _ = FederatedDataModule(ds, num_clients=11).partitions


def test_clients_per_round_larger_than_clients_fails_at_setup():
    fed = FederatedLightningModule(_task(), clients_per_round=5, local_steps=1)
    with pytest.raises(ValueError, match=r"`clients_per_round` \(5\) is larger"):
        quiet_trainer(max_steps=1).fit(fed, datamodule=_dm(n=40, num_clients=4))
