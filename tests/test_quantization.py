"""Quantised payloads: unbiased stochastic rounding up, error feedback down, exact masks, bytes, and the
run-level guarantees (resume, executors) with quantisation on."""

from __future__ import annotations

import pytest
import torch
from helpers import GaussianMixtureDataset, MLPClassifier, checkpoint_and_stop, quiet_trainer

from lightning_fedprune import FederatedDataModule, FederatedLightningModule, SequentialExecutor
from lightning_fedprune.callbacks import FineTuneFreeze, SparsityRampCallback
from lightning_fedprune.federated.wire import decode_tensor, dequantize, encode_state, encode_tensor, quantize
from lightning_fedprune.pruning.patterns import compute_mask


def _dequant(v, bits, generator=None):
    codes, scales = quantize(v, bits, generator)
    return dequantize(codes, scales, bits, v.shape, v.dtype), scales


@pytest.mark.parametrize("bits", [8, 4])
def test_stochastic_rounding_is_unbiased_and_nearest_rounding_is_not(bits):
    torch.manual_seed(0)
    v = torch.randn(6, 40)
    v[:, 0] = 4.0  # every row's scale is 4 / qmax; the other entries fall between codes
    draws = 600
    total = torch.zeros_like(v)
    for seed in range(draws):
        d, scales = _dequant(v, bits, torch.Generator().manual_seed(seed))
        total += d
    mean = total / draws
    scale = scales[0].item()
    # each draw's error is within one code and has variance <= scale^2 / 4: a 5-sigma band for the mean
    assert (mean - v).abs().max().item() < 5 * scale / (2 * draws ** 0.5)
    nearest, _ = _dequant(v, bits)
    assert (nearest - v).abs().max().item() <= scale / 2 + 1e-6  # nearest: at most half a code off
    # ... but biased: a value a third of a code above a code is always rounded down
    third = torch.full((1, 8), scale / 3)
    third[0, 0] = 4.0
    biased, _ = _dequant(third, bits)
    unbiased = torch.stack([_dequant(third, bits, torch.Generator().manual_seed(s))[0] for s in range(draws)]).mean(0)
    assert biased[0, 1:].abs().max().item() == 0.0
    assert (unbiased[0, 1:] - scale / 3).abs().max().item() < 5 * scale / (2 * draws ** 0.5)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("pattern", ["unstructured", "row", "column", "half_row", "half_column"])
def test_quantised_tensors_keep_masks_exact_and_pruned_entries_zero(bits, pattern):
    torch.manual_seed(1)
    w = torch.randn(8, 13 if pattern != "half_row" else 14)
    mask = compute_mask(w, pattern, 0.5)
    for send_index in (True, False):
        enc = encode_tensor(w, mask, pattern, bits=bits, send_index=send_index)
        given = None if send_index else mask
        assert torch.equal(enc.mask(given), mask)
        out = decode_tensor(enc, given)
        assert torch.all(out[~mask] == 0) and not torch.signbit(out[~mask]).any()
        scale = w.abs().max().item() / (2 ** (bits - 1) - 1)
        assert (out[mask] - w[mask]).abs().max().item() <= scale / 2 + 1e-6
    # odd counts pack and unpack (two 4-bit codes a byte)
    v = torch.randn(7)
    assert torch.allclose(_dequant(v, bits)[0], v, atol=v.abs().max().item() / (2 ** (bits - 1) - 1))


def test_bytes_at_half_column_sparsity_are_below_fifteen_percent_of_dense():
    torch.manual_seed(0)
    task = MLPClassifier(in_dim=256, hidden=512, num_classes=10, depth=3)
    state = dict(task.state_dict())
    masks = {n: compute_mask(p, "column", 0.5) for n, p in state.items() if p.dim() == 2}
    patterns = dict.fromkeys(masks, "column")
    floats = [n for n, p in state.items() if p.is_floating_point()]
    dense = sum(p.numel() * p.element_size() for p in state.values())
    for bits, bound in ((8, 0.15), (4, 0.08)):
        down = encode_state(state, masks, patterns, send_index=True, bits=bits, quantized=floats).nbytes
        up = encode_state(state, masks, patterns, send_index=False, bits=bits, quantized=floats,
                          generator=torch.Generator().manual_seed(0), relative=True).nbytes
        assert (down + up) / (2 * dense) <= bound, (bits, (down + up) / (2 * dense))
    plain = encode_state(state, masks, patterns).nbytes + encode_state(state, masks, patterns, send_index=False).nbytes
    assert plain / (2 * dense) > 0.5


def _run(bits=8, executor="sequential", rounds=8, ckpt_dir=None, ckpt_path=None, stop_at=None, lr=0.1, callbacks=()):
    torch.manual_seed(0)
    task = MLPClassifier(in_dim=16, hidden=32, num_classes=4, lr=lr, momentum=0.9)
    dm = FederatedDataModule(GaussianMixtureDataset(240, dim=16, num_classes=4), partition="dirichlet", num_clients=6,
                             alpha=0.5, batch_size=8)
    fed = FederatedLightningModule(task, clients_per_round=3, local_steps=3, payload_bits=bits, executor=executor,
                                   num_workers=2, server_optimizer="sgdm", server_lr=1.0)
    cbs = [SparsityRampCallback(target_sparsity=0.5, start_round=2, end_round=4, pattern="column",
                                parameters=r"body\..*\.weight"), FineTuneFreeze(start_round=6), *callbacks]
    extra, kw = checkpoint_and_stop(ckpt_dir, stop_at)
    cbs += extra
    quiet_trainer(max_steps=rounds, callbacks=cbs, **kw).fit(fed, datamodule=dm, ckpt_path=ckpt_path)
    return fed


def test_quantised_run_resumes_bit_identically_and_agrees_across_executors(tmp_path):
    full = _run()
    _run(ckpt_dir=tmp_path, stop_at=3)
    resumed = _run(ckpt_path=str(tmp_path / "step=3.ckpt"))
    process = _run(executor="process")
    for name, value in full.task.state_dict().items():
        assert torch.equal(resumed.task.state_dict()[name], value), name
        assert torch.equal(process.task.state_dict()[name], value), name
    assert full.pruning.permanent and all(torch.all(full.task.state_dict()[n][~m] == 0) for n, m in full.masks.items())
    # as good as the unquantised run (not the same trajectory: other masks get picked along the way)
    plain = _run(bits=None)
    data = GaussianMixtureDataset(240, dim=16, num_classes=4)
    losses = [torch.nn.functional.cross_entropy(m.task(data.x), data.targets).item() for m in (full, plain)]
    assert losses[0] != losses[1] and losses[0] < 1.1 * losses[1], losses


def test_error_feedback_keeps_the_broadcast_unbiased_and_the_server_model_in_place():
    """With nothing learnt (lr 0) the server's weights never move, and the average of the broadcasts
    converges to them (rounding error fed back); without feedback every broadcast repeats the same error."""
    sent = []

    class Spy(SequentialExecutor):
        def run(self, payload, plans, on_result=None):
            sent.append(decode_tensor(payload.encoded["body.0.weight"]))
            return super().run(payload, plans, on_result)

    class Frozen(MLPClassifier):
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    torch.manual_seed(0)
    task = Frozen(in_dim=16, hidden=32, num_classes=4)
    start = task.body[0].weight.detach().clone()
    dm = FederatedDataModule(GaussianMixtureDataset(120, dim=16, num_classes=4), num_clients=3, batch_size=8)
    fed = FederatedLightningModule(task, clients_per_round=3, local_steps=1, payload_bits=4, executor=Spy())
    quiet_trainer(max_steps=16).fit(fed, datamodule=dm)
    torch.testing.assert_close(task.body[0].weight.detach(), start, rtol=0, atol=1e-6)  # the mean of equal updates
    one = (sent[0] - start).abs().mean().item()
    averaged = (torch.stack(sent).mean(0) - start).abs().mean().item()
    assert averaged < one / 4
