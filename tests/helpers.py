"""Module-level tasks shared by tests (module level so worker processes can unpickle them)."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn

from lightning_fedprune.demos import GaussianMixtureDataset, MLPClassifier


def quiet_trainer(**kwargs) -> pl.Trainer:
    defaults = dict(enable_progress_bar=False, logger=False, enable_checkpointing=False, enable_model_summary=False,
                    num_sanity_val_steps=0)
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


def checkpoint_and_stop(ckpt_dir=None, stop_at: int | None = None) -> tuple[list[pl.Callback], dict]:
    """Callbacks (and Trainer kwargs) for resume tests: a checkpoint every round named ``{step}`` under
    ``ckpt_dir``, and a stop after round ``stop_at`` (either optional)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    callbacks: list[pl.Callback] = []
    kw: dict = {}
    if ckpt_dir is not None:
        callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=1, save_top_k=-1, filename="{step}"))
        kw["enable_checkpointing"] = True
    if stop_at is not None:
        class Stop(pl.Callback):
            def on_train_batch_end(self, trainer, *args):
                if trainer.global_step == stop_at:
                    trainer.should_stop = True
        callbacks.append(Stop())
    return callbacks, kw


def params_of(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.state_dict().items()}


class ManualTask(MLPClassifier):
    """The same model as MLPClassifier, optimised manually — exercises the client's Lightning stand-ins."""

    def __init__(self, clip: float | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.automatic_optimization = False
        self.clip = clip
        self.seen_rounds: list[int] = []

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        sched = self.lr_schedulers()
        x, y = batch
        x = x.to(self.device)
        loss = F.cross_entropy(self(x), y)
        opt.zero_grad()
        self.manual_backward(loss)
        if self.clip:
            self.clip_gradients(opt, gradient_clip_val=self.clip, gradient_clip_algorithm="norm")
        opt.step()
        if sched is not None:
            sched.step()
        gathered = self.all_gather(loss.detach())
        self.log("manual/loss", gathered)
        self.log("manual/round", float(self.trainer.fed_round))
        self.log("manual/global_step", float(self.trainer.global_step))
        return loss

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.hparams.lr)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)}


class InitOptimizerTask(MLPClassifier):
    """MLPClassifier whose optimiser and scheduler are built in ``__init__`` (torchaudio's recipe does this)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.opt = torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=self.hparams.momentum,
                                   weight_decay=self.hparams.weight_decay)
        self.sched = torch.optim.lr_scheduler.StepLR(self.opt, step_size=1, gamma=0.9)

    def configure_optimizers(self):
        return {"optimizer": self.opt, "lr_scheduler": {"scheduler": self.sched, "interval": "epoch"}}


class FreshOptimizerTask(MLPClassifier):
    """The same optimiser and scheduler as InitOptimizerTask, built in ``configure_optimizers``."""

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=self.hparams.momentum,
                              weight_decay=self.hparams.weight_decay)
        return {"optimizer": opt,
                "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.9),
                                 "interval": "epoch"}}


class ScheduledTask(MLPClassifier):
    """Automatic optimisation with a per-step LR scheduler in a dict config."""

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.hparams.lr)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.StepLR(opt, 1, 0.5), "interval": "step"}}


class ListOptTask(MLPClassifier):
    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.hparams.lr)
        return [opt], [torch.optim.lr_scheduler.StepLR(opt, 1, 0.5)]


class FailingTask(MLPClassifier):
    """Raises for chosen clients (read from the client's trainer view) or returns NaN."""

    def __init__(self, fail_clients: tuple[int, ...] = (), nan_clients: tuple[int, ...] = (), fail_from_round: int = 0,
                 **kwargs) -> None:
        super().__init__(**kwargs)
        self.fail_clients = tuple(fail_clients)
        self.nan_clients = tuple(nan_clients)
        self.fail_from_round = fail_from_round

    def training_step(self, batch, batch_idx):
        cid = self.trainer.client_id
        if cid in self.fail_clients and self.trainer.fed_round >= self.fail_from_round:
            raise RuntimeError(f"boom on client {cid}")
        loss = super().training_step(batch, batch_idx)
        if cid in self.nan_clients:
            return loss * float("nan")
        return loss


class PoisonTask(MLPClassifier):
    """A finite loss, but the weights of chosen clients turn to NaN: caught on the server's average."""

    def __init__(self, poison_clients: tuple[int, ...] = (), **kwargs) -> None:
        super().__init__(**kwargs)
        self.poison_clients = tuple(poison_clients)

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.trainer.client_id in self.poison_clients:
            with torch.no_grad():
                self.head.weight[0, 0] = float("inf")


class BNTask(pl.LightningModule):
    def __init__(self, dim: int = 32, num_classes: int = 10) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, num_classes))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class NoTrainingStep(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(2, 2)


__all__ = ["InitOptimizerTask", "FreshOptimizerTask", "PoisonTask", "GaussianMixtureDataset", "MLPClassifier", "ManualTask", "ScheduledTask", "ListOptTask", "FailingTask",
           "BNTask", "NoTrainingStep", "quiet_trainer", "params_of"]
