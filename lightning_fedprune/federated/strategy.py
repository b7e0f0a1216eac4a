"""Server strategies: how the server turns a round's client results into the next global model.

As Flower's ``Strategy``, a strategy is an object with two steps, both free of Lightning:

* :meth:`Strategy.aggregate` (pure): leave out failed results and results with NaN/Inf values,
  take the weighted mean of the others' parameters and buffers, their loss and the cohort's values
  of what the task logged;
* :meth:`Strategy.step`: the masked server-optimiser step on the pseudo-gradient
  ``g = w_global - w_avg`` — pruned entries get no update and keep their server value (the server keeps
  pruned weights until pruning is made permanent); buffers (e.g. BatchNorm statistics) take the mean.

:class:`FedAvg` (McMahan et al. 2017; ``server_lr=1`` makes the new global model the average itself),
:class:`FedAvgM` (Hsu et al. 2019) and :class:`FedAdam` (Reddi et al. 2021) are here; a new strategy is
one subclass (see docs/design.md). The server optimiser a strategy makes is registered with the
Trainer, so checkpoints carry its state and ``LearningRateMonitor`` reports it (``lr-ServerSGD``).
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import torch
from torch import Tensor

from lightning_fedprune.federated.protocol import ClientResult, LoggedValue
from lightning_fedprune.validation import check_choice, check_each, check_float

ServerOptimizerName = Literal["sgd", "sgdm", "adam"]
SERVER_OPTIMIZERS: tuple[str, ...] = get_args(ServerOptimizerName)
#: The server learning rate of each server optimiser when none is given: 1 for FedAvg/FedAvgM (the new global
#: model is the average itself), 0.01 for FedAdam (Reddi et al. 2021 tune it in [1e-3, 1e-1]).
DEFAULT_SERVER_LR = {"sgd": 1.0, "sgdm": 1.0, "adam": 0.01}


class ServerSGD(torch.optim.SGD):
    """The server's SGD (FedAvg / FedAvgM): its own class so ``LearningRateMonitor`` names it ``lr-ServerSGD``,
    apart from the task's (client) optimisers."""


class ServerAdam(torch.optim.Adam):
    """The server's Adam (FedAdam), logged by ``LearningRateMonitor`` as ``lr-ServerAdam``."""


@dataclass
class Aggregate:
    """What :meth:`Strategy.aggregate` makes of one round's results (indices are cohort positions)."""

    average: dict[str, Tensor] = field(default_factory=dict)  # weighted mean of parameters and buffers
    ok: list[int] = field(default_factory=list)  # the results in the average
    failed: dict[int, str] = field(default_factory=dict)  # the results left out, with the reason
    weight: float = 0.0  # the total weight of the results in the average
    train_loss: float = math.nan  # their weighted mean loss
    logged: dict[str, LoggedValue] = field(default_factory=dict)  # the cohort's value of each name the task logged


def weighted_average(states: Sequence[dict[str, Tensor]], weights: Sequence[float],
                     names: Iterable[str]) -> dict[str, Tensor]:
    """Weighted mean of the clients' tensors, in the given order (deterministic).

    Floating tensors are averaged in their dtype with weights ``w_i / sum(w)``; with one client the
    result is that client's tensor bit for bit. Integer tensors (e.g. BatchNorm's
    ``num_batches_tracked``) are averaged in float64 and rounded.

    >>> a, b = {"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([3.0, 6.0])}
    >>> weighted_average([a, b], [3.0, 1.0], ["w"])["w"]
    tensor([1.5000, 3.0000])
    """
    if not states:
        raise ValueError("weighted_average needs at least one state")
    total = float(sum(weights))
    if not total > 0:
        raise ValueError("client weights sum to zero")
    shares = [w / total for w in weights]
    out: dict[str, Tensor] = {}
    for name in names:
        first = states[0][name]
        if first.is_floating_point():
            acc = first * shares[0]
            for share, state in zip(shares[1:], states[1:]):
                acc.add_(state[name], alpha=share)
            out[name] = acc
        else:
            acc64 = first.to(torch.float64) * shares[0]
            for share, state in zip(shares[1:], states[1:]):
                acc64.add_(state[name].to(torch.float64), alpha=share)
            out[name] = acc64.round().to(first.dtype)
    return out


def cohort_logged(results: Sequence[ClientResult]) -> dict[str, LoggedValue]:
    """The cohort's value of every name the clients logged, with the options of the first client that logged it.

    ``reduce_fx="mean"``: the mean weighted by the examples behind each client's value (so Lightning's
    epoch mean over rounds weighs every example alike); ``sum``/``max``/``min``: over the clients.

    >>> r = [ClientResult(0, 0, logged={"a": LoggedValue(1.0, 3.0)}), ClientResult(1, 0, logged={"a": LoggedValue(3.0, 1.0)})]
    >>> cohort_logged(r)["a"].value, cohort_logged(r)["a"].weight
    (1.5, 4.0)
    """
    values: dict[str, list[LoggedValue]] = {}
    for r in results:
        for name, logged in r.logged.items():
            values.setdefault(name, []).append(logged)
    out: dict[str, LoggedValue] = {}
    for name, logged in values.items():
        first = logged[0]
        weight = math.fsum(v.weight for v in logged)
        if first.reduce_fx == "mean":
            value = math.fsum(v.value * v.weight for v in logged) / weight if weight > 0 else math.nan
        elif first.reduce_fx == "sum":
            value = math.fsum(v.value for v in logged)
        else:
            value = (max if first.reduce_fx == "max" else min)(v.value for v in logged)
        out[name] = LoggedValue(value, weight, first.on_step, first.on_epoch, first.reduce_fx, first.prog_bar, first.logger)
    return out


def _non_finite(state: dict[str, Tensor]) -> str | None:
    for name, value in state.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            return f"non-finite values in {name!r}"
    return None


class Strategy:
    """How the server aggregates a round and steps (subclass :meth:`make_optimizer`, and override
    :meth:`aggregate` or :meth:`step` for a different rule)."""

    def make_optimizer(self, params: list[Tensor]) -> torch.optim.Optimizer:
        """The server optimiser over the global parameters (registered with the Trainer)."""
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        """The settings that change the computation (stored in checkpoints, compared on resume)."""
        return {"strategy": f"{type(self).__module__}.{type(self).__qualname__}", **self.spec()["init_args"]}

    def spec(self) -> dict[str, Any]:
        """``{"class_path", "init_args"}`` that rebuilds this strategy (the module's hyperparameter): the
        constructor's arguments, read from the attributes of the same names."""
        params = list(inspect.signature(type(self).__init__).parameters)[1:]
        args = {p: getattr(self, p) for p in params if hasattr(self, p)}
        return {"class_path": f"{type(self).__module__}.{type(self).__qualname__}",
                "init_args": {k: list(v) if isinstance(v, tuple) else v for k, v in args.items()}}

    @staticmethod
    def from_spec(spec: Any) -> Strategy:
        """The strategy a :meth:`spec` dict describes (imports its class, which must be a Strategy)."""
        if not isinstance(spec, dict) or not isinstance(spec.get("class_path"), str):
            raise ValueError(f"`strategy` must be a Strategy or a dict {{'class_path': ..., 'init_args': {{...}}}}, "
                             f"got {spec!r}.")
        module, _, name = spec["class_path"].rpartition(".")
        cls = getattr(importlib.import_module(module), name, None)
        if not (isinstance(cls, type) and issubclass(cls, Strategy)):
            raise ValueError(f"`strategy`: {spec['class_path']!r} is not a Strategy class.")
        return cls(**(spec.get("init_args") or {}))

    # ------------------------------------------------------------------ configure: which sub-model a client gets
    def client_masks(self, round: int, client_id: int, seed: int, masks: dict[str, Tensor], patterns: dict[str, str],
                     params: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, str]] | None:
        """The masks and patterns of the sub-model ``client_id`` trains this round, or None for the round's
        (the pruning state's ``masks``; the default). A strategy that gives clients different sub-models
        (Federated Dropout) returns them here — a pure function of its arguments (``seed`` is the client's
        derived seed), so :meth:`aggregate` can recompute them; each such client gets a broadcast of its own
        and its upload is decoded with its masks."""
        return None

    # ------------------------------------------------------------------ aggregate: pure
    def aggregate(self, results: Sequence[ClientResult], states: Sequence[dict[str, Tensor] | None],
                  names: Sequence[str]) -> Aggregate:
        """Weighted mean of the healthy results. ``states[i]`` is result ``i``'s decoded parameters and
        buffers (None for a failed one). A NaN/Inf in any client makes the weighted sum non-finite, so one
        cheap check of the average (a sum per tensor; the exact scan only when that sum is not finite)
        replaces a scan of every client's every tensor; then the culprits are found and left out."""
        agg = Aggregate(failed={i: r.error or "unknown error" for i, r in enumerate(results) if not r.ok})
        ok = [i for i, r in enumerate(results) if r.ok]
        average = self._finite_average(results, states, ok, names)
        if average is None and ok:
            bad = {i: reason for i in ok if (reason := _non_finite(states[i])) is not None}
            agg.failed.update(bad)
            ok = [i for i in ok if i not in bad]
            average = self._finite_average(results, states, ok, names)
            if average is None and ok:  # finite clients, non-finite average (overflow): skip the update
                agg.failed.update({i: "the weighted average of the cohort's updates is not finite (overflow)" for i in ok})
                ok = []
        if not ok:
            return agg
        healthy = [results[i] for i in ok]
        agg.average, agg.ok = average, ok
        agg.weight = float(sum(r.weight for r in healthy))
        agg.train_loss = float(sum(r.loss * r.weight for r in healthy) / agg.weight)
        agg.logged = cohort_logged(healthy)
        return agg

    @staticmethod
    def _finite_average(results: Sequence[ClientResult], states: Sequence[dict[str, Tensor] | None], ok: list[int],
                        names: Sequence[str]) -> dict[str, Tensor] | None:
        if not ok:
            return None
        average = weighted_average([states[i] for i in ok], [results[i].weight for i in ok], names)
        for t in average.values():
            if t.is_floating_point() and not math.isfinite(float(t.sum())) and not bool(torch.isfinite(t).all()):
                return None
        return average

    # ------------------------------------------------------------------ step
    def step(self, optimizer: torch.optim.Optimizer, params: dict[str, Tensor], buffers: dict[str, Tensor],
             average: dict[str, Tensor], masks: dict[str, Tensor]) -> dict[str, Tensor]:
        """The server optimiser's step on the pseudo-gradient ``w - w_avg`` (zero at pruned entries, which
        keep their server value); buffers take the average. Returns the pseudo-gradient."""
        pseudo: dict[str, Tensor] = {}
        with torch.no_grad():
            kept_values = {}
            for name, p in params.items():
                g = p - average[name]
                if name in masks:
                    g.mul_(masks[name])
                    kept_values[name] = p.detach().clone()
                pseudo[name] = g
                p.grad = g.clone()
            optimizer.step()
            for name, old in kept_values.items():  # weight decay or momentum must not move pruned entries
                p = params[name]
                p.copy_(torch.where(masks[name], p, old))
            for p in params.values():
                p.grad = None
            self._average_buffers(buffers, average)
        return pseudo

    @staticmethod
    def _average_buffers(buffers: dict[str, Tensor], average: dict[str, Tensor]) -> None:
        for name, b in buffers.items():
            b.copy_(average[name])


class FedAvg(Strategy):
    """FedAvg (McMahan et al. 2017): SGD on the pseudo-gradient. With ``server_lr=1`` the new global model
    is the weighted average itself (not ``w - 1 * (w - avg)``, which differs in the last bit), so one
    client with one local step equals one plain SGD step bit for bit.

    Args:
        server_lr: the server's learning rate (> 0, finite).
    """

    name = "sgd"

    def __init__(self, server_lr: float = 1.0) -> None:
        self.server_lr = check_float(server_lr, "server_lr", min=0, min_open=True)

    def make_optimizer(self, params: list[Tensor]) -> torch.optim.Optimizer:
        return ServerSGD(params, lr=self.server_lr)

    def config(self) -> dict[str, Any]:
        return {"server_optimizer": self.name, "server_lr": self.server_lr}

    def step(self, optimizer: torch.optim.Optimizer, params: dict[str, Tensor], buffers: dict[str, Tensor],
             average: dict[str, Tensor], masks: dict[str, Tensor]) -> dict[str, Tensor]:
        if not (isinstance(optimizer, torch.optim.SGD) and all(
                g["lr"] == 1.0 and g["momentum"] == 0 and g["weight_decay"] == 0 and not g["nesterov"]
                for g in optimizer.param_groups)):
            return super().step(optimizer, params, buffers, average, masks)
        pseudo: dict[str, Tensor] = {}
        with torch.no_grad():
            for name, p in params.items():
                new = average[name]
                if name in masks:
                    new = torch.where(masks[name], new, p)
                pseudo[name] = p - new
                p.copy_(new)
                p.grad = None
            optimizer.step()  # counts the round; no gradients, so it changes nothing
            self._average_buffers(buffers, average)
        return pseudo


class FedAvgM(FedAvg):
    """FedAvgM (Hsu et al. 2019): SGD with momentum on the pseudo-gradient.

    Args:
        server_lr: the server's learning rate.
        server_momentum: momentum in ``[0, 1)``.
    """

    name = "sgdm"

    def __init__(self, server_lr: float = 1.0, server_momentum: float = 0.9) -> None:
        super().__init__(server_lr)
        self.server_momentum = check_float(server_momentum, "server_momentum", min=0, max=1, max_open=True)

    def make_optimizer(self, params: list[Tensor]) -> torch.optim.Optimizer:
        return ServerSGD(params, lr=self.server_lr, momentum=self.server_momentum)

    def config(self) -> dict[str, Any]:
        return {**super().config(), "server_momentum": self.server_momentum}


class FedAdam(FedAvg):
    """FedAdam (Reddi et al. 2021): Adam on the pseudo-gradient (``server_eps`` 1e-3 as in the paper).

    Args:
        server_lr: the server's learning rate.
        server_betas: Adam's two betas, each in ``[0, 1)``.
        server_eps: Adam's epsilon (> 0).
    """

    name = "adam"

    def __init__(self, server_lr: float = 0.01, server_betas: Sequence[float] = (0.9, 0.99),
                 server_eps: float = 1e-3) -> None:
        super().__init__(server_lr)
        self.server_betas = tuple(check_each(server_betas, "server_betas", check_float, length=2, min=0, max=1,
                                             max_open=True))
        self.server_eps = check_float(server_eps, "server_eps", min=0, min_open=True)

    def make_optimizer(self, params: list[Tensor]) -> torch.optim.Optimizer:
        return ServerAdam(params, lr=self.server_lr, betas=self.server_betas, eps=self.server_eps)

    def config(self) -> dict[str, Any]:
        return {**super().config(), "server_betas": list(self.server_betas), "server_eps": self.server_eps}


def validate_server_optimizer(name: str, lr: float, momentum: float, betas: Sequence[float], eps: float) -> None:
    """Check every server optimiser setting, also those the chosen optimiser does not use (a bad
    value there is a configuration typo all the same)."""
    check_choice(name, "server_optimizer", SERVER_OPTIMIZERS)
    check_float(lr, "server_lr", min=0, min_open=True)  # an infinite rate turns the model into inf/NaN
    check_float(momentum, "server_momentum", min=0, max=1, max_open=True)
    check_each(betas, "server_betas", check_float, length=2, min=0, max=1, max_open=True)
    check_float(eps, "server_eps", min=0, min_open=True)


def make_strategy(name: ServerOptimizerName | None = None, lr: float | None = None, momentum: float | None = None,
                  betas: Sequence[float] | None = None, eps: float | None = None) -> Strategy:
    """The strategy of ``FederatedLightningModule(server_optimizer=name, server_lr=..., ...)``; ``None`` is the
    default: ``"sgd"``, and each setting the strategy's own default (``server_lr``: :data:`DEFAULT_SERVER_LR`)."""
    name = "sgd" if name is None else name
    check_choice(name, "server_optimizer", SERVER_OPTIMIZERS)
    lr = DEFAULT_SERVER_LR[name] if lr is None else lr
    momentum = 0.9 if momentum is None else momentum
    betas = (0.9, 0.99) if betas is None else betas
    eps = 1e-3 if eps is None else eps
    validate_server_optimizer(name, lr, momentum, betas, eps)
    if name == "sgd":
        return FedAvg(lr)
    if name == "sgdm":
        return FedAvgM(lr, momentum)
    return FedAdam(lr, betas, eps)


def server_optimizer_of(name: str, params: list[Tensor], lr: float, momentum: float, betas: Sequence[float],
                        eps: float) -> torch.optim.Optimizer:
    """The torch optimiser of server optimiser ``name`` over ``params``."""
    if name == "sgd":
        return ServerSGD(params, lr=lr)
    if name == "sgdm":
        return ServerSGD(params, lr=lr, momentum=momentum)
    return ServerAdam(params, lr=lr, betas=tuple(betas), eps=eps)
