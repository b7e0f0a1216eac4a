"""A task's pruning structure: named groups of parameters and the links between dependent layers.

A task may describe itself with two optional methods (the Conformer-Transducer has both):

* ``pruning_groups() -> dict[str, list[str]]``: named groups of parameter names, so a YAML selects
  what to prune by meaning (``SparsityRampCallback(groups=["ffn", "attention"])``) instead of a regex;
* ``pruning_links() -> list[Link]``: which layers feed which, feature by feature.

**Dependent masks.** A :class:`Link` says that feature ``j`` is made by row ``j`` of every producer
(the output ``j`` of a Linear: its weight row and its bias entry) and read by column ``j`` of every
consumer (the input feature ``j`` of the next Linear), with only element-wise operations in between
(an activation, a dropout, the per-feature mixing of attention). When the pruned (primary) masks of the
link's consumers remove column ``j`` from every one of them that has a mask, feature ``j`` is
*removed*: every producer loses row ``j`` and every consumer column ``j``
(:func:`derive_masks`). That is exact, not an approximation: with its weight row and bias entry pruned,
the feature is an exact zero (``act(0) = 0`` for SiLU, ReLU, tanh; an LSTM unit with all four gate rows and
biases pruned keeps ``c = h = 0``), so whatever reads it gets nothing from it. Without the dependent
masks the dead rows would still be trained (weight decay moves them), sent and stored; with them the
masked-dense client, the compact client and the wire agree: the compact client builds the smaller layers
``Linear(d, k) -> act -> Linear(k, d)`` and the wire sends neither the dead rows nor the dead bias entries.

A tensor's final mask is its own pruned mask (if it is selected) AND the rows / columns its links
remove. Its wire pattern (:func:`wire_pattern`) is its own pattern when that still describes the mask,
else ``row`` or ``column`` when one does, else ``unstructured`` (a mask that removes whole rows *and* whole
columns, e.g. an LSTM's recurrent matrix, whose hidden units are both its rows and its columns: the
kept values plus a one-bit-per-entry index).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_fedprune.pruning.patterns import get_pattern, to_2d
from lightning_fedprune.validation import check_int, check_str, fail

__all__ = ["Link", "Structure", "derive_masks", "removed_features", "structure_of", "wire_pattern"]


@dataclass(frozen=True)
class Link:
    """Features that flow one-to-one from ``producers`` to ``consumers``.

    Args:
        producers: parameter names whose dim-0 index ``j`` (a weight row, a bias entry) makes feature ``j``;
            with ``gates = g`` the rows ``j, n + j, ..., (g - 1) n + j`` do (an LSTM's four gate blocks).
        consumers: weight names whose dim-1 index ``j`` (an input column; for a convolution an input
            channel) reads feature ``j``. Every reader of the features must be listed: a removed feature is
            an exact zero, which is only harmless for readers whose column is removed with it.
        gates: gate blocks per feature in the producers' rows (1; 4 for an LSTM).
        between: names of modules the features pass through between producers and consumers that must
            know when the features arrive compact on a client: a module with ``compact_features(index, width)
            -> nn.Module`` (its replacement for inputs holding only the features ``index`` of ``width``; e.g. an
            attention core, which must know each kept value feature's head), or an ``nn.Dropout`` whose random
            numbers should be those of the masked-dense client (it then draws its mask at full width and uses
            the kept part: compact and masked-dense clients train the very same numbers, at the price of the
            full-width draws). Parameter-free element-wise activations need not be listed, nor a dropout that
            may draw at the compact width (the same distribution, other random numbers).
    """

    producers: tuple[str, ...]
    consumers: tuple[str, ...]
    gates: int = 1
    between: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for what in ("producers", "consumers", "between"):
            value = getattr(self, what)
            if isinstance(value, str) or not isinstance(value, Iterable):
                fail(f"Link.{what}", "a sequence of names", value)
            value = tuple(check_str(v, f"Link.{what}[{i}]") for i, v in enumerate(value))
            object.__setattr__(self, what, value)
        if not self.producers or not self.consumers:
            raise ValueError(f"a Link needs at least one producer and one consumer, got {self}")
        object.__setattr__(self, "gates", check_int(self.gates, "Link.gates", min=1))

    def check(self, shapes: Mapping[str, Sequence[int]], who: str = "pruning_links()") -> int:
        """The number of features ``n``; raises naming the link if a name is unknown or a shape disagrees."""
        for name in (*self.producers, *self.consumers):
            if name not in shapes:
                raise ValueError(f"{who}: {name!r} is not a parameter of the task (in {self}).")
        widths = {c: (tuple(shapes[c])[1] if len(shapes[c]) >= 2 else None) for c in self.consumers}
        if any(w is None for w in widths.values()) or len(set(widths.values())) != 1:
            raise ValueError(f"{who}: the consumers of a link must be weights with the same number of input "
                             f"features (dim 1), got {widths} (in {self}).")
        n = next(iter(widths.values()))
        for p in self.producers:
            if tuple(shapes[p])[0] != self.gates * n:
                raise ValueError(f"{who}: producer {p!r} has {tuple(shapes[p])[0]} rows; a link of {n} features "
                                 f"with {self.gates} gate block(s) needs {self.gates * n} (in {self}).")
        return n


@dataclass(frozen=True)
class Structure:
    """A task's named groups (name -> parameter names, in the task's order) and links."""

    groups: tuple[tuple[str, tuple[str, ...]], ...] = ()
    links: tuple[Link, ...] = ()

    @property
    def group_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.groups)

    def members(self, group: str) -> tuple[str, ...]:
        return dict(self.groups)[group]

    def group_of(self) -> dict[str, str]:
        """Parameter name -> the group it belongs to: its own group, else the group of a link it depends on
        (the group of the link's first consumer that is in a group)."""
        owner = {n: g for g, names in self.groups for n in names}
        out = dict(owner)
        for link in self.links:
            group = next((owner[c] for c in link.consumers if c in owner), None)
            if group is not None:
                for name in (*link.producers, *link.consumers):
                    out.setdefault(name, group)
        return out


def structure_of(task: torch.nn.Module) -> Structure:
    """The task's :class:`Structure` from its optional ``pruning_groups()`` and ``pruning_links()`` methods,
    checked against its parameters (an unknown name or a link whose shapes disagree raises, naming it)."""
    shapes = {n: tuple(p.shape) for n, p in task.named_parameters()}
    groups: list[tuple[str, tuple[str, ...]]] = []
    get_groups = getattr(task, "pruning_groups", None)
    if callable(get_groups):
        table = get_groups()
        if not isinstance(table, Mapping):
            fail(f"{type(task).__name__}.pruning_groups()", "a dict of group name -> parameter names", table)
        for group, names in table.items():
            check_str(group, "a pruning group's name")
            names = tuple(names)
            unknown = [n for n in names if n not in shapes]
            if unknown:
                raise ValueError(f"{type(task).__name__}.pruning_groups(): group {group!r} names {unknown[:3]}, which "
                                 "are not parameters of the task.")
            order = {n: i for i, n in enumerate(shapes)}
            groups.append((group, tuple(sorted(set(names), key=order.__getitem__))))
    links: tuple[Link, ...] = ()
    get_links = getattr(task, "pruning_links", None)
    if callable(get_links):
        links = tuple(get_links())
        for link in links:
            if not isinstance(link, Link):
                fail(f"{type(task).__name__}.pruning_links()[i]", "a Link", link)
            link.check(shapes, f"{type(task).__name__}.pruning_links()")
    return Structure(tuple(groups), links)


# ---------------------------------------------------------------------------------------------- masks
def _input_view(mask: Tensor) -> Tensor:
    """``(out, in, rest)`` view of a weight mask: dim 1 is the input feature / channel."""
    return mask.reshape(mask.shape[0], mask.shape[1], -1)


def removed_features(link: Link, masks: Mapping[str, Tensor]) -> Tensor | None:
    """The features ``link`` removes (bool, True = removed): those whose column is fully pruned in every
    consumer that has a mask; ``None`` if no consumer has one."""
    removed = None
    for c in link.consumers:
        m = masks.get(c)
        if m is None:
            continue
        dead = ~_input_view(m).any(dim=2).any(dim=0)
        removed = dead if removed is None else removed & dead.to(removed.device)
    return removed


def derive_masks(primary: Mapping[str, Tensor], links: Sequence[Link],
                 shapes: Mapping[str, Sequence[int]]) -> dict[str, Tensor]:
    """The final masks: the ``primary`` (selected and scored) masks AND the rows and columns the ``links``
    remove (see the module docstring). Each link is read from the primary masks only, so the order of the
    links does not matter. Tensors no link touches keep their primary mask object.

    >>> w1, w2 = torch.ones(4, 3, dtype=torch.bool), torch.tensor([[1, 0, 1, 0]] * 3).bool()
    >>> out = derive_masks({"fc2.weight": w2}, [Link(("fc1.weight", "fc1.bias"), ("fc2.weight",))],
    ...                    {"fc1.weight": (4, 3), "fc1.bias": (4,), "fc2.weight": (3, 4)})
    >>> out["fc1.weight"].all(1).tolist(), out["fc1.bias"].tolist()
    ([True, False, True, False], [True, False, True, False])
    """
    out = dict(primary)
    for link in links:
        removed = removed_features(link, primary)
        if removed is None or not bool(removed.any()):
            continue
        keep = ~removed
        for c in link.consumers:
            shape = tuple(shapes[c])
            cols = keep.to(out[c].device if c in out else keep.device).reshape(1, -1, *([1] * (len(shape) - 2)))
            cols = cols.expand(shape)
            out[c] = cols.clone() if c not in out else out[c] & cols
        rows_keep = keep.repeat(link.gates)
        for p in link.producers:
            shape = tuple(shapes[p])
            rows = rows_keep.to(out[p].device if p in out else rows_keep.device)
            rows = rows.reshape(-1, *([1] * (len(shape) - 1))).expand(shape)
            out[p] = rows.clone() if p not in out else out[p] & rows
    return {n: m.contiguous() for n, m in out.items()}


def wire_pattern(mask: Tensor, own: str | None = None) -> str:
    """The pattern a final mask travels with: ``own`` (the tensor's selected pattern) if it still describes
    the mask, else ``row`` or ``column`` if one does, else ``unstructured``.

    >>> m = torch.tensor([[True, False], [False, False]])
    >>> wire_pattern(m, "column"), wire_pattern(m[:, :1].clone()), wire_pattern(m.T[:1].clone())
    ('unstructured', 'row', 'column')
    """
    m2d = to_2d(mask)
    for name in (own, "row", "column"):
        if name is not None and name != "unstructured":
            pattern = get_pattern(name)
            rows, cols = m2d.shape
            try:
                pattern.check(rows, cols, "mask")
            except ValueError:
                continue
            if pattern.flags(m2d) is not None:
                return name
    return "unstructured"
