"""The private Lightning APIs this package relies on, in one place, so a Lightning upgrade breaks here only.

Each name has a test (tests/test_compat.py) that checks it still does what the package needs on the installed
Lightning.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.core.optimizer import _configure_optimizers as configure_optimizers  # noqa: F401
from lightning.pytorch.core.optimizer import (  # noqa: F401
    _configure_schedulers_automatic_opt as configure_schedulers_automatic,
)
from lightning.pytorch.core.optimizer import _configure_schedulers_manual_opt as configure_schedulers_manual  # noqa: F401
from lightning.pytorch.plugins.io.wrapper import _WrappingCheckpointIO as WrappingCheckpointIO  # noqa: F401
from lightning.pytorch.trainer.connectors.logger_connector.fx_validator import _FxValidator as FxValidator  # noqa: F401
from lightning.pytorch.utilities.model_helpers import _restricted_classmethod as restricted_classmethod  # noqa: F401

__all__ = ["FxValidator", "WrappingCheckpointIO", "configure_optimizers", "configure_schedulers_automatic",
           "configure_schedulers_manual", "count_optimizer_step", "restricted_classmethod"]


def count_optimizer_step(trainer: pl.Trainer) -> None:
    """Count one optimiser step of a manually optimised module, as ``LightningOptimizer.step`` would: a federated
    round is one Trainer step (``trainer.global_step``) whose update the strategy makes itself."""
    progress: Any = trainer.fit_loop.epoch_loop.manual_optimization.optim_step_progress
    progress.increment_ready()
    progress.increment_completed()
