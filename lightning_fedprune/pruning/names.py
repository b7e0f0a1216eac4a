"""A live, read-only listing of the names in a registry (patterns, importance, allocation methods)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

__all__ = ["Names"]


class Names(Sequence[str]):
    """The names of ``registry`` whose entry passes ``keep``, read at every use: a tuple-like view that
    follows later registrations (so a choice check accepts a name registered after import)."""

    def __init__(self, registry: Mapping[str, Any], keep: Callable[[Any], bool] | None = None) -> None:
        self._registry = registry
        self._keep = keep

    def _names(self) -> tuple[str, ...]:
        return tuple(name for name, entry in self._registry.items() if self._keep is None or self._keep(entry))

    def __contains__(self, name: object) -> bool:
        entry = self._registry.get(name) if isinstance(name, str) else None
        return entry is not None and (self._keep is None or self._keep(entry))

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())

    def __getitem__(self, i):  # type: ignore[override]
        return self._names()[i]

    def __eq__(self, other: object) -> bool:
        return self._names() == (tuple(other) if isinstance(other, Sequence) else other)

    def __hash__(self) -> int:
        return hash(self._names())

    def __repr__(self) -> str:
        return repr(self._names())
