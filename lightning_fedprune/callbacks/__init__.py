"""The four Federated Pruning callbacks (phases a, b, c and adaptive sparsity)."""

from lightning_fedprune.callbacks.adaptive import AdaptiveLayerSparsity
from lightning_fedprune.callbacks.finetune import FineTuneFreeze, make_permanent
from lightning_fedprune.callbacks.mask_refinement import MaskRefinementCallback
from lightning_fedprune.callbacks.progress import FederatedProgressBar
from lightning_fedprune.callbacks.sparsity_ramp import SparsityRampCallback
from lightning_fedprune.callbacks.summary import RunSummary
from lightning_fedprune.callbacks.tensorboard import PruningImages

__all__ = [
    "AdaptiveLayerSparsity", "FederatedProgressBar", "FineTuneFreeze", "MaskRefinementCallback",
    "RunSummary", "PruningImages",
    "SparsityRampCallback", "make_permanent",
]
