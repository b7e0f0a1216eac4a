"""Server strategies: pure aggregation and the masked server step, against plain torch references;
a new strategy is one subclass, selectable from Python and YAML."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import GaussianMixtureDataset, MLPClassifier, params_of, quiet_trainer

from lightning_fedprune import FederatedDataModule, FederatedLightningModule, SequentialExecutor
from lightning_fedprune.federated.protocol import ClientResult, LoggedValue
from lightning_fedprune.federated.strategies import (
    Aggregate,
    FedAdam,
    FedAvg,
    FedAvgM,
    RoundContext,
    ServerAdam,
    ServerSGD,
    Strategy,
    SubModel,
)


def _results(*states_weights, logged=None):
    results, states = [], []
    for i, (state, weight) in enumerate(states_weights):
        results.append(ClientResult(i, 0, num_samples=weight, loss=float(i + 1), logged=logged[i] if logged else {}))
        states.append(state)
    return results, states


def _ctx(params, buffers=None, masks=None):
    return RoundContext(0, params, buffers or {}, masks or {}, {n: "unstructured" for n in masks or {}})


def _aggregate(strategy, results, states, params, buffers=None):
    return strategy.aggregate(_ctx(params, buffers), results, states, [None] * len(results))


def test_aggregate_is_the_weighted_mean_with_loss_and_logged_values():
    a, b = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(3)}, {"w": torch.tensor([4.0, 8.0]), "n": torch.tensor(6)}
    results, states = _results((a, 2.0), (b, 1.0), logged=[{"acc": LoggedValue(0.5, 20.0)}, {"acc": LoggedValue(0.8, 10.0)}])
    agg = _aggregate(FedAvg(), results, states, {"w": a["w"]}, {"n": a["n"]})
    assert agg.ok == [0, 1] and agg.failed == {} and agg.weight == 3.0
    torch.testing.assert_close(agg.average["w"], torch.tensor([2.0, 4.0]))
    assert agg.average["n"].item() == 4  # integer buffers: float64 mean, rounded
    assert agg.train_loss == pytest.approx((1 * 2 + 2 * 1) / 3)
    assert agg.logged["acc"].value == pytest.approx(0.6) and agg.logged["acc"].weight == 30.0
    # pure: the inputs are untouched
    assert torch.equal(a["w"], torch.tensor([1.0, 2.0])) and results[0].ok


def test_aggregate_leaves_out_failed_and_non_finite_clients_and_overflow(monkeypatch):
    good = {"w": torch.tensor([1.0, 1.0])}
    nan = {"w": torch.tensor([float("nan"), 1.0])}
    results, states = _results((good, 1.0), (nan, 1.0), ({"w": torch.tensor([3.0, 3.0])}, 1.0))
    results[2].error = "RuntimeError: boom"
    states[2] = None
    agg = _aggregate(FedAvg(), results, states, {"w": good["w"]})
    assert agg.ok == [0] and agg.failed == {1: "non-finite values in 'w'", 2: "RuntimeError: boom"}
    torch.testing.assert_close(agg.average["w"], good["w"])
    # finite clients whose average is not finite (an overflow; rounding alone hardly reaches it, so the
    # average is forced to inf here): the update is skipped, every client reported, none blamed alone
    import lightning_fedprune.federated.strategies.base as strategy_module

    real = strategy_module.weighted_average
    monkeypatch.setattr(strategy_module, "weighted_average",
                        lambda states, weights, names: {n: v * float("inf") for n, v in real(states, weights, names).items()})
    results, states = _results((good, 1.0), (good, 1.0))
    agg = _aggregate(FedAvg(), results, states, {"w": good["w"]})
    assert agg.ok == [] and agg.average == {} and sorted(agg.failed) == [0, 1]
    assert all("not finite (overflow)" in reason for reason in agg.failed.values())


@pytest.mark.parametrize("strategy, reference", [
    (FedAvg(0.5), lambda p: torch.optim.SGD(p, lr=0.5)),
    (FedAvgM(0.5, 0.9), lambda p: torch.optim.SGD(p, lr=0.5, momentum=0.9)),
    (FedAdam(0.05, (0.9, 0.99), 1e-3), lambda p: torch.optim.Adam(p, lr=0.05, betas=(0.9, 0.99), eps=1e-3)),
])
def test_step_is_the_optimiser_on_the_pseudo_gradient_and_keeps_pruned_server_values(strategy, reference):
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(4, 3))
    buf = torch.zeros(3)
    mask = torch.rand(4, 3) > 0.4
    ref = torch.nn.Parameter(w.detach().clone())
    strategy.setup({"w": w})
    opt, ref_opt = strategy.optimizer, reference([ref])
    assert isinstance(opt, ServerAdam if isinstance(strategy, FedAdam) else ServerSGD)
    for _ in range(3):  # several rounds: momentum / moments carry over on the server
        average = {"w": w.detach() - torch.randn(4, 3) * 0.1, "b": torch.randn(3)}
        before = w.detach().clone()
        pseudo = strategy.apply(_ctx({"w": w}, {"b": buf}, {"w": mask}), Aggregate(average), {"w": w}, {"b": buf})
        ref.grad = (ref.detach() - average["w"]) * mask
        ref_opt.step()
        torch.testing.assert_close(pseudo["w"], (before - average["w"]) * mask)
        assert torch.equal(w.detach()[~mask], before[~mask])  # pruned entries keep the server's value
        torch.testing.assert_close(w.detach()[mask], ref.detach()[mask])
        assert torch.equal(buf, average["b"]) and w.grad is None


def test_fedavg_with_lr_one_is_the_average_itself():
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0, 3.0]))
    average = {"w": torch.tensor([0.1, 0.2, 0.3])}
    strategy = FedAvg(1.0)
    strategy.setup({"w": w})
    strategy.apply(_ctx({"w": w}, masks={"w": torch.tensor([True, False, True])}), Aggregate(average), {"w": w}, {})
    assert torch.equal(w.detach(), torch.tensor([0.1, 2.0, 0.3]))


class CoordinateMedian(FedAvg):
    """A new strategy in one class: the coordinate-wise median of the clients' weights (robust aggregation),
    then FedAvg's plain step."""

    def aggregate(self, ctx, results, states, sub_models) -> Aggregate:
        agg = super().aggregate(ctx, results, states, sub_models)
        if agg.ok:
            for name in agg.average:
                stacked = torch.stack([states[i][name].float() for i in agg.ok])
                agg.average[name] = stacked.median(dim=0).values.to(states[agg.ok[0]][name].dtype)
        return agg


def test_a_custom_strategy_plugs_in_and_is_recorded(tmp_path):
    torch.manual_seed(0)
    task = MLPClassifier(in_dim=8, hidden=16, num_classes=3, lr=0.2)
    dm = FederatedDataModule(GaussianMixtureDataset(120, dim=8, num_classes=3), num_clients=3, batch_size=40,
                             shuffle=False)
    init = params_of(task)
    fed = FederatedLightningModule(task, clients_per_round=3, local_steps=1, strategy=CoordinateMedian())
    trainer = quiet_trainer(max_steps=1, enable_checkpointing=True, default_root_dir=tmp_path)
    trainer.fit(fed, datamodule=dm)
    # reference: the median of one SGD step on each client
    outs = []
    for c in range(3):
        t = MLPClassifier(in_dim=8, hidden=16, num_classes=3, lr=0.2)
        t.load_state_dict(init)
        idx = dm.partitions[c]
        torch.nn.functional.cross_entropy(t(dm.train_dataset.x[idx]), dm.train_dataset.targets[idx]).backward()
        torch.optim.SGD(t.parameters(), lr=0.2).step()
        outs.append(params_of(t))
    for name, value in fed.task.state_dict().items():
        torch.testing.assert_close(value, torch.stack([o[name] for o in outs]).median(dim=0).values, msg=name)
    assert fed.hparams["strategy"]["class_path"].endswith("CoordinateMedian")
    ckpt = next(tmp_path.rglob("*.ckpt"))
    loaded = FederatedLightningModule.load_from_checkpoint(ckpt)  # the strategy is rebuilt from its record
    assert isinstance(loaded.strategy, CoordinateMedian)


def test_strategy_argument_checks():
    with pytest.raises(ValueError, match="strategy"):
        FederatedLightningModule(MLPClassifier(), strategy="fedavg")
    with pytest.raises(ValueError, match="server_lr"):
        FedAvg(float("inf"))
    with pytest.raises(ValueError, match="server_betas"):
        FedAdam(server_betas=(0.9, 1.5))
    assert FedAdam(0.1).spec() == {"class_path": "lightning_fedprune.federated.strategies.fedavg.FedAdam",
                                   "init_args": {"server_lr": 0.1, "server_betas": [0.9, 0.99], "server_eps": 1e-3,
                                                 "weighting": "num_samples"}}
    with pytest.raises(TypeError, match="abstract"):
        Strategy()  # the base declares what a strategy must say: configure, aggregate, make_optimizer
    assert isinstance(Strategy.from_spec(FedAvgM(0.5).spec()), FedAvgM)
    assert copy.deepcopy(FedAvg()).server_lr == 1.0


class OddClientsDropColumns(FedAvg):
    """Odd clients train a sub-model without the first half of head.weight's columns (Federated-Dropout-like)."""

    def configure(self, ctx, cohort, seeds):
        w = ctx.params["head.weight"]
        mask = torch.ones_like(w, dtype=torch.bool)
        mask[:, : w.shape[1] // 2] = False
        odd = SubModel({**ctx.masks, "head.weight": mask}, {**ctx.patterns, "head.weight": "column"})
        return [odd if client % 2 else None for client in cohort]


def test_a_strategy_can_give_clients_their_own_sub_model():
    seen = []

    class Spy(SequentialExecutor):
        def run(self, payload, plans, on_result=None):
            results = super().run(payload, plans, on_result)
            seen.append([(p.client_id, (p.payload or payload), r) for p, r in zip(plans, results)])
            return results

    torch.manual_seed(0)
    task = MLPClassifier(in_dim=8, hidden=16, num_classes=3, lr=0.2)
    init = params_of(task)
    dm = FederatedDataModule(GaussianMixtureDataset(120, dim=8, num_classes=3), num_clients=2, batch_size=60,
                             shuffle=False)
    fed = FederatedLightningModule(task, clients_per_round=2, local_steps=1, strategy=OddClientsDropColumns(),
                                   executor=Spy())
    quiet_trainer(max_steps=1).fit(fed, datamodule=dm)
    (c0, p0, r0), (c1, p1, r1) = seen[0]
    assert (c0, c1) == (0, 1) and p0 is not p1
    _, masks1, _ = p1.encoded.read()
    assert not masks1["head.weight"][:, :8].any() and masks1["head.weight"][:, 8:].all()
    assert r1.payload["head.weight"].nbytes == 3 * 8 * 4  # only its sub-model travels up
    assert fed.last_summary.bytes_down == p0.encoded.nbytes + p1.encoded.nbytes < 2 * p0.encoded.nbytes
    # the plain average of the two uploads (client 1's missing columns count as zeros: the base aggregate)
    outs = []
    for c, drop in ((0, False), (1, True)):
        t = MLPClassifier(in_dim=8, hidden=16, num_classes=3, lr=0.2)
        t.load_state_dict(init)
        if drop:
            with torch.no_grad():
                t.head.weight[:, :8] = 0
        idx = dm.partitions[c]
        torch.nn.functional.cross_entropy(t(dm.train_dataset.x[idx]), dm.train_dataset.targets[idx]).backward()
        if drop:
            t.head.weight.grad[:, :8] = 0
        torch.optim.SGD(t.parameters(), lr=0.2).step()
        outs.append(params_of(t))
    for name, value in fed.task.state_dict().items():
        torch.testing.assert_close(value, (outs[0][name] + outs[1][name]) / 2, msg=name)


def test_client_sub_models_agree_across_executors():
    def fit(executor):
        torch.manual_seed(0)
        task = MLPClassifier(in_dim=8, hidden=16, num_classes=3, lr=0.2)
        dm = FederatedDataModule(GaussianMixtureDataset(120, dim=8, num_classes=3), num_clients=4, batch_size=10)
        fed = FederatedLightningModule(task, clients_per_round=4, local_steps=2, strategy=OddClientsDropColumns(),
                                       executor=executor, num_workers=2)
        quiet_trainer(max_steps=2).fit(fed, datamodule=dm)
        return fed

    seq, proc = fit("sequential"), fit("process")
    for name, value in seq.task.state_dict().items():
        assert torch.equal(proc.task.state_dict()[name], value), name


@pytest.mark.parametrize("kwargs, lr", [
    (dict(server_optimizer="adam"), 0.01),
    (dict(server_optimizer="adam", server_lr=1.0), 1.0),
    (dict(strategy=FedAdam(server_lr=1.0)), 1.0),
    (dict(server_optimizer="sgdm"), 1.0),
    (dict(), 1.0),
])
def test_every_server_optimiser_trains_with_its_default_and_with_server_lr_1(kwargs, lr):
    """FedAdam at server_lr=1 once died in round 0 (the FedAvg fast path read SGD-only settings); each server
    optimiser has one default learning rate, the same from the module and from its strategy class."""
    torch.manual_seed(0)
    task = MLPClassifier(in_dim=8, hidden=16, num_classes=3, lr=0.1)
    dm = FederatedDataModule(GaussianMixtureDataset(60, dim=8, num_classes=3), partition="iid", num_clients=4,
                             batch_size=8)
    fed = FederatedLightningModule(task, clients_per_round=2, local_steps=2, **kwargs)
    assert fed.strategy.server_lr == lr
    before = params_of(task)
    quiet_trainer(max_steps=3, limit_val_batches=0).fit(fed, datamodule=dm)
    after = params_of(task)
    assert all(torch.isfinite(v).all() for v in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_strategy_classes_and_module_share_defaults():
    assert FedAdam().server_lr == FederatedLightningModule(MLPClassifier(), server_optimizer="adam").strategy.server_lr
    assert FedAvg().server_lr == FederatedLightningModule(MLPClassifier()).strategy.server_lr == 1.0
    assert FedAvgM().server_lr == FederatedLightningModule(MLPClassifier(), server_optimizer="sgdm").strategy.server_lr


@pytest.mark.parametrize("arg, value", [("server_optimizer", "adam"), ("server_lr", 0.5), ("server_momentum", 0.5),
                                        ("server_betas", (0.9, 0.9)), ("server_eps", 1e-4), ("weighting", "uniform")])
def test_a_server_setting_that_contradicts_the_strategy_is_refused_naming_it(arg, value):
    with pytest.raises(ValueError, match=f"`{arg}=.*` contradicts `strategy`"):
        FederatedLightningModule(MLPClassifier(), strategy=FedAvg(), **{arg: value})
    # the same values as the strategy's (a YAML base config under a strategy override) are fine
    agreeing = FedAdam(server_lr=0.5, server_betas=(0.9, 0.9), server_eps=1e-4, weighting="uniform")
    same = {"server_optimizer": "adam", "server_lr": 0.5, "server_betas": [0.9, 0.9], "server_eps": 1e-4,
            "weighting": "uniform"}
    fed = FederatedLightningModule(MLPClassifier(), strategy=agreeing, **{k: v for k, v in same.items() if k == arg})
    assert fed.strategy is agreeing
