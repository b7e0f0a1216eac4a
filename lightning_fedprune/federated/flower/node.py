"""What runs on a Flower node: the ClientApp's side of fedprune's messages.

:class:`FlowerNode` answers the discovery query (which clients this node holds) and trains those
clients with the same :class:`~lightning_fedprune.federated.client.ClientRunner` as an in-process run
— one per process, built once from the job's ``app`` fields by a *builder* (the app's: it turns the
fedprune YAML into the task and the clients' data) and reused across rounds.

Which clients a node holds comes from its node config:

* ``clients``: the client ids, e.g. ``"0,1,2"`` or ``"0-4"`` (a deployment's SuperNodes);
* otherwise ``partition-id`` / ``num-partitions`` (what Flower's simulation gives every node): the
  clients ``c`` with ``c % num-partitions == partition-id``;
* ``local-clients`` (optional, with ``clients``): the index of each of them in the data this node builds,
  when its data holds only its own clients (``overrides`` pointing at the node's own corpus);
* ``device`` (optional): where the node's clients train, e.g. ``"cuda:0"`` (its GPU); default the server's
  client device if this machine has it, else the CPU;
* ``overrides``: extra ``fedprune`` arguments for this node only (e.g. ``--data.init_args.root=...``).

A SuperNode of Flower 1.42 starts a new ClientApp process for every message, which would rebuild
the task and import torch for every client of every round; :func:`serve` keeps one FlowerNode alive
in a worker process instead, and the app's ClientApp hands it each message over a Unix socket
(node config ``worker``, see docs/flower.md).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import stat
import time
import traceback
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from flwr.app import ConfigRecord, RecordDict
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents

from lightning_fedprune.federated.client import ClientData, ClientRunner
from lightning_fedprune.federated.flower.messages import CONFIG, Job, deflate, read_job, reply_content
from lightning_fedprune.federated.protocol import ClientResult, RoundPayload

#: ``build(app, node_config) -> (task, client data)``: how a node makes its task and its clients' data.
Builder = Callable[[Mapping[str, Any], Mapping[str, Any]], tuple[pl.LightningModule, ClientData]]


def parse_ids(value: Any, key: str) -> list[int]:
    """Client ids of a node config value: an int, or a string of ids and ranges (``"0,2,5-7"``).

    >>> parse_ids("0, 2,5-7", "clients")
    [0, 2, 5, 6, 7]
    >>> parse_ids(3, "clients")
    [3]
    """
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return [value]
    ids: list[int] = []
    try:
        for part in str(value).replace(" ", "").split(","):
            if not part:
                continue
            first, _, last = part.partition("-")
            ids.extend(range(int(first), int(last or first) + 1))
    except ValueError:
        ids = [-1]
    if isinstance(value, bool) or not isinstance(value, (int, str)) or any(i < 0 for i in ids):
        raise ValueError(f"node config `{key}` must be client ids like \"0,1,5-7\", got {value!r}")
    return ids


def node_device(node_config: Mapping[str, Any], config: Any) -> str:
    """Where this node's clients train: node config ``device`` (e.g. ``"cuda:0"``: the node's GPU), else the
    server's client device when this machine has it (a CUDA device on a machine without CUDA falls back to the
    CPU)."""
    import torch

    device = node_config.get("device")
    if device is not None:
        try:
            return str(torch.device(str(device)))
        except (RuntimeError, TypeError) as err:
            raise ValueError(f"node config device={device!r} is not a device ({err})") from None
    wanted = torch.device(getattr(config, "device", "cpu"))
    return str(wanted) if wanted.type != "cuda" or torch.cuda.is_available() else "cpu"


class NodeClients:
    """The clients a node holds, read from its node config (see the module docstring)."""

    def __init__(self, node_config: Mapping[str, Any]) -> None:
        self.explicit: list[int] | None = None
        self.partition: tuple[int, int] | None = None
        if "clients" in node_config:
            self.explicit = parse_ids(node_config["clients"], "clients")
        elif "partition-id" in node_config and "num-partitions" in node_config:
            pid, parts = node_config["partition-id"], node_config["num-partitions"]
            if not (isinstance(pid, int) and isinstance(parts, int) and 0 <= pid < parts):
                raise ValueError(f"node config partition-id={pid!r} num-partitions={parts!r} is not a partition")
            self.partition = (pid, parts)
        else:
            raise ValueError("the node config names no clients: give clients=\"0,1\" (or partition-id and "
                             "num-partitions, as Flower's simulation does)")
        self.local: dict[int, int] | None = None
        if "local-clients" in node_config:
            local = parse_ids(node_config["local-clients"], "local-clients")
            if self.explicit is None or len(local) != len(self.explicit):
                raise ValueError("node config `local-clients` needs `clients` of the same length "
                                 f"(got {node_config.get('clients')!r} and {node_config['local-clients']!r})")
            self.local = dict(zip(self.explicit, local))

    def holds(self, client_id: int) -> bool:
        if self.explicit is not None:
            return client_id in self.explicit
        pid, parts = self.partition  # type: ignore[misc]
        return client_id % parts == pid

    def listed(self, num_clients: int) -> list[int]:
        """The ids of the clients held, of ``num_clients`` (-1: unknown, the explicit list only)."""
        if self.explicit is not None:
            return sorted(set(self.explicit))
        if num_clients < 0:
            raise ValueError("the server did not say how many clients there are; give the node config `clients`")
        return [c for c in range(num_clients) if self.holds(c)]


class NodeClientData:
    """The node's client data under the server's client ids, when the node's own data numbers them differently
    (node config ``local-clients``): client ``c`` is the node's local client ``local[c]``."""

    def __init__(self, data: ClientData, local: Mapping[int, int]) -> None:
        self.data = data
        self.local = dict(local)

    def _local(self, client_id: int) -> int:
        if client_id not in self.local:
            raise KeyError(f"this node does not hold client {client_id}")
        return self.local[client_id]

    def client_size(self, client_id: int) -> int:
        return self.data.client_size(self._local(client_id))

    def client_loader(self, client_id: int, seed: int) -> Iterable[Any]:
        return self.data.client_loader(self._local(client_id), seed)


class FlowerNode:
    """The node side: answers the discovery query and trains jobs with a cached :class:`ClientRunner`.

    Args:
        build: ``build(app, node_config) -> (task, client data)``, called once per distinct setup (the
            job's ``app`` fields, client configuration and the node's ``overrides``/``local-clients``).
        max_runners: setups kept at once (a process serving the nodes of a simulation keeps one).
    """

    def __init__(self, build: Builder, max_runners: int = 2) -> None:
        self.build = build
        self.max_runners = max_runners
        self._runners: dict[str, ClientRunner] = {}
        self._payloads: dict[tuple[int, str], RoundPayload] = {}

    def clients(self, content: RecordDict, node_config: Mapping[str, Any], run_id: int = 0) -> RecordDict:
        """The answer to the discovery query: ``{"clients": [...]}`` or ``{"error": why}``."""
        try:
            num = int(content[CONFIG]["num-clients"])
            return RecordDict({CONFIG: ConfigRecord({"clients": NodeClients(node_config).listed(num)})})
        except Exception as err:  # a node config or query that does not fit: the server reports it
            return RecordDict({CONFIG: ConfigRecord({"error": f"{type(err).__name__}: {err}"})})

    def train(self, content: RecordDict, node_config: Mapping[str, Any], run_id: int = 0) -> RecordDict:
        """Train the job's client and return the reply's content (a failed client's reply says why)."""
        cfg = content.get(CONFIG)
        rnd, cid = (cfg.get("round", -1), cfg.get("client-id", -1)) if isinstance(cfg, ConfigRecord) else (-1, -1)
        try:
            job = read_job(content)
            clients = NodeClients(node_config)
            if not clients.holds(job.plan.client_id):
                return _failed(rnd, cid, f"this node does not hold client {job.plan.client_id} (node config "
                                         f"{dict(node_config)})")
            runner = self._runner(job, node_config, clients)
        except Exception as err:  # a malformed job, a bad node config, a task or data that cannot be built
            return _failed(rnd, cid, f"{type(err).__name__}: {err}\n{traceback.format_exc(limit=-4)}")
        return reply_content(runner.run(self._payload(run_id, job), job.plan))

    def _runner(self, job: Job, node_config: Mapping[str, Any], clients: NodeClients) -> ClientRunner:
        key = hashlib.sha256(json.dumps(
            [job.app, asdict(job.config), node_config.get("overrides", ""), node_config.get("device", ""),
             clients.local],
            sort_keys=True, default=str).encode()).hexdigest()
        runner = self._runners.get(key)
        if runner is None:
            task, data = self.build(job.app, node_config)
            if clients.local is not None:
                data = NodeClientData(data, clients.local)
            runner = ClientRunner(task, data, job.config, device=node_device(node_config, job.config))
            if len(self._runners) >= self.max_runners:
                self._runners.pop(next(iter(self._runners)))
            self._runners[key] = runner
        return runner

    def _payload(self, run_id: int, job: Job) -> RoundPayload:
        """One RoundPayload per broadcast, so a runner decodes a round's payload once for all its clients here."""
        key = (run_id, job.payload_id)
        if key not in self._payloads:
            if len(self._payloads) >= 16:
                self._payloads.clear()
            self._payloads[key] = job.payload
        return self._payloads[key]


def _failed(rnd: Any, cid: Any, why: str) -> RecordDict:
    rnd = rnd if isinstance(rnd, int) else -1
    cid = cid if isinstance(cid, int) else -1
    return reply_content(ClientResult(cid, rnd, error=why))


# ------------------------------------------------------------------ a persistent worker for SuperNodes
def serve(node: FlowerNode, path: str | os.PathLike, max_idle: float = 3600.0, request_timeout: float = 60.0) -> None:
    """Serve ``node`` on the Unix socket ``path`` to the ClientApp processes of a SuperNode, until no request
    came for ``max_idle`` seconds (or the process is stopped).

    A request is ``{"kind": "train" | "clients", "root": id, "objects": {id: bytes}, "node_config": {...},
    "run_id": int}`` (the message content in Flower's serialized form); the answer is the reply content in the
    same form, or ``{"error": text}``. The socket is created readable and writable by its owner only.
    """
    path = Path(path)
    if path.exists() and stat.S_ISSOCK(path.stat().st_mode):
        path.unlink()  # a stale socket of a previous worker (a live one would still hold it: bind would then fail)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        server.bind(str(path))
    finally:
        os.umask(old_umask)
    server.listen()
    server.settimeout(1.0)
    last = time.monotonic()
    try:
        while time.monotonic() - last < max_idle:
            try:
                sock, _ = server.accept()
            except socket.timeout:
                continue
            sock.setblocking(True)
            with Connection(sock.detach()) as conn:
                if not conn.poll(request_timeout):
                    continue
                try:
                    answer = _answer(node, conn.recv())
                except Exception as err:  # a broken request: the ClientApp raises it, Flower replies an error
                    answer = {"error": f"{type(err).__name__}: {err}\n{traceback.format_exc(limit=-4)}"}
                try:
                    conn.send(answer)
                except OSError:  # the ClientApp process is gone (its SuperNode stopped it)
                    pass
            last = time.monotonic()
    finally:
        server.close()
        path.unlink(missing_ok=True)


def _answer(node: FlowerNode, request: Mapping[str, Any]) -> dict[str, Any]:
    content = inflate_object_from_contents(request["root"], dict(request["objects"]))
    kind = request["kind"]
    if kind not in ("train", "clients"):
        raise ValueError(f"unknown request kind {kind!r}")
    reply = getattr(node, kind)(content, request["node_config"], int(request["run_id"]))
    return {"root": reply.object_id, "objects": deflate(reply)}
