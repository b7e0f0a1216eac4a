"""A progress bar for federated training: round, pruning phase, sparsity and clients done in the round."""

from __future__ import annotations

import time
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import TQDMProgressBar

from lightning_fedprune.pruning.plan import Phase
from lightning_fedprune.pruning.state import PruningState
from lightning_fedprune.validation import check_bool, check_float, check_int


class FederatedProgressBar(TQDMProgressBar):
    """Lightning's tqdm progress bar with the federated fields in front of the logged metrics.

    One bar spans the whole fit and one bar step is one round (Lightning's bar restarts every epoch,
    and an epoch is one round by default). Next to the metrics logged with ``prog_bar=True`` the bar
    shows

    * ``round``: the index of the current (or last finished) round, as the callbacks count them;
    * ``phase``: ``dense``, ``ramp``, ``refine`` or ``fine-tune`` (while a module has no pruning
      callbacks it stays ``dense``);
    * ``sparsity``: the current overall sparsity of the masked parameters;
    * ``clients``: clients finished in the round over the cohort size (``"3/10"``, with
      ``"+1 failed"`` when some failed). It is updated as each client result arrives, so a long
      round shows progress; refreshes are throttled to ``client_refresh_interval`` seconds.

    It is based on :class:`~lightning.pytorch.callbacks.TQDMProgressBar` (Lightning's default), which
    also behaves in logs that are not a terminal. With a module that is not federated it is an
    ordinary tqdm bar. The ``fedprune`` CLI uses it by default.

    Args:
        refresh_rate: as for ``TQDMProgressBar`` (every how many rounds the bar is redrawn).
        process_position: as for ``TQDMProgressBar``.
        leave: as for ``TQDMProgressBar``.
        client_refresh_interval: minimum seconds between redraws caused by client results
            (``0`` redraws on every client).
    """

    def __init__(self, refresh_rate: int = 1, process_position: int = 0, leave: bool = False,
                 client_refresh_interval: float = 0.2) -> None:
        refresh_rate = check_int(refresh_rate, "refresh_rate", min=0)
        process_position = check_int(process_position, "process_position", min=0)
        check_bool(leave, "leave")
        interval = check_float(client_refresh_interval, "client_refresh_interval", min=0)
        super().__init__(refresh_rate=refresh_rate, process_position=process_position, leave=leave)
        self.client_refresh_interval = interval
        self.round: int | None = None
        self.cohort_size = 0
        self.clients_done = 0
        self.clients_failed = 0
        self._last_client_refresh = 0.0

    # ------------------------------------------------------------------ what is shown
    def fed_fields(self, pl_module: Any) -> dict[str, Any]:
        """The federated fields (empty for a module without a pruning state)."""
        state = getattr(pl_module, "pruning", None)
        if not isinstance(state, PruningState):
            return {}
        fields: dict[str, Any] = {}
        if self.round is not None:
            fields["round"] = self.round
        fields["phase"] = Phase(state.phase).label
        fields["sparsity"] = f"{state.sparsity() if state.masks else 0.0:.3f}"
        if self.cohort_size:
            clients = f"{self.clients_done}/{self.cohort_size}"
            if self.clients_failed:
                clients += f"+{self.clients_failed} failed"
            fields["clients"] = clients
        return fields

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        fields = self.fed_fields(pl_module)
        if fields:
            metrics.pop("prune/sparsity", None)  # shown as `sparsity`
        return {**fields, **metrics}

    # ------------------------------------------------------------------ one bar over all rounds
    def total_rounds(self, trainer: pl.Trainer) -> int | float:
        """Rounds of the fit: ``max_steps``, else ``max_epochs`` epochs of ``len(train loader)`` rounds."""
        if trainer.max_steps is not None and trainer.max_steps > 0:
            return trainer.max_steps
        if trainer.max_epochs is not None and trainer.max_epochs > 0:
            return trainer.max_epochs * self.total_train_batches
        return float("inf")

    def on_train_epoch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if getattr(trainer.lightning_module, "pruning", None) is None:  # not federated: Lightning's bar
            super().on_train_epoch_start(trainer, *args)
            return
        bar = self.train_progress_bar
        total = self.total_rounds(trainer)
        if bar.total != (None if total == float("inf") else total):
            bar.reset(total=None if total == float("inf") else total)
            bar.initial = 0
            bar.n = trainer.global_step
            bar.set_description("Rounds")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if getattr(pl_module, "pruning", None) is None:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            return
        bar = self.train_progress_bar
        n = trainer.global_step
        if bar is not None and self._should_update(n, bar.total):
            bar.n = n
            bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=True)

    def _refresh(self, trainer: pl.Trainer, pl_module: Any, force: bool) -> None:
        bar = self._train_progress_bar
        if bar is None or bar.disable:
            return
        now = time.monotonic()
        if not force and now - self._last_client_refresh < self.client_refresh_interval:
            return
        self._last_client_refresh = now
        bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=True)

    # ------------------------------------------------------------------ federated hooks
    def on_fed_round_start(self, trainer: pl.Trainer, pl_module: Any, round: int, cohort: list[int]) -> None:
        self.round = int(round)
        self.cohort_size = len(cohort)
        self.clients_done = 0
        self.clients_failed = 0
        self._refresh(trainer, pl_module, force=True)

    def on_fed_client_result(self, trainer: pl.Trainer, pl_module: Any, result: Any) -> None:
        if getattr(result, "ok", True):
            self.clients_done += 1
        else:
            self.clients_failed += 1
        last = self.clients_done + self.clients_failed >= self.cohort_size
        self._refresh(trainer, pl_module, force=last)
