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


import torch
from torch import Tensor

from lightning_fedprune.pruning.patterns.base import Block, Pattern, Reduction, ShapeLike, shape_2d, to_2d  # noqa: F401
from lightning_fedprune.pruning.patterns.registry import (
    COMPACT_PATTERNS,
    PATTERNS,
    STRUCTURED_PATTERNS,
    PatternName,
    get_pattern,
    register,
)
from lightning_fedprune.pruning.select import mask_from_scores, num_to_prune
from lightning_fedprune.validation import check_choice, fail

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

