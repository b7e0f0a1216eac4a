"""Client statistics: what a client can accumulate over its local steps and send back with its update.

An importance says which statistic it needs (:attr:`~lightning_fedprune.pruning.importance.Importance.needs`).
By default the pruning state computes it on the server from the aggregated updates, at no traffic. A plan with
a :class:`~lightning_fedprune.pruning.plan.ClientStatistics` part asks the *clients* for it instead: in the
rounds before a mask recomputation every client accumulates the statistic of the pruned tensors over its local
steps, on its device, and uploads the sums with its update (their bytes count in ``comm/bytes_up``); the server
merges them as it merges the updates (:meth:`Strategy.aggregate_statistics
<lightning_fedprune.federated.strategies.Strategy.aggregate_statistics>`) and the pruning state scores the masks
from them. PruneFL's squared gradients (Jiang et al., arXiv 1909.12326) are the built-in one.

A statistic is one :class:`ClientStatistic` in :data:`CLIENT_STATISTICS`: the client calls
:meth:`ClientStatistic.update_` once per optimiser step, after the backward pass and before anything touches
the gradient (masking of pruned entries, clipping, the step), so the gradient of a pruned entry (a zero weight
of a masked-dense layer) is seen too.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from typing import ClassVar

import torch
from torch import Tensor

from lightning_fedprune.pruning.names import Names, new_entry_name
from lightning_fedprune.validation import check_choice

__all__ = ["CLIENT_STATISTICS", "CLIENT_STATISTIC_NAMES", "ClientStatistic", "StatisticAccumulators",
           "register_client_statistic"]


class ClientStatistic(ABC):
    """One statistic a client accumulates per parameter over its local steps (float32, the parameter's shape)."""

    #: the registry key; also the importance's ``needs`` it serves (e.g. ``"sq_gradient"``)
    name: ClassVar[str]

    @abstractmethod
    def update_(self, acc: Tensor, param: Tensor) -> None:
        """Add this step's contribution of ``param`` (its ``.grad`` is the step's gradient, pruned entries
        included) to ``acc`` in place, on the device: no host synchronisation."""


class SquaredGradient(ClientStatistic):
    """``acc += g * g``: PruneFL's accumulated squared gradients (every entry, pruned ones included)."""

    name = "sq_gradient"

    def update_(self, acc: Tensor, param: Tensor) -> None:
        g = param.grad
        if g is not None:
            g = g.detach()
            if g.is_sparse:
                g = g.to_dense()
            acc.addcmul_(g.to(acc.dtype), g.to(acc.dtype))


#: name -> client statistic, in registration order.
CLIENT_STATISTICS: dict[str, ClientStatistic] = {}
#: The registered client statistic names (live).
CLIENT_STATISTIC_NAMES: Sequence[str] = Names(CLIENT_STATISTICS)


def register_client_statistic(statistic: ClientStatistic) -> ClientStatistic:
    """Add ``statistic`` to :data:`CLIENT_STATISTICS` under its ``name``."""
    name = new_entry_name(CLIENT_STATISTICS, statistic, ClientStatistic, "statistic", "a client statistic")
    CLIENT_STATISTICS[name] = statistic
    return statistic


register_client_statistic(SquaredGradient())


class StatisticAccumulators:
    """The sums one client accumulates: ``values[statistic][parameter name]`` (float32 zeros at the start, on
    each parameter's device), updated by :meth:`update_` once per optimiser step.

    Args:
        request: ``{statistic: parameter names}`` (the plan's :attr:`~lightning_fedprune.federated.protocol.ClientPlan.statistics`).
        params: the client's parameters by name (the tensors it trains).
    """

    def __init__(self, request: Mapping[str, Sequence[str]], params: Mapping[str, Tensor]) -> None:
        self.values: dict[str, dict[str, Tensor]] = {}
        self._pairs: list[tuple[ClientStatistic, Tensor, Tensor]] = []
        for stat, names in request.items():
            check_choice(stat, "statistics", CLIENT_STATISTIC_NAMES)
            fn = CLIENT_STATISTICS[stat]
            out = self.values[stat] = {}
            for name in names:
                p = params.get(name)
                if p is None:
                    raise KeyError(f"statistic {stat!r} of {name!r} was asked for, but the client trains no parameter "
                                   f"of that name (a compact layer's weight cannot give it: it is excluded from compaction)")
                out[name] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
                self._pairs.append((fn, p, out[name]))

    def subset(self, tensors: Iterable[Tensor]) -> StatisticAccumulators:
        """The accumulators of the parameters among ``tensors`` (one optimiser's)."""
        ids = {id(t) for t in tensors}
        out = StatisticAccumulators({}, {})
        out.values = self.values
        out._pairs = [pair for pair in self._pairs if id(pair[1]) in ids]
        return out

    def __bool__(self) -> bool:
        return bool(self._pairs)

    def update_(self) -> None:
        """One optimiser step's contribution of every parameter (call after backward, before the gradients change)."""
        if self._pairs:
            with torch.no_grad():
                for fn, p, acc in self._pairs:
                    fn.update_(acc, p)
