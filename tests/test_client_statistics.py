"""Client statistics and forward scales travel with every executor: the process pool and Flower (its messages,
the serialized bytes, the checks of a reply) give what the sequential executor gives, bit for bit, for a run of
PruneFL (the clients upload their squared gradients before every mask computation) with Federated Dropout (each
client's sub-model reads its kept units scaled)."""

from __future__ import annotations

import pytest
import torch
import yaml
from helpers import GaussianMixtureDataset, MLPClassifier, quiet_trainer
from lightning.pytorch.callbacks import Callback

from lightning_fedprune import FederatedDataModule, FederatedLightningModule
from lightning_fedprune.baselines import FederatedDropout, PruneFL

PRUNEFL = {"class_path": "lightning_fedprune.baselines.PruneFL",
           "init_args": {"target_sparsity": 0.5, "start_round": 2, "every_n_rounds": 2, "freeze_round": 5,
                         "pattern": "column", "parameters": r"body\..*\.weight"}}
DROPOUT = {"class_path": "lightning_fedprune.baselines.FederatedDropout", "init_args": {"rate": 0.25, "start_round": 1}}


class Uploads(Callback):
    def __init__(self):
        self.statistics: dict[int, list[bool]] = {}

    def on_fed_client_result(self, trainer, pl_module, result):
        self.statistics.setdefault(result.round, []).append(bool(result.statistics))


def _fit(executor, rounds=6):
    torch.manual_seed(0)
    task = MLPClassifier(in_dim=8, hidden=16, num_classes=3, depth=2, lr=0.1, momentum=0.5)
    dm = FederatedDataModule(GaussianMixtureDataset(120, dim=8, num_classes=3), num_clients=4, batch_size=8,
                             partition="dirichlet", alpha=0.5)
    fed = FederatedLightningModule(task, clients_per_round=3, local_steps=3, executor=executor, num_workers=2,
                                   strategy=FederatedDropout(rate=0.25, start_round=1))
    uploads = Uploads()
    callbacks = [PruneFL(**PRUNEFL["init_args"]), uploads]
    quiet_trainer(max_steps=rounds, callbacks=callbacks, limit_val_batches=0).fit(fed, datamodule=dm)
    return fed, uploads


def test_the_process_pool_carries_statistics_and_scales_as_in_process():
    ref, ref_uploads = _fit("sequential")
    pool, pool_uploads = _fit("process")
    assert ref_uploads.statistics == pool_uploads.statistics
    assert {r for r, up in ref_uploads.statistics.items() if any(up)} == {1, 3}  # before the masks of rounds 2, 4
    for name, value in ref.task.state_dict().items():
        assert torch.equal(pool.task.state_dict()[name], value), name
    for name, value in ref.pruning.sq_gradient.items():
        assert torch.equal(pool.pruning.sq_gradient[name], value), name


@pytest.fixture(scope="module")
def flower_modules():
    pytest.importorskip("flwr")
    import test_flower

    return test_flower


def _quickstart(tmp_path, flower_helpers):
    config = flower_helpers.small_quickstart(tmp_path, rounds=6, strategy=DROPOUT)
    cfg = yaml.safe_load(config.read_text())
    cfg["trainer"]["callbacks"] = [PRUNEFL, cfg["trainer"]["callbacks"][-1]]  # PruneFL and RunSummary
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return config


def test_flower_carries_statistics_and_scales_as_in_process(tmp_path, flower_modules):
    import flower_helpers

    from lightning_fedprune.federated.flower import messages

    tf = flower_modules
    config = _quickstart(tmp_path, flower_helpers)
    ref = tf.fit_in_process(config)
    flower, grid = tf.fit_on_flower(config, nodes=3)
    tf.assert_same_model(ref, flower)
    for name, value in ref.model.pruning.sq_gradient.items():
        assert torch.equal(flower.model.pruning.sq_gradient[name], value), name
    # the jobs of round 1 ask for the statistics and carry the sub-model's scales; their replies hold one more record
    jobs = [messages.read_job(j.content) for j in grid.jobs if j.metadata.group_id == "1"]
    assert jobs and all(j.plan.statistics == {"sq_gradient": ("body.0.weight", "body.2.weight")} for j in jobs)
    assert all(j.plan.forward_scales == {"body.2.weight": 128 / 96} for j in jobs)
    replies = {r.metadata.group_id: r for r in grid.pulled}
    assert messages.STATISTICS + "sq_gradient" in replies["1"].content
    assert messages.STATISTICS + "sq_gradient" not in replies["2"].content  # only before a mask computation


def test_a_reply_without_the_statistics_asked_for_fails_its_client(tmp_path, flower_modules):
    import flower_helpers

    from lightning_fedprune.federated.flower import messages

    dropped = []

    def drop(job, reply):  # the first client of round 1 sends its update without its statistics
        cfg = job.content[messages.CONFIG]
        if job.metadata.message_type == messages.TRAIN and cfg["round"] == 1 and not dropped:
            dropped.append(cfg["client-id"])
            del reply.content[messages.STATISTICS + "sq_gradient"]
        return reply

    config = _quickstart(tmp_path, flower_helpers)
    with pytest.warns(UserWarning, match="no ArrayRecord 'fedprune.statistics.sq_gradient'") as record:
        flower, _ = flower_modules.fit_on_flower(config, tamper=drop, **{"round-timeout": 0.5})
    assert sum("failed and is left out" in str(w.message) for w in record) == 1  # that client only
    assert flower.model.pruning.sparsity() == pytest.approx(0.5)  # the others' statistics were enough
