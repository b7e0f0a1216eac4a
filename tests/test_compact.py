import copy

import pytest
import torch
from torch import nn

from lightning_fedprune.pruning.compact import (
    CompactLinear,
    MaskedDense,
    compact_linear,
    compact_module,
)
from lightning_fedprune.pruning.patterns import STRUCTURED_PATTERNS, expand_groups, num_groups
from lightning_fedprune.federated.wire import compact_linear_from_encoded, encode_tensor


def _mask(shape, pattern, frac=0.5, seed=0):
    n = num_groups(pattern, shape)
    flags = torch.zeros(n, dtype=torch.bool)
    flags[torch.randperm(n, generator=torch.Generator().manual_seed(seed))[: round(frac * n)]] = True
    return expand_groups(flags, pattern, shape)


def _masked_dense(linear, mask):
    ref = copy.deepcopy(linear)
    MaskedDense.from_module(ref, {"weight": mask}).apply_()
    return ref


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("pattern", STRUCTURED_PATTERNS)
def test_forward_backward_matches_masked_dense(pattern, bias):
    torch.manual_seed(0)
    lin = nn.Linear(12, 10, bias=bias)
    with torch.no_grad():
        if bias:
            lin.bias.normal_()
    mask = _mask(lin.weight.shape, pattern, seed=1)
    ref = _masked_dense(lin, mask)
    cl = compact_linear(lin, mask, pattern)

    x = torch.randn(3, 5, 12)
    x_ref = x.clone().requires_grad_()
    x_cl = x.clone().requires_grad_()
    y_ref = ref(x_ref)
    y_cl = cl(x_cl)
    assert y_cl.shape == y_ref.shape
    torch.testing.assert_close(y_cl, y_ref, atol=1e-6, rtol=0)
    if pattern in ("row",):
        pruned_rows = ~mask.any(1)
        expected = ref.bias[pruned_rows] if bias else torch.zeros(int(pruned_rows.sum()))
        assert torch.equal(y_cl[..., pruned_rows], expected.expand_as(y_cl[..., pruned_rows]))

    g = torch.randn_like(y_ref)
    y_ref.backward(g)
    y_cl.backward(g)
    torch.testing.assert_close(x_cl.grad, x_ref.grad, atol=1e-6, rtol=0)
    # gradients of the kept entries: scatter the compact grads to full coordinates
    torch.testing.assert_close(cl.full_grad(), ref.weight.grad * mask, atol=1e-6, rtol=0)
    if bias:
        torch.testing.assert_close(cl.bias.grad, ref.bias.grad, atol=1e-6, rtol=0)


@pytest.mark.parametrize("pattern", STRUCTURED_PATTERNS)
def test_full_weight_roundtrip_and_from_encoded(pattern):
    torch.manual_seed(0)
    lin = nn.Linear(8, 6)
    mask = _mask(lin.weight.shape, pattern, seed=3)
    cl = compact_linear(lin, mask, pattern)
    fw = cl.full_weight()
    assert torch.equal(fw, torch.where(mask, lin.weight.detach(), torch.zeros(())))
    assert torch.equal(cl.mask(), mask)
    assert torch.equal(cl.full_bias(), lin.bias.detach())
    # a compact layer built straight from the wire payload is the same layer
    enc = encode_tensor(lin.weight, mask, pattern)
    cl2 = compact_linear_from_encoded(enc, lin.bias)
    assert torch.equal(cl2.full_weight(), fw)
    x = torch.randn(4, 8)
    assert torch.equal(cl2(x), cl(x))
    # back to nn.Linear
    lin2 = cl.to_linear()
    torch.testing.assert_close(lin2(x), cl(x), atol=1e-6, rtol=0)


@pytest.mark.parametrize("pattern", STRUCTURED_PATTERNS)
def test_optimizer_steps_match_masked_dense(pattern):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    masks = {
        "0.weight": _mask((32, 16), pattern, seed=1),
        "2.weight": _mask((8, 32), pattern, seed=2),
    }
    patterns = {k: pattern for k in masks}
    ref = copy.deepcopy(model)
    cmp = copy.deepcopy(model)
    handle = compact_module(cmp, masks, patterns)
    assert sorted(handle.compacted_names) == sorted(masks) and not handle.fallback

    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9, weight_decay=0.05)
    opt_cmp = torch.optim.SGD(cmp.parameters(), lr=0.1, momentum=0.9, weight_decay=0.05)
    md = MaskedDense.from_module(ref, masks).attach(opt_ref)
    g = torch.Generator().manual_seed(5)
    for _ in range(5):
        x = torch.randn(7, 16, generator=g)
        y = torch.randn(7, 8, generator=g)
        for m, opt in ((ref, opt_ref), (cmp, opt_cmp)):
            opt.zero_grad()
            nn.functional.mse_loss(m(x), y).backward()
            opt.step()
    full = handle.state_dict()
    assert list(full) == list(ref.state_dict())
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(full[k], v, atol=1e-5, rtol=0)
        if k in masks:
            assert not v[~masks[k]].any() and not full[k][~masks[k]].any()
    md.detach()

    # restore copies the trained weights back into the original nn.Linear modules
    handle.restore()
    assert type(cmp[0]) is nn.Linear and type(cmp[2]) is nn.Linear
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(cmp.state_dict()[k], v, atol=1e-5, rtol=0)


def test_adamw_masked_dense_keeps_pruned_zero_and_matches():
    torch.manual_seed(0)
    lin = nn.Linear(10, 6)
    mask = _mask(lin.weight.shape, "column", seed=4)
    ref = _masked_dense(lin, mask)
    cl = compact_linear(lin, mask, "column")
    o_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1)
    o_cl = torch.optim.AdamW(cl.parameters(), lr=1e-2, weight_decay=0.1)
    md = MaskedDense.from_module(ref, {"weight": mask}).attach(o_ref)
    for i in range(4):
        x = torch.randn(5, 10)
        for m, o in ((ref, o_ref), (cl, o_cl)):
            o.zero_grad()
            m(x).pow(2).sum().backward()
            o.step()
        assert not ref.weight[~mask].any()
    torch.testing.assert_close(cl.full_weight(), ref.weight.detach(), atol=1e-5, rtol=0)
    md.detach()


def test_masked_dense_hooks_and_helpers():
    lin = nn.Linear(4, 3)
    mask = torch.tensor([[1, 0, 1, 0]] * 3, dtype=torch.bool)
    with torch.no_grad():
        lin.weight.fill_(float("nan"))
    MaskedDense.from_module(lin, {"weight": mask}).apply_()
    assert torch.equal(lin.weight[~mask], torch.zeros(6))  # exact zeros, even from NaN
    lin.weight.grad = torch.ones(3, 4)
    MaskedDense.from_module(lin, {"weight": mask}).mask_grads_()
    assert torch.equal(lin.weight.grad, mask.float())
    with pytest.raises(KeyError):
        MaskedDense.from_module(lin, {"nope": mask}).apply_()
    MaskedDense.from_module(lin, {"nope": mask}, strict=False).apply_()
    with pytest.raises(ValueError, match="mask shape"):
        MaskedDense.from_module(lin, {"weight": mask.t()}).mask_grads_()

    # grad hook fires at backward, before any clipping
    lin = nn.Linear(4, 3)
    md = MaskedDense.from_module(lin, {"weight": mask}).attach()
    lin(torch.randn(2, 4)).sum().backward()
    assert not lin.weight.grad[~mask].any()
    md.detach()
    lin.weight.grad = None
    lin(torch.randn(2, 4)).sum().backward()
    assert lin.weight.grad[~mask].any()


def test_compact_parameter_count_half_column():
    lin = nn.Linear(1024, 512)
    mask = _mask(lin.weight.shape, "column")
    cl = compact_linear(lin, mask, "column")
    n = sum(p.numel() for p in cl.parameters())
    assert n == 512 * 512 + 512
    assert abs(n / sum(p.numel() for p in lin.parameters()) - 0.5) < 0.001


def test_edge_cases_empty_and_full_blocks():
    torch.manual_seed(0)
    lin = nn.Linear(6, 4)
    x = torch.randn(3, 6)
    for pattern in STRUCTURED_PATTERNS:
        for frac in (0.0, 1.0):
            mask = _mask(lin.weight.shape, pattern, frac=frac)
            cl = compact_linear(lin, mask, pattern)
            torch.testing.assert_close(cl(x), _masked_dense(lin, mask)(x), atol=1e-6, rtol=0)
        # one block empty, the other full
        n = num_groups(pattern, lin.weight.shape)
        flags = torch.arange(n) >= n // 2
        mask = expand_groups(flags, pattern, lin.weight.shape)
        cl = compact_linear(lin, mask, pattern)
        torch.testing.assert_close(cl(x), _masked_dense(lin, mask)(x), atol=1e-6, rtol=0)


def test_compact_errors():
    lin = nn.Linear(6, 4)
    with pytest.raises(ValueError, match="structured"):
        compact_linear(lin, torch.ones(4, 6, dtype=torch.bool), "unstructured")
    bad = torch.ones(4, 6, dtype=torch.bool)
    bad[1, 2] = False
    with pytest.raises(ValueError, match="not a union of whole"):
        compact_linear(lin, bad, "column")
    with pytest.raises(ValueError, match="mask shape"):
        compact_linear(lin, torch.ones(6, 4, dtype=torch.bool), "row")
    with pytest.raises(TypeError):
        compact_linear(nn.Conv1d(2, 2, 3), torch.ones(2, 2, 3, dtype=torch.bool), "row")
    with pytest.raises(ValueError, match=r"'half_row'.*axis 1 \(columns\) has odd length 5"):
        CompactLinear(5, 4, "half_row", [torch.arange(0)] * 2, [torch.zeros(0, 2)] * 2)
    with pytest.raises(ValueError, match=r"'half_column'.*axis 0 \(rows\) has odd length 3"):
        CompactLinear(4, 3, "half_column", [torch.arange(0)] * 2, [torch.zeros(1, 0)] * 2)
    with pytest.raises(ValueError, match="mask of 'linear weight'.*not a union of whole 'half_row'"):
        compact_linear(lin, bad, "half_row")


class _Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(8, 8, 3, padding=1)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.ff1 = nn.Linear(8, 16)
        self.ff2 = nn.Linear(16, 8)
        self.head = nn.Linear(8, 8)
        self.emb = nn.Embedding(8, 8)
        self.head.weight = self.emb.weight  # tied

    def forward(self, x):
        x = self.conv(x.transpose(1, 2)).transpose(1, 2)
        x = x + self.attn(x, x, x, need_weights=False)[0]
        x = x + self.ff2(torch.relu(self.ff1(x)))
        return self.head(x)


def test_compact_module_leaves_mha_conv_tied_unstructured_alone():
    torch.manual_seed(0)
    model = _Model()
    masks = {
        "conv.weight": _mask((8, 8, 3), "row"),
        "attn.in_proj_weight": _mask((24, 8), "row"),
        "attn.out_proj.weight": _mask((8, 8), "column"),
        "ff1.weight": _mask((16, 8), "half_column"),
        "ff1.bias": _mask((16,), "unstructured"),
        "ff2.weight": _mask((8, 16), "column"),
        "head.weight": _mask((8, 8), "row"),
    }
    patterns = {k: ("unstructured" if k == "ff1.bias" else "row") for k in masks}
    patterns.update({"attn.out_proj.weight": "column", "ff1.weight": "half_column", "ff2.weight": "unstructured"})
    ref = copy.deepcopy(model)
    MaskedDense.from_module(ref, masks).apply_()
    x = torch.randn(2, 5, 8)
    expected = ref(x)

    cm = copy.deepcopy(model)
    handle = compact_module(cm, masks, patterns)
    assert handle.compacted_names == ["ff1.weight"]
    assert isinstance(cm.ff1, CompactLinear)
    assert type(cm.attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    assert set(handle.fallback) == set(masks) - {"ff1.weight"}
    assert "MultiheadAttention" in handle.fallback["attn.out_proj.weight"]
    assert "tied" in handle.fallback["head.weight"]
    assert "not structured" in handle.fallback["ff2.weight"]
    assert set(handle.fallback_masks) == set(masks) - {"ff1.weight"}
    MaskedDense.from_module(cm, handle.fallback_masks).apply_()  # ff1.bias still exists under its name
    torch.testing.assert_close(cm(x), expected, atol=1e-5, rtol=0)
    full = handle.full_state()
    assert set(full) == {"ff1.weight", "ff1.bias"}
    assert torch.equal(full["ff1.weight"], ref.ff1.weight.detach())
    assert list(handle.state_dict()) == list(model.state_dict())
    handle.restore()
    assert type(cm.ff1) is nn.Linear
    torch.testing.assert_close(cm(x), expected, atol=1e-5, rtol=0)


def test_compact_linear_pickles_and_moves():
    import pickle

    lin = nn.Linear(8, 6)
    cl = compact_linear(lin, _mask(lin.weight.shape, "half_row"), "half_row")
    cl2 = pickle.loads(pickle.dumps(cl))
    x = torch.randn(2, 8)
    assert torch.equal(cl2(x), cl(x)) and torch.equal(cl2.keep1, cl.keep1)
    cl3 = copy.deepcopy(cl).double()
    assert cl3.keep0.dtype == torch.long and cl3.full_weight().dtype == torch.float64


def test_release_frees_the_full_weight_while_compacted_and_restore_recreates_it():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4))
    weight = model[0].weight
    mask = torch.ones(6, 8, dtype=torch.bool)
    mask[:, ::2] = False
    handle = compact_module(model, {"0.weight": mask}, {"0.weight": "column"}, release=True)
    assert weight.numel() == 0  # the original storage is gone while the compact layer trains
    with torch.no_grad():
        model[0].weight_blocks[0].add_(1.0)
    expected = model[0].full_weight().detach().clone()
    with pytest.raises(RuntimeError, match="copy_back=True"):
        handle.restore(copy_back=False)
    handle.restore(copy_back=True)
    assert model[0].weight is weight and torch.equal(weight, expected)
    assert torch.all(weight[~mask] == 0)


# ------------------------------------------------------------------ the nn.Linear attribute surface
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("pattern", STRUCTURED_PATTERNS)
def test_weight_property_is_the_masked_dense_weight_and_its_gradient_flows(pattern, bias):
    """A task that reads ``layer.weight`` (an L2 penalty, a norm) sees the masked-dense weight, and the
    penalty's gradient reaches the compact blocks exactly as it reaches the kept entries of the reference."""
    torch.manual_seed(0)
    lin = nn.Linear(12, 10, bias=bias)
    mask = _mask(lin.weight.shape, pattern, seed=2)
    ref = _masked_dense(lin, mask)
    cl = compact_linear(lin, mask, pattern)
    assert cl.weight.shape == (10, 12) and cl.weight.dtype == ref.weight.dtype
    assert torch.equal(cl.weight.detach(), ref.weight.detach())
    assert (cl.in_features, cl.out_features) == (ref.in_features, ref.out_features)
    assert (cl.bias is None) == (not bias)

    x = torch.randn(4, 12)
    for m in (ref, cl):
        (m(x).square().mean() + 0.3 * m.weight.square().sum() + m.weight.abs().sum()).backward()
    torch.testing.assert_close(cl.full_grad(), ref.weight.grad * mask, atol=1e-6, rtol=0)
    if bias:
        torch.testing.assert_close(cl.bias.grad, ref.bias.grad, atol=1e-6, rtol=0)


def test_writing_the_weight_of_a_compact_layer_is_a_clear_error():
    lin = nn.Linear(6, 4)
    cl = compact_linear(lin, _mask(lin.weight.shape, "row"), "row")
    with pytest.raises(AttributeError, match=r"CompactLinear.*`weight` is computed from `weight_blocks`.*read-only"):
        cl.weight = nn.Parameter(torch.zeros(4, 6))
    with pytest.raises(AttributeError, match=r"read-only"):
        cl.weight = torch.zeros(4, 6)
    assert isinstance(cl.weight_blocks[0], nn.Parameter)  # nothing was replaced


def test_compact_module_with_weight_reads_matches_masked_dense_training():
    """compact_module + a loss that reads every layer's ``.weight``: identical to masked-dense SGD."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    for pattern in STRUCTURED_PATTERNS:
        masks = {"0.weight": _mask((32, 16), pattern, seed=1), "2.weight": _mask((8, 32), pattern, seed=2)}
        ref, cmp = copy.deepcopy(model), copy.deepcopy(model)
        handle = compact_module(cmp, masks, {k: pattern for k in masks}, release=True)
        opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
        opt_cmp = torch.optim.SGD(cmp.parameters(), lr=0.1, momentum=0.9)
        md = MaskedDense.from_module(ref, masks).attach(opt_ref)
        g = torch.Generator().manual_seed(5)
        for _ in range(4):
            x, y = torch.randn(7, 16, generator=g), torch.randn(7, 8, generator=g)
            for m, opt in ((ref, opt_ref), (cmp, opt_cmp)):
                opt.zero_grad()
                penalty = sum(m[i].weight.square().sum() for i in (0, 2))
                (nn.functional.mse_loss(m(x), y) + 1e-2 * penalty).backward()
                opt.step()
        md.detach()
        handle.restore()
        for k, v in ref.state_dict().items():
            torch.testing.assert_close(cmp.state_dict()[k], v, atol=1e-5, rtol=0, msg=f"{pattern} {k}")
