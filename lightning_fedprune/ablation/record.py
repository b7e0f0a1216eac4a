"""CellRecord: what an ablation cell measures besides quality, written next to ``summary.json``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

from lightning_fedprune.federated.hooks import RoundSummary
from lightning_fedprune.federated.protocol import derive_seed
from lightning_fedprune.federated.strategies import RoundContext
from lightning_fedprune.pruning.patterns import COMPACT_PATTERNS
from lightning_fedprune.validation import check_path


class CellRecord(pl.Callback):
    """Records a federated run's client size and traffic, measured the same way for every method.

    * **client parameters**: the entries of the task's parameters a client receives and trains in a
      round — all of them minus those its masks drop: the pruning state's masks, or the sub-model the
      strategy gives that client (:meth:`~lightning_fedprune.federated.strategies.Strategy.configure`,
      Federated Dropout); the mean over the round's cohort, for the last round and over the run.
      Layers with a compact pattern hold only these entries on the client; other masked layers stay
      masked-dense there (``compact`` says whether every masked tensor is compact).
    * **bytes per client per round** (down + up, as counted from the wire): the last round's and the
      mean over the run, and what dense FedAvg sends.

    Written as JSON to ``path`` at the end of fit.

    Args:
        path: the JSON file to write (its folder is created).
    """

    def __init__(self, path: str) -> None:
        self.path = check_path(path, "path", kind="file", optional=False)
        self._client_params: list[float] = []
        self._bytes = 0
        self._client_rounds = 0
        self._last: RoundSummary | None = None
        self._compact = True

    def on_fed_round_start(self, trainer: pl.Trainer, pl_module: Any, round: int, cohort: list[int]) -> None:
        params = pl_module.global_params()
        total = sum(p.numel() for p in params.values())
        state = pl_module.pruning
        kept = []
        ctx = RoundContext(round, params, pl_module.global_buffers(), state.masks, state.patterns)
        seeds = [derive_seed(pl_module.seed, round, cid) for cid in cohort]
        for sub in pl_module.strategy.configure(ctx, cohort, seeds):  # pure: the sub-models the round gives
            masks, patterns = (state.masks, state.patterns) if sub is None else (sub.masks, sub.patterns)
            dropped = sum(m.numel() - int(m.sum()) for m in masks.values())
            kept.append(total - dropped)
            self._compact = self._compact and all(patterns.get(n) in COMPACT_PATTERNS for n in masks)
        self._client_params.append(sum(kept) / len(kept))

    def on_fed_round_end(self, trainer: pl.Trainer, pl_module: Any, summary: RoundSummary) -> None:
        self._bytes += summary.bytes_down + summary.bytes_up
        self._client_rounds += len(summary.cohort)
        self._last = summary

    def on_fit_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        params = pl_module.global_params()
        last = self._last
        record = {
            "rounds": int(trainer.global_step),
            "total_params": sum(p.numel() for p in params.values()),
            "prunable_params": sum(params[n].numel() for n in pl_module.pruning.targets),
            "client_params_final": self._client_params[-1] if self._client_params else None,
            "client_params_mean": sum(self._client_params) / len(self._client_params) if self._client_params else None,
            "bytes_per_client_round_mean": self._bytes / self._client_rounds if self._client_rounds else None,
            "bytes_per_client_round_final": (last.bytes_down + last.bytes_up) / len(last.cohort) if last else None,
            "dense_bytes_per_client_round": last.dense_bytes / len(last.cohort) if last else None,
            "compact": self._compact,
        }
        path = Path(self.path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=2) + "\n")
