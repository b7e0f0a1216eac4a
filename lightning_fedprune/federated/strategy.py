"""The strategies' former import path (``lightning_fedprune.federated.strategy.FedAvg`` in configs and
checkpoints written before :mod:`lightning_fedprune.federated.strategies`): the same classes."""

from lightning_fedprune.federated.strategies import *  # noqa: F401,F403
from lightning_fedprune.federated.strategies import __all__  # noqa: F401
