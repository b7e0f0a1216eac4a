"""Pruning patterns on the 2-D view of a tensor (pure functions, no state).

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
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = [
    "NORMS",
    "PATTERNS",
    "STRUCTURED_PATTERNS",
    "check_pattern",
    "compute_mask",
    "expand_groups",
    "group_reduce",
    "group_size",
    "groups_from_mask",
    "mask_from_scores",
    "num_groups",
    "num_to_prune",
    "shape_2d",
    "split_groups",
    "to_2d",
]

PATTERNS: tuple[str, ...] = ("unstructured", "row", "column", "half_row", "half_column")
#: The patterns whose groups are whole rows / columns (of the full matrix or of one half).
STRUCTURED_PATTERNS: tuple[str, ...] = ("row", "column", "half_row", "half_column")
NORMS: tuple[str, ...] = ("l1", "l2")

ShapeLike = torch.Size | Sequence[int]

# Below this many scores the exact selection runs directly on all of them.
_DIRECT_SELECT = 1 << 16
# Size of the strided sample used to bracket the k-th smallest score of a large vector.
_SAMPLE = 1 << 14


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


_shape_2d = shape_2d  # the name the other pruning modules import


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
        raise ValueError(f"`t` must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() == 0:
        raise ValueError("`t` is a 0-d (scalar) tensor; the 2-D view needs at least one dimension")
    rows, cols = shape_2d(t.shape)
    return t.reshape(rows, cols)


def check_pattern(pattern: str, shape: ShapeLike | None = None, name: str = "tensor") -> None:
    """Raise ``ValueError`` unless ``pattern`` can be applied to a tensor of ``shape``.

    Checks that ``pattern`` is one of :data:`PATTERNS`, that the tensor is not 0-d or empty and,
    for the half patterns, that the split axis of the 2-D view has an even length
    (``half_row`` splits the columns, axis 1; ``half_column`` splits the rows, axis 0).

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
    if not isinstance(pattern, str) or pattern not in PATTERNS:
        raise ValueError(f"`pattern` must be one of {PATTERNS}, got {pattern!r}")
    if shape is None:
        return
    rows, cols = shape_2d(shape, name)
    if rows * cols == 0:
        raise ValueError(f"{name!r} is empty (shape {tuple(shape)}); there is nothing to prune")
    if pattern == "half_row" and cols % 2:
        raise ValueError(
            f"pattern 'half_row' cannot be applied to {name!r}: its 2-D view has shape "
            f"({rows}, {cols}) and axis 1 (columns) has odd length {cols}, so it cannot be split "
            "into two equal blocks"
        )
    if pattern == "half_column" and rows % 2:
        raise ValueError(
            f"pattern 'half_column' cannot be applied to {name!r}: its 2-D view has shape "
            f"({rows}, {cols}) and axis 0 (rows) has odd length {rows}, so it cannot be split "
            "into two equal blocks"
        )


def num_groups(pattern: str, shape: ShapeLike) -> int:
    """Number of groups of ``pattern`` in a tensor of ``shape``.

    Example:
        >>> from lightning_fedprune.pruning import num_groups
        >>> from lightning_fedprune.pruning import PATTERNS
        >>> [num_groups(p, (6, 4)) for p in PATTERNS]
        [24, 6, 4, 12, 8]
    """
    check_pattern(pattern, shape)
    rows, cols = shape_2d(shape)
    return {
        "unstructured": rows * cols,
        "row": rows,
        "column": cols,
        "half_row": 2 * rows,
        "half_column": 2 * cols,
    }[pattern]


def group_size(pattern: str, shape: ShapeLike) -> int:
    """Number of entries in one group of ``pattern`` in a tensor of ``shape``.

    Example:
        >>> from lightning_fedprune.pruning import group_size
        >>> from lightning_fedprune.pruning import PATTERNS
        >>> [group_size(p, (6, 4)) for p in PATTERNS]
        [1, 4, 6, 2, 3]
    """
    check_pattern(pattern, shape)
    rows, cols = shape_2d(shape)
    return {
        "unstructured": 1,
        "row": cols,
        "column": rows,
        "half_row": cols // 2,
        "half_column": rows // 2,
    }[pattern]


def _reduce_groups(x2d: Tensor, pattern: str, fn: Callable[[Tensor, int], Tensor]) -> Tensor:
    """Apply the reduction ``fn(tensor, dim)`` over every group; 1-D result in group order."""
    rows, cols = x2d.shape
    if pattern == "row":
        return fn(x2d, 1)
    if pattern == "column":
        return fn(x2d, 0)
    if pattern == "half_row":  # (R, 2, C/2) -> (R, 2) -> block-major (2, R)
        return fn(x2d.reshape(rows, 2, cols // 2), 2).t().reshape(-1)
    if pattern == "half_column":  # (2, R/2, C) -> (2, C), already block-major
        return fn(x2d.reshape(2, rows // 2, cols), 1).reshape(-1)
    raise AssertionError(pattern)  # unstructured is handled by the callers


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
        pattern: one of :data:`PATTERNS`.
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
        raise ValueError(f"`x` must be a torch.Tensor, got {type(x).__name__}")
    if norm not in NORMS:
        raise ValueError(f"`norm` must be one of {NORMS}, got {norm!r}")
    check_pattern(pattern, x.shape, "x")
    dtype = _score_dtype(x)
    x2d = to_2d(x.detach())
    if pattern == "unstructured":
        return x2d.reshape(-1).abs().to(dtype)
    order = 1 if norm == "l1" else 2

    def fn(t: Tensor, dim: int) -> Tensor:
        return torch.linalg.vector_norm(t, ord=order, dim=dim, dtype=dtype)

    return _reduce_groups(x2d, pattern, fn)


def expand_groups(group_mask: Tensor, pattern: str, shape: ShapeLike) -> Tensor:
    """Map a per-group keep vector to an elementwise boolean mask of ``shape``.

    The inverse of :func:`groups_from_mask`: entry ``(r, c)`` of the 2-D view is kept iff its
    group is kept. Always returns a new contiguous tensor on ``group_mask``'s device.

    Args:
        group_mask: 1-D boolean tensor of length ``num_groups(pattern, shape)``; True = kept.
        pattern: one of :data:`PATTERNS`.
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
    check_pattern(pattern, shape)
    if not isinstance(group_mask, Tensor) or group_mask.dtype != torch.bool:
        raise ValueError("`group_mask` must be a boolean torch.Tensor")
    n = num_groups(pattern, shape)
    if group_mask.dim() != 1 or group_mask.numel() != n:
        raise ValueError(
            f"`group_mask` must be 1-D with {n} entries for pattern {pattern!r} on shape "
            f"{tuple(shape)}, got shape {tuple(group_mask.shape)}"
        )
    shape = torch.Size(int(d) for d in shape)
    rows, cols = shape_2d(shape)
    if pattern == "unstructured":
        out = group_mask.clone()
    elif pattern == "row":
        out = group_mask[:, None].expand(rows, cols)
    elif pattern == "column":
        out = group_mask[None, :].expand(rows, cols)
    elif pattern == "half_row":
        out = group_mask.reshape(2, rows).t()[:, :, None].expand(rows, 2, cols // 2)
    else:  # half_column
        out = group_mask.reshape(2, cols)[:, None, :].expand(2, rows // 2, cols)
    return out.reshape(shape).contiguous()


def groups_from_mask(mask: Tensor, pattern: str, name: str | None = None) -> Tensor:
    """Per-group keep vector of an elementwise mask (True = group kept).

    Args:
        mask: boolean (or 0/1 numeric) tensor of the parameter's shape.
        pattern: one of :data:`PATTERNS`.
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
        raise ValueError(f"`mask` must be a torch.Tensor, got {type(mask).__name__}")
    check_pattern(pattern, mask.shape, "mask" if name is None else name)
    what = "`mask`" if name is None else f"the mask of {name!r}"
    if mask.dtype != torch.bool:
        if mask.is_complex() or not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError(f"{what} must be boolean or contain only 0 and 1")
        mask = mask != 0
    m2d = to_2d(mask)
    if pattern == "unstructured":
        return m2d.reshape(-1).clone()
    kept_all = _reduce_groups(m2d, pattern, lambda t, d: t.all(dim=d))
    kept_any = _reduce_groups(m2d, pattern, lambda t, d: t.any(dim=d))
    if not torch.equal(kept_all, kept_any):
        bad = int((kept_all != kept_any).nonzero()[0])
        raise ValueError(
            f"{what} (shape {tuple(mask.shape)}) is not a union of whole {pattern!r} groups: "
            f"group {bad} (of {kept_all.numel()}) is partly kept"
        )
    return kept_all


def split_groups(x2d: Tensor, group_mask: Tensor, pattern: str) -> list[tuple[Tensor, Tensor]]:
    """The kept slices of a 2-D view, one ``(kept, values)`` pair per block, without scattering.

    For a structured pattern (:data:`STRUCTURED_PATTERNS`) and a per-group keep vector:

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
    if pattern not in STRUCTURED_PATTERNS:
        raise ValueError(f"`pattern` must be one of {STRUCTURED_PATTERNS}, got {pattern!r}")
    if not isinstance(x2d, Tensor) or x2d.dim() != 2:
        raise ValueError("`x2d` must be a 2-D torch.Tensor")
    rows, cols = x2d.shape
    if group_mask.dtype != torch.bool or group_mask.shape != (num_groups(pattern, (rows, cols)),):
        raise ValueError(
            f"`group_mask` must be a 1-D boolean tensor of {num_groups(pattern, (rows, cols))} "
            f"entries for pattern {pattern!r} on a ({rows}, {cols}) matrix, got "
            f"{group_mask.dtype} of shape {tuple(group_mask.shape)}"
        )

    def kept(flags: Tensor) -> Tensor:
        return flags.nonzero().reshape(-1)

    if pattern == "row":
        return [(kept(group_mask), x2d[group_mask])]
    if pattern == "column":
        return [(kept(group_mask), x2d[:, group_mask])]
    if pattern == "half_row":
        f, h = group_mask.reshape(2, rows), cols // 2
        return [(kept(f[0]), x2d[:, :h][f[0]]), (kept(f[1]), x2d[:, h:][f[1]])]
    f, h = group_mask.reshape(2, cols), rows // 2  # half_column
    return [(kept(f[0]), x2d[:h][:, f[0]]), (kept(f[1]), x2d[h:][:, f[1]])]


def num_to_prune(sparsity: float, n: int) -> int:
    """Number of groups pruned at ``sparsity`` out of ``n``: ``round(sparsity * n)``.

    Python's ``round`` (half to even), exactly as ``torch.nn.utils.prune`` does.

    Example:
        >>> from lightning_fedprune.pruning import num_to_prune
        >>> num_to_prune(0.3, 10), num_to_prune(0.25, 10), num_to_prune(0.35, 10)
        (3, 2, 4)
    """
    _check_sparsity(sparsity)
    return round(float(sparsity) * int(n))


def _check_sparsity(sparsity: float) -> None:
    if isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Real):
        raise ValueError(f"`sparsity` must be a real number in [0, 1], got {sparsity!r}")
    if not 0.0 <= float(sparsity) <= 1.0:
        raise ValueError(f"`sparsity` must be in [0, 1], got {sparsity!r}")


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
        kind = type(group_scores).__name__
        raise ValueError(f"`group_scores` must be a torch.Tensor, got {kind}")
    if group_scores.dim() != 1:
        raise ValueError(f"`group_scores` must be 1-D, got shape {tuple(group_scores.shape)}")
    if group_scores.dtype == torch.bool or group_scores.is_complex():
        raise ValueError(f"`group_scores` must be real numbers, got dtype {group_scores.dtype}")
    _check_sparsity(sparsity)
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
        pattern: one of :data:`PATTERNS`.
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
        raise ValueError(f"`x` must be a torch.Tensor, got {type(x).__name__}")
    check_pattern(pattern, x.shape, name)
    scores = group_reduce(x, pattern, norm)
    return expand_groups(mask_from_scores(scores, sparsity), pattern, x.shape)
