"""Baselines the article names, built on the same pruning state, wire format and compact clients as
Federated Pruning, so quality, bytes and client size are measured the same way:

* :class:`FederatedDropout` (Caldas et al. 2018): a server strategy; every client trains a random
  structured sub-model each round, the server merges them into the full model.
* :class:`PruneFL` (Jiang et al.): a pruning-plan contribution; prune once, then re-adjust the masks
  every ``k`` rounds by accumulated squared gradients, no ramp.

Dense FedAvg (no pruning callback) and prune-after-training (dense FedAvg, a one-shot
``SparsityRampCallback`` near the end, then ``FineTuneFreeze``) are plain configurations; see
``examples/ablation/grid.yaml``.
"""

from lightning_fedprune.baselines.federated_dropout import FederatedDropout
from lightning_fedprune.baselines.prunefl import PruneFL

__all__ = ["FederatedDropout", "PruneFL"]
