"""The ``fedprune`` command: a LightningCLI over FederatedLightningModule and the data modules.

    fedprune fit --config examples/quickstart.yaml
    fedprune fit --config examples/asr/digits_fp.yaml --trainer.max_steps 20
    fedprune fit --print_config

The task is a nested ``class_path`` (``--model.task.class_path``), data modules are chosen with
``--data.class_path``, and every callback is a ``--trainer.callbacks+=...`` entry.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LightningCLI

from lightning_fedprune.module import FederatedLightningModule
from lightning_fedprune.validation import check_int

TRAINER_DEFAULTS: dict[str, Any] = {
    "log_every_n_steps": 1,  # one step is one federated round: log every round
    "logger": {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": "runs", "name": "fedprune"},
    },
}


class FedPruneCLI(LightningCLI):
    """LightningCLI with the federated module fixed and any LightningDataModule selectable."""

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.add_argument("--quiet", type=bool, default=False,
                            help="No progress bar and no model summary (CI logs).")
        parser.add_argument("--torch_threads", type=Optional[int], default=None,
                            help="torch intra-op threads (default: torch's choice). 1 is often fastest for small "
                                 "models on small CPU machines.")

    def before_instantiate_classes(self) -> None:
        cfg = self.config.get(self.subcommand) if self.subcommand else self.config
        threads = cfg.get("torch_threads") if cfg is not None else None
        if threads is not None:
            torch.set_num_threads(check_int(threads, "--torch_threads", min=1))
        if cfg is not None and cfg.get("quiet"):
            cfg.trainer.enable_progress_bar = False
            cfg.trainer.enable_model_summary = False

    def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
        """Uses :class:`FederatedProgressBar` as the default progress bar (unless the progress bar is
        disabled or a progress bar callback is configured)."""
        from lightning.pytorch.callbacks import ProgressBar

        from lightning_fedprune.callbacks.progress import FederatedProgressBar

        trainer_cfg = self._get(self.config_init, "trainer", default={})
        callbacks = kwargs.get("callbacks", trainer_cfg.get("callbacks")) or []
        callbacks = list(callbacks) if isinstance(callbacks, (list, tuple)) else [callbacks]
        enabled = kwargs.get("enable_progress_bar", trainer_cfg.get("enable_progress_bar"))
        if enabled is not False and not any(isinstance(cb, ProgressBar) for cb in callbacks):
            kwargs["callbacks"] = [*callbacks, FederatedProgressBar()]
        return super().instantiate_trainer(**kwargs)


def build_cli(args: list[str] | None = None, run: bool = True) -> FedPruneCLI:
    """Parse ``args`` (default: ``sys.argv``) and, with ``run=True``, run the subcommand."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    return FedPruneCLI(
        FederatedLightningModule,
        pl.LightningDataModule,
        subclass_mode_model=False,
        subclass_mode_data=True,
        trainer_defaults=TRAINER_DEFAULTS,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
        args=args,
        run=run,
    )


def main(args: list[str] | None = None) -> None:
    """Console entry point (``fedprune``, ``python -m lightning_fedprune``)."""
    build_cli(args)


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
