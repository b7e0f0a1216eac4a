"""FlowerExecutor: a round's clients as Flower messages, inside a Flower ServerApp.

The server loop, the callbacks, logging and checkpoints stay those of the Trainer in the ServerApp's
process; only step 3 of the round (the clients train) goes through Flower's ``Grid``: every
:class:`~lightning_fedprune.federated.protocol.ClientPlan` becomes a ``train`` message to the node that
holds the client, and every reply is checked and read back into a
:class:`~lightning_fedprune.federated.protocol.ClientResult` (:mod:`.messages` has the record layout).
A reply that is missing after ``round_timeout``, an error reply or a malformed one fails that client
exactly as an in-process failure does (left out of the aggregate, with a warning); nothing else is lost.

Which node holds which client is asked once, at ``setup``: every node answers a discovery query
with the client ids its node config gives it (``partition-id``/``num-partitions`` in Flower's
simulation, ``clients`` in a deployment; see docs/flower.md).
"""

from __future__ import annotations

import importlib.util
import time
import uuid
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl

from lightning_fedprune.federated.client import ClientData
from lightning_fedprune.federated.executors import Executor, ResultCallback
from lightning_fedprune.federated.protocol import ClientConfig, ClientPlan, ClientResult, RoundPayload
from lightning_fedprune.validation import check_float

INSTALL_HINT = "Flower is an optional extra: pip install 'lightning-fedprune[flower]' (flwr[simulation] 1.42)."


def require_flower() -> None:
    """Raise ImportError with the install command when ``flwr`` is not installed."""
    if importlib.util.find_spec("flwr") is None:
        raise ImportError(f"executor='flower' needs the `flwr` package, which is not installed. {INSTALL_HINT}")


class FlowerExecutor(Executor):
    """Runs every round's clients on Flower nodes (Flower's simulation engine or real SuperNodes).

    It works inside a Flower ``ServerApp``, which gives it the ``Grid`` (:meth:`attach`); the app in
    ``examples/flower`` builds the Trainer and the module from a ``fedprune`` YAML and attaches it, so
    ``executor: flower`` (or this class) in a YAML that runs elsewhere fails at ``setup`` with a pointer
    to ``flwr run``. Nodes build the task and their clients' data from the same YAML (shipped with
    every job) and train with the same client loop as in-process runs (:class:`ClientRunner`, one per
    node process, reused across rounds). ``comm/bytes_down``/``bytes_up`` are the serialized sizes of
    the messages sent and received (:func:`~lightning_fedprune.federated.flower.messages.message_nbytes`).

    Args:
        round_timeout: seconds a round may take from sending its jobs to the last reply; a client
            without a reply by then fails (also the messages' time to live on the SuperLink).
        node_timeout: seconds ``setup`` waits for nodes to connect and to answer which clients they
            hold; it fails, naming the clients no node holds, when they are not all held by then.
        poll_interval: the longest pause between two pulls of replies (the pause is a twentieth of the round
            so far, so that waiting for a reply adds at most ~5 % to a round).
    """

    def __init__(self, round_timeout: float = 600.0, node_timeout: float = 120.0, poll_interval: float = 0.5) -> None:
        require_flower()
        self.round_timeout = check_float(round_timeout, "round_timeout", min=0, min_open=True)
        self.node_timeout = check_float(node_timeout, "node_timeout", min=0, min_open=True)
        self.poll_interval = check_float(poll_interval, "poll_interval", min=0, min_open=True)
        self._grid: Any = None
        self._app: dict[str, Any] = {}
        self._setup: dict[str, Any] = {}
        self._owners: dict[int, int] = {}  # client id -> node id
        self._token = ""  # tells this fit's payloads apart from another's on a node (its payload cache)
        self._traffic: tuple[int, int] | None = None

    def attach(self, grid: Any, app: Mapping[str, Any] | None = None) -> None:
        """Give the executor the ServerApp's ``Grid`` and the ``app`` fields every job carries to the nodes
        (how they build the task and data: e.g. ``{"config": <YAML text>, "overrides": [...]}``; values are
        Flower ConfigRecord values)."""
        from flwr.serverapp import Grid

        if not isinstance(grid, Grid):
            raise TypeError(f"`grid` must be a flwr.serverapp.Grid, got {type(grid).__name__}.")
        self._grid = grid
        self._app = dict(app or {})

    @property
    def owners(self) -> dict[int, int]:
        """``{client id: node id}``: where each client trains (found at ``setup``)."""
        return dict(self._owners)

    # ------------------------------------------------------------------ the seam
    def setup(self, task: pl.LightningModule, data: ClientData, config: ClientConfig) -> None:
        from lightning_fedprune.federated.flower import messages as m

        if self._grid is None:
            raise RuntimeError(
                "executor='flower' runs inside a Flower ServerApp, which gives it the Grid: run the YAML with "
                "`flwr run examples/flower --run-config 'config=\"<your.yaml>\"'` (see docs/flower.md), "
                "or use executor='sequential' / 'process'."
            )
        self._setup = m.setup_fields(config, self._app)
        self._token = uuid.uuid4().hex[:12]
        partitions = getattr(data, "partitions", None)
        self._owners = self._discover(len(partitions) if partitions is not None else None)

    def run(self, payload: RoundPayload, plans: Sequence[ClientPlan], on_result: ResultCallback | None = None) -> list[ClientResult]:
        from flwr.app import Message
        from flwr.supercore.inflatable.inflatable_object import no_object_id_recompute

        from lightning_fedprune.federated.flower import messages as m

        if self._grid is None or not self._setup:
            raise RuntimeError("FlowerExecutor.run called before setup")
        results: list[ClientResult | None] = [None] * len(plans)
        down = up = 0

        def finish(index: int, result: ClientResult) -> None:
            results[index] = result
            if on_result is not None:
                on_result(result)

        # the jobs: a broadcast's arrays, spec and optimiser state are built once and shared by its clients (and
        # their objects' ids, hashed for the sizes, are computed once per round)
        built: dict[int, tuple[Any, bytes, bytes, str, m.Expected]] = {}
        jobs: list[tuple[int, ClientPlan, int, Any, m.Expected]] = []
        with no_object_id_recompute():
            for index, plan in enumerate(plans):
                sent = plan.payload or payload
                node = self._owners.get(plan.client_id)
                if node is None:
                    finish(index, ClientResult(plan.client_id, plan.round,
                                               error=f"no Flower node holds client {plan.client_id}"))
                    continue
                if id(sent) not in built:
                    arrays, spec = m.payload_record(sent.encoded)
                    built[id(sent)] = (arrays, spec, m.dump_state(sent.optim),
                                       f"{self._token}:{sent.round}:{len(built)}", m.Expected(sent.encoded))
                arrays, spec, optim, payload_id, expected = built[id(sent)]
                content = m.instruction(arrays, spec, optim, plan, payload_id, self._setup)
                message = Message(content, node, m.TRAIN, ttl=self.round_timeout, group_id=str(plan.round))
                down += m.message_nbytes(message)
                jobs.append((index, plan, node, message, expected))
        pushed = {mid for mid in self._grid.push_messages([job[3] for job in jobs]) if mid}
        pending: dict[str, tuple[int, ClientPlan, int, m.Expected]] = {}
        for index, plan, node, message, expected in jobs:
            if message.metadata.message_id in pushed:
                pending[message.metadata.message_id] = (index, plan, node, expected)
            else:
                finish(index, ClientResult(plan.client_id, plan.round,
                                           error=f"the job could not be sent to Flower node {node} (push failed)"))
        # the replies, as they come, until every job has one or the round's time is up
        start = time.monotonic()
        deadline = start + self.round_timeout
        while pending:
            for reply in self._grid.pull_messages(list(pending)):
                job = pending.pop(reply.metadata.reply_to_message_id, None)
                if job is None:  # not a reply to a job of this round (or a second reply): ignored
                    continue
                index, plan, node, expected = job
                with no_object_id_recompute():
                    up += m.message_nbytes(reply)
                try:
                    result = m.read_reply(reply, plan, node, expected)
                except m.RejectedReply as err:
                    result = ClientResult(plan.client_id, plan.round,
                                          error=f"the reply of Flower node {node} was rejected: {err}")
                finish(index, result)
            left = deadline - time.monotonic()
            if pending and left <= 0:
                for index, plan, node, _ in pending.values():
                    finish(index, ClientResult(plan.client_id, plan.round, error=(
                        f"no reply from Flower node {node} within round_timeout={self.round_timeout:g} s")))
                break
            if pending:  # pull again after a twentieth of the round so far: waiting adds at most ~5 % to a round
                time.sleep(min(max((time.monotonic() - start) / 20, 0.001), self.poll_interval, left))
        self._traffic = (down, up)
        return results  # type: ignore[return-value]  # every position was filled

    def traffic(self) -> tuple[int, int] | None:
        return self._traffic

    def teardown(self) -> None:
        self._owners = {}
        self._setup = {}
        self._traffic = None

    # ------------------------------------------------------------------ which node holds which client
    def _discover(self, num_clients: int | None) -> dict[int, int]:
        """Ask every node which clients it holds, until all ``num_clients`` are held (or, when the number is
        unknown, until a node answered) or ``node_timeout`` passes."""
        from flwr.app import ConfigRecord, Message, RecordDict

        from lightning_fedprune.federated.flower import messages as m

        deadline = time.monotonic() + self.node_timeout
        held: dict[int, list[int]] = {}  # node -> its clients
        failed: dict[int, str] = {}
        asked: dict[str, int] = {}  # message id -> node
        while True:
            new = [n for n in self._grid.get_node_ids() if n not in held and n not in failed and n not in asked.values()]
            if new:
                query = [Message(RecordDict({m.CONFIG: ConfigRecord({"num-clients": -1 if num_clients is None else num_clients})}),
                                 node, m.CLIENTS_QUERY, ttl=self.node_timeout, group_id="setup") for node in new]
                for message, mid in zip(query, self._grid.push_messages(query)):
                    if mid:
                        asked[message.metadata.message_id] = message.metadata.dst_node_id
            for reply in self._grid.pull_messages(list(asked)) if asked else ():
                node = asked.pop(reply.metadata.reply_to_message_id, None)
                if node is None:
                    continue
                clients = _clients_of(reply, m.CONFIG)
                if isinstance(clients, str):
                    failed[node] = clients
                else:
                    held[node] = clients
            owners = _owners(held)
            complete = (all(c in owners for c in range(num_clients)) if num_clients is not None
                        else bool(held) and not asked)
            if complete or time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        for node, why in failed.items():
            warnings.warn(f"Flower node {node} holds no clients: {why}", stacklevel=3)
        if num_clients is not None:
            missing = [c for c in range(num_clients) if c not in owners]
            if missing:
                shown = ", ".join(map(str, missing[:20])) + (f" and {len(missing) - 20} more" if len(missing) > 20 else "")
                raise RuntimeError(
                    f"No Flower node holds clients {shown} (of {num_clients}) after node_timeout={self.node_timeout:g} s: "
                    f"{len(held)} node(s) answered ({len(asked)} did not, {len(failed)} failed). In simulation every "
                    "client needs a SuperNode partition (num-supernodes); in a deployment give every client to a "
                    "SuperNode with --node-config 'clients=\"...\"' (see docs/flower.md)."
                )
        elif not owners:
            raise RuntimeError(f"No Flower node answered which clients it holds within node_timeout={self.node_timeout:g} s.")
        return owners


def _clients_of(reply: Any, config_key: str) -> list[int] | str:
    """The client ids of a node's answer to the discovery query, or why there are none."""
    if reply.has_error():
        return f"Flower error {reply.error.code}: {reply.error.reason}"
    record = reply.content.get(config_key)
    if record is None:
        return "its answer has no client list"
    if "error" in record:
        return str(record["error"])
    clients = record.get("clients")
    if not isinstance(clients, list) or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in clients):
        return f"its client list is malformed ({clients!r})"
    return clients


def _owners(held: Mapping[int, list[int]]) -> dict[int, int]:
    """``{client: node}``; a client two nodes claim is an error (its data would be in two places)."""
    owners: dict[int, int] = {}
    for node, clients in held.items():
        for c in clients:
            if c in owners and owners[c] != node:
                raise RuntimeError(f"Flower nodes {owners[c]} and {node} both hold client {c}: give every client to "
                                   "one node (node config `clients` / `partition-id`).")
            owners[c] = node
    return owners
