"""The pruning schedule as a value: phases and updates are pure functions of (round, plan), the
callbacks only contribute parts, and their order does not matter by construction."""

from __future__ import annotations

import itertools

import pytest
import torch
from helpers import GaussianMixtureDataset, MLPClassifier, quiet_trainer
from lightning.pytorch.callbacks import Callback

from lightning_fedprune import FederatedDataModule, FederatedLightningModule
from lightning_fedprune.callbacks import (
    AdaptiveLayerSparsity,
    FineTuneFreeze,
    MaskRefinementCallback,
    SparsityRampCallback,
)
from lightning_fedprune.pruning.plan import Freeze, Phase, PruningPlan, Ramp, Refinement, phase_at, update_at


def test_phases_of_every_combination_of_parts():
    ramp = Ramp(0.5, start_round=2, end_round=4)
    cases = {
        PruningPlan(ramp): "DDRRRFFF",  # after the ramp without refinement: fine-tune (masks not frozen)
        PruningPlan(ramp, refinement=Refinement(2)): "DDRRRBBB",
        PruningPlan(ramp, refinement=Refinement(2, until_round=5)): "DDRRRBFF",
        PruningPlan(ramp, refinement=Refinement(2, start_round=6)): "DDRRRFBB",
        PruningPlan(ramp, refinement=Refinement(2), freeze=Freeze(7)): "DDRRRBBF",
        PruningPlan(): "DDDDDDDD",
    }
    code = {Phase.DENSE: "D", Phase.RAMP: "R", Phase.REFINE: "B", Phase.FINETUNE: "F"}
    for plan, expected in cases.items():
        assert "".join(code[phase_at(r, plan)] for r in range(8)) == expected, plan


def test_updates_follow_the_schedule_and_settle_once_at_the_target():
    plan = PruningPlan(Ramp(0.6, start_round=1, end_round=7, schedule="linear", every_n_rounds=4),
                       refinement=Refinement(3, until_round=12), freeze=Freeze(14))
    target = 0.0
    updates = {}
    for r in range(16):
        s = update_at(r, plan, target)
        if s is not None:
            updates[r] = round(s, 4)
            target = s
    # ramp at 1, 5 and its end 7; refinement from 8 every 3 rounds until 12; nothing once frozen
    assert updates == {1: 0.0, 5: 0.4, 7: 0.6, 8: 0.6, 11: 0.6}
    # a ramp whose every_n_rounds skips its end never happens (end_round always updates); settling covers
    # a target changed on resume: the first round after the ramp recomputes once at the new target
    assert update_at(9, plan, current_target=0.5) == 0.6 and update_at(9, plan, current_target=0.6) is None
    assert update_at(15, plan, current_target=0.5) is None  # frozen: never


@pytest.mark.parametrize("parts, match", [
    (dict(refinement=Refinement(2)), "MaskRefinementCallback needs a SparsityRampCallback"),
    (dict(freeze=Freeze(3)), "FineTuneFreeze needs a SparsityRampCallback"),
    (dict(ramp=Ramp(0.5, 1, 5), freeze=Freeze(5)), r"FineTuneFreeze `start_round` \(5\) must be after"),
    (dict(ramp=Ramp(0.5, 1, 5), refinement=Refinement(2, start_round=9), freeze=Freeze(8)),
     r"`start_round` \(9\) must be before FineTuneFreeze `start_round` \(8\)"),
])
def test_contradictory_plans_are_rejected_naming_the_rounds(parts, match):
    with pytest.raises(ValueError, match=match):
        PruningPlan(**parts).validate()


def test_a_part_can_be_contributed_once():
    plan = PruningPlan().with_part(freeze=Freeze(4))
    with pytest.raises(ValueError, match="Only one FineTuneFreeze"):
        plan.with_part(freeze=Freeze(5))


class MaskLog(Callback):
    def __init__(self):
        self.history = []

    def on_fed_round_end(self, trainer, pl_module, summary):
        state = pl_module.pruning
        self.history.append((int(state.phase), state.frozen, state.permanent,
                         {n: m.clone() for n, m in state.masks.items()}))


def _run(order):
    torch.manual_seed(0)
    task = MLPClassifier(in_dim=16, hidden=32, num_classes=4, lr=0.1, momentum=0.9)
    dm = FederatedDataModule(GaussianMixtureDataset(160, dim=16, num_classes=4), partition="dirichlet", num_clients=6,
                             alpha=0.5, batch_size=8)
    fed = FederatedLightningModule(task, clients_per_round=2, local_steps=2)
    parts = {
        "ramp": SparsityRampCallback(target_sparsity=0.5, start_round=1, end_round=4, pattern="row", every_n_rounds=2,
                                     parameters=r"body\..*\.weight"),
        "refine": MaskRefinementCallback(every_n_rounds=2, until_round=7),
        "adaptive": AdaptiveLayerSparsity(max_layer_sparsity=0.8),
        "freeze": FineTuneFreeze(start_round=8),
    }
    log = MaskLog()
    quiet_trainer(max_steps=10, callbacks=[parts[name] for name in order] + [log]).fit(fed, datamodule=dm)
    return log.history, fed


def test_callback_order_does_not_matter():
    reference, fed = _run(["ramp", "refine", "adaptive", "freeze"])
    assert [p for p, *_ in reference] == [0, 1, 1, 1, 1, 2, 2, 2, 3, 3]
    assert reference[-1][2] and fed.pruning.permanent  # made permanent when fine-tuning started
    for order in itertools.islice(itertools.permutations(["ramp", "refine", "adaptive", "freeze"]), 1, None, 7):
        log, _ = _run(list(order))
        for (pa, fa, ma_, masks_a), (pb, fb, mb_, masks_b) in zip(reference, log):
            assert (pa, fa, ma_) == (pb, fb, mb_), order
            assert masks_a.keys() == masks_b.keys() and all(torch.equal(masks_a[n], masks_b[n]) for n in masks_a), order


def test_the_plan_is_rebuilt_for_every_fit():
    """A second fit with other callbacks does not inherit the first fit's parts."""
    _, fed = _run(["ramp", "freeze"])
    trainer = quiet_trainer(max_steps=11)
    trainer.fit(fed, datamodule=FederatedDataModule(GaussianMixtureDataset(160, dim=16, num_classes=4), num_clients=6,
                                                    batch_size=8))
    assert not fed.pruning.plan.active
