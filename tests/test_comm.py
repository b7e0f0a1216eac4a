"""Real savings: bytes on the wire, compact client sub-models, parallel clients with pruning."""

from __future__ import annotations

import pytest
import torch
from helpers import GaussianMixtureDataset, MLPClassifier, quiet_trainer
from lightning.pytorch.callbacks import Callback

from lightning_fedprune import FederatedDataModule, FederatedLightningModule, SequentialExecutor
from lightning_fedprune.callbacks import SparsityRampCallback
from lightning_fedprune.federated.wire import dense_nbytes


class LossTrace(Callback):
    def __init__(self):
        self.losses = []
        self.summaries = []

    def on_fed_round_end(self, trainer, pl_module, summary):
        self.losses.append(summary.train_loss)
        self.summaries.append(summary)


def _run(pattern="column", compact=True, executor="sequential", sparsity=0.5, rounds=6, **fed_kw):
    torch.manual_seed(0)
    task = MLPClassifier(in_dim=16, hidden=64, num_classes=4, lr=0.05, momentum=0.9, weight_decay=1e-3)
    dm = FederatedDataModule(GaussianMixtureDataset(200, dim=16, num_classes=4), num_clients=5, batch_size=10)
    fed = FederatedLightningModule(task, clients_per_round=3, local_steps=3, compact_clients=compact,
                                   executor=executor, **fed_kw)
    trace = LossTrace()
    cbs = [SparsityRampCallback(target_sparsity=sparsity, start_round=1, pattern=pattern,
                                parameters=r"body\..*\.weight"), trace]
    trainer = quiet_trainer(max_steps=rounds, callbacks=cbs)
    trainer.fit(fed, datamodule=dm)
    return fed, trace, trainer


@pytest.mark.parametrize("pattern", ["row", "column", "half_row", "half_column"])
def test_compact_client_matches_masked_dense(pattern):
    fed_c, trace_c, _ = _run(pattern, compact=True)
    fed_d, trace_d, _ = _run(pattern, compact=False)
    assert len(trace_c.losses) == 6
    for a, b in zip(trace_c.losses, trace_d.losses):
        assert abs(a - b) <= 1e-5, (trace_c.losses, trace_d.losses)
    for (name, a), (_, b) in zip(fed_c.task.state_dict().items(), fed_d.task.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)


def test_compact_client_really_shrinks_the_replica():
    sizes = []

    class Probe(SequentialExecutor):
        def run(self, payload, plans, on_result=None):
            runner = self.runner
            original = runner._loop

            def spy(plan, base_epoch):
                trained = sum(p.numel() for g in runner.optimizers[0].param_groups for p in g["params"])
                sizes.append((sum(p.numel() for p in runner.replica.parameters()), trained))
                return original(plan, base_epoch)

            runner._loop = spy
            try:
                return super().run(payload, plans, on_result)
            finally:
                runner._loop = original

    torch.manual_seed(0)
    task = MLPClassifier(in_dim=16, hidden=64, num_classes=4)
    full = sum(p.numel() for p in task.parameters())
    fed = FederatedLightningModule(task, clients_per_round=1, local_steps=1, executor=Probe())
    dm = FederatedDataModule(GaussianMixtureDataset(60, dim=16, num_classes=4), num_clients=2, batch_size=10)
    cbs = [SparsityRampCallback(target_sparsity=0.5, start_round=1, pattern="column", parameters=r"body\..*\.weight")]
    quiet_trainer(max_steps=2, callbacks=cbs).fit(fed, datamodule=dm)
    pruned = sum(int((~m).sum()) for m in fed.masks.values())
    assert sizes[0] == (full, full)  # round 0: dense
    assert sizes[1] == (full - pruned, full - pruned)  # round 1: the replica and its optimiser hold only kept entries


def test_byte_accounting_is_logged_and_matches_the_payloads():
    fed, trace, trainer = _run("column", compact=True, sparsity=0.5, rounds=3)
    dense = dense_nbytes({k: v for k, v in fed.task.state_dict().items()})
    s0, s2 = trace.summaries[0], trace.summaries[2]
    # round 0 is dense: exactly the plain FedAvg bytes both ways
    assert s0.bytes_down == s0.dense_bytes // 2 == 3 * dense
    assert s0.bytes_up == 3 * dense
    # round 2 is pruned at 50% (columns of the two hidden weights): fewer bytes both ways
    masked = sum(m.numel() for m in fed.masks.values())
    kept = sum(int(m.sum()) for m in fed.masks.values())
    saved = 4 * (masked - kept)  # float32 values not sent
    assert s2.bytes_up == 3 * (dense - saved)
    assert 3 * (dense - saved) < s2.bytes_down < 3 * (dense - saved + 64)  # + a few bytes of column bitmask
    for key in ["comm/bytes_down", "comm/bytes_up", "comm/dense_bytes", "comm/ratio"]:
        assert key in trainer.logged_metrics, key
    ratio = trainer.logged_metrics["comm/ratio"].item()
    assert ratio == pytest.approx((s2.bytes_down + s2.bytes_up) / s2.dense_bytes)
    assert ratio < 0.75


def test_process_pool_with_pruning_agrees_with_sequential():
    fed_s, trace_s, _ = _run("column", compact=True, executor="sequential", rounds=4)
    fed_p, trace_p, _ = _run("column", compact=True, executor="process", rounds=4, num_workers=2)
    for a, b in zip(trace_s.losses, trace_p.losses):
        assert abs(a - b) <= 1e-6
    assert [s.bytes_up for s in trace_s.summaries] == [s.bytes_up for s in trace_p.summaries]
    for (name, a), (_, b) in zip(fed_s.task.state_dict().items(), fed_p.task.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=name)
