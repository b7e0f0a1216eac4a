"""The pattern protocol: a new pruning pattern is one :class:`Pattern` subclass plus its test file.

``ColumnPairs`` below is the worked example of ``docs/design.md`` (a test checks the page shows this
very class). Registered, it works end to end without a change anywhere else: masks from scores, the
wire round trip, a compact ``nn.Linear``, and a federated fit whose clients train compact layers.
"""

from __future__ import annotations

import copy
import inspect
import pickle
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import GaussianMixtureDataset, MLPClassifier, quiet_trainer
from torch import nn

from lightning_fedprune import FederatedDataModule, FederatedLightningModule
from lightning_fedprune.callbacks import SparsityRampCallback
from lightning_fedprune.pruning.compact import CompactLinear, MaskedDense, compact_linear, compact_module
from lightning_fedprune.pruning import check_pattern, compute_mask, expand_groups, group_reduce, group_size, num_groups
from lightning_fedprune.pruning.patterns import COMPACT_PATTERNS, PATTERNS, STRUCTURED_PATTERNS, Pattern, get_pattern
from lightning_fedprune.pruning.patterns import groups_from_mask, register
from lightning_fedprune.federated.wire import Payload, compact_linear_from_encoded, decode_tensor, encode_tensor

BUILTIN = ("unstructured", "row", "column", "half_row", "half_column")


class ColumnPairs(Pattern):
    """``column_pair``: a group is two adjacent columns ``W[:, 2j:2j + 2]`` (say, the real and the
    imaginary part of one input feature). One block; its values are ``(R, k, 2)``."""

    name = "column_pair"

    def check(self, rows, cols, name):
        if cols % 2:
            raise ValueError(f"pattern 'column_pair' cannot be applied to {name!r}: its {cols} columns do not pair up")

    def num_groups(self, rows, cols):
        return cols // 2

    def reduce(self, x2d, fn):
        rows, cols = x2d.shape
        return fn(x2d.reshape(rows, cols // 2, 2), (0, 2))

    def expand(self, flags, rows, cols):
        return flags.repeat_interleave(2).expand(rows, cols)

    def values(self, x2d, flags):
        rows, cols = x2d.shape
        return [x2d.reshape(rows, cols // 2, 2)[:, flags]]

    def block_shape(self, kept, rows, cols):
        return (rows, kept, 2)

    def scatter_(self, out2d, blocks):
        ((kept, values),) = blocks
        rows, cols = out2d.shape
        out2d.view(rows, cols // 2, 2).index_copy_(1, kept, values.reshape(rows, -1, 2))
        return out2d

    def linear_forward(self, x, weights, kept, bias, out_features):
        columns = torch.stack([2 * kept[0], 2 * kept[0] + 1], dim=1).reshape(-1)
        return F.linear(x.index_select(-1, columns), weights[0].reshape(out_features, -1), bias)


class DensePairs(ColumnPairs):
    """The same groups without a compact layer: structured, but clients keep it masked-dense."""

    name = "dense_pair"
    linear_forward = Pattern.linear_forward


@pytest.fixture
def column_pair():
    pattern = register(ColumnPairs())
    yield pattern
    del PATTERNS[pattern.name]


def _pair_reference(x: torch.Tensor, norm: str) -> torch.Tensor:
    """Pair norms computed pair by pair from the definition."""
    w = x.reshape(x.shape[0], -1).double()
    pairs = [w[:, 2 * j : 2 * j + 2] for j in range(w.shape[1] // 2)]
    return torch.stack([p.abs().sum() if norm == "l1" else p.square().sum().sqrt() for p in pairs])


def _pair_mask(flags: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The elementwise mask of pair flags, written by hand."""
    rows = shape[0]
    cols = flags.numel() * 2
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    for j, keep in enumerate(flags.tolist()):
        mask[:, 2 * j : 2 * j + 2] = keep
    return mask.reshape(shape)


# ------------------------------------------------------------------ the registry
def test_registry_lists_the_builtin_patterns_and_derives_the_listings():
    assert tuple(PATTERNS) == BUILTIN and all(isinstance(p, Pattern) for p in PATTERNS.values())
    assert tuple(STRUCTURED_PATTERNS) == BUILTIN[1:] == STRUCTURED_PATTERNS
    assert tuple(COMPACT_PATTERNS) == BUILTIN[1:] and "unstructured" not in COMPACT_PATTERNS
    assert repr(STRUCTURED_PATTERNS) == repr(BUILTIN[1:]) and len(STRUCTURED_PATTERNS) == 4
    assert STRUCTURED_PATTERNS[0] == "row" and 3 not in STRUCTURED_PATTERNS
    assert [get_pattern(n).name for n in BUILTIN] == list(BUILTIN)


def test_listings_follow_register():
    pattern = register(DensePairs())
    try:
        assert "dense_pair" in PATTERNS and "dense_pair" in STRUCTURED_PATTERNS
        assert not pattern.compactable and "dense_pair" not in COMPACT_PATTERNS
        assert get_pattern("dense_pair") is pattern
    finally:
        del PATTERNS["dense_pair"]
    assert "dense_pair" not in STRUCTURED_PATTERNS and tuple(STRUCTURED_PATTERNS) == BUILTIN[1:]


def test_register_and_get_pattern_name_the_bad_argument():
    with pytest.raises(ValueError, match=r"`pattern` must be a Pattern instance, got 'row'"):
        register("row")
    with pytest.raises(ValueError, match=r"a pattern named 'row' is already registered"):
        register(get_pattern("row"))

    class Nameless(ColumnPairs):
        name = ""

    with pytest.raises(ValueError, match=r"`pattern.name` must be a non-empty string"):
        register(Nameless())
    with pytest.raises(TypeError, match="abstract"):
        type("Incomplete", (Pattern,), {"name": "incomplete"})()
    with pytest.raises(ValueError, match=r"`pattern` must be one of \('unstructured', .*'half_column'\), got 'diagonal'"):
        get_pattern("diagonal")
    with pytest.raises(ValueError, match=r"`patterns\['fc'\]` must be one of"):
        get_pattern(["row"], "patterns['fc']")


def test_a_pattern_pickles_to_the_registered_instance():
    for name in BUILTIN:
        p = get_pattern(name)
        assert pickle.loads(pickle.dumps(p)) is p and copy.deepcopy(p) is p


# ------------------------------------------------------------------ a new pattern, end to end
@pytest.mark.parametrize("shape", [(8, 6), (4, 3, 2), (5, 2)])
@pytest.mark.parametrize("norm", ["l1", "l2"])
def test_column_pair_masks_from_scores(column_pair, shape, norm):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(len(shape)))
    n = shape[0] and x[0].numel() // 2
    assert num_groups("column_pair", shape) == n and group_size("column_pair", shape) == 2 * shape[0]
    scores = group_reduce(x, "column_pair", norm)
    torch.testing.assert_close(scores.double(), _pair_reference(x, norm), rtol=1e-5, atol=1e-6)
    for sparsity in (0.0, 1 / 3, 0.5, 1.0):
        k = round(sparsity * n)
        keep = torch.ones(n, dtype=torch.bool)
        keep[torch.sort(scores, stable=True).indices[:k]] = False
        mask = compute_mask(x, "column_pair", sparsity, norm)
        assert torch.equal(mask, _pair_mask(keep, shape))
        assert torch.equal(groups_from_mask(mask, "column_pair"), keep)
        assert torch.equal(expand_groups(keep, "column_pair", shape), mask)


def test_column_pair_checks(column_pair):
    with pytest.raises(ValueError, match=r"'column_pair' cannot be applied to 'fc.weight': its 5 columns"):
        check_pattern("column_pair", (4, 5), name="fc.weight")
    bad = torch.ones(4, 6, dtype=torch.bool)
    bad[0, 3] = False  # half of pair 1
    with pytest.raises(ValueError, match=r"not a union of whole 'column_pair' groups: group 1 \(of 3\)"):
        groups_from_mask(bad, "column_pair")
    with pytest.raises(ValueError, match=r"not a union of whole 'column_pair' groups"):
        encode_tensor(torch.randn(4, 6), bad, "column_pair")
    SparsityRampCallback(target_sparsity=0.5, pattern="column_pair")  # every pattern argument accepts it
    with pytest.raises(ValueError, match=r"`pattern` must be one of .*'column_pair'"):
        SparsityRampCallback(target_sparsity=0.5, pattern="column_pairs")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64])
def test_column_pair_wire_round_trip(column_pair, dtype):
    w = (torch.randn(6, 8, generator=torch.Generator().manual_seed(0)) * 100).to(dtype)
    keep = torch.tensor([True, False, False, True])
    mask = _pair_mask(keep, w.shape)
    expected = torch.where(mask, w, torch.zeros((), dtype=dtype))

    enc = encode_tensor(w, mask, "column_pair")
    assert (enc.kind, enc.index, list(enc.arrays)) == ("column_pair", "bits", ["index_bits", "values"])
    assert enc.arrays["values"].shape == (6, 2, 2) and enc.nbytes == 1 + 6 * 2 * 2 * w.element_size()
    assert torch.equal(decode_tensor(enc), expected) and torch.equal(enc.mask(), mask)
    ((kept, values),) = enc.blocks()
    assert kept.tolist() == [0, 3] and torch.equal(values, w.reshape(6, 4, 2)[:, keep])
    blob = Payload({"w": enc}).to_bytes()
    assert torch.equal(decode_tensor(Payload.from_bytes(blob)["w"]), expected)

    up = encode_tensor(w, mask, "column_pair", send_index=False)  # the server knows the mask
    assert list(up.arrays) == ["values"] and torch.equal(decode_tensor(up, mask), expected)
    wide = torch.zeros(64, dtype=torch.bool)
    wide[5] = True  # one pair of 64: four int32 bytes beat an eight-byte bitmask
    few = encode_tensor(torch.ones(2, 128, dtype=dtype), _pair_mask(wide, (2, 128)), "column_pair")
    assert few.index == "int32" and few.arrays["index"].tolist() == [5]


@pytest.mark.parametrize("bias", [True, False])
def test_column_pair_compact_layer_matches_masked_dense(column_pair, bias):
    torch.manual_seed(0)
    lin = nn.Linear(10, 6, bias=bias)
    keep = torch.tensor([True, False, True, True, False])
    mask = _pair_mask(keep, lin.weight.shape)
    ref = copy.deepcopy(lin)
    MaskedDense.from_module(ref, {"weight": mask}).apply_()
    cl = compact_linear(lin, mask, "column_pair")
    assert isinstance(cl, CompactLinear) and cl.pattern is column_pair and cl.num_kept() == 6 * 3 * 2
    assert torch.equal(cl.weight.detach(), ref.weight.detach()) and torch.equal(cl.mask(), mask)

    x = torch.randn(3, 4, 10)
    x_ref, x_cl = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ref, y_cl = ref(x_ref), cl(x_cl)
    torch.testing.assert_close(y_cl, y_ref, atol=1e-6, rtol=0)
    g = torch.randn_like(y_ref)
    (y_ref * g).sum().backward()
    (y_cl * g).sum().backward()
    torch.testing.assert_close(x_cl.grad, x_ref.grad, atol=1e-6, rtol=0)
    torch.testing.assert_close(cl.full_grad(), ref.weight.grad * mask, atol=1e-6, rtol=0)

    cl2 = compact_linear_from_encoded(encode_tensor(lin.weight, mask, "column_pair"), lin.bias)
    assert torch.equal(cl2.full_weight(), cl.full_weight()) and torch.equal(cl2(x), cl(x))
    assert torch.equal(pickle.loads(pickle.dumps(cl))(x), cl(x))

    model = nn.Sequential(nn.Linear(10, 6), nn.ReLU(), nn.Linear(6, 4))
    handle = compact_module(model, {"0.weight": mask, "2.weight": _pair_mask(keep[:3], (4, 6))},
                            {"0.weight": "column_pair", "2.weight": "column_pair"})
    assert handle.compacted_names == ["0.weight", "2.weight"] and not handle.fallback


def test_a_structured_pattern_without_compact_layer_stays_masked_dense():
    register(DensePairs())
    try:
        lin = nn.Linear(4, 3)
        mask = _pair_mask(torch.tensor([True, False]), (3, 4))
        with pytest.raises(ValueError, match=r"compact_linear needs a structured pattern with a compact layer"):
            compact_linear(lin, mask, "dense_pair")
        handle = compact_module(nn.Sequential(lin, nn.ReLU()), {"0.weight": mask}, {"0.weight": "dense_pair"})
        assert handle.fallback == {"0.weight": "pattern 'dense_pair' has no compact nn.Linear layer"}
        enc = encode_tensor(lin.weight, mask, "dense_pair")  # the wire needs no compact layer
        assert torch.equal(decode_tensor(enc), lin.weight.detach() * mask)
        with pytest.raises(ValueError, match=r"pattern that has a compact layer"):
            compact_linear_from_encoded(enc)
    finally:
        del PATTERNS["dense_pair"]


def test_column_pair_federated_fit_compact_clients_equal_masked_dense(column_pair, monkeypatch):
    """The whole stack with the new pattern: the server scores pairs, the payload carries kept pairs,
    compact clients train CompactLinear layers, and the result equals masked-dense clients'."""
    import lightning_fedprune.federated.client as client

    compacted = []

    def spy(*args, **kwargs):
        handle = compact_module(*args, **kwargs)
        compacted.append(sorted(handle.compacted_names))
        return handle

    monkeypatch.setattr(client, "compact_module", spy)
    finals, summaries = {}, {}
    for compact in (True, False):
        torch.manual_seed(0)
        task = MLPClassifier(in_dim=8, hidden=16, num_classes=4, depth=1, lr=0.1)
        fed = FederatedLightningModule(task, clients_per_round=2, local_steps=2, compact_clients=compact)
        ramp = SparsityRampCallback(target_sparsity=0.5, pattern="column_pair", parameters=r".*\.weight")
        data = FederatedDataModule(GaussianMixtureDataset(48, dim=8, num_classes=4, seed=0), num_clients=4,
                                   batch_size=8)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            quiet_trainer(max_steps=3, callbacks=[ramp]).fit(fed, datamodule=data)
        assert not [w for w in caught if "failed" in str(w.message)], [str(w.message) for w in caught]
        assert fed.last_summary.clients_ok == 2
        assert set(fed.masks) == {"body.0.weight", "head.weight"}
        for name, mask in fed.masks.items():
            assert mask.float().mean() == 0.5
            assert torch.equal(expand_groups(groups_from_mask(mask, "column_pair"), "column_pair", mask.shape), mask)
            assert fed.pruning.patterns[name] == "column_pair"
        finals[compact] = {n: p.detach().clone() for n, p in fed.task.state_dict().items()}
        summaries[compact] = fed.last_summary
    assert compacted and all(names == ["body.0.weight", "head.weight"] for names in compacted)  # compact=True only
    assert summaries[True].bytes_up == summaries[False].bytes_up < summaries[True].dense_bytes / 2
    for name, value in finals[False].items():
        torch.testing.assert_close(finals[True][name], value, atol=1e-5, rtol=1e-5, msg=name)


def test_docs_show_this_worked_example():
    design = (Path(__file__).parent.parent / "docs" / "design.md").read_text()
    assert inspect.getsource(ColumnPairs) in design
