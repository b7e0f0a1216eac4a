"""Adaptive per-layer sparsity: less important layers get more sparsity, the overall sparsity stays S."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl

from lightning_fedprune.callbacks._common import contribute
from lightning_fedprune.pruning.allocation import ALLOCATIONS, NORMALIZATIONS, AllocationName, NormalizationName
from lightning_fedprune.pruning.plan import Allocation
from lightning_fedprune.validation import check_choice, check_float


class AdaptiveLayerSparsity(pl.Callback):
    """Allocates the ramp's sparsity across layers by layer importance (instead of uniformly).

    Layer importance is the mean elementwise importance of the layer's parameter, made comparable
    across layers (``normalize="fan_in"`` multiplies it by ``sqrt(fan_in)``, removing the
    ``1/sqrt(fan_in)`` scale of standard initialisations). Layer ``l`` gets
    ``s_l = min(max_layer_sparsity, c * (I_l / geomean(I)) ** -temperature)`` with ``c`` chosen so
    the parameter-weighted mean of ``s_l`` is the target ``S`` (see docs/concepts.md). This
    ``method="power"`` spreads layers little when their mean importances are close (on a 3-layer
    MLP at ``S = 0.5``: 0.50 / 0.50 / 0.47). ``method="global"`` instead ranks the groups of all
    layers together on a per-entry scale (``normalize`` as above) and prunes the lowest ``S`` of the
    parameters, each layer capped at ``max_layer_sparsity``
    (:func:`~lightning_fedprune.pruning.allocation.global_allocation`): a layer's sparsity is the
    share of its groups below the global threshold.

    Args:
        max_layer_sparsity: cap on any layer's sparsity, in ``(0, 1]``; must be >= ``S``.
        temperature: how strongly importance differences spread the sparsities (0 = uniform;
            ``method="power"`` only).
        normalize: ``"fan_in"`` or ``"none"``.
        method: ``"power"`` (default) or ``"global"``.
    """

    def __init__(self, max_layer_sparsity: float = 0.9, temperature: float = 1.0, normalize: NormalizationName = "fan_in",
                 method: AllocationName = "power") -> None:
        self.max_layer_sparsity = check_float(max_layer_sparsity, "max_layer_sparsity", min=0, max=1, min_open=True)
        self.temperature = check_float(temperature, "temperature", min=0)
        check_choice(normalize, "normalize", NORMALIZATIONS)
        self.normalize = normalize
        self.method = check_choice(method, "method", ALLOCATIONS)

    def setup(self, trainer: pl.Trainer, pl_module: Any, stage: str) -> None:
        if stage == "fit":
            contribute(pl_module, "AdaptiveLayerSparsity",
                       allocation=Allocation(self.max_layer_sparsity, self.temperature, self.normalize, self.method))
