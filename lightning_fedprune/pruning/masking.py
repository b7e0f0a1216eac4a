"""The masked-dense idea on the server, written once: a pruned tensor is a full tensor whose pruned
entries (``mask == False``) are exact zeros for whoever reads the pruned model, while the server keeps
their values (restorable) until pruning is made permanent.

Used by the pruning state (permanence), evaluation, the strategies' update, checkpoints and export. Masks
are moved to the tensor's device when they are not there (a mask built on the CPU meeting a GPU weight).
(Clients keep their pruned entries at zero while they train with
:class:`~lightning_fedprune.pruning.compact.MaskedDense`.)
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

__all__ = ["keep_pruned", "pruned", "pruned_values", "restore_pruned", "zero_pruned_"]


def _on(mask: Tensor, t: Tensor) -> Tensor:
    return mask if mask.device == t.device else mask.to(t.device)


def pruned(t: Tensor, mask: Tensor) -> Tensor:
    """A new tensor: ``t`` with exact zeros at pruned entries (``t`` is untouched).

    >>> pruned(torch.tensor([1.0, 2.0]), torch.tensor([True, False]))
    tensor([1., 0.])
    """
    return t.masked_fill(~_on(mask, t), 0)


def zero_pruned_(tensors: Mapping[str, Tensor], masks: Mapping[str, Tensor]) -> None:
    """Set the pruned entries of every ``tensors[name]`` with a mask to exact zeros, in place."""
    with torch.no_grad():
        for name, mask in masks.items():
            t = tensors[name]
            t.masked_fill_(~_on(mask, t), 0)


def keep_pruned(new: Tensor, old: Tensor, mask: Tensor) -> Tensor:
    """``new`` at kept entries, ``old`` at pruned ones (the server's values of pruned entries survive an update).

    >>> keep_pruned(torch.tensor([5.0, 6.0]), torch.tensor([1.0, 2.0]), torch.tensor([True, False]))
    tensor([5., 2.])
    """
    return torch.where(_on(mask, new), new, old)


def pruned_values(t: Tensor, mask: Tensor) -> Tensor:
    """The values of the pruned entries of ``t`` (1-D, in row-major order of ``mask == False``)."""
    return t[~_on(mask, t)]


def restore_pruned(t: Tensor, mask: Tensor, values: Tensor) -> Tensor:
    """A new tensor: ``t`` with ``values`` (from :func:`pruned_values`) put back at the pruned entries.

    >>> restore_pruned(torch.tensor([1.0, 0.0]), torch.tensor([True, False]), torch.tensor([7.0]))
    tensor([1., 7.])
    """
    return t.masked_scatter(~_on(mask, t), values.to(t.device, t.dtype))
