"""Federated Dropout (Caldas et al. 2018, arXiv 1812.07210) as a server strategy.

Every round each client trains its own random structured sub-model: of every selected weight a
fraction ``rate`` of the pattern's groups (columns by default: input features of an ``nn.Linear``) is
dropped, drawn afresh for every client and round. The server keeps the full model and merges the
sub-models into it: an entry is the weighted mean over the clients that trained it, and keeps its
server value when none did. The sub-models travel in the same wire format as pruned models (the kept
blocks plus an index) and train as compact layers on the clients, so bytes and client size are
measured exactly as for Federated Pruning.

It is built on :meth:`Strategy.client_masks <lightning_fedprune.federated.strategy.Strategy.client_masks>`:
the dropped groups are a pure function of the client's derived seed, and may be combined with the
pruning state's masks (groups are then dropped among the kept ones).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

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
from lightning_fedprune.pruning.patterns import (
    PATTERNS,
    PatternName,
    check_pattern,
    expand_groups,
    groups_from_mask,
    num_groups,
    num_to_prune,
)
from lightning_fedprune.pruning.plan import Selection
from lightning_fedprune.validation import check_choice, check_float, check_regex

#: mixed into the client's seed so the dropout draw is independent of the client's data order
_DROPOUT_STREAM = 0x5EED_D80


class FederatedDropout(FedAvg):
    """Federated Dropout: each client trains a random structured sub-model; the server merges them.

    Args:
        rate: fraction of each selected weight's groups a client drops, in ``[0, 1)`` (Caldas et al.
            use 0.25-0.5); ``round(rate * groups)`` are dropped (Python rounding, as pruning counts groups), the
            same number for every client.
        pattern: the group dropped together (``"column"``: an input feature of an ``nn.Linear``, as
            Federated Pruning's column pattern; any registered pattern).
        parameters: regular expression (``re.fullmatch``) of the weights that get sub-models; default
            every parameter with 2 or more dimensions.
        exclude: optional regular expression of names to leave whole.
        server_optimizer: the server optimiser on the merged model's pseudo-gradient: ``"sgd"`` (default;
            with ``server_lr=1`` the merged model itself, Caldas et al.'s FedAvg), ``"sgdm"`` or ``"adam"``.
        server_lr: the server optimiser's learning rate (None: 1.0 for ``"sgd"``/``"sgdm"``, 0.01 for ``"adam"``).
        server_momentum: ``"sgdm"``'s momentum in ``[0, 1)`` (None: 0.9).
        server_betas: ``"adam"``'s two betas, each in ``[0, 1)`` (None: ``(0.9, 0.99)``).
        server_eps: ``"adam"``'s epsilon, > 0 (None: 1e-3).
        weighting: see :class:`~lightning_fedprune.federated.strategies.Strategy`.
    """

    def __init__(self, rate: float = 0.5, pattern: PatternName = "column", parameters: str | None = None,
                 exclude: str | None = None, server_optimizer: ServerOptimizerName = "sgd", server_lr: float | None = None,
                 server_momentum: float | None = None, server_betas: Sequence[float] | None = None,
                 server_eps: float | None = None, weighting: WeightingName = "num_samples") -> None:
        inner = make_strategy(server_optimizer, server_lr, server_momentum, server_betas, server_eps)
        super().__init__(inner.server_lr, weighting)
        self.server_optimizer = server_optimizer
        self.server_momentum = getattr(inner, "server_momentum", None)
        self.server_betas = getattr(inner, "server_betas", None)
        self.server_eps = getattr(inner, "server_eps", None)
        self.rate = check_float(rate, "rate", min=0, max=1, max_open=True)
        self.pattern = check_choice(pattern, "pattern", PATTERNS)
        check_regex(parameters, "parameters")
        check_regex(exclude, "exclude")
        self.parameters = parameters
        self.exclude = exclude

    def make_optimizer(self, params: list[Tensor]) -> torch.optim.Optimizer:
        return server_optimizer_of(self.server_optimizer, params, self.server_lr, self.server_momentum or 0.0,
                                   self.server_betas or (0.9, 0.99), self.server_eps or 1e-3)

    @property
    def has_momentum(self) -> bool:
        return self.server_optimizer == "adam" or (self.server_optimizer == "sgdm" and bool(self.server_momentum))

    def config(self) -> dict[str, Any]:
        config = {**super().config(), "server_optimizer": self.server_optimizer, "strategy": "federated_dropout",
                  "rate": self.rate, "pattern": self.pattern, "parameters": self.parameters, "exclude": self.exclude}
        if self.server_optimizer == "sgdm":
            config["server_momentum"] = self.server_momentum
        if self.server_optimizer == "adam":
            config.update(server_betas=list(self.server_betas), server_eps=self.server_eps)
        return config

    def targets(self, params: Mapping[str, Tensor]) -> list[str]:
        """The names that get sub-models (resolved as the pruning selection is)."""
        shapes = [(n, tuple(p.shape)) for n, p in params.items()]
        targets = Selection(self.pattern, parameters=self.parameters, exclude=self.exclude).resolve(shapes)
        for name in targets:
            check_pattern(self.pattern, params[name].shape, name=name)
        return targets

    def configure(self, ctx: RoundContext, cohort: Sequence[int], seeds: Sequence[int]) -> list[SubModel | None]:
        """Every client's sub-model: ``round(rate * groups)`` groups of every target dropped at random (among the
        groups the pruning state keeps, when it prunes the tensor with the same pattern); a pure function of the
        client's seed."""
        if self.rate == 0.0:
            return [None] * len(cohort)
        targets = self.targets(ctx.params)
        return [self._sub_model(ctx, targets, seed) for seed in seeds]

    def _sub_model(self, ctx: RoundContext, targets: list[str], seed: int) -> SubModel:
        generator = torch.Generator().manual_seed((seed ^ _DROPOUT_STREAM) & 0x7FFF_FFFF_FFFF_FFFF)
        masks, patterns = dict(ctx.masks), dict(ctx.patterns)
        for name in targets:
            p = ctx.params[name]
            if name in ctx.masks and ctx.patterns.get(name) != self.pattern:
                raise ValueError(f"FederatedDropout(pattern={self.pattern!r}) cannot drop groups of {name!r}, which is "
                                 f"pruned with pattern {ctx.patterns.get(name)!r}: use the same pattern.")
            kept = groups_from_mask(ctx.masks[name], self.pattern).cpu() if name in ctx.masks \
                else torch.ones(num_groups(self.pattern, p.shape), dtype=torch.bool)
            candidates = kept.nonzero().reshape(-1)
            drop = num_to_prune(self.rate, candidates.numel())
            flags = kept.clone()
            flags[candidates[torch.randperm(candidates.numel(), generator=generator)[:drop]]] = False
            masks[name] = expand_groups(flags.to(p.device), self.pattern, p.shape)
            patterns[name] = self.pattern
        return SubModel(masks, patterns)

    def aggregate(self, ctx: RoundContext, results: Sequence[ClientResult], states: Sequence[Mapping[str, Tensor] | None],
                  sub_models: Sequence[SubModel | None]) -> Aggregate:
        """FedAvg's weighted mean, then every sub-modelled tensor merged entry by entry: the weighted mean over
        the clients that trained the entry (their decoded states hold zeros where they did not), the server's
        value where no client did."""
        agg = self.weighted_mean(results, states, [*ctx.params, *ctx.buffers])
        if not agg.ok or self.rate == 0.0:
            return agg
        for name in self.targets(ctx.params):
            server = ctx.params[name].detach()
            num = torch.zeros_like(server)
            den = torch.zeros_like(server)
            for i in agg.ok:
                sub = sub_models[i]
                if sub is None:
                    raise RuntimeError(f"FederatedDropout has no sub-model of client {results[i].client_id}.")
                weight = self.weight_of(results[i])
                num.add_(states[i][name], alpha=weight)
                den.add_(sub.masks[name].to(den.dtype), alpha=weight)
            agg.average[name] = torch.where(den > 0, num / den.clamp_min(torch.finfo(den.dtype).tiny), server)
        return agg
