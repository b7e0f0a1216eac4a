"""Units: what Federated Dropout drops — a hidden unit, an attention head, a channel — as slices of tensors.

A unit is not one tensor's row or column: an FFN hidden unit ``j`` is row ``j`` of the first ``nn.Linear`` (and
its bias entry ``j``) *and* column ``j`` of the second; an attention head is a block of rows of the query, key and
value projections and the matching block of columns of the output projection; a convolution channel runs from
the producing convolution through the channel-wise layers (a depthwise convolution, a norm's affine weights) to
the input channel of the next convolution. Dropping a unit consistently from every tensor that holds it gives a
smaller network of the same kind (Caldas et al. 2018, arXiv 1812.07210).

The data model is the project's (masks per tensor): a :class:`UnitGroup` lists its members
(:class:`UnitAxis`: a tensor and the axis along which it holds one slice per unit) and :meth:`UnitGroup.masks`
turns a set of dropped units into a boolean keep-mask per member. Where a group comes from:

* a task may declare its own: a method ``dropout_units()`` returning :class:`UnitGroup` objects (or dicts of
  their fields);
* otherwise :func:`find_units` reads them from the module structure: inside every ``nn.Sequential``, a
  producer (``nn.Linear``; a convolution with ``groups=1``) followed by channel-wise modules (activations,
  dropout, ``nn.GLU`` on the channel axis; for convolutions also depthwise convolutions, batch and group norms,
  ``nn.PReLU``) and a consumer of the same kind whose input features are exactly those units; and every
  ``nn.MultiheadAttention`` with a packed input projection (its heads).

The *reader* of a group is the tensor that takes the units as its input (the consumer's weight): Federated
Dropout scales it by ``1 / (1 - p)`` in the sub-model's forward (inverted dropout).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["UnitAxis", "UnitGroup", "find_units", "units_of"]

# modules that act on every feature independently and keep the feature count: a unit passes through them
_ELEMENTWISE = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Tanh,
                nn.Sigmoid, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus, nn.Softsign, nn.Tanhshrink,
                nn.LogSigmoid, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity)
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BATCH_NORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@dataclass(frozen=True)
class UnitAxis:
    """One tensor's share of a :class:`UnitGroup`: along ``dim`` it holds ``blocks`` consecutive blocks of
    ``units * width`` entries, and unit ``u`` is entries ``b * units * width + u * width + [0, width)`` of every
    block ``b`` (an FFN's first weight: ``dim=0``; its second: ``dim=1``; a packed q/k/v projection:
    ``blocks=3, width=head_dim``; the two halves a GLU splits: ``blocks=2``).

    Attributes:
        name: the parameter's name in the task.
        dim: the axis along which it holds the units.
        blocks: how many blocks of units the axis holds.
        width: entries per unit in each block.
    """

    name: str
    dim: int
    blocks: int = 1
    width: int = 1

    def indices(self, units: int, dropped: Tensor) -> Tensor:
        """The indices along :attr:`dim` of the ``dropped`` units (1-D int64, ascending per block)."""
        offsets = torch.arange(self.width, device=dropped.device)
        per_block = (dropped.reshape(-1, 1) * self.width + offsets).reshape(-1)
        return torch.cat([per_block + b * units * self.width for b in range(self.blocks)])


@dataclass(frozen=True)
class UnitGroup:
    """Units that are dropped together (e.g. the hidden units of one feed-forward block).

    Attributes:
        units: how many units the group has.
        members: every tensor that holds one slice per unit.
        reader: the member that reads the units as its input (the consumer's weight, ``dim >= 1``): scaled by
            ``1 / (1 - p)`` in a sub-model's forward; None if no member does.
        name: a label (messages, records).
    """

    units: int
    members: tuple[UnitAxis, ...]
    reader: str | None = None
    name: str = ""

    def masks(self, dropped: Tensor, shapes: Mapping[str, Sequence[int]], device: Any = None) -> dict[str, Tensor]:
        """The keep-mask of every member with the ``dropped`` units removed (``True`` = kept)."""
        out = {}
        for axis in self.members:
            mask = torch.ones(tuple(shapes[axis.name]), dtype=torch.bool, device=device)
            mask.index_fill_(axis.dim, axis.indices(self.units, dropped.to(device)), False)
            out[axis.name] = mask
        return out

    def check(self, shapes: Mapping[str, Sequence[int]]) -> UnitGroup:
        """Raise ``ValueError`` naming the member unless every member is a parameter of ``shapes`` whose axis holds
        exactly ``blocks * units * width`` entries, and the reader is a member with ``dim >= 1``; returns self."""
        label = self.name or "a unit group"
        if not isinstance(self.units, int) or self.units < 1 or not self.members:
            raise ValueError(f"{label}: needs units >= 1 and at least one member, got units={self.units!r}, "
                             f"members={self.members!r}")
        for axis in self.members:
            shape = shapes.get(axis.name)
            if shape is None:
                raise ValueError(f"{label}: {axis.name!r} is not a parameter of the task")
            if not 0 <= axis.dim < len(shape):
                raise ValueError(f"{label}: {axis.name!r} has no axis {axis.dim} (shape {tuple(shape)})")
            if axis.blocks < 1 or axis.width < 1 or shape[axis.dim] != axis.blocks * self.units * axis.width:
                raise ValueError(f"{label}: axis {axis.dim} of {axis.name!r} has {shape[axis.dim]} entries, not "
                                 f"blocks * units * width = {axis.blocks} * {self.units} * {axis.width}")
        if len({axis.name for axis in self.members}) != len(self.members):
            raise ValueError(f"{label}: a tensor is listed twice")
        if self.reader is not None:
            reader = [a for a in self.members if a.name == self.reader]
            if not reader or reader[0].dim < 1:
                raise ValueError(f"{label}: the reader {self.reader!r} must be a member that holds the units along an "
                                 "axis >= 1 (its input features)")
        return self


def _group(spec: Any) -> UnitGroup:
    """A :class:`UnitGroup`, or one from a dict of its fields (members as UnitAxis, dicts or tuples)."""
    if isinstance(spec, UnitGroup):
        return spec
    if isinstance(spec, Mapping):
        members = tuple(m if isinstance(m, UnitAxis) else UnitAxis(**m) if isinstance(m, Mapping) else UnitAxis(*m)
                        for m in spec.get("members", ()))
        return UnitGroup(int(spec["units"]), members, spec.get("reader"), str(spec.get("name", "")))
    raise TypeError(f"`dropout_units()` must return UnitGroup objects or dicts of their fields, got {type(spec).__name__}")


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _channel_dim(module: nn.Module) -> int:
    """The feature axis a producer writes its units to: -1 for ``nn.Linear``, 1 for a convolution."""
    return -1 if isinstance(module, nn.Linear) else 1


def _producer(module: nn.Module) -> int | None:
    """The number of units a producer writes (a Linear's outputs, a non-grouped convolution's output channels)."""
    if isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward:
        return module.out_features
    if type(module) in _CONV and module.groups == 1:
        return module.out_channels
    return None


def _consumer(module: nn.Module, kind: int, units: int) -> bool:
    """Whether ``module`` reads exactly ``units`` input features of the chain's kind (as its input, dim 1)."""
    if kind == -1:
        return isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward and module.in_features == units
    return type(module) in _CONV and module.groups == 1 and module.in_channels == units


def _chain(prefix: str, children: list[tuple[str, nn.Module]], start: int) -> UnitGroup | None:
    """The unit group that starts at producer ``children[start]`` and ends at the next consumer, if any."""
    name, producer = children[start]
    units, kind = _producer(producer), _channel_dim(producer)
    if units is None:
        return None
    members = [UnitAxis(_join(_join(prefix, name), "weight"), 0)]
    if producer.bias is not None:
        members.append(UnitAxis(_join(_join(prefix, name), "bias"), 0))
    for child_name, child in children[start + 1:]:
        path = _join(prefix, child_name)
        if isinstance(child, _ELEMENTWISE):
            continue
        if isinstance(child, nn.GLU) and child.dim == kind:  # halves the units: unit u is u and u + units / 2
            if units % 2:
                return None
            units //= 2
            members = [UnitAxis(a.name, a.dim, a.blocks * 2, a.width) for a in members]
            continue
        if isinstance(child, nn.PReLU) and (child.num_parameters == 1 or (kind == 1 and child.num_parameters == units)):
            if child.num_parameters > 1:
                members.append(UnitAxis(_join(path, "weight"), 0))
            continue
        if kind == 1 and type(child) in _CONV and child.groups == child.in_channels == child.out_channels == units:
            members.append(UnitAxis(_join(path, "weight"), 0))  # depthwise: one filter per channel
            if child.bias is not None:
                members.append(UnitAxis(_join(path, "bias"), 0))
            continue
        if kind == 1 and (isinstance(child, _BATCH_NORM) and child.num_features == units
                          or isinstance(child, nn.GroupNorm) and child.num_channels == units):
            if child.affine:
                members += [UnitAxis(_join(path, "weight"), 0), UnitAxis(_join(path, "bias"), 0)]
            continue
        if _consumer(child, kind, units):
            reader = _join(path, "weight")
            members.append(UnitAxis(reader, 1))
            return UnitGroup(units, tuple(members), reader, f"{_join(prefix, name)} -> {path}")
        return None
    return None


def _heads(path: str, mha: nn.MultiheadAttention) -> UnitGroup | None:
    if not mha._qkv_same_embed_dim or mha.in_proj_weight is None or mha.bias_k is not None:
        return None
    width = mha.head_dim
    members = [UnitAxis(_join(path, "in_proj_weight"), 0, 3, width)]
    if mha.in_proj_bias is not None:
        members.append(UnitAxis(_join(path, "in_proj_bias"), 0, 3, width))
    reader = _join(path, "out_proj.weight")
    members.append(UnitAxis(reader, 1, 1, width))
    return UnitGroup(mha.num_heads, tuple(members), reader, f"{path} heads")


def _split_heads(path: str, attn: nn.Module) -> UnitGroup | None:
    """Heads of an attention module with separate ``q_proj``/``k_proj``/``v_proj``/``out_proj`` Linears and
    ``num_heads`` (e.g. :class:`~lightning_fedprune.asr.conformer_transducer.SelfAttention`): a head is its rows of
    q, k and v (and their biases) and its columns of ``out_proj``."""
    projections = [getattr(attn, n, None) for n in ("q_proj", "k_proj", "v_proj", "out_proj")]
    heads = getattr(attn, "num_heads", None)
    if not all(isinstance(p, nn.Linear) for p in projections) or not isinstance(heads, int) or heads < 1:
        return None
    q, k, v, out = projections
    if not (q.out_features == k.out_features == v.out_features == out.in_features) or q.out_features % heads:
        return None
    width = q.out_features // heads
    members = []
    for name, layer in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
        members.append(UnitAxis(_join(path, f"{name}.weight"), 0, 1, width))
        if layer.bias is not None:
            members.append(UnitAxis(_join(path, f"{name}.bias"), 0, 1, width))
    reader = _join(path, "out_proj.weight")
    members.append(UnitAxis(reader, 1, 1, width))
    return UnitGroup(heads, tuple(members), reader, f"{path} heads")


def find_units(module: nn.Module) -> list[UnitGroup]:
    """The unit groups of ``module`` read from its structure (see the module docstring), in module order.

    Args:
        module: the model (its ``nn.Sequential`` blocks, ``nn.MultiheadAttention`` layers and attention modules
            with separate q/k/v/out projections are read).

    Example:
        >>> from torch import nn
        >>> mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> (group,) = find_units(mlp)
        >>> group.units, group.reader
        (8, '2.weight')
        >>> {a.name: a.dim for a in group.members}
        {'0.weight': 0, '0.bias': 0, '2.weight': 1}
    """
    groups: list[UnitGroup] = []
    for path, child in module.named_modules():
        if isinstance(child, nn.Sequential):
            children = list(child.named_children())
            for i in range(len(children)):
                group = _chain(path, children, i)
                if group is not None:
                    groups.append(group)
        elif isinstance(child, nn.MultiheadAttention):
            group = _heads(path, child)
            if group is not None:
                groups.append(group)
        elif (group := _split_heads(path, child)) is not None:
            groups.append(group)
    return groups


def units_of(task: nn.Module, shapes: Mapping[str, Sequence[int]] | None = None) -> list[UnitGroup]:
    """The task's unit groups: its own ``dropout_units()`` when it has one, else :func:`find_units`; each checked
    against the task's parameters."""
    shapes = {n: tuple(p.shape) for n, p in task.named_parameters()} if shapes is None else shapes
    declare = getattr(task, "dropout_units", None)
    groups = [_group(g) for g in declare()] if callable(declare) else find_units(task)
    return [g.check(shapes) for g in groups]


def select_units(groups: Iterable[UnitGroup], parameters: str | None, exclude: str | None) -> list[UnitGroup]:
    """The groups with a member that fully matches ``parameters`` (all groups when None) and none that matches
    ``exclude``."""
    import re

    keep = re.compile(parameters) if parameters is not None else None
    drop = re.compile(exclude) if exclude is not None else None
    return [g for g in groups
            if (keep is None or any(keep.fullmatch(a.name) for a in g.members))
            and (drop is None or not any(drop.fullmatch(a.name) for a in g.members))]
