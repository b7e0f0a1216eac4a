"""The strategy seam, shaped as Flower's: what each client gets, and what the server makes of the replies.

A :class:`Strategy` has three parts:

* :meth:`Strategy.configure` (pure): the sub-model each client of the round trains — the round's
  (``None``) or one of its own (Federated Dropout);
* :meth:`Strategy.aggregate` (pure): the decoded replies in; the weighted mean of the healthy ones, their
  loss and the cohort's values of what the task logged out (:class:`Aggregate`). Failed replies and
  replies with NaN/Inf are left out with the reason. The weight of a reply is the strategy's choice
  (:attr:`Strategy.weighting`);
* :meth:`Strategy.apply`: the server step on the pseudo-gradient ``g = w_global - w_avg`` with the
  strategy's server optimiser. Pruned entries get no update and keep their server value (the server keeps
  pruned weights until pruning is made permanent); buffers (e.g. BatchNorm statistics) take the mean. This
  is the one stateful part: the optimiser's state (momentum, Adam's moments) belongs to the strategy and is
  checkpointed through :meth:`Strategy.state_dict`.

Everything a strategy needs of the server is passed explicitly (:class:`RoundContext`). A new strategy is one
subclass (worked example in docs/design.md).
"""

from __future__ import annotations

import importlib
import inspect
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import torch
from torch import Tensor

from lightning_fedprune.federated.metrics import reduce_logged
from lightning_fedprune.federated.protocol import ClientResult, LoggedValue
from lightning_fedprune.pruning.masking import keep_pruned
from lightning_fedprune.validation import check_choice, check_each, check_float

ServerOptimizerName = Literal["sgd", "sgdm", "adam"]
SERVER_OPTIMIZERS: tuple[str, ...] = get_args(ServerOptimizerName)
WeightingName = Literal["num_samples", "num_examples", "uniform"]
WEIGHTINGS: tuple[str, ...] = get_args(WeightingName)
#: The server learning rate of each server optimiser when none is given: 1 for FedAvg/FedAvgM (the new global
#: model is the average itself), 0.01 for FedAdam (Reddi et al. 2021 tune it in [1e-3, 1e-1]).
DEFAULT_SERVER_LR = {"sgd": 1.0, "sgdm": 1.0, "adam": 0.01}


class ServerSGD(torch.optim.SGD):
    """The server's SGD (FedAvg / FedAvgM), its own class so it is never mistaken for a client optimiser."""


class ServerAdam(torch.optim.Adam):
    """The server's Adam (FedAdam)."""


@dataclass(frozen=True)
class RoundContext:
    """What a strategy sees of the server in one round (read-only; tensors on the model's device).

    Attributes:
        round: the round.
        params: the global parameters, by name in the task.
        buffers: the global persistent buffers.
        masks: the round's masks (True = kept) of the pruned parameters.
        patterns: the pattern of every masked parameter.
        task: the global model (the task), for a strategy that reads its structure (Federated Dropout's units);
            never written to. None where the caller has no module.
    """

    round: int
    params: Mapping[str, Tensor]  # the global parameters
    buffers: Mapping[str, Tensor]  # the global persistent buffers
    masks: Mapping[str, Tensor]  # the round's masks (True = kept)
    patterns: Mapping[str, str]
    task: torch.nn.Module | None = None


@dataclass(frozen=True)
class SubModel:
    """The sub-model one client trains.

    Attributes:
        masks: the mask of every tensor that travels pruned (True = kept).
        patterns: the pattern of each of them.
        forward_scales: ``{parameter name: factor}`` the client's forward multiplies those parameters by
            (:attr:`ClientPlan.forward_scales <lightning_fedprune.federated.protocol.ClientPlan.forward_scales>`).
    """

    masks: Mapping[str, Tensor]
    patterns: Mapping[str, str]
    forward_scales: Mapping[str, float] = field(default_factory=dict)


@dataclass
class Aggregate:
    """What :meth:`Strategy.aggregate` makes of one round's results (indices are cohort positions).

    Attributes:
        average: the new target of the parameters and buffers (what :meth:`Strategy.apply` steps towards).
        ok: the results in the average.
        failed: the results left out, with the reason.
        weight: the total weight of the results in the average.
        train_loss: their weighted mean loss.
        logged: the cohort's value of each name the task logged.
    """

    average: dict[str, Tensor] = field(default_factory=dict)
    ok: list[int] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)
    weight: float = 0.0
    train_loss: float = math.nan
    logged: dict[str, LoggedValue] = field(default_factory=dict)


def weighted_average(states: Sequence[Mapping[str, Tensor]], weights: Sequence[float],
                     names: Sequence[str]) -> dict[str, Tensor]:
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
    total = math.fsum(weights)
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
    """The cohort's value of every name the clients logged, with the options of the first client that logged
    it (:func:`~lightning_fedprune.federated.metrics.reduce_logged` over the clients' values).

    >>> r = [ClientResult(0, 0, logged={"a": LoggedValue(1.0, 3.0)}), ClientResult(1, 0, logged={"a": LoggedValue(3.0, 1.0)})]
    >>> cohort_logged(r)["a"].value, cohort_logged(r)["a"].weight
    (1.5, 4.0)
    """
    values: dict[str, list[LoggedValue]] = {}
    for r in results:
        for name, logged in r.logged.items():
            values.setdefault(name, []).append(logged)
    return {name: reduce_logged(logged) for name, logged in values.items()}


def _non_finite(state: Mapping[str, Tensor]) -> str | None:
    for name, value in state.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            return f"non-finite values in {name!r}"
    return None


class Strategy(ABC):
    """How the server configures a round and turns its replies into the next global model.

    Subclasses implement :meth:`configure` and :meth:`aggregate` (pure) and :meth:`make_optimizer`; the
    server step (:meth:`apply`) and its state are here. Settings are constructor arguments of the same name
    as their attributes, so :meth:`spec` rebuilds the strategy (the module's hyperparameter) and
    :meth:`config` lists what changes the computation (compared on resume).

    Args:
        weighting: the aggregation weight of a reply: ``"num_samples"`` (the client's dataset size, FedAvg),
            ``"num_examples"`` (the examples it processed this round) or ``"uniform"``.
    """

    def __init__(self, weighting: WeightingName = "num_samples") -> None:
        self.weighting = check_choice(weighting, "weighting", WEIGHTINGS)
        self._optimizer: torch.optim.Optimizer | None = None
        self._params: list[Tensor] = []
        self._pending_state: dict[str, Any] | None = None

    # ------------------------------------------------------------------ what each client gets (pure)
    @abstractmethod
    def configure(self, ctx: RoundContext, cohort: Sequence[int], seeds: Sequence[int]) -> list[SubModel | None]:
        """The sub-model of every client of the cohort (``None``: the round's masks); ``seeds[i]`` is client
        ``cohort[i]``'s derived seed, so a random sub-model is a pure function of it."""

    # ------------------------------------------------------------------ the replies (pure)
    @abstractmethod
    def aggregate(self, ctx: RoundContext, results: Sequence[ClientResult], states: Sequence[Mapping[str, Tensor] | None],
                  sub_models: Sequence[SubModel | None]) -> Aggregate:
        """The new target of the global parameters and buffers (and the round's metrics) from the decoded
        replies: ``states[i]`` is result ``i``'s parameters and buffers (None for a failed one), trained on
        ``sub_models[i]`` (as :meth:`configure` gave it)."""

    def weight_of(self, result: ClientResult) -> float:
        """The aggregation weight of ``result`` (:attr:`weighting`)."""
        if self.weighting == "num_samples":
            return float(result.num_samples)
        if self.weighting == "num_examples":
            return float(result.num_examples)
        return 1.0

    def weighted_mean(self, results: Sequence[ClientResult], states: Sequence[Mapping[str, Tensor] | None],
                      names: Sequence[str]) -> Aggregate:
        """The weighted mean of the healthy results (the FedAvg rule; subclasses build on it). A NaN/Inf in any
        client makes the weighted sum non-finite, so one cheap check of the average (a sum per tensor; the exact
        scan only when that sum is not finite) replaces a scan of every client's every tensor; then the culprits
        are found and left out."""
        agg = Aggregate(failed={i: r.error or "unknown error" for i, r in enumerate(results) if not r.ok})
        ok = [i for i, r in enumerate(results) if r.ok]
        weights = [self.weight_of(r) for r in results]
        average = self._finite_average(states, weights, ok, names)
        if average is None and ok:
            bad = {i: reason for i in ok if (reason := _non_finite(states[i])) is not None}
            agg.failed.update(bad)
            ok = [i for i in ok if i not in bad]
            average = self._finite_average(states, weights, ok, names)
            if average is None and ok:  # finite clients, non-finite average (overflow): skip the update
                agg.failed.update({i: "the weighted average of the cohort's updates is not finite (overflow)" for i in ok})
                ok = []
        if not ok:
            return agg
        agg.average, agg.ok = average, ok
        agg.weight = math.fsum(weights[i] for i in ok)
        agg.train_loss = (math.fsum(results[i].loss * weights[i] for i in ok) / agg.weight) if agg.weight > 0 \
            else math.nan
        agg.logged = cohort_logged([results[i] for i in ok])
        return agg

    def aggregate_statistics(self, results: Sequence[ClientResult],
                             statistics: Sequence[Mapping[str, Mapping[str, Tensor]] | None],
                             ok: Sequence[int]) -> dict[str, dict[str, Tensor]]:
        """The clients' statistics (``statistics[i]``: result ``i``'s, decoded, or None) merged as the updates are:
        per statistic and tensor, the weighted mean (:meth:`weight_of`) over the results in ``ok`` (the aggregate's)
        that carry it and whose values are finite. ``{}`` when none does."""
        merged: dict[str, dict[str, Tensor]] = {}
        stats = {s for i in ok if statistics[i] for s in statistics[i]}
        for stat in sorted(stats):
            carriers = [i for i in ok if statistics[i] and stat in statistics[i]]
            sums = [torch.stack([t.sum() for t in statistics[i][stat].values()]).sum() for i in carriers]
            finite = torch.isfinite(torch.stack(sums)).tolist() if sums else []  # one host sync per statistic
            carriers = [i for i, good in zip(carriers, finite) if good]
            if not carriers:
                continue
            names = list(statistics[carriers[0]][stat])
            merged[stat] = weighted_average([statistics[i][stat] for i in carriers],
                                            [self.weight_of(results[i]) for i in carriers], names)
        return merged

    @staticmethod
    def _finite_average(states: Sequence[Mapping[str, Tensor] | None], weights: Sequence[float], ok: list[int],
                        names: Sequence[str]) -> dict[str, Tensor] | None:
        if not ok:
            return None
        average = weighted_average([states[i] for i in ok], [weights[i] for i in ok], names)
        sums = [t.sum() for t in average.values() if t.is_floating_point()]
        if sums and not bool(torch.isfinite(torch.stack(sums)).all()):  # one host sync for the whole model
            if any(not bool(torch.isfinite(t).all()) for t in average.values() if t.is_floating_point()):
                return None
        return average

    # ------------------------------------------------------------------ the server step (the stateful part)
    @abstractmethod
    def make_optimizer(self, params: list[Tensor]) -> torch.optim.Optimizer:
        """A new server optimiser over the global parameters."""

    def setup(self, params: Mapping[str, Tensor]) -> None:
        """Bind the server optimiser to the global parameters (once per fit; its state survives: a second
        ``fit`` continues it, a checkpoint restores it)."""
        tensors = list(params.values())
        if self._optimizer is not None and len(tensors) == len(self._params) and \
                all(a is b for a, b in zip(tensors, self._params)):
            return
        state = self._pending_state or (self._optimizer.state_dict() if self._optimizer is not None else None)
        self._params = tensors
        self._optimizer = self.make_optimizer(tensors)
        self._pending_state = None
        if state is not None:
            self._load_optimizer_state(state)

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The server optimiser (after :meth:`setup`)."""
        if self._optimizer is None:
            raise RuntimeError(f"{type(self).__name__}.setup(params) has not been called yet")
        return self._optimizer

    def apply(self, ctx: RoundContext, agg: Aggregate, params: Mapping[str, Tensor],
              buffers: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Move ``params`` (in place) by the server optimiser's step on the pseudo-gradient ``w - average``, zero at
        pruned entries (which keep their server value); buffers take the average. Returns the pseudo-gradient."""
        masks = ctx.masks
        optimizer = self.optimizer
        pseudo: dict[str, Tensor] = {}
        with torch.no_grad():
            kept_values = {}
            for name, p in params.items():
                g = p - agg.average[name]
                if name in masks:
                    g.mul_(masks[name])
                    kept_values[name] = p.detach().clone()
                pseudo[name] = g
                p.grad = g.clone()
            optimizer.step()
            for name, old in kept_values.items():  # weight decay or momentum must not move pruned entries
                params[name].copy_(keep_pruned(params[name], old, masks[name]))
            for p in params.values():
                p.grad = None
            for name, b in buffers.items():
                b.copy_(agg.average[name])
        return pseudo

    def momentum(self, names: Sequence[str], params: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The server optimiser's momentum (``sgdm``) or first moment (``adam``) of ``names``, where it has one
        (for ``momentum_*`` importance with ``momentum_source="server_optimizer"``)."""
        if self._optimizer is None:
            return {}
        out = {}
        for name in names:
            st = self._optimizer.state.get(params[name], {})
            buf = st.get("momentum_buffer", st.get("exp_avg"))
            if buf is not None:
                out[name] = buf
        return out

    @property
    def has_momentum(self) -> bool:
        """Whether the server optimiser keeps a momentum (``momentum_source="server_optimizer"`` needs one)."""
        return False

    def state_dict(self) -> dict[str, Any]:
        """The server optimiser's state (checkpointed in the ``fedprune`` section)."""
        if self._optimizer is not None:
            return {"optimizer": self._optimizer.state_dict()}
        return {"optimizer": self._pending_state} if self._pending_state is not None else {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (bound to the parameters at :meth:`setup` if that has not run yet)."""
        opt_state = state.get("optimizer")
        if opt_state is None:
            return
        if self._optimizer is not None:
            self._load_optimizer_state(opt_state)
        else:
            self._pending_state = opt_state

    def _load_optimizer_state(self, state: Mapping[str, Any]) -> None:
        """The saved state (momentum, moments, step counts) with this strategy's settings (learning rate, betas...):
        a resume that changes a setting keeps the state and takes the new value."""
        settings = [{k: v for k, v in g.items() if k != "params"} for g in self._optimizer.param_groups]
        self._optimizer.load_state_dict(state)
        for group, own in zip(self._optimizer.param_groups, settings):
            group.update(own)

    def reset_state(self) -> None:
        """Forget the server optimiser's state (a resume that changes the server optimiser starts afresh)."""
        self._pending_state = None
        if self._optimizer is not None:
            self._optimizer = self.make_optimizer(self._params)

    # ------------------------------------------------------------------ records
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

    def __getstate__(self) -> dict[str, Any]:  # a copy or a pickle carries the settings and the optimiser's state
        state = dict(self.__dict__)
        state["_pending_state"] = self.state_dict().get("optimizer")
        state["_optimizer"], state["_params"] = None, []
        return state


def server_optimizer_of(name: str, params: list[Tensor], lr: float, momentum: float, betas: Sequence[float],
                        eps: float) -> torch.optim.Optimizer:
    """The torch optimiser of server optimiser ``name`` over ``params``."""
    if name == "sgd":
        return ServerSGD(params, lr=lr)
    if name == "sgdm":
        return ServerSGD(params, lr=lr, momentum=momentum)
    return ServerAdam(params, lr=lr, betas=tuple(betas), eps=eps)


def validate_server_optimizer(name: str, lr: float, momentum: float, betas: Sequence[float], eps: float) -> None:
    """Check every server optimiser setting, also those the chosen optimiser does not use (a bad value there
    is a configuration typo all the same)."""
    check_choice(name, "server_optimizer", SERVER_OPTIMIZERS)
    check_float(lr, "server_lr", min=0, min_open=True)  # an infinite rate turns the model into inf/NaN
    check_float(momentum, "server_momentum", min=0, max=1, max_open=True)
    check_each(betas, "server_betas", check_float, length=2, min=0, max=1, max_open=True)
    check_float(eps, "server_eps", min=0, min_open=True)
