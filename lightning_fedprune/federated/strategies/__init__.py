"""Server strategies: what each client gets, and how the server turns the replies into the next global model.

:mod:`.base` holds the abstract :class:`Strategy` (configure / aggregate / the server step and its state) and
the data it exchanges with the round; :mod:`.fedavg` FedAvg, FedAvgM and FedAdam. Federated Dropout is in
:mod:`lightning_fedprune.baselines`.
"""

from lightning_fedprune.federated.strategies.base import (
    DEFAULT_SERVER_LR,
    SERVER_OPTIMIZERS,
    WEIGHTINGS,
    Aggregate,
    RoundContext,
    ServerAdam,
    ServerOptimizerName,
    ServerSGD,
    Strategy,
    SubModel,
    WeightingName,
    cohort_logged,
    server_optimizer_of,
    validate_server_optimizer,
    weighted_average,
)
from lightning_fedprune.federated.strategies.fedavg import FedAdam, FedAvg, FedAvgM

__all__ = [
    "DEFAULT_SERVER_LR", "SERVER_OPTIMIZERS", "WEIGHTINGS", "Aggregate", "FedAdam", "FedAvg", "FedAvgM", "RoundContext",
    "ServerAdam", "ServerOptimizerName", "ServerSGD", "Strategy", "SubModel", "WeightingName", "cohort_logged",
    "make_strategy", "server_optimizer_of", "validate_server_optimizer", "weighted_average",
]


def make_strategy(name: ServerOptimizerName | None = None, lr: float | None = None, momentum: float | None = None,
                  betas: tuple[float, float] | None = None, eps: float | None = None,
                  weighting: WeightingName | None = None) -> Strategy:
    """The strategy of ``FederatedLightningModule(server_optimizer=name, server_lr=..., ...)``; ``None`` is the
    default: ``"sgd"``, and each setting the strategy's own default (``server_lr``: :data:`DEFAULT_SERVER_LR`)."""
    from lightning_fedprune.validation import check_choice

    name = "sgd" if name is None else name
    check_choice(name, "server_optimizer", SERVER_OPTIMIZERS)
    lr = DEFAULT_SERVER_LR[name] if lr is None else lr
    momentum = 0.9 if momentum is None else momentum
    betas = (0.9, 0.99) if betas is None else betas
    eps = 1e-3 if eps is None else eps
    weighting = "num_samples" if weighting is None else weighting
    validate_server_optimizer(name, lr, momentum, betas, eps)
    if name == "sgd":
        return FedAvg(lr, weighting)
    if name == "sgdm":
        return FedAvgM(lr, momentum, weighting)
    return FedAdam(lr, betas, eps, weighting)
