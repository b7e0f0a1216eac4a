"""Export of a pruned model: a state_dict with exact zeros, plus a compact form for structured patterns."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_fedprune.pruning.patterns import STRUCTURED_PATTERNS, get_pattern, groups_from_mask, to_2d
from lightning_fedprune.validation import fail


def export_pruned(task: torch.nn.Module, masks: dict[str, Tensor], patterns: dict[str, str]) -> dict[str, Any]:
    """The pruned model in two forms.

    Returns a dict with:

    * ``state_dict``: the task's ``state_dict`` with pruned entries set to exact zeros (loads into
      the unmodified task class);
    * ``compact``: for every parameter pruned with a structured pattern, ``{"pattern", "shape",
      "blocks": [{"kept": LongTensor, "values": Tensor}, ...]}`` — the kept rows/columns (one block,
      or two for half patterns; see docs/concepts.md) and the dense kept sub-matrix, which is all a
      smaller layer needs;
    * ``masks``, ``patterns`` and ``sparsity`` (pruned fraction over the masked parameters).
    """
    if not isinstance(task, torch.nn.Module):
        fail("task", "a torch.nn.Module", task)
    state = {k: v.detach().clone() for k, v in task.state_dict().items()}
    for name, mask in masks.items():
        if name not in state:
            raise ValueError(f"`masks` has an entry for {name!r}, which is not in the task's state_dict.")
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.shape != state[name].shape:
            shown = f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, Tensor) else type(mask).__name__
            raise ValueError(f"`masks[{name!r}]` must be a bool tensor of shape {tuple(state[name].shape)}, got {shown}.")
    for name, pattern in patterns.items():
        get_pattern(pattern, f"patterns[{name!r}]")
    compact: dict[str, Any] = {}
    for name, mask in masks.items():
        state[name] = state[name].masked_fill(~mask, 0)
        pattern = patterns.get(name, "unstructured")
        if pattern in STRUCTURED_PATTERNS:
            blocks = get_pattern(pattern).split(to_2d(state[name]), groups_from_mask(mask, pattern, name))
            compact[name] = {
                "pattern": pattern,
                "shape": list(mask.shape),
                "blocks": [{"kept": kept, "values": values} for kept, values in blocks],
            }
    total = sum(m.numel() for m in masks.values())
    kept = sum(int(m.sum()) for m in masks.values())
    return {
        "state_dict": state,
        "compact": compact,
        "masks": {n: m.clone() for n, m in masks.items()},
        "patterns": dict(patterns),
        "sparsity": (1 - kept / total) if total else 0.0,
    }
