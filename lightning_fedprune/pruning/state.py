"""The one owner of the pruning state: masks, patterns, per-layer sparsity, importance statistics.

It lives on :class:`~lightning_fedprune.FederatedLightningModule` (``fed.pruning``) so checkpoints
carry it; its ``state_dict`` is keyed by parameter names and holds tensors and numbers only.
The plan (:class:`~lightning_fedprune.pruning.plan.PruningPlan`, contributed by the callbacks) says
*when*, *how much* and *what* (the selection: parameters, pattern, importance); this object holds the
masks and statistics, and applies the plan once per round
(:meth:`PruningState.begin_round` / :meth:`PruningState.end_round`). The criteria are registered objects
(:func:`~lightning_fedprune.pruning.patterns.get_pattern`,
:func:`~lightning_fedprune.pruning.importance.get_importance`,
:func:`~lightning_fedprune.pruning.allocation.get_allocation`): nothing here names one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_fedprune.pruning.allocation import Layer, get_allocation, uniform_allocation
from lightning_fedprune.pruning.importance import Importance, Statistics, get_importance
from lightning_fedprune.pruning.masking import zero_pruned_
from lightning_fedprune.pruning.patterns import check_pattern, get_pattern, shape_2d
from lightning_fedprune.pruning.plan import Phase, PruningPlan, Selection, frozen_at, phase_at, update_at
from lightning_fedprune.pruning.select import mask_from_scores
from lightning_fedprune.pruning.statistics import CLIENT_STATISTIC_NAMES
from lightning_fedprune.pruning.structure import Link, derive_masks, wire_pattern


@dataclass
class MaskChange:
    """What one mask recomputation did (entry counts over all prunable parameters)."""

    flips: int = 0  # entries whose bit changed
    restored: int = 0  # 0 -> 1: previously pruned entries that came back
    pruned: int = 0  # 1 -> 0
    sparsity: float = 0.0


class PruningState:
    """Masks, patterns, per-layer sparsity, phase and the server-side importance statistics of a run."""

    def __init__(self) -> None:
        self.masks: dict[str, Tensor] = {}
        self._kept: dict[str, int] = {}
        self._primary_kept: dict[str, int] = {}  # kept entries of every target's own mask (before the links)
        # the pattern every mask travels with (the wire, the clients) and the pattern every target is scored
        # with; they differ where the task's links add dependent rows/columns (see pruning/structure.py)
        self.patterns: dict[str, str] = {}
        self.target_patterns: dict[str, str] = {}
        self.layer_sparsity: dict[str, float] = {}
        self.target_sparsity: float = 0.0
        self.phase: Phase = Phase.DENSE
        self.frozen: bool = False
        self.permanent: bool = False
        # importance statistics: last pseudo-gradient and its EMA (server-side, no traffic), and the squared
        # gradients (``sq_gradient_l1``, PruneFL's score): server-side, the squared pseudo-gradients accumulated since
        # the masks last changed; with a ClientStatistics part, the sums the clients uploaded in the last window
        self.gradient: dict[str, Tensor] = {}
        self.momentum: dict[str, Tensor] = {}
        self.sq_gradient: dict[str, Tensor] = {}
        self.last_update_round: int = -1
        # client statistics (a plan with a ClientStatistics part): the next merged upload starts a new window
        # (replaces the sums) instead of adding to the current one
        self.statistics_window_open: bool = False
        self.last_change = MaskChange()  # what this round's recomputation did (zeros when none ran)
        # configuration: the plan (the callbacks' parts) and the names its selection resolved to at setup
        self.plan = PruningPlan()
        self.targets: list[str] = []

    # ------------------------------------------------------------------ configuration (read from the plan)
    @property
    def selection(self) -> Selection:
        """What is pruned and how it is scored: the plan's (the ramp's part, or :meth:`configure`)."""
        return self.plan.selection

    @property
    def importance(self) -> Importance:
        return get_importance(self.plan.selection.importance)

    @property
    def needs_statistics(self) -> str | None:
        """The server-side statistic the importance needs (``"gradient"``, ``"momentum"``, ``"sq_gradient"``)
        or None."""
        return self.importance.needs

    @property
    def momentum_source(self) -> str:
        return self.plan.selection.momentum_source

    @property
    def links(self) -> tuple[Link, ...]:
        """The task's links (the dependent masks), read from the plan's selection (none with
        ``dependent_masks=False``)."""
        sel = self.plan.selection
        return sel.structure.links if sel.structure is not None and sel.dependent_masks else ()

    @property
    def dependents(self) -> list[str]:
        """The masked tensors that are not targets: masked only because a link removes their rows/columns."""
        targets = set(self.targets)
        return [n for n in self.masks if n not in targets]

    @property
    def client_statistic(self) -> str | None:
        """The statistic the clients accumulate and upload (the importance's ``needs``) when the plan asks the
        clients for it (a :class:`~lightning_fedprune.pruning.plan.ClientStatistics` part), else None."""
        return self.needs_statistics if self.plan.active and self.plan.statistics is not None else None

    def client_statistics(self, round: int) -> dict[str, tuple[str, ...]]:
        """What the clients of ``round`` accumulate and upload: ``{statistic: pruned tensor names}`` in the
        ``window`` rounds before a mask recomputation (after :meth:`begin_round` of ``round``), else ``{}``."""
        stat = self.client_statistic
        if stat is None or self.permanent:
            return {}
        plan = self.plan
        window = plan.statistics.window
        if any(update_at(round + k, plan, self.target_sparsity) is not None and not frozen_at(round + k, plan)
               for k in range(1, window + 1)):
            return {stat: tuple(self.targets)}
        return {}

    def configure(self, targets: list[str], pattern: str, importance: str, momentum_beta: float = 0.9,
                  momentum_source: str = "ema") -> None:
        """Prune ``targets`` with ``pattern`` scored by ``importance`` (direct use of the state, without the
        callbacks: sets the plan's selection)."""
        get_pattern(pattern)
        get_importance(importance)
        selection = Selection(pattern, importance, momentum_beta=momentum_beta, momentum_source=momentum_source)
        self.plan = dataclasses.replace(self.plan, selection=selection)
        self.targets = list(targets)
        if not self.patterns:
            self.patterns = {n: pattern for n in targets}
        if not self.target_patterns:
            self.target_patterns = {n: pattern for n in targets}

    def apply_plan(self, plan: PruningPlan, named_shapes: list[tuple[str, tuple[int, ...]]]) -> None:
        """Validate ``plan`` and take it; its selection is resolved against the task's ``named_shapes``."""
        plan.validate()
        self.plan = plan
        if not plan.active:
            return
        sel = plan.selection
        targets = sel.resolve(named_shapes)
        shapes = dict(named_shapes)
        for name in targets:
            check_pattern(sel.pattern, shapes[name], name=name)
        self.targets = targets
        if not self.patterns:
            self.patterns = {n: sel.pattern for n in targets}
        if not self.target_patterns:
            self.target_patterns = {n: sel.pattern for n in targets}
        if plan.statistics is not None:
            need = self.needs_statistics
            if need not in CLIENT_STATISTIC_NAMES:
                raise ValueError(f"ClientStatistics: importance {sel.importance!r} needs "
                                 f"{'no statistic' if need is None else repr(need)}, which clients cannot accumulate "
                                 f"(client statistics: {tuple(CLIENT_STATISTIC_NAMES)}).")
            if not isinstance(plan.statistics.window, int) or plan.statistics.window < 1:
                raise ValueError(f"ClientStatistics: `window` must be an int >= 1, got {plan.statistics.window!r}.")

    def reapply_plan(self, round: int, params: dict[str, Tensor], server_momentum: dict[str, Tensor] | None = None) -> None:
        """Make a changed plan take effect now (a resume with ``resume_config_change="apply"``): the
        restored state carries the checkpoint's pattern and masks, computed under the old settings."""
        if self.frozen or self.permanent or not self.plan.active:
            return
        self.patterns = {n: self.selection.pattern for n in self.targets}
        self.target_patterns = dict(self.patterns)
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
        self.frozen = frozen_at(round, plan)
        sparsity = update_at(round, plan, self.target_sparsity)
        if sparsity is not None and not self.permanent:
            self.last_change = self.recompute(params, sparsity, round, server_momentum)
        if self.frozen and plan.freeze.make_permanent and self.masks and not self.permanent:
            self.make_permanent(params)
        return self.last_change

    def end_round(self, pseudo_gradient: dict[str, Tensor],
                  client_statistics: dict[str, dict[str, Tensor]] | None = None) -> None:
        """After the server step: update the importance statistics the importance needs — from the server's
        pseudo-gradient, or, when the plan asks the clients for it, from ``client_statistics`` (the round's
        merged uploads, ``{statistic: {name: tensor}}``): the first upload after a mask recomputation replaces
        the sums, later ones of the same window add to them."""
        if not self.plan.active:
            return
        need = self.needs_statistics
        stat = self.client_statistic
        if stat is not None:
            sums = (client_statistics or {}).get(stat)
            if sums:
                current = getattr(self, stat)
                for name in self.targets:
                    value = sums[name].detach()
                    current[name] = value.clone() if not self.statistics_window_open or name not in current \
                        else current[name] + value
                self.statistics_window_open = True
            return
        if need == "gradient" or (need == "momentum" and self.momentum_source == "ema"):
            self.observe_pseudo_gradient(pseudo_gradient, self.targets)
        elif need == "sq_gradient":
            for name in self.targets:  # pruned entries get a zero pseudo-gradient: their sum stays as it was
                g = pseudo_gradient[name].detach()
                prev = self.sq_gradient.get(name)
                self.sq_gradient[name] = g * g if prev is None else prev + g * g

    def make_permanent(self, params: dict[str, Tensor]) -> None:
        """Drop the pruned values from the global model (exact zeros): the masks can no longer change."""
        zero_pruned_(params, self.masks)
        self.permanent = True
        self.frozen = True

    # ------------------------------------------------------------------ mask computation
    def recompute(self, params: dict[str, Tensor], sparsity: float, round: int,
                  server_momentum: dict[str, Tensor] | None = None) -> MaskChange:
        """New masks for the target parameters at overall ``sparsity`` from fresh importance.

        Uniform allocation gives every layer ``sparsity``; adaptive allocation (when configured)
        distributes it by layer importance. Kept and pruned entries are ranked together, so a
        pruned entry whose (stale) score now beats a kept one comes back. The task's links then add the
        dependent masks (:func:`~lightning_fedprune.pruning.structure.derive_masks`): the sparsity is that of
        the targets, the masks also cover the rows and columns the pruned ones make dead. The server-side
        accumulated squared pseudo-gradients (``sq_gradient_l1``) restart from zero for the entries kept by the new
        masks; pruned entries keep the sum of the window in which they were last kept. Client statistics (a
        ``ClientStatistics`` part) cover every entry, so the next upload replaces them all. Masks are made on
        the parameters' device.
        """
        importance, sel = self.importance, self.selection
        momentum = server_momentum if sel.momentum_source == "server_optimizer" else self.momentum
        need = importance.needs
        stats: dict[str, Statistics] = {}
        for name in self.targets:
            stats[name] = Statistics(self.gradient.get(name), momentum.get(name) if momentum else None,
                                     self.sq_gradient.get(name))
            if need is not None and stats[name].get(need) is None:
                what = {"gradient": "server-side gradient", "momentum": "momentum",
                        "sq_gradient": "accumulated squared gradient"}.get(need, need)
                if self.client_statistic is not None:
                    raise RuntimeError(f"importance {importance.name!r} has no {what} for {name!r}: no client uploaded "
                                       f"its {need} statistics before round {round} (the clients of the rounds before a "
                                       "mask recomputation upload them; did every client of those rounds fail?).")
                raise RuntimeError(f"importance {importance.name!r} has no {what} for {name!r} yet: no round has been "
                                   "aggregated; start pruning at round >= 1.")
        patterns = {n: get_pattern(self.target_patterns.get(n) or self.patterns.get(n, sel.pattern)) for n in self.targets}
        scores = {n: importance.scores(patterns[n], params[n].detach(), stats[n]) for n in self.targets}
        per_layer = self._allocate(params, stats, scores, sparsity)
        change = MaskChange()
        primary: dict[str, Tensor] = {}
        new_kept: dict[str, int] = {}
        for name in self.targets:
            shape = params[name].shape
            keep = mask_from_scores(scores[name], per_layer[name])
            primary[name] = patterns[name].expand(keep, *shape_2d(shape)).reshape(shape).contiguous()
            new_kept[name] = int(keep.sum()) * (primary[name].numel() // keep.numel())  # every group has the same size
        primary_kept = dict(new_kept)
        new_masks, wire = primary, {n: patterns[n].name for n in self.targets}
        if self.links:
            new_masks = derive_masks(primary, self.links, {n: t.shape for n, t in params.items()})
            for name, mask in new_masks.items():
                if name in primary and torch.equal(mask, primary[name]):
                    continue
                wire[name] = wire_pattern(mask, wire.get(name))
                new_kept[name] = int(mask.sum())
        for name, mask in new_masks.items():
            kept_new = new_kept[name]
            old = self.masks.get(name)
            if old is not None:
                flips = int(torch.count_nonzero(mask ^ old.to(mask.device)))
                restored = (flips + kept_new - self._kept_count(name)) // 2  # kept_new - kept_old = restored - pruned
                change.restored += restored
                change.pruned += flips - restored
            else:
                change.pruned += mask.numel() - kept_new
        for name, old in self.masks.items():  # a dependent mask no longer needed: its entries all come back
            if name not in new_masks:
                change.restored += old.numel() - self._kept_count(name)
        change.flips = change.restored + change.pruned
        if self.client_statistic is not None:
            self.statistics_window_open = False  # the clients' next upload starts a new window (every entry fresh)
        else:
            self.sq_gradient = {n: acc.masked_fill(new_masks[n].to(acc.device), 0) if n in new_masks else acc
                                for n, acc in self.sq_gradient.items()}
        self.masks = new_masks
        self._kept = new_kept
        self._primary_kept = primary_kept
        self.patterns = wire
        self.target_patterns = {n: patterns[n].name for n in self.targets}
        self.layer_sparsity = dict(per_layer)
        self.target_sparsity = float(sparsity)
        self.last_update_round = int(round)
        change.sparsity = self.sparsity()
        return change

    def _allocate(self, params: dict[str, Tensor], stats: dict[str, Statistics], scores: dict[str, Tensor],
                  sparsity: float) -> dict[str, float]:
        """Per-layer sparsity: uniform, or the plan's adaptive allocation method."""
        settings = self.plan.allocation
        if settings is None or sparsity == 0.0:
            return uniform_allocation({n: params[n].numel() for n in self.targets}, sparsity)
        importance = self.importance
        layers = {n: Layer(tuple(params[n].shape), scores[n], importance.source(params[n], stats[n]), importance.norm)
                  for n in self.targets}
        return get_allocation(settings.method).allocate(layers, sparsity, settings)

    # ------------------------------------------------------------------ queries
    def _kept_count(self, name: str) -> int:
        """Kept entries of ``name``'s mask (cached: masks only change in ``recompute``/``load_state_dict``)."""
        if name not in self._kept:
            self._kept[name] = int(self.masks[name].sum())
        return self._kept[name]

    def sparsity(self, names: list[str] | None = None) -> float:
        """Fraction of pruned entries: by default of the targets by their own masks -- the sparsity the plan
        asks for (``prune/sparsity``); the rows and columns the task's links remove with them are not counted
        (:meth:`masked_sparsity` counts them). With ``names``: of those tensors' final masks."""
        if names is None:
            targets = [n for n in self.targets if n in self.masks] or list(self.masks)
            total = sum(self.masks[n].numel() for n in targets)
            kept = sum(self._primary_kept.get(n, self._kept_count(n)) for n in targets)
            return 1.0 - kept / total if total else 0.0
        total = sum(self.masks[n].numel() for n in names)
        if total == 0:
            return 0.0
        kept = sum(self._kept_count(n) for n in names)
        return 1.0 - kept / total

    def masked_sparsity(self) -> float:
        """Fraction of pruned entries over every masked tensor, the dependent masks included."""
        return self.sparsity(list(self.masks))

    def actual_layer_sparsity(self) -> dict[str, float]:
        return {n: 1.0 - self._kept_count(n) / m.numel() for n, m in self.masks.items()}

    def zero_pruned_(self, params: dict[str, Tensor]) -> None:
        """Set the pruned entries of ``params`` (by name) to exact zeros, in place."""
        zero_pruned_(params, self.masks)

    # ------------------------------------------------------------------ statistics
    def observe_pseudo_gradient(self, pseudo_gradient: dict[str, Tensor], names: list[str]) -> None:
        """Update the server-side gradient / momentum statistics of ``names``.

        Pruned entries get no client update, so their gradient is meaningless (zero); they keep
        their last score from when they were kept (stale), as METHOD.md describes.
        """
        beta = self.selection.momentum_beta
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

    def to(self, device: torch.device | str) -> PruningState:
        """Move the masks and statistics to ``device`` (where the model is), in place; returns ``self``."""
        def move(d: dict[str, Tensor]) -> dict[str, Tensor]:
            return {n: t.to(device) for n, t in d.items()}

        self.masks, self.gradient, self.momentum, self.sq_gradient = (
            move(self.masks), move(self.gradient), move(self.momentum), move(self.sq_gradient))
        return self

    # ------------------------------------------------------------------ (de)serialisation
    def state_dict(self) -> dict[str, Any]:
        return {
            "masks": {n: m.clone() for n, m in self.masks.items()},
            "patterns": dict(self.patterns),
            "target_patterns": dict(self.target_patterns),
            "primary_kept": dict(self._primary_kept),
            "layer_sparsity": dict(self.layer_sparsity),
            "target_sparsity": self.target_sparsity,
            "phase": int(self.phase),
            "frozen": self.frozen,
            "permanent": self.permanent,
            "gradient": {n: t.clone() for n, t in self.gradient.items()},
            "momentum": {n: t.clone() for n, t in self.momentum.items()},
            "sq_gradient": {n: t.clone() for n, t in self.sq_gradient.items()},
            "momentum_beta": self.selection.momentum_beta,  # (informational: the plan's; compared as configuration)
            "last_update_round": self.last_update_round,
            "statistics_window_open": self.statistics_window_open,
        }

    def load_state_dict(self, state: dict[str, Any], device: torch.device | str | None = None) -> None:
        """Restore from :meth:`state_dict`; tensors go to ``device`` (default: where they were saved)."""
        def t(x: Tensor) -> Tensor:
            return x.clone() if device is None else x.to(device, copy=True)

        self.masks = {n: t(m).bool() for n, m in state["masks"].items()}
        self._kept = {}
        self.patterns = dict(state["patterns"])
        # (older checkpoints have no dependent masks: every masked tensor is scored with its wire pattern)
        self.target_patterns = dict(state.get("target_patterns", state["patterns"]))
        self._primary_kept = {n: int(k) for n, k in state.get("primary_kept", {}).items()}
        self.layer_sparsity = dict(state["layer_sparsity"])
        self.target_sparsity = float(state["target_sparsity"])
        self.phase = Phase(int(state["phase"]))
        self.frozen = bool(state["frozen"])
        self.permanent = bool(state["permanent"])
        self.gradient = {n: t(x) for n, x in state["gradient"].items()}
        self.momentum = {n: t(x) for n, x in state["momentum"].items()}
        self.sq_gradient = {n: t(x) for n, x in state.get("sq_gradient", {}).items()}  # older checkpoints: none
        self.last_update_round = int(state["last_update_round"])
        self.statistics_window_open = bool(state.get("statistics_window_open", False))  # older checkpoints: none
