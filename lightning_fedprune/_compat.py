"""The private Lightning APIs this package relies on, in one place.

Lightning does not promise to keep names that start with ``_``. Every one the package uses is
imported (or checked) here, and ``tests/test_compat.py`` checks that each still does what the
package needs on the installed Lightning, so a Lightning upgrade that moves or changes one fails
here, with a message naming it, and in that test file -- not somewhere deep in a run.

* `_restricted_classmethod`: `FederatedLightningModule.load_from_checkpoint` keeps Lightning's
  "call it on the class" check;
* `_FxValidator`: client-side `self.log` -- which hooks may log, and each hook's default
  `on_step`/`on_epoch`;
* `_WrappingCheckpointIO`: the CheckpointIO that validates a file before loading it;
* `_configure_optimizers`, `_configure_schedulers_automatic_opt`, `_configure_schedulers_manual_opt`:
  a client normalises `configure_optimizers`' return value exactly as the Trainer does;
* `_PATH`, `_MAP_LOCATION_TYPE`: the annotations of `load_from_checkpoint` (defined here when
  Lightning has none);
* `LightningCLI._parse_ckpt_path`: `fedprune`'s checkpoint check and hyperparameter rules
  (`lightning_fedprune.cli.FedPruneCLI` overrides it; `require_cli_hook` checks it exists);
* the manual-optimisation loop's step progress (`count_optimizer_step`): a federated round is one Trainer
  step whose update the strategy makes itself, counted as `LightningOptimizer.step` counts one;
* the logger connector's callback / progress-bar metrics and `log_metrics` (`log_step_metrics`): a round's
  own scalars reach the loggers without `self.log`'s per-value bookkeeping (a few hundred microseconds each).
"""

from __future__ import annotations

import os
from typing import Any, Callable, Union

import lightning
import torch


def _missing(what: str, err: BaseException) -> ImportError:
    return ImportError(
        f"lightning-fedprune uses Lightning's private `{what}`, which lightning {lightning.__version__} does not "
        f"provide ({type(err).__name__}: {err}). Install a Lightning release this package supports, or update "
        "lightning_fedprune/_compat.py."
    )


try:
    from lightning.pytorch.utilities.model_helpers import _restricted_classmethod
except ImportError as err:  # pragma: no cover - depends on the installed Lightning
    raise _missing("lightning.pytorch.utilities.model_helpers._restricted_classmethod", err) from err

try:
    from lightning.pytorch.trainer.connectors.logger_connector.fx_validator import _FxValidator
except ImportError as err:  # pragma: no cover
    raise _missing("lightning.pytorch.trainer.connectors.logger_connector.fx_validator._FxValidator", err) from err

try:
    from lightning.pytorch.plugins.io.wrapper import _WrappingCheckpointIO
except ImportError as err:  # pragma: no cover
    raise _missing("lightning.pytorch.plugins.io.wrapper._WrappingCheckpointIO", err) from err

try:
    from lightning.pytorch.core.optimizer import (
        _configure_optimizers,
        _configure_schedulers_automatic_opt,
        _configure_schedulers_manual_opt,
    )
except ImportError as err:  # pragma: no cover
    raise _missing("lightning.pytorch.core.optimizer._configure_*", err) from err

try:
    from lightning.fabric.utilities.types import _MAP_LOCATION_TYPE, _PATH
except ImportError:  # pragma: no cover - annotations only: the same meaning, defined here
    _PATH = Union[str, "os.PathLike[str]"]  # type: ignore[misc]
    _MAP_LOCATION_TYPE = Union[  # type: ignore[misc]
        None, str, torch.device, int, Callable[[Any, str], Any], dict[Any, Any]
    ]

#: The LightningCLI method that reads ``--ckpt_path`` between parsing and instantiation.
PARSE_CKPT_PATH = "_parse_ckpt_path"


def require_cli_hook(cli_class: type, name: str = PARSE_CKPT_PATH) -> None:
    """Raise ``ImportError`` when ``cli_class`` (LightningCLI) no longer has the method ``name`` that a
    subclass overrides: the override would otherwise be skipped without a word."""
    if not callable(getattr(cli_class, name, None)):
        raise _missing(f"{cli_class.__module__}.{cli_class.__qualname__}.{name}",
                       AttributeError(f"{cli_class.__qualname__} has no method {name!r}"))


def log_step_metrics(trainer: Any, values: dict[str, float], prog_bar: Any = ()) -> None:
    """Log plain numbers of the current training step as ``self.log(name, value, on_step=True, on_epoch=False)``
    would, without its per-call bookkeeping: into ``trainer.callback_metrics`` (tensors) and, for the names in
    ``prog_bar``, ``trainer.progress_bar_metrics``; to every logger when Lightning logs this step
    (``log_every_n_steps``), at the step Lightning's own step metrics get (the logger connector's ``log_metrics``);
    ``trainer.logged_metrics`` holds the latest values, as for ``self.log``.
    """
    connector = trainer._logger_connector
    tensors = {name: torch.tensor(float(value)) for name, value in values.items()}
    connector._callback_metrics.update(tensors)
    connector._logged_metrics.update(tensors)  # trainer.logged_metrics: the latest step values, loggers or not
    connector._progress_bar_metrics.update({name: float(values[name]) for name in prog_bar if name in values})
    if trainer.loggers and connector.should_update_logs:
        connector.log_metrics(tensors)


def count_optimizer_step(trainer: Any) -> None:
    """Count one optimiser step of a manually optimised module (``trainer.global_step`` + 1), as
    ``LightningOptimizer.step`` does through the manual-optimisation loop's step progress."""
    progress = trainer.fit_loop.epoch_loop.manual_optimization.optim_step_progress
    progress.increment_ready()
    progress.increment_completed()


__all__ = [
    "PARSE_CKPT_PATH",
    "count_optimizer_step",
    "log_step_metrics",
    "_FxValidator",
    "_MAP_LOCATION_TYPE",
    "_PATH",
    "_WrappingCheckpointIO",
    "_configure_optimizers",
    "_configure_schedulers_automatic_opt",
    "_configure_schedulers_manual_opt",
    "_restricted_classmethod",
    "require_cli_hook",
]
