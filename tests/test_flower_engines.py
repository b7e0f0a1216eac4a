"""Flower's engines: `flwr run` on a simulation SuperLink (Ray), and the loopback deployment script
(SuperLink + SuperNodes + node workers). Every process runs under a timeout and is stopped by its PID.

They cost about 2 minutes together (Ray and the SuperNodes' per-message ClientApp processes start
slowly on 2 cores); tests/test_flower.py covers the same code paths on a loopback Grid in seconds.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("flwr")

import torch  # noqa: E402
from flower_helpers import APP, ROOT, small_quickstart  # noqa: E402

from lightning_fedprune.cli import build_cli  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*(LightningCLI|litlogger|litmodels|treespec).*")
RUN_TIMEOUT_S = 300


def free_port() -> int:
    """A free loopback port; the test is skipped when none can be bound (a sandbox without networking)."""
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]
    except OSError as err:
        pytest.skip(f"cannot bind a loopback port: {err}")


def flower_env(home: Path) -> dict[str, str]:
    """This checkout first on PYTHONPATH, this interpreter's scripts (flwr, flower-superlink, ...) first on PATH."""
    home.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, FLWR_HOME=str(home), FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1",
               FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["PATH"] = os.pathsep.join(filter(None, [str(Path(sys.executable).parent), env.get("PATH")]))
    return env


def tool(name: str, env: dict[str, str]) -> str:
    path = shutil.which(name, path=env["PATH"])
    if path is None:
        pytest.fail(f"`{name}` is not installed next to {sys.executable} (the flower extra installs it)")
    return path


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, waiting for a parent that does not reap it, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the SuperLink exited with code {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    pytest.fail(f"the SuperLink did not listen on port {port} within {timeout:g} s")


def final_checkpoint(runs: Path, rounds: int) -> dict:
    return torch.load(next(runs.rglob(f"*-step={rounds}.ckpt")), map_location="cpu", weights_only=False)


def test_flwr_run_simulation_equals_in_process(tmp_path):
    rounds = 4
    config = small_quickstart(tmp_path, rounds=rounds)
    ref = build_cli(["--config", str(config), "--quiet=true"], run=False)
    ref.trainer.fit(ref.model, datamodule=ref.datamodule)

    port = free_port()
    env = flower_env(tmp_path / "flwr-home")
    (tmp_path / "flwr-home" / "config.toml").write_text(
        f'[superlink]\ndefault = "sim"\n\n[superlink.sim]\naddress = "127.0.0.1:{port}"\ninsecure = true\n')
    log = open(tmp_path / "superlink.log", "w")
    superlink = subprocess.Popen([tool("flower-superlink", env), "--insecure", "--simulation", "--host", "127.0.0.1",
                                  "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT,
                                 start_new_session=True, cwd=tmp_path)
    try:
        wait_for_port(port, superlink)
        run_config = f'config="{config}" overrides="--trainer.logger.init_args.save_dir={tmp_path / "flower-runs"}"'
        run = subprocess.run([tool("flwr", env), "run", str(APP), "sim", "--stream", "--federation-config", "num-supernodes=4",
                              "--run-config", run_config], env=env, cwd=tmp_path, capture_output=True, text=True,
                             timeout=RUN_TIMEOUT_S)
    finally:
        os.killpg(superlink.pid, signal.SIGTERM)
        try:
            superlink.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(superlink.pid, signal.SIGKILL)
            superlink.wait(timeout=15)
        log.close()
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-3000:]
    assert f"`Trainer.fit` stopped: `max_steps={rounds}` reached" in output, output[-3000:]

    flower = final_checkpoint(tmp_path / "flower-runs", rounds)
    local = final_checkpoint(tmp_path / "runs", rounds)
    assert flower["state_dict"].keys() == local["state_dict"].keys()
    for name, value in local["state_dict"].items():
        torch.testing.assert_close(flower["state_dict"][name], value, rtol=1e-5, atol=1e-6, msg=name)
    masks = local["fedprune"]["pruning"]["masks"]
    assert masks and masks.keys() == flower["fedprune"]["pruning"]["masks"].keys()
    for name, mask in masks.items():
        assert torch.equal(flower["fedprune"]["pruning"]["masks"][name], mask), name
    assert local["fedprune"]["pruning"]["masks"] and ref.model.pruning.sparsity() > 0


def run_deployment(tmp_path: Path, *args: str, timeout: float = RUN_TIMEOUT_S) -> tuple[subprocess.CompletedProcess, list[int]]:
    free_port()  # skips when no port can be bound
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "flower_deployment.sh"), "--out", str(tmp_path / "deploy"),
                           *args], env=flower_env(tmp_path / "unused-home"), cwd=tmp_path, capture_output=True,
                          text=True, timeout=timeout)
    started = [int(p) for p in re.findall(r"\[deploy\] \S+: PID (\d+)", proc.stdout)]
    return proc, started


def test_loopback_deployment_runs_pruning_and_stops_its_processes(tmp_path):
    rounds = 4
    config = small_quickstart(tmp_path, rounds=rounds, clients_per_round=2)
    proc, started = run_deployment(tmp_path, "--config", str(config), "--nodes", "2", "--rounds", str(rounds))
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert "[deploy] OK" in output
    assert len(started) == 5  # a SuperLink, 2 node workers, 2 SuperNodes
    assert f"stopped PIDs {' '.join(map(str, started))}" in output
    assert not [pid for pid in started if alive(pid)]
    summary = next((tmp_path / "deploy" / "runs").rglob("summary.json"))
    assert '"sparsity": 0.5' in summary.read_text() and f'"rounds": {rounds}' in summary.read_text()
    # every job went to the node workers: the SuperNodes' ClientApp processes only forwarded them
    worker_logs = [(tmp_path / "deploy" / "logs" / f"worker{i}.log").read_text() for i in range(2)]
    assert all("Seed set to 0" in log for log in worker_logs)  # each built its task once, from the YAML


def test_loopback_deployment_that_fails_still_stops_its_processes(tmp_path):
    config = small_quickstart(tmp_path, rounds=4)
    proc, started = run_deployment(tmp_path, "--config", str(config), "--nodes", "2", "--timeout", "12")
    assert proc.returncode != 0
    assert started and f"stopped PIDs {' '.join(map(str, started))}" in proc.stdout
    assert not [pid for pid in started if alive(pid)]
