"""Baselines on the same pruning state, wire format and compact clients: Federated Dropout (a strategy) and
PruneFL-style pruning (a plan contribution with the accumulated-squared-gradient importance)."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import GaussianMixtureDataset, MLPClassifier, params_of, quiet_trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_fedprune import FederatedDataModule, FederatedLightningModule
from lightning_fedprune.ablation.record import CellRecord
from lightning_fedprune.baselines import FederatedDropout, PruneFL
from lightning_fedprune.federated.protocol import derive_seed
from lightning_fedprune.federated.strategies import RoundContext
from lightning_fedprune.pruning import group_reduce, groups_from_mask, mask_from_scores
from lightning_fedprune.pruning.plan import Phase, PruningPlan
from lightning_fedprune.pruning.state import PruningState

TARGETS = r"body\.0\.weight|head\.weight"


def _client_masks(fd, rnd, client, seed, masks, patterns, params):
    """The sub-model ``fd`` gives one client: ``(masks, patterns)``, or None for the round's."""
    sub = fd.configure(RoundContext(rnd, params, {}, masks, patterns), [client], [seed])[0]
    return None if sub is None else (sub.masks, sub.patterns)


def _mlp_run(strategy=None, callbacks=(), rounds=1, clients=2, local_steps=1, batch_size=60, shuffle=False, seed=0,
             payload_bits=None, **trainer_kwargs):
    torch.manual_seed(seed)
    task = MLPClassifier(in_dim=8, hidden=16, num_classes=3, depth=1, lr=0.2)
    init = params_of(task)
    dm = FederatedDataModule(GaussianMixtureDataset(60 * clients, dim=8, num_classes=3), num_clients=clients,
                             batch_size=batch_size, shuffle=shuffle)
    fed = FederatedLightningModule(task, clients_per_round=clients, local_steps=local_steps, strategy=strategy,
                                   payload_bits=payload_bits)
    quiet_trainer(max_steps=rounds, callbacks=list(callbacks), **trainer_kwargs).fit(fed, datamodule=dm)
    return fed, dm, init


# ---------------------------------------------------------------------------------------------- Federated Dropout
def test_dropout_sub_models_drop_the_rate_of_groups_per_client_deterministically():
    params = {"a": torch.randn(6, 10), "b": torch.randn(4, 8), "bias": torch.randn(4)}
    fd = FederatedDropout(rate=0.3, pattern="column")
    masks0, patterns0 = _client_masks(fd, 0, 0, derive_seed(0, 0, 0), {}, {}, params)
    assert set(masks0) == {"a", "b"} and patterns0 == {"a": "column", "b": "column"}  # 1-D tensors stay whole
    assert int((~groups_from_mask(masks0["a"], "column")).sum()) == 3 and int((~groups_from_mask(masks0["b"], "column")).sum()) == 2
    again, _ = _client_masks(FederatedDropout(rate=0.3), 0, 0, derive_seed(0, 0, 0), {}, {}, params)
    assert all(torch.equal(masks0[n], again[n]) for n in masks0)  # a pure function of the seed
    others = [_client_masks(FederatedDropout(rate=0.3), 0, c, derive_seed(0, 0, c), {}, {}, params)[0]["a"]
              for c in range(1, 6)]
    assert any(not torch.equal(masks0["a"], m) for m in others)  # clients get different sub-models
    # with pruning masks of the same pattern: groups are dropped among the kept ones
    pruned = {"a": torch.ones(6, 10, dtype=torch.bool)}
    pruned["a"][:, :4] = False
    masks, _ = _client_masks(fd, 0, 0, 7, pruned, {"a": "column"}, params)
    flags = groups_from_mask(masks["a"], "column")
    assert not flags[:4].any() and int(flags[4:].sum()) == 6 - round(0.3 * 6)
    with pytest.raises(ValueError, match="same pattern"):
        _client_masks(fd, 0, 0, 7, pruned, {"a": "row"}, params)
    assert _client_masks(FederatedDropout(rate=0.0), 0, 0, 7, {}, {}, params) is None


def test_dropout_argument_checks_and_spec():
    with pytest.raises(ValueError, match="rate"):
        FederatedDropout(rate=1.0)
    with pytest.raises(ValueError, match="pattern"):
        FederatedDropout(pattern="diagonal")
    with pytest.raises(ValueError, match="parameters"):
        FederatedDropout(parameters="(")
    spec = FederatedDropout(rate=0.25, parameters=TARGETS).spec()
    assert spec == {"class_path": "lightning_fedprune.baselines.federated_dropout.FederatedDropout",
                    "init_args": {"rate": 0.25, "pattern": "column", "parameters": TARGETS, "exclude": None,
                                  "server_optimizer": "sgd", "server_lr": 1.0, "server_momentum": None,
                                  "server_betas": None, "server_eps": None, "weighting": "num_samples"}}
    assert FederatedDropout(rate=0.25).config()["strategy"] == "federated_dropout"


def test_dropout_merge_is_the_per_entry_mean_over_the_clients_that_trained_it():
    fed, dm, init = _mlp_run(FederatedDropout(rate=0.5, parameters=TARGETS))
    init_params = {n: v for n, v in init.items()}
    outs, masks = [], []
    for c in range(2):
        m, _ = _client_masks(FederatedDropout(rate=0.5, parameters=TARGETS), 0, c, derive_seed(0, 0, c), {}, {}, init_params)
        t = MLPClassifier(in_dim=8, hidden=16, num_classes=3, depth=1, lr=0.2)
        t.load_state_dict(init)
        with torch.no_grad():
            for name, p in t.named_parameters():
                if name in m:
                    p.mul_(m[name])
        idx = dm.partitions[c]
        torch.nn.functional.cross_entropy(t(dm.train_dataset.x[idx]), dm.train_dataset.targets[idx]).backward()
        for name, p in t.named_parameters():
            if name in m:
                p.grad.mul_(m[name])
        torch.optim.SGD(t.parameters(), lr=0.2).step()
        outs.append(params_of(t))
        masks.append(m)
    for name, value in fed.task.state_dict().items():
        if name in masks[0]:
            count = masks[0][name].float() + masks[1][name].float()
            merged = (outs[0][name] + outs[1][name]) / count.clamp_min(1)
            expected = torch.where(count > 0, merged, init[name])
        else:
            expected = (outs[0][name] + outs[1][name]) / 2
        torch.testing.assert_close(value, expected, msg=name)
    # an entry no client trained keeps its server value: both clients dropped a column here
    both = ~masks[0]["head.weight"] & ~masks[1]["head.weight"]
    assert both.any() and torch.equal(fed.task.head.weight.detach()[both], init["head.weight"][both])


def test_dropout_with_quantised_payloads_merges_like_the_unquantised_run():
    """payload_bits on top of Federated Dropout: each client's own broadcast is quantised (no error feedback:
    the residual belongs to the round's broadcast), its upload is its quantised change added to the server's
    weights; the merge stays the per-entry mean, within the rounding, and untrained entries stay exact."""
    exact, _, init = _mlp_run(FederatedDropout(rate=0.5, parameters=TARGETS), rounds=2)
    quant, _, _ = _mlp_run(FederatedDropout(rate=0.5, parameters=TARGETS), rounds=2, payload_bits=8)
    assert quant.last_summary.bytes_up < exact.last_summary.bytes_up / 2  # tiny rows: the scales weigh a lot
    for name, value in exact.task.state_dict().items():
        q = quant.task.state_dict()[name]
        assert torch.isfinite(q).all(), name
        # int8 with a scale per row: each value is off by at most half a step of its row, twice (down and up)
        tol = 2 * value.abs().max().item() / 127 + 1e-6
        assert (q - value).abs().max().item() <= 2 * tol, name
        assert not torch.equal(q, value), name  # the codes did travel
    params = {n: v for n, v in init.items()}
    untrained = None
    for rnd in range(2):
        for c in range(2):
            m, _ = _client_masks(FederatedDropout(rate=0.5, parameters=TARGETS), rnd, c, derive_seed(0, rnd, c), {}, {},
                                                                              params)
            untrained = ~m["head.weight"] if untrained is None else untrained & ~m["head.weight"]
    assert untrained.any()  # a column every client dropped in both rounds (seed 0): the server value, exactly
    assert torch.equal(quant.task.head.weight.detach()[untrained], init["head.weight"][untrained])


def test_dropout_at_rate_zero_is_fedavg_bit_for_bit():
    fd, _, _ = _mlp_run(FederatedDropout(rate=0.0), rounds=3, clients=3, local_steps=2, batch_size=10, shuffle=True)
    avg, _, _ = _mlp_run(None, rounds=3, clients=3, local_steps=2, batch_size=10, shuffle=True)
    for name, value in avg.task.state_dict().items():
        assert torch.equal(fd.task.state_dict()[name], value), name


def test_cell_record_measures_sub_model_size_and_traffic(tmp_path):
    path = tmp_path / "record.json"
    fed, _, _ = _mlp_run(FederatedDropout(rate=0.5, parameters=TARGETS), callbacks=[CellRecord(str(path))], rounds=2)
    record = json.loads(path.read_text())
    total = sum(p.numel() for p in fed.task.parameters())
    # body.0.weight (16 x 8): 4 of 8 columns dropped; head.weight (3 x 16): 8 of 16 columns dropped
    assert record["total_params"] == total and record["rounds"] == 2
    assert record["client_params_final"] == record["client_params_mean"] == total - 16 * 4 - 3 * 8
    summary = fed.last_summary
    assert record["bytes_per_client_round_final"] == (summary.bytes_down + summary.bytes_up) / 2
    assert record["bytes_per_client_round_final"] < record["dense_bytes_per_client_round"]
    assert record["compact"] is True


# ---------------------------------------------------------------------------------------------- PruneFL
def test_prunefl_contributes_a_one_shot_ramp_periodic_readjustment_and_its_importance():
    cb = PruneFL(target_sparsity=0.4, start_round=3, every_n_rounds=5, pattern="column", parameters=TARGETS)
    parts = cb.plan_parts()
    plan = PruningPlan().with_part(**parts)
    plan.validate()
    assert parts["selection"].importance == "sq_gradient_l1" and parts["ramp"].schedule == "one_shot"
    from lightning_fedprune.pruning.plan import phase_at, update_at

    updates = [r for r in range(30) if update_at(r, plan, 0.4) is not None]
    assert updates == [3, 8, 13, 18, 23, 28]  # no ramp: straight to 0.4, re-adjusted every 5 rounds
    assert phase_at(3, plan) == Phase.RAMP and {phase_at(r, plan) for r in range(8, 30)} == {Phase.REFINE}
    assert {phase_at(r, plan) for r in range(4, 8)} == {Phase.FINETUNE} and plan.freeze is None  # not frozen
    with pytest.raises(ValueError, match="start_round"):
        PruneFL(start_round=0)
    with pytest.raises(ValueError, match="until_round"):
        PruneFL(start_round=3, until_round=3)
    with pytest.raises(ValueError, match="pattern"):
        PruneFL(pattern="diagonal")


def test_sq_gradient_importance_accumulates_restarts_for_kept_entries_and_keeps_pruned_ones():
    """Against a hand-kept reference of the accumulated squared pseudo-gradients."""
    g = torch.Generator().manual_seed(0)
    w = {"w": torch.randn(6, 10, generator=g)}
    plan = PruningPlan().with_part(**PruneFL(0.5, start_round=2, every_n_rounds=2, pattern="column").plan_parts())
    state = PruningState()
    state.apply_plan(plan, [("w", (6, 10))])
    acc = torch.zeros(6, 10)
    mask = torch.ones(6, 10, dtype=torch.bool)
    for rnd in range(7):
        state.begin_round(rnd, w)
        if rnd in (2, 4, 6):
            expected = mask_from_scores(group_reduce(acc, "column", "l1"), 0.5)
            assert torch.equal(groups_from_mask(state.masks["w"], "column"), expected), rnd
            mask = state.masks["w"]
            acc = torch.where(mask, torch.zeros_like(acc), acc)  # the kept entries' window restarts
        pseudo = torch.randn(6, 10, generator=g) * (1 + rnd)
        if state.masks:
            pseudo = pseudo * state.masks["w"]  # the server step gives pruned entries no update
        state.end_round({"w": pseudo})
        acc = acc + pseudo * pseudo
        torch.testing.assert_close(state.sq_gradient["w"], acc)
    # checkpointed with the state; an older checkpoint without it still loads
    restored = PruningState()
    restored.load_state_dict(state.state_dict())
    assert torch.equal(restored.sq_gradient["w"], state.sq_gradient["w"])
    old = state.state_dict()
    del old["sq_gradient"]
    restored.load_state_dict(old)
    assert restored.sq_gradient == {}


def test_prunefl_needs_statistics_before_its_first_pruning():
    state = PruningState()
    state.apply_plan(PruningPlan().with_part(**PruneFL(0.5, start_round=1).plan_parts()), [("w", (4, 4))])
    with pytest.raises(RuntimeError, match="accumulated squared gradient"):
        state.recompute({"w": torch.randn(4, 4)}, 0.5, 1)


def test_prunefl_fit_prunes_readjusts_and_resumes_bit_identically(tmp_path):
    def callbacks():
        return [PruneFL(0.5, start_round=2, every_n_rounds=2, pattern="column", parameters=TARGETS)]

    kwargs = dict(rounds=8, clients=2, local_steps=2, batch_size=10, shuffle=True)
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=4, save_top_k=-1, filename="{step}")
    full, dm, _ = _mlp_run(None, callbacks=callbacks() + [ckpt], enable_checkpointing=True, **kwargs)
    assert full.pruning.sparsity() == pytest.approx(0.5) and full.pruning.last_update_round == 6
    torch.manual_seed(0)
    task = MLPClassifier(in_dim=8, hidden=16, num_classes=3, depth=1, lr=0.2)
    resumed = FederatedLightningModule(task, clients_per_round=2, local_steps=2)
    quiet_trainer(max_steps=8, callbacks=callbacks()).fit(resumed, datamodule=dm, ckpt_path=tmp_path / "step=4.ckpt")
    for name, value in full.task.state_dict().items():
        assert torch.equal(resumed.task.state_dict()[name], value), name
    for name, mask in full.pruning.masks.items():
        assert torch.equal(resumed.pruning.masks[name], mask)
        assert torch.equal(resumed.pruning.sq_gradient[name], full.pruning.sq_gradient[name])
