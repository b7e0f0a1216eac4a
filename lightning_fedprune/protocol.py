"""The data model shared by the server, the executors and the clients.

Everything that crosses the server/client boundary is one of the plain dataclasses below: tensors,
numbers and strings only (no module references), so they pickle to worker processes and map to
Flower messages. See ``docs/design.md``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lightning_fedprune.validation import check_bool, check_choice, check_float, check_int


def derive_seed(*parts: int) -> int:
    """A 63-bit seed that is a pure function of ``parts`` (e.g. ``(seed, round, client_id)``).

    >>> derive_seed(0, 1, 2) == derive_seed(0, 1, 2)
    True
    >>> derive_seed(0, 1, 2) != derive_seed(0, 2, 1)
    True
    """
    state = np.random.SeedSequence([int(p) & 0xFFFFFFFFFFFFFFFF for p in parts]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


@dataclass
class ClientConfig:
    """How a client trains locally; the same for every client of a run."""

    local_steps: int | None = None
    local_epochs: int | None = None
    gradient_clip_val: float | None = None
    gradient_clip_algorithm: str = "norm"
    compact: bool = True

    def __post_init__(self) -> None:
        if (self.local_steps is None) == (self.local_epochs is None):
            raise ValueError("Give exactly one of `local_steps` or `local_epochs`.")
        self.local_steps = check_int(self.local_steps, "local_steps", min=1, optional=True)
        self.local_epochs = check_int(self.local_epochs, "local_epochs", min=1, optional=True)
        self.gradient_clip_val = check_float(self.gradient_clip_val, "client_gradient_clip_val", min=0, min_open=True,
                                             optional=True)
        check_choice(self.gradient_clip_algorithm, "client_gradient_clip_algorithm", ("norm", "value"))
        check_bool(self.compact, "compact_clients")


@dataclass
class RoundPayload:
    """What the server broadcasts in one round: the same for every client of the cohort.

    ``state`` holds the global parameters and buffers by name, with pruned entries already set to
    exact zeros; ``masks``/``patterns`` describe the pruned parameters (``True`` = kept).
    ``max_rounds`` and ``round`` are exposed to the task as ``self.trainer.max_steps`` /
    ``self.trainer.global_step``.
    """

    round: int
    state: dict[str, Tensor]
    masks: dict[str, Tensor] = field(default_factory=dict)
    patterns: dict[str, str] = field(default_factory=dict)
    max_rounds: int = -1
    encoded: Any = None  # the wire form (lightning_fedprune.wire.Payload) of ``state``; its nbytes is what travels down

    def for_transport(self) -> RoundPayload:
        """The payload as it crosses a process boundary: the wire form only, no decoded tensors."""
        return RoundPayload(self.round, {}, self.masks, self.patterns, self.max_rounds, self.encoded)


@dataclass
class ClientPlan:
    """One client's job in a round."""

    client_id: int
    round: int
    seed: int


@dataclass
class ClientResult:
    """What one client returns.

    ``state`` holds the client's final parameters (kept entries; pruned entries are exact zeros)
    and buffers in full coordinates; on the way to the server it travels as ``payload`` (the
    wire form, kept entries only) and the server decodes it back into ``state``. ``weight`` is the aggregation weight (the client's dataset
    size by default), ``num_examples`` the examples it processed. ``metrics`` are the means of the
    values the task logged with ``self.log`` during local training. ``error`` is set when the
    client failed; then ``state`` is empty.
    """

    client_id: int
    round: int
    state: dict[str, Tensor] = field(default_factory=dict)
    weight: float = 0.0
    num_examples: int = 0
    num_steps: int = 0
    loss: float = float("nan")
    metrics: dict[str, float] = field(default_factory=dict)
    log_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    seconds: float = 0.0
    payload: Any = None  # the wire form of ``state`` sent up (kept entries only); decoded by the server
    bytes_up: int = 0
    error: str | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None

    def check_finite(self, values: bool = True) -> None:
        """Turn a result with a NaN/Inf loss (or, with ``values``, state) into a failed one (in place)."""
        if self.error is not None:
            return
        if not math.isfinite(self.loss):
            self.error = f"non-finite loss {self.loss}"
        elif values:
            for name, value in self.state.items():
                if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                    self.error = f"non-finite values in {name!r}"
                    break
        if self.error is not None:
            self.state = {}
