"""Flower test helpers: a Grid whose nodes are ClientApps called in this process, and the quickstart made small.

``LoopbackGrid`` runs the real ServerApp code (examples/flower) against the real ClientApp without Ray
or sockets: every message and every reply makes Flower's serialization round trip (deflate, then
inflate from the bytes), as on a SuperLink. A ``tamper`` hook may change, drop or replace a reply (the
fault-injection tests); replies are delivered on the first pull after their push.
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml
from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents
from flwr.supercore.task_identity import TaskIdentity

from lightning_fedprune.demos import MLPClassifier
from lightning_fedprune.federated.strategies import FedAvg, SubModel

ROOT = Path(__file__).resolve().parent.parent
APP = ROOT / "examples" / "flower"
if str(APP) not in sys.path:
    sys.path.insert(0, str(APP))  # the app's package, as a FAB install puts it on the path

Tamper = Callable[[Message, Message], Message | None]  # (job, reply) -> the reply delivered (None: dropped)


def roundtrip(message: Message) -> Message:
    """``message`` as it arrives after Flower's serialization (a new object, inflated from the bytes)."""
    contents = {oid: obj.deflate() for oid, obj in get_all_nested_objects(message).items()}
    out = inflate_object_from_contents(message.object_id, contents)
    out.metadata.__dict__["_message_id"] = message.metadata.message_id
    return out


class LoopbackGrid(Grid):
    """Nodes ``1000 + i`` with ``node_configs[i]``, each answering with ``client_app`` in this process."""

    def __init__(self, client_app: Any, node_configs: list[dict[str, Any]], run_id: int = 7,
                 tamper: Tamper | None = None) -> None:
        self.client_app = client_app
        self.nodes = {1000 + i: dict(cfg) for i, cfg in enumerate(node_configs)}
        self.tamper = tamper
        self.run_id = run_id
        self.replies: dict[str, Message] = {}  # replies not pulled yet, by the id of the job they answer
        self.jobs: list[Message] = []  # every message pushed, as sent
        self.pulled: list[Message] = []  # every reply pulled, as received
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, 1, 1

    def set_run(self, run: Any) -> None:
        raise NotImplementedError

    @property
    def run(self) -> Any:
        raise NotImplementedError

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            self.jobs.append(msg)
            received = roundtrip(msg)
            node = msg.metadata.dst_node_id
            context = Context(self.run_id, node, self.nodes[node], RecordDict(), {})
            reply = self.client_app(received, context)
            reply.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            reply = roundtrip(reply)
            if self.tamper is not None:
                reply = self.tamper(msg, reply)
            if reply is not None:
                self.replies[msg.metadata.message_id] = reply
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids):
        replies = [self.replies.pop(mid) for mid in list(message_ids) if mid in self.replies]
        self.pulled.extend(replies)
        return replies

    def send_and_receive(self, messages, *, timeout=None):
        return self.pull_messages(self.push_messages(messages))


class FlakyMLP(MLPClassifier):
    """MLPClassifier whose client ``fail_at = [round, client]`` raises in training (an in-process client failure)."""

    def __init__(self, fail_at: list[int] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.fail_at = list(fail_at or [-1, -1])

    def training_step(self, batch, batch_idx):
        if [self.trainer.fed_round, self.trainer.client_id] == self.fail_at:
            raise RuntimeError("client fault")
        return super().training_step(batch, batch_idx)


class OddClientsDropHeadColumns(FedAvg):
    """Odd clients train a sub-model without the first half of head.weight's columns (a broadcast of their own)."""

    def configure(self, ctx, cohort, seeds):
        mask = torch.ones_like(ctx.params["head.weight"], dtype=torch.bool)
        mask[:, : mask.shape[1] // 2] = False
        odd = SubModel({**ctx.masks, "head.weight": mask}, {**ctx.patterns, "head.weight": "column"})
        return [odd if client % 2 else None for client in cohort]


def partitioned(num_nodes: int) -> list[dict[str, Any]]:
    """The node configs Flower's simulation gives ``num_nodes`` SuperNodes."""
    return [{"partition-id": i, "num-partitions": num_nodes} for i in range(num_nodes)]


def small_quickstart(tmp_path: Path, rounds: int = 6, name: str = "quick.yaml", fail_at: list[int] | None = None,
                     **model: Any) -> Path:
    """examples/quickstart.yaml made small: ``rounds`` rounds, every pruning phase inside them (ramp from
    round 1, refinement, adaptive allocation, fine-tuning in the last round), logs under ``tmp_path``;
    with ``fail_at`` the task is :class:`FlakyMLP` failing that client."""
    cfg = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())
    cfg["model"].update({"local_steps": 3, **model})
    if fail_at is not None:
        cfg["model"]["task"] = {"class_path": "flower_helpers.FlakyMLP",
                                "init_args": {**cfg["model"]["task"]["init_args"], "fail_at": list(fail_at)}}
    cfg["trainer"].update(max_steps=rounds, val_check_interval=rounds, num_sanity_val_steps=0)
    cfg["trainer"]["logger"] = {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                                "init_args": {"save_dir": str(tmp_path / "runs"), "name": "fedprune"}}
    ramp, refine, _, freeze, summary = cfg["trainer"]["callbacks"]
    ramp["init_args"].update(start_round=1, end_round=rounds - 3, every_n_rounds=1)
    refine["init_args"].update(every_n_rounds=2, until_round=rounds - 2)
    freeze["init_args"].update(start_round=rounds - 1)
    summary["init_args"] = {"print_summary": False}  # summary.json next to the logs
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path
