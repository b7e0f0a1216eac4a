"""The pattern protocol: a :class:`Pattern` says which entries of a tensor's 2-D view are pruned together.

Every tensor is viewed as a matrix with ``t.reshape(t.shape[0], -1)`` (:func:`to_2d`): rows are the first
dimension, columns everything else flattened; a 1-D tensor becomes ``(n, 1)``. The built-in patterns are in
:mod:`.builtin`, the registry in :mod:`.registry`, the functions by pattern name in the package itself.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor

from lightning_fedprune.validation import fail

if TYPE_CHECKING:
    from lightning_fedprune.pruning.patterns.registry import get_pattern  # noqa: F401

__all__ = ["Block", "Pattern", "Reduction", "ShapeLike", "shape_2d", "to_2d"]

ShapeLike = torch.Size | Sequence[int]
#: ``fn(tensor, dim)``: a reduction over ``dim`` (an int or a tuple of ints), e.g. a norm or ``all``.
Reduction = Callable[[Tensor, "int | tuple[int, ...]"], Tensor]
#: ``(kept, values)`` of one block: the block-local kept group indices and the kept entries.
Block = tuple[Tensor, Tensor]


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

    def trusted_flags(self, m2d: Tensor) -> Tensor:
        """Per-group keep flags of a mask known to be a union of whole groups (the server's own masks): no
        check, no host synchronisation."""
        return self.reduce(m2d, torch.any)

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
        from lightning_fedprune.pruning.patterns.registry import get_pattern

        return get_pattern, (self.name,)

    def __repr__(self) -> str:
        return f"<pattern {self.name!r}>"



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

