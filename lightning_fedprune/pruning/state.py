"""The one owner of the pruning state: masks, patterns, per-layer sparsity, importance statistics.

It lives on :class:`~lightning_fedprune.FederatedLightningModule` (``fed.pruning``) so checkpoints
carry it; its ``state_dict`` is keyed by parameter names and holds tensors and numbers only.
The plan (:class:`~lightning_fedprune.pruning.plan.PruningPlan`, contributed by the callbacks) says
*when* and *how much*; this object holds *what*, and applies the plan once per round
(:meth:`PruningState.begin_round` / :meth:`PruningState.end_round`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_fedprune.pruning.patterns import check_pattern
from lightning_fedprune.pruning.plan import Phase, PruningPlan, phase_at, update_at


@dataclass
class MaskChange:
    """What one mask recomputation did (entry counts over all prunable parameters)."""

    flips: int = 0  # entries whose bit changed
    restored: int = 0  # 0 -> 1: previously pruned entries that came back
    pruned: int = 0  # 1 -> 0
    sparsity: float = 0.0


class PruningState:
    def __init__(self) -> None:
        self.masks: dict[str, Tensor] = {}
        self._kept: dict[str, int] = {}
        self.patterns: dict[str, str] = {}
        self.layer_sparsity: dict[str, float] = {}
        self.target_sparsity: float = 0.0
        self.phase: Phase = Phase.DENSE
        self.frozen: bool = False
        self.permanent: bool = False
        # server-side importance statistics (no traffic): last pseudo-gradient and its EMA, and the squared
        # pseudo-gradients accumulated since the masks last changed (``sq_gradient_l1``, PruneFL's score)
        self.gradient: dict[str, Tensor] = {}
        self.momentum: dict[str, Tensor] = {}
        self.sq_gradient: dict[str, Tensor] = {}
        self.momentum_beta: float = 0.9
        self.last_update_round: int = -1
        self.last_change = MaskChange()  # what this round's recomputation did (zeros when none ran)
        # configuration (from the plan at setup; not checkpointed as state: it comes from the config)
        self.plan = PruningPlan()
        self.targets: list[str] = []
        self.pattern: str = "unstructured"
        self.importance: str = "weight_l2"
        self.momentum_source: str = "ema"
        self.allocation: dict[str, Any] | None = None  # None = uniform; else adaptive settings

    # ------------------------------------------------------------------ configuration
    def configure(self, targets: list[str], pattern: str, importance: str, momentum_beta: float = 0.9,
                  momentum_source: str = "ema") -> None:
        self.targets = list(targets)
        self.pattern = pattern
        self.importance = importance
        self.momentum_beta = momentum_beta
        self.momentum_source = momentum_source
        if not self.patterns:
            self.patterns = {n: pattern for n in targets}

    def apply_plan(self, plan: PruningPlan, named_shapes: list[tuple[str, tuple[int, ...]]]) -> None:
        """Validate ``plan`` and take its configuration: the parameters it prunes (resolved against the
        task's ``named_shapes``), their pattern, the importance and the allocation."""
        plan.validate()
        self.plan = plan
        if not plan.active:
            return
        sel = plan.selection
        targets = sel.resolve(named_shapes)
        shapes = dict(named_shapes)
        for name in targets:
            check_pattern(sel.pattern, shapes[name], name=name)
        self.configure(targets, sel.pattern, sel.importance, sel.momentum_beta, sel.momentum_source)
        self.allocation = dataclasses.asdict(plan.allocation) if plan.allocation is not None else None

    def reapply_plan(self, round: int, params: dict[str, Tensor], server_momentum: dict[str, Tensor] | None = None) -> None:
        """Make a changed plan take effect now (a resume with ``resume_config_change="apply"``): the
        restored state carries the checkpoint's pattern and masks, computed under the old settings."""
        if self.frozen or self.permanent or not self.plan.active:
            return
        sel = self.plan.selection
        self.configure(self.targets, sel.pattern, sel.importance, sel.momentum_beta, sel.momentum_source)
        self.patterns = {n: sel.pattern for n in self.targets}
        if self.masks or phase_at(round, self.plan) != Phase.DENSE:
            self.recompute(params, self.plan.ramp.sparsity_at(round), round, server_momentum)

    # ------------------------------------------------------------------ the plan, applied once per round
    def begin_round(self, round: int, params: dict[str, Tensor],
                    server_momentum: dict[str, Tensor] | None = None) -> MaskChange:
        """Before the round's payload is built: the round's phase, the masks the plan asks for, and the
        pruned values dropped for good when fine-tuning starts (``Freeze.make_permanent``)."""
        self.last_change = MaskChange(sparsity=self.sparsity() if self.masks else 0.0)
        plan = self.plan
        if not plan.active:
            return self.last_change
        self.phase = phase_at(round, plan)
        self.frozen = self.phase == Phase.FINETUNE and plan.freeze is not None
        sparsity = update_at(round, plan, self.target_sparsity)
        if sparsity is not None and not self.permanent:
            self.last_change = self.recompute(params, sparsity, round, server_momentum)
        if self.frozen and plan.freeze.make_permanent and self.masks and not self.permanent:
            self.make_permanent(params)
        return self.last_change

    def end_round(self, pseudo_gradient: dict[str, Tensor]) -> None:
        """After the server step: update the server-side importance statistics the importance needs."""
        if not self.plan.active:
            return
        need = self.needs_statistics
        if need == "gradient" or (need == "momentum" and self.momentum_source == "ema"):
            self.observe_pseudo_gradient(pseudo_gradient, self.targets)
        elif need == "sq_gradient":
            for name in self.targets:  # pruned entries get a zero pseudo-gradient: their sum stays as it was
                g = pseudo_gradient[name].detach()
                prev = self.sq_gradient.get(name)
                self.sq_gradient[name] = g * g if prev is None else prev + g * g

    def make_permanent(self, params: dict[str, Tensor]) -> None:
        """Drop the pruned values from the global model (exact zeros): the masks can no longer change."""
        self.zero_pruned_(params)
        self.permanent = True
        self.frozen = True

    @property
    def needs_statistics(self) -> str | None:
        """Which server-side statistic the importance needs: ``"gradient"``, ``"momentum"``, ``"sq_gradient"``
        or None."""
        if self.importance.startswith("momentum"):
            return "momentum"
        if self.importance.startswith("sq_gradient"):
            return "sq_gradient"
        if self.importance.startswith("gradient") or self.importance == "weight_x_gradient":
            return "gradient"
        return None

    # ------------------------------------------------------------------ mask computation
    def recompute(self, params: dict[str, Tensor], sparsity: float, round: int,
                  server_momentum: dict[str, Tensor] | None = None) -> MaskChange:
        """New masks for the target parameters at overall ``sparsity`` from fresh importance.

        Uniform allocation gives every layer ``sparsity``; adaptive allocation (when configured)
        distributes it by layer importance. Kept and pruned entries are ranked together, so a
        pruned entry whose (stale) score now beats a kept one comes back. The accumulated squared
        gradients (``sq_gradient_l1``) restart from zero for the entries kept by the new masks; pruned
        entries keep the sum of the window in which they were last kept.
        """
        from lightning_fedprune.pruning.importance import group_scores
        from lightning_fedprune.pruning.patterns import expand_groups, mask_from_scores

        momentum = server_momentum if self.momentum_source == "server_optimizer" else self.momentum
        sources: dict[str, tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]] = {}
        for name in self.targets:
            w = params[name].detach()
            g = self.gradient.get(name)
            m = momentum.get(name) if momentum else None
            sq = self.sq_gradient.get(name)
            if self.needs_statistics == "gradient" and g is None:
                raise RuntimeError(
                    f"importance {self.importance!r} needs a server-side gradient for {name!r}, but no round has been "
                    "aggregated yet; start pruning at round >= 1."
                )
            if self.needs_statistics == "momentum" and m is None:
                raise RuntimeError(f"importance {self.importance!r} has no momentum for {name!r} yet; start pruning at round >= 1.")
            if self.needs_statistics == "sq_gradient" and sq is None:
                raise RuntimeError(f"importance {self.importance!r} has no accumulated squared gradient for {name!r} yet; "
                                   "start pruning at round >= 1.")
            sources[name] = (w, g, m, sq)
        scores = {n: group_scores(self.importance, self.patterns.get(n, self.pattern), *sources[n]) for n in self.targets}
        per_layer = self._allocate(params, sources, scores, sparsity)
        change = MaskChange()
        new_masks: dict[str, Tensor] = {}
        new_kept: dict[str, int] = {}
        for name in self.targets:
            pattern = self.patterns.get(name, self.pattern)
            keep = mask_from_scores(scores[name], per_layer[name])
            mask = expand_groups(keep, pattern, params[name].shape)
            kept_new = int(keep.sum()) * (mask.numel() // keep.numel())  # every group has the same size
            old = self.masks.get(name)
            if old is not None:
                flips = int(torch.count_nonzero(mask ^ old))
                restored = (flips + kept_new - self._kept_count(name)) // 2  # kept_new - kept_old = restored - pruned
                change.restored += restored
                change.pruned += flips - restored
            else:
                change.pruned += mask.numel() - kept_new
            new_masks[name] = mask
            new_kept[name] = kept_new
        change.flips = change.restored + change.pruned
        self.sq_gradient = {n: acc.masked_fill(new_masks[n], 0) if n in new_masks else acc for n, acc in self.sq_gradient.items()}
        self.masks = new_masks
        self._kept = new_kept
        self.patterns = {n: self.patterns.get(n, self.pattern) for n in self.targets}
        self.layer_sparsity = dict(per_layer)
        self.target_sparsity = float(sparsity)
        self.last_update_round = int(round)
        change.sparsity = self.sparsity()
        return change

    def _allocate(self, params: dict[str, Tensor], sources: dict[str, tuple[Tensor, ...]], scores: dict[str, Tensor],
                  sparsity: float) -> dict[str, float]:
        """Per-layer sparsity: uniform, or the plan's adaptive allocation (power law or global ranking)."""
        from lightning_fedprune.pruning.allocation import (
            adaptive_allocation,
            global_allocation,
            layer_importance,
            uniform_allocation,
        )
        from lightning_fedprune.pruning.importance import importance_source, parse_importance

        sizes = {n: params[n].numel() for n in self.targets}
        alloc = self.allocation
        if alloc is None or sparsity == 0.0:
            return uniform_allocation(sizes, sparsity)
        normalize = alloc.get("normalize", "fan_in")
        if alloc.get("method", "power") == "global":
            return global_allocation(scores, {n: params[n].shape for n in self.targets}, sparsity,
                                     max_layer_sparsity=alloc["max_layer_sparsity"],
                                     norm=parse_importance(self.importance)[1], normalize=normalize)
        imp = {n: layer_importance(importance_source(self.importance, *sources[n]), params[n].shape, normalize=normalize)
               for n in self.targets}
        return adaptive_allocation(imp, sizes, sparsity, max_layer_sparsity=alloc["max_layer_sparsity"],
                                   temperature=alloc.get("temperature", 1.0))

    # ------------------------------------------------------------------ queries
    def _kept_count(self, name: str) -> int:
        """Kept entries of ``name``'s mask (cached: masks only change in ``recompute``/``load_state_dict``)."""
        if name not in self._kept:
            self._kept[name] = int(self.masks[name].sum())
        return self._kept[name]

    def sparsity(self, names: list[str] | None = None) -> float:
        """Fraction of pruned entries over the masked parameters (or ``names``)."""
        names = list(self.masks) if names is None else names
        total = sum(self.masks[n].numel() for n in names)
        if total == 0:
            return 0.0
        kept = sum(self._kept_count(n) for n in names)
        return 1.0 - kept / total

    def actual_layer_sparsity(self) -> dict[str, float]:
        return {n: 1.0 - self._kept_count(n) / m.numel() for n, m in self.masks.items()}

    def zero_pruned_(self, params: dict[str, Tensor]) -> None:
        """Set the pruned entries of ``params`` (by name) to exact zeros, in place."""
        with torch.no_grad():
            for name, mask in self.masks.items():
                params[name].masked_fill_(~mask, 0)

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
            "phase": int(self.phase),
            "frozen": self.frozen,
            "permanent": self.permanent,
            "gradient": {n: t.clone() for n, t in self.gradient.items()},
            "momentum": {n: t.clone() for n, t in self.momentum.items()},
            "sq_gradient": {n: t.clone() for n, t in self.sq_gradient.items()},
            "momentum_beta": self.momentum_beta,
            "last_update_round": self.last_update_round,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.masks = {n: m.clone().bool() for n, m in state["masks"].items()}
        self._kept = {}
        self.patterns = dict(state["patterns"])
        self.layer_sparsity = dict(state["layer_sparsity"])
        self.target_sparsity = float(state["target_sparsity"])
        self.phase = Phase(int(state["phase"]))
        self.frozen = bool(state["frozen"])
        self.permanent = bool(state["permanent"])
        self.gradient = {n: t.clone() for n, t in state["gradient"].items()}
        self.momentum = {n: t.clone() for n, t in state["momentum"].items()}
        self.sq_gradient = {n: t.clone() for n, t in state.get("sq_gradient", {}).items()}  # older checkpoints: none
        self.momentum_beta = float(state["momentum_beta"])
        self.last_update_round = int(state["last_update_round"])
