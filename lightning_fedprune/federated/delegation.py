"""The task's own hooks around evaluation of the global model, run by the federated module.

Validation, test and predict run the task's ``*_step`` and hooks on the *pruned* model clients get: pruned
entries are zeroed from the epoch's start and the server's values put back at its end (before
``ModelCheckpoint``'s ``on_validation_end`` saves). Batches: the training "batches" are cohorts (client ids),
only evaluation batches are the task's, so the batch-transfer hooks are the task's there. Each hook is one
named method (what runs where is listed in docs/dropin.md).
"""

from __future__ import annotations

import warnings
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_fedprune.pruning.masking import zero_pruned_

__all__ = ["TaskEvaluation"]

# The wrapper forwards the batch-transfer hooks of evaluation batches to the task, so it always overrides them;
# Lightning's note that the module's hooks (not the data module's) are used is then always true and says nothing.
warnings.filterwarnings("ignore", message="You have overridden `(on_before_batch_transfer|transfer_batch_to_device|"
                                          "on_after_batch_transfer)` in `LightningModule` but have passed in a")


class TaskEvaluation(pl.LightningModule):
    """Evaluation of the global model by the task's own steps and hooks (a part of
    :class:`~lightning_fedprune.FederatedLightningModule`; ``self.task`` is the wrapped task)."""

    task: pl.LightningModule

    def _delegate(self, hook: str, *args: Any, **kwargs: Any) -> Any:
        """Run the task's ``hook`` (as Lightning would: with the hook's name as the current one, for ``self.log``)."""
        task = self.task
        if hook != "setup" and hook != "teardown":
            task._current_fx_name = self._current_fx_name
        return getattr(task, hook)(*args, **kwargs)

    # ------------------------------------------------------------------ the pruned model, for the whole epoch
    def _mask_for_eval(self) -> None:
        """Evaluate the pruned model clients get: pruned entries zeroed (the server's values are stashed)."""
        self._stash: dict[str, Tensor] = {}
        state = self.pruning
        if state.masks and not state.permanent:
            params = self.global_params()
            self._stash = {name: params[name].detach().clone() for name in state.masks}
            zero_pruned_(params, state.masks)

    def _unmask_after_eval(self) -> None:
        stash, self._stash = getattr(self, "_stash", {}), {}
        if stash:
            params = self.global_params()
            with torch.no_grad():
                for name, value in stash.items():
                    params[name].copy_(value)

    def _epoch_start(self, hook: str) -> None:
        self._mask_for_eval()
        self._delegate(hook)

    def _epoch_end(self, hook: str) -> None:
        try:
            self._delegate(hook)
        finally:
            self._unmask_after_eval()

    def on_validation_epoch_start(self) -> None:
        """The task's hook, on the pruned global model."""
        self._epoch_start("on_validation_epoch_start")

    def on_validation_epoch_end(self) -> None:
        """The task's hook; then the server's values are put back."""
        self._epoch_end("on_validation_epoch_end")

    def on_test_epoch_start(self) -> None:
        """The task's hook, on the pruned global model."""
        self._epoch_start("on_test_epoch_start")

    def on_test_epoch_end(self) -> None:
        """The task's hook; then the server's values are put back."""
        self._epoch_end("on_test_epoch_end")

    def on_predict_epoch_start(self) -> None:
        """The task's hook, on the pruned global model."""
        self._epoch_start("on_predict_epoch_start")

    def on_predict_epoch_end(self) -> None:
        """The task's hook; then the server's values are put back."""
        self._epoch_end("on_predict_epoch_end")

    # ------------------------------------------------------------------ the task's steps
    def validation_step(self, *args: Any, **kwargs: Any) -> Any:
        return self._delegate("validation_step", *args, **kwargs)

    def test_step(self, *args: Any, **kwargs: Any) -> Any:
        return self._delegate("test_step", *args, **kwargs)

    def predict_step(self, *args: Any, **kwargs: Any) -> Any:
        return self._delegate("predict_step", *args, **kwargs)

    # ------------------------------------------------------------------ the task's evaluation hooks, as they are
    def on_validation_start(self) -> None:
        self._delegate("on_validation_start")

    def on_validation_end(self) -> None:
        self._delegate("on_validation_end")

    def on_validation_batch_start(self, *args: Any, **kwargs: Any) -> None:
        self._delegate("on_validation_batch_start", *args, **kwargs)

    def on_validation_batch_end(self, *args: Any, **kwargs: Any) -> None:
        self._delegate("on_validation_batch_end", *args, **kwargs)

    def on_validation_model_eval(self) -> None:
        self._delegate("on_validation_model_eval")

    def on_validation_model_train(self) -> None:
        self._delegate("on_validation_model_train")

    def on_validation_model_zero_grad(self) -> None:
        self._delegate("on_validation_model_zero_grad")

    def on_test_start(self) -> None:
        self._delegate("on_test_start")

    def on_test_end(self) -> None:
        self._delegate("on_test_end")

    def on_test_batch_start(self, *args: Any, **kwargs: Any) -> None:
        self._delegate("on_test_batch_start", *args, **kwargs)

    def on_test_batch_end(self, *args: Any, **kwargs: Any) -> None:
        self._delegate("on_test_batch_end", *args, **kwargs)

    def on_test_model_eval(self) -> None:
        self._delegate("on_test_model_eval")

    def on_test_model_train(self) -> None:
        self._delegate("on_test_model_train")

    def on_predict_start(self) -> None:
        self._delegate("on_predict_start")

    def on_predict_end(self) -> None:
        self._delegate("on_predict_end")

    def on_predict_batch_start(self, *args: Any, **kwargs: Any) -> None:
        self._delegate("on_predict_batch_start", *args, **kwargs)

    def on_predict_batch_end(self, *args: Any, **kwargs: Any) -> None:
        self._delegate("on_predict_batch_end", *args, **kwargs)

    def on_predict_model_eval(self) -> None:
        self._delegate("on_predict_model_eval")

    # ------------------------------------------------------------------ batches of evaluation are the task's
    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        return batch if self.trainer.training else self._delegate("on_before_batch_transfer", batch, dataloader_idx)

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        if self.trainer.training:
            return super().transfer_batch_to_device(batch, device, dataloader_idx)
        return self._delegate("transfer_batch_to_device", batch, device, dataloader_idx)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        return batch if self.trainer.training else self._delegate("on_after_batch_transfer", batch, dataloader_idx)
