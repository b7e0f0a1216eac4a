"""The four Federated Pruning callbacks (phases a, b, c and adaptive sparsity): each contributes its
part of the run's :class:`~lightning_fedprune.pruning.plan.PruningPlan`.

The observers (progress bar, run summary, TensorBoard pictures) live in
:mod:`lightning_fedprune.observers` and are importable from here too, as the configs name them.
"""

from lightning_fedprune.callbacks.adaptive import AdaptiveLayerSparsity
from lightning_fedprune.callbacks.finetune import FineTuneFreeze
from lightning_fedprune.callbacks.mask_refinement import MaskRefinementCallback
from lightning_fedprune.callbacks.sparsity_ramp import SparsityRampCallback
from lightning_fedprune.observers import FederatedProgressBar, PruningImages, RunSummary

__all__ = [
    "AdaptiveLayerSparsity", "FederatedProgressBar", "FineTuneFreeze", "MaskRefinementCallback",
    "PruningImages", "RunSummary", "SparsityRampCallback",
]
