"""Federated Dropout (Caldas et al. 2018, arXiv 1812.07210) as a server strategy.

Every round each client trains its own random sub-model: of every unit group of the model (the hidden units of a
feed-forward block, the heads of an attention layer, the channels of a convolution block:
:mod:`lightning_fedprune.baselines.units`) a fraction ``rate`` of the units is dropped, drawn afresh for every
client and round as a pure function of the client's derived seed. A dropped unit is removed from every tensor
that holds it (the rows of the producing weight and its bias, the columns of the consuming weight, the entries of
channel-wise layers in between), so the sub-model is a smaller network of the same kind. The kept units are
scaled by ``1 / (1 - p)`` in the sub-model's forward (inverted dropout, ``p`` the fraction of the group's units
dropped): the weight that reads them is read ``1 / (1 - p)`` times larger, so the sub-model's output has the
full model's expectation over the draw and the server evaluates the full model unscaled, as dropout does.

The server keeps the full model and merges the sub-models into it: an entry is the weighted mean over the
clients that trained it, and keeps its server value when none did. The sub-models travel in the same wire format
as pruned models (the kept rows or columns plus an index) and train as compact layers where the layer allows it
(an ``nn.Linear`` whose rows or columns are dropped; attention projections and convolutions train masked-dense),
so bytes and client size are measured exactly as for Federated Pruning. With ``start_round`` the first rounds
are dense FedAvg (Federated Pruning's dense warm-up).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_fedprune.baselines.units import UnitGroup, select_units, units_of
from lightning_fedprune.federated.protocol import ClientResult
from lightning_fedprune.federated.strategies import (
    Aggregate,
    FedAvg,
    RoundContext,
    ServerOptimizerName,
    SubModel,
    WeightingName,
    make_strategy,
    server_optimizer_of,
)
from lightning_fedprune.pruning.patterns import groups_from_mask
from lightning_fedprune.pruning.select import num_to_prune
from lightning_fedprune.validation import check_bool, check_float, check_int, check_regex

#: mixed into the client's seed so the dropout draw is independent of the client's data order
_DROPOUT_STREAM = 0x5EED_D80


class FederatedDropout(FedAvg):
    """Federated Dropout: each client trains a random sub-model of whole units; the server merges them.

    Args:
        rate: fraction of each unit group's units a client drops, in ``[0, 1)`` (Caldas et al. use 0.25-0.5);
            ``round(rate * units)`` are dropped (Python rounding, as pruning counts groups; at most all but one),
            the same number for every client.
        start_round: the first round with sub-models; the rounds before are dense FedAvg (a warm-up).
        parameters: regular expression (``re.fullmatch``); a unit group is used when one of its tensors matches
            (default: every unit group of the model).
        exclude: optional regular expression; a unit group with a tensor that matches is left whole.
        scale: inverted-dropout scaling: the kept units count ``1 / (1 - p)`` in the sub-model's forward (the
            weight that reads them is read scaled), so the full model the server keeps and evaluates needs no
            rescaling. ``False``: the sub-models' forward is the plain slice of the full model.
        server_optimizer: the server optimiser on the merged model's pseudo-gradient: ``"sgd"`` (default; with
            ``server_lr=1`` the merged model itself, Caldas et al.'s FedAvg), ``"sgdm"`` or ``"adam"``.
        server_lr: the server optimiser's learning rate (None: 1.0 for ``"sgd"``/``"sgdm"``, 0.01 for ``"adam"``).
        server_momentum: ``"sgdm"``'s momentum in ``[0, 1)`` (None: 0.9).
        server_betas: ``"adam"``'s two betas, each in ``[0, 1)`` (None: ``(0.9, 0.99)``).
        server_eps: ``"adam"``'s epsilon, > 0 (None: 1e-3).
        weighting: see :class:`~lightning_fedprune.federated.strategies.Strategy`.

    The units come from the task (:func:`~lightning_fedprune.baselines.units.units_of`: its ``dropout_units()``,
    or the structure of its ``nn.Sequential`` blocks and ``nn.MultiheadAttention`` layers). A tensor that the
    pruning state also prunes keeps its pruning mask: the sub-model drops units among what is kept (the two
    masks combined; the pruning pattern when the combination is a union of its groups, else entry by entry).
    """

    def __init__(self, rate: float = 0.5, start_round: int = 0, parameters: str | None = None,
                 exclude: str | None = None, scale: bool = True, server_optimizer: ServerOptimizerName = "sgd",
                 server_lr: float | None = None, server_momentum: float | None = None,
                 server_betas: Sequence[float] | None = None, server_eps: float | None = None,
                 weighting: WeightingName = "num_samples") -> None:
        inner = make_strategy(server_optimizer, server_lr, server_momentum, server_betas, server_eps)
        super().__init__(inner.server_lr, weighting)
        self.server_optimizer = server_optimizer
        self.server_momentum = getattr(inner, "server_momentum", None)
        self.server_betas = getattr(inner, "server_betas", None)
        self.server_eps = getattr(inner, "server_eps", None)
        self.rate = check_float(rate, "rate", min=0, max=1, max_open=True)
        self.start_round = check_int(start_round, "start_round", min=0)
        check_regex(parameters, "parameters")
        check_regex(exclude, "exclude")
        self.parameters = parameters
        self.exclude = exclude
        self.scale = check_bool(scale, "scale")
        self._units: tuple[Any, list[UnitGroup]] | None = None

    def make_optimizer(self, params: list[Tensor]) -> torch.optim.Optimizer:
        return server_optimizer_of(self.server_optimizer, params, self.server_lr, self.server_momentum or 0.0,
                                   self.server_betas or (0.9, 0.99), self.server_eps or 1e-3)

    @property
    def has_momentum(self) -> bool:
        return self.server_optimizer == "adam" or (self.server_optimizer == "sgdm" and bool(self.server_momentum))

    def config(self) -> dict[str, Any]:
        config = {**super().config(), "server_optimizer": self.server_optimizer, "strategy": "federated_dropout",
                  "rate": self.rate, "start_round": self.start_round, "parameters": self.parameters,
                  "exclude": self.exclude, "scale": self.scale}
        if self.server_optimizer == "sgdm":
            config["server_momentum"] = self.server_momentum
        if self.server_optimizer == "adam":
            config.update(server_betas=list(self.server_betas), server_eps=self.server_eps)
        return config

    # ------------------------------------------------------------------ the units
    def units(self, ctx: RoundContext) -> list[UnitGroup]:
        """The unit groups this strategy drops from (:func:`~lightning_fedprune.baselines.units.units_of` of the
        task, selected by ``parameters``/``exclude``); read once per model."""
        if ctx.task is None:
            raise ValueError("FederatedDropout reads its units from the model: the RoundContext needs `task`.")
        shapes = {n: tuple(p.shape) for n, p in ctx.params.items()}
        key = (type(ctx.task).__qualname__, tuple(shapes.items()))
        if self._units is None or self._units[0] != key:
            groups = select_units(units_of(ctx.task, shapes), self.parameters, self.exclude)
            if not groups:
                what = "no unit group" if self.parameters is None else f"no unit group with a tensor that matches " \
                                                                       f"`parameters={self.parameters!r}`"
                raise ValueError(f"FederatedDropout found {what} in {type(ctx.task).__name__} (units are read from "
                                 "nn.Sequential blocks and nn.MultiheadAttention layers; a task can declare its own "
                                 "with a `dropout_units()` method).")
            readers = [g.reader for g in groups if g.reader is not None]
            if len(readers) != len(set(readers)):
                raise ValueError("FederatedDropout: a tensor reads the units of two groups; declare the units with "
                                 "`dropout_units()` so that every tensor reads at most one group.")
            self._units = (key, groups)
        return self._units[1]

    # ------------------------------------------------------------------ what each client gets
    def configure(self, ctx: RoundContext, cohort: Sequence[int], seeds: Sequence[int]) -> list[SubModel | None]:
        """Every client's sub-model: ``round(rate * units)`` units of every unit group dropped at random (a pure
        function of the client's seed); ``None`` (the round's model) before ``start_round`` or at rate 0."""
        if self.rate == 0.0 or ctx.round < self.start_round:
            return [None] * len(cohort)
        groups = self.units(ctx)
        return [self._sub_model(ctx, groups, seed) for seed in seeds]

    def _sub_model(self, ctx: RoundContext, groups: list[UnitGroup], seed: int) -> SubModel:
        generator = torch.Generator().manual_seed((seed ^ _DROPOUT_STREAM) & 0x7FFF_FFFF_FFFF_FFFF)
        shapes = {n: tuple(p.shape) for n, p in ctx.params.items()}
        dropped_masks: dict[str, Tensor] = {}
        axes: dict[str, set[bool]] = {}  # per tensor: whether it holds units along its first axis, a later one
        scales: dict[str, float] = {}
        for group in groups:
            drop = min(num_to_prune(self.rate, group.units), group.units - 1)
            dropped = torch.randperm(group.units, generator=generator)[:drop].sort().values
            device = ctx.params[group.members[0].name].device
            for name, mask in group.masks(dropped, shapes, device).items():
                dropped_masks[name] = dropped_masks[name] & mask if name in dropped_masks else mask
            for axis in group.members:
                axes.setdefault(axis.name, set()).add(axis.dim == 0)
            if self.scale and group.reader is not None and drop:
                scales[group.reader] = group.units / (group.units - drop)
        masks, patterns = dict(ctx.masks), dict(ctx.patterns)
        for name, mask in dropped_masks.items():
            own = "unstructured" if len(axes[name]) > 1 else "row" if True in axes[name] else "column"
            if name in ctx.masks:
                mask = mask & ctx.masks[name].to(mask.device)
                pattern = next((p for p in (ctx.patterns.get(name), own) if p is not None and _is_union(mask, p)),
                               "unstructured")
            else:
                pattern = own
            masks[name], patterns[name] = mask, pattern
        return SubModel(masks, patterns, scales)

    # ------------------------------------------------------------------ the merge
    def aggregate(self, ctx: RoundContext, results: Sequence[ClientResult], states: Sequence[Mapping[str, Tensor] | None],
                  sub_models: Sequence[SubModel | None]) -> Aggregate:
        """FedAvg's weighted mean, then every tensor a sub-model masks merged entry by entry: the weighted mean
        over the clients that trained the entry (their decoded states hold zeros where they did not), the
        server's value where no client did."""
        agg = self.weighted_mean(results, states, [*ctx.params, *ctx.buffers])
        if not agg.ok or all(sub is None for sub in sub_models):
            return agg
        names = list(dict.fromkeys(n for i in agg.ok for n in _masks_of(sub_models[i], results[i])))
        for name in names:
            server = ctx.params[name].detach()
            num = torch.zeros_like(server)
            den = torch.zeros_like(server)
            for i in agg.ok:
                weight = self.weight_of(results[i])
                num.add_(states[i][name], alpha=weight)
                den.add_(sub_models[i].masks[name].to(den.dtype), alpha=weight)
            agg.average[name] = torch.where(den > 0, num / den.clamp_min(torch.finfo(den.dtype).tiny), server)
        return agg


def _masks_of(sub: SubModel | None, result: ClientResult) -> Mapping[str, Tensor]:
    if sub is None:
        raise RuntimeError(f"FederatedDropout has no sub-model of client {result.client_id}.")
    return sub.masks


def _is_union(mask: Tensor, pattern: str) -> bool:
    """Whether ``mask`` is a union of whole groups of ``pattern``."""
    try:
        groups_from_mask(mask, pattern)
    except ValueError:
        return False
    return True
