"""Per-layer sparsity allocation: uniform, or adaptive to layer importance.

Adaptive sparsity (METHOD.md, "Adaptive sparsity") gives less important ("ambient") layers more
sparsity and important ("critical") layers less, while the parameter-weighted mean sparsity
stays at the global target ``S`` and no layer exceeds ``max_layer_sparsity``.

The mapping (the method leaves it open; this is the choice of lightning-fedprune)::

    w_l = (I_l / geomean(I)) ** (-temperature)          # relative "prunability" of layer l
    s_l = min(max_layer_sparsity, c * w_l)              # one global scale c >= 0
    c  such that  sum_l s_l * n_l / sum_l n_l == S      # water-filling, solved exactly

``n_l`` is the number of prunable parameters of layer ``l``. Sparsity is proportional to
``I_l ** -temperature`` until it hits the cap; the capped layers' excess is redistributed to the
others through ``c``. ``temperature = 0`` (or equal importances) gives uniform sparsity, larger
temperatures spread the layers further apart. The fractions are *before* rounding to whole
pattern groups, so the realised sparsity can differ by up to one group per layer.

A second mapping, :func:`global_allocation`, ranks the *groups* of all layers together ("less
important layers get more sparsity" taken literally, as global magnitude pruning does): every group
score is put on a per-entry scale (the mean for ``l1``, the root mean square for ``l2``, times
``sqrt(fan_in)`` with ``normalize="fan_in"``), the lowest-scoring groups of the whole model are
pruned until ``S`` of the parameters are, and a layer stops giving up groups at the cap. A layer's
sparsity is then whatever share of its groups fell below the global threshold: it spreads layers
as far as their scores differ.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, get_args

import torch
from torch import Tensor

from lightning_fedprune.pruning.names import Names, lookup, new_entry_name
from lightning_fedprune.validation import check_choice, check_float, check_int, fail

from .patterns import NORMS, shape_2d

__all__ = ["ALLOCATIONS", "ALLOCATION_METHODS", "NORMALIZATIONS", "AllocationMethod", "AllocationName", "Layer",
           "adaptive_allocation", "get_allocation", "global_allocation", "layer_importance", "register_allocation",
           "uniform_allocation"]

NormalizationName = Literal["fan_in", "none"]
NORMALIZATIONS: tuple[str, ...] = get_args(NormalizationName)
#: adaptive allocation methods: the power law of layer importance, or a global ranking of groups
#: The built-in adaptive allocation methods (a typed choice; registered methods extend :data:`ALLOCATIONS`).
AllocationName = Literal["power", "global"]

# Non-positive importances are clamped to this fraction of the largest importance.
_REL_EPS = 1e-12
# Lower bound on log(w_l / max w) so that extreme temperatures cannot underflow w_l to 0.
_MIN_LOG_W = -700.0


def _check_target(target: float) -> float:
    return check_float(target, "target", min=0, max=1, max_open=True)


def _check_sizes(sizes: Mapping[str, int]) -> dict[str, int]:
    if not isinstance(sizes, Mapping):
        fail("sizes", "a mapping name -> parameter count", sizes)
    return {name: check_int(n, f"sizes[{name!r}]", min=1) for name, n in sizes.items()}


def uniform_allocation(sizes: Mapping[str, int], target: float) -> dict[str, float]:
    """Every layer gets the global ``target`` sparsity.

    Args:
        sizes: layer name -> number of prunable parameters (positive).
        target: global sparsity in ``[0, 1)``.

    Example:
        >>> from lightning_fedprune.pruning import uniform_allocation
        >>> uniform_allocation({"a": 100, "b": 300}, 0.5)
        {'a': 0.5, 'b': 0.5}
    """
    target = _check_target(target)
    return {name: target for name in _check_sizes(sizes)}


def adaptive_allocation(
    importance: Mapping[str, float],
    sizes: Mapping[str, int],
    target: float,
    max_layer_sparsity: float = 0.9,
    temperature: float = 1.0,
) -> dict[str, float]:
    """Per-layer sparsity from layer importance (see the module docstring for the mapping).

    Guarantees: every ``s_l`` is in ``[0, max_layer_sparsity]``; the parameter-weighted mean
    ``sum(s_l * n_l) / sum(n_l)`` equals ``target`` (to float precision); ``s_l`` is
    non-increasing in ``I_l``; equal importances give exactly ``target`` everywhere.
    Non-positive importances are clamped to ``1e-12 *`` the largest importance (they count as
    the least important layers); if none is positive, the allocation is uniform.

    Args:
        importance: layer name -> importance (e.g. from :func:`layer_importance`); same keys as
            ``sizes``.
        sizes: layer name -> number of prunable parameters (positive).
        target: global sparsity ``S`` in ``[0, 1)``.
        max_layer_sparsity: per-layer cap in ``[0, 1]``; must be ``>= target``.
        temperature: ``>= 0``; 0 = uniform, larger = more spread between layers.

    Returns:
        layer name -> sparsity, in the order of ``sizes``.

    Example:
        >>> from lightning_fedprune.pruning import adaptive_allocation
        >>> s = adaptive_allocation({"a": 1.0, "b": 3.0}, {"a": 100, "b": 100}, 0.5)
        >>> {k: round(v, 4) for k, v in s.items()}
        {'a': 0.75, 'b': 0.25}
        >>> s = adaptive_allocation(
        ...     {"a": 1.0, "b": 9.0}, {"a": 100, "b": 100}, 0.5, max_layer_sparsity=0.8
        ... )
        >>> {k: round(v, 4) for k, v in s.items()}
        {'a': 0.8, 'b': 0.2}
    """
    target = _check_target(target)
    sizes = _check_sizes(sizes)
    if not isinstance(importance, Mapping):
        fail("importance", "a mapping name -> float", importance)
    if set(importance) != set(sizes):
        missing = sorted(set(sizes) - set(importance))
        extra = sorted(set(importance) - set(sizes))
        raise ValueError(
            "`importance` and `sizes` must have the same keys; missing in `importance`: "
            f"{missing}, not in `sizes`: {extra}"
        )
    cap = check_float(max_layer_sparsity, "max_layer_sparsity", min=0, max=1)
    if target > cap:
        raise ValueError(
            f"`target` ({target}) is larger than `max_layer_sparsity` ({cap}): no allocation can "
            "reach it without exceeding the per-layer cap"
        )
    temperature = check_float(temperature, "temperature", min=0)
    names = list(sizes)
    imp = []
    for name in names:
        value = importance[name]
        if isinstance(value, Tensor) and value.numel() == 1:
            value = value.item()
        imp.append(check_float(value, f"importance[{name!r}]"))
    if not names:
        return {}
    top = max(imp)
    if target == 0.0 or top <= 0.0 or temperature == 0.0:
        return {name: target for name in names}
    log_i = [math.log(max(v, _REL_EPS * top)) for v in imp]
    mean_log = sum(log_i) / len(log_i)
    log_w = [-temperature * (v - mean_log) for v in log_i]  # log of (I / geomean)^-T
    if max(log_w) - min(log_w) == 0.0:
        return {name: target for name in names}
    shift = max(log_w)  # only the ratios matter: c absorbs the scale
    w = [math.exp(max(v - shift, _MIN_LOG_W)) for v in log_w]
    n = [float(sizes[name]) for name in names]
    total = sum(n)

    # Exact water-filling: with layers sorted by decreasing w, the first j layers are capped.
    # The smallest j whose solution leaves layer j under the cap is the solution.
    order = sorted(range(len(names)), key=lambda i: -w[i])
    tail_wn = [0.0] * (len(order) + 1)
    for pos in range(len(order) - 1, -1, -1):
        i = order[pos]
        tail_wn[pos] = tail_wn[pos + 1] + w[i] * n[i]
    capped_n = 0.0
    scale = None
    for pos, i in enumerate(order):
        c = (target * total - cap * capped_n) / tail_wn[pos]
        if c * w[i] <= cap * (1.0 + 1e-12):
            scale = c
            break
        capped_n += n[i]
    if scale is None:  # target == cap: every layer at the cap
        return {name: cap for name in names}
    return {name: min(cap, max(0.0, scale * w[i])) for i, name in enumerate(names)}


def layer_importance(
    scores: Tensor, shape: Sequence[int] | torch.Size | None = None, normalize: str = "fan_in"
) -> float:
    """Mean elementwise importance of a layer, made comparable across layers.

    ``normalize="none"`` is the plain mean of ``|scores|``. ``normalize="fan_in"`` (default)
    multiplies it by ``sqrt(C)``, where ``C`` is the number of columns of the 2-D view of
    ``shape`` (the fan-in of a Linear / convolution weight): standard initialisations scale
    weights by ``1 / sqrt(fan_in)``, so this removes the initialisation scale and a freshly
    initialised model has about equal importance in every layer. Computed in float64.

    Args:
        scores: elementwise importance (e.g. the weight, or ``|w * g|``).
        shape: shape of the parameter; defaults to ``scores.shape``; ``scores`` must have as
            many entries.
        normalize: ``"fan_in"`` or ``"none"``.

    Example:
        >>> import torch
        >>> from lightning_fedprune.pruning import layer_importance
        >>> w = torch.full((3, 4), -0.5)
        >>> layer_importance(w, normalize="none"), layer_importance(w)
        (0.5, 1.0)
    """
    if not isinstance(scores, Tensor):
        fail("scores", "a torch.Tensor", scores)
    check_choice(normalize, "normalize", NORMALIZATIONS)
    if shape is None:
        shape = scores.shape
    rows, cols = shape_2d(shape, "scores")
    if rows * cols != scores.numel() or rows * cols == 0:
        raise ValueError(
            f"`scores` has {scores.numel()} entries, which does not match `shape` {tuple(shape)} "
            "(or is empty)"
        )
    if scores.is_complex():
        raise ValueError("`scores` must be real")
    mean = float(scores.detach().abs().to(torch.float64).mean())
    if not math.isfinite(mean):
        raise ValueError("`scores` contains NaN or infinite values")
    if normalize == "fan_in":
        mean *= math.sqrt(cols)
    return mean


def global_allocation(
    scores: Mapping[str, Tensor],
    shapes: Mapping[str, Sequence[int]],
    target: float,
    max_layer_sparsity: float = 0.9,
    norm: str = "l2",
    normalize: str = "fan_in",
) -> dict[str, float]:
    """Per-layer sparsity from one ranking of the groups of every layer (see the module docstring).

    Layer ``l`` has ``n_l = len(scores[l])`` groups of ``g_l = numel(shapes[l]) / n_l`` entries; a
    group's score ``x`` (its ``norm`` over the group) is compared across layers as ``x / g_l`` (``l1``)
    or ``x / sqrt(g_l)`` (``l2``), times ``sqrt(fan_in)`` with ``normalize="fan_in"``. Groups are
    pruned in ascending order of that score (ties: earlier layer, then lower index) until the pruned
    entries are closest to ``target`` times all entries; a layer at ``floor(max_layer_sparsity * n_l)``
    pruned groups gives up no more, and the others make up the difference. Returns ``k_l / n_l`` for
    ``k_l`` pruned groups of layer ``l``, so :func:`~lightning_fedprune.pruning.patterns.mask_from_scores`
    at that sparsity prunes exactly those groups (the per-layer order is the same).

    Args:
        scores: layer name -> 1-D group scores (non-negative, no NaN), e.g. from ``group_scores``.
        shapes: layer name -> the parameter's shape (same keys as ``scores``).
        target: overall sparsity ``S`` in ``[0, 1)`` (fraction of the entries of all layers).
        max_layer_sparsity: per-layer cap in ``[0, 1]``; must be ``>= target``.
        norm: ``"l1"`` or ``"l2"``: the group norm the scores are.
        normalize: ``"fan_in"`` or ``"none"``.

    Example:
        >>> import torch
        >>> from lightning_fedprune.pruning import global_allocation
        >>> scores = {"a": torch.tensor([1., 2., 3., 4.]), "b": torch.tensor([10., 20., 30., 40.])}
        >>> global_allocation(scores, {"a": (4, 4), "b": (4, 4)}, 0.5, max_layer_sparsity=1.0, normalize="none")
        {'a': 1.0, 'b': 0.0}
        >>> global_allocation(scores, {"a": (4, 4), "b": (4, 4)}, 0.5, normalize="none")  # cap 0.9: 3 of 4 groups
        {'a': 0.75, 'b': 0.25}
    """
    target = _check_target(target)
    cap = check_float(max_layer_sparsity, "max_layer_sparsity", min=0, max=1)
    if target > cap:
        raise ValueError(f"`target` ({target}) is larger than `max_layer_sparsity` ({cap}): no allocation can reach it "
                         "without exceeding the per-layer cap")
    check_choice(norm, "norm", NORMS)
    check_choice(normalize, "normalize", NORMALIZATIONS)
    if not isinstance(scores, Mapping) or not isinstance(shapes, Mapping) or set(scores) != set(shapes):
        raise ValueError("`scores` and `shapes` must be mappings with the same keys (layer names)")
    names = list(scores)
    if not names:
        return {}
    comparable, group_entries, cap_groups = [], [], []
    for name in names:
        s = scores[name]
        if not isinstance(s, Tensor) or s.dim() != 1 or s.numel() == 0:
            fail(f"scores[{name!r}]", "a non-empty 1-D tensor", s)
        rows, cols = shape_2d(shapes[name], f"shapes[{name!r}]")
        if (rows * cols) % s.numel():
            raise ValueError(f"`scores[{name!r}]` has {s.numel()} groups, which do not divide the {rows * cols} "
                             f"entries of shape {tuple(shapes[name])}")
        size = rows * cols // s.numel()
        scale = (1.0 / size if norm == "l1" else 1.0 / math.sqrt(size)) * (math.sqrt(cols) if normalize == "fan_in" else 1.0)
        comparable.append(s.detach().to(torch.float64) * scale)
        group_entries.append(size)
        cap_groups.append(math.floor(cap * s.numel() + 1e-9))
    counts = _rank_globally(comparable, group_entries, cap_groups, target)
    return {name: k / comparable[i].numel() for i, (name, k) in enumerate(zip(names, counts))}


def _rank_globally(scores: list[Tensor], entries: list[int], caps: list[int], target: float) -> list[int]:
    """Pruned groups per layer: the globally lowest scores until ``target`` of the entries are pruned
    (nearest), a layer never past its cap. Layers that would pass it are fixed at the cap and the rest
    re-ranked with the remaining budget, until none passes (at most one round per layer)."""
    total = sum(e * s.numel() for e, s in zip(entries, scores))
    fixed: dict[int, int] = {}
    while True:
        free = [i for i in range(len(scores)) if i not in fixed]
        budget = target * total - sum(fixed[i] * entries[i] for i in fixed)
        counts = dict(fixed)
        if free and budget > 0:
            layer = torch.cat([torch.full((scores[i].numel(),), pos, dtype=torch.int64) for pos, i in enumerate(free)])
            values = torch.cat([scores[i] for i in free])
            # ascending score; ties: earlier layer, then lower index (stable sort over the layer-ordered concat)
            order = torch.sort(values, stable=True).indices
            sizes = torch.tensor([entries[i] for i in free], dtype=torch.float64)[layer[order]]
            cum = torch.cumsum(sizes, 0)
            n = int(torch.searchsorted(cum, torch.tensor(budget, dtype=torch.float64)))  # first cum >= budget
            before = float(cum[n - 1]) if n > 0 else 0.0
            if n < cum.numel() and float(cum[n]) - budget <= budget - before:
                n += 1  # including group n comes (at least as) close to the budget as stopping before it
            per_layer = torch.bincount(layer[order[:n]], minlength=len(free)).tolist()
            counts.update({i: per_layer[pos] for pos, i in enumerate(free)})
        else:
            counts.update({i: 0 for i in free})
        over = [i for i in free if counts[i] > caps[i]]
        if not over:
            return [counts[i] for i in range(len(scores))]
        fixed.update({i: caps[i] for i in over})


# ------------------------------------------------------------------ allocation methods (a registry)
@dataclass(frozen=True)
class Layer:
    """What an allocation method knows of one prunable tensor when the masks are recomputed."""

    shape: tuple[int, ...]
    scores: Tensor  # per-group scores of the importance (the pattern's group order)
    source: Tensor  # the elementwise importance the scores are norms of
    norm: str  # the group norm of the scores ("l1" or "l2")

    @property
    def size(self) -> int:
        return math.prod(self.shape)


class AllocationMethod(ABC):
    """How an overall sparsity ``S`` is split across layers (``AdaptiveLayerSparsity(method=name)``).

    :meth:`allocate` returns ``{layer: sparsity}`` whose parameter-weighted mean is ``S`` (before rounding to
    whole groups) and none above ``settings.max_layer_sparsity``. A new method is one subclass and one
    :func:`register_allocation` call (worked example in ``docs/design.md``).
    """

    name: ClassVar[str]

    @abstractmethod
    def allocate(self, layers: Mapping[str, Layer], target: float, settings: Any) -> dict[str, float]:
        """Per-layer sparsity. ``settings`` is the plan's
        :class:`~lightning_fedprune.pruning.plan.Allocation` (``max_layer_sparsity``, ``temperature``,
        ``normalize``, ``method``)."""

    def __repr__(self) -> str:
        return f"<allocation {self.name!r}>"


class PowerAllocation(AllocationMethod):
    """:func:`adaptive_allocation` of the layers' mean importance (:func:`layer_importance`)."""

    name = "power"

    def allocate(self, layers: Mapping[str, Layer], target: float, settings: Any) -> dict[str, float]:
        imp = {n: layer_importance(layer.source, layer.shape, normalize=settings.normalize) for n, layer in layers.items()}
        return adaptive_allocation(imp, {n: layer.size for n, layer in layers.items()}, target,
                                   max_layer_sparsity=settings.max_layer_sparsity, temperature=settings.temperature)


class GlobalAllocation(AllocationMethod):
    """:func:`global_allocation`: the groups of every layer ranked together on a per-entry scale."""

    name = "global"

    def allocate(self, layers: Mapping[str, Layer], target: float, settings: Any) -> dict[str, float]:
        norms = {layer.norm for layer in layers.values()}
        return global_allocation({n: layer.scores for n, layer in layers.items()},
                                 {n: layer.shape for n, layer in layers.items()}, target,
                                 max_layer_sparsity=settings.max_layer_sparsity, norm=norms.pop() if norms else "l2",
                                 normalize=settings.normalize)


#: name -> allocation method, in registration order.
ALLOCATION_METHODS: dict[str, AllocationMethod] = {}
#: The registered method names (live).
ALLOCATIONS: Sequence[str] = Names(ALLOCATION_METHODS)


def register_allocation(method: AllocationMethod) -> AllocationMethod:
    """Add ``method`` to :data:`ALLOCATION_METHODS` under its ``name`` (then ``method=name`` is accepted)."""
    name = new_entry_name(ALLOCATION_METHODS, method, AllocationMethod, "method", "an allocation method")
    ALLOCATION_METHODS[name] = method
    return method


def get_allocation(name: str, arg: str = "method") -> AllocationMethod:
    """The registered :class:`AllocationMethod` called ``name`` (a clear error naming ``arg`` otherwise)."""
    return lookup(ALLOCATION_METHODS, name, arg, ALLOCATIONS)


register_allocation(PowerAllocation())
register_allocation(GlobalAllocation())
