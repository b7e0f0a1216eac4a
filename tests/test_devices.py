"""Device handling that can be checked without a GPU: nothing is made on a fixed device, device arguments are
validated, several devices are refused with what to use, checkpoints are read to the host (tests/test_gpu.py
runs the engine on a real GPU)."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lightning_fedprune.federated.checkpoint import ValidatingCheckpointIO
from lightning_fedprune.federated.client_config import check_one_device
from lightning_fedprune.federated.executors import ProcessPoolExecutor
from lightning_fedprune.federated.protocol import ClientConfig

PACKAGE = Path(__file__).resolve().parent.parent / "lightning_fedprune"


def test_no_tensor_is_made_on_a_fixed_device():
    """Every tensor the server or a client makes goes on the device of what it meets: no `.cuda()`, no literal
    CUDA device in the package's code (the docs and error messages may name one)."""
    fixed = re.compile(r"\.cuda\(|device=[\"']cuda|torch\.device\([\"']cuda")
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            if fixed.search(code) and not code.strip().startswith(('"', "'", "f\"")):
                offenders.append(f"{path.relative_to(PACKAGE)}:{number}: {line.strip()}")
    assert not offenders, offenders


@pytest.mark.parametrize("kwargs, match", [
    (dict(devices="cuda:0"), "`devices` must be a non-empty list"),
    (dict(devices=[]), "`devices` must be a non-empty list"),
    (dict(devices=["gpu7"]), "`devices`"),
    (dict(devices=["cuda:0"], start_method="fork"), "start_method='fork'"),
])
def test_pool_device_arguments_are_checked_naming_them(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ProcessPoolExecutor(num_workers=1, **kwargs)


def test_pool_workers_cycle_over_the_devices():
    pool = ProcessPoolExecutor(num_workers=3, devices=["cpu", "cpu"], start_method="spawn")
    assert pool.devices == ["cpu", "cpu"]
    with pytest.raises(ValueError, match="start_method='fork'"):
        ProcessPoolExecutor(num_workers=1, start_method="fork").setup(None, None, ClientConfig(local_steps=1,
                                                                                                device="cuda:0"))


@pytest.mark.parametrize("devices, nodes", [(2, 1), (1, 2)])
def test_several_trainer_devices_are_refused_with_what_to_use(devices, nodes):
    with pytest.raises(ValueError, match=r"ProcessPoolExecutor\(devices=\['cuda:0', 'cuda:1'"):
        check_one_device(SimpleNamespace(num_devices=devices, num_nodes=nodes))
    check_one_device(SimpleNamespace(num_devices=1, num_nodes=1))


def test_checkpoints_are_read_to_the_host(tmp_path):
    seen = {}

    class Recording:
        def load_checkpoint(self, path, map_location=None, weights_only=None):
            seen["map_location"] = map_location
            return {}

    path = tmp_path / "c.ckpt"
    torch.save({"x": torch.ones(1)}, path)
    ValidatingCheckpointIO(Recording()).load_checkpoint(path)
    assert seen["map_location"] == "cpu"
    ValidatingCheckpointIO(Recording()).load_checkpoint(path, map_location="meta")
    assert seen["map_location"] == "meta"


def test_a_flower_node_trains_on_its_configured_device():
    pytest.importorskip("flwr")
    from lightning_fedprune.federated.flower.node import node_device

    config = ClientConfig(local_steps=1, device="cuda:0")
    assert node_device({"device": "cuda:1"}, config) == "cuda:1"
    assert node_device({}, ClientConfig(local_steps=1)) == "cpu"
    assert node_device({}, config) == ("cuda:0" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="node config device"):
        node_device({"device": "gpu!"}, config)
