"""Every kind of compact client layer against its masked-dense layer (and a reference where one exists):
sliced Linear / pointwise Conv1d / LSTM, the dropout between linked layers, compact attention values, the
whole Conformer-Transducer, and federated fits with compact and masked-dense clients."""

import copy

import pytest
import torch
from torch import nn

from lightning_fedprune import FederatedDataModule, FederatedLightningModule
from lightning_fedprune.asr.conformer_transducer import Attend, ConformerTransducer
from lightning_fedprune.asr.librispeech import collate_asr
from lightning_fedprune.callbacks import FineTuneFreeze, MaskRefinementCallback, SparsityRampCallback
from lightning_fedprune.pruning.compact import CompactLinear, MaskedDense, compact_module, plan_compaction
from lightning_fedprune.pruning.patterns import compute_mask
from lightning_fedprune.pruning.sliced import SlicedDropout, SlicedLinear, SlicedLSTM
from lightning_fedprune.pruning.structure import Link, derive_masks, structure_of, wire_pattern

from helpers import quiet_trainer

GROUPS = ["ffn", "attention", "conv", "predictor", "joiner"]
SMALL = dict(preset="tiny", d_model=32, num_heads=4, ffn_dim=48, num_layers=2, conv_kernel_size=5, pred_dim=24,
             joint_dim=20, n_mels=20, subsampling_channels=8, ctc_weight=0.3)


def _keep(n, frac, seed):
    keep = torch.ones(n, dtype=torch.bool)
    keep[torch.randperm(n, generator=torch.Generator().manual_seed(seed))[: round(frac * n)]] = False
    return keep


def _masks_for(model, links, primary):
    shapes = {n: p.shape for n, p in model.named_parameters()}
    masks = derive_masks(primary, links, shapes)
    return masks, {n: wire_pattern(m, "column" if n in primary else None) for n, m in masks.items()}


def _grads_full(handle, name):
    """The compact module's gradients in the original layer's coordinates."""
    layer = handle.compacted[name]
    kept = layer.kept_parameters()
    saved = {k: [p.detach().clone() for p in ps] for k, ps in kept.items()}
    with torch.no_grad():
        for ps in kept.values():
            for p in ps:
                p.copy_(p.grad)
    out = layer.full_state()
    with torch.no_grad():
        for k, ps in kept.items():
            for p, s in zip(ps, saved[k]):
                p.copy_(s)
    return out


def _compare(ref, cmp, handle, masks, *inputs, atol=1e-5, out_fn=lambda y: y):
    """Forward and backward of the masked-dense ``ref`` and the compacted ``cmp``: same outputs, same input
    gradients, same parameter gradients (in full coordinates, masked)."""
    xs_ref = [x.clone().requires_grad_() for x in inputs]
    xs_cmp = [x.clone().requires_grad_() for x in inputs]
    torch.manual_seed(12)  # the same random numbers for both (dropout)
    y_ref = out_fn(ref(*xs_ref))
    torch.manual_seed(12)
    y_cmp = out_fn(cmp(*xs_cmp))
    torch.testing.assert_close(y_cmp, y_ref, atol=atol, rtol=0)
    g = torch.randn_like(y_ref)
    (y_ref * g).sum().backward()
    (y_cmp * g).sum().backward()
    for a, b in zip(xs_ref, xs_cmp):
        torch.testing.assert_close(b.grad, a.grad, atol=atol, rtol=0)
    params = dict(ref.named_parameters())
    for name, layer in handle.compacted.items():
        if not hasattr(layer, "kept_parameters"):
            continue
        for local, grad in _grads_full(handle, name).items():
            full = f"{name}.{local}" if name else local
            expected = params[full].grad * masks[full] if full in masks else params[full].grad
            torch.testing.assert_close(grad, expected, atol=atol, rtol=0, msg=full)


# ------------------------------------------------------------------ sliced Linear and pointwise Conv1d
class FFN(nn.Module):
    def __init__(self, conv=False, dropout=0.0):
        super().__init__()
        make = (lambda i, o: nn.Conv1d(i, o, 1)) if conv else nn.Linear
        self.net = nn.Sequential(make(6, 10), nn.SiLU(), nn.Dropout(dropout), make(10, 5))
        self.conv = conv

    def forward(self, x):
        return self.net(x)

    def pruning_links(self):
        return [Link(("net.0.weight", "net.0.bias"), ("net.3.weight",), between=("net.2",))]


@pytest.mark.parametrize("conv", [False, True])
@pytest.mark.parametrize("own_columns", [False, True])
def test_linked_pair_is_two_small_layers_and_equals_masked_dense(conv, own_columns):
    """Linear(d, k) -> act -> Linear(k, d), nothing scattered or gathered in between; with the first layer's
    own column mask too it holds a product of kept rows and columns and gathers its input."""
    torch.manual_seed(0)
    model = FFN(conv)
    second = _keep(10, 0.4, 1)[None, :].expand(5, 10)
    primary = {"net.3.weight": second.reshape(5, 10, *([1] * conv)).clone()}
    if own_columns:
        primary["net.0.weight"] = _keep(6, 0.5, 2)[None, :].expand(10, 6).reshape(10, 6, *([1] * conv)).clone()
    masks, patterns = _masks_for(model, model.pruning_links(), primary)
    ref, cmp = copy.deepcopy(model), copy.deepcopy(model)
    MaskedDense.from_module(ref, masks).apply_()
    handle = compact_module(cmp, masks, patterns)
    first, last = cmp.net[0], cmp.net[3]
    assert isinstance(first, SlicedLinear) and isinstance(last, SlicedLinear) and not handle.fallback
    assert first.weight_kept.shape == (6, 3 if own_columns else 6) and last.weight_kept.shape == (5, 6)
    assert not first.scatter and last.gather is None and (first.gather is not None) == own_columns
    shape = (3, 6, 7) if conv else (3, 7, 6)
    _compare(ref, cmp, handle, masks, torch.randn(shape))
    full = handle.full_state()
    for name, value in full.items():
        torch.testing.assert_close(value, dict(ref.named_parameters())[name].detach(), atol=0, rtol=0)
    assert first.weight.shape == ref.net[0].weight.shape and torch.equal(first.weight.detach(), ref.net[0].weight.detach())
    assert torch.equal(first.bias.detach(), ref.net[0].bias.detach())
    with pytest.raises(AttributeError, match="read-only"):
        first.weight = nn.Parameter(torch.zeros(1))
    handle.restore()
    assert type(cmp.net[0]) is type(model.net[0]) and torch.equal(cmp.net[0].weight, ref.net[0].weight)


def test_a_broken_link_falls_back_to_scatter_and_gather():
    """The reader is not compactable (a hook): the maker scatters its kept outputs into zeros, exact."""
    torch.manual_seed(0)
    model = FFN()
    masks, patterns = _masks_for(model, model.pruning_links(), {"net.3.weight": _keep(10, 0.4, 1)[None].expand(5, 10).clone()})
    ref, cmp = copy.deepcopy(model), copy.deepcopy(model)
    MaskedDense.from_module(ref, masks).apply_()
    cmp.net[3].register_forward_hook(lambda *a: None)
    handle = compact_module(cmp, masks, patterns)
    assert isinstance(cmp.net[0], SlicedLinear) and cmp.net[0].scatter
    assert "hooks" in handle.fallback["net.3.weight"] and type(cmp.net[2]) is nn.Dropout
    MaskedDense.from_module(cmp, handle.fallback_masks).apply_()
    _compare(ref, cmp, handle, masks, torch.randn(4, 6))
    kinds = {d.module: (d.kind, d.mode) for d in handle.layers}
    assert kinds == {"net.0": ("SlicedLinear", "compact"), "net.3": ("Linear", "masked-dense")}


def test_row_pruned_linear_with_a_live_bias_stays_a_compact_linear():
    lin = nn.Sequential(nn.Linear(6, 4))
    mask = _keep(4, 0.5, 0)[:, None].expand(4, 6).clone()
    handle = compact_module(lin, {"0.weight": mask}, {"0.weight": "row"})
    assert isinstance(lin[0], CompactLinear) and handle.compacted_names == ["0.weight"]


# ------------------------------------------------------------------ the dropout between linked layers
@pytest.mark.parametrize("transposed", [False, True])
def test_sliced_dropout_draws_the_masked_dense_random_numbers(transposed):
    x = torch.randn(4, 5, 12)
    index = torch.tensor([0, 3, 4, 9, 11])
    x_kept = x.index_select(-1, index)
    if transposed:  # e.g. an LSTM's batch-first output, compact or not: a view of a time-major tensor
        x = x.transpose(0, 1).contiguous().transpose(0, 1)
        x_kept = x_kept.transpose(0, 1).contiguous().transpose(0, 1)
    torch.manual_seed(3)
    full = nn.Dropout(0.3).train()(x)
    torch.manual_seed(3)
    kept = SlicedDropout(0.3, index, 12).train()(x_kept)
    assert torch.equal(kept, full.index_select(-1, index))
    assert torch.equal(SlicedDropout(0.3, index, 12).eval()(x[..., :5]), x[..., :5])


# ------------------------------------------------------------------ LSTM
class Pred(nn.Module):
    def __init__(self, layers, batch_first, dropout):
        super().__init__()
        self.lstm = nn.LSTM(6, 8, num_layers=layers, batch_first=batch_first, dropout=dropout)
        self.out = nn.Linear(8, 3)
        self.layers = layers

    def forward(self, x):
        y, (h, c) = self.lstm(x)
        return self.out(y), h, c

    def pruning_links(self):
        links = []
        for k in range(self.layers):
            names = tuple(f"lstm.{w}_l{k}" for w in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))
            reader = "out.weight" if k == self.layers - 1 else f"lstm.weight_ih_l{k + 1}"
            links.append(Link(names, (names[1], reader), gates=4))
        return links


@pytest.mark.parametrize("layers,batch_first,dropout", [(1, True, 0.0), (2, False, 0.0), (2, True, 0.4)])
def test_sliced_lstm_has_fewer_units_and_equals_masked_dense(layers, batch_first, dropout):
    torch.manual_seed(0)
    model = Pred(layers, batch_first, dropout).train()
    primary = {f"lstm.weight_hh_l{k}": _keep(8, 0.4, k)[None].expand(32, 8).clone() for k in range(layers)}
    primary["lstm.weight_ih_l0"] = _keep(6, 0.5, 7)[None].expand(32, 6).clone()
    masks, patterns = _masks_for(model, model.pruning_links(), primary)
    ref, cmp = copy.deepcopy(model), copy.deepcopy(model)
    MaskedDense.from_module(ref, masks).apply_()
    handle = compact_module(cmp, masks, patterns)
    assert isinstance(cmp.lstm, SlicedLSTM) and isinstance(cmp.out, SlicedLinear) and not handle.fallback
    assert [layer.hidden_size for layer in cmp.lstm.layers] == [5] * layers and not cmp.lstm.scatter
    assert cmp.lstm.layers[0].input_size == 3
    x = torch.randn(7, 4, 6) if batch_first else torch.randn(4, 7, 6)
    # the removed units are exact zeros in the masked-dense LSTM: its output and state
    with torch.no_grad():
        y, (h, c) = ref.lstm(x)
    dead = ~masks[f"lstm.weight_hh_l{layers - 1}"].any(0)
    assert not y[..., dead].any() and not h[-1][..., dead].any() and not c[-1][..., dead].any()
    torch.manual_seed(11)
    expect = ref(x)
    torch.manual_seed(11)
    got = cmp(x)
    for a, b in zip(got, expect):  # output, and the state in the full (layers, B, hidden) layout
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    _compare(ref, cmp, handle, masks, x, out_fn=lambda out: out[0])
    # a given state in the full layout (zeros at removed units, as the masked-dense LSTM leaves them) is read
    # at the kept units: the same outputs
    alive = torch.stack([masks[f"lstm.weight_hh_l{k}"].any(0) for k in range(layers)])[:, None, :]
    batch = x.shape[0 if batch_first else 1]
    h0, c0 = torch.randn(layers, batch, 8) * alive, torch.randn(layers, batch, 8) * alive
    ref.eval(), cmp.eval()
    y_ref, (h_ref, c_ref) = ref.lstm(x, (h0, c0))
    y_cmp, (h_cmp, c_cmp) = cmp.lstm(x, (h0, c0))
    torch.testing.assert_close(y_cmp, y_ref[..., ~dead], atol=1e-6, rtol=0)
    torch.testing.assert_close(h_cmp, h_ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(c_cmp, c_ref, atol=1e-6, rtol=0)


def test_lstm_masks_that_are_not_whole_units_stay_masked_dense():
    model = Pred(1, True, 0.0)
    hh = torch.ones(32, 8, dtype=torch.bool)
    hh[:, 3] = False  # a recurrent column without its unit's rows: not a smaller LSTM
    handle = compact_module(model, {"lstm.weight_hh_l0": hh}, {"lstm.weight_hh_l0": "column"}, links=[])
    assert "weight_hh_l0's kept columns are not its kept units" in handle.fallback["lstm.weight_hh_l0"]
    assert type(model.lstm) is nn.LSTM


# ------------------------------------------------------------------ attention with compact values
def test_attend_with_compact_values_equals_the_full_attention_with_zero_features():
    torch.manual_seed(0)
    T, B, D, H = 6, 3, 16, 4
    q, k, v = torch.randn(T, B, D), torch.randn(T, B, D), torch.randn(T, B, D)
    index = torch.tensor([0, 1, 2, 5, 12, 13, 14, 15])  # head 0: 3 features, head 1: 1, head 2: 0, head 3: 4
    v_zero = torch.zeros_like(v)
    v_zero[..., index] = v[..., index]
    pad = torch.zeros(B, T, dtype=torch.bool)
    pad[1, 4:] = True
    full = Attend(H, 0.2).train()
    compact = full.compact_features(index, D)
    assert compact.slots_per_head == 4 and compact.training
    torch.manual_seed(5)
    expected = full(q, k, v_zero, pad)
    torch.manual_seed(5)
    got = compact(q, k, v[..., index], pad)
    torch.testing.assert_close(got, expected[..., index], atol=1e-6, rtol=0)
    assert not expected[..., [i for i in range(D) if i not in index.tolist()]].any()


# ------------------------------------------------------------------ the whole Conformer-Transducer
def NOISE_DRIVEN(model):
    """The key projections' biases: softmax attention is invariant to them (they add ``q . b_k`` to every score
    of a query), so their exact gradient is zero and Adam turns the rounding noise of whichever computation
    into steps of size ``lr``: they are not comparable between any two implementations."""
    return {n for n, _ in model.named_parameters() if n.endswith("k_proj.bias")}


def _batch(n_mels=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([60, 47, 33])
    return {"features": torch.randn(3, 60, n_mels, generator=g), "feature_lengths": lengths,
            "texts": ["one two", "three", "nine eight"]}


def _conformer_masks(model, groups=GROUPS, sparsity=0.5):
    structure = structure_of(model)
    params = dict(model.named_parameters())
    primary = {n: compute_mask(params[n].detach(), "column", sparsity) for g in groups for n in structure.members(g)}
    return _masks_for(model, structure.links, primary)


def test_every_pruned_kind_of_the_conformer_is_compact_and_trains_like_masked_dense():
    torch.manual_seed(0)
    model = ConformerTransducer(**{**SMALL, "dropout": 0.1}).train()
    masks, patterns = _conformer_masks(model)
    ref, cmp = copy.deepcopy(model), copy.deepcopy(model)
    MaskedDense.from_module(ref, masks).apply_()
    decisions, _ = plan_compaction(cmp, masks, patterns)
    assert all(d.mode == "compact" for d in decisions)
    kinds = {d.kind for d in decisions}
    assert kinds == {"SlicedLinear", "SlicedLinear(Conv1d)", "SlicedLSTM", "CompactLinear"}
    handle = compact_module(cmp, masks, patterns, release=True)
    layer = cmp.encoder.conformer.conformer_layers[0]
    assert layer.self_attn.attend.value_slots is not None  # the attention core takes compact values
    assert isinstance(layer.ffn1.sequential[3], SlicedDropout)  # listed in the link: the masked-dense numbers
    assert not handle.fallback and set(handle.compacted_names) == set(masks)
    n_full = sum(p.numel() for p in model.parameters())
    n_compact = sum(p.numel() for p in cmp.parameters())
    assert n_compact < 0.6 * n_full
    # the same loss (dropout included: the same random numbers) and gradients, then the same training
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1)
    opt_cmp = torch.optim.AdamW(cmp.parameters(), lr=1e-2, weight_decay=0.1)
    md = MaskedDense.from_module(ref, masks)
    for step in range(3):
        batch = _batch(seed=step)
        losses = []
        for m, opt in ((ref, opt_ref), (cmp, opt_cmp)):
            torch.manual_seed(100 + step)
            opt.zero_grad()
            loss = m.training_step(batch, step)
            loss.backward()
            if m is ref:
                md.mask_grads_()
            opt.step()
            if m is ref:
                md.apply_()
            losses.append(loss.detach())
        torch.testing.assert_close(losses[1], losses[0], atol=1e-4, rtol=1e-5)
    handle.restore()
    for name, value in ref.state_dict().items():
        if name not in NOISE_DRIVEN(ref):
            torch.testing.assert_close(cmp.state_dict()[name], value, atol=1e-5, rtol=0, msg=name)


# ------------------------------------------------------------------ federated fits
class RandomSpeech(torch.utils.data.Dataset):
    """Random features with digit transcripts, one speaker per four items."""

    def __init__(self, n=16, n_mels=20, seed=0):
        g = torch.Generator().manual_seed(seed)
        words = "zero one two three four five six seven eight nine".split()
        self.items = []
        for i in range(n):
            frames = int(torch.randint(30, 60, (1,), generator=g))
            text = " ".join(words[int(j)] for j in torch.randint(0, 10, (2,), generator=g))
            self.items.append({"features": torch.randn(frames, n_mels, generator=g), "text": text,
                               "speaker": str(i // 4), "id": str(i)})
        self.partition_keys = [it["speaker"] for it in self.items]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def _fit(compact, executor="sequential", groups=GROUPS, rounds=5, dropout=0.1):
    torch.manual_seed(0)
    task = ConformerTransducer(**{**SMALL, "dropout": dropout}, lr=3e-3)
    dm = FederatedDataModule(RandomSpeech(), val_dataset=RandomSpeech(4, seed=1), partition="by_key", batch_size=2,
                             collate_fn=collate_asr)
    fed = FederatedLightningModule(task, clients_per_round=2, local_steps=2, compact_clients=compact,
                                   executor=executor, num_workers=2)
    callbacks = [SparsityRampCallback(target_sparsity=0.5, start_round=1, end_round=2, schedule="linear",
                                      pattern="column", groups=groups),
                 MaskRefinementCallback(every_n_rounds=1, until_round=3), FineTuneFreeze(start_round=4)]
    quiet_trainer(max_steps=rounds, callbacks=callbacks, limit_val_batches=0).fit(fed, datamodule=dm)
    return fed


def test_federated_compact_and_masked_dense_clients_train_the_same_conformer():
    compact, dense = _fit(True), _fit(False)
    assert set(compact.pruning.dependents) and compact.pruning.masks.keys() == dense.pruning.masks.keys()
    for n, m in compact.pruning.masks.items():
        assert torch.equal(m, dense.pruning.masks[n]), n
    a, b = compact.task.state_dict(), dense.task.state_dict()
    for name in set(a) - NOISE_DRIVEN(compact.task):
        torch.testing.assert_close(a[name], b[name], atol=2e-5, rtol=1e-4, msg=name)


def test_the_process_pool_trains_the_compact_conformer_as_the_sequential_executor_does():
    sequential, pool = _fit(True, rounds=3), _fit(True, executor="process", rounds=3)
    a, b = sequential.task.state_dict(), pool.task.state_dict()
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_compact_module_reuses_its_decisions_only_for_the_same_masks_object():
    torch.manual_seed(0)
    model = FFN()
    masks, patterns = _masks_for(model, model.pruning_links(), {"net.3.weight": _keep(10, 0.4, 1)[None].expand(5, 10).clone()})
    for _ in range(2):  # a round's clients: the same replica, masks and patterns objects
        handle = compact_module(model, masks, patterns)
        assert model.net[3].weight_kept.shape == (5, 6)
        handle.restore()
    other, _ = _masks_for(model, model.pruning_links(), {"net.3.weight": _keep(10, 0.7, 2)[None].expand(5, 10).clone()})
    handle = compact_module(model, other, patterns)  # the next round: new masks, new decisions
    assert model.net[3].weight_kept.shape == (5, 3) and model.net[0].weight_kept.shape == (3, 6)
    handle.restore()
