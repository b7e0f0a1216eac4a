"""Baselines the article names, built on the same pruning state, wire format and compact clients as
Federated Pruning, so quality, bytes and client size are measured the same way:

* :class:`FederatedDropout` (Caldas et al. 2018): a server strategy; every client trains a random sub-model of
  whole units (:class:`UnitGroup`: FFN hidden units, attention heads, convolution channels), the kept units
  scaled by ``1 / (1 - p)``; the server merges the sub-models into the full model.
* :class:`PruneFL` (Jiang et al.): a pruning-plan contribution; prune once, re-adjust the masks every ``k``
  rounds by the squared gradients the clients accumulate and upload, then train with fixed masks.

Dense FedAvg (no pruning callback) and prune-after-training (dense FedAvg, a one-shot
``SparsityRampCallback`` near the end, then ``FineTuneFreeze``) are plain configurations; see
``examples/ablation/grid.yaml``.
"""

from lightning_fedprune.baselines.federated_dropout import FederatedDropout
from lightning_fedprune.baselines.prunefl import PruneFL
from lightning_fedprune.baselines.units import UnitAxis, UnitGroup, find_units, units_of

__all__ = ["FederatedDropout", "PruneFL", "UnitAxis", "UnitGroup", "find_units", "units_of"]
