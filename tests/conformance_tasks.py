"""LightningModules written in the styles real projects use, for the drop-in conformance suite.

Module level (worker processes unpickle them). None of them knows about federation. They use SGD
without momentum and no dropout where the suite compares weights exactly (one client, one local
epoch per round, server SGD lr 1 is then the same computation as centralised training).
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, EarlyStopping
from lightning.pytorch.demos import LightningTransformer
from lightning.pytorch.demos.boring_classes import BoringModel
from torch import nn
from torch.utils.data import Dataset
from torchmetrics import MaxMetric, MeanMetric
from torchmetrics.classification import MulticlassAccuracy

#: Hooks recorded by :class:`HookRecorder` (module level: the sequential executor's replica shares it).
CALLS: list[str] = []

RECORDED_HOOKS = (
    "prepare_data", "setup", "teardown", "configure_callbacks", "configure_optimizers", "on_fit_start", "on_fit_end",
    "on_train_start", "on_train_end", "on_train_epoch_start", "on_train_epoch_end", "on_train_batch_start",
    "on_train_batch_end", "on_before_batch_transfer", "transfer_batch_to_device", "on_after_batch_transfer",
    "on_before_zero_grad", "optimizer_zero_grad", "on_before_backward", "backward", "on_after_backward",
    "on_before_optimizer_step", "configure_gradient_clipping", "optimizer_step", "training_step",
    "on_validation_model_eval", "on_validation_model_train", "on_validation_start", "on_validation_end",
    "on_validation_epoch_start", "on_validation_epoch_end", "on_validation_batch_start", "on_validation_batch_end",
    "validation_step", "on_save_checkpoint", "on_load_checkpoint",
)


class HookRecorder:
    """Mixin: appends the name of every hook in :data:`RECORDED_HOOKS` to :data:`CALLS`, then runs it."""


def _recording(name: str):
    def hook(self, *args, **kwargs):
        CALLS.append(name)
        return getattr(super(HookRecorder, self), name)(*args, **kwargs)

    hook.__name__ = name
    return hook


for _name in RECORDED_HOOKS:
    setattr(HookRecorder, _name, _recording(_name))


class Blobs(Dataset):
    """A fixed classification set: ``(x, y)`` pairs, 4 classes in 16 dimensions."""

    def __init__(self, n: int = 48, seed: int = 0, dim: int = 16, classes: int = 4) -> None:
        g = torch.Generator().manual_seed(seed)
        centers = torch.randn(classes, dim, generator=torch.Generator().manual_seed(99)) * 2
        self.y = torch.randint(0, classes, (n,), generator=g)
        self.x = centers[self.y] + torch.randn(n, dim, generator=g)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]


class RecordedBoring(HookRecorder, BoringModel):
    """Lightning's own BoringModel (SGD + StepLR per epoch), every hook recorded."""


class TorchaudioStyle(pl.LightningModule):
    """torchaudio's LibriSpeech Conformer RNN-T recipe, reduced to an MLP: the optimiser and a warm-up
    scheduler are built in ``__init__`` and returned by ``configure_optimizers``; manual optimisation
    with ``all_gather`` of the batch size, gradient-norm clipping and the scheduler stepped when
    ``self.trainer.is_last_batch``. (The recipe's ``batch_sizes.size(0)`` assumes DDP: with one device
    Lightning returns a 0-d tensor, so it fails under a plain Trainer too; ``numel()`` works in both.)
    """

    def __init__(self, adam: bool = False, lr: float = 0.2) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
        if adam:
            self.optimizer = torch.optim.Adam(self.model.parameters(), lr=lr / 20, betas=(0.9, 0.98), eps=1e-9)
        else:
            self.optimizer = torch.optim.SGD(self.model.parameters(), lr=lr)
        self.warmup_lr_scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, WarmupFactor(2))
        self.automatic_optimization = False
        self.adam_steps: list[int] = []

    def forward(self, x):
        return self.model(x)

    def _step(self, batch, step_type):
        x, y = batch
        loss = F.cross_entropy(self(x), y, reduction="sum")
        self.log(f"Losses/{step_type}_loss", loss, on_step=True, on_epoch=True)
        return loss

    def configure_optimizers(self):
        return [self.optimizer], [{"scheduler": self.warmup_lr_scheduler, "interval": "epoch"}]

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        opt.zero_grad()
        loss = self._step(batch, "train")
        batch_size = batch[0].size(0)
        batch_sizes = self.all_gather(batch_size)
        self.log("Gathered batch size", batch_sizes.sum(), on_step=True, on_epoch=True)
        loss *= batch_sizes.numel() / batch_sizes.sum()
        self.manual_backward(loss)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 10.0)
        opt.step()
        if self.hparams.adam:
            first = next(iter(self.model.parameters()))
            self.adam_steps.append(int(opt.optimizer.state[first]["step"]))
        sch = self.lr_schedulers()
        if self.trainer.is_last_batch:
            sch.step()
        return loss

    def validation_step(self, batch, batch_idx):
        return self._step(batch, "val")


class WarmupFactor:
    """A picklable warm-up factor for LambdaLR (linear over ``steps`` scheduler steps, then 0.5 per step)."""

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def __call__(self, step: int) -> float:
        return min(1.0, (step + 1) / self.steps) if step < self.steps else 0.5 ** (step - self.steps + 1)


class HydraStyle(pl.LightningModule):
    """The lightning-hydra-template MNIST module, reduced: torchmetrics objects for train and val,
    ``on_train_start`` resetting the val metrics, ``acc_best`` from a MaxMetric, optimiser built on
    ``self.trainer.model.parameters()`` and ReduceLROnPlateau on ``val/loss`` per epoch."""

    def __init__(self, lr: float = 0.3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
        self.train_acc = MulticlassAccuracy(num_classes=4, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes=4, average="micro")
        self.train_loss = MeanMetric()
        self.val_loss = MeanMetric()
        self.val_acc_best = MaxMetric()

    def forward(self, x):
        return self.net(x)

    def on_train_start(self) -> None:
        self.val_loss.reset()
        self.val_acc.reset()
        self.val_acc_best.reset()

    def model_step(self, batch):
        x, y = batch
        logits = self(x)
        return F.cross_entropy(logits, y), logits.argmax(dim=1), y

    def training_step(self, batch, batch_idx):
        loss, preds, targets = self.model_step(batch)
        self.train_loss(loss)
        self.train_acc(preds, targets)
        self.log("train/loss", self.train_loss, on_step=False, on_epoch=True, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        loss, preds, targets = self.model_step(batch)
        self.val_loss(loss)
        self.val_acc(preds, targets)
        self.log("val/loss", self.val_loss, on_step=False, on_epoch=True, prog_bar=True)
        self.log("val/acc", self.val_acc, on_step=False, on_epoch=True, prog_bar=True)

    def on_validation_epoch_end(self) -> None:
        acc = self.val_acc.compute()
        self.val_acc_best(acc)
        self.log("val/acc_best", self.val_acc_best.compute(), sync_dist=True, prog_bar=True)

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(params=self.trainer.model.parameters(), lr=self.hparams.lr)
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, patience=0, factor=0.5, threshold=0.5)
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "monitor": "val/loss", "interval": "epoch", "frequency": 1}}


class StepLogRecorder(Callback):
    """A callback the task contributes through ``configure_callbacks``: counts train epochs it sees."""

    def __init__(self) -> None:
        self.epochs = 0

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.epochs += 1


class CallbacksStyle(pl.LightningModule):
    """Contributes EarlyStopping and a recorder through ``configure_callbacks``; logs with both
    ``on_step`` and ``on_epoch`` (Lightning names them ``X_step`` / ``X_epoch``); BatchNorm; a
    per-step scheduler with ``frequency=2``; reads ``self.trainer.global_step``, ``current_epoch``,
    ``num_training_batches`` and ``estimated_stepping_batches`` in training."""

    def __init__(self, patience: int = 1, lr: float = 0.1) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(16, 24), nn.BatchNorm1d(24), nn.ReLU(), nn.Linear(24, 4))
        self.seen: list[tuple[int, int, int, float, bool]] = []

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True)
        t = self.trainer
        self.seen.append((t.global_step, t.current_epoch, t.num_training_batches, t.estimated_stepping_batches,
                          t.is_last_batch))
        self.log("trainer/global_step", float(t.global_step), on_step=False, on_epoch=True, reduce_fx="max")
        return {"loss": loss, "n": len(y)}

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/loss", F.cross_entropy(self(x), y))

    def configure_callbacks(self):
        return [EarlyStopping(monitor="val/loss", patience=self.hparams.patience, min_delta=10.0), StepLogRecorder()]

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.hparams.lr)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.8)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 2}}


class AutoEncoder(pl.LightningModule):
    """Lightning's autoencoder example, reduced: encoder/decoder MLP, MSE, Adam, ``self.log("train_loss")``."""

    def __init__(self, hidden: int = 8) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.encoder = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, hidden))
        self.decoder = nn.Sequential(nn.Linear(hidden, 32), nn.ReLU(), nn.Linear(32, 16))

    def forward(self, x):
        return self.decoder(self.encoder(x))

    def training_step(self, batch, batch_idx):
        x, _ = batch
        loss = F.mse_loss(self(x), x)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, _ = batch
        self.log("val_loss", F.mse_loss(self(x), x))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


class ClipAccumulate(pl.LightningModule):
    """Automatic optimisation under ``Trainer(gradient_clip_val, accumulate_grad_batches)``."""

    def __init__(self, lr: float = 0.5) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


class LBFGSTask(ClipAccumulate):
    """LBFGS evaluates the closure several times per step: Lightning hands the optimiser its closure."""

    def configure_optimizers(self):
        return torch.optim.LBFGS(self.parameters(), lr=0.5, max_iter=4)


class OfflineTransformer(LightningTransformer):
    """Lightning's LightningTransformer demo; its ``prepare_data`` downloads WikiText-2, which tests may not."""

    def prepare_data(self) -> None:
        pass


__all__ = ["LBFGSTask", "OfflineTransformer", "AutoEncoder", "Blobs", "CALLS", "CallbacksStyle", "ClipAccumulate", "HookRecorder", "HydraStyle",
           "RecordedBoring", "StepLogRecorder", "TorchaudioStyle", "WarmupFactor"]
