"""Baselines on the same pruning state, wire format and compact clients: Federated Dropout (a strategy that drops
whole units) and PruneFL (a plan contribution whose importance the clients accumulate), each checked against a
plain-torch reference of what its paper does."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
import torch.nn.functional as F
from helpers import GaussianMixtureDataset, MLPClassifier, params_of, quiet_trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn

from lightning_fedprune import FederatedDataModule, FederatedLightningModule
from lightning_fedprune.ablation.record import CellRecord
from lightning_fedprune.baselines import FederatedDropout, PruneFL
from lightning_fedprune.baselines.units import UnitAxis, UnitGroup, find_units, units_of
from lightning_fedprune.federated.channel import Channel
from lightning_fedprune.federated.forward_scales import ForwardScales
from lightning_fedprune.federated.protocol import derive_seed
from lightning_fedprune.federated.strategies import RoundContext
from lightning_fedprune.pruning import group_reduce, groups_from_mask, mask_from_scores
from lightning_fedprune.pruning.compact import compact_module
from lightning_fedprune.pruning.plan import Phase, PruningPlan, phase_at, update_at
from lightning_fedprune.pruning.state import PruningState

TARGETS = r"body\.0\.weight|head\.weight"
HIDDEN = 16


class OneHidden(MLPClassifier):
    """``body.0`` (a hidden layer of 16 units) and ``head``: the hidden units are declared (the head is outside the
    body's nn.Sequential, so the structure alone does not show that it reads them)."""

    def __init__(self, **kwargs):
        super().__init__(in_dim=8, hidden=HIDDEN, num_classes=3, depth=1, lr=0.2, **kwargs)

    def dropout_units(self):
        return [{"units": HIDDEN, "reader": "head.weight", "name": "hidden",
                 "members": [("body.0.weight", 0), ("body.0.bias", 0), {"name": "head.weight", "dim": 1}]}]


def _sub_model(fd, task, rnd, client, masks=None, patterns=None):
    params = dict(task.named_parameters())
    ctx = RoundContext(rnd, params, {}, masks or {}, patterns or {}, task)
    return fd.configure(ctx, [client], [derive_seed(0, rnd, client)])[0]


def _fit(task, strategy=None, callbacks=(), rounds=1, clients=2, local_steps=1, batch_size=60, shuffle=False,
         samples=60, partition="iid", **kwargs):
    init = params_of(task)
    dm = FederatedDataModule(GaussianMixtureDataset(samples * clients, dim=8, num_classes=3), num_clients=clients,
                             batch_size=batch_size, shuffle=shuffle, partition=partition)
    trainer_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in ("enable_checkpointing",)}
    fed = FederatedLightningModule(task, clients_per_round=clients, local_steps=local_steps, strategy=strategy, **kwargs)
    quiet_trainer(max_steps=rounds, callbacks=list(callbacks), **trainer_kwargs).fit(fed, datamodule=dm)
    return fed, dm, init


def _one_hidden(seed=0):
    torch.manual_seed(seed)
    return OneHidden()


# ============================================================================================ Federated Dropout: units
def test_units_are_read_from_sequential_blocks_and_attention_heads():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = nn.Sequential(nn.LayerNorm(6), nn.Linear(6, 10), nn.GELU(), nn.Dropout(0.1), nn.Linear(10, 6))
            self.attn = nn.MultiheadAttention(6, 3)
            self.conv = nn.Sequential(nn.Conv1d(6, 8, 1), nn.GLU(dim=1), nn.Conv1d(4, 4, 3, padding=1, groups=4),
                                      nn.BatchNorm1d(4), nn.SiLU(), nn.Conv1d(4, 6, 1))
            self.tail = nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5), nn.Linear(5, 2))  # a norm over the units

    groups = {g.name: g for g in find_units(Block())}
    assert set(groups) == {"mlp.1 -> mlp.4", "attn heads", "conv.0 -> conv.5"}
    mlp, heads, conv = groups["mlp.1 -> mlp.4"], groups["attn heads"], groups["conv.0 -> conv.5"]
    assert (mlp.units, mlp.reader) == (10, "mlp.4.weight")
    assert [(a.name, a.dim) for a in mlp.members] == [("mlp.1.weight", 0), ("mlp.1.bias", 0), ("mlp.4.weight", 1)]
    assert (heads.units, heads.reader) == (3, "attn.out_proj.weight")
    assert [(a.name, a.dim, a.blocks, a.width) for a in heads.members] == [
        ("attn.in_proj_weight", 0, 3, 2), ("attn.in_proj_bias", 0, 3, 2), ("attn.out_proj.weight", 1, 1, 2)]
    assert conv.units == 4 and [(a.name, a.dim, a.blocks) for a in conv.members] == [
        ("conv.0.weight", 0, 2), ("conv.0.bias", 0, 2), ("conv.2.weight", 0, 1), ("conv.2.bias", 0, 1),
        ("conv.3.weight", 0, 1), ("conv.3.bias", 0, 1), ("conv.5.weight", 1, 1)]


def test_declared_units_are_checked_naming_the_member():
    shapes = {"a.weight": (6, 4), "b.weight": (3, 6)}
    UnitGroup(6, (UnitAxis("a.weight", 0), UnitAxis("b.weight", 1)), "b.weight").check(shapes)
    with pytest.raises(ValueError, match="'c.weight' is not a parameter"):
        UnitGroup(6, (UnitAxis("c.weight", 0),)).check(shapes)
    with pytest.raises(ValueError, match="axis 1 of 'a.weight' has 4 entries"):
        UnitGroup(6, (UnitAxis("a.weight", 1),)).check(shapes)
    with pytest.raises(ValueError, match="reader 'a.weight' must be a member that holds the units along an axis >= 1"):
        UnitGroup(6, (UnitAxis("a.weight", 0),), "a.weight").check(shapes)
    task = _one_hidden()
    (group,) = units_of(task)
    assert group.members == (UnitAxis("body.0.weight", 0), UnitAxis("body.0.bias", 0), UnitAxis("head.weight", 1))
    with pytest.raises(ValueError, match="no unit group"):
        _sub_model(FederatedDropout(0.5), MLPClassifier(depth=1), 0, 0)  # nothing to drop: said, not ignored


def test_dropout_drops_whole_units_consistently_across_the_conformers_tensors():
    """Every FFN hidden unit, attention head and convolution channel of the ablation's Conformer is dropped from
    every tensor that holds it (GLU pairs and q/k/v blocks included); the kept units' reader is scaled."""
    pytest.importorskip("torchaudio")
    from lightning_fedprune.asr.conformer_transducer import ConformerTransducer

    task = ConformerTransducer(preset="tiny", d_model=48, num_layers=2, num_heads=4, ffn_dim=192,
                               subsampling_channels=16, pred_dim=64, joint_dim=64, n_mels=40)
    fd = FederatedDropout(0.5, parameters=r"encoder\.conformer\..*")
    sub = _sub_model(fd, task, 3, 5)
    layer = "encoder.conformer.conformer_layers.1."
    masks, patterns = sub.masks, sub.patterns

    def dropped_rows(name):
        return set((~masks[layer + name].reshape(masks[layer + name].shape[0], -1).all(1)).nonzero().reshape(-1).tolist())

    def dropped_cols(name):
        m = masks[layer + name]
        return set((~m.reshape(m.shape[0], m.shape[1], -1).all(2).all(0)).nonzero().reshape(-1).tolist())

    for ffn in ("ffn1", "ffn2"):  # hidden unit j: row j of the first Linear and its bias, column j of the second
        units = dropped_cols(f"{ffn}.sequential.4.weight")
        assert len(units) == 96 and dropped_rows(f"{ffn}.sequential.1.weight") == units
        assert set((~masks[layer + f"{ffn}.sequential.1.bias"]).nonzero().reshape(-1).tolist()) == units
        assert patterns[layer + f"{ffn}.sequential.1.weight"] == "row"
        assert patterns[layer + f"{ffn}.sequential.4.weight"] == "column"
        assert sub.forward_scales[layer + f"{ffn}.sequential.4.weight"] == 2.0
    heads = {c // 12 for c in dropped_cols("self_attn.out_proj.weight")}  # head h: 12 columns of the output projection
    assert len(heads) == 2 and dropped_cols("self_attn.out_proj.weight") == {12 * h + i for h in heads for i in range(12)}
    for projection in ("q_proj", "k_proj", "v_proj"):  # its query, key and value rows
        assert dropped_rows(f"self_attn.{projection}.weight") == {12 * h + i for h in heads for i in range(12)}
    channels = dropped_cols("conv_module.sequential.5.weight")  # channel c after the GLU: rows c and c + 48 before it
    assert len(channels) == 24 and dropped_rows("conv_module.sequential.0.weight") == channels | {c + 48 for c in channels}
    assert dropped_rows("conv_module.sequential.2.weight") == channels  # the depthwise filter and the norm's affine
    assert set((~masks[layer + "conv_module.sequential.3.weight"]).nonzero().reshape(-1).tolist()) == channels
    assert sub.forward_scales[layer + "self_attn.out_proj.weight"] == 2.0
    # a pure function of the client's seed; another client drops other units
    again = _sub_model(FederatedDropout(0.5, parameters=r"encoder\.conformer\..*"), task, 3, 5)
    assert all(torch.equal(masks[n], again.masks[n]) for n in masks)
    other = _sub_model(fd, task, 3, 6)
    assert not torch.equal(masks[layer + "ffn1.sequential.4.weight"], other.masks[layer + "ffn1.sequential.4.weight"])
    assert not any(n.startswith("encoder.subsampling") for n in masks)  # not selected by `parameters`


def _expectation_over_subsets(module, group, keep, x, compact):
    """The mean output of every sub-model that keeps ``keep`` of the group's units, each built as a client builds
    it (masked weights; the reader compacted or masked-dense; its forward scale), and the scale used."""
    shapes = {n: tuple(p.shape) for n, p in module.named_parameters()}
    full = {n: p.detach().clone() for n, p in module.named_parameters()}
    outs, scale = [], group.units / keep
    for kept in itertools.combinations(range(group.units), keep):
        dropped = torch.tensor([u for u in range(group.units) if u not in kept])
        masks = group.masks(dropped, shapes)
        with torch.no_grad():
            for name, p in module.named_parameters():
                p.copy_(full[name] * masks[name] if name in masks else full[name])
        compacted = compact_module(module, {group.reader: masks[group.reader]}, {group.reader: "column"}) \
            if compact else None
        scaled = ForwardScales(module, {group.reader: scale}, compacted)
        try:
            outs.append(module(x).detach())
        finally:
            scaled.remove()
            if compacted is not None:
                compacted.restore(copy_back=False)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(full[name])
    return torch.stack(outs).mean(0)


@pytest.mark.parametrize("compact", [False, True], ids=["masked-dense", "compact"])
def test_inverted_scaling_makes_the_sub_models_expectation_the_full_models_output(compact):
    """Scaling the reader by 1 / (1 - p) (p = the fraction of units dropped): the mean over every sub-model that
    keeps k of the n units is the full model's output, for any activation (each unit is kept in k/n of them)."""
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(5, 6), nn.GELU(), nn.Linear(6, 3))
    (group,) = find_units(mlp)
    x = torch.randn(7, 5)
    expected = mlp(x).detach()
    torch.testing.assert_close(_expectation_over_subsets(mlp, group, 2, x, compact), expected)
    torch.testing.assert_close(_expectation_over_subsets(mlp, group, 4, x, compact), expected)
    # without the scale the expectation is (1 - p) times the units' part: the full model would be off at evaluation
    biasless = (expected - mlp[2].bias) * 2 / 6 + mlp[2].bias
    assert not torch.allclose(biasless, expected)


def test_inverted_scaling_of_attention_heads():
    """Heads: the mean over every sub-model keeping 2 of 4 heads, out_proj read twice as large, is the full
    attention's output (the scale reaches a weight that nn.MultiheadAttention reads directly)."""
    torch.manual_seed(0)

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 4, batch_first=True)

        def forward(self, x):
            return self.attn(x, x, x, need_weights=False)[0]

    module = Attn()
    (group,) = find_units(module)
    x = torch.randn(2, 5, 8)
    torch.testing.assert_close(_expectation_over_subsets(module, group, 2, x, compact=False), module(x).detach())


def test_dropout_client_step_and_merge_equal_a_plain_torch_reference():
    """One round, two clients, one SGD step each on their sub-model (rows of body.0 and its bias, the matching
    columns of head, head read twice as large), then the per-entry mean over the clients that trained each entry."""
    task = _one_hidden()
    fd = FederatedDropout(rate=0.5)
    fed, dm, init = _fit(task, fd)
    outs, masks = [], []
    for c in range(2):
        sub = _sub_model(FederatedDropout(rate=0.5), _one_hidden(), 0, c)
        m = sub.masks
        assert sub.forward_scales == {"head.weight": 2.0} and set(m) == {"body.0.weight", "body.0.bias", "head.weight"}
        w = {n: (v * m[n] if n in m else v).clone().requires_grad_() for n, v in init.items()}
        idx = dm.partitions[c]
        x, y = dm.train_dataset.x[idx], dm.train_dataset.targets[idx]
        h = F.relu(x @ w["body.0.weight"].T + w["body.0.bias"])
        F.cross_entropy(h @ (2.0 * w["head.weight"]).T + w["head.bias"], y).backward()  # the kept units count twice
        with torch.no_grad():
            outs.append({n: (v - 0.2 * v.grad * (m[n] if n in m else 1)) for n, v in w.items()})
        masks.append(m)
    for name, value in fed.task.state_dict().items():
        if name in masks[0]:
            count = masks[0][name].float() + masks[1][name].float()
            merged = (outs[0][name] + outs[1][name]) / count.clamp_min(1)
            expected = torch.where(count > 0, merged, init[name])
        else:
            expected = (outs[0][name] + outs[1][name]) / 2
        torch.testing.assert_close(value, expected, msg=name)
    # a unit both clients dropped keeps its server values in every tensor that holds it
    both = ~masks[0]["body.0.bias"] & ~masks[1]["body.0.bias"]
    assert both.any()
    assert torch.equal(fed.task.body[0].bias.detach()[both], init["body.0.bias"][both])
    assert torch.equal(fed.task.head.weight.detach()[:, both], init["head.weight"][:, both])


def test_compact_and_masked_dense_dropout_clients_train_the_same_model():
    """The head trains as a compact layer (its input scaled by a hook) or masked-dense (its weight parametrized):
    the same model either way, over rounds with several local steps."""
    runs = [_fit(_one_hidden(), FederatedDropout(0.5), rounds=3, local_steps=3, batch_size=10, shuffle=True,
                 compact_clients=compact)[0] for compact in (True, False)]
    for name, value in runs[0].task.state_dict().items():
        torch.testing.assert_close(runs[1].task.state_dict()[name], value, msg=name)


def test_dropout_warm_up_and_rate_zero_are_fedavg_bit_for_bit():
    kw = dict(rounds=3, clients=3, local_steps=2, batch_size=10, shuffle=True)
    avg, _, _ = _fit(_one_hidden(), None, **kw)
    for fd in (FederatedDropout(rate=0.0), FederatedDropout(rate=0.5, start_round=3)):
        run, _, _ = _fit(_one_hidden(), fd, **kw)
        for name, value in avg.task.state_dict().items():
            assert torch.equal(run.task.state_dict()[name], value), name
    warm, _, _ = _fit(_one_hidden(), FederatedDropout(rate=0.5, start_round=2), **kw)
    assert not torch.equal(warm.task.head.weight, avg.task.head.weight)  # round 2 drops units


def test_dropout_argument_checks_and_spec():
    with pytest.raises(ValueError, match="rate"):
        FederatedDropout(rate=1.0)
    with pytest.raises(ValueError, match="start_round"):
        FederatedDropout(start_round=-1)
    with pytest.raises(ValueError, match="parameters"):
        FederatedDropout(parameters="(")
    with pytest.raises(ValueError, match="scale"):
        FederatedDropout(scale="yes")
    spec = FederatedDropout(rate=0.25, start_round=10, parameters=TARGETS).spec()
    assert spec == {"class_path": "lightning_fedprune.baselines.federated_dropout.FederatedDropout",
                    "init_args": {"rate": 0.25, "start_round": 10, "parameters": TARGETS, "exclude": None,
                                  "scale": True, "server_optimizer": "sgd", "server_lr": 1.0, "server_momentum": None,
                                  "server_betas": None, "server_eps": None, "weighting": "num_samples"}}
    assert FederatedDropout(rate=0.25).config()["strategy"] == "federated_dropout"


def test_dropout_with_pruning_masks_drops_units_among_the_kept_entries():
    task = _one_hidden()
    pruned = torch.ones(3, HIDDEN, dtype=torch.bool)
    pruned[:, :4] = False  # Federated Pruning removed head columns 0-3
    sub = _sub_model(FederatedDropout(0.5), task, 0, 0, {"head.weight": pruned}, {"head.weight": "column"})
    kept = groups_from_mask(sub.masks["head.weight"], "column")
    assert not kept[:4].any() and sub.patterns["head.weight"] == "column"
    units = groups_from_mask(sub.masks["body.0.weight"], "row")
    assert torch.equal(kept, units & torch.arange(HIDDEN).ge(4))  # the same units, minus the pruned columns
    row_pruned = torch.ones(3, HIDDEN, dtype=torch.bool)
    row_pruned[0] = False  # a row pattern and dropped columns: kept entry by entry
    sub = _sub_model(FederatedDropout(0.5), task, 0, 0, {"head.weight": row_pruned}, {"head.weight": "row"})
    assert sub.patterns["head.weight"] == "unstructured" and not sub.masks["head.weight"][0].any()


def test_dropout_with_quantised_payloads_merges_like_the_unquantised_run():
    """payload_bits on top of Federated Dropout: each client's own broadcast is quantised (no error feedback:
    the residual belongs to the round's broadcast), its upload is its quantised change added to the server's
    weights; the merge stays the per-entry mean, within the rounding, and untrained entries stay exact."""
    exact, _, init = _fit(_one_hidden(), FederatedDropout(rate=0.5), rounds=2)
    quant, _, _ = _fit(_one_hidden(), FederatedDropout(rate=0.5), rounds=2, payload_bits=8)
    assert quant.last_summary.bytes_up < exact.last_summary.bytes_up / 2
    for name, value in exact.task.state_dict().items():
        q = quant.task.state_dict()[name]
        tol = 2 * value.abs().max().item() / 127 + 1e-6  # int8, a scale per row: half a step each way, twice
        assert (q - value).abs().max().item() <= 2 * tol, name
        assert not torch.equal(q, value), name
    untrained = None
    for rnd in range(2):
        for c in range(2):
            m = _sub_model(FederatedDropout(rate=0.5), _one_hidden(), rnd, c).masks["head.weight"]
            untrained = ~m if untrained is None else untrained & ~m
    assert untrained.any()  # a unit every client dropped in both rounds (seed 0): the server value, exactly
    assert torch.equal(quant.task.head.weight.detach()[untrained], init["head.weight"][untrained])


def test_cell_record_measures_sub_model_size_and_traffic(tmp_path):
    path = tmp_path / "record.json"
    fed, _, _ = _fit(_one_hidden(), FederatedDropout(rate=0.5), callbacks=[CellRecord(str(path))], rounds=2)
    record = json.loads(path.read_text())
    total = sum(p.numel() for p in fed.task.parameters())
    # 8 of 16 hidden units dropped: 8 rows of body.0 (8 inputs), 8 bias entries, 8 columns of head (3 outputs)
    assert record["total_params"] == total and record["rounds"] == 2
    assert record["client_params_final"] == record["client_params_mean"] == total - 8 * 8 - 8 - 3 * 8
    summary = fed.last_summary
    assert record["bytes_per_client_round_final"] == (summary.bytes_down + summary.bytes_up) / 2
    assert record["bytes_per_client_round_final"] < record["dense_bytes_per_client_round"]


def test_dropout_resumes_bit_identically(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1, filename="{step}")
    kw = dict(rounds=4, local_steps=2, batch_size=10, shuffle=True)
    full, dm, _ = _fit(_one_hidden(), FederatedDropout(0.5, start_round=1), callbacks=[ckpt], enable_checkpointing=True,
                       **kw)
    resumed = FederatedLightningModule(_one_hidden(), clients_per_round=2, local_steps=2,
                                       strategy=FederatedDropout(0.5, start_round=1))
    quiet_trainer(max_steps=4).fit(resumed, datamodule=dm, ckpt_path=tmp_path / "step=2.ckpt")
    for name, value in full.task.state_dict().items():
        assert torch.equal(resumed.task.state_dict()[name], value), name


# ============================================================================================ PruneFL
class Traffic(Callback):
    """Bytes up per round and the clients' results."""

    def __init__(self):
        self.up, self.results = {}, {}

    def on_fed_client_result(self, trainer, pl_module, result):
        self.results.setdefault(result.round, []).append(result)

    def on_fed_round_end(self, trainer, pl_module, summary):
        self.up[summary.round] = summary.bytes_up


def test_prunefl_contributes_a_one_shot_ramp_readjustments_a_fixed_mask_phase_and_client_statistics():
    cb = PruneFL(target_sparsity=0.4, start_round=3, every_n_rounds=5, freeze_round=20, pattern="column",
                 parameters=TARGETS, window=2)
    plan = PruningPlan().with_part(**cb.plan_parts())
    plan.validate()
    parts = cb.plan_parts()
    assert parts["selection"].importance == "sq_gradient_l1" and parts["ramp"].schedule == "one_shot"
    assert parts["statistics"].window == 2 and parts["freeze"].start_round == 20 and parts["freeze"].make_permanent
    assert [r for r in range(30) if update_at(r, plan, 0.4) is not None] == [3, 8, 13, 18]  # none once frozen
    assert phase_at(3, plan) == Phase.RAMP and {phase_at(r, plan) for r in range(8, 20)} == {Phase.REFINE}
    assert {phase_at(r, plan) for r in (4, 7, 20, 29)} == {Phase.FINETUNE}
    state = PruningState()
    state.apply_plan(plan, [("body.0.weight", (16, 8)), ("head.weight", (3, 16))])
    uploads, weights = [], {"body.0.weight": torch.randn(16, 8), "head.weight": torch.randn(3, 16)}
    for r in range(30):
        state.begin_round(r, weights)
        request = state.client_statistics(r)
        if request:
            uploads.append(r)
            assert request == {"sq_gradient": ("body.0.weight", "head.weight")}
        state.end_round({n: torch.zeros_like(w) for n, w in weights.items()},
                        {"sq_gradient": {n: torch.rand_like(w) for n, w in weights.items()}} if request else None)
    assert uploads == [1, 2, 6, 7, 11, 12, 16, 17]  # the two rounds before every mask computation, never after 18
    assert state.permanent and state.client_statistics(29) == {}
    assert "statistics" not in PruneFL(statistics="server").plan_parts()
    with pytest.raises(ValueError, match="start_round"):
        PruneFL(start_round=0)
    with pytest.raises(ValueError, match="until_round"):
        PruneFL(start_round=3, until_round=3)
    with pytest.raises(ValueError, match="until_round.*freeze_round"):
        PruneFL(start_round=3, until_round=12, freeze_round=10)
    with pytest.raises(ValueError, match="freeze_round"):
        PruneFL(start_round=3, freeze_round=3)
    with pytest.raises(ValueError, match="statistics"):
        PruneFL(statistics="both")
    with pytest.raises(ValueError, match="window"):
        PruneFL(window=0)
    with pytest.raises(ValueError, match="pattern"):
        PruneFL(pattern="diagonal")


def test_prunefl_clients_upload_their_sums_in_the_rounds_before_a_mask_computation_only():
    """Rounds 1 and 4 (before the masks of rounds 2 and 5) carry every client's sums: the targets' entries in
    float32, on top of the update; no other round does, and none after the freeze at round 8."""
    def run(statistics):
        watch = Traffic()
        fed, _, _ = _fit(_one_hidden(), None, rounds=10, local_steps=2, batch_size=10, shuffle=True, callbacks=[
            PruneFL(0.5, start_round=2, every_n_rounds=3, freeze_round=8, pattern="column", parameters=TARGETS,
                    statistics=statistics), watch])
        return fed, watch

    fed, clients = run("clients")
    _, server = run("server")
    size = 4 * (HIDDEN * 8 + 3 * HIDDEN)  # float32 entries of body.0.weight and head.weight, pruned ones included
    extra = {r: clients.up[r] - server.up[r] for r in range(10)}
    assert extra == {r: 2 * size if r in (1, 4) else 0 for r in range(10)}
    for r, results in clients.results.items():
        assert all(bool(res.statistics) == (r in (1, 4)) for res in results)
    assert fed.pruning.permanent and fed.pruning.sparsity() == pytest.approx(0.5)


def test_prunefl_statistics_are_the_clients_summed_squared_gradients_weighted_as_the_updates(round_states):
    """Against a plain-torch reference of each client's local steps: masked-dense weights, the squared gradient
    of every entry (pruned ones included) summed over the steps, before the gradient is masked; the server takes
    the mean weighted by the clients' dataset sizes."""
    watch = Traffic()
    start = 3
    fed, dm, _ = _fit(_one_hidden(), None, rounds=start, clients=3, local_steps=3, batch_size=7, shuffle=True,
                      samples=40, partition="dirichlet", callbacks=[
                          PruneFL(0.5, start_round=1, every_n_rounds=2, pattern="column", parameters=TARGETS), watch])
    # round 2: the clients train the round-1 masks and report for the re-adjustment at round 3
    results = watch.results[2]
    assert len(results) == 3 and all(r.statistics for r in results)
    masks = {n: m.clone() for n, m in fed.pruning.masks.items()}  # (recomputed at round 3 only after max_steps)
    sizes = [r.num_samples for r in results]
    assert len(set(sizes)) > 1  # unequal clients: the weighting matters
    expected = {n: torch.zeros_like(m, dtype=torch.float32) for n, m in masks.items()}
    for res, size in zip(results, sizes):
        reference = _reference_client_sums(fed, dm, res, masks)
        got = Channel.read_statistics(res.statistics, like=masks)["sq_gradient"]
        for name in masks:
            torch.testing.assert_close(got[name], reference[name], msg=name)
            assert bool((got[name][~masks[name]] > 0).any()), name  # pruned entries have gradients too
            expected[name] += got[name] * size / sum(sizes)
    for name in masks:
        torch.testing.assert_close(fed.pruning.sq_gradient[name], expected[name], msg=name)


_ROUND_STATES: dict = {}


def _reference_client_sums(fed, dm, result, masks):
    """Plain torch: the client's local steps from the round's global model, recording g * g before masking."""
    state = _ROUND_STATES[result.round]  # the global model the round started from
    seed = derive_seed(fed.seed, result.round, result.client_id)
    task = OneHidden()
    task.load_state_dict(state)
    params = dict(task.named_parameters())
    with torch.no_grad():
        for n, m in masks.items():
            params[n].mul_(m)
    sums = {n: torch.zeros_like(params[n]) for n in masks}
    opt = torch.optim.SGD(task.parameters(), lr=0.2)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        loader = dm.client_data().client_loader(result.client_id, seed)
        batches = iter(loader)
        for _ in range(3):
            try:
                x, y = next(batches)
            except StopIteration:  # the client restarts its loader when its data runs out
                batches = iter(loader)
                x, y = next(batches)
            opt.zero_grad()
            F.cross_entropy(task(x), y).backward()
            for n in masks:
                sums[n] += params[n].grad ** 2
                params[n].grad.mul_(masks[n])
            opt.step()
            with torch.no_grad():
                for n, m in masks.items():
                    params[n].mul_(m)
    return sums


@pytest.fixture
def round_states(monkeypatch):
    """Record the global model each round starts from (for the reference clients)."""
    from lightning_fedprune.federated.module import FederatedLightningModule as Module

    original = Module.training_step

    def training_step(self, batch, batch_idx):
        _ROUND_STATES[int(self.global_step)] = {k: v.detach().clone() for k, v in self.task.state_dict().items()}
        return original(self, batch, batch_idx)

    monkeypatch.setattr(Module, "training_step", training_step)
    yield
    _ROUND_STATES.clear()


def test_prunefl_masks_rank_the_merged_sums_per_structure():
    """The masks computed at a re-adjustment prune the groups with the lowest sums of the merged statistics; the
    next upload replaces the sums (every entry is fresh), the rounds of one window add up."""
    g = torch.Generator().manual_seed(0)
    w = {"w": torch.randn(6, 10, generator=g)}
    plan = PruningPlan().with_part(**PruneFL(0.5, start_round=2, every_n_rounds=3, pattern="column",
                                             window=2).plan_parts())
    state = PruningState()
    state.apply_plan(plan, [("w", (6, 10))])
    window = torch.zeros(6, 10)
    for rnd in range(9):
        state.begin_round(rnd, w)
        if rnd in (2, 5, 8):
            expected = mask_from_scores(group_reduce(window, "column", "l1"), 0.5)
            assert torch.equal(groups_from_mask(state.masks["w"], "column"), expected), rnd
            window = torch.zeros(6, 10)
        request = state.client_statistics(rnd)
        upload = torch.rand(6, 10, generator=g)
        state.end_round({"w": torch.zeros(6, 10)}, {"sq_gradient": {"w": upload}} if request else None)
        if request:
            window = window + upload
        torch.testing.assert_close(state.sq_gradient["w"], window if request else state.sq_gradient["w"])
    restored = PruningState()
    restored.load_state_dict(state.state_dict())
    assert restored.statistics_window_open == state.statistics_window_open
    old = state.state_dict()
    del old["sq_gradient"], old["statistics_window_open"]
    restored.load_state_dict(old)  # an older checkpoint
    assert restored.sq_gradient == {} and not restored.statistics_window_open


def test_prunefl_with_server_statistics_keeps_the_squared_pseudo_gradients():
    """statistics="server": the squared aggregated updates since the masks last changed; pruned entries keep the
    sum of the window in which they were last kept."""
    g = torch.Generator().manual_seed(0)
    w = {"w": torch.randn(6, 10, generator=g)}
    plan = PruningPlan().with_part(**PruneFL(0.5, start_round=2, every_n_rounds=2, pattern="column",
                                             statistics="server").plan_parts())
    state = PruningState()
    state.apply_plan(plan, [("w", (6, 10))])
    acc = torch.zeros(6, 10)
    for rnd in range(7):
        state.begin_round(rnd, w)
        assert state.client_statistics(rnd) == {}
        if rnd in (2, 4, 6):
            expected = mask_from_scores(group_reduce(acc, "column", "l1"), 0.5)
            assert torch.equal(groups_from_mask(state.masks["w"], "column"), expected), rnd
            acc = torch.where(state.masks["w"], torch.zeros_like(acc), acc)
        pseudo = torch.randn(6, 10, generator=g) * (1 + rnd)
        if state.masks:
            pseudo = pseudo * state.masks["w"]
        state.end_round({"w": pseudo})
        acc = acc + pseudo * pseudo
        torch.testing.assert_close(state.sq_gradient["w"], acc)


def test_prunefl_needs_statistics_before_its_first_pruning():
    state = PruningState()
    state.apply_plan(PruningPlan().with_part(**PruneFL(0.5, start_round=1).plan_parts()), [("w", (4, 4))])
    with pytest.raises(RuntimeError, match="no client uploaded its sq_gradient statistics before round 1"):
        state.recompute({"w": torch.randn(4, 4)}, 0.5, 1)


def test_prunefl_fit_prunes_readjusts_freezes_and_resumes_bit_identically(tmp_path):
    def callbacks():  # windows of two rounds: the checkpoint after round 3 falls inside one (rounds 3-4)
        return [PruneFL(0.5, start_round=2, every_n_rounds=3, freeze_round=9, pattern="column", parameters=TARGETS,
                        window=2)]

    kw = dict(rounds=10, local_steps=2, batch_size=10, shuffle=True)
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=4, save_top_k=-1, filename="{step}")
    full, dm, _ = _fit(_one_hidden(), None, callbacks=callbacks() + [ckpt], enable_checkpointing=True, **kw)
    assert full.pruning.sparsity() == pytest.approx(0.5) and full.pruning.last_update_round == 8
    assert full.pruning.permanent and full.pruning.frozen
    resumed = FederatedLightningModule(_one_hidden(), clients_per_round=2, local_steps=2)
    quiet_trainer(max_steps=10, callbacks=callbacks()).fit(resumed, datamodule=dm, ckpt_path=tmp_path / "step=4.ckpt")
    for name, value in full.task.state_dict().items():
        assert torch.equal(resumed.task.state_dict()[name], value), name
    for name, mask in full.pruning.masks.items():
        assert torch.equal(resumed.pruning.masks[name], mask)
        assert torch.equal(resumed.pruning.sq_gradient[name], full.pruning.sq_gradient[name])


def test_units_of_an_attention_module_with_separate_projections_are_its_heads():
    """The Conformer-Transducer's attention keeps q, k, v and out as separate Linears: a head is its rows of q, k
    and v (and biases) and its columns of out_proj, found as nn.MultiheadAttention's are."""
    from lightning_fedprune.asr.conformer_transducer import ConformerTransducer
    from lightning_fedprune.baselines.units import find_units

    task = ConformerTransducer(preset="tiny", d_model=48, num_layers=1, num_heads=4, ffn_dim=96)
    (heads,) = [g for g in find_units(task) if g.reader.endswith("self_attn.out_proj.weight")]
    prefix = "encoder.conformer.conformer_layers.0.self_attn."
    assert heads.units == 4
    assert {(a.name.removeprefix(prefix), a.dim, a.width) for a in heads.members} == {
        (f"{p}_proj.{w}", 0, 12) for p in "qkv" for w in ("weight", "bias")} | {("out_proj.weight", 1, 12)}
    dropped = torch.tensor([2])
    (rows,) = [a for a in heads.members if a.name.endswith("q_proj.weight")]
    assert rows.indices(4, dropped).tolist() == list(range(24, 36))  # head 2 = rows 24..35 of q
