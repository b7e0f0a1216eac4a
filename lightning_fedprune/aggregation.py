"""Server-side aggregation: weighted FedAvg of client results and the server optimiser.

The server averages the clients' returned weights (weighted by ``ClientResult.weight``), forms the
pseudo-gradient ``g = w_global - w_avg`` and lets a server optimiser step on it:
``sgd`` with ``lr=1`` is FedAvg (McMahan et al. 2017), ``sgdm`` is FedAvgM (Hsu et al. 2019),
``adam`` is FedAdam (Reddi et al. 2021). Pruned entries get a zero pseudo-gradient and keep their
server value (the server keeps pruned weights until pruning is made permanent).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from lightning_fedprune.protocol import ClientResult
from lightning_fedprune.validation import check_choice, check_each, check_float

SERVER_OPTIMIZERS = ("sgd", "sgdm", "adam")


def validate_server_optimizer(name: str, lr: float, momentum: float, betas: Sequence[float], eps: float) -> None:
    """Check every server optimiser setting, also those the chosen optimiser does not use (a bad
    value there is a configuration typo all the same)."""
    check_choice(name, "server_optimizer", SERVER_OPTIMIZERS)
    check_float(lr, "server_lr", min=0, min_open=True)  # an infinite rate turns the model into inf/NaN
    check_float(momentum, "server_momentum", min=0, max=1, max_open=True)
    check_each(betas, "server_betas", check_float, length=2, min=0, max=1, max_open=True)
    check_float(eps, "server_eps", min=0, min_open=True)


class ServerSGD(torch.optim.SGD):
    """The server's SGD (FedAvg / FedAvgM): its own class so ``LearningRateMonitor`` names it ``lr-ServerSGD``,
    apart from the task's (client) optimisers."""


class ServerAdam(torch.optim.Adam):
    """The server's Adam (FedAdam), logged by ``LearningRateMonitor`` as ``lr-ServerAdam``."""


def make_server_optimizer(params: Iterable[Tensor], name: str, lr: float, momentum: float = 0.9,
                          betas: Sequence[float] = (0.9, 0.99), eps: float = 1e-3) -> torch.optim.Optimizer:
    """The server optimiser over the global parameters (``eps`` default 1e-3 as in FedAdam)."""
    validate_server_optimizer(name, lr, momentum, betas, eps)
    params = list(params)
    if name == "sgd":
        return ServerSGD(params, lr=lr)
    if name == "sgdm":
        return ServerSGD(params, lr=lr, momentum=momentum)
    return ServerAdam(params, lr=lr, betas=tuple(betas), eps=eps)


def is_plain_fedavg(optimizer: torch.optim.Optimizer) -> bool:
    """True for SGD with lr 1, no momentum, no weight decay: the new global model is the average itself."""
    if not isinstance(optimizer, torch.optim.SGD):
        return False
    return all(g["lr"] == 1.0 and g["momentum"] == 0 and g["weight_decay"] == 0 and not g["nesterov"]
               for g in optimizer.param_groups)


def weighted_average(results: Sequence[ClientResult], names: Iterable[str]) -> dict[str, Tensor]:
    """Weighted mean of the clients' tensors, in the results' order (deterministic).

    Floating tensors are averaged in their dtype with weights ``w_i / sum(w)``; with one client the
    result is that client's tensor bit for bit. Integer tensors (e.g. BatchNorm's
    ``num_batches_tracked``) are averaged in float64 and rounded.
    """
    if not results:
        raise ValueError("weighted_average needs at least one result")
    total = float(sum(r.weight for r in results))
    if not total > 0:
        raise ValueError("client weights sum to zero")
    shares = [r.weight / total for r in results]
    out: dict[str, Tensor] = {}
    for name in names:
        first = results[0].state[name]
        if first.is_floating_point():
            acc = first * shares[0]
            for share, r in zip(shares[1:], results[1:]):
                acc.add_(r.state[name], alpha=share)
            out[name] = acc
        else:
            acc64 = first.to(torch.float64) * shares[0]
            for share, r in zip(shares[1:], results[1:]):
                acc64.add_(r.state[name].to(torch.float64), alpha=share)
            out[name] = acc64.round().to(first.dtype)
    return out
