"""The clients' configuration, built once from the module's settings and the Trainer's.

:class:`ClientSettings` are the module's own arguments (validated at construction). Some Trainer settings
apply inside every client instead of on the server, whose step is an average: gradient clipping and gradient
accumulation are moved from the Trainer into the clients (:func:`adopt_trainer_settings`, before Lightning
checks the loop configuration), the Trainer's precision is the clients' precision, and the run's length gives
the clients' ``self.trainer.max_steps`` / ``estimated_stepping_batches`` in federated time.
:func:`client_config_for` turns all of it into the frozen :class:`~lightning_fedprune.federated.protocol.ClientConfig`
the executors ship to every client.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_fedprune.federated.precision import CLIENT_PRECISIONS
from lightning_fedprune.federated.protocol import ClientConfig
from lightning_fedprune.validation import check_bool, check_choice, check_float, check_int

__all__ = ["ClientSettings", "TrainerClientSettings", "adopt_trainer_settings", "check_one_device", "client_config_for"]


@dataclass(frozen=True)
class ClientSettings:
    """The module's client-side arguments (``FederatedLightningModule(local_steps=..., ...)``)."""

    local_steps: int | None = None
    local_epochs: int | None = None
    gradient_clip_val: float | None = None
    gradient_clip_algorithm: str = "norm"
    compact: bool = True
    payload_bits: int | None = None

    def __post_init__(self) -> None:
        if self.local_steps is None and self.local_epochs is None:
            object.__setattr__(self, "local_epochs", 1)
        if self.local_steps is not None and self.local_epochs is not None:
            raise ValueError("Give exactly one of `local_steps` or `local_epochs`.")
        object.__setattr__(self, "local_steps", check_int(self.local_steps, "local_steps", min=1, optional=True))
        object.__setattr__(self, "local_epochs", check_int(self.local_epochs, "local_epochs", min=1, optional=True))
        object.__setattr__(self, "gradient_clip_val", check_float(self.gradient_clip_val, "client_gradient_clip_val",
                                                                  min=0, min_open=True, optional=True))
        check_choice(self.gradient_clip_algorithm, "client_gradient_clip_algorithm", ("norm", "value"))
        check_bool(self.compact, "compact_clients")
        check_choice(self.payload_bits, "payload_bits", (None, 8, 4))


@dataclass(frozen=True)
class TrainerClientSettings:
    """The Trainer's settings that apply inside the clients (taken from the Trainer by :func:`adopt_trainer_settings`)."""

    gradient_clip_val: float | None = None
    gradient_clip_algorithm: str | None = None
    accumulate_grad_batches: int = 1


def adopt_trainer_settings(trainer: pl.Trainer, settings: ClientSettings, manual: bool) -> TrainerClientSettings:
    """Move the Trainer's gradient clipping and accumulation into the clients' configuration (the server itself
    never clips or accumulates: its step is an average, and Lightning refuses both for a manually optimised
    module), and let an integer ``val_check_interval`` longer than an epoch count rounds across epochs."""
    clip = trainer.gradient_clip_val
    adopted_clip, adopted_algorithm = None, None
    if clip is not None and clip > 0:
        if manual:
            raise MisconfigurationException(
                f"`Trainer(gradient_clip_val={clip!r})`: the task uses manual optimisation, for which Lightning "
                "does not clip automatically; call `self.clip_gradients(opt, gradient_clip_val=...)` in its "
                "`training_step` instead."
            )
        if settings.gradient_clip_val is not None and settings.gradient_clip_val != clip:
            raise MisconfigurationException(
                f"`Trainer(gradient_clip_val={clip!r})` and `FederatedLightningModule(client_gradient_clip_val="
                f"{settings.gradient_clip_val!r})` disagree; give only one of them (both clip inside the clients)."
            )
        adopted_clip = float(clip)
        if trainer.gradient_clip_algorithm is not None:
            adopted_algorithm = str(trainer.gradient_clip_algorithm.value)
        trainer.gradient_clip_val = None
        trainer.gradient_clip_algorithm = None
    accumulate = trainer.accumulate_grad_batches
    if accumulate != 1:
        if manual:
            raise MisconfigurationException(
                f"`Trainer(accumulate_grad_batches={accumulate})`: the task uses manual optimisation, for which "
                "Lightning does not accumulate automatically; accumulate in its `training_step` instead."
            )
        trainer.accumulate_grad_batches = 1
    rounds_per_epoch = getattr(trainer.datamodule, "rounds_per_epoch", None) or 1
    interval = trainer.val_check_interval
    if isinstance(interval, int) and trainer.check_val_every_n_epoch is not None and interval > rounds_per_epoch:
        trainer.check_val_every_n_epoch = None  # `val_check_interval=N` means "every N rounds", across epochs too
    return TrainerClientSettings(adopted_clip, adopted_algorithm, int(accumulate))


def check_one_device(trainer: Any) -> None:
    """A federated run is one server process on one device: refuse ``Trainer(devices>1)`` / ``num_nodes>1`` with
    what to use instead."""
    if trainer.num_devices > 1 or trainer.num_nodes > 1:
        raise ValueError(
            f"A federated run uses one Trainer device (got devices={trainer.num_devices}, num_nodes="
            f"{trainer.num_nodes}): the server is one process. To train clients on several GPUs of this machine use "
            "`executor=ProcessPoolExecutor(devices=['cuda:0', 'cuda:1', ...])` (one worker per GPU); across "
            "machines, executor='flower' (docs/flower.md, docs/gpu.md).")


def client_config_for(settings: ClientSettings, adopted: TrainerClientSettings, trainer: pl.Trainer, datamodule: Any,
                      device: Any = "cpu") -> ClientConfig:
    """The frozen client configuration of a fit: the module's settings, the Trainer's adopted ones, its
    precision, and the run's length in federated time (for ``self.trainer.max_steps`` and
    ``estimated_stepping_batches`` inside the clients)."""
    precision = str(trainer.precision)
    if precision not in CLIENT_PRECISIONS:
        raise ValueError(f"`Trainer(precision={precision!r})`: clients train in one of {CLIENT_PRECISIONS}.")
    rounds_per_epoch = getattr(datamodule, "rounds_per_epoch", None) or 1
    max_epochs = trainer.max_epochs if trainer.max_epochs is not None else -1
    if trainer.max_steps is not None and trainer.max_steps > 0:
        max_rounds = trainer.max_steps
    elif max_epochs > 0:
        max_rounds = max_epochs * rounds_per_epoch
    else:
        max_rounds = -1
    accumulate = adopted.accumulate_grad_batches
    if settings.local_steps is not None:
        steps = settings.local_steps
    else:
        batches = getattr(datamodule, "max_client_batches", 0) or 0
        steps = settings.local_epochs * math.ceil(batches / accumulate) if batches else 0
    return ClientConfig(
        local_steps=settings.local_steps,
        local_epochs=settings.local_epochs,
        gradient_clip_val=adopted.gradient_clip_val if adopted.gradient_clip_val is not None else settings.gradient_clip_val,
        gradient_clip_algorithm=adopted.gradient_clip_algorithm or settings.gradient_clip_algorithm,
        compact=settings.compact,
        accumulate_grad_batches=accumulate,
        precision=precision,
        max_rounds=max_rounds,
        steps_per_round=steps,
        max_steps=max_rounds * steps if trainer.max_steps is not None and trainer.max_steps > 0 and steps else -1,
        max_epochs=max_epochs * rounds_per_epoch * (settings.local_epochs or 1) if max_epochs > 0 else -1,
        payload_bits=settings.payload_bits,
        device=str(device),
    )
