"""Every pair of the settings a user combines works together, or is refused at construction by name.

The axes are the settings users mix in one run: server optimiser, executor, pattern, importance, payload
width, compact clients, precision and the algorithm (Federated Pruning, Federated Dropout, PruneFL). A
pairwise covering array picks the rows (:func:`pairwise`, a seeded greedy construction): every value of
every axis meets every value of every other axis in at least one row (checked below, so the array cannot
silently shrink). Each row trains a few
rounds of a tiny model with pruning active and must end with finite weights, the target sparsity reached
and no failed client. (Settings that cannot go together are refused when the module or callback is built,
naming the argument: tests/test_arguments.py.)
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from helpers import GaussianMixtureDataset, MLPClassifier, quiet_trainer
from lightning.pytorch.callbacks import Callback

from lightning_fedprune import FederatedDataModule, FederatedLightningModule
from lightning_fedprune.baselines import FederatedDropout, PruneFL
from lightning_fedprune.callbacks import FineTuneFreeze, MaskRefinementCallback, SparsityRampCallback
from lightning_fedprune.pruning.importance import IMPORTANCE
from lightning_fedprune.pruning.patterns import PATTERNS

AXES: dict[str, list] = {
    "algorithm": ["fedprune", "federated_dropout", "prunefl"],
    "importance": list(IMPORTANCE),
    "pattern": list(PATTERNS),
    "server_optimizer": ["sgd", "sgdm", "adam"],
    "executor": ["sequential", "process"],
    "payload_bits": [None, 8, 4],
    "compact_clients": [True, False],
    "precision": ["32-true", "bf16-mixed"],
}
TARGET = 0.5
ROUNDS = 5


def _allowed(values: dict) -> bool:
    """PruneFL has its own importance (accumulated squared gradients): its rows carry that one only, and
    only its rows do."""
    if "importance" in values and "algorithm" in values:
        return (values["algorithm"] == "prunefl") == (values["importance"] == "sq_gradient_l1")
    return True


def _pairs(row: dict) -> set[tuple]:
    names = list(row)
    return {((a, row[a]), (b, row[b])) for i, a in enumerate(names) for b in names[i + 1:]}


def pairwise(axes: dict[str, list], allowed: Callable[[dict], bool], seed: int = 0, tries: int = 30) -> list[dict]:
    """Rows (axis -> value) in which every allowed pair of values of two axes appears at least once.

    Greedy (as AETG): each new row starts from the first pair not yet covered and fills the other axes one
    at a time with the value covering most new pairs, over ``tries`` random axis orders; the best row is
    kept. ``allowed`` takes a partial row and says whether it can be part of a run.
    """
    rng = random.Random(seed)
    names = list(axes)
    todo = {((a, va), (b, vb)) for i, a in enumerate(names) for b in names[i + 1:]
            for va in axes[a] for vb in axes[b] if allowed({a: va, b: vb})}
    rows: list[dict] = []
    while todo:
        (a, va), (b, vb) = min(todo, key=repr)
        best, gain = None, -1
        for _ in range(tries):
            row = {a: va, b: vb}
            for n in rng.sample(names, len(names)):
                if n in row:
                    continue
                options = [v for v in axes[n] if allowed({**row, n: v})]
                rng.shuffle(options)
                row[n] = max(options, key=lambda v: len(_pairs({**{k: row[k] for k in names if k in row}, n: v}) & todo))
            row = {n: row[n] for n in names}
            new = len(_pairs(row) & todo)
            if new > gain:
                best, gain = row, new
        rows.append(best)
        todo -= _pairs(best)
    return rows


ROWS = pairwise(AXES, _allowed)


def test_the_rows_cover_every_allowed_pair():
    """Every pair of values of two axes that a run can have appears in a row (the generator is checked, not trusted)."""
    missing, pairs = [], 0
    for a, b in itertools.combinations(AXES, 2):
        for va, vb in itertools.product(AXES[a], AXES[b]):
            pair = {a: va, b: vb}
            if not _allowed(pair):
                continue
            pairs += 1
            if not any(row[a] == va and row[b] == vb for row in ROWS):
                missing.append(pair)
    assert not missing, missing[:10]
    assert all(_allowed(row) for row in ROWS) and pairs > 250
    assert len(ROWS) < 60  # pairwise, not the full product (it would be 3*8*5*3*2*3*2*2 = 8640 runs)


@dataclass
class Watch(Callback):
    """Every round's failed clients, and the sparsity when the run ends."""

    failed: int = 0
    rounds: int = 0

    def on_fed_round_end(self, trainer, pl_module, summary):
        self.failed += summary.clients_failed
        self.rounds += 1


def _build(row: dict):
    torch.manual_seed(0)
    task = MLPClassifier(in_dim=8, hidden=16, num_classes=4, lr=0.1, momentum=0.5)
    dm = FederatedDataModule(GaussianMixtureDataset(96, dim=8, num_classes=4), partition="iid", num_clients=6,
                             batch_size=8)
    if row["algorithm"] == "federated_dropout":  # a strategy of its own, with its server optimiser
        # the hidden units of body.0 -> body.2 (rows of the one, columns of the other), on top of the row's pruning
        server = {"strategy": FederatedDropout(rate=0.25, parameters=r"body\..*\.weight",
                                               server_optimizer=row["server_optimizer"])}
    else:
        server = {"server_optimizer": row["server_optimizer"]}
    fed = FederatedLightningModule(task, clients_per_round=3, local_steps=2, executor=row["executor"], num_workers=2,
                                   payload_bits=row["payload_bits"], compact_clients=row["compact_clients"], seed=1,
                                   **server)
    if row["algorithm"] == "prunefl":
        pruning = [PruneFL(target_sparsity=TARGET, start_round=1, every_n_rounds=2, pattern=row["pattern"],
                           parameters=r"body\..*\.weight")]
    else:
        pruning = [SparsityRampCallback(target_sparsity=TARGET, start_round=1, end_round=2, pattern=row["pattern"],
                                        importance=row["importance"], parameters=r"body\..*\.weight"),
                   MaskRefinementCallback(every_n_rounds=1, until_round=3),
                   FineTuneFreeze(start_round=4)]
    return fed, dm, pruning


def _id(row: dict) -> str:
    return "-".join(str(v) for v in row.values())


@pytest.mark.parametrize("row", ROWS, ids=[_id(r) for r in ROWS])
def test_combination_trains(row):
    fed, dm, pruning = _build(row)
    watch = Watch()
    trainer = quiet_trainer(max_steps=ROUNDS, precision=row["precision"], callbacks=[*pruning, watch],
                            limit_val_batches=0)
    trainer.fit(fed, datamodule=dm)
    assert watch.rounds == ROUNDS and watch.failed == 0
    for name, p in fed.task.named_parameters():
        assert torch.isfinite(p).all(), name
    assert fed.pruning.masks and math.isclose(fed.pruning.sparsity(), TARGET, abs_tol=1e-9)
    for name, mask in fed.pruning.masks.items():  # the global model the clients get: pruned entries are zeros
        if fed.pruning.permanent:
            assert torch.all(dict(fed.task.named_parameters())[name][~mask] == 0), name
