"""Argument checks shared by every public constructor: the one place for type and range checks.

Every check takes the value and the argument's name, returns the value normalised (``int``,
``float``, a compiled regex, a :class:`~pathlib.Path`) and raises :class:`ValueError` with a message
that names the argument and shows the bad value::

    `server_lr` must be a finite number > 0, got inf.
    `shuffle` must be a bool (True or False), got 'no' (a str).

Why one module: a YAML typo (``shuffle: "no"``, ``server_lr: .inf``) must fail where it is
written, at construction, with the argument's name — not rounds later as a NaN or a bare
``TypeError`` from deep inside torch. The checks are strict on purpose: booleans must be real
``bool`` (the string ``"no"`` is truthy), integers are not booleans, numbers are finite unless
infinity has a meaning, regular expressions are compiled once at construction.

``ValueError`` is raised for wrong types too (not ``TypeError``), as the constructors always did, so
``except ValueError`` catches every configuration error.
"""

from __future__ import annotations

import math
import numbers
import os
import re
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any, NoReturn

__all__ = [
    "check_bool",
    "check_callable",
    "check_choice",
    "check_each",
    "check_float",
    "check_int",
    "check_path",
    "check_regex",
    "check_str",
    "fail",
]


def _show(value: Any) -> str:
    """``repr`` of the bad value, with its type when the type is what is wrong (``'1.0' (a str)``)."""
    text = repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    if isinstance(value, (str, bool, bytes)) or not isinstance(value, (int, float, type(None))):
        text += f" (a {type(value).__name__})"
    return text


def fail(name: str, expected: str, value: Any) -> NoReturn:
    """Raise the standard message: ```name` must be <expected>, got <value>.``"""
    raise ValueError(f"`{name}` must be {expected}, got {_show(value)}.")


def _or_none(expected: str, optional: bool) -> str:
    return f"{expected} or None" if optional else expected


def check_bool(value: Any, name: str) -> bool:
    """A real ``bool``: ``"no"``, ``0`` and ``None`` are rejected instead of being read as truth values.

    >>> check_bool(True, "shuffle")
    True
    >>> check_bool("no", "shuffle")
    Traceback (most recent call last):
    ...
    ValueError: `shuffle` must be a bool (True or False), got 'no' (a str).
    """
    if not isinstance(value, bool):
        fail(name, "a bool (True or False)", value)
    return value


def _bounds_text(kind: str, min: float | None, max: float | None, min_open: bool, max_open: bool) -> str:
    if min is not None and max is not None:
        return f"{kind} in {'(' if min_open else '['}{min:g}, {max:g}{')' if max_open else ']'}"
    if min is not None:
        if kind == "an integer" and min == 1 and not min_open:
            return "a positive integer"
        return f"{kind} {'>' if min_open else '>='} {min:g}"
    if max is not None:
        return f"{kind} {'<' if max_open else '<='} {max:g}"
    return kind


def _in_bounds(v: float, min: float | None, max: float | None, min_open: bool, max_open: bool) -> bool:
    if min is not None and (v <= min if min_open else v < min):
        return False
    if max is not None and (v >= max if max_open else v > max):
        return False
    return True


def check_int(value: Any, name: str, *, min: int | None = None, max: int | None = None,
              optional: bool = False) -> int | None:
    """An integer (not a ``bool``, not a float such as ``2.0``) in ``[min, max]``; ``None`` if ``optional``.

    >>> check_int(3, "batch_size", min=1)
    3
    >>> check_int(0, "batch_size", min=1)
    Traceback (most recent call last):
    ...
    ValueError: `batch_size` must be a positive integer, got 0.
    """
    if value is None and optional:
        return None
    expected = _or_none(_bounds_text("an integer", min, max, False, False), optional)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        fail(name, expected, value)
    if not _in_bounds(int(value), min, max, False, False):
        fail(name, expected, value)
    return int(value)


def check_float(value: Any, name: str, *, min: float | None = None, max: float | None = None,
                min_open: bool = False, max_open: bool = False, finite: bool = True,
                optional: bool = False) -> float | None:
    """A real number (ints accepted, ``bool`` and strings not) in the given range; NaN is always rejected,
    infinity unless ``finite=False``. ``min_open``/``max_open`` exclude the bound itself.

    >>> check_float(0.5, "alpha", min=0, min_open=True)
    0.5
    >>> check_float(float("inf"), "server_lr", min=0, min_open=True)
    Traceback (most recent call last):
    ...
    ValueError: `server_lr` must be a finite number > 0, got inf.
    >>> check_float(1.0, "momentum", min=0, max=1, max_open=True)
    Traceback (most recent call last):
    ...
    ValueError: `momentum` must be a number in [0, 1), got 1.0.
    """
    if value is None and optional:
        return None
    bounded = min is not None and max is not None  # a finite interval says "finite" by itself
    kind = "a finite number" if finite and not bounded else "a number"
    expected = _or_none(_bounds_text(kind, min, max, min_open, max_open), optional)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        fail(name, expected, value)
    v = float(value)
    if math.isnan(v) or (finite and math.isinf(v)) or not _in_bounds(v, min, max, min_open, max_open):
        fail(name, expected, value)
    return v


def check_choice(value: Any, name: str, choices: Collection[Any], *, optional: bool = False) -> Any:
    """One of ``choices`` (compared with ``==``; an unhashable value is simply not a choice).

    >>> check_choice("adam", "server_optimizer", ("sgd", "adam"))
    'adam'
    >>> check_choice("rmsprop", "server_optimizer", ("sgd", "adam"))
    Traceback (most recent call last):
    ...
    ValueError: `server_optimizer` must be one of ('sgd', 'adam'), got 'rmsprop'.
    """
    if value is None and optional:
        return None
    try:
        ok = not isinstance(value, bool) and value in tuple(choices)
    except (TypeError, ValueError):  # e.g. an array compared element-wise
        ok = False
    if not ok:
        raise ValueError(f"`{name}` must be one of {_or_none(repr(tuple(choices)), optional)}, got {value!r}.")
    return value


def check_str(value: Any, name: str, *, optional: bool = False, empty: bool = False) -> str | None:
    """A string (non-empty unless ``empty``)."""
    if value is None and optional:
        return None
    if not isinstance(value, str) or (not empty and not value):
        fail(name, _or_none("a non-empty string" if not empty else "a string", optional), value)
    return value


def check_callable(value: Any, name: str, *, optional: bool = True, or_str: bool = False) -> Any:
    """A callable (or, with ``or_str``, a non-empty field name string); ``None`` if ``optional``."""
    if value is None and optional:
        return None
    if callable(value) or (or_str and isinstance(value, str) and value):
        return value
    fail(name, _or_none("a callable or a field name (str)" if or_str else "a callable", optional), value)


def check_regex(value: Any, name: str, *, optional: bool = True) -> re.Pattern[str] | None:
    """A regular expression string, compiled here (so a typo fails at construction, not at setup).

    >>> check_regex(r"encoder\\..*\\.weight", "parameters").pattern
    'encoder\\\\..*\\\\.weight'
    >>> check_regex("(", "parameters")
    Traceback (most recent call last):
    ...
    ValueError: `parameters` is not a valid regular expression ('('): missing ), unterminated subpattern at position 0
    """
    if value is None and optional:
        return None
    if not isinstance(value, str):
        fail(name, _or_none("a regular expression (str)", optional), value)
    try:
        return re.compile(value)
    except re.error as err:
        raise ValueError(f"`{name}` is not a valid regular expression ({value!r}): {err}") from err


def check_path(value: Any, name: str, *, kind: str = "file", optional: bool = True, must_exist: bool = False,
               parent_must_exist: bool = False) -> Path | None:
    """A filesystem path (``str`` or ``os.PathLike``), ``~`` expanded.

    ``kind="file"``: must not be an existing directory (a file will be written or read there);
    ``kind="dir"``: must not be an existing file. ``must_exist``: the path exists;
    ``parent_must_exist``: the folder that will hold it exists (nothing creates it later).
    """
    if kind not in ("file", "dir"):
        raise ValueError(f"check_path: `kind` must be 'file' or 'dir', got {kind!r}")
    if value is None and optional:
        return None
    if not isinstance(value, (str, os.PathLike)) or (isinstance(value, str) and not value):
        fail(name, _or_none("a path (str)", optional), value)
    path = Path(value).expanduser()
    if kind == "file" and path.is_dir():
        raise ValueError(f"`{name}` is an existing directory ({str(path)!r}); give the path of a file.")
    if kind == "dir" and path.exists() and not path.is_dir():
        raise ValueError(f"`{name}` is an existing file, not a directory: {str(path)!r}.")
    if must_exist and not path.exists():
        raise ValueError(f"`{name}` does not exist: {str(path)!r}.")
    if parent_must_exist:
        parent = path.resolve().parent
        if not parent.is_dir():
            raise ValueError(f"`{name}`'s folder does not exist: {str(parent)!r} (from {str(value)!r}).")
    return path


def check_each(values: Any, name: str, check: Callable[..., Any], *, length: int | None = None, **kwargs: Any) -> tuple:
    """A list/tuple whose every element passes ``check`` (named ``name[i]``), of ``length`` elements if given."""
    if isinstance(values, (str, bytes)) or not isinstance(values, (list, tuple)) \
            or (length is not None and len(values) != length):
        fail(name, f"a list of {length} values" if length is not None else "a list", values)
    return tuple(check(v, f"{name}[{i}]", **kwargs) for i, v in enumerate(values))
