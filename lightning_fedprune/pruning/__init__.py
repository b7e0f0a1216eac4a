"""Pure functional core of Federated Pruning: patterns, importance, schedules, allocation.

No state and no Lightning here; everything is a function of tensors and numbers.
"""

from .allocation import ALLOCATIONS, NORMALIZATIONS, adaptive_allocation, global_allocation, layer_importance, uniform_allocation
from .importance import IMPORTANCE, SOURCES, group_scores, importance_source, parse_importance
from .patterns import (
    NORMS,
    PATTERNS,
    STRUCTURED_PATTERNS,
    Pattern,
    check_pattern,
    compute_mask,
    expand_groups,
    get_pattern,
    group_reduce,
    group_size,
    groups_from_mask,
    mask_from_scores,
    num_groups,
    num_to_prune,
    register,
    to_2d,
)
from .schedules import SCHEDULES, sparsity_at, validate_schedule

__all__ = [
    "ALLOCATIONS",
    "IMPORTANCE",
    "NORMALIZATIONS",
    "NORMS",
    "PATTERNS",
    "SCHEDULES",
    "SOURCES",
    "STRUCTURED_PATTERNS",
    "Pattern",
    "adaptive_allocation",
    "check_pattern",
    "compute_mask",
    "expand_groups",
    "get_pattern",
    "global_allocation",
    "group_reduce",
    "group_scores",
    "group_size",
    "groups_from_mask",
    "importance_source",
    "layer_importance",
    "mask_from_scores",
    "num_groups",
    "num_to_prune",
    "parse_importance",
    "register",
    "sparsity_at",
    "to_2d",
    "uniform_allocation",
    "validate_schedule",
]
