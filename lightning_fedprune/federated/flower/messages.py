"""What travels on Flower: the record layout of fedprune's messages, in one place.

A client's job is a ``train`` message (``group_id`` = the round) whose :class:`~flwr.app.RecordDict` holds::

    "fedprune.arrays"  ArrayRecord   the plan's wire payload (wire.Payload.to_arrays()), one Array per array,
                                     keyed "<tensor name>/<array key>" (e.g. "body.0.weight/values")
    "fedprune.config"  ConfigRecord  round, client-id, seed, payload-id (which broadcast this is),
                                     spec (the payload's JSON spec, zlib-compressed), optim (OptimState,
                                     torch.save bytes), client-config (ClientConfig as JSON: local
                                     steps/epochs, precision, clipping, ...), "app.*": how the
                                     node builds the task and its data (the fedprune YAML, overrides),
                                     and, when the plan has them, statistics ({statistic: [names]},
                                     JSON) and forward-scales ({name: factor}, JSON)

The reply holds the same three records: the upload's arrays (kept entries only, as in-process),
``"fedprune.metrics"`` (MetricRecord: num-examples, num-samples, loss, seconds) and ``"fedprune.config"``
(round, client-id, spec, logged (JSON), optim (bytes), and ``error`` when the client failed on the node);
with statistics, one more ArrayRecord per statistic, ``"fedprune.statistics.<statistic>"`` (its payload: one
dense float32 tensor per parameter), whose spec is ``"statistics-spec.<statistic>"`` in the config.

Nothing here names a pattern or a dtype: a payload is mapped through its arrays and spec, so every kind
:mod:`~lightning_fedprune.federated.wire` encodes travels unchanged. Optimiser and scheduler states travel as
``torch.save`` bytes and are read with ``torch.load(weights_only=True)`` (tensors, numbers, strings and
containers only: a reply cannot make the server run code).

:func:`read_reply` is the server's check of a reply (:class:`RejectedReply` says why it was refused);
:func:`message_nbytes` the serialized size of a message, what ``comm/*`` logs on the Flower path.
"""

from __future__ import annotations

import io
import json
import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.inflatable.inflatable_object import InflatableObject, get_all_nested_objects

from lightning_fedprune.federated.protocol import ClientConfig, ClientPlan, ClientResult, LoggedValue, OptimState, RoundPayload
from lightning_fedprune.federated.wire import Payload, decode_tensor

ARRAYS = "fedprune.arrays"
STATISTICS = "fedprune.statistics."  # + the statistic's name: one ArrayRecord per statistic in a reply
STATISTICS_SPEC = "statistics-spec."
CONFIG = "fedprune.config"
METRICS = "fedprune.metrics"
TRAIN = "train"  # Flower's message type of a client's job
CLIENTS_QUERY = "query.fedprune_clients"  # the discovery query: which clients does a node hold
APP_PREFIX = "app."
MAX_SPEC_BYTES = 64 << 20  # a spec that inflates beyond this is refused (a zlib bomb)


class RejectedReply(ValueError):
    """A reply the server does not accept (the client is failed with this message)."""


# ------------------------------------------------------------------ payloads
def array_keys(spec: Sequence[Mapping[str, Any]]) -> list[str]:
    """The ArrayRecord keys of a payload's arrays, in :meth:`Payload.to_arrays` order."""
    return [f"{s['name']}/{key}" for s in spec for key in s["keys"]]


def payload_record(payload: Payload) -> tuple[ArrayRecord, bytes]:
    """A payload as an ArrayRecord (one Array per wire array) and its spec (JSON, zlib-compressed: a model of many
    small tensors has a spec of several kB)."""
    spec = payload.spec()
    arrays = {key: Array.from_numpy_ndarray(a) for key, a in zip(array_keys(spec), payload.to_arrays())}
    return ArrayRecord(arrays), zlib.compress(json.dumps(spec, separators=(",", ":")).encode())


def payload_from_record(record: Any, packed_spec: Any, key: str = ARRAYS) -> Payload:
    """The payload of an ArrayRecord (the record ``key``) and its packed spec; :class:`RejectedReply` names what
    does not fit."""
    if not isinstance(record, ArrayRecord):
        raise RejectedReply(f"no ArrayRecord {key!r}")
    if not isinstance(packed_spec, bytes):
        raise RejectedReply("no payload spec")
    try:
        unpack = zlib.decompressobj()
        text = unpack.decompress(packed_spec, MAX_SPEC_BYTES)
        if unpack.unconsumed_tail:
            raise ValueError(f"longer than {MAX_SPEC_BYTES} bytes")
        spec = json.loads(text)
        keys = array_keys(spec)
    except (ValueError, TypeError, KeyError, zlib.error) as err:
        raise RejectedReply(f"the payload spec is not readable ({type(err).__name__}: {err})") from None
    missing = [k for k in keys if k not in record]
    extra = [k for k in record if k not in set(keys)]
    if missing or extra:
        raise RejectedReply(f"the payload's arrays do not match its spec (missing {missing[:5]}, unexpected {extra[:5]})")
    try:
        return Payload.from_arrays([record[k].numpy() for k in keys], spec)
    except (ValueError, TypeError, KeyError) as err:
        raise RejectedReply(f"the payload is not readable ({type(err).__name__}: {err})") from None


# ------------------------------------------------------------------ states that are not arrays
def dump_state(state: Any) -> bytes:
    """``torch.save`` bytes of a dataclass (as a dict) or of plain containers."""
    buf = io.BytesIO()
    # the legacy (non-zip) format: a third of the bytes for these small dicts, read the same way
    torch.save(asdict(state) if hasattr(state, "__dataclass_fields__") else state, buf,
               _use_new_zipfile_serialization=False)
    return buf.getvalue()


def load_optim(data: Any) -> OptimState:
    """The OptimState of :func:`dump_state` bytes, read without running code (``weights_only``)."""
    if not isinstance(data, bytes):
        raise RejectedReply("no optimiser state")
    try:
        d = torch.load(io.BytesIO(data), weights_only=True)
        state = OptimState(**d)
    except Exception as err:  # any unpickling or field error: the bytes are not an OptimState
        raise RejectedReply(f"the optimiser state is not readable ({type(err).__name__}: {err})") from None
    if not (isinstance(state.param_groups, list) and all(isinstance(g, list) and all(isinstance(h, dict) for h in g)
                                                         for g in state.param_groups)
            and isinstance(state.schedulers, list) and all(isinstance(s, dict) for s in state.schedulers)
            and _is_int(state.global_step) and state.global_step >= 0 and _is_int(state.epoch) and state.epoch >= 0):
        raise RejectedReply("the optimiser state has the wrong structure")
    return state


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# ------------------------------------------------------------------ the instruction (server -> node)
@dataclass
class Job:
    """A client's job as a node reads it from a ``train`` message."""

    payload: RoundPayload
    plan: ClientPlan
    config: ClientConfig
    app: dict[str, Any]
    payload_id: str


def instruction(arrays: ArrayRecord, spec: bytes, optim: bytes, plan: ClientPlan, payload_id: str,
                setup: Mapping[str, Any]) -> RecordDict:
    """The content of a client's ``train`` message. ``arrays``/``spec``/``optim`` are its payload's (shared
    by every client of a broadcast); ``setup`` holds client-config and the ``app.*`` fields."""
    fields = {"round": int(plan.round), "client-id": int(plan.client_id), "seed": int(plan.seed),
              "payload-id": payload_id, "spec": spec, "optim": optim, **setup}
    if plan.statistics:
        fields["statistics"] = json.dumps({k: list(v) for k, v in plan.statistics.items()})
    if plan.forward_scales:
        fields["forward-scales"] = json.dumps({k: float(v) for k, v in plan.forward_scales.items()})
    return RecordDict({ARRAYS: arrays, CONFIG: ConfigRecord(fields)})


def setup_fields(config: ClientConfig, app: Mapping[str, Any]) -> dict[str, Any]:
    """The fields every ``train`` message of a fit carries besides the plan: how the node trains and builds."""
    return {"client-config": json.dumps(asdict(config), sort_keys=True), **{APP_PREFIX + k: v for k, v in app.items()}}


def read_job(content: RecordDict) -> Job:
    """The job of a ``train`` message's content (raises ValueError/RejectedReply on a malformed one)."""
    cfg = content.get(CONFIG)
    if not isinstance(cfg, ConfigRecord):
        raise ValueError(f"the message has no ConfigRecord {CONFIG!r}")
    payload = payload_from_record(content.get(ARRAYS), cfg.get("spec"))
    rnd = int(cfg["round"])
    statistics = {str(k): tuple(str(n) for n in v) for k, v in json.loads(str(cfg.get("statistics", "{}"))).items()}
    scales = {str(k): float(v) for k, v in json.loads(str(cfg.get("forward-scales", "{}"))).items()}
    plan = ClientPlan(client_id=int(cfg["client-id"]), round=rnd, seed=int(cfg["seed"]), statistics=statistics,
                      forward_scales=scales)
    config = ClientConfig(**json.loads(str(cfg["client-config"])))
    app = {k[len(APP_PREFIX):]: v for k, v in cfg.items() if k.startswith(APP_PREFIX)}
    return Job(RoundPayload(rnd, payload, load_optim(cfg["optim"])), plan, config, app, str(cfg["payload-id"]))


# ------------------------------------------------------------------ the reply (node -> server)
def reply_content(result: ClientResult) -> RecordDict:
    """The content of a reply: the upload's arrays, the client's numbers, what it logged, its optimiser state."""
    config: dict[str, Any] = {"round": int(result.round), "client-id": int(result.client_id)}
    metrics = {"num-examples": int(result.num_examples), "num-samples": int(result.num_samples), "loss": float(result.loss),
               "seconds": float(result.seconds)}
    if result.error is not None:
        return RecordDict({CONFIG: ConfigRecord({**config, "error": result.error}), METRICS: MetricRecord(metrics)})
    assert result.payload is not None and result.optim is not None
    arrays, spec = payload_record(result.payload)
    config.update(spec=spec, optim=dump_state(result.optim),
                  logged=json.dumps({name: asdict(v) for name, v in result.logged.items()}))
    records: dict[str, Any] = {ARRAYS: arrays}
    for stat, payload in result.statistics.items():
        records[STATISTICS + stat], config[STATISTICS_SPEC + stat] = payload_record(payload)
    return RecordDict({**records, CONFIG: ConfigRecord(config), METRICS: MetricRecord(metrics)})


class Expected:
    """What a reply to one plan must hold: the names, shapes and dtypes of the payload sent, and its masks
    (built once per distinct payload; the masks are read from the payload's indices, as a client reads them)."""

    def __init__(self, payload: Payload) -> None:
        self.tensors = {name: (tuple(enc.shape), enc.torch_dtype, enc.mask() if enc.kind != "dense" else None)
                        for name, enc in payload.items()}

    def check(self, upload: Payload) -> None:
        """Raise :class:`RejectedReply` unless ``upload`` decodes to exactly these tensors, zero where pruned, finite."""
        missing = [n for n in self.tensors if n not in upload]
        extra = [n for n in upload.keys() if n not in self.tensors]
        if missing or extra:
            raise RejectedReply(f"the upload's tensors differ from the payload's (missing {missing[:5]}, "
                                f"unexpected {extra[:5]})")
        for name, (shape, dtype, mask) in self.tensors.items():
            enc = upload[name]
            if tuple(enc.shape) != shape or enc.dtype != str(dtype).removeprefix("torch."):
                raise RejectedReply(f"{name!r} is {enc.dtype}{list(enc.shape)} in the upload, expected "
                                    f"{str(dtype).removeprefix('torch.')}{list(shape)}")
            try:
                value = decode_tensor(enc, mask)
            except Exception as err:  # a malformed array: wrong size, index, kind, ...
                raise RejectedReply(f"{name!r} cannot be decoded ({type(err).__name__}: {err})") from None
            if tuple(value.shape) != shape or value.dtype != dtype:
                raise RejectedReply(f"{name!r} decodes to {value.dtype}{list(value.shape)}, expected {dtype}{list(shape)}")
            if mask is not None and bool(value.masked_select(~mask).ne(0).any()):
                raise RejectedReply(f"{name!r} has non-zero values where the mask says pruned")
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise RejectedReply(f"non-finite values in {name!r}")

    def check_statistics(self, stat: str, names: Sequence[str], payload: Payload) -> None:
        """Raise :class:`RejectedReply` unless ``payload`` holds statistic ``stat`` of exactly ``names``, in that
        order: dense float32 tensors of their parameters' shapes, finite."""
        if list(payload.keys()) != list(names):
            raise RejectedReply(f"the {stat!r} statistics are not those asked for (got {list(payload.keys())[:5]}, "
                                f"asked {list(names)[:5]})")
        for name, enc in payload.items():
            shape = self.tensors[name][0] if name in self.tensors else None
            if enc.kind != "dense" or tuple(enc.shape) != shape or enc.dtype != "float32" or enc.quant is not None:
                raise RejectedReply(f"the {stat!r} statistic of {name!r} is {enc.kind} {enc.dtype}{list(enc.shape)}, "
                                    f"expected dense float32{list(shape or ())}")
            try:
                value = decode_tensor(enc)
            except Exception as err:  # a malformed array
                raise RejectedReply(f"the {stat!r} statistic of {name!r} cannot be decoded ({type(err).__name__}: "
                                    f"{err})") from None
            if not bool(torch.isfinite(value).all()):
                raise RejectedReply(f"non-finite values in the {stat!r} statistic of {name!r}")


def read_reply(reply: Message, plan: ClientPlan, node_id: int, expected: Expected) -> ClientResult:
    """The ClientResult of a node's reply to ``plan``; :class:`RejectedReply` when it is not acceptable.

    A reply from another node or for another round or client, a Flower error, missing or mistyped
    fields, an upload that does not decode to the plan's tensors, non-zero pruned entries and NaN/Inf
    are refused; a client that failed on the node (``error``) becomes a failed ClientResult, as in-process.
    """
    meta = reply.metadata
    if meta.src_node_id != node_id:
        raise RejectedReply(f"the reply came from node {meta.src_node_id}, the job went to node {node_id}")
    if meta.group_id != str(plan.round):
        raise RejectedReply(f"the reply is for round {meta.group_id!r}, not {plan.round}")
    if reply.has_error():
        raise RejectedReply(f"the node replied with Flower error {reply.error.code}: {reply.error.reason}")
    content = reply.content
    cfg, metrics = content.get(CONFIG), content.get(METRICS)
    if not isinstance(cfg, ConfigRecord) or not isinstance(metrics, MetricRecord):
        raise RejectedReply(f"the reply has no {CONFIG!r} ConfigRecord and {METRICS!r} MetricRecord")
    if cfg.get("round") != plan.round or cfg.get("client-id") != plan.client_id:
        raise RejectedReply(f"the reply is for round {cfg.get('round')!r} client {cfg.get('client-id')!r}, "
                            f"not round {plan.round} client {plan.client_id}")
    error = cfg.get("error")
    if error is not None:
        return ClientResult(plan.client_id, plan.round, error=str(error), loss=_number(metrics, "loss", math.nan),
                            seconds=_number(metrics, "seconds", 0.0))
    num_examples = metrics.get("num-examples")
    if not _is_int(num_examples) or num_examples < 0:
        raise RejectedReply(f"the reply has no example count (num-examples={num_examples!r})")
    num_samples = metrics.get("num-samples")
    if not _is_int(num_samples) or num_samples < 0:
        raise RejectedReply(f"the reply has no sample count (num-samples={num_samples!r})")
    loss = _number(metrics, "loss")
    if not math.isfinite(loss):
        raise RejectedReply(f"the reply's loss {loss!r} is not finite (a node reports a non-finite loss as an error)")
    upload = payload_from_record(content.get(ARRAYS), cfg.get("spec"))
    expected.check(upload)
    statistics = {}
    for stat, names in plan.statistics.items():
        statistics[stat] = payload_from_record(content.get(STATISTICS + stat), cfg.get(STATISTICS_SPEC + stat),
                                               STATISTICS + stat)
        expected.check_statistics(stat, names, statistics[stat])
    return ClientResult(plan.client_id, plan.round, payload=upload, num_samples=num_samples, num_examples=num_examples,
                        loss=loss,
                        logged=_read_logged(cfg.get("logged")), optim=load_optim(cfg.get("optim")),
                        seconds=_number(metrics, "seconds", 0.0), statistics=statistics)


def _number(record: MetricRecord, key: str, default: float | None = None) -> float:
    value = record.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RejectedReply(f"the reply has no number {key!r} (got {value!r})")
    return float(value)


def _read_logged(text: Any) -> dict[str, LoggedValue]:
    try:
        return {str(name): LoggedValue(**fields) for name, fields in json.loads(str(text)).items()}
    except Exception as err:  # not JSON, not a dict of LoggedValue fields
        raise RejectedReply(f"the logged values are not readable ({type(err).__name__}: {err})") from None


# ------------------------------------------------------------------ sizes and serialization
def deflate(obj: InflatableObject) -> dict[str, bytes]:
    """Flower's serialized form of ``obj``: every object of its tree (each once) as ``{object id: bytes}``."""
    return {object_id: o.deflate() for object_id, o in get_all_nested_objects(obj).items()}


def message_nbytes(message: Message) -> int:
    """The serialized size of ``message``: the bytes of every object Flower pushes or pulls for it (the
    Message, its RecordDict, records, Arrays and their chunks; each object once), without transport framing."""
    return sum(len(b) for b in deflate(message).values())
