"""Importance scores: which statistic is scored and with which group norm.

An importance name is ``<source>_<norm>``: the elementwise *source* (the weight, a gradient, a
momentum buffer, or the product weight x gradient) and the group *norm* (``l1`` = ``sum |x|``,
``l2`` = ``sqrt(sum x^2)``). ``weight_x_gradient`` is the L1 norm of ``|w * g|`` (a first-order
Taylor estimate of the loss change when the group is removed). ``sq_gradient_l1`` is the sum over
the group of the squared gradients accumulated since the masks last changed (PruneFL's score,
Jiang et al., arXiv 1909.12326; see :class:`~lightning_fedprune.baselines.PruneFL`).
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import Tensor

from lightning_fedprune.validation import check_choice, fail

from .patterns import group_reduce

__all__ = [
    "IMPORTANCE",
    "ImportanceName",
    "SOURCES",
    "group_scores",
    "importance_source",
    "parse_importance",
]

ImportanceName = Literal["weight_l1", "weight_l2", "gradient_l1", "gradient_l2", "momentum_l1", "momentum_l2",
                         "weight_x_gradient", "sq_gradient_l1"]
IMPORTANCE: tuple[str, ...] = get_args(ImportanceName)
SOURCES: tuple[str, ...] = ("weight", "gradient", "momentum", "weight_x_gradient", "sq_gradient")


def parse_importance(name: str) -> tuple[str, str]:
    """Split an importance name into ``(source, norm)``.

    Example:
        >>> from lightning_fedprune.pruning import parse_importance
        >>> parse_importance("momentum_l2")
        ('momentum', 'l2')
        >>> parse_importance("weight_x_gradient")
        ('weight_x_gradient', 'l1')
    """
    check_choice(name, "importance", IMPORTANCE)
    if name == "weight_x_gradient":
        return "weight_x_gradient", "l1"
    source, norm = name.rsplit("_", 1)
    return source, norm


def _check_stat(value: Tensor | None, arg: str, name: str, weight: Tensor) -> Tensor:
    if value is None:
        raise ValueError(
            f"importance {name!r} needs `{arg}`, but it is None (no {arg} statistic is available "
            "for this parameter yet)"
        )
    if not isinstance(value, Tensor):
        fail(arg, "a torch.Tensor", value)
    if value.shape != weight.shape:
        raise ValueError(
            f"`{arg}` must have the weight's shape {tuple(weight.shape)}, got {tuple(value.shape)}"
        )
    return value.detach()


def importance_source(
    name: str,
    weight: Tensor,
    gradient: Tensor | None = None,
    momentum: Tensor | None = None,
    sq_gradient: Tensor | None = None,
) -> Tensor:
    """The elementwise tensor scored by importance ``name`` (same shape as ``weight``).

    ``weight_*`` -> ``weight``; ``gradient_*`` -> ``gradient``; ``momentum_*`` -> ``momentum``;
    ``weight_x_gradient`` -> ``|weight * gradient|``; ``sq_gradient_l1`` -> ``sq_gradient`` (the
    accumulated squared gradients). The result is detached; it may share
    memory with the input (it is never written to).

    Raises:
        ValueError: for an unknown name, or when the needed statistic is None or has the wrong
            shape.

    Example:
        >>> import torch
        >>> from lightning_fedprune.pruning import importance_source
        >>> w, g = torch.tensor([1., -2.]), torch.tensor([3., 0.5])
        >>> importance_source("weight_x_gradient", w, gradient=g)
        tensor([3., 1.])
    """
    source, _ = parse_importance(name)
    if not isinstance(weight, Tensor):
        fail("weight", "a torch.Tensor", weight)
    if source == "weight":
        return weight.detach()
    if source == "gradient":
        return _check_stat(gradient, "gradient", name, weight)
    if source == "momentum":
        return _check_stat(momentum, "momentum", name, weight)
    if source == "sq_gradient":
        return _check_stat(sq_gradient, "sq_gradient", name, weight)
    grad = _check_stat(gradient, "gradient", name, weight)
    return torch.mul(weight.detach(), grad).abs_()


def group_scores(name: str, pattern: str, weight: Tensor, gradient: Tensor | None = None,
                 momentum: Tensor | None = None, sq_gradient: Tensor | None = None) -> Tensor:
    """Per-group importance scores (1-D, group order of ``pattern``).

    ``group_reduce(importance_source(name, ...), pattern, norm)``.

    Example:
        >>> import torch
        >>> from lightning_fedprune.pruning import group_scores
        >>> w = torch.tensor([[3., 0.], [4., 1.]])
        >>> group_scores("weight_l2", "column", w)
        tensor([5., 1.])
    """
    _, norm = parse_importance(name)
    return group_reduce(importance_source(name, weight, gradient, momentum, sq_gradient), pattern, norm)
