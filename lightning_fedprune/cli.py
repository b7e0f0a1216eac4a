"""The ``fedprune`` command: a LightningCLI over FederatedLightningModule and the data modules.

    fedprune fit --config examples/quickstart.yaml
    fedprune fit --config examples/asr/digits_fp.yaml --trainer.max_steps 20
    fedprune fit --print_config
    fedprune export --ckpt_path runs/fedprune/version_0/checkpoints/last.ckpt --output model.ckpt
    fedprune ablate --config examples/ablation/grid.yaml --jobs 2

The task is a nested ``class_path`` (``--model.task.class_path``), data modules are chosen with
``--data.class_path``, and every callback is a ``--trainer.callbacks+=...`` entry. Unless the config
configures a ``ModelCheckpoint`` or disables checkpointing, ``fit`` saves ``ModelCheckpoint(save_last=True)``
checkpoints: Lightning's default one plus ``<log dir>/checkpoints/last.ckpt``. ``export`` is not a
LightningCLI subcommand: it writes the plain pruned task of a checkpoint for serving
(:func:`lightning_fedprune.federated.checkpoint.export_task_checkpoint`). Nor is ``ablate``: it runs a grid
of ``fedprune fit`` cells and writes the results page (:mod:`lightning_fedprune.ablation`, docs/ablation.md).
``fedprune --help`` lists both; ``fedprune export --help`` and ``fedprune ablate --help`` give their options.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
from argparse import RawDescriptionHelpFormatter
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from jsonargparse import DefaultHelpFormatter
from lightning.pytorch.cli import LightningCLI

from lightning_fedprune._compat import PARSE_CKPT_PATH, require_cli_hook
from lightning_fedprune.federated.checkpoint import (
    export_task_checkpoint,
    federated_hyperparameters,
    validate_checkpoint_file,
)
from lightning_fedprune.federated.module import FederatedLightningModule
from lightning_fedprune.validation import check_int

TRAINER_DEFAULTS: dict[str, Any] = {
    "log_every_n_steps": 1,  # one step is one federated round: log every round
    "logger": {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": "runs", "name": "fedprune"},
    },
}

#: The commands ``main`` runs itself, before LightningCLI (name -> one line for ``fedprune --help``).
OTHER_COMMANDS = {
    "export": "Write the plain, pruned task of a federated checkpoint as a Lightning checkpoint (for serving).",
    "ablate": "Run a grid of `fedprune fit` cells and write results.json, the results page and its figure.",
}


class _HelpFormatter(RawDescriptionHelpFormatter, DefaultHelpFormatter):
    """Keeps the line breaks of the epilog that lists :data:`OTHER_COMMANDS`."""


def _epilog() -> str:
    lines = ["more subcommands (add one followed by --help for its options):"]
    for name, text in OTHER_COMMANDS.items():
        wrapped = textwrap.wrap(text, 54)
        lines += [f"    {name:<20}{wrapped[0]}", *(" " * 24 + rest for rest in wrapped[1:])]
    return "\n".join(lines)


require_cli_hook(LightningCLI, PARSE_CKPT_PATH)  # FedPruneCLI._parse_ckpt_path overrides it


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

    def _parse_ckpt_path(self) -> None:
        """Checks the ``--ckpt_path`` file first (a clear error naming it).

        For ``fit`` the model is the configured one, not the checkpoint's hyperparameters: resuming
        compares the two and refuses or applies a difference (``--model.resume_config_change``)
        instead of silently keeping either. For ``validate``/``test``/``predict`` the checkpoint's
        hyperparameters override the configured model, as in LightningCLI, except a task recorded
        without its arguments (no ``save_hyperparameters``), which stays as configured.
        """
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        ckpt_path = self.config[subcommand].get("ckpt_path")
        validate_checkpoint_file(ckpt_path)
        if subcommand == "fit" or not ckpt_path or not Path(ckpt_path).is_file():
            return
        hparams = federated_hyperparameters(torch.load(ckpt_path, weights_only=True, map_location="cpu"))
        hparams.pop("_instantiator", None)
        if isinstance(hparams.get("task"), dict) and hparams["task"].get("init_args") is None:
            del hparams["task"]
        if hparams:
            self.config = self.parser.parse_object({subcommand: {"model": hparams}}, self.config)

    def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
        """Adds two defaults: :class:`FederatedProgressBar` as the progress bar (unless the progress bar
        is disabled or a progress bar callback is configured) and ``ModelCheckpoint(save_last=True)``, so
        ``<log dir>/checkpoints/last.ckpt`` exists after ``fit`` (unless checkpointing is disabled or a
        ``ModelCheckpoint`` is configured: that one is used as it is)."""
        from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar

        from lightning_fedprune.observers.progress import FederatedProgressBar

        trainer_cfg = self._get(self.config_init, "trainer", default={})
        callbacks = kwargs.get("callbacks", trainer_cfg.get("callbacks")) or []
        callbacks = list(callbacks) if isinstance(callbacks, (list, tuple)) else [callbacks]
        enabled = kwargs.get("enable_progress_bar", trainer_cfg.get("enable_progress_bar"))
        if enabled is not False and not any(isinstance(cb, ProgressBar) for cb in callbacks):
            callbacks.append(FederatedProgressBar())
        checkpointing = kwargs.get("enable_checkpointing", trainer_cfg.get("enable_checkpointing"))
        if checkpointing is not False and not any(isinstance(cb, ModelCheckpoint) for cb in callbacks):
            callbacks.append(ModelCheckpoint(save_last=True))
        kwargs["callbacks"] = callbacks
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
        parser_kwargs={
            "prog": "fedprune",
            "description": "Federated pruning with PyTorch Lightning: LightningCLI over FederatedLightningModule.",
            "epilog": _epilog(),
            "formatter_class": _HelpFormatter,
            # options by their full names only (jsonargparse's coming default): a renamed option must not
            # be read as an abbreviation of another
            "allow_abbrev": False,
            **{sub: {"allow_abbrev": False} for sub in ("fit", "validate", "test", "predict")},
        },
        args=args,
        run=run,
    )


def export_parser() -> argparse.ArgumentParser:
    """The parser of ``fedprune export``."""
    parser = argparse.ArgumentParser(
        prog="fedprune export",
        description="Write the plain, pruned task of a FederatedLightningModule checkpoint as a Lightning checkpoint "
                    "that `Task.load_from_checkpoint(output)` reads (for serving).")
    parser.add_argument("--ckpt_path", required=True,
                        help="checkpoint of a federated run (e.g. runs/fedprune/version_0/checkpoints/last.ckpt)")
    parser.add_argument("--output", required=True, help="where to write the task's checkpoint (a file path)")
    return parser


def command_parsers() -> dict[str, argparse.ArgumentParser]:
    """The argparse parsers of the commands ``main`` runs itself: ``export`` and ``ablate``."""
    from lightning_fedprune.ablation.command import _parser as ablate_parser

    parsers = {"export": export_parser(), "ablate": ablate_parser()}
    for parser in parsers.values():
        parser.allow_abbrev = False  # an option is its full name: a renamed option is not read as a shorter one
    return parsers


def export_main(args: list[str]) -> None:
    """``fedprune export --ckpt_path X --output Y``: the plain pruned task of checkpoint X, written to Y."""
    ns = command_parsers()["export"].parse_args(args)
    out = export_task_checkpoint(ns.ckpt_path, ns.output)
    print(f"wrote {out}")


def main(args: list[str] | None = None) -> None:
    """Console entry point (``fedprune``, ``python -m lightning_fedprune``)."""
    argv = sys.argv[1:] if args is None else list(args)
    if argv and argv[0] == "export":
        export_main(argv[1:])
        return
    if argv and argv[0] == "ablate":
        from lightning_fedprune.ablation import ablate_main

        code = ablate_main(argv[1:])
        if code:
            sys.exit(code)
        return
    build_cli(args)


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
