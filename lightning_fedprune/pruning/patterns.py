"""Pruning patterns on the 2-D view of a tensor: one :class:`Pattern` class per pattern, in a registry.

Every tensor is viewed as a matrix with ``t.reshape(t.shape[0], -1)``: rows are the first
dimension, columns everything else flattened; a 1-D tensor becomes ``(n, 1)``. A *pattern*
says which entries of that matrix are kept or pruned together (a *group*):

=================  ==========================================================  ==========
pattern            group                                                        groups
=================  ==========================================================  ==========
``unstructured``   one entry ``W[r, c]`` (index ``r * C + c``)                  ``R * C``
``row``            one row ``W[r, :]``                                          ``R``
``column``         one column ``W[:, c]``                                       ``C``
``half_row``       ``W = [W1 | W2]`` (left/right halves of the columns);        ``2 * R``
                   group ``h * R + r`` is row ``r`` of block ``h``
``half_column``    ``W = [W1 ; W2]`` (top/bottom halves of the rows);           ``2 * C``
                   group ``h * C + c`` is column ``c`` of block ``h``
=================  ==========================================================  ==========

Group indices of the half patterns are *block-major* (see ``docs/design.md``). A group's score
is the L1 (``sum |x|``) or L2 (``sqrt(sum x^2)``) norm of an elementwise importance over its
entries; ``round(sparsity * n_groups)`` groups with the lowest scores are pruned, ties broken by
the lower group index.

Each pattern is one :class:`Pattern` subclass registered in :data:`PATTERNS` (name -> instance):
the group geometry, the kept part that travels on the wire (:mod:`lightning_fedprune.federated.wire`) and,
where it has one, the forward of a compact ``nn.Linear``
(:class:`~lightning_fedprune.pruning.compact.CompactLinear`). The module functions below take a
pattern *name* and delegate to its object; a new pattern is one subclass and one
:func:`register` call (worked example in ``docs/design.md``).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_fedprune.validation import check_bool, check_choice, check_float, check_int, check_str, fail

__all__ = [
    "COMPACT_PATTERNS",
    "NORMS",
    "PATTERNS",
    "STRUCTURED_PATTERNS",
    "Pattern",
    "PatternName",
    "check_pattern",
    "compute_mask",
    "expand_groups",
    "get_pattern",
    "group_reduce",
    "group_size",
    "groups_from_mask",
    "mask_from_scores",
    "num_groups",
    "num_to_prune",
    "register",
    "shape_2d",
    "split_groups",
    "to_2d",
]

NORMS: tuple[str, ...] = ("l1", "l2")
#: The built-in patterns (a typed choice for constructors and the CLI; registered patterns extend :data:`PATTERNS`).
PatternName = Literal["unstructured", "row", "column", "half_row", "half_column"]

ShapeLike = torch.Size | Sequence[int]
#: ``fn(tensor, dim)``: a reduction over ``dim`` (an int or a tuple of ints), e.g. a norm or ``all``.
Reduction = Callable[[Tensor, "int | tuple[int, ...]"], Tensor]
#: ``(kept, values)`` of one block: the block-local kept group indices and the kept entries.
Block = tuple[Tensor, Tensor]

# Below this many scores the exact selection runs directly on all of them.
_DIRECT_SELECT = 1 << 16
# Size of the strided sample used to bracket the k-th smallest score of a large vector.
_SAMPLE = 1 << 14


# --------------------------------------------------------------------------------------
# The pattern protocol
# --------------------------------------------------------------------------------------


class Pattern(ABC):
    """One pruning pattern: how the entries of a ``(rows, cols)`` matrix form groups.

    A subclass is the whole pattern. The mask math uses :meth:`num_groups`, :meth:`reduce` and
    :meth:`expand`; the wire (:mod:`lightning_fedprune.federated.wire`) sends :meth:`values` (the kept part)
    and rebuilds the matrix with :meth:`scatter_`; a pattern that overrides :meth:`linear_forward`
    can also replace an ``nn.Linear`` by a :class:`~lightning_fedprune.pruning.compact.CompactLinear`
    holding only the kept part. Nothing outside the class names the pattern, so adding one is a
    subclass and a :func:`register` call.

    Two conventions every pattern keeps, because the rest of the code relies on them:

    * every group has the same number of entries (:meth:`group_size`);
    * group indices are *block-major*: the kept part is :attr:`num_blocks` blocks, block ``h``
      owns the groups ``[h * n, (h + 1) * n)`` with ``n = num_groups // num_blocks``, and a
      block's kept indices are local to it (``g - h * n``), ascending.

    Instances are stateless; pickling one yields the registered instance of the same name.
    """

    #: the registry key, e.g. ``"row"``.
    name: ClassVar[str]
    #: ``True``: a group is more than one entry and the kept part travels as dense blocks with a
    #: group index (int32 indices or a group bitmask, whichever is smaller); ``False``: groups
    #: are single entries and the index is a one-bit-per-entry bitmask (``mask_bits``).
    structured: ClassVar[bool] = True
    #: number of ``(kept, values)`` blocks :meth:`split` returns.
    num_blocks: ClassVar[int] = 1

    def check(self, rows: int, cols: int, name: str) -> None:
        """Raise ``ValueError`` if the pattern cannot be applied to a non-empty ``(rows, cols)``
        view of the tensor ``name`` (e.g. an odd axis that must be halved). Default: always applies."""

    @abstractmethod
    def num_groups(self, rows: int, cols: int) -> int:
        """Number of groups in a ``(rows, cols)`` matrix."""

    @abstractmethod
    def reduce(self, x2d: Tensor, fn: Reduction) -> Tensor:
        """``fn`` applied over the entries of every group of ``x2d``: 1-D, in group order."""

    @abstractmethod
    def expand(self, flags: Tensor, rows: int, cols: int) -> Tensor:
        """The ``(rows, cols)`` boolean mask of per-group keep ``flags`` (may be a view of ``flags``)."""

    @abstractmethod
    def values(self, x2d: Tensor, flags: Tensor) -> list[Tensor]:
        """The kept entries of ``x2d``, one tensor per block, of :meth:`block_shape` (what travels)."""

    @abstractmethod
    def block_shape(self, kept: int, rows: int, cols: int) -> tuple[int, ...]:
        """Shape of one block of :meth:`values` with ``kept`` kept groups, in a ``(rows, cols)`` matrix."""

    @abstractmethod
    def scatter_(self, out2d: Tensor, blocks: Sequence[Block]) -> Tensor:
        """Write the ``blocks`` of :meth:`split` into ``out2d`` (a zero ``(rows, cols)`` matrix) in
        place and return it; differentiable with respect to the values (``CompactLinear.weight``)."""

    # -- derived; override only for speed ------------------------------------------------
    def group_size(self, rows: int, cols: int) -> int:
        """Entries per group (all groups have the same size)."""
        return rows * cols // self.num_groups(rows, cols)

    def norms(self, x2d: Tensor, order: int, dtype: torch.dtype) -> Tensor:
        """Per-group ``order``-norms of ``x2d`` in ``dtype`` (group order)."""
        return self.reduce(x2d, lambda t, dim: torch.linalg.vector_norm(t, ord=order, dim=dim, dtype=dtype))

    def flags(self, m2d: Tensor) -> Tensor | None:
        """Per-group keep flags of a boolean ``(rows, cols)`` mask; ``None`` if a group is partly kept."""
        kept_all = self.reduce(m2d, torch.all)
        return kept_all if torch.equal(kept_all, self.reduce(m2d, torch.any)) else None

    def kept(self, flags: Tensor) -> list[Tensor]:
        """Block-local kept group indices (int64, ascending), one tensor per block."""
        return [f.nonzero().reshape(-1) for f in flags.reshape(self.num_blocks, -1)]

    def split(self, x2d: Tensor, flags: Tensor) -> list[Block]:
        """``[(kept, values), ...]``: the kept part of ``x2d`` block by block, without scattering."""
        return list(zip(self.kept(flags), self.values(x2d, flags)))

    # -- compact nn.Linear ----------------------------------------------------------------
    @property
    def compactable(self) -> bool:
        """Whether the pattern has a compact ``nn.Linear`` forward (overrides :meth:`linear_forward`)."""
        return type(self).linear_forward is not Pattern.linear_forward

    def linear_forward(
        self, x: Tensor, weights: Sequence[Tensor], kept: Sequence[Tensor], bias: Tensor | None, out_features: int
    ) -> Tensor:
        """``x @ W.T + bias`` for the full weight ``W`` given by its kept ``weights`` blocks and their
        ``kept`` indices (the blocks of :meth:`split`), computed on the kept part only."""
        raise NotImplementedError(f"pattern {self.name!r} has no compact nn.Linear layer")

    def __reduce__(self) -> tuple[Callable[[str], Pattern], tuple[str]]:
        return get_pattern, (self.name,)

    def __repr__(self) -> str:
        return f"<pattern {self.name!r}>"


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


# --------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------

#: name -> pattern, in registration order. Iterating it (or ``in``) gives the names.
PATTERNS: dict[str, Pattern] = {}


class _Names(Sequence[str]):
    """The names of the registered patterns that pass ``keep``, read from :data:`PATTERNS` at every use
    (a read-only, tuple-like listing that follows :func:`register`)."""

    def __init__(self, keep: Callable[[Pattern], bool]) -> None:
        self._keep = keep

    def _names(self) -> tuple[str, ...]:
        return tuple(name for name, p in PATTERNS.items() if self._keep(p))

    def __contains__(self, name: object) -> bool:
        p = PATTERNS.get(name) if isinstance(name, str) else None
        return p is not None and self._keep(p)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())

    def __getitem__(self, i):  # type: ignore[override]
        return self._names()[i]

    def __eq__(self, other: object) -> bool:
        return self._names() == (tuple(other) if isinstance(other, Sequence) else other)

    def __repr__(self) -> str:
        return repr(self._names())


#: The registered patterns whose kept part is dense blocks of whole slices (:attr:`Pattern.structured`).
STRUCTURED_PATTERNS: Sequence[str] = _Names(lambda p: p.structured)
#: The registered patterns with a compact ``nn.Linear`` layer (:attr:`Pattern.compactable`).
COMPACT_PATTERNS: Sequence[str] = _Names(lambda p: p.compactable)


def register(pattern: Pattern) -> Pattern:
    """Add ``pattern`` to :data:`PATTERNS` under ``pattern.name`` and return it.

    From then on every pattern argument (``SparsityRampCallback(pattern=...)``, the wire, the
    compact client layers) accepts the name.

    Raises:
        ValueError: if ``pattern`` is not a :class:`Pattern` instance, its ``name``, ``structured``
            or ``num_blocks`` are malformed, or the name is taken.
    """
    if not isinstance(pattern, Pattern):
        fail("pattern", "a Pattern instance", pattern)
    name = check_str(getattr(pattern, "name", None), "pattern.name")
    check_bool(pattern.structured, "pattern.structured")
    check_int(pattern.num_blocks, "pattern.num_blocks", min=1)
    if name in PATTERNS:
        raise ValueError(f"a pattern named {name!r} is already registered ({PATTERNS[name]!r})")
    PATTERNS[name] = pattern
    return pattern


def get_pattern(name: str, arg: str = "pattern") -> Pattern:
    """The registered :class:`Pattern` called ``name``.

    Raises:
        ValueError: naming ``arg`` and the registered names, if there is none.

    Example:
        >>> from lightning_fedprune.pruning.patterns import get_pattern
        >>> get_pattern("half_row").num_groups(6, 4)
        12
        >>> get_pattern("diagonal", "patterns['fc.weight']")
        Traceback (most recent call last):
        ...
        ValueError: `patterns['fc.weight']` must be one of ('unstructured', 'row', 'column', 'half_row', 'half_column'), got 'diagonal'.
    """
    pattern = PATTERNS.get(name) if isinstance(name, str) else None
    if pattern is None:
        check_choice(name, arg, PATTERNS)
    return pattern


for _pattern in (Unstructured(), Row(), Column(), HalfRow(), HalfColumn()):
    register(_pattern)


# --------------------------------------------------------------------------------------
# The module functions: by pattern name, through the registry
# --------------------------------------------------------------------------------------


def shape_2d(shape: ShapeLike, name: str = "tensor") -> tuple[int, int]:
    """``(rows, columns)`` of the 2-D view (:func:`to_2d`) of a tensor of ``shape``.

    Raises:
        ValueError: if ``shape`` is not a sequence of non-negative ints or is 0-d.

    Example:
        >>> from lightning_fedprune.pruning.patterns import shape_2d
        >>> shape_2d((8, 3, 5, 5)), shape_2d((4,))
        ((8, 75), (4, 1))
    """
    try:
        dims = tuple(int(d) for d in shape)
    except TypeError as err:
        raise ValueError(f"`shape` of {name!r} must be a sequence of ints, got {shape!r}") from err
    if len(dims) == 0:
        raise ValueError(f"{name!r} is a 0-d (scalar) tensor; pruning needs at least one dimension")
    if any(d < 0 for d in dims):
        raise ValueError(f"`shape` of {name!r} has a negative dimension: {dims}")
    return dims[0], math.prod(dims[1:])


def to_2d(t: Tensor) -> Tensor:
    """View ``t`` as a matrix: ``t.reshape(t.shape[0], -1)``; a 1-D tensor becomes ``(n, 1)``.

    Args:
        t: a tensor with at least one dimension.

    Raises:
        ValueError: if ``t`` is not a tensor or is 0-d.

    Example:
        >>> import torch
        >>> from lightning_fedprune.pruning import to_2d
        >>> to_2d(torch.zeros(8, 3, 5, 5)).shape
        torch.Size([8, 75])
        >>> to_2d(torch.zeros(4)).shape
        torch.Size([4, 1])
    """
    if not isinstance(t, Tensor):
        fail("t", "a torch.Tensor", t)
    if t.dim() == 0:
        raise ValueError("`t` is a 0-d (scalar) tensor; the 2-D view needs at least one dimension")
    rows, cols = shape_2d(t.shape)
    return t.reshape(rows, cols)


def _checked(pattern: str, shape: ShapeLike, name: str = "tensor") -> tuple[Pattern, int, int]:
    """The pattern object and the 2-D view's ``(rows, cols)``, after :func:`check_pattern`'s checks."""
    p = get_pattern(pattern)
    rows, cols = shape_2d(shape, name)
    if rows * cols == 0:
        raise ValueError(f"{name!r} is empty (shape {tuple(shape)}); there is nothing to prune")
    p.check(rows, cols, name)
    return p, rows, cols


def check_pattern(pattern: str, shape: ShapeLike | None = None, name: str = "tensor") -> None:
    """Raise ``ValueError`` unless ``pattern`` can be applied to a tensor of ``shape``.

    Checks that ``pattern`` is registered (:data:`PATTERNS`), that the tensor is not 0-d or empty
    and whatever the pattern itself requires (:meth:`Pattern.check`): the half patterns need an
    even split axis in the 2-D view (``half_row`` splits the columns, axis 1; ``half_column``
    splits the rows, axis 0).

    Args:
        pattern: pattern name.
        shape: shape of the (original, not 2-D) tensor; ``None`` checks the name only.
        name: name of the tensor, used in error messages.

    Example:
        >>> from lightning_fedprune.pruning import check_pattern
        >>> check_pattern("half_column", (4, 3))
        >>> check_pattern("half_column", (3, 4), name="fc.weight")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: pattern 'half_column' cannot be applied to 'fc.weight': its 2-D view has shape (3, 4) ...
    """
    if shape is None:
        get_pattern(pattern)
    else:
        _checked(pattern, shape, name)


def num_groups(pattern: str, shape: ShapeLike) -> int:
    """Number of groups of ``pattern`` in a tensor of ``shape``.

    Example:
        >>> from lightning_fedprune.pruning import num_groups
        >>> from lightning_fedprune.pruning import PATTERNS
        >>> [num_groups(p, (6, 4)) for p in PATTERNS]
        [24, 6, 4, 12, 8]
    """
    p, rows, cols = _checked(pattern, shape)
    return p.num_groups(rows, cols)


def group_size(pattern: str, shape: ShapeLike) -> int:
    """Number of entries in one group of ``pattern`` in a tensor of ``shape`` (all groups have this size).

    Example:
        >>> from lightning_fedprune.pruning import PATTERNS, group_size
        >>> {p: group_size(p, (6, 4)) for p in PATTERNS}
        {'unstructured': 1, 'row': 4, 'column': 6, 'half_row': 2, 'half_column': 3}
    """
    p, rows, cols = _checked(pattern, shape)
    return p.group_size(rows, cols)


def _score_dtype(x: Tensor) -> torch.dtype:
    if x.is_complex():
        raise ValueError("`x` must be a real tensor, got a complex one")
    if x.dtype in (torch.float32, torch.float64):
        return x.dtype
    return torch.float32


def group_reduce(x: Tensor, pattern: str, norm: str = "l1") -> Tensor:
    """Per-group norms of an elementwise tensor ``x`` (same shape as the parameter).

    ``norm="l1"`` is ``sum |x|`` and ``norm="l2"`` is ``sqrt(sum x^2)`` over each group's
    entries; the result is a 1-D tensor of length :func:`num_groups` in group order (block-major
    for the half patterns). Float32/float64 inputs keep their dtype, others are scored in
    float32. For ``unstructured`` both norms are ``|x|``.

    Args:
        x: elementwise importance, e.g. the weight itself.
        pattern: a registered pattern name (:data:`PATTERNS`).
        norm: ``"l1"`` or ``"l2"``.

    Example:
        >>> import torch
        >>> from lightning_fedprune.pruning import group_reduce
        >>> w = torch.tensor([[1., -2., 3., 4.], [5., 6., -7., 8.]])
        >>> group_reduce(w, "column", "l1")
        tensor([ 6.,  8., 10., 12.])
        >>> group_reduce(w, "half_row", "l1")  # [row0 left, row1 left, row0 right, row1 right]
        tensor([ 3., 11.,  7., 15.])
    """
    if not isinstance(x, Tensor):
        fail("x", "a torch.Tensor", x)
    check_choice(norm, "norm", NORMS)
    p, _, _ = _checked(pattern, x.shape, "x")
    return p.norms(to_2d(x.detach()), 1 if norm == "l1" else 2, _score_dtype(x))


def _fresh(out: Tensor, source: Tensor) -> Tensor:
    """``out`` as a new contiguous tensor: a copy where it still shares memory with ``source``."""
    if out.untyped_storage().data_ptr() == source.untyped_storage().data_ptr():
        return out.clone(memory_format=torch.contiguous_format)
    return out.contiguous()


def expand_groups(group_mask: Tensor, pattern: str, shape: ShapeLike) -> Tensor:
    """Map a per-group keep vector to an elementwise boolean mask of ``shape``.

    The inverse of :func:`groups_from_mask`: entry ``(r, c)`` of the 2-D view is kept iff its
    group is kept. Always returns a new contiguous tensor on ``group_mask``'s device.

    Args:
        group_mask: 1-D boolean tensor of length ``num_groups(pattern, shape)``; True = kept.
        pattern: a registered pattern name (:data:`PATTERNS`).
        shape: shape of the parameter.

    Example:
        >>> import torch
        >>> from lightning_fedprune.pruning import expand_groups
        >>> expand_groups(torch.tensor([True, False, False, True]), "half_column", (4, 2)).int()
        tensor([[1, 0],
                [1, 0],
                [0, 1],
                [0, 1]], dtype=torch.int32)
    """
    p, rows, cols = _checked(pattern, shape)
    if not isinstance(group_mask, Tensor) or group_mask.dtype != torch.bool:
        raise ValueError("`group_mask` must be a boolean torch.Tensor")
    n = p.num_groups(rows, cols)
    if group_mask.dim() != 1 or group_mask.numel() != n:
        raise ValueError(
            f"`group_mask` must be 1-D with {n} entries for pattern {pattern!r} on shape "
            f"{tuple(shape)}, got shape {tuple(group_mask.shape)}"
        )
    out = p.expand(group_mask, rows, cols).reshape(torch.Size(int(d) for d in shape))
    return _fresh(out, group_mask)


def groups_from_mask(mask: Tensor, pattern: str, name: str | None = None) -> Tensor:
    """Per-group keep vector of an elementwise mask (True = group kept).

    Args:
        mask: boolean (or 0/1 numeric) tensor of the parameter's shape.
        pattern: a registered pattern name (:data:`PATTERNS`).
        name: name of the masked tensor, used in error messages.

    Raises:
        ValueError: if ``mask`` is not a union of whole groups of ``pattern`` (some group is
            partly kept), or is not boolean / 0-1 valued.

    Example:
        >>> import torch
        >>> from lightning_fedprune.pruning import groups_from_mask
        >>> m = torch.tensor([[True, False, True], [True, False, True]])
        >>> groups_from_mask(m, "column")
        tensor([ True, False,  True])
        >>> groups_from_mask(m, "row", name="fc.weight")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: the mask of 'fc.weight' (shape (2, 3)) is not a union of whole 'row' groups: group 0 (of 2) ...
    """
    if not isinstance(mask, Tensor):
        fail("mask", "a torch.Tensor", mask)
    p, _, _ = _checked(pattern, mask.shape, "mask" if name is None else name)
    what = "`mask`" if name is None else f"the mask of {name!r}"
    m = mask
    if m.dtype != torch.bool:
        if m.is_complex() or not bool(((m == 0) | (m == 1)).all()):
            raise ValueError(f"{what} must be boolean or contain only 0 and 1")
        m = m != 0
    m2d = to_2d(m)
    flags = p.flags(m2d)
    if flags is None:
        partly = p.reduce(m2d, torch.all) != p.reduce(m2d, torch.any)
        raise ValueError(
            f"{what} (shape {tuple(mask.shape)}) is not a union of whole {pattern!r} groups: "
            f"group {int(partly.nonzero()[0])} (of {partly.numel()}) is partly kept"
        )
    return _fresh(flags, mask)


def split_groups(x2d: Tensor, group_mask: Tensor, pattern: str) -> list[Block]:
    """The kept slices of a 2-D view, one ``(kept, values)`` pair per block, without scattering.

    For a structured pattern (:data:`STRUCTURED_PATTERNS`) and a per-group keep vector
    (:meth:`Pattern.split`):

    * ``row``: one block, ``kept`` rows and ``values = x2d[kept]`` ``(k, C)``;
    * ``column``: one block, ``kept`` columns and ``values = x2d[:, kept]`` ``(R, k)``;
    * ``half_row``: ``x2d = [X0 | X1]``, block ``h`` has its kept rows (groups ``h * R + r``)
      and ``values = Xh[kept]`` ``(k_h, C/2)``;
    * ``half_column``: ``x2d = [X0 ; X1]``, block ``h`` has its kept columns (groups
      ``h * C + c``) and ``values = Xh[:, kept]`` ``(R/2, k_h)``.

    ``kept`` are int64 indices local to the block, ascending.

    Example:
        >>> import torch
        >>> from lightning_fedprune.pruning.patterns import split_groups
        >>> x = torch.arange(8.).reshape(2, 4)
        >>> split_groups(x, torch.tensor([True, False, False, True]), "half_row")
        [(tensor([0]), tensor([[0., 1.]])), (tensor([1]), tensor([[6., 7.]]))]
    """
    check_choice(pattern, "pattern", STRUCTURED_PATTERNS)
    if not isinstance(x2d, Tensor) or x2d.dim() != 2:
        raise ValueError("`x2d` must be a 2-D torch.Tensor")
    rows, cols = x2d.shape
    n = num_groups(pattern, (rows, cols))
    if group_mask.dtype != torch.bool or group_mask.shape != (n,):
        raise ValueError(
            f"`group_mask` must be a 1-D boolean tensor of {n} entries for pattern {pattern!r} on a "
            f"({rows}, {cols}) matrix, got {group_mask.dtype} of shape {tuple(group_mask.shape)}"
        )
    return PATTERNS[pattern].split(x2d, group_mask)


def num_to_prune(sparsity: float, n: int) -> int:
    """Number of groups pruned at ``sparsity`` out of ``n``: ``round(sparsity * n)``.

    Python's ``round`` (half to even), exactly as ``torch.nn.utils.prune`` does.

    Example:
        >>> from lightning_fedprune.pruning import num_to_prune
        >>> num_to_prune(0.3, 10), num_to_prune(0.25, 10), num_to_prune(0.35, 10)
        (3, 2, 4)
    """
    return round(check_float(sparsity, "sparsity", min=0, max=1) * int(n))


def _kth_smallest(s: Tensor, k: int) -> Tensor:
    """Exact k-th smallest value (1-based) of a 1-D NaN-free tensor; fast for large inputs.

    For large inputs a strided sample brackets the k-th value, and the exact selection runs
    only on the entries inside the bracket. The answer does not depend on the sample (only the
    speed does), so it is deterministic.
    """
    n = s.numel()
    if n <= _DIRECT_SELECT:
        return torch.kthvalue(s, k).values
    step = n // _SAMPLE
    sample = torch.sort(s[::step]).values
    m = sample.numel()
    pos = (k - 0.5) / n * m
    margin = 2.5 * math.sqrt(m) + 8.0  # the sample quantile's std is <= sqrt(m) / 2
    lo_i, hi_i = int(math.floor(pos - margin)), int(math.ceil(pos + margin))
    lo = sample[lo_i] if lo_i >= 0 else None
    hi = sample[hi_i] if hi_i < m else None
    if lo is None:
        below = 0
        band = s <= hi if hi is not None else None
    else:
        below = int((s < lo).sum())
        band = s >= lo if hi is None else (s >= lo) & (s <= hi)
    if band is None:
        return torch.kthvalue(s, k).values
    values = s[band]
    if below < k <= below + values.numel():
        return torch.kthvalue(values, k - below).values
    return torch.kthvalue(s, k).values  # the sample was unrepresentative


def mask_from_scores(group_scores: Tensor, sparsity: float) -> Tensor:
    """Keep vector pruning the ``round(sparsity * n)`` lowest-scoring groups.

    Lowest scores are pruned first; among equal scores the lower index is pruned first, i.e.
    the result equals pruning the first ``k`` indices of a *stable* ascending sort (computed
    without a full sort: an exact k-th value selection plus an index tie-break).

    Args:
        group_scores: 1-D real tensor of per-group scores (no NaN).
        sparsity: fraction of groups to prune, in ``[0, 1]``.

    Returns:
        1-D boolean tensor, True = kept, with exactly ``n - round(sparsity * n)`` True entries.

    Example:
        >>> import torch
        >>> from lightning_fedprune.pruning import mask_from_scores
        >>> mask_from_scores(torch.tensor([3., 1., 2., 1., 5.]), 0.4)
        tensor([ True, False,  True, False,  True])
        >>> mask_from_scores(torch.ones(4), 0.5)  # ties: lower indices pruned first
        tensor([False, False,  True,  True])
    """
    if not isinstance(group_scores, Tensor):
        fail("group_scores", "a torch.Tensor", group_scores)
    if group_scores.dim() != 1:
        raise ValueError(f"`group_scores` must be 1-D, got shape {tuple(group_scores.shape)}")
    if group_scores.dtype == torch.bool or group_scores.is_complex():
        raise ValueError(f"`group_scores` must be real numbers, got dtype {group_scores.dtype}")
    check_float(sparsity, "sparsity", min=0, max=1)
    s = group_scores.detach()
    if not s.is_floating_point():
        s = s.to(torch.float64)
    n = s.numel()
    # Cheap NaN test first (a sum), the exact one only when the sum is not finite.
    if n and not bool(torch.isfinite(s.sum())) and bool(torch.isnan(s).any()):
        raise ValueError("`group_scores` contains NaN")
    k = num_to_prune(sparsity, n)
    if k == 0:
        return torch.ones(n, dtype=torch.bool, device=s.device)
    if k >= n:
        return torch.zeros(n, dtype=torch.bool, device=s.device)
    v = _kth_smallest(s, k)
    keep = s > v
    if n - int(keep.sum()) == k:  # no tie at the threshold straddles the cut
        return keep
    # Entries equal to v: prune the lowest-index ones until k are pruned, keep the rest.
    tie = s == v
    need = k - int((s < v).sum())
    keep |= tie & (torch.cumsum(tie, 0, dtype=torch.int64) > need)
    return keep


def compute_mask(
    x: Tensor, pattern: str, sparsity: float, norm: str = "l1", name: str = "tensor"
) -> Tensor:
    """Elementwise keep mask of ``x``'s shape: score groups, prune the lowest, expand back.

    Composition of :func:`group_reduce`, :func:`mask_from_scores` and :func:`expand_groups`.

    Args:
        x: elementwise importance (e.g. the weight), shape of the parameter.
        pattern: a registered pattern name (:data:`PATTERNS`).
        sparsity: fraction of *groups* to prune, in ``[0, 1]``.
        norm: ``"l1"`` or ``"l2"`` group norm.
        name: tensor name used in error messages.

    Example:
        >>> import torch
        >>> from lightning_fedprune.pruning import compute_mask
        >>> w = torch.tensor([[0.1, 2.0, 0.3], [0.2, 1.0, 0.1]])
        >>> compute_mask(w, "column", 1 / 3)
        tensor([[False,  True,  True],
                [False,  True,  True]])
    """
    if not isinstance(x, Tensor):
        fail("x", "a torch.Tensor", x)
    check_pattern(pattern, x.shape, name)
    scores = group_reduce(x, pattern, norm)
    return expand_groups(mask_from_scores(scores, sparsity), pattern, x.shape)
