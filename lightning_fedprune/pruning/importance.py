"""Importance scores: one :class:`Importance` class per criterion, in a registry (as patterns are).

An importance says which elementwise statistic is scored (:meth:`Importance.source`: the weight, a
gradient, a momentum buffer, the product weight x gradient, accumulated squared gradients), what
server-side statistic it needs (:attr:`Importance.needs`) and the group *norm* (``l1`` = ``sum |x|``,
``l2`` = ``sqrt(sum x^2)``). The built-in names are ``<source>_<norm>``; ``weight_x_gradient`` is the L1
norm of ``|w * g|`` (a first-order Taylor estimate of the loss change when the group is removed) and
``sq_gradient_l1`` the sum over the group of the squared gradients accumulated since the masks last
changed (PruneFL's score, Jiang et al., arXiv 1909.12326; see :class:`~lightning_fedprune.baselines.PruneFL`).

A new criterion is one subclass and one :func:`register` call (worked example in ``docs/design.md``);
:class:`~lightning_fedprune.pruning.state.PruningState` asks it what it needs and for its source, so
nothing else names it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor

from lightning_fedprune.pruning.names import Names, lookup, new_entry_name
from lightning_fedprune.pruning.patterns import NORMS, Pattern, group_reduce, to_2d
from lightning_fedprune.validation import check_choice, fail

__all__ = [
    "IMPORTANCE",
    "IMPORTANCES",
    "SOURCES",
    "STATISTICS",
    "Importance",
    "ImportanceName",
    "Statistics",
    "get_importance",
    "group_scores",
    "importance_source",
    "parse_importance",
    "register_importance",
]

#: The built-in importance names (a typed choice for constructors and the CLI).
ImportanceName = Literal["weight_l1", "weight_l2", "gradient_l1", "gradient_l2", "momentum_l1", "momentum_l2",
                         "weight_x_gradient", "sq_gradient_l1"]
#: The server-side statistics an importance may need (kept by the pruning state; they cost no traffic).
STATISTICS: tuple[str, ...] = ("gradient", "momentum", "sq_gradient")
SOURCES: tuple[str, ...] = ("weight", "gradient", "momentum", "weight_x_gradient", "sq_gradient")


@dataclass(frozen=True)
class Statistics:
    """The server-side statistics of one parameter (each None until a round has produced it)."""

    gradient: Tensor | None = None
    momentum: Tensor | None = None
    sq_gradient: Tensor | None = None

    def get(self, name: str) -> Tensor | None:
        return getattr(self, name)


class Importance(ABC):
    """One importance criterion: the elementwise tensor scored, the statistic it needs, the group norm.

    Instances are stateless; :meth:`scores` is the hot path (no validation: the state checks the
    statistic is there once, when it recomputes masks).
    """

    #: the registry key, e.g. ``"weight_l2"``.
    name: ClassVar[str]
    #: the group norm: ``"l1"`` or ``"l2"``.
    norm: ClassVar[str]
    #: the server-side statistic it needs (one of :data:`STATISTICS`), or None (the weight alone).
    needs: ClassVar[str | None] = None
    #: the name of the elementwise source (one of :data:`SOURCES` for the built-ins).
    source_name: ClassVar[str]

    @abstractmethod
    def source(self, weight: Tensor, stats: Statistics) -> Tensor:
        """The elementwise importance of ``weight`` (same shape; detached; never written to)."""

    def scores(self, pattern: Pattern, weight: Tensor, stats: Statistics) -> Tensor:
        """Per-group scores (1-D, in ``pattern``'s group order)."""
        x = self.source(weight, stats)
        dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
        return pattern.norms(to_2d(x.detach()), 1 if self.norm == "l1" else 2, dtype)

    def __reduce__(self):  # pickles as its registered instance
        return get_importance, (self.name,)

    def __repr__(self) -> str:
        return f"<importance {self.name!r}>"


class _Statistic(Importance):
    """The norm of one server-side statistic (or of the weight, ``needs = None``)."""

    def __init__(self, source: str, norm: str) -> None:
        self.source_name, self.norm = source, norm
        self.needs = None if source == "weight" else source
        self.name = f"{source}_{norm}"

    def source(self, weight: Tensor, stats: Statistics) -> Tensor:
        return weight.detach() if self.needs is None else stats.get(self.needs).detach()


class WeightTimesGradient(Importance):
    """``|w * g|`` summed over the group: a first-order Taylor estimate of the loss change of removing it."""

    name = "weight_x_gradient"
    norm = "l1"
    needs = "gradient"
    source_name = "weight_x_gradient"

    def source(self, weight: Tensor, stats: Statistics) -> Tensor:
        return torch.mul(weight.detach(), stats.gradient.detach()).abs_()


#: name -> importance, in registration order.
IMPORTANCES: dict[str, Importance] = {}


#: The registered importance names (live).
IMPORTANCE: Sequence[str] = Names(IMPORTANCES)


def register_importance(importance: Importance) -> Importance:
    """Add ``importance`` to :data:`IMPORTANCES` under its ``name`` and return it (from then on every
    ``importance=`` argument accepts the name).

    Raises:
        ValueError: if it is not an :class:`Importance`, its ``name``/``norm``/``needs`` are malformed or
            the name is taken.
    """
    name = new_entry_name(IMPORTANCES, importance, Importance, "importance", "an importance")
    check_choice(importance.norm, "importance.norm", NORMS)
    check_choice(importance.needs, "importance.needs", (None, *STATISTICS))
    IMPORTANCES[name] = importance
    return importance


def get_importance(name: str, arg: str = "importance") -> Importance:
    """The registered :class:`Importance` called ``name`` (a clear error naming ``arg`` otherwise).

    >>> get_importance("momentum_l2").needs
    'momentum'
    """
    return lookup(IMPORTANCES, name, arg, IMPORTANCE)


for _source in ("weight", "gradient", "momentum"):
    for _norm in NORMS:
        register_importance(_Statistic(_source, _norm))
register_importance(WeightTimesGradient())
register_importance(_Statistic("sq_gradient", "l1"))


# ------------------------------------------------------------------ functions by name (validated)
def parse_importance(name: str) -> tuple[str, str]:
    """``(source, norm)`` of an importance name.

    Example:
        >>> from lightning_fedprune.pruning import parse_importance
        >>> parse_importance("momentum_l2")
        ('momentum', 'l2')
        >>> parse_importance("weight_x_gradient")
        ('weight_x_gradient', 'l1')
    """
    importance = get_importance(name)
    return importance.source_name, importance.norm


def _check_stat(value: Tensor | None, arg: str, name: str, weight: Tensor) -> Tensor | None:
    if value is None:
        return None
    if not isinstance(value, Tensor):
        fail(arg, "a torch.Tensor", value)
    if value.shape != weight.shape:
        raise ValueError(f"`{arg}` must have the weight's shape {tuple(weight.shape)}, got {tuple(value.shape)}")
    return value


def _statistics(name: str, weight: Tensor, gradient: Tensor | None, momentum: Tensor | None,
                sq_gradient: Tensor | None) -> tuple[Importance, Statistics]:
    importance = get_importance(name)
    if not isinstance(weight, Tensor):
        fail("weight", "a torch.Tensor", weight)
    stats = Statistics(_check_stat(gradient, "gradient", name, weight), _check_stat(momentum, "momentum", name, weight),
                       _check_stat(sq_gradient, "sq_gradient", name, weight))
    if importance.needs is not None and stats.get(importance.needs) is None:
        raise ValueError(f"importance {name!r} needs `{importance.needs}`, but it is None (no {importance.needs} "
                         "statistic is available for this parameter yet)")
    return importance, stats


def importance_source(name: str, weight: Tensor, gradient: Tensor | None = None, momentum: Tensor | None = None,
                      sq_gradient: Tensor | None = None) -> Tensor:
    """The elementwise tensor scored by importance ``name`` (same shape as ``weight``; detached).

    Raises:
        ValueError: for an unknown name, or when the needed statistic is None or has the wrong shape.

    Example:
        >>> import torch
        >>> from lightning_fedprune.pruning import importance_source
        >>> w, g = torch.tensor([1., -2.]), torch.tensor([3., 0.5])
        >>> importance_source("weight_x_gradient", w, gradient=g)
        tensor([3., 1.])
    """
    importance, stats = _statistics(name, weight, gradient, momentum, sq_gradient)
    return importance.source(weight, stats)


def group_scores(name: str, pattern: str, weight: Tensor, gradient: Tensor | None = None,
                 momentum: Tensor | None = None, sq_gradient: Tensor | None = None) -> Tensor:
    """Per-group importance scores (1-D, group order of ``pattern``):
    ``group_reduce(importance_source(name, ...), pattern, norm)``.

    Example:
        >>> import torch
        >>> from lightning_fedprune.pruning import group_scores
        >>> w = torch.tensor([[3., 0.], [4., 1.]])
        >>> group_scores("weight_l2", "column", w)
        tensor([5., 1.])
    """
    importance, stats = _statistics(name, weight, gradient, momentum, sq_gradient)
    return group_reduce(importance.source(weight, stats), pattern, importance.norm)


def statistics_of(stats: Mapping[str, Mapping[str, Tensor]], name: str) -> Statistics:
    """The :class:`Statistics` of parameter ``name`` from ``{statistic: {parameter: tensor}}``."""
    return Statistics(*(stats.get(s, {}).get(name) for s in STATISTICS))
