"""The ClientApp: trains the clients this node holds, with fedprune's client loop.

Which clients, and the node's own data, come from the node config (docs/flower.md): ``clients`` or
Flower's ``partition-id``/``num-partitions``, ``overrides``, ``local-clients``. With ``worker`` (a Unix
socket path) the message goes to the node's persistent worker (``python -m fedprune_flower.node_worker``):
a SuperNode starts a new ClientApp process for every message, and this module then imports nothing
heavier than Flower. Without it, the ClientApp process trains itself (Flower's simulation keeps its
processes, so the runner built for the first job serves every later one).
"""

from __future__ import annotations

from typing import Any

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()
_node: Any = None  # this process's FlowerNode, built on first use


@app.query("fedprune_clients")
def clients(msg: Message, context: Context) -> Message:
    return Message(_handle("clients", msg.content, context), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    return Message(_handle("train", msg.content, context), reply_to=msg)


def _handle(kind: str, content: RecordDict, context: Context) -> RecordDict:
    worker = context.node_config.get("worker")
    if worker:
        return forward(str(worker), kind, content, context, float(context.node_config.get("worker-timeout", 3600.0)))
    global _node
    if _node is None:
        from lightning_fedprune.federated.flower.node import FlowerNode

        from fedprune_flower.task import build_client

        _node = FlowerNode(build_client)
    return getattr(_node, kind)(content, context.node_config, context.run_id)


def forward(path: str, kind: str, content: RecordDict, context: Context, timeout: float) -> RecordDict:
    """Hand a message's content to the node worker on socket ``path`` and return its reply content (waits at most
    ``timeout`` seconds for it)."""
    from multiprocessing.connection import Client

    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
    from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents

    objects = {object_id: obj.deflate() for object_id, obj in get_all_nested_objects(content).items()}
    request = {"kind": kind, "root": content.object_id, "objects": objects,
               "node_config": dict(context.node_config), "run_id": int(context.run_id)}
    try:
        conn = Client(path, family="AF_UNIX")
    except OSError as err:
        raise RuntimeError(f"the fedprune node worker at {path} is not reachable ({err}); start it with "
                           f"`python -m fedprune_flower.node_worker --socket {path}` (docs/flower.md)") from err
    with conn:
        conn.send(request)
        if not conn.poll(timeout):
            raise TimeoutError(f"the fedprune node worker at {path} did not answer within worker-timeout={timeout:g} s")
        answer = conn.recv()
    if "error" in answer:
        raise RuntimeError(f"the fedprune node worker failed: {answer['error']}")
    return inflate_object_from_contents(answer["root"], answer["objects"])
