"""The five built-in patterns (registered in :mod:`.registry` under their ``name``); what each one's group is:
the table in :mod:`lightning_fedprune.pruning.patterns`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_fedprune.pruning.patterns.base import Block, Pattern, Reduction

__all__ = ["BUILTIN_PATTERNS", "Column", "HalfColumn", "HalfRow", "Row", "Unstructured"]


class Unstructured(Pattern):
    """Every entry is its own group (index ``r * C + c``); one block of the flat kept values."""

    name = "unstructured"
    structured = False

    def num_groups(self, rows: int, cols: int) -> int:
        return rows * cols

    def reduce(self, x2d: Tensor, fn: Reduction) -> Tensor:
        return fn(x2d.reshape(-1, 1), 1)

    def norms(self, x2d: Tensor, order: int, dtype: torch.dtype) -> Tensor:
        return x2d.reshape(-1).abs().to(dtype)  # the norm of one entry is |x|, whatever the order

    def flags(self, m2d: Tensor) -> Tensor:
        return m2d.reshape(-1)

    def trusted_flags(self, m2d: Tensor) -> Tensor:
        return m2d.reshape(-1)

    def expand(self, flags: Tensor, rows: int, cols: int) -> Tensor:
        return flags.reshape(rows, cols)

    def values(self, x2d: Tensor, flags: Tensor) -> list[Tensor]:
        return [x2d.reshape(-1)[flags]]

    def block_shape(self, kept: int, rows: int, cols: int) -> tuple[int, ...]:
        return (kept,)

    def scatter_(self, out2d: Tensor, blocks: Sequence[Block]) -> Tensor:
        ((kept, values),) = blocks
        out2d.view(-1).index_copy_(0, kept, values.reshape(-1))
        return out2d


class _Lines(Pattern):
    """A group is one whole line of the matrix: a row (``axis = 0``) or a column (``axis = 1``)."""

    axis: ClassVar[int]

    def num_groups(self, rows: int, cols: int) -> int:
        return (rows, cols)[self.axis]

    def reduce(self, x2d: Tensor, fn: Reduction) -> Tensor:
        return fn(x2d, 1 - self.axis)

    def expand(self, flags: Tensor, rows: int, cols: int) -> Tensor:
        return flags.unsqueeze(1 - self.axis).expand(rows, cols)

    def values(self, x2d: Tensor, flags: Tensor) -> list[Tensor]:
        return [x2d[flags] if self.axis == 0 else x2d[:, flags]]

    def block_shape(self, kept: int, rows: int, cols: int) -> tuple[int, ...]:
        return (kept, cols) if self.axis == 0 else (rows, kept)

    def scatter_(self, out2d: Tensor, blocks: Sequence[Block]) -> Tensor:
        ((kept, values),) = blocks
        return out2d.index_copy_(self.axis, kept, values.reshape(self.block_shape(len(kept), *out2d.shape)))


class Row(_Lines):
    """``row``: one block ``W[kept]`` ``(k, C)``; compact forward ``y[..., kept] = W[kept] x``, pruned outputs
    are the bias alone (as in the masked-dense layer)."""

    name = "row"
    axis = 0

    def linear_forward(self, x, weights, kept, bias, out_features):
        y = F.linear(x, weights[0])
        out = y.new_zeros(*y.shape[:-1], out_features).index_copy(-1, kept[0], y)
        return out if bias is None else out + bias


class Column(_Lines):
    """``column``: one block ``W[:, kept]`` ``(R, k)``; compact forward ``W[:, kept] x[..., kept] + b``."""

    name = "column"
    axis = 1

    def linear_forward(self, x, weights, kept, bias, out_features):
        return F.linear(x.index_select(-1, kept[0]), weights[0], bias)


class _Halves(Pattern):
    """The matrix cut into two equal blocks along the axis the groups do not run along; each block
    is pruned with :attr:`lines` (its group ``g`` is group ``h * n + g`` of the whole)."""

    num_blocks = 2
    lines: ClassVar[_Lines]

    @property
    def _split_axis(self) -> int:
        return 1 - self.lines.axis

    def check(self, rows: int, cols: int, name: str) -> None:
        axis = self._split_axis
        n = (rows, cols)[axis]
        if n % 2:
            raise ValueError(
                f"pattern {self.name!r} cannot be applied to {name!r}: its 2-D view has shape "
                f"({rows}, {cols}) and axis {axis} ({('rows', 'columns')[axis]}) has odd length {n}, so it "
                "cannot be split into two equal blocks"
            )

    def num_groups(self, rows: int, cols: int) -> int:
        return 2 * self.lines.num_groups(rows, cols)

    def _half(self, x2d: Tensor, h: int) -> Tensor:
        size = x2d.shape[self._split_axis] // 2
        return x2d.narrow(self._split_axis, h * size, size)

    def values(self, x2d: Tensor, flags: Tensor) -> list[Tensor]:
        return [self.lines.values(self._half(x2d, h), f)[0] for h, f in enumerate(flags.reshape(2, -1))]

    def block_shape(self, kept: int, rows: int, cols: int) -> tuple[int, ...]:
        half = (rows // 2, cols) if self._split_axis == 0 else (rows, cols // 2)
        return self.lines.block_shape(kept, *half)

    def scatter_(self, out2d: Tensor, blocks: Sequence[Block]) -> Tensor:
        for h, block in enumerate(blocks):
            self.lines.scatter_(self._half(out2d, h), [block])
        return out2d


class HalfRow(_Halves):
    """``half_row``: ``W = [W1 | W2]``, block ``h`` is ``Wh[kept_h]`` ``(k_h, C/2)``; compact forward
    ``scatter_k0(W1[k0] x[..., :C/2]) + scatter_k1(W2[k1] x[..., C/2:]) + b``."""

    name = "half_row"
    lines = Row()

    def reduce(self, x2d: Tensor, fn: Reduction) -> Tensor:
        rows, cols = x2d.shape  # (R, 2, C/2) -> (R, 2) -> block-major (2, R)
        return fn(x2d.reshape(rows, 2, cols // 2), 2).t().reshape(-1)

    def expand(self, flags: Tensor, rows: int, cols: int) -> Tensor:
        return flags.reshape(2, rows).t()[:, :, None].expand(rows, 2, cols // 2).reshape(rows, cols)

    def linear_forward(self, x, weights, kept, bias, out_features):
        h = x.shape[-1] // 2
        y0 = F.linear(x[..., :h], weights[0])
        y1 = F.linear(x[..., h:], weights[1])
        out = y0.new_zeros(*y0.shape[:-1], out_features).index_add(-1, kept[0], y0).index_add(-1, kept[1], y1)
        return out if bias is None else out + bias


class HalfColumn(_Halves):
    """``half_column``: ``W = [W1 ; W2]``, block ``h`` is ``Wh[:, kept_h]`` ``(R/2, k_h)``; compact forward
    ``cat(W1[:, k0] x[..., k0], W2[:, k1] x[..., k1]) + b``."""

    name = "half_column"
    lines = Column()

    def reduce(self, x2d: Tensor, fn: Reduction) -> Tensor:
        rows, cols = x2d.shape  # (2, R/2, C) -> (2, C), already block-major
        return fn(x2d.reshape(2, rows // 2, cols), 1).reshape(-1)

    def expand(self, flags: Tensor, rows: int, cols: int) -> Tensor:
        return flags.reshape(2, cols)[:, None, :].expand(2, rows // 2, cols).reshape(rows, cols)

    def linear_forward(self, x, weights, kept, bias, out_features):
        h = out_features // 2
        halves = [None, None] if bias is None else [bias[:h], bias[h:]]
        return torch.cat([self.lines.linear_forward(x, [w], [k], b, h) for w, k, b in zip(weights, kept, halves)], -1)



#: One instance of each built-in pattern, in registration order.
BUILTIN_PATTERNS: tuple[Pattern, ...] = (Unstructured(), Row(), Column(), HalfRow(), HalfColumn())
