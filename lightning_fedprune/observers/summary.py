"""RunSummary: the end-of-run report (quality, sparsity, traffic) printed and written as JSON."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_only

from lightning_fedprune.observers.breakdown import format_breakdown, pruning_breakdown
from lightning_fedprune.validation import check_bool, check_path


class RunSummary(pl.Callback):
    """Collects per-round traffic and prints/writes a final summary at the end of fit.

    The summary holds: rounds, wall time, the final validation metrics (every ``val/*`` and
    ``test/*`` value in ``trainer.callback_metrics``), the overall sparsity and its target, and
    bytes per round (down + up) of the last round versus what plain dense FedAvg sends, with the
    saving in percent. It is written to ``path`` (default: ``<logger log_dir>/summary.json``, or
    ``./fedprune_summary.json`` without a logger) and to ``trainer.fed_summary``.

    Args:
        path: where to write the JSON (None = next to the logs).
        print_summary: print the summary table at the end of fit.
    """

    def __init__(self, path: str | None = None, print_summary: bool = True) -> None:
        check_path(path, "path", kind="file")  # its folder is created when the summary is written
        self.path = path
        self.print_summary = check_bool(print_summary, "print_summary")
        self.history: list[dict[str, float]] = []
        self._start = 0.0
        self.summary: dict[str, Any] = {}

    def on_fit_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self._start = time.perf_counter()

    def on_fed_round_end(self, trainer: pl.Trainer, pl_module: Any, summary: Any) -> None:
        self.history.append({
            "round": summary.round,
            "bytes": summary.bytes_down + summary.bytes_up,
            "dense_bytes": summary.dense_bytes,
            "clients": summary.clients_ok + summary.clients_failed,
            "sparsity": pl_module.pruning.sparsity() if pl_module.pruning.masks else 0.0,
        })

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history[-1:]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))

    def on_fit_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()
                   if (k.startswith("val/") or k.startswith("test/")) and v.numel() == 1}
        last = self.history[-1] if self.history else None
        state = pl_module.pruning
        summary: dict[str, Any] = {
            "rounds": int(trainer.global_step),
            "seconds": round(time.perf_counter() - self._start, 1),
            "metrics": metrics,
            "sparsity": state.sparsity() if state.masks else 0.0,
            "target_sparsity": state.target_sparsity,
            "pruned_parameters": len(state.masks),
            "permanent": state.permanent,
        }
        if last is not None and last["dense_bytes"]:
            per_client = last["clients"] or 1
            summary["bytes_per_client_round"] = last["bytes"] / per_client
            summary["dense_bytes_per_client_round"] = last["dense_bytes"] / per_client
            summary["bytes_saved_percent"] = 100.0 * (1 - last["bytes"] / last["dense_bytes"])
        summary.update(pruning_breakdown(pl_module))  # bytes by pruning group, compact / masked-dense layers
        self.summary = summary
        trainer.fed_summary = summary
        self._write(trainer, summary)

    @rank_zero_only
    def _write(self, trainer: pl.Trainer, summary: dict[str, Any]) -> None:
        path = Path(self.path) if self.path else (Path(trainer.log_dir) / "summary.json" if trainer.log_dir
                                                   and trainer.logger is not None else Path("fedprune_summary.json"))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(summary, indent=2) + "\n")
        if self.print_summary:
            print(format_summary(summary) + f"\n  written to {path}")


def format_summary(summary: dict[str, Any]) -> str:
    lines = ["", "Federated pruning summary", "-" * 40, f"  rounds              {summary['rounds']}",
             f"  wall time           {summary['seconds']:.1f} s"]
    for k, v in sorted(summary.get("metrics", {}).items()):
        lines.append(f"  {k:<19} {v:.4f}" if math.isfinite(v) else f"  {k:<19} {v}")
    lines.append(f"  sparsity            {summary['sparsity']:.3f} (target {summary['target_sparsity']:.3f}, "
                 f"{summary['pruned_parameters']} pruned tensors{', permanent' if summary['permanent'] else ''})")
    if "bytes_saved_percent" in summary:
        lines.append(f"  bytes/client/round  {summary['bytes_per_client_round'] / 1e6:.3f} MB down+up vs "
                     f"{summary['dense_bytes_per_client_round'] / 1e6:.3f} MB dense "
                     f"({summary['bytes_saved_percent']:.1f}% saved)")
    lines += format_breakdown(summary)
    return "\n".join(lines)
