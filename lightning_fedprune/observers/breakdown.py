"""Where the pruning goes: bytes per pruning group, and how clients train every pruned layer.

:func:`pruning_breakdown` adds two entries to the run summary (:class:`~lightning_fedprune.observers.summary.RunSummary`):

* ``groups``: for every pruning group of the task (its ``pruning_groups()``; a dependent tensor counts in
  the group of the link it follows), the parameters, the pruned fraction and the bytes one client moves
  per round at the final masks, down + up, encoded exactly as the wire encodes them (the current
  ``payload_bits``), next to what dense float32 FedAvg moves for the same tensors. ``not pruned`` is the
  rest of the model;
* ``layers``: for every module with a masked parameter, how a client trains it: ``compact`` (and which
  compact layer) or ``masked-dense`` (and why) -- :func:`~lightning_fedprune.pruning.compact.plan_compaction`,
  the decision the clients make.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from lightning_fedprune.federated.wire import encode_state
from lightning_fedprune.pruning.compact import plan_compaction
from lightning_fedprune.pruning.structure import structure_of

__all__ = ["format_breakdown", "pruning_breakdown"]

NOT_PRUNED = "not pruned"


def pruning_breakdown(fed: Any) -> dict[str, Any]:
    """``{"groups": {...}, "layers": {...}}`` for the summary of ``fed`` (a FederatedLightningModule); empty
    without masks."""
    state, task = fed.pruning, fed.task
    if not state.masks:
        return {}
    structure = state.selection.structure or structure_of(task)
    group_of = structure.group_of()
    values = {n: p.detach() for n, p in fed.global_params().items()}
    values.update((n, b.detach()) for n, b in fed.global_buffers().items())
    bits = fed.client_config.payload_bits
    floats = [n for n, p in fed.global_params().items() if p.is_floating_point()] if bits is not None else []
    down = encode_state(values, state.masks, state.patterns, send_index=True, bits=bits, quantized=floats)
    up = encode_state(values, state.masks, state.patterns, send_index=False, bits=bits, quantized=floats)
    groups: dict[str, dict[str, float]] = {}
    for name, t in values.items():
        group = group_of.get(name, "other") if name in state.masks else NOT_PRUNED
        g = groups.setdefault(group, {"parameters": 0, "pruned": 0, "bytes": 0, "dense_bytes": 0})
        mask = state.masks.get(name)
        g["parameters"] += t.numel()
        g["pruned"] += 0 if mask is None else int(mask.numel() - mask.sum())
        g["bytes"] += down[name].nbytes + up[name].nbytes
        g["dense_bytes"] += 2 * t.numel() * t.element_size()
    order = [*structure.group_names, "other", NOT_PRUNED]
    groups = {k: groups[k] for k in order if k in groups}
    if fed.client_config.compact:
        decisions, _ = plan_compaction(task, state.masks, state.patterns)
    else:
        decisions = []
    kinds = Counter(d.kind for d in decisions if d.mode == "compact")
    dense = [{"module": d.module, "kind": d.kind, "reason": d.reason} for d in decisions if d.mode != "compact"]
    if not fed.client_config.compact:
        dense = [{"module": "*", "kind": "all", "reason": "compact_clients=False"}]
    layers = {"compact": dict(sorted(kinds.items())), "compact_layers": sum(kinds.values()), "masked_dense": dense,
              "decisions": [{"module": d.module, "kind": d.kind, "mode": d.mode, "shape": d.shape, "reason": d.reason}
                            for d in decisions]}
    total = sum(g["parameters"] for g in groups.values())
    removed = {"selected": state.sparsity(), "masked": state.masked_sparsity(),
               "all_parameters": sum(g["pruned"] for g in groups.values()) / total if total else 0.0}
    return {"groups": groups, "layers": layers, "removed": removed}


def format_breakdown(summary: dict[str, Any]) -> list[str]:
    """The summary's ``groups`` and ``layers`` as printed lines (none when absent)."""
    lines: list[str] = []
    removed = summary.get("removed")
    if removed:
        lines.append(f"  pruned              {100 * removed['selected']:.1f}% of the selected weights, "
                     f"{100 * removed['masked']:.1f}% of the masked tensors (with the rows and columns that follow), "
                     f"{100 * removed['all_parameters']:.1f}% of all parameters")
    groups = summary.get("groups")
    if groups:
        lines.append("  bytes by group      down+up per client and round (vs dense float32 FedAvg)")
        total = sum(g["parameters"] for g in groups.values())
        for name, g in groups.items():
            ratio = g["bytes"] / g["dense_bytes"] if g["dense_bytes"] else 0.0
            lines.append(f"    {name:<16} {g['bytes'] / 1e6:7.3f} MB of {g['dense_bytes'] / 1e6:7.3f} MB ({ratio:.3f}x)  "
                         f"{g['parameters'] / 1e6:.3f} M params ({100 * g['parameters'] / total:.1f}%), "
                         f"{100 * g['pruned'] / max(1, g['parameters']):.1f}% pruned")
    layers = summary.get("layers")
    if layers:
        kinds = ", ".join(f"{k} {n}" for k, n in layers["compact"].items()) or "none"
        lines.append(f"  client layers       {layers['compact_layers']} compact ({kinds}), "
                     f"{len(layers['masked_dense'])} masked-dense")
        for d in layers["masked_dense"]:
            lines.append(f"    masked-dense {d['module']} ({d['kind']}): {d['reason']}")
    return lines
