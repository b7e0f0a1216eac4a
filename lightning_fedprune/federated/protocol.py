"""The data model shared by the server, the executors and the clients.

Everything that crosses the server/client boundary is one of the typed dataclasses below: the
model travels only in wire form (:class:`~lightning_fedprune.federated.wire.Payload`: arrays plus a small
spec), everything else is numbers and strings — no module references and no decoded tensors — so
messages pickle to worker processes and map to Flower messages as they are. See ``docs/design.md``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lightning_fedprune.validation import check_bool, check_choice, check_float, check_int
from lightning_fedprune.federated.wire import Payload


def derive_seed(*parts: int) -> int:
    """A 63-bit seed that is a pure function of ``parts`` (e.g. ``(seed, round, client_id)``).

    >>> derive_seed(0, 1, 2) == derive_seed(0, 1, 2)
    True
    >>> derive_seed(0, 1, 2) != derive_seed(0, 2, 1)
    True
    """
    state = np.random.SeedSequence([int(p) & 0xFFFFFFFFFFFFFFFF for p in parts]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


@dataclass(frozen=True)
class ClientConfig:
    """How a client trains locally; the same for every client of a run, built once when fit starts
    (:func:`~lightning_fedprune.federated.client_config.client_config_for`) and never changed.

    ``local_steps`` counts optimiser steps (each of ``accumulate_grad_batches`` batches) with
    automatic optimisation and ``training_step`` calls with manual optimisation. ``precision`` is
    the Trainer's precision (the client trains under the same autocast / dtype as Lightning would).
    ``max_rounds`` and ``steps_per_round`` (an upper bound of one client's optimiser steps in a
    round) give the client's ``self.trainer.estimated_stepping_batches``; ``max_steps`` and
    ``max_epochs`` are the client's ``self.trainer.max_steps`` / ``max_epochs`` in federated time.
    ``payload_bits`` (8 or 4) makes the client send its update quantised (see
    ``FederatedLightningModule(payload_bits=...)``). ``device`` is where clients train (the server model's
    device, e.g. ``"cuda:0"``; an executor may place its workers elsewhere).
    """

    local_steps: int | None = None
    local_epochs: int | None = None
    gradient_clip_val: float | None = None
    gradient_clip_algorithm: str = "norm"
    compact: bool = True
    accumulate_grad_batches: int = 1
    precision: str = "32-true"
    max_rounds: int = -1
    steps_per_round: int = 0
    max_steps: int = -1
    max_epochs: int = -1
    payload_bits: int | None = None
    device: str = "cpu"

    def __post_init__(self) -> None:
        if (self.local_steps is None) == (self.local_epochs is None):
            raise ValueError("Give exactly one of `local_steps` or `local_epochs`.")
        set_ = object.__setattr__  # frozen: normalised once, here
        set_(self, "local_steps", check_int(self.local_steps, "local_steps", min=1, optional=True))
        set_(self, "local_epochs", check_int(self.local_epochs, "local_epochs", min=1, optional=True))
        set_(self, "gradient_clip_val", check_float(self.gradient_clip_val, "client_gradient_clip_val", min=0,
                                                    min_open=True, optional=True))
        check_choice(self.gradient_clip_algorithm, "client_gradient_clip_algorithm", ("norm", "value"))
        check_bool(self.compact, "compact_clients")
        check_choice(self.payload_bits, "payload_bits", (None, 8, 4))
        check_int(self.accumulate_grad_batches, "accumulate_grad_batches", min=1)
        set_(self, "device", str(self.device))


@dataclass
class OptimState:
    """Where the task's client optimisers stand in federated time: what a fresh client optimiser starts from.

    The server holds the task's optimisers and schedulers once (the *template*: what the
    LearningRateMonitor reads and checkpoints carry). Every client builds fresh optimiser state
    (no momentum from another client or round, as in FedAvg) but starts from the template's
    hyper-parameters and scheduler positions, so a learning-rate schedule runs across rounds as it
    would across epochs of centralised training. A client returns where it ended; the server adopts
    the position of the client that took the most optimiser steps.

    ``param_groups`` holds, per optimiser, every param group's hyper-parameters (without
    ``params``); ``schedulers`` the ``state_dict()`` of every scheduler in configuration order;
    ``global_step`` and ``epoch`` count client optimiser steps and local epochs in federated time
    (``self.trainer.global_step`` / ``current_epoch`` inside the client).
    """

    param_groups: list[list[dict[str, Any]]] = field(default_factory=list)
    schedulers: list[dict[str, Any]] = field(default_factory=list)
    global_step: int = 0
    epoch: int = 0


@dataclass
class LoggedValue:
    """One name a client logged with ``self.log`` during local training, reduced over its steps.

    ``value`` is the client's reduction (``reduce_fx`` over its logged steps, a mean weighted by
    batch size as Lightning's epoch mean; a torchmetrics object's ``compute()``); ``weight`` the
    examples behind it (what the server weights the cohort mean by). The options are the ones the
    task passed (Lightning's defaults for the hook it logged from), so the server logs the cohort
    value the way Lightning would (``X_step`` / ``X_epoch`` names, progress bar, logger).
    """

    value: float
    weight: float
    on_step: bool = True
    on_epoch: bool = False
    reduce_fx: str = "mean"
    prog_bar: bool = False
    logger: bool | None = None


@dataclass
class RoundPayload:
    """What the server broadcasts in one round, the same for every client of the cohort.

    ``encoded`` is the global model in wire form — pruned tensors as their kept values plus the kept
    indices, so a client reads the masks and patterns from it (:meth:`Payload.read
    <lightning_fedprune.federated.wire.Payload.read>`) and never sees a pruned value; ``optim`` is where the
    clients' optimisers start (see :class:`OptimState`).
    """

    round: int
    encoded: Payload
    optim: OptimState = field(default_factory=OptimState)


@dataclass
class ClientPlan:
    """One client's job in a round. ``payload`` is a broadcast of its own when the strategy gives this
    client a different sub-model (e.g. Federated Dropout, :meth:`Strategy.configure
    <lightning_fedprune.federated.strategies.Strategy.configure>`); None means the round's broadcast.

    ``statistics`` asks the client for statistics it accumulates over its local steps and uploads with its
    update, ``{statistic: parameter names}`` (a name of :data:`~lightning_fedprune.pruning.statistics.CLIENT_STATISTICS`,
    e.g. ``{"sq_gradient": (...)}``: PruneFL's importance); those parameters train masked-dense (a compact layer
    has no pruned entries to take a gradient of). ``forward_scales`` (``{parameter name: factor}``) makes the
    client's forward read those parameters multiplied by the factor, the stored values unchanged: the gradient
    reaching them is multiplied by it too, exactly as if the parameter's input were scaled (Federated Dropout's
    inverted-dropout scaling of the kept units, ``1 / (1 - p)``, on the weights that read them).
    """

    client_id: int
    round: int
    seed: int
    payload: RoundPayload | None = None
    statistics: dict[str, tuple[str, ...]] = field(default_factory=dict)
    forward_scales: dict[str, float] = field(default_factory=dict)


@dataclass
class ClientResult:
    """What one client returns.

    ``payload`` is the client's trained parameters and buffers in wire form — the kept entries only
    (the server knows the masks, so no index travels up); the server decodes it. ``statistics`` holds what the
    plan asked for (:attr:`ClientPlan.statistics`): per statistic a payload of dense float32 tensors, one per
    parameter, counted in :attr:`bytes_up`. ``num_samples`` is the
    client's dataset size, ``num_examples`` the examples it processed (the strategy chooses which one
    weighs the client in the aggregate), ``loss`` its mean training loss. ``logged`` holds what the task logged with
    ``self.log`` during local training, reduced over the client's steps; ``optim`` where its
    optimisers and schedulers ended (see :class:`OptimState`). ``error`` is set when the client
    failed (an exception, or a non-finite loss); then there is no payload.

    Attributes:
        client_id: the client.
        round: the round it trained in.
        payload: its trained parameters and buffers in wire form (kept entries only); None when it failed.
        num_samples: its dataset size (FedAvg's aggregation weight).
        num_examples: examples it processed in the round.
        loss: its mean training loss.
        logged: what the task logged with ``self.log``, reduced over the client's steps.
        optim: where its optimisers and schedulers ended.
        seconds: wall time of its local training.
        error: why it failed (None: it succeeded).
        statistics: the statistics the plan asked for, ``{statistic: payload}`` (wire form).
    """

    client_id: int
    round: int
    payload: Payload | None = None
    num_samples: int = 0
    num_examples: int = 0
    loss: float = float("nan")
    logged: dict[str, LoggedValue] = field(default_factory=dict)
    optim: OptimState | None = None
    seconds: float = 0.0
    error: str | None = None
    statistics: dict[str, Payload] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def bytes_up(self) -> int:
        """Bytes of the upload: what the payload's arrays hold, and the statistics' arrays."""
        update = self.payload.nbytes if self.payload is not None else 0
        return update + sum(p.nbytes for p in self.statistics.values())
