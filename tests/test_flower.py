"""Flower: FlowerExecutor, the app in examples/flower, and what travels (needs the `flower` extra; skipped without it).

These tests run the app's real ServerApp and ClientApp code on a LoopbackGrid (this process, every
message through Flower's serialization; tests/flower_helpers.py): equality with in-process runs, resume,
every kind of bad reply, node discovery, the record layout. Flower's engines themselves (Ray simulation
through `flwr run`, a SuperLink with SuperNodes) run in tests/test_flower_engines.py.
"""

from __future__ import annotations

import importlib.util
import json
import zlib

import numpy as np
import pytest

flwr = pytest.importorskip("flwr")

import torch  # noqa: E402
from flower_helpers import ROOT, LoopbackGrid, partitioned, small_quickstart  # noqa: E402
from flwr.app import Array, Error  # noqa: E402
from flwr.app.message.message import make_message  # noqa: E402

from lightning_fedprune import FederatedDataModule, FederatedLightningModule  # noqa: E402
from lightning_fedprune.cli import build_cli  # noqa: E402
from lightning_fedprune.demos import GaussianMixtureDataset, MLPClassifier  # noqa: E402
from lightning_fedprune.federated.data import sample_cohort  # noqa: E402
from lightning_fedprune.federated.flower import FlowerExecutor, messages  # noqa: E402
from lightning_fedprune.federated.flower.node import NodeClientData, NodeClients  # noqa: E402
from lightning_fedprune.federated.wire import encode_state  # noqa: E402
from lightning_fedprune.pruning.patterns import PATTERNS, compute_mask  # noqa: E402

from fedprune_flower.client_app import app as client_app  # noqa: E402  (examples/flower, put on the path by the helpers)
from fedprune_flower.task import fit  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*(LightningCLI|litlogger|litmodels|treespec).*")


def fit_in_process(config) -> object:
    cli = build_cli(["--config", str(config), "--quiet=true"], run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return cli


def fit_on_flower(config, nodes=3, tamper=None, **run_config) -> tuple[object, LoopbackGrid]:
    grid = LoopbackGrid(client_app, partitioned(nodes) if isinstance(nodes, int) else nodes, tamper=tamper)
    return fit(grid, {"config": str(config), "overrides": "", **run_config}), grid


def assert_same_model(a, b) -> None:
    sa, sb = a.model.task.state_dict(), b.model.task.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name
    assert a.model.masks.keys() == b.model.masks.keys() and a.model.masks
    for name in a.model.masks:
        assert torch.equal(a.model.masks[name], b.model.masks[name]), name


# ------------------------------------------------------------------ the same run
def test_flower_run_equals_in_process_and_counts_message_bytes(tmp_path):
    config = small_quickstart(tmp_path, rounds=6)
    ref = fit_in_process(config)
    flower, grid = fit_on_flower(config, nodes=3)
    # every pruning phase ran (ramp, refinement, adaptive allocation, fine-tuning) and the results agree bit for bit
    assert flower.model.pruning.sparsity() == pytest.approx(0.5) and flower.model.pruning.permanent
    assert_same_model(ref, flower)
    assert flower.trainer.callback_metrics["val/acc"] == ref.trainer.callback_metrics["val/acc"]
    # comm/* is what the messages of the last round weigh serialized, more than the payload arrays alone
    last = [j for j in grid.jobs if j.metadata.group_id == "5"]
    replies = [r for r in grid.pulled if r.metadata.group_id == "5"]
    assert len(last) == len(replies) == 5
    summary, ref_summary = flower.model.last_summary, ref.model.last_summary
    assert summary.bytes_down == sum(map(messages.message_nbytes, last)) > ref_summary.bytes_down
    assert summary.bytes_up == sum(map(messages.message_nbytes, replies)) > ref_summary.bytes_up
    assert float(flower.trainer.callback_metrics["comm/bytes_down"]) == summary.bytes_down
    # the jobs carry the broadcast in its compact wire form: the kept columns only, as in-process
    job = messages.read_job(last[0].content)
    assert job.payload.encoded.nbytes == ref_summary.bytes_down / 5


@pytest.mark.parametrize("bits", [8, 4])
def test_quantised_payloads_on_flower_equal_in_process(bits, tmp_path):
    """payload_bits: int codes + per-row scales travel as Arrays; the node's stochastic rounding is seeded by the
    client's seed and the server's error feedback lives on the server, so Flower equals in-process bit for bit."""
    config = small_quickstart(tmp_path, rounds=4, payload_bits=bits)
    ref = fit_in_process(config)
    flower, grid = fit_on_flower(config, nodes=2)
    assert_same_model(ref, flower)
    job = messages.read_job(grid.jobs[-1].content)
    quantised = [enc for _, enc in job.payload.encoded.items() if enc.quant is not None]
    assert quantised and all(enc.quant == bits for enc in quantised)
    reply = messages.payload_from_record(grid.pulled[-1].content[messages.ARRAYS],
                                         grid.pulled[-1].content[messages.CONFIG]["spec"])
    assert any(enc.quant == bits for _, enc in reply.items())


def test_resumed_flower_run_continues_the_same_sequence(tmp_path):
    config = small_quickstart(tmp_path, rounds=6)
    ref = fit_in_process(config)
    fit_on_flower(config, overrides="--trainer.max_steps=3 --trainer.val_check_interval=3")  # checkpoint at round 3
    ckpt = next((tmp_path / "runs").rglob("*-step=3.ckpt"))
    resumed, grid = fit_on_flower(config, overrides="--trainer.val_check_interval=3", **{"ckpt-path": str(ckpt)})
    assert resumed.trainer.global_step == 6
    assert {j.metadata.group_id for j in grid.jobs} == {"setup", "3", "4", "5"}
    assert_same_model(ref, resumed)


def test_clients_with_a_sub_model_of_their_own_get_it_on_flower(tmp_path):
    """Strategy.client_masks: odd clients get a broadcast of their own; their replies are checked against it."""
    strategy = {"class_path": "flower_helpers.OddClientsDropHeadColumns"}
    config = small_quickstart(tmp_path, rounds=4, strategy=strategy)
    ref = fit_in_process(config)
    flower, grid = fit_on_flower(config)
    assert_same_model(ref, flower)
    jobs = {(int(cfg["client-id"]) % 2, cfg["payload-id"]): messages.read_job(j.content).payload.encoded
            for j in grid.jobs if j.metadata.group_id == "3" for cfg in [j.content[messages.CONFIG]]}
    own = [p for (odd, _), p in jobs.items() if odd]
    shared = {pid for (odd, pid) in jobs if not odd}
    assert own and len(shared) == 1 and not {pid for (odd, pid) in jobs if odd} & shared
    assert all(p["head.weight"].kind == "column" and p.nbytes < jobs[(0, next(iter(shared)))].nbytes for p in own)


# ------------------------------------------------------------------ bad replies fail their client, nothing else
ROUND = 2  # pruning is on: the masks say what is pruned
CLIENT = int(sample_cohort(np.arange(20), 5, 0, ROUND)[0])  # the first job of that round


def _tampered(change):
    """A tamper hook that changes the reply of CLIENT in ROUND."""

    def tamper(job, reply):
        cfg = job.content[messages.CONFIG]
        if job.metadata.message_type == messages.TRAIN and (cfg["round"], cfg["client-id"]) == (ROUND, CLIENT):
            return change(job, reply)
        return reply

    return tamper


def _first_masked(reply):
    spec = json.loads(zlib.decompress(reply.content[messages.CONFIG]["spec"]))
    return next(s for s in spec if s["kind"] != "dense"), spec


def _send_dense_with_ones(job, reply):
    entry, spec = _first_masked(reply)
    shape = tuple(entry["shape"])
    arrays = reply.content[messages.ARRAYS]
    for key in entry["keys"]:
        del arrays[f"{entry['name']}/{key}"]
    arrays[f"{entry['name']}/values"] = Array(np.ones(shape, np.float32))
    entry.update(kind="dense", pattern=None, index=None, keys=["values"])
    reply.content[messages.CONFIG]["spec"] = zlib.compress(json.dumps(spec).encode())
    return reply


def _values_array(reply, change):
    entry, _ = _first_masked(reply)
    key = f"{entry['name']}/{entry['keys'][-1]}"
    arrays = reply.content[messages.ARRAYS]
    arrays[key] = Array(change(arrays[key].numpy()))
    return reply


def _with_nan(a):
    a = a.copy()
    a.flat[0] = np.nan
    return a


def _set_meta(field, value):
    def change(job, reply):
        reply.metadata.__dict__[field] = value
        return reply
    return change


def _set_config(key, value):
    def change(job, reply):
        reply.content[messages.CONFIG][key] = value
        return reply
    return change


def _drop_metric(key):
    def change(job, reply):
        del reply.content[messages.METRICS][key]
        return reply
    return change


BAD_REPLIES = {
    "flower error": (lambda job, reply: make_message(reply.metadata, error=Error(2, "the ClientApp raised")),
                     "Flower error 2: the ClientApp raised"),
    "no reply (timeout)": (lambda job, reply: None, "no reply from Flower node .* within round_timeout=0.5 s"),
    "another node": (_set_meta("_src_node_id", 4242), "the reply came from node 4242"),
    "another round": (_set_meta("_group_id", "7"), "the reply is for round '7', not 2"),
    "another round in the record": (_set_config("round", 7), "is for round 7 client"),
    "another client": (_set_config("client-id", CLIENT + 1), f"client {CLIENT + 1}, not round 2 client {CLIENT}"),
    "no example count": (_drop_metric("num-examples"), "no example count"),
    "unreadable spec": (_set_config("spec", zlib.compress(b"{not json")), "the payload spec is not readable"),
    "spec not compressed": (_set_config("spec", b"[]"), "the payload spec is not readable"),
    "wrong key": (lambda job, reply: _rename_first_array(reply), "do not match its spec"),
    "wrong shape": (lambda job, reply: _values_array(reply, lambda a: a[..., :-1]), "cannot be decoded"),
    "wrong dtype": (lambda job, reply: _values_array(reply, lambda a: a.astype(np.float64)), "cannot be decoded"),
    "non-zero where pruned": (_send_dense_with_ones, "non-zero values where the mask says pruned"),
    "NaN": (lambda job, reply: _values_array(reply, _with_nan), "non-finite values in"),
    "unreadable optimiser state": (_set_config("optim", b"not a torch file"), "optimiser state is not readable"),
}


def _rename_first_array(reply):
    arrays = reply.content[messages.ARRAYS]
    key = next(iter(arrays))
    arrays[key + "x"] = arrays.pop(key)
    return reply


@pytest.fixture(scope="module")
def failed_client_reference(tmp_path_factory):
    """The in-process run in which CLIENT fails (raises) in ROUND: what every bad reply must lead to."""
    tmp = tmp_path_factory.mktemp("ref")
    ref = fit_in_process(small_quickstart(tmp, rounds=4, fail_at=[ROUND, CLIENT]))
    return ref


@pytest.mark.parametrize("kind", list(BAD_REPLIES))
def test_a_bad_reply_fails_its_client_like_an_in_process_failure(kind, tmp_path, failed_client_reference):
    change, reason = BAD_REPLIES[kind]
    config = small_quickstart(tmp_path, rounds=4)
    with pytest.warns(UserWarning, match=f"round {ROUND}: client {CLIENT} failed and is left out of the aggregate: "
                                         f".*{reason}") as record:
        flower, _ = fit_on_flower(config, tamper=_tampered(change), **{"round-timeout": 0.5})
    assert sum("failed and is left out" in str(w.message) for w in record) == 1  # that client only
    assert_same_model(failed_client_reference, flower)


def test_a_client_failing_on_its_node_fails_as_in_process(tmp_path, failed_client_reference):
    """The task raises on the node: the node replies with the error, the server fails that client."""
    config = small_quickstart(tmp_path, rounds=4, fail_at=[ROUND, CLIENT])
    with pytest.warns(UserWarning, match=f"round {ROUND}: client {CLIENT} failed .*RuntimeError: client fault"):
        flower, _ = fit_on_flower(config)
    assert_same_model(failed_client_reference, flower)


# ------------------------------------------------------------------ which node holds which client
@pytest.mark.parametrize("nodes, error", [
    ([{"clients": "0-9"}, {"clients": "10-18"}], r"No Flower node holds clients 19 \(of 20\)"),
    ([{"clients": "0-10"}, {"clients": "10-19"}], "Flower nodes 1000 and 1001 both hold client 10"),
    ([{"clients": "0-19"}, {"clients": "a,b"}], None),  # a broken node config: a warning, the others carry on
    ([{"partition-id": 0, "num-partitions": 2}], r"No Flower node holds clients 1, 3, 5"),
])
def test_node_discovery(nodes, error, tmp_path):
    config = small_quickstart(tmp_path, rounds=4)
    if error is None:
        with pytest.warns(UserWarning, match=r"Flower node 1001 holds no clients: .*`clients` must be client ids"):
            flower, _ = fit_on_flower(config, nodes=nodes, overrides="--trainer.max_steps=1")
        assert flower.trainer.global_step == 1
        return
    with pytest.raises(RuntimeError, match=error):
        fit_on_flower(config, nodes=nodes, **{"node-timeout": 0.5})


def test_deployment_node_with_its_own_data_numbering(tmp_path):
    """``local-clients``: the node's data numbers its clients 0..k-1; the server's ids are mapped onto them."""

    class Data:
        def client_size(self, cid):
            return [10, 20][cid]

        def client_loader(self, cid, seed):
            return [f"local {cid}"]

    held = NodeClients({"clients": "7,3", "local-clients": "0,1"})
    data = NodeClientData(Data(), held.local)
    assert held.listed(20) == [3, 7] and held.holds(7) and not held.holds(0)
    assert data.client_size(7) == 10 and data.client_size(3) == 20 and data.client_loader(3, 0) == ["local 1"]
    with pytest.raises(KeyError, match="does not hold client 0"):
        data.client_size(0)
    assert NodeClients({"partition-id": 1, "num-partitions": 3}).listed(8) == [1, 4, 7]
    for bad, match in [({}, "names no clients"), ({"clients": "1", "local-clients": "0,1"}, "same length"),
                       ({"partition-id": 3, "num-partitions": 3}, "is not a partition")]:
        with pytest.raises(ValueError, match=match):
            NodeClients(bad)


def test_the_app_keeps_a_yaml_flower_executor_and_replaces_any_other(tmp_path):
    from fedprune_flower.task import server_cli

    grid = LoopbackGrid(client_app, partitioned(2))
    own = small_quickstart(tmp_path, rounds=4, executor={
        "class_path": "lightning_fedprune.federated.flower.FlowerExecutor", "init_args": {"round_timeout": 7.0}})
    cli = server_cli(grid, {"config": str(own), "round-timeout": 99.0})
    assert isinstance(cli.model.executor, FlowerExecutor) and cli.model.executor.round_timeout == 7.0
    pool = small_quickstart(tmp_path, rounds=4, name="pool.yaml", executor="process")
    cli = server_cli(grid, {"config": str(pool), "round-timeout": 99.0})
    assert isinstance(cli.model.executor, FlowerExecutor) and cli.model.executor.round_timeout == 99.0


# ------------------------------------------------------------------ the executor outside its ServerApp, arguments
def test_flower_executor_outside_a_server_app_says_how_to_run_it():
    data = FederatedDataModule(GaussianMixtureDataset(num_samples=64, seed=0), num_clients=2, batch_size=16)
    fed = FederatedLightningModule(MLPClassifier(hidden=8), clients_per_round=2, local_steps=1, executor="flower")
    assert isinstance(fed.executor, FlowerExecutor)
    import lightning.pytorch as pl

    trainer = pl.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    with pytest.raises(RuntimeError, match="runs inside a Flower ServerApp.*flwr run examples/flower"):
        trainer.fit(fed, datamodule=data)


@pytest.mark.parametrize("kwargs, match", [
    ({"round_timeout": 0}, r"`round_timeout` must be a finite number > 0, got 0"),
    ({"node_timeout": float("inf")}, r"`node_timeout` must be a finite number > 0, got inf"),
    ({"poll_interval": -1}, r"`poll_interval` must be a finite number > 0, got -1"),
])
def test_flower_executor_arguments_are_checked(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FlowerExecutor(**kwargs)


def test_without_flower_installed_the_error_says_how_to_install_it(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "flwr" else find_spec(name, *a))
    with pytest.raises(ImportError, match=r"pip install 'lightning-fedprune\[flower\]'"):
        FederatedLightningModule(MLPClassifier(), executor="flower")


# ------------------------------------------------------------------ the record layout
@pytest.mark.parametrize("pattern", sorted(PATTERNS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_every_wire_kind_travels_through_records_unchanged(pattern, dtype):
    gen = torch.Generator().manual_seed(0)
    state = {"w": torch.randn(8, 6, generator=gen).to(dtype), "b": torch.randn(8, generator=gen).to(dtype),
             "steps": torch.tensor(3), "flag": torch.tensor([True, False])}
    masks = {"w": compute_mask(torch.randn(8, 6, generator=gen), pattern, 0.5)}
    for send_index in (True, False):
        payload = encode_state(state, masks, {"w": pattern}, send_index=send_index)
        record, spec = messages.payload_record(payload)
        assert list(record) == messages.array_keys(payload.spec())
        back = messages.payload_from_record(record, spec)
        assert back.spec() == payload.spec()
        for a, b in zip(payload.to_arrays(), back.to_arrays()):
            assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)


def test_optimiser_state_travels_exactly_and_cannot_run_code():
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=0.1, betas=(0.8, 0.9))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.5, total_steps=10)
    from lightning_fedprune.federated.client import optim_state_of
    from lightning.pytorch.utilities.types import LRSchedulerConfig

    state = optim_state_of([opt], [LRSchedulerConfig(sched)], 7, 2)
    back = messages.load_optim(messages.dump_state(state))
    assert back == state and isinstance(back.param_groups[0][0]["betas"], tuple)  # types too, not only values

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with pytest.raises(messages.RejectedReply, match="optimiser state is not readable"):
        messages.load_optim(messages.dump_state({"param_groups": [[{"x": Evil()}]]}))


@pytest.fixture(scope="module")
def asr_smoke(tmp_path_factory):
    """examples/asr/smoke.yaml and its in-process run (trained once for the ASR tests below), with the corpus
    cached in a folder of its own for as long as they run."""
    for module in ("soundfile", "torchaudio", "espeakng_loader"):
        pytest.importorskip(module)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FEDPRUNE_CACHE", str(tmp_path_factory.mktemp("asr") / "cache"))
        smoke = ROOT / "examples" / "asr" / "smoke.yaml"
        ref = build_cli(["--config", str(smoke), "--quiet=true", "--trainer.logger=false"], run=False)
        ref.trainer.fit(ref.model, datamodule=ref.datamodule)
        yield smoke, ref


def test_asr_smoke_on_flower_equals_in_process(asr_smoke):
    """examples/asr/smoke.yaml (a Conformer-Transducer, one client per speaker, compact column-pruned clients)."""
    smoke, ref = asr_smoke
    flower, _ = fit_on_flower(smoke, nodes=2, overrides="--trainer.logger=false")
    assert flower.trainer.global_step == 3 and flower.model.pruning.permanent
    assert_same_model(ref, flower)


def test_asr_nodes_that_hold_only_their_own_speakers(asr_smoke, tmp_path):
    """A deployment's nodes: each has a corpus directory with only its speakers (node config ``overrides`` points
    its data module there) and maps the server's client ids onto its own (``clients`` / ``local-clients``)."""
    smoke, ref = asr_smoke
    corpus, speakers = ref.datamodule.corpus_root, ref.datamodule.speakers  # the server's client order
    nodes = []
    for i, own in enumerate([speakers[1::2], speakers[0::2]]):
        root = tmp_path / f"node{i}"
        (root / "train").mkdir(parents=True)
        for speaker in own:
            (root / "train" / speaker).symlink_to(corpus / "train" / speaker)
        nodes.append({"clients": ",".join(str(speakers.index(s)) for s in own),
                      "local-clients": ",".join(map(str, range(len(own)))),
                      "overrides": f"--data.init_args.root={root} --data.init_args.val_splits=[] "
                                   "--data.init_args.test_splits=[]"})
    flower, grid = fit_on_flower(smoke, nodes=nodes, overrides="--trainer.logger=false")
    assert_same_model(ref, flower)
    assert {messages.read_job(j.content).plan.client_id % 2 for j in grid.jobs
            if j.metadata.message_type == messages.TRAIN and j.metadata.dst_node_id == 1000} == {1}
