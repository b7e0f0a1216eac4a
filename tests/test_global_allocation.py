"""Global-ranking allocation (issue 13 item 5): against a brute-force greedy reference, in the pruning state,
and selectable from AdaptiveLayerSparsity."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_fedprune.callbacks import AdaptiveLayerSparsity
from lightning_fedprune.pruning import global_allocation, group_scores, mask_from_scores
from lightning_fedprune.pruning.plan import Allocation, PruningPlan, Ramp, Selection
from lightning_fedprune.pruning.state import PruningState


def greedy_reference(scores, shapes, target, cap, norm, normalize):
    """Prune groups one at a time in ascending comparable score (ties: earlier layer, lower index), skipping
    layers at their cap, stopping where the pruned entries come closest to the target."""
    groups = []
    for li, (name, s) in enumerate(scores.items()):
        rows, cols = shapes[name][0], math.prod(shapes[name][1:])
        size = rows * cols // s.numel()
        scale = (1 / size if norm == "l1" else 1 / math.sqrt(size)) * (math.sqrt(cols) if normalize == "fan_in" else 1)
        groups += [(float(v) * scale, li, gi, name, size) for gi, v in enumerate(s.tolist())]
    groups.sort(key=lambda g: (g[0], g[1], g[2]))
    total = sum(math.prod(shape) for shape in shapes.values())
    budget = target * total
    caps = {n: math.floor(cap * s.numel() + 1e-9) for n, s in scores.items()}
    counts = dict.fromkeys(scores, 0)
    pruned = 0
    for _, _, _, name, size in groups:
        if counts[name] >= caps[name]:
            continue
        if pruned + size - budget > budget - pruned:  # one more group would overshoot more than stopping
            break
        counts[name] += 1
        pruned += size
    return {n: counts[n] / scores[n].numel() for n in scores}


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("norm, normalize, cap, target", [("l2", "fan_in", 0.9, 0.5), ("l1", "none", 0.6, 0.5),
                                                           ("l2", "none", 1.0, 0.3), ("l1", "fan_in", 0.75, 0.7)])
def test_global_allocation_equals_a_greedy_global_ranking(seed, norm, normalize, cap, target):
    g = torch.Generator().manual_seed(seed)
    shapes = {"a": (8, 12), "b": (16, 8), "c": (4, 16), "d": (6, 6)}
    scales = {"a": 1.0, "b": 0.3, "c": 3.0, "d": 1.0}
    scores = {n: torch.rand(shape[1], generator=g) * scales[n] for n, shape in shapes.items()}  # column groups
    if seed % 2:  # ties across layers and within a layer
        scores = {n: (s * 4).round() for n, s in scores.items()}
    got = global_allocation(scores, shapes, target, max_layer_sparsity=cap, norm=norm, normalize=normalize)
    assert got == pytest.approx(greedy_reference(scores, shapes, target, cap, norm, normalize))
    assert all(s <= cap + 1e-12 for s in got.values())
    pruned = sum(got[n] * math.prod(shapes[n]) for n in shapes)
    largest_group = max(shapes[n][0] for n in shapes)
    assert abs(pruned - target * sum(math.prod(s) for s in shapes.values())) <= largest_group / 2 + 1e-9
    # the masks at these sparsities prune exactly the globally lowest groups of each layer
    for name, s in scores.items():
        keep = mask_from_scores(s, got[name])
        assert int((~keep).sum()) == round(got[name] * s.numel())


def test_global_allocation_follows_the_scores_where_the_power_law_barely_moves():
    """The issue's observation: layers of similar mean importance get almost the same sparsity from the power
    law, while a global ranking prunes the layer whose groups are weaker."""
    from lightning_fedprune.pruning import adaptive_allocation, layer_importance

    g = torch.Generator().manual_seed(0)
    weights = {"a": torch.randn(32, 32, generator=g), "b": torch.randn(32, 32, generator=g)}
    weights["b"][:, :16] *= 0.1  # half of b's columns are weak, the rest as strong as a's
    shapes = {n: tuple(w.shape) for n, w in weights.items()}
    scores = {n: group_scores("weight_l2", "column", w) for n, w in weights.items()}
    glob = global_allocation(scores, shapes, 0.25)
    power = adaptive_allocation({n: layer_importance(w) for n, w in weights.items()},
                                {n: w.numel() for n, w in weights.items()}, 0.25)
    assert glob == {"a": 0.0, "b": 0.5}  # exactly the weak columns
    assert abs(power["a"] - power["b"]) < 0.3


def test_global_allocation_checks_its_arguments():
    s = {"a": torch.ones(4)}
    with pytest.raises(ValueError, match="max_layer_sparsity"):
        global_allocation(s, {"a": (4, 4)}, 0.5, max_layer_sparsity=0.4)
    with pytest.raises(ValueError, match="norm"):
        global_allocation(s, {"a": (4, 4)}, 0.5, norm="l3")
    with pytest.raises(ValueError, match="same keys"):
        global_allocation(s, {"b": (4, 4)}, 0.5)
    with pytest.raises(ValueError, match="divide"):
        global_allocation({"a": torch.ones(3)}, {"a": (4, 4)}, 0.5)
    with pytest.raises(ValueError, match="method"):
        AdaptiveLayerSparsity(method="ranked")
    assert global_allocation({}, {}, 0.5) == {}
    assert global_allocation(s, {"a": (4, 4)}, 0.0) == {"a": 0.0}


def test_pruning_state_applies_the_global_allocation():
    g = torch.Generator().manual_seed(1)
    params = {"l0": torch.randn(16, 8, generator=g), "l1": torch.randn(16, 16, generator=g) * 0.2,
              "l2": torch.randn(4, 16, generator=g)}
    plan = PruningPlan(Ramp(0.5, 0, 0, "one_shot"), Selection("column", "weight_l2"),
                       allocation=Allocation(max_layer_sparsity=0.8, method="global"))
    state = PruningState()
    state.apply_plan(plan, [(n, tuple(p.shape)) for n, p in params.items()])
    state.begin_round(0, params)
    expected = global_allocation({n: group_scores("weight_l2", "column", p) for n, p in params.items()},
                                 {n: p.shape for n, p in params.items()}, 0.5, max_layer_sparsity=0.8)
    assert state.layer_sparsity == expected
    assert state.actual_layer_sparsity() == pytest.approx(expected)
    assert state.sparsity() == pytest.approx(0.5, abs=16 / 448)
    assert expected["l1"] == math.floor(0.8 * 16) / 16  # the weak layer goes to the cap (whole groups)
    assert plan.config()["AdaptiveLayerSparsity"]["method"] == "global"
