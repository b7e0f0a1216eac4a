"""The four Federated Pruning callbacks (phases a, b, c and adaptive sparsity)."""

from lightning_fedprune.callbacks.adaptive import AdaptiveLayerSparsity
from lightning_fedprune.callbacks.finetune import FineTuneFreeze, make_permanent
from lightning_fedprune.callbacks.mask_refinement import MaskRefinementCallback
from lightning_fedprune.callbacks.sparsity_ramp import SparsityRampCallback

__all__ = ["AdaptiveLayerSparsity", "FineTuneFreeze", "MaskRefinementCallback", "SparsityRampCallback", "make_permanent"]
