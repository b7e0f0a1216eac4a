"""Every private Lightning API the package uses (lightning_fedprune/_compat.py) still does what the package needs.

A Lightning upgrade that moves, renames or changes one of them fails here, one test per name.
"""

from __future__ import annotations

import typing
from pathlib import Path

import pytest
import torch
import lightning.pytorch as pl
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.types import LRSchedulerConfig

from lightning_fedprune import _compat
from lightning_fedprune.demos import MLPClassifier
from lightning_fedprune.federated.checkpoint import (
    CheckpointError,
    ValidatingCheckpointIO,
    install_checkpoint_validation,
)
from lightning_fedprune.federated.module import FederatedLightningModule

PKG = Path(__file__).resolve().parent.parent / "lightning_fedprune"


def test_the_package_imports_lightnings_private_names_only_through_compat():
    offenders = []
    for path in PKG.rglob("*.py"):
        if path.name == "_compat.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            stripped = line.strip()
            if stripped.startswith(("from lightning.", "import lightning.")) and " import " in stripped:
                names = stripped.split(" import ", 1)[1].strip("() ").split(",")
                if any(n.strip().startswith("_") for n in names) or "._" in stripped.split(" import ")[0]:
                    offenders.append(f"{path.relative_to(PKG.parent)}:{number}: {stripped}")
    assert not offenders, offenders


def test_restricted_classmethod_works_on_the_class_and_refuses_an_instance():
    class Factory:
        @_compat._restricted_classmethod
        def make(cls, value):
            return cls, value

    assert Factory.make(3) == (Factory, 3)
    with pytest.raises(TypeError, match="cannot be called on an instance"):
        Factory().make(3)
    fed = FederatedLightningModule(MLPClassifier(in_dim=4, hidden=8, num_classes=2))
    with pytest.raises(TypeError, match="load_from_checkpoint` cannot be called on an instance"):
        fed.load_from_checkpoint("unused.ckpt")


def test_fx_validator_gives_lightnings_logging_rules():
    check = _compat._FxValidator.check_logging_and_get_default_levels
    assert check("training_step", None, None) == (True, False)
    assert check("on_train_epoch_end", None, None) == (False, True)
    assert check("training_step", False, True) == (False, True)
    with pytest.raises(MisconfigurationException, match="inside `configure_optimizers`"):
        check("configure_optimizers", None, None)
    with pytest.raises(MisconfigurationException, match="on_step=True"):
        check("on_train_epoch_end", True, None)


def _optimizer():
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)


def test_configure_optimizers_normalises_as_the_trainer_does():
    opt = _optimizer()
    assert _compat._configure_optimizers(opt) == ([opt], [], None)
    opt = _optimizer()
    sched = torch.optim.lr_scheduler.StepLR(opt, 1)
    optimizers, schedulers, monitor = _compat._configure_optimizers(
        {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}, "monitor": "val/loss"})
    assert optimizers == [opt] and monitor == "val/loss"
    (config,) = _compat._configure_schedulers_automatic_opt(schedulers, monitor)
    assert isinstance(config, LRSchedulerConfig)
    assert (config.scheduler, config.interval, config.frequency) == (sched, "step", 1)
    (manual,) = _compat._configure_schedulers_manual_opt([sched])
    assert isinstance(manual, LRSchedulerConfig) and manual.scheduler is sched


def test_wrapping_checkpoint_io_delegates_and_the_trainer_accepts_it(tmp_path):
    trainer = Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False)
    install_checkpoint_validation(trainer)
    io = trainer.strategy.checkpoint_io
    assert isinstance(io, ValidatingCheckpointIO) and isinstance(io, _compat._WrappingCheckpointIO)
    assert isinstance(io.checkpoint_io, TorchCheckpointIO)
    path = tmp_path / "a.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.arange(3.0)}}, path)
    assert torch.equal(io.load_checkpoint(path)["state_dict"]["w"], torch.arange(3.0))
    io.remove_checkpoint(path)
    assert not path.exists()
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="bad.ckpt is not a valid checkpoint"):
        io.load_checkpoint(bad)


def test_path_and_map_location_annotations_resolve():
    hints = typing.get_type_hints(FederatedLightningModule.load_from_checkpoint)
    assert str in typing.get_args(hints["hparams_file"]) and type(None) in typing.get_args(hints["hparams_file"])
    assert str in typing.get_args(hints["map_location"])


def test_lightning_cli_calls_parse_ckpt_path_between_parsing_and_instantiation(tmp_path):
    _compat.require_cli_hook(LightningCLI)
    seen = []

    class Probe(LightningCLI):
        def _parse_ckpt_path(self):
            seen.append((self.config["trainer"]["max_steps"], hasattr(self, "model")))

    Probe(BoringModel, args=["--trainer.max_steps=3", "--trainer.logger=false",
                             f"--trainer.default_root_dir={tmp_path}"], run=False)
    assert seen == [(3, False)]


def test_require_cli_hook_names_a_missing_hook():
    class OldCLI:
        pass

    with pytest.raises(ImportError, match=r"private `.*OldCLI\._parse_ckpt_path`.*lightning \d"):
        _compat.require_cli_hook(OldCLI)


def test_fedprune_cli_override_runs(tmp_path):
    from lightning_fedprune.cli import build_cli

    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"")
    root = Path(__file__).resolve().parent.parent
    with pytest.raises(CheckpointError, match="bad.ckpt is not a valid checkpoint: the file is empty"):
        build_cli(["validate", "--config", str(root / "examples/quickstart.yaml"), "--trainer.logger=false",
                   f"--ckpt_path={bad}"])


# private attributes (not imports) the package reads or sets on Lightning objects
def test_lightning_module_keeps_its_trainer_in_underscore_trainer():
    model = BoringModel()
    trainer = Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    model.trainer = trainer
    assert model._trainer is trainer
    model._trainer = None  # what replicas and pickled tasks do
    with pytest.raises(RuntimeError, match="not attached to a `Trainer`"):
        _ = model.trainer


def test_current_fx_name_is_the_running_hook(tmp_path):
    seen = []

    class Model(BoringModel):
        def training_step(self, batch, batch_idx):
            seen.append(self._current_fx_name)
            return super().training_step(batch, batch_idx)

    Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, default_root_dir=tmp_path, limit_val_batches=0).fit(Model())
    assert seen == ["training_step"]


def test_tqdm_progress_bar_should_update():
    bar = TQDMProgressBar(refresh_rate=2)
    assert [bar._should_update(n, 5) for n in range(1, 6)] == [False, True, False, True, True]


def test_count_optimizer_step_advances_global_step_once_per_call():
    """A round is one Trainer step: the module counts it with the manual-optimisation loop's step progress."""
    from helpers import GaussianMixtureDataset, MLPClassifier, quiet_trainer

    from lightning_fedprune import FederatedDataModule, FederatedLightningModule

    steps = []

    class Watch(pl.Callback):
        def on_train_batch_end(self, trainer, *args):
            steps.append(trainer.global_step)

    dm = FederatedDataModule(GaussianMixtureDataset(40, dim=8, num_classes=2), num_clients=2, batch_size=10)
    fed = FederatedLightningModule(MLPClassifier(in_dim=8, hidden=8, num_classes=2), clients_per_round=1, local_steps=1)
    quiet_trainer(max_steps=3, callbacks=[Watch()], limit_val_batches=0).fit(fed, datamodule=dm)
    assert steps == [1, 2, 3]


def test_log_step_metrics_logs_a_rounds_scalars_at_lightnings_step(tmp_path):
    """The round's own scalars skip self.log's bookkeeping but land where self.log would put them: the loggers
    (at the step Lightning gives the task's step values, every log_every_n_steps), callback_metrics, the bar."""
    import csv

    from helpers import GaussianMixtureDataset, MLPClassifier
    from lightning.pytorch.loggers import CSVLogger

    from lightning_fedprune import FederatedDataModule, FederatedLightningModule

    dm = FederatedDataModule(GaussianMixtureDataset(40, dim=8, num_classes=2), num_clients=2, batch_size=10)
    fed = FederatedLightningModule(MLPClassifier(in_dim=8, hidden=8, num_classes=2), clients_per_round=2, local_steps=1)
    trainer = Trainer(max_steps=4, logger=CSVLogger(tmp_path), log_every_n_steps=2, enable_progress_bar=False,
                      enable_checkpointing=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(fed, datamodule=dm)
    rows = list(csv.DictReader(open(next(tmp_path.rglob("metrics.csv")))))
    ours = sorted(int(r["step"]) for r in rows if r.get("round/clients_ok"))
    task = sorted(int(r["step"]) for r in rows if r.get("train/loss"))  # the task's own name, through self.log
    assert ours == task == [1, 3]  # log_every_n_steps=2: the steps Lightning logs
    assert float(trainer.callback_metrics["round/clients_ok"]) == 2.0
    assert "round/train_loss" in trainer.progress_bar_metrics and "round/clients_ok" not in trainer.progress_bar_metrics
