"""The one owner of the pruning state: masks, patterns, per-layer sparsity, importance statistics.

It lives on :class:`~lightning_fedprune.FederatedLightningModule` (``fed.pruning``) so checkpoints
carry it; its ``state_dict`` is keyed by parameter names and holds tensors and numbers only.
Callbacks decide *when* and *how much*; this object holds *what*.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

PHASES = {0: "dense", 1: "ramp", 2: "refine", 3: "fine-tune"}


class PruningState:
    def __init__(self) -> None:
        self.masks: dict[str, Tensor] = {}
        self.patterns: dict[str, str] = {}
        self.layer_sparsity: dict[str, float] = {}
        self.target_sparsity: float = 0.0
        self.phase: int = 0
        self.frozen: bool = False
        self.permanent: bool = False
        # server-side importance statistics (no traffic): last pseudo-gradient and its EMA
        self.gradient: dict[str, Tensor] = {}
        self.momentum: dict[str, Tensor] = {}
        self.momentum_beta: float = 0.9
        self.last_update_round: int = -1

    # ------------------------------------------------------------------ queries
    @property
    def active(self) -> bool:
        return bool(self.masks)

    def sparsity(self, names: list[str] | None = None) -> float:
        """Fraction of pruned entries over the masked parameters (or ``names``)."""
        names = list(self.masks) if names is None else names
        total = sum(self.masks[n].numel() for n in names)
        if total == 0:
            return 0.0
        kept = sum(int(self.masks[n].sum()) for n in names)
        return 1.0 - kept / total

    def actual_layer_sparsity(self) -> dict[str, float]:
        return {n: 1.0 - float(m.float().mean()) for n, m in self.masks.items()}

    # ------------------------------------------------------------------ statistics
    def observe_pseudo_gradient(self, pseudo_gradient: dict[str, Tensor], names: list[str]) -> None:
        """Update the server-side gradient / momentum statistics of ``names``.

        Pruned entries get no client update, so their gradient is meaningless (zero); they keep
        their last score from when they were kept (stale), as METHOD.md describes.
        """
        beta = self.momentum_beta
        for name in names:
            g = pseudo_gradient[name].detach()
            mask = self.masks.get(name)
            prev_g = self.gradient.get(name)
            prev_m = self.momentum.get(name)
            new_m = g.clone() if prev_m is None else prev_m * beta + g * (1 - beta)
            if mask is not None and prev_g is not None:
                g = torch.where(mask, g, prev_g)
                new_m = torch.where(mask, new_m, prev_m)
            self.gradient[name] = g.clone()
            self.momentum[name] = new_m

    # ------------------------------------------------------------------ (de)serialisation
    def state_dict(self) -> dict[str, Any]:
        return {
            "masks": {n: m.clone() for n, m in self.masks.items()},
            "patterns": dict(self.patterns),
            "layer_sparsity": dict(self.layer_sparsity),
            "target_sparsity": self.target_sparsity,
            "phase": self.phase,
            "frozen": self.frozen,
            "permanent": self.permanent,
            "gradient": {n: t.clone() for n, t in self.gradient.items()},
            "momentum": {n: t.clone() for n, t in self.momentum.items()},
            "momentum_beta": self.momentum_beta,
            "last_update_round": self.last_update_round,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.masks = {n: m.clone().bool() for n, m in state["masks"].items()}
        self.patterns = dict(state["patterns"])
        self.layer_sparsity = dict(state["layer_sparsity"])
        self.target_sparsity = float(state["target_sparsity"])
        self.phase = int(state["phase"])
        self.frozen = bool(state["frozen"])
        self.permanent = bool(state["permanent"])
        self.gradient = {n: t.clone() for n, t in state["gradient"].items()}
        self.momentum = {n: t.clone() for n, t in state["momentum"].items()}
        self.momentum_beta = float(state["momentum_beta"])
        self.last_update_round = int(state["last_update_round"])
