"""Tests of the pure pruning core: patterns, importance, schedules, allocation."""

from __future__ import annotations

import doctest
import functools
import math
import random
import typing

import pytest
import torch
from torch.nn.utils import prune

from lightning_fedprune import pruning as P
from lightning_fedprune.pruning import allocation, importance, patterns, schedules, select


@functools.lru_cache(maxsize=None)
def _tie_free(shape: tuple[int, ...], seed: int, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    mags = (torch.randperm(n, generator=g) + 1).to(dtype) / n
    signs = torch.randint(0, 2, (n,), generator=g).to(dtype) * 2 - 1
    return (mags * signs).reshape(shape)


def tie_free(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Random-signed tensor whose absolute values are a permutation of 1..n (no ties)."""
    return _tie_free(shape, seed, dtype).clone()


def stable_reference(scores: torch.Tensor, sparsity: float, order=None) -> torch.Tensor:
    """Keep vector by an explicit stable sort: prune the first round(s*n) indices."""
    n = scores.numel()
    k = round(sparsity * n)
    if order is None:
        order = torch.sort(scores, stable=True).indices
    keep = torch.ones(n, dtype=torch.bool)
    keep[order[:k]] = False
    return keep


def loop_reduce(x: torch.Tensor, pattern: str, norm: str) -> torch.Tensor:
    """Group norms computed group by group from the definitions in docs/design.md."""
    w = x.reshape(x.shape[0], -1).double()
    R, C = w.shape
    if pattern == "unstructured":
        groups = [w[r, c : c + 1] for r in range(R) for c in range(C)]
    elif pattern == "row":
        groups = [w[r, :] for r in range(R)]
    elif pattern == "column":
        groups = [w[:, c] for c in range(C)]
    elif pattern == "half_row":  # group h*R + r = row r of block h (block h = columns h*C/2..)
        groups = [w[r, h * C // 2 : (h + 1) * C // 2] for h in range(2) for r in range(R)]
    else:  # half_column: group h*C + c = column c of block h (block h = rows h*R/2..)
        groups = [w[h * R // 2 : (h + 1) * R // 2, c] for h in range(2) for c in range(C)]
    if norm == "l1":
        return torch.stack([g.abs().sum() for g in groups])
    return torch.stack([g.pow(2).sum().sqrt() for g in groups])


SPARSITIES = [0.0, 0.1, 0.25, 1 / 3, 0.5, 0.7, 0.95, 1.0]


# --------------------------------------------------------------------------- references


@pytest.mark.parametrize(
    "shape,sparsity",
    [(shape, s) for shape in [(10,), (7, 13), (8, 3, 3, 3)] for s in SPARSITIES]
    + [((300, 240), s) for s in (0.1, 0.5, 0.95)],  # 72k entries: past the direct-select size
)
def test_unstructured_l1_matches_torch_prune(shape, sparsity):
    w = tie_free(*shape, seed=len(shape))
    expected = prune.L1Unstructured(amount=sparsity).compute_mask(w, torch.ones_like(w)).bool()
    got = P.compute_mask(w, "unstructured", sparsity, "l1")
    assert got.dtype == torch.bool and got.shape == w.shape
    assert torch.equal(got, expected)
    got = P.compute_mask(importance.importance_source("weight_l1", w), "unstructured", sparsity)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("pattern,dim", [("row", 0), ("column", 1)])
@pytest.mark.parametrize("shape", [(6, 9), (64, 40), (33, 128)])
@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_row_column_l2_matches_ln_structured(pattern, dim, shape, sparsity):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(shape[0]), dtype=torch.float64)
    expected = prune.LnStructured(amount=sparsity, n=2, dim=dim).compute_mask(w, torch.ones_like(w))
    scores = P.group_scores("weight_l2", pattern, w)
    got = P.expand_groups(P.mask_from_scores(scores, sparsity), pattern, w.shape)
    assert torch.equal(got, expected.bool())
    assert torch.equal(P.compute_mask(w, pattern, sparsity, "l2"), expected.bool())


@pytest.mark.parametrize("norm,n", [("l1", 1), ("l2", 2)])
def test_conv_row_matches_ln_structured(norm, n):
    w = torch.randn(16, 4, 3, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for sparsity in (0.25, 0.5, 0.8):
        method = prune.LnStructured(amount=sparsity, n=n, dim=0)
        expected = method.compute_mask(w, torch.ones_like(w))
        assert torch.equal(P.compute_mask(w, "row", sparsity, norm), expected.bool())


def applicable(patterns_, shapes):
    """(pattern, shape) pairs where the pattern's split axis is even."""
    out = []
    for pattern in patterns_:
        for shape in shapes:
            rows, cols = shape[0], math.prod(shape[1:])
            if (pattern == "half_row" and cols % 2) or (pattern == "half_column" and rows % 2):
                continue
            out.append((pattern, shape))
    return out


@pytest.mark.parametrize(
    "pattern,shape", applicable(P.PATTERNS, [(4, 6), (6, 2, 2), (2, 4, 1, 3), (8,)])
)
@pytest.mark.parametrize("norm", P.NORMS)
def test_group_reduce_matches_loop_reference(pattern, norm, shape):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    got = P.group_reduce(x, pattern, norm)
    assert got.dim() == 1 and got.numel() == P.num_groups(pattern, shape)
    assert torch.allclose(got.double(), loop_reduce(x, pattern, norm), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- selection


@pytest.mark.parametrize("n", [1, 2, 7, 1000, 70_000, 200_000])
@pytest.mark.parametrize("sparsity", [0.0, 0.01, 0.3, 0.5, 0.999, 1.0])
def test_mask_from_scores_equals_stable_sort_with_many_ties(n, sparsity):
    g = torch.Generator().manual_seed(n)
    scores = torch.randint(0, 50, (n,), generator=g).float()  # heavy ties
    got = P.mask_from_scores(scores, sparsity)
    assert torch.equal(got, stable_reference(scores, sparsity))
    assert int((~got).sum()) == round(sparsity * n)


def test_mask_from_scores_large_tie_free_and_negative():
    scores = torch.randn(150_000, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    order = torch.sort(scores, stable=True).indices
    for sparsity in (0.001, 0.2, 0.5, 0.9, 0.9999):
        expected = stable_reference(scores, sparsity, order)
        assert torch.equal(P.mask_from_scores(scores, sparsity), expected)


def test_mask_from_scores_unrepresentative_sample_falls_back():
    # Every entry the strided sample looks at is 0; the rest are larger. The exact answer must
    # not depend on the sample.
    n = 100_000
    scores = torch.rand(n, generator=torch.Generator().manual_seed(0)) + 1.0
    scores[:: n // select._SAMPLE] = 0.0
    order = torch.sort(scores, stable=True).indices
    for sparsity in (0.05, 0.5, 0.9):
        expected = stable_reference(scores, sparsity, order)
        assert torch.equal(P.mask_from_scores(scores, sparsity), expected)
    sorted_scores = torch.arange(n, dtype=torch.float32)  # sorted, ties-free, also inf/-inf
    sorted_scores[0], sorted_scores[-1] = -math.inf, math.inf
    order = torch.arange(n)
    for sparsity in (0.0001, 0.5, 0.9999):
        expected = stable_reference(sorted_scores, sparsity, order)
        assert torch.equal(P.mask_from_scores(sorted_scores, sparsity), expected)


def test_tie_breaking_prunes_lowest_indices():
    assert P.mask_from_scores(torch.ones(10), 0.3).tolist() == [False] * 3 + [True] * 7
    assert P.mask_from_scores(torch.tensor([2.0, 1, 1, 1, 3]), 0.4).tolist() == [
        True, False, False, True, True
    ]
    big = P.mask_from_scores(torch.zeros(200_000), 0.25)
    assert not big[:50_000].any() and big[50_000:].all()
    # -0.0 and 0.0 are equal scores: index decides
    assert P.mask_from_scores(torch.tensor([0.0, -0.0, 0.0]), 1 / 3).tolist() == [False, True, True]
    m = P.compute_mask(torch.ones(4, 6), "column", 0.5)
    assert m[:, :3].eq(False).all() and m[:, 3:].all()
    m = P.compute_mask(torch.ones(4, 6), "half_row", 0.25)  # groups 0, 1 = rows 0, 1 of block 0
    expected = torch.ones(4, 6, dtype=torch.bool)
    expected[:2, :3] = False
    assert torch.equal(m, expected)
    # deterministic across repeated calls
    w = torch.randint(0, 3, (64, 64)).float()
    assert torch.equal(P.compute_mask(w, "row", 0.5), P.compute_mask(w, "row", 0.5))


def test_num_to_prune_uses_python_round():
    assert [P.num_to_prune(s, 10) for s in (0.25, 0.35, 0.45, 0.05)] == [2, 4, 4, 0]
    from torch.nn.utils.prune import _compute_nparams_toprune

    for s in (0.05, 0.15, 0.25, 0.35, 0.5, 0.65):
        for n in (1, 2, 3, 10, 17, 40):
            assert P.num_to_prune(s, n) == _compute_nparams_toprune(s, n)


# --------------------------------------------------------------------------- patterns


@pytest.mark.parametrize(
    "pattern,shape", applicable(P.PATTERNS, [(12, 10), (8, 4, 3, 3), (6,), (32, 2, 5), (5, 7)])
)
@pytest.mark.parametrize("sparsity", [0.0, 0.13, 0.3, 0.5, 0.77, 1.0])
def test_exact_sparsity_and_round_trip(pattern, shape, sparsity):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(7))
    mask = P.compute_mask(w, pattern, sparsity)
    assert mask.shape == w.shape and mask.dtype == torch.bool
    groups = P.groups_from_mask(mask, pattern)
    n = P.num_groups(pattern, shape)
    assert groups.numel() == n
    assert int((~groups).sum()) == round(sparsity * n)
    assert int((~mask).sum()) == round(sparsity * n) * P.group_size(pattern, shape)
    assert P.group_size(pattern, shape) * n == w.numel()
    assert torch.equal(P.expand_groups(groups, pattern, shape), mask)


@pytest.mark.parametrize("pattern", P.PATTERNS)
def test_conv_round_trip_from_random_groups(pattern):
    shape = (8, 4, 3, 3)
    g = torch.rand(P.num_groups(pattern, shape), generator=torch.Generator().manual_seed(2)) > 0.5
    mask = P.expand_groups(g, pattern, shape)
    assert mask.shape == torch.Size(shape)
    assert torch.equal(P.groups_from_mask(mask, pattern), g)
    assert torch.equal(P.groups_from_mask(mask.float(), pattern), g)  # 0/1 float masks too


def test_conv_column_is_input_channel_kernel_position():
    shape = (4, 2, 3, 3)  # 2-D view (4, 18); column c = (in_channel c // 9, kernel pos c % 9)
    g = torch.ones(18, dtype=torch.bool)
    g[9 + 4] = False  # in_channel 1, kernel position (1, 1)
    mask = P.expand_groups(g, "column", shape)
    assert not mask[:, 1, 1, 1].any()
    assert int((~mask).sum()) == 4


def test_half_row_hand_computed():
    w = torch.tensor([[1.0, 2.0, 10.0, 20.0], [3.0, 4.0, 0.5, 0.5]])
    # block-major groups: [row0 left, row1 left, row0 right, row1 right]
    assert P.group_reduce(w, "half_row", "l1").tolist() == [3.0, 7.0, 30.0, 1.0]
    assert torch.allclose(
        P.group_reduce(w, "half_row", "l2"),
        torch.tensor([math.sqrt(5), 5.0, math.sqrt(500), math.sqrt(0.5)]),
    )
    expected = torch.tensor([[False, False, True, True], [True, True, False, False]])
    assert torch.equal(P.compute_mask(w, "half_row", 0.5), expected)
    assert P.groups_from_mask(expected, "half_row").tolist() == [False, True, True, False]
    # 3-D: (2, 2, 2) -> (2, 4); left block = [:, 0, :], right block = [:, 1, :]
    w3 = w.reshape(2, 2, 2)
    assert torch.equal(P.compute_mask(w3, "half_row", 0.25), torch.tensor(
        [[[True, True], [True, True]], [[True, True], [False, False]]]
    ))


def test_half_column_hand_computed():
    w = torch.tensor([[1.0, 5.0], [2.0, 5.0], [9.0, 0.0], [9.0, -1.0]])
    # block-major groups: [col0 top, col1 top, col0 bottom, col1 bottom]
    assert P.group_reduce(w, "half_column", "l1").tolist() == [3.0, 10.0, 18.0, 1.0]
    expected = torch.tensor([[False, True], [False, True], [True, False], [True, False]])
    assert torch.equal(P.compute_mask(w, "half_column", 0.5), expected)
    assert torch.equal(P.compute_mask(w, "half_column", 0.25), torch.tensor(
        [[True, True], [True, True], [True, False], [True, False]]
    ))
    assert P.groups_from_mask(expected, "half_column").tolist() == [False, True, True, False]
    assert P.num_groups("half_column", (4, 2)) == 4 and P.group_size("half_column", (4, 2)) == 2


def test_to_2d():
    assert P.to_2d(torch.zeros(8, 3, 5, 5)).shape == (8, 75)
    assert P.to_2d(torch.zeros(5)).shape == (5, 1)
    assert P.to_2d(torch.zeros(0, 4)).shape == (0, 4)
    x = torch.arange(24.0).reshape(2, 3, 4)
    assert torch.equal(P.to_2d(x), x.reshape(2, -1))


def test_dtypes():
    w = tie_free(16, 8, seed=9)
    ref = P.compute_mask(w, "unstructured", 0.5)
    assert torch.equal(P.compute_mask(w.double(), "unstructured", 0.5), ref)
    for dt in (torch.float16, torch.bfloat16):
        assert P.group_reduce(w.to(dt), "column").dtype == torch.float32
        assert P.compute_mask(w.to(dt), "column", 0.5).shape == w.shape
    assert P.group_reduce(w.double(), "row", "l2").dtype == torch.float64
    assert P.mask_from_scores(torch.tensor([3, 1, 2]), 1 / 3).tolist() == [True, False, True]


# --------------------------------------------------------------------------- importance


def test_importance_names_and_sources():
    assert P.parse_importance("weight_l1") == ("weight", "l1")
    assert P.parse_importance("gradient_l2") == ("gradient", "l2")
    assert P.parse_importance("momentum_l1") == ("momentum", "l1")
    assert P.parse_importance("weight_x_gradient") == ("weight_x_gradient", "l1")
    builtin = typing.get_args(importance.ImportanceName)  # (other tests register more: the registry is global)
    assert set(builtin) <= set(P.IMPORTANCE) and {P.parse_importance(n)[0] for n in builtin} == set(P.SOURCES)
    w = torch.randn(6, 4)
    g = torch.randn(6, 4)
    m = torch.randn(6, 4)
    assert torch.equal(P.importance_source("weight_l2", w), w)
    assert torch.equal(P.importance_source("gradient_l1", w, gradient=g), g)
    assert torch.equal(P.importance_source("momentum_l2", w, momentum=m), m)
    assert torch.equal(P.importance_source("weight_x_gradient", w, gradient=g), (w * g).abs())
    assert torch.allclose(P.group_scores("gradient_l2", "row", w, gradient=g), g.norm(dim=1))
    assert torch.allclose(P.group_scores("momentum_l1", "column", w, momentum=m), m.abs().sum(0))
    assert torch.allclose(
        P.group_scores("weight_x_gradient", "column", w, gradient=g), (w * g).abs().sum(0)
    )
    wp = torch.nn.Parameter(w.clone())
    assert not P.group_scores("weight_l1", "row", wp).requires_grad


def test_importance_errors():
    w = torch.randn(3, 4)
    with pytest.raises(ValueError, match="importance.*weight_l1"):
        P.parse_importance("weight_l3")
    with pytest.raises(ValueError, match="needs `gradient`"):
        P.importance_source("gradient_l1", w)
    with pytest.raises(ValueError, match="needs `gradient`"):
        P.group_scores("weight_x_gradient", "row", w, momentum=w)
    with pytest.raises(ValueError, match="needs `momentum`"):
        P.importance_source("momentum_l2", w, gradient=w)
    with pytest.raises(ValueError, match="`gradient` must have the weight's shape"):
        P.importance_source("gradient_l1", w, gradient=torch.randn(4, 3))
    with pytest.raises(ValueError, match="`weight` must be a torch.Tensor"):
        P.importance_source("weight_l1", [1.0, 2.0])


# --------------------------------------------------------------------------- schedules

KW = dict(target=0.6, start_round=10, end_round=30)


def test_schedule_known_values():
    assert P.sparsity_at(9, schedule="linear", **KW) == 0.0
    assert P.sparsity_at(10, schedule="linear", **KW) == 0.0
    assert P.sparsity_at(20, schedule="linear", **KW) == pytest.approx(0.3)
    assert P.sparsity_at(25, schedule="linear", **KW) == pytest.approx(0.45)
    assert P.sparsity_at(30, schedule="linear", **KW) == 0.6
    assert P.sparsity_at(1000, schedule="linear", **KW) == 0.6
    assert P.sparsity_at(9, schedule="one_shot", **KW) == 0.0
    assert P.sparsity_at(10, schedule="one_shot", **KW) == 0.6
    assert P.sparsity_at(20, schedule="cubic", **KW) == pytest.approx(0.6 * (1 - 0.5**3))
    assert P.sparsity_at(15, schedule="cubic", **KW) == pytest.approx(0.6 * (1 - 0.75**3))
    assert P.sparsity_at(15, schedule="cubic", power=1.0, **KW) == pytest.approx(0.15)
    assert P.sparsity_at(30, schedule="cubic", **KW) == 0.6
    # step, 4 steps over 20 rounds: increments at rounds 15, 20, 25, 30
    steps = [P.sparsity_at(r, schedule="step", **KW) for r in (10, 14, 15, 19, 20, 25, 29, 30)]
    assert steps == pytest.approx([0.0, 0.0, 0.15, 0.15, 0.3, 0.45, 0.45, 0.6])
    # 3 steps over 10 rounds: increments at 10/3 -> rounds 4, 7 (6.67), 10
    kw3 = dict(target=0.3, start_round=0, end_round=10, num_steps=3)
    got = [P.sparsity_at(r, schedule="step", **kw3) for r in range(11)]
    assert got == pytest.approx([0, 0, 0, 0, 0.1, 0.1, 0.1, 0.2, 0.2, 0.2, 0.3])
    # start == end: jump at start for every schedule
    for sched in P.SCHEDULES:
        kw = dict(target=0.5, start_round=5, end_round=5, schedule=sched)
        assert P.sparsity_at(4, **kw) == 0.0 and P.sparsity_at(5, **kw) == 0.5
    assert P.sparsity_at(3, target=0.0, start_round=0, end_round=10, schedule="cubic") == 0.0


@pytest.mark.parametrize("schedule", P.SCHEDULES)
def test_schedule_monotone_and_bounded(schedule):
    values = [P.sparsity_at(r, schedule=schedule, num_steps=7, **KW) for r in range(60)]
    assert all(b >= a for a, b in zip(values, values[1:]))
    assert all(0.0 <= v <= 0.6 for v in values)
    assert values[0] == 0.0 and values[-1] == 0.6
    assert all(isinstance(v, float) for v in values)


def test_cubic_front_loaded_versus_linear():
    for r in range(11, 30):
        assert P.sparsity_at(r, schedule="cubic", **KW) > P.sparsity_at(r, schedule="linear", **KW)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(target=1.0), "`target`"),
        (dict(target=-0.1), "`target`"),
        (dict(target=True), "`target`"),
        (dict(target="0.5"), "`target`"),
        (dict(start_round=-1), "`start_round`"),
        (dict(start_round=1.5), "`start_round`"),
        (dict(end_round=5), "`end_round`"),
        (dict(schedule="exp"), "`schedule`"),
        (dict(power=0.0), "`power`"),
        (dict(power=-1), "`power`"),
        (dict(num_steps=0), "`num_steps`"),
        (dict(num_steps=2.0), "`num_steps`"),
    ],
)
def test_schedule_validation(kwargs, match):
    base = dict(target=0.5, start_round=10, end_round=20, schedule="linear", power=3.0, num_steps=4)
    base.update(kwargs)
    with pytest.raises(ValueError, match=match):
        P.validate_schedule(**base)
    with pytest.raises(ValueError, match=match):
        P.sparsity_at(12, **base)


def test_schedule_round_validation():
    with pytest.raises(ValueError, match="`round`"):
        P.sparsity_at(-1, schedule="linear", **KW)
    with pytest.raises(ValueError, match="`round`"):
        P.sparsity_at(2.5, schedule="linear", **KW)
    P.validate_schedule(schedule="linear", **KW)  # valid: no error


# --------------------------------------------------------------------------- allocation


def weighted_mean(alloc, sizes):
    return sum(alloc[k] * sizes[k] for k in sizes) / sum(sizes.values())


def test_uniform_allocation():
    sizes = {"a": 10, "b": 20}
    assert P.uniform_allocation(sizes, 0.4) == {"a": 0.4, "b": 0.4}
    with pytest.raises(ValueError, match="`target`"):
        P.uniform_allocation(sizes, 1.0)
    with pytest.raises(ValueError, match=r"`sizes\['b'\]`"):
        P.uniform_allocation({"a": 1, "b": 0}, 0.4)


@pytest.mark.parametrize("seed", range(12))
def test_adaptive_allocation_properties(seed):
    rng = random.Random(seed)
    n_layers = rng.randint(1, 30)
    sizes = {f"l{i}": rng.randint(1, 5_000_000) for i in range(n_layers)}
    imp = {k: math.exp(rng.gauss(0.0, 1.5)) for k in sizes}
    cap = rng.choice([0.5, 0.8, 0.9, 1.0])
    target = rng.uniform(0.0, cap)
    temperature = rng.choice([0.5, 1.0, 2.0, 5.0])
    alloc = P.adaptive_allocation(
        imp, sizes, target, max_layer_sparsity=cap, temperature=temperature
    )
    assert list(alloc) == list(sizes)
    assert abs(weighted_mean(alloc, sizes) - target) < 1e-6
    assert all(0.0 <= s <= cap for s in alloc.values())
    by_importance = sorted(sizes, key=lambda k: imp[k])
    values = [alloc[k] for k in by_importance]
    assert all(b <= a + 1e-12 for a, b in zip(values, values[1:])), "not monotone"
    if n_layers > 1 and target > 0:
        assert values[0] > values[-1]  # the least important layer is pruned more


def test_adaptive_allocation_cap_binds_and_redistributes():
    sizes = {"a": 100, "b": 100, "c": 200}
    imp = {"a": 0.01, "b": 1.0, "c": 1.0}
    alloc = P.adaptive_allocation(imp, sizes, 0.5, max_layer_sparsity=0.7)
    assert alloc["a"] == 0.7
    assert alloc["b"] == pytest.approx(alloc["c"])
    assert alloc["b"] == pytest.approx((0.5 * 400 - 70) / 300)
    assert abs(weighted_mean(alloc, sizes) - 0.5) < 1e-12
    # hand-computed proportional case: s ~ 1/I, equal sizes
    alloc = P.adaptive_allocation({"a": 1.0, "b": 3.0}, {"a": 10, "b": 10}, 0.5)
    assert alloc == pytest.approx({"a": 0.75, "b": 0.25})
    # temperature 2 -> s ~ I^-2
    alloc = P.adaptive_allocation({"a": 1.0, "b": 2.0}, {"a": 10, "b": 10}, 0.5, temperature=2.0)
    assert alloc == pytest.approx({"a": 0.8, "b": 0.2})
    # target == cap -> every layer at the cap
    alloc = P.adaptive_allocation({"a": 1.0, "b": 5.0}, {"a": 3, "b": 7}, 0.6, 0.6)
    assert alloc == pytest.approx({"a": 0.6, "b": 0.6})


def test_adaptive_allocation_uniform_cases():
    sizes = {"a": 10, "b": 300, "c": 7}
    assert P.adaptive_allocation({"a": 2.0, "b": 2.0, "c": 2.0}, sizes, 0.5) == {
        "a": 0.5, "b": 0.5, "c": 0.5
    }
    imp = {"a": 1.0, "b": 2.0, "c": 3.0}
    assert P.adaptive_allocation(imp, sizes, 0.5, temperature=0.0) == {"a": 0.5, "b": 0.5, "c": 0.5}
    assert P.adaptive_allocation(imp, sizes, 0.0) == {"a": 0.0, "b": 0.0, "c": 0.0}
    assert P.adaptive_allocation({"a": 0.0, "b": -1.0, "c": 0.0}, sizes, 0.3) == {
        "a": 0.3, "b": 0.3, "c": 0.3
    }
    assert P.adaptive_allocation({}, {}, 0.3) == {}


def test_adaptive_allocation_zero_negative_and_extreme():
    sizes = {"a": 100, "b": 100, "c": 100}
    alloc = P.adaptive_allocation({"a": 0.0, "b": -3.0, "c": 1.0}, sizes, 0.5, 0.9)
    # non-positive importances are clamped to 1e-12 * max: least important, pruned the most
    assert alloc["a"] == alloc["b"] == pytest.approx(0.75)
    assert 0.0 <= alloc["c"] < 1e-9
    assert abs(weighted_mean(alloc, sizes) - 0.5) < 1e-12
    # extreme spread (w ratios ~1e-300): no underflow, the target is still met exactly
    alloc = P.adaptive_allocation({"a": 1e-3, "b": 1.0, "c": 1e3}, sizes, 0.5, temperature=50.0)
    assert abs(weighted_mean(alloc, sizes) - 0.5) < 1e-9
    assert alloc["a"] == 0.9 and alloc["b"] == pytest.approx(0.6) and alloc["c"] < 1e-12
    alloc = P.adaptive_allocation({"a": 1e-3, "b": 1e3}, {"a": 1, "b": 1}, 0.5, temperature=500.0)
    assert alloc == pytest.approx({"a": 0.9, "b": 0.1})
    imp = {"a": torch.tensor(1.0), "b": torch.tensor(2.0)}  # 1-element tensors are accepted
    alloc = P.adaptive_allocation(imp, {"a": 1, "b": 1}, 0.3)
    assert alloc["a"] > alloc["b"]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(target=0.95), r"`target` \(0.95\) is larger than `max_layer_sparsity` \(0.9\)"),
        (dict(target=1.0), "`target`"),
        (dict(target=-0.2), "`target`"),
        (dict(max_layer_sparsity=1.5), "`max_layer_sparsity`"),
        (dict(max_layer_sparsity=-0.1), "`max_layer_sparsity`"),
        (dict(temperature=-1.0), "`temperature`"),
        (dict(temperature=math.inf), "`temperature`"),
        (dict(importance={"a": 1.0}), "same keys"),
        (dict(importance={"a": 1.0, "b": math.nan}), r"`importance\['b'\]`"),
        (dict(importance={"a": 1.0, "b": "x"}), r"`importance\['b'\]`"),
        (dict(sizes={"a": 3, "b": -1}), r"`sizes\['b'\]`"),
        (dict(sizes={"a": 3, "b": 2.5}), r"`sizes\['b'\]`"),
        (dict(sizes=[3, 4]), "`sizes`"),
        (dict(importance=[1.0, 2.0]), "`importance`"),
    ],
)
def test_adaptive_allocation_validation(kwargs, match):
    args = dict(importance={"a": 1.0, "b": 2.0}, sizes={"a": 3, "b": 4}, target=0.5)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        P.adaptive_allocation(**args)


def test_layer_importance():
    w = torch.full((3, 4), -0.5)
    assert P.layer_importance(w, normalize="none") == 0.5
    assert P.layer_importance(w) == pytest.approx(1.0)
    assert P.layer_importance(w.reshape(-1), shape=(3, 4)) == pytest.approx(1.0)
    conv = torch.full((2, 3, 2, 2), 2.0)  # fan-in 12
    assert P.layer_importance(conv) == pytest.approx(2.0 * math.sqrt(12))
    # the fan-in normalisation removes nn.Linear's init scale (U(-1/sqrt(fan_in), ..))
    torch.manual_seed(0)
    values = [P.layer_importance(torch.nn.Linear(f, 256).weight) for f in (16, 128, 1024)]
    assert all(v == pytest.approx(0.5, rel=0.05) for v in values)
    raw = [P.layer_importance(torch.nn.Linear(f, 256).weight, normalize="none") for f in (16, 1024)]
    assert raw[0] > 5 * raw[1]


def test_layer_importance_errors():
    with pytest.raises(ValueError, match="`normalize`"):
        P.layer_importance(torch.ones(2, 2), normalize="fan_out")
    with pytest.raises(ValueError, match="`scores` has 4 entries"):
        P.layer_importance(torch.ones(2, 2), shape=(3, 2))
    with pytest.raises(ValueError, match="`scores` must be a torch.Tensor"):
        P.layer_importance([1.0])
    with pytest.raises(ValueError, match="NaN"):
        P.layer_importance(torch.tensor([1.0, math.nan]))


@pytest.mark.parametrize("pattern,shape", [("row", (4, 1)), ("row", (4,)), ("column", (1, 4)), ("unstructured", (2, 2))])
def test_expand_groups_returns_a_new_tensor(pattern, shape):
    """Before: a one-column ``row`` mask (a 1-D bias, say) or a one-row ``column`` mask was a view of
    ``group_mask``, so writing to the mask changed the caller's group vector."""
    flags = torch.tensor([True, False, True, True])
    mask = P.expand_groups(flags, pattern, shape)
    assert mask.is_contiguous() and mask.shape == shape
    mask.fill_(False)
    assert flags.tolist() == [True, False, True, True]


@pytest.mark.parametrize(
    "pattern,shape", applicable(patterns.STRUCTURED_PATTERNS, [(8, 6), (4, 2, 3, 3), (6,)])
)
def test_split_groups_are_the_kept_slices(pattern, shape):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(3))
    g = torch.rand(P.num_groups(pattern, shape), generator=torch.Generator().manual_seed(4)) > 0.5
    x2d = P.to_2d(x)
    rows, cols = patterns.shape_2d(shape)
    assert x2d.shape == (rows, cols)
    blocks = patterns.split_groups(x2d, g, pattern)
    assert len(blocks) == (2 if pattern.startswith("half_") else 1)
    # scattering the blocks back gives the masked matrix; kept are the block-local group indices
    out = torch.zeros_like(x2d)
    n = len(g) // len(blocks)
    for h, (kept, values) in enumerate(blocks):
        assert kept.dtype == torch.int64 and torch.equal(kept, g[h * n : (h + 1) * n].nonzero().reshape(-1))
        view = {
            "row": out,
            "column": out.t(),
            "half_row": out[:, h * cols // 2 : (h + 1) * cols // 2],
            "half_column": out[h * rows // 2 : (h + 1) * rows // 2].t(),
        }[pattern]
        view[kept] = values if pattern in ("row", "half_row") else values.t()
    assert torch.equal(out, x2d * P.to_2d(P.expand_groups(g, pattern, shape)))


# --------------------------------------------------------------------------- pattern errors


def test_half_pattern_odd_dimension_errors():
    with pytest.raises(ValueError, match=r"'half_row'.*'fc\.weight'.*\(4, 3\).*axis 1"):
        P.check_pattern("half_row", (4, 3), name="fc.weight")
    with pytest.raises(ValueError, match=r"'half_column'.*'w'.*\(3, 4\).*axis 0"):
        P.check_pattern("half_column", (3, 4), name="w")
    with pytest.raises(ValueError, match=r"\(3, 18\).*axis 0"):
        P.compute_mask(torch.randn(3, 2, 3, 3), "half_column", 0.5, name="conv")
    P.check_pattern("half_row", (3, 2, 3, 3))  # 18 columns: fine
    P.check_pattern("half_row")  # name only: no shape to check
    with pytest.raises(ValueError, match=r"\(5, 1\).*axis 1"):
        P.compute_mask(torch.randn(5), "half_row", 0.5)
    for fn in (
        lambda: P.num_groups("half_row", (2, 5)),
        lambda: P.group_size("half_column", (5, 2)),
        lambda: P.group_reduce(torch.randn(2, 5), "half_row", "l1"),
        lambda: P.expand_groups(torch.ones(4, dtype=torch.bool), "half_row", (2, 5)),
        lambda: P.groups_from_mask(torch.ones(5, 2, dtype=torch.bool), "half_column"),
    ):
        with pytest.raises(ValueError, match="odd length 5"):
            fn()


@pytest.mark.parametrize(
    "fn,match",
    [
        (lambda: P.check_pattern("diagonal", (2, 2)), "`pattern` must be one of"),
        (lambda: P.check_pattern(None, (2, 2)), "`pattern` must be one of"),
        (lambda: P.check_pattern("row", ()), "0-d"),
        (lambda: P.check_pattern("row", (0, 3)), "empty"),
        (lambda: P.check_pattern("row", 5), "`shape`"),
        (lambda: P.to_2d(torch.tensor(1.0)), "0-d"),
        (lambda: P.to_2d([1.0]), "`t` must be a torch.Tensor"),
        (lambda: P.group_reduce(torch.ones(2, 2), "row", "l3"), "`norm`"),
        (lambda: P.group_reduce(torch.ones(2, 2, dtype=torch.complex64), "row", "l1"), "real"),
        (lambda: P.group_reduce(torch.tensor(1.0), "row"), "0-d"),
        (lambda: P.expand_groups(torch.ones(3, dtype=torch.bool), "row", (2, 2)), "`group_mask`"),
        (lambda: P.expand_groups(torch.ones(2), "row", (2, 2)), "`group_mask` must be a boolean"),
        (lambda: P.expand_groups(torch.ones(1, 2, dtype=torch.bool), "row", (2, 2)), "1-D"),
        (lambda: P.groups_from_mask(torch.tensor([[True, False], [True, True]]), "row"),
         "not a union of whole 'row' groups: group 0"),
        (lambda: P.groups_from_mask(torch.tensor([[1, 1, 1, 1], [1, 0, 1, 1]]), "half_row"),
         "group 1"),
        (lambda: P.groups_from_mask(torch.tensor([[0.5, 1.0]]), "row"), "only 0 and 1"),
        (lambda: P.groups_from_mask([True], "row"), "`mask` must be a torch.Tensor"),
        (lambda: P.groups_from_mask(torch.tensor([[True, False]]), "row", name="fc.w"),
         r"the mask of 'fc.w' \(shape \(1, 2\)\) is not a union of whole 'row' groups: group 0"),
        (lambda: P.groups_from_mask(torch.tensor([[2, 0]]), "row", name="fc.w"),
         "the mask of 'fc.w' must be boolean or contain only 0 and 1"),
        (lambda: P.groups_from_mask(torch.ones(3, 1), "half_column", name="fc.w"), "'fc.w'.*odd length 3"),
        (lambda: P.check_pattern("diagonal"), "`pattern` must be one of"),
        (lambda: patterns.shape_2d((), "b"), "'b' is a 0-d"),
        (lambda: patterns.shape_2d((2, -1)), "negative"),
        (lambda: patterns.split_groups(torch.ones(2, 2), torch.ones(4, dtype=torch.bool), "unstructured"),
         "`pattern` must be one of"),
        (lambda: patterns.split_groups(torch.ones(4), torch.ones(4, dtype=torch.bool), "row"), "2-D"),
        (lambda: patterns.split_groups(torch.ones(2, 2), torch.ones(3, dtype=torch.bool), "row"),
         r"`group_mask` must be a 1-D boolean tensor of 2 entries.*shape \(3,\)"),
        (lambda: patterns.split_groups(torch.ones(2, 2), torch.ones(2), "row"), "boolean"),
        (lambda: patterns.split_groups(torch.ones(2, 3), torch.ones(4, dtype=torch.bool), "half_row"),
         "odd length 3"),
        (lambda: P.mask_from_scores(torch.ones(2, 2), 0.5), "1-D"),
        (lambda: P.mask_from_scores(torch.ones(3), 1.5), "`sparsity`"),
        (lambda: P.mask_from_scores(torch.ones(3), -0.1), "`sparsity`"),
        (lambda: P.mask_from_scores(torch.ones(3), True), "`sparsity`"),
        (lambda: P.mask_from_scores(torch.ones(3), None), "`sparsity`"),
        (lambda: P.mask_from_scores(torch.tensor([1.0, math.nan]), 0.5), "NaN"),
        (lambda: P.mask_from_scores(torch.ones(3, dtype=torch.bool), 0.5), "real numbers"),
        (lambda: P.mask_from_scores([1.0, 2.0], 0.5), "`group_scores` must be a torch.Tensor"),
        (lambda: P.compute_mask(torch.ones(3, 3), "row", 2.0), "`sparsity`"),
        (lambda: P.compute_mask("w", "row", 0.5), "`x` must be a torch.Tensor"),
        (lambda: P.num_to_prune(1.01, 10), "`sparsity`"),
    ],
)
def test_validation_errors(fn, match):
    with pytest.raises(ValueError, match=match):
        fn()


def test_mask_from_scores_edge_sizes():
    assert P.mask_from_scores(torch.tensor([1.0]), 0.4).tolist() == [True]
    assert P.mask_from_scores(torch.tensor([1.0]), 0.6).tolist() == [False]
    assert P.mask_from_scores(torch.tensor([]), 0.5).tolist() == []
    assert P.mask_from_scores(torch.tensor([1.0, math.inf, -math.inf]), 2 / 3).tolist() == [
        False, True, False
    ]


# --------------------------------------------------------------------------- docs


@pytest.mark.parametrize("module", [patterns, importance, schedules, allocation])
def test_docstring_examples(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
