"""Top-k selection of groups: which ``round(sparsity * n)`` groups of a score vector are pruned.

Exact (a k-th value selection with a stable index tie-break, no full sort) and validated once, at the
public functions; the pruning state calls them once per recomputation.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightning_fedprune.validation import check_float, fail

__all__ = ["mask_from_scores", "num_to_prune"]

# Below this many scores the exact selection runs directly on all of them.
_DIRECT_SELECT = 1 << 16
# Size of the strided sample used to bracket the k-th smallest score of a large vector.
_SAMPLE = 1 << 14


def num_to_prune(sparsity: float, n: int) -> int:
    """Number of groups pruned at ``sparsity`` out of ``n``: ``round(sparsity * n)``.

    Python's ``round`` (half to even), exactly as ``torch.nn.utils.prune`` does.

    Example:
        >>> from lightning_fedprune.pruning import num_to_prune
        >>> num_to_prune(0.3, 10), num_to_prune(0.25, 10), num_to_prune(0.35, 10)
        (3, 2, 4)
    """
    return round(check_float(sparsity, "sparsity", min=0, max=1) * int(n))


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
        fail("group_scores", "a torch.Tensor", group_scores)
    if group_scores.dim() != 1:
        raise ValueError(f"`group_scores` must be 1-D, got shape {tuple(group_scores.shape)}")
    if group_scores.dtype == torch.bool or group_scores.is_complex():
        raise ValueError(f"`group_scores` must be real numbers, got dtype {group_scores.dtype}")
    check_float(sparsity, "sparsity", min=0, max=1)
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


