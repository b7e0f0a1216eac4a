"""The registries' shared parts (patterns, importance, allocation methods, client statistics): a live, read-only
listing of the names, the checks of a new entry, and the lookup by name with a clear error."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from lightning_fedprune.validation import check_choice, check_str, fail

__all__ = ["Names", "lookup", "new_entry_name"]


def new_entry_name(registry: Mapping[str, Any], entry: Any, kind: type, arg: str, what: str) -> str:
    """The name ``entry`` is to be registered under, checked: ``entry`` is a ``kind`` instance, its ``name`` a
    non-empty string not yet in ``registry`` (errors name ``arg``; ``what`` is e.g. ``"a pattern"``)."""
    if not isinstance(entry, kind):
        fail(arg, f"{'an' if kind.__name__[0] in 'AEIOU' else 'a'} {kind.__name__} instance", entry)
    name = check_str(getattr(entry, "name", None), f"{arg}.name")
    if name in registry:
        raise ValueError(f"{what} named {name!r} is already registered ({registry[name]!r})")
    return name


def lookup(registry: Mapping[str, Any], name: Any, arg: str, choices: Sequence[str] | Mapping[str, Any]) -> Any:
    """The entry of ``registry`` called ``name``, or a ValueError naming ``arg`` and the ``choices``."""
    entry = registry.get(name) if isinstance(name, str) else None
    if entry is None:
        check_choice(name, arg, choices)
    return entry


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
