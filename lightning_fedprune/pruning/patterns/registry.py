"""The pattern registry: name -> :class:`~lightning_fedprune.pruning.patterns.base.Pattern`.

A new pattern is one subclass and one :func:`register` call (worked example in ``docs/design.md``); from
then on every pattern argument (the ramp, the wire, the compact client layers) accepts its name.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from lightning_fedprune.pruning.names import Names, lookup, new_entry_name
from lightning_fedprune.pruning.patterns.base import Pattern
from lightning_fedprune.pruning.patterns.builtin import BUILTIN_PATTERNS
from lightning_fedprune.validation import check_bool, check_int

__all__ = ["COMPACT_PATTERNS", "PATTERNS", "STRUCTURED_PATTERNS", "PatternName", "get_pattern", "register"]

#: The built-in patterns (a typed choice for constructors and the CLI; registered patterns extend :data:`PATTERNS`).
PatternName = Literal["unstructured", "row", "column", "half_row", "half_column"]

PATTERNS: dict[str, Pattern] = {}


#: The registered patterns whose kept part is dense blocks of whole slices (:attr:`Pattern.structured`).
STRUCTURED_PATTERNS: Sequence[str] = Names(PATTERNS, lambda p: p.structured)
#: The registered patterns with a compact ``nn.Linear`` layer (:attr:`Pattern.compactable`).
COMPACT_PATTERNS: Sequence[str] = Names(PATTERNS, lambda p: p.compactable)


def register(pattern: Pattern) -> Pattern:
    """Add ``pattern`` to :data:`PATTERNS` under ``pattern.name`` and return it.

    From then on every pattern argument (``SparsityRampCallback(pattern=...)``, the wire, the
    compact client layers) accepts the name.

    Raises:
        ValueError: if ``pattern`` is not a :class:`Pattern` instance, its ``name``, ``structured``
            or ``num_blocks`` are malformed, or the name is taken.
    """
    name = new_entry_name(PATTERNS, pattern, Pattern, "pattern", "a pattern")
    check_bool(pattern.structured, "pattern.structured")
    check_int(pattern.num_blocks, "pattern.num_blocks", min=1)
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
    return lookup(PATTERNS, name, arg, PATTERNS)



for _pattern in BUILTIN_PATTERNS:
    register(_pattern)
