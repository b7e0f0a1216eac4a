"""Federated Pruning end to end: the four callbacks, the pruning state, payload invariants, resume."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from helpers import GaussianMixtureDataset, MLPClassifier, quiet_trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn

from lightning_fedprune import FederatedDataModule, FederatedLightningModule, SequentialExecutor
from lightning_fedprune.callbacks import (
    AdaptiveLayerSparsity,
    FineTuneFreeze,
    MaskRefinementCallback,
    SparsityRampCallback,
)
from lightning_fedprune.pruning.state import PruningState
from lightning_fedprune.federated.wire import decode_state


class SpyExecutor(SequentialExecutor):
    """Checks that nothing pruned travels: payload and results have exact zeros at pruned entries."""

    def __init__(self):
        super().__init__()
        self.checked = 0

    @staticmethod
    def _num_values(enc):
        return sum(a.size for k, a in enc.arrays.items() if k.startswith("values"))

    def run(self, payload, plans, on_result=None):
        state, masks, _ = payload.encoded.read()  # what a client sees
        for name, mask in masks.items():
            assert torch.all(state[name][~mask] == 0), name
            assert self._num_values(payload.encoded.tensors[name]) == int(mask.sum()), name  # only kept values go down
        results = super().run(payload, plans, on_result)
        for r in results:
            decoded = decode_state(r.payload, masks)
            for name, mask in masks.items():
                enc = r.payload.tensors[name]
                assert not enc.has_index and self._num_values(enc) == int(mask.sum()), name  # only kept values go up
                assert torch.all(decoded[name][~mask] == 0), name
                self.checked += 1
        return results


class PhaseRecorder(Callback):
    def __init__(self):
        self.phases = {}
        self.masks = {}

    def on_fed_round_end(self, trainer, pl_module, summary):
        self.phases[summary.round] = pl_module.pruning.phase
        self.masks[summary.round] = {n: m.clone() for n, m in pl_module.masks.items()}


def _setup(callbacks_kwargs=None, executor=None, hidden=32, seed=0):
    torch.manual_seed(seed)
    task = MLPClassifier(in_dim=16, hidden=hidden, num_classes=4, lr=0.1, momentum=0.9, weight_decay=1e-3)
    dm = FederatedDataModule(GaussianMixtureDataset(240, dim=16, num_classes=4), partition="dirichlet", num_clients=8,
                             alpha=0.5, batch_size=8)
    fed = FederatedLightningModule(task, clients_per_round=3, local_steps=2, executor=executor or "sequential")
    return fed, dm


def _four_callbacks(pattern="column", importance="weight_l2", adaptive=True):
    cbs = [
        SparsityRampCallback(target_sparsity=0.5, start_round=2, end_round=6, schedule="cubic", pattern=pattern,
                             importance=importance, parameters=r"body\..*\.weight", every_n_rounds=2),
        MaskRefinementCallback(every_n_rounds=2, until_round=10),
        FineTuneFreeze(start_round=11, make_permanent=True),
    ]
    if adaptive:
        cbs.append(AdaptiveLayerSparsity(max_layer_sparsity=0.9))
    return cbs


def test_full_run_phases_payload_zeros_and_freeze():
    spy = SpyExecutor()
    fed, dm = _setup(executor=spy)
    rec = PhaseRecorder()
    trainer = quiet_trainer(max_steps=14, callbacks=_four_callbacks() + [rec])
    trainer.fit(fed, datamodule=dm)
    phases = [rec.phases[r] for r in range(14)]
    assert phases == [0, 0, 1, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3]
    # masks frozen from the fine-tune round on
    for r in (12, 13):
        for name, mask in rec.masks[11].items():
            assert torch.equal(rec.masks[r][name], mask)
    assert spy.checked > 0
    # overall sparsity at the target (parameter-weighted over the two body layers), within a group's rounding
    assert abs(fed.pruning.sparsity() - 0.5) < 0.01
    assert set(fed.masks) == {"body.0.weight", "body.2.weight"}
    # pruning made permanent at the end: pruned entries are exact zeros in the global model
    params = dict(fed.task.named_parameters())
    for name, mask in fed.masks.items():
        assert torch.all(params[name][~mask] == 0)
    assert fed.pruning.permanent
    for key in ["prune/sparsity", "prune/target_sparsity", "prune/phase", "prune/mask_flips", "prune/restored",
                "prune/layer_sparsity/body.0.weight"]:
        assert key in trainer.logged_metrics, key
    assert trainer.logged_metrics["prune/mask_flips"].item() == 0  # the last round recomputed nothing


def test_server_keeps_pruned_weights_until_permanent():
    fed, dm = _setup()

    class Snapshot(Callback):
        def on_fed_round_start(self, trainer, pl_module, round, cohort):
            if round == 1:  # runs after the ramp callback (later in the list): masks exist now
                self.weight = pl_module.task.body[0].weight.detach().clone()

    snap = Snapshot()
    cbs = [SparsityRampCallback(target_sparsity=0.5, start_round=1, pattern="unstructured", parameters=r"body\.0\.weight"),
           snap]
    quiet_trainer(max_steps=4, callbacks=cbs).fit(fed, datamodule=dm)
    before = snap.weight
    mask = fed.masks["body.0.weight"]
    after = fed.task.body[0].weight.detach()
    assert torch.equal(after[~mask], before[~mask])  # pruned values untouched on the server (restorable)
    assert (after[~mask] != 0).all()
    assert not torch.equal(after[mask], before[mask])  # kept ones trained


@pytest.mark.parametrize("stop_at", [4, 8, 12])  # mid-ramp, mid-refinement, in fine-tuning
def test_resume_bit_identical_in_every_phase(tmp_path, stop_at):
    fed_full, dm = _setup()
    quiet_trainer(max_steps=14, callbacks=_four_callbacks()).fit(fed_full, datamodule=dm)

    fed_a, dm_a = _setup()

    class Stop(Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == stop_at:
                trainer.should_stop = True

    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=stop_at, save_top_k=-1)
    trainer = quiet_trainer(max_steps=14, enable_checkpointing=True, callbacks=_four_callbacks() + [ckpt, Stop()])
    trainer.fit(fed_a, datamodule=dm_a)
    path = next(tmp_path.glob(f"*step={stop_at}*.ckpt"))

    fed_b, dm_b = _setup()
    quiet_trainer(max_steps=14, callbacks=_four_callbacks()).fit(fed_b, datamodule=dm_b, ckpt_path=str(path))
    for (name, a), (_, b) in zip(fed_full.task.state_dict().items(), fed_b.task.state_dict().items()):
        assert torch.equal(a, b), name
    for name in fed_full.masks:
        assert torch.equal(fed_full.masks[name], fed_b.masks[name])


def test_refinement_restores_a_parameter_whose_score_rises():
    state = PruningState()
    w = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])
    state.configure(["w"], "unstructured", "weight_l1")
    change = state.recompute({"w": w}, 0.5, round=0)
    assert change.pruned == 4
    assert state.masks["w"].tolist() == [[False, False, False, False], [True, True, True, True]]
    # the server kept pruned entry w[0,3]=4 stale; a kept one loses importance (its weight shrinks)
    w2 = w.clone()
    w2[1, 0] = 0.5
    change = state.recompute({"w": w2}, 0.5, round=1)
    assert change.restored == 1 and change.pruned == 1 and change.flips == 2
    assert state.masks["w"][0, 3] and not state.masks["w"][1, 0]


def test_gradient_importance_keeps_stale_scores_for_pruned_entries():
    state = PruningState()
    state.configure(["w"], "unstructured", "gradient_l1")
    g1 = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    state.observe_pseudo_gradient({"w": g1}, ["w"])
    state.recompute({"w": torch.zeros(1, 4)}, 0.5, round=1)
    assert state.masks["w"].tolist() == [[False, False, True, True]]
    # next round: pruned entries got no update (zero pseudo-gradient); kept ones got small ones
    state.observe_pseudo_gradient({"w": torch.tensor([[0.0, 0.0, 0.5, 3.0]])}, ["w"])
    assert state.gradient["w"].tolist() == [[1.0, 2.0, 0.5, 3.0]]  # stale scores for pruned entries
    change = state.recompute({"w": torch.zeros(1, 4)}, 0.5, round=2)
    assert state.masks["w"].tolist() == [[False, True, False, True]]  # entry 1 came back on its stale score
    assert change.restored == 1


def test_adaptive_allocation_in_a_run():
    fed, dm = _setup(hidden=48)
    cbs = [SparsityRampCallback(target_sparsity=0.5, start_round=1, pattern="unstructured", parameters=r".*weight"),
           AdaptiveLayerSparsity(max_layer_sparsity=0.8, temperature=2.0)]
    quiet_trainer(max_steps=3, callbacks=cbs).fit(fed, datamodule=dm)
    layer = fed.pruning.actual_layer_sparsity()
    assert len(set(round(v, 3) for v in layer.values())) > 1  # not uniform
    assert max(layer.values()) <= 0.8 + 1e-6
    assert abs(fed.pruning.sparsity() - 0.5) <= 0.005


class ZooTask(pl.LightningModule):
    """Linear, Conv1d, Conv2d, Embedding and MultiheadAttention weights."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.conv1 = nn.Conv1d(8, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(1, 4, 3, padding=1)
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
        self.out = nn.Linear(8 + 4, 4)

    def forward(self, tokens):
        h = self.emb(tokens)  # B, T, 8
        h = self.conv1(h.transpose(1, 2)).transpose(1, 2)
        h, _ = self.mha(h, h, h)
        img = self.conv2(h.unsqueeze(1)).mean(dim=(2, 3))
        return self.out(torch.cat([h.mean(1), img], dim=-1))

    def training_step(self, batch, batch_idx):
        tokens, y = batch
        return F.cross_entropy(self(tokens), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


class TokenDataset(torch.utils.data.Dataset):
    def __init__(self, n=60):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randint(0, 10, (n, 6), generator=g)
        self.y = self.x[:, 0] % 3
        self.targets = self.y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


@pytest.mark.parametrize("pattern", ["unstructured", "row", "column", "half_row", "half_column"])
def test_any_module_weights(pattern):
    torch.manual_seed(0)
    fed = FederatedLightningModule(ZooTask(), clients_per_round=2, local_steps=2, executor=SpyExecutor())
    dm = FederatedDataModule(TokenDataset(), num_clients=4, batch_size=8)
    # conv2's 2-D view is 4 x 9: it cannot be split into column halves, so half_row leaves it out
    exclude = r"conv2\.weight" if pattern == "half_row" else None
    cbs = [SparsityRampCallback(target_sparsity=0.5, start_round=1, pattern=pattern, exclude=exclude)]
    quiet_trainer(max_steps=3, callbacks=cbs).fit(fed, datamodule=dm)
    expected = {"emb.weight", "conv1.weight", "conv2.weight", "mha.in_proj_weight", "mha.out_proj.weight", "out.weight"}
    if exclude:
        expected.discard("conv2.weight")
    assert set(fed.masks) == expected
    for name, mask in fed.masks.items():
        assert mask.shape == dict(fed.task.named_parameters())[name].shape
    assert 0.4 < fed.pruning.sparsity() < 0.6


# ------------------------------------------------------------------ configuration errors
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(target_sparsity=1.0), "target_sparsity"),
        (dict(target_sparsity=-0.1), "target_sparsity"),
        (dict(pattern="diagonal"), "pattern"),
        (dict(importance="weight_l3"), "importance"),
        (dict(start_round=5, end_round=2), "end_round"),
        (dict(schedule="exp"), "schedule"),
        (dict(importance="gradient_l1", start_round=0), "start_round"),
        (dict(every_n_rounds=0), "every_n_rounds"),
        (dict(parameters="(("), "parameters"),
        (dict(momentum_source="client"), "momentum_source"),
    ],
)
def test_ramp_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SparsityRampCallback(**kwargs)


def test_other_callback_errors():
    with pytest.raises(ValueError, match="every_n_rounds"):
        MaskRefinementCallback(every_n_rounds=0)
    with pytest.raises(ValueError, match="until_round"):
        MaskRefinementCallback(start_round=10, until_round=5)
    with pytest.raises(ValueError, match="max_layer_sparsity"):
        AdaptiveLayerSparsity(max_layer_sparsity=1.5)
    with pytest.raises(ValueError, match="start_round"):
        FineTuneFreeze(start_round=-1)


@pytest.mark.parametrize(
    "callbacks, match",
    [
        ([SparsityRampCallback(parameters=r"nothing\..*")], "matches no parameter"),
        ([SparsityRampCallback(parameters=r"head\.weight", pattern="half_column")], "head.weight"),
        ([SparsityRampCallback(start_round=1, end_round=5), MaskRefinementCallback(start_round=3)], "after the ramp"),
        ([SparsityRampCallback(start_round=1, end_round=5), FineTuneFreeze(start_round=5)], "after the ramp"),
        ([SparsityRampCallback(target_sparsity=0.8), AdaptiveLayerSparsity(max_layer_sparsity=0.5)], "max_layer_sparsity"),
        ([MaskRefinementCallback()], "needs a SparsityRampCallback"),
    ],
)
def test_setup_errors(callbacks, match):
    torch.manual_seed(0)
    task = MLPClassifier(in_dim=16, hidden=32, num_classes=3)  # head.weight is 3 x 32: odd rows
    fed = FederatedLightningModule(task, clients_per_round=2, local_steps=1)
    dm = FederatedDataModule(GaussianMixtureDataset(40, dim=16, num_classes=3), num_clients=4, batch_size=8)
    with pytest.raises(ValueError, match=match):
        quiet_trainer(max_steps=1, callbacks=callbacks).fit(fed, datamodule=dm)


class EvalProbe(MLPClassifier):
    def validation_step(self, batch, batch_idx):
        self.seen = self.body[0].weight.detach().clone()
        return super().validation_step(batch, batch_idx)


def test_validation_evaluates_the_pruned_model_and_restores_server_values():
    torch.manual_seed(0)
    task = EvalProbe(in_dim=16, hidden=32, num_classes=4)
    dm = FederatedDataModule(GaussianMixtureDataset(120, dim=16, num_classes=4),
                             val_dataset=GaussianMixtureDataset(40, dim=16, num_classes=4, seed=3), num_clients=4, batch_size=8)
    fed = FederatedLightningModule(task, clients_per_round=2, local_steps=2)
    cbs = [SparsityRampCallback(target_sparsity=0.5, start_round=1, pattern="unstructured", parameters=r"body\.0\.weight")]
    quiet_trainer(max_steps=3, val_check_interval=3, callbacks=cbs).fit(fed, datamodule=dm)
    mask = fed.masks["body.0.weight"]
    assert torch.all(task.seen[~mask] == 0)  # evaluation saw the pruned model
    assert torch.all(task.body[0].weight[~mask] != 0)  # the server still keeps the pruned values
    assert torch.equal(task.seen[mask], task.body[0].weight[mask])


def test_checkpoint_saved_after_validation_keeps_server_values(tmp_path):
    def make():
        torch.manual_seed(0)
        task = MLPClassifier(in_dim=16, hidden=32, num_classes=4, lr=0.1, momentum=0.9)
        dm = FederatedDataModule(GaussianMixtureDataset(120, dim=16, num_classes=4),
                                 val_dataset=GaussianMixtureDataset(40, dim=16, num_classes=4, seed=3), num_clients=4,
                                 batch_size=8)
        return FederatedLightningModule(task, clients_per_round=2, local_steps=2), dm

    def cbs():
        return [SparsityRampCallback(target_sparsity=0.5, start_round=1, end_round=4, schedule="linear",
                                     pattern="unstructured", parameters=r"body\..*\.weight")]

    full, dm = make()
    quiet_trainer(max_steps=8, callbacks=cbs()).fit(full, datamodule=dm)
    first, dm = make()
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, filename="{step}")  # saves at validation end
    quiet_trainer(max_steps=4, val_check_interval=4, enable_checkpointing=True, callbacks=cbs() + [ckpt]).fit(first, datamodule=dm)
    path = tmp_path / "step=4.ckpt"
    ckpt = torch.load(path, weights_only=True)
    mask = ckpt["fedprune"]["pruning"]["masks"]["body.0.weight"]
    assert (ckpt["state_dict"]["body.0.weight"][~mask] == 0).all()  # state_dict: the pruned model
    assert (ckpt["fedprune"]["server_values"]["body.0.weight"] != 0).all()  # the server's kept pruned values
    resumed, dm = make()
    quiet_trainer(max_steps=8, callbacks=cbs()).fit(resumed, datamodule=dm, ckpt_path=str(path))
    for (name, a), (_, b) in zip(full.task.state_dict().items(), resumed.task.state_dict().items()):
        assert torch.equal(a, b), name
