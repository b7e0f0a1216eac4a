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
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from lightning_fedprune.validation import check_choice, check_float, check_int, fail

from .patterns import shape_2d

__all__ = ["NORMALIZATIONS", "adaptive_allocation", "layer_importance", "uniform_allocation"]

NORMALIZATIONS: tuple[str, ...] = ("fan_in", "none")

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
