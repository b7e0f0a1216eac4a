"""A new importance or allocation method is one registered class: the pruning state asks it what it needs and
for its scores or per-layer sparsities, and nothing else names it (docs/design.md holds the worked example)."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import GaussianMixtureDataset, MLPClassifier, quiet_trainer

from lightning_fedprune import FederatedDataModule, FederatedLightningModule
from lightning_fedprune.callbacks import AdaptiveLayerSparsity, SparsityRampCallback
from lightning_fedprune.pruning.allocation import ALLOCATIONS, AllocationMethod, get_allocation, register_allocation
from lightning_fedprune.pruning.importance import (
    IMPORTANCE,
    Importance,
    Statistics,
    get_importance,
    register_importance,
)
from lightning_fedprune.pruning.patterns import get_pattern, to_2d
from lightning_fedprune.pruning.state import PruningState


class Movement(Importance):
    """Movement pruning (Sanh et al. 2020): -sum(w * g) over the group, signed."""

    name, norm, needs, source_name = "test_movement", "l1", "gradient", "movement"

    def source(self, weight, stats):
        return -(weight * stats.gradient)

    def scores(self, pattern, weight, stats):
        return pattern.reduce(to_2d(self.source(weight, stats)), torch.sum)


class DeeperSparser(AllocationMethod):
    """Later layers get more sparsity, proportional to their position; parameter-weighted mean S."""

    name = "test_deeper_sparser"

    def allocate(self, layers, target, settings):
        sizes = [layer.size for layer in layers.values()]
        raw = [i + 1.0 for i in range(len(sizes))]
        scale = target * sum(sizes) / sum(r * n for r, n in zip(raw, sizes))
        return {name: min(settings.max_layer_sparsity, scale * r) for name, r in zip(layers, raw)}


register_importance(Movement())
register_allocation(DeeperSparser())


def test_registered_names_are_accepted_everywhere_and_listed_live():
    assert "test_movement" in IMPORTANCE and "test_deeper_sparser" in ALLOCATIONS
    assert get_importance("test_movement").needs == "gradient"
    SparsityRampCallback(importance="test_movement", start_round=1)  # a gradient importance needs round >= 1
    with pytest.raises(ValueError, match="start_round"):
        SparsityRampCallback(importance="test_movement", start_round=0)
    AdaptiveLayerSparsity(method="test_deeper_sparser")
    with pytest.raises(ValueError, match="already registered"):
        register_importance(Movement())
    with pytest.raises(ValueError, match="`importance`"):
        get_importance("no_such_importance")
    with pytest.raises(ValueError, match="`method`"):
        get_allocation("no_such_method")


def test_the_state_scores_with_the_registered_importance_and_asks_for_its_statistic():
    state = PruningState()
    state.configure(["w"], "column", "test_movement")
    w = torch.tensor([[1.0, -2.0, 3.0], [1.0, 1.0, -1.0]])
    with pytest.raises(RuntimeError, match="no server-side gradient"):
        state.recompute({"w": w}, 1 / 3, round=1)
    state.gradient["w"] = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
    state.recompute({"w": w}, 1 / 3, round=1)
    # column scores -(w*g) summed: [-2, 1, -2]: the lowest (ties: the lower index) goes
    assert state.masks["w"].all(0).tolist() == [False, True, True]
    assert torch.equal(Movement().scores(get_pattern("column"), w, Statistics(gradient=torch.ones(2, 3))),
                       torch.tensor([-2.0, 1.0, -2.0]))


def test_a_fit_uses_the_registered_allocation_method():
    torch.manual_seed(0)
    task = MLPClassifier(in_dim=8, hidden=16, num_classes=4, depth=2)
    dm = FederatedDataModule(GaussianMixtureDataset(120, dim=8, num_classes=4), num_clients=4, batch_size=10)
    fed = FederatedLightningModule(task, clients_per_round=2, local_steps=2)
    callbacks = [SparsityRampCallback(target_sparsity=0.4, start_round=1, pattern="column", importance="test_movement",
                                      parameters=r"body\..*\.weight"),
                 AdaptiveLayerSparsity(max_layer_sparsity=0.9, method="test_deeper_sparser")]
    quiet_trainer(max_steps=3, callbacks=callbacks, limit_val_batches=0).fit(fed, datamodule=dm)
    sparsity = list(fed.pruning.layer_sparsity.values())
    sizes = [fed.masks[n].numel() for n in fed.pruning.layer_sparsity]
    assert sparsity == sorted(sparsity) and sparsity[0] < sparsity[-1]
    assert math.isclose(sum(s * n for s, n in zip(sparsity, sizes)) / sum(sizes), 0.4, rel_tol=1e-9)
