"""FedAvg and the FedOpt family: the weighted mean of the replies, then a server optimiser step.

:class:`FedAvg` (McMahan et al. 2017; ``server_lr=1`` makes the new global model the average itself),
:class:`FedAvgM` (Hsu et al. 2019) and :class:`FedAdam` (Reddi et al. 2021).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_fedprune.federated.protocol import ClientResult
from lightning_fedprune.federated.strategies.base import (
    Aggregate,
    RoundContext,
    Strategy,
    SubModel,
    WeightingName,
    server_optimizer_of,
)
from lightning_fedprune.pruning.masking import keep_pruned
from lightning_fedprune.validation import check_each, check_float

__all__ = ["FedAdam", "FedAvg", "FedAvgM"]


class FedAvg(Strategy):
    """FedAvg (McMahan et al. 2017): every client trains the round's model; the weighted mean of the replies;
    SGD on the pseudo-gradient. With ``server_lr=1`` the new global model is the weighted average itself (not
    ``w - 1 * (w - avg)``, which differs in the last bit), so one client with one local step equals one plain
    SGD step bit for bit.

    Args:
        server_lr: the server's learning rate (> 0, finite).
        weighting: see :class:`~lightning_fedprune.federated.strategies.base.Strategy`.
    """

    #: the server optimiser's name (``FederatedLightningModule(server_optimizer=...)``)
    server_optimizer = "sgd"

    def __init__(self, server_lr: float = 1.0, weighting: WeightingName = "num_samples") -> None:
        super().__init__(weighting)
        self.server_lr = check_float(server_lr, "server_lr", min=0, min_open=True)

    def configure(self, ctx: RoundContext, cohort: Sequence[int], seeds: Sequence[int]) -> list[SubModel | None]:
        return [None] * len(cohort)

    def aggregate(self, ctx: RoundContext, results: Sequence[ClientResult], states: Sequence[Mapping[str, Tensor] | None],
                  sub_models: Sequence[SubModel | None]) -> Aggregate:
        return self.weighted_mean(results, states, [*ctx.params, *ctx.buffers])

    def make_optimizer(self, params: list[Tensor]) -> torch.optim.Optimizer:
        return server_optimizer_of("sgd", params, self.server_lr, 0.0, (0.9, 0.99), 1e-3)

    def config(self) -> dict[str, Any]:
        return {"server_optimizer": self.server_optimizer, "server_lr": self.server_lr, "weighting": self.weighting}

    def _plain_average(self) -> bool:
        """Whether the step is the average itself: the server optimiser is plain SGD at learning rate 1."""
        opt = self.optimizer
        return isinstance(opt, torch.optim.SGD) and all(
            g["lr"] == 1.0 and g["momentum"] == 0 and g["weight_decay"] == 0 and not g["nesterov"]
            for g in opt.param_groups)

    def apply(self, ctx: RoundContext, agg: Aggregate, params: Mapping[str, Tensor],
              buffers: Mapping[str, Tensor]) -> dict[str, Tensor]:
        if not self._plain_average():
            return super().apply(ctx, agg, params, buffers)
        pseudo: dict[str, Tensor] = {}
        with torch.no_grad():
            for name, p in params.items():
                new = agg.average[name]
                if name in ctx.masks:
                    new = keep_pruned(new, p, ctx.masks[name])
                pseudo[name] = p - new
                p.copy_(new)
            for name, b in buffers.items():
                b.copy_(agg.average[name])
        return pseudo


class FedAvgM(FedAvg):
    """FedAvgM (Hsu et al. 2019): SGD with momentum on the pseudo-gradient.

    Args:
        server_lr: the server's learning rate.
        server_momentum: momentum in ``[0, 1)``.
        weighting: see :class:`~lightning_fedprune.federated.strategies.base.Strategy`.
    """

    server_optimizer = "sgdm"

    def __init__(self, server_lr: float = 1.0, server_momentum: float = 0.9,
                 weighting: WeightingName = "num_samples") -> None:
        super().__init__(server_lr, weighting)
        self.server_momentum = check_float(server_momentum, "server_momentum", min=0, max=1, max_open=True)

    def make_optimizer(self, params: list[Tensor]) -> torch.optim.Optimizer:
        return server_optimizer_of("sgdm", params, self.server_lr, self.server_momentum, (0.9, 0.99), 1e-3)

    @property
    def has_momentum(self) -> bool:
        return self.server_momentum > 0

    def config(self) -> dict[str, Any]:
        return {**super().config(), "server_momentum": self.server_momentum}


class FedAdam(FedAvg):
    """FedAdam (Reddi et al. 2021): Adam on the pseudo-gradient (``server_eps`` 1e-3 as in the paper).

    Args:
        server_lr: the server's learning rate (default 0.01, as ``server_optimizer="adam"``).
        server_betas: Adam's two betas, each in ``[0, 1)``.
        server_eps: Adam's epsilon (> 0).
        weighting: see :class:`~lightning_fedprune.federated.strategies.base.Strategy`.
    """

    server_optimizer = "adam"

    def __init__(self, server_lr: float = 0.01, server_betas: Sequence[float] = (0.9, 0.99), server_eps: float = 1e-3,
                 weighting: WeightingName = "num_samples") -> None:
        super().__init__(server_lr, weighting)
        self.server_betas = tuple(check_each(server_betas, "server_betas", check_float, length=2, min=0, max=1,
                                             max_open=True))
        self.server_eps = check_float(server_eps, "server_eps", min=0, min_open=True)

    def make_optimizer(self, params: list[Tensor]) -> torch.optim.Optimizer:
        return server_optimizer_of("adam", params, self.server_lr, 0.0, self.server_betas, self.server_eps)

    @property
    def has_momentum(self) -> bool:
        return True

    def config(self) -> dict[str, Any]:
        return {**super().config(), "server_betas": list(self.server_betas), "server_eps": self.server_eps}
