"""What an ablation cell records besides ``summary.json`` (:class:`CellRecord`), and the checkpoint of a
shared warm start (:class:`WarmStartCheckpoint`)."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Checkpoint

from lightning_fedprune.federated.hooks import RoundSummary
from lightning_fedprune.federated.protocol import derive_seed
from lightning_fedprune.federated.strategies import RoundContext
from lightning_fedprune.pruning.patterns import COMPACT_PATTERNS
from lightning_fedprune.validation import check_int, check_path


def _finite(value: Any, digits: int = 6) -> float | None:
    """``value`` as a float rounded to ``digits`` significant digits, None when it is not a finite number."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return float(f"{v:.{digits}g}") if math.isfinite(v) else None


class CellRecord(pl.Callback):
    """Records a federated run's client size and traffic, measured the same way for every method.

    It keeps what the run did, so that a grid's results can be audited without the run's folder. Per round (``rounds_log``): bytes down and up (as counted from the wire) and what dense FedAvg would
    send, the cohort size, the parameter entries a client receives and trains (mean over the cohort: all
    of the task's parameters minus those its masks drop -- the pruning state's masks, or the sub-model the
    strategy gives that client, :meth:`~lightning_fedprune.federated.strategies.Strategy.configure`), the
    training loss, the overall sparsity, the pruning phase and what the round's mask recomputation did
    (entries flipped, restored 0 -> 1, pruned 1 -> 0).

    At every validation (``validations``): the round and the ``val/*`` metrics. At the end: the final
    per-layer sparsity of every pruned tensor (``layer_sparsity``, with ``layer_params``), the size of the
    evaluation set (``eval_utterances``, ``eval_words``, ``eval_speakers`` when the data module's validation
    set has utterances), a SHA-256 of the final global parameters and masks (``weights_sha256``: two runs
    that end in the same state have the same digest), and the summary fields of earlier versions (client
    parameters and bytes per client and round: last round and mean over the rounds of this process).

    A run resumed from a checkpoint records the rounds it trains itself; ``fedprune ablate`` joins them
    with its warm start's record.

    Written as JSON to ``path`` at the end of fit.

    Args:
        path: the JSON file to write (its folder is created).
    """

    def __init__(self, path: str) -> None:
        self.path = check_path(path, "path", kind="file", optional=False)
        self._client_params: list[float] = []
        self._rounds: list[dict[str, Any]] = []
        self._validations: list[dict[str, Any]] = []
        self._compact = True

    def on_fed_round_start(self, trainer: pl.Trainer, pl_module: Any, round: int, cohort: list[int]) -> None:
        params = pl_module.global_params()
        total = sum(p.numel() for p in params.values())
        state = pl_module.pruning
        kept = []
        ctx = RoundContext(round, params, pl_module.global_buffers(), state.masks, state.patterns, pl_module.task)
        seeds = [derive_seed(pl_module.seed, round, cid) for cid in cohort]
        for sub in pl_module.strategy.configure(ctx, cohort, seeds):  # pure: the sub-models the round gives
            masks, patterns = (state.masks, state.patterns) if sub is None else (sub.masks, sub.patterns)
            dropped = sum(m.numel() - int(m.sum()) for m in masks.values())
            kept.append(total - dropped)
            self._compact = self._compact and all(patterns.get(n) in COMPACT_PATTERNS for n in masks)
        self._client_params.append(sum(kept) / len(kept))

    def on_fed_round_end(self, trainer: pl.Trainer, pl_module: Any, summary: RoundSummary) -> None:
        state = pl_module.pruning
        change = getattr(state, "last_change", None)
        phase = getattr(state, "phase", None)
        self._rounds.append({
            "round": int(summary.round),
            "bytes_down": int(summary.bytes_down),
            "bytes_up": int(summary.bytes_up),
            "dense_bytes": int(summary.dense_bytes),
            "clients": len(summary.cohort),
            "client_params": _finite(self._client_params[-1]) if self._client_params else None,
            "train_loss": _finite(summary.train_loss),
            "sparsity": _finite(state.sparsity() if state.masks else 0.0),
            "phase": getattr(phase, "name", None),
            "flips": int(change.flips) if change is not None else None,
            "restored": int(change.restored) if change is not None else None,
            "pruned": int(change.pruned) if change is not None else None,
        })

    def on_validation_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        if trainer.sanity_checking:
            return
        metrics = {k: _finite(v) for k, v in trainer.callback_metrics.items()
                   if k.startswith("val/") and getattr(v, "numel", lambda: 1)() == 1}
        self._validations.append({"round": int(trainer.global_step), "metrics": metrics})

    @staticmethod
    def _eval_set(trainer: pl.Trainer) -> dict[str, Any]:
        ds = getattr(getattr(trainer, "datamodule", None), "val_dataset", None)
        if ds is None:
            return {"eval_utterances": None, "eval_words": None, "eval_speakers": None}
        utterances = getattr(ds, "utterances", None)
        words = sum(len(u.transcript.split()) for u in utterances) if utterances is not None else None
        speakers = getattr(ds, "speakers", None)
        return {"eval_utterances": len(ds), "eval_words": words,
                "eval_speakers": len(set(speakers)) if speakers is not None else None}

    @staticmethod
    def weights_digest(pl_module: Any) -> str:
        """SHA-256 over the global parameters (name, dtype, shape, bytes, in name order) and the masks."""
        h = hashlib.sha256()
        for name, p in sorted(pl_module.global_params().items()):
            t = p.detach().cpu().contiguous()
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.numpy().tobytes())
        for name, m in sorted(pl_module.pruning.masks.items()):
            h.update(f"mask|{name}|".encode())
            h.update(m.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

    def on_fit_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        params = pl_module.global_params()
        state = pl_module.pruning
        rounds = self._rounds
        client_rounds = sum(r["clients"] for r in rounds)
        last = rounds[-1] if rounds else None
        record = {
            "rounds": int(trainer.global_step),
            "first_round": rounds[0]["round"] if rounds else None,
            "total_params": sum(p.numel() for p in params.values()),
            "prunable_params": sum(params[n].numel() for n in state.targets),
            "client_params_final": self._client_params[-1] if self._client_params else None,
            "client_params_mean": sum(self._client_params) / len(self._client_params) if self._client_params else None,
            "bytes_per_client_round_mean": (sum(r["bytes_down"] + r["bytes_up"] for r in rounds) / client_rounds
                                            if client_rounds else None),
            "bytes_per_client_round_final": (last["bytes_down"] + last["bytes_up"]) / last["clients"] if last else None,
            "dense_bytes_per_client_round": last["dense_bytes"] / last["clients"] if last else None,
            "compact": self._compact,
            "layer_sparsity": {n: _finite(1.0 - float(m.sum()) / m.numel()) for n, m in sorted(state.masks.items())},
            "layer_params": {n: int(m.numel()) for n, m in sorted(state.masks.items())},
            **self._eval_set(trainer),
            "validations": self._validations,
            "rounds_log": rounds,
            "weights_sha256": self.weights_digest(pl_module),
        }
        path = Path(self.path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=1) + "\n")


class WarmStartCheckpoint(Checkpoint):
    """Saves a checkpoint after round ``round - 1`` (when ``global_step`` reaches ``round``) and stops
    training there: the shared warm start of an ablation grid, which every configuration of the seed
    resumes from. It saves where and when :class:`~lightning.pytorch.callbacks.ModelCheckpoint` with
    ``every_n_train_steps=round`` would (a :class:`~lightning.pytorch.callbacks.Checkpoint`, so it runs after
    the other callbacks), so resuming continues exactly as the uninterrupted run.

    Args:
        round: the number of rounds to train before saving and stopping (>= 1).
        path: the checkpoint file to write.
    """

    def __init__(self, round: int, path: str) -> None:
        self.round = check_int(round, "round", min=1)
        self.path = check_path(path, "path", kind="file", optional=False)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, *args: Any, **kwargs: Any) -> None:
        if trainer.global_step == self.round:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            trainer.save_checkpoint(self.path)
            trainer.should_stop = True

    def on_fit_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        if trainer.global_step < self.round:
            raise RuntimeError(f"WarmStartCheckpoint: training ended after {trainer.global_step} rounds, before round "
                               f"{self.round}: no warm-start checkpoint was written (is trainer.max_steps < {self.round}?)")
