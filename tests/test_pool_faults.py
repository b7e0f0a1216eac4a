"""Fault injection for the process pool: workers killed while idle, training or starting, stuck
workers, an unguarded main script, and a fit that raises.

Every scenario is bounded: the in-process ones by a faulthandler watchdog (a hang dumps every
thread's stack and exits the test process instead of stalling CI), the script ones by
``subprocess.run(..., timeout=...)``. Expected results come from the sequential executor, where
the faulty client raises instead of killing or blocking its process: the failed client is left
out of the aggregate either way, so the weights must agree bit for bit.
"""

from __future__ import annotations

import faulthandler
import multiprocessing as mp
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import GaussianMixtureDataset, MLPClassifier, quiet_trainer

from lightning_fedprune import ClientConfig, FederatedCallback, FederatedDataModule, FederatedLightningModule, ProcessPoolExecutor
from lightning_fedprune.federated.executors.pool import _HEADER, WorkerStartupError, _Worker

ROOT = Path(__file__).resolve().parent.parent
WATCHDOG_S = 240  # per test; generous for a loaded CI machine, far below "forever"
SCRIPT_TIMEOUT_S = 180


@pytest.fixture(autouse=True)
def watchdog():
    faulthandler.dump_traceback_later(WATCHDOG_S, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


class FaultTask(MLPClassifier):
    """Misbehaves in client training at ``at = (round, client)``: ``"kill"`` SIGKILLs its own
    process, ``"hang"`` blocks, ``"raise"`` raises (the reference run: the client just fails)."""

    def __init__(self, fault: str = "raise", at: tuple[int, int] = (1, 0), **kwargs) -> None:
        super().__init__(**kwargs)
        self.fault, self.at = fault, tuple(at)

    def training_step(self, batch, batch_idx):
        if (self.trainer.fed_round, self.trainer.client_id) == self.at:
            if self.fault == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            elif self.fault == "hang":
                time.sleep(600)
            raise RuntimeError("client fault")
        return super().training_step(batch, batch_idx)


class StartupFaultTask(MLPClassifier):
    """Misbehaves when a worker process unpickles it (never in the process that created it)."""

    def __init__(self, fault: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.fault, self.owner = fault, os.getpid()

    def __setstate__(self, state):
        super().__setstate__(state)
        if self.owner != os.getpid():
            if self.fault == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            elif self.fault == "hang":
                time.sleep(600)
            raise RuntimeError("cannot load this task here")


class Trace(FederatedCallback):
    """Per round: ids of the failed clients; plus the pool's worker pids as seen by the callbacks."""

    def __init__(self) -> None:
        self.failed: dict[int, list[int]] = {}
        self.pids: set[int] = set()

    def on_fed_client_result(self, trainer, pl_module, result):
        self.failed.setdefault(result.round, [])
        if not result.ok:
            self.failed[result.round].append(result.client_id)
        self.pids.update(getattr(pl_module.executor, "worker_pids", []))


class KillIdleWorker(FederatedCallback):
    """After round 0, SIGKILL one (idle) worker and wait until it has exited."""

    def on_fed_round_end(self, trainer, pl_module, summary):
        if summary.round == 0:
            pid = pl_module.executor.worker_pids[0]
            os.kill(pid, signal.SIGKILL)
            _wait(lambda: _exited(pid))


class KillWorkerWhileSending(FederatedCallback):
    """Round 1: stop one worker (SIGSTOP) before the broadcast, so the payload cannot all be sent
    to it, and kill it when the first client result arrives, with part of its frames unsent."""

    def __init__(self) -> None:
        self.pid: int | None = None

    def on_fed_round_start(self, trainer, pl_module, round, cohort):
        if round == 1:
            self.pid = pl_module.executor.worker_pids[0]
            os.kill(self.pid, signal.SIGSTOP)

    def on_fed_client_result(self, trainer, pl_module, result):
        if result.round == 1 and self.pid is not None:
            os.kill(self.pid, signal.SIGKILL)
            _wait(lambda: _exited(self.pid))
            self.pid = None


class RaiseInRound(FederatedCallback):
    def __init__(self, round: int) -> None:
        self.round = round
        self.pids: list[int] = []

    def on_fed_round_start(self, trainer, pl_module, round, cohort):
        if round == self.round:
            self.pids = pl_module.executor.worker_pids
            raise RuntimeError("callback fault")


def _exited(pid: int) -> bool:
    """The worker process has exited, all its threads included; it is not reaped (the pool reaps its workers)."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:  # reaped, or not our child (a forkserver's): ask /proc
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return True
        return state in ("Z", "X")


def _gone(pid: int) -> bool:
    """Exited and reaped."""
    return not Path(f"/proc/{pid}").exists()


def _pool_children() -> list:
    """This process's live worker processes of any pool."""
    return [p for p in mp.active_children() if p.name.startswith("fedprune-worker-")]


def _wait(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def _pipes_and_sockets() -> int:
    """Open pipe and socket descriptors of this process."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}").startswith(("pipe:", "socket:"))
        except OSError:
            pass
    return count


def _data() -> FederatedDataModule:
    return FederatedDataModule(GaussianMixtureDataset(96, dim=8, num_classes=3), num_clients=4, batch_size=8)


def _fit(executor, task_cls=MLPClassifier, callbacks=(), rounds=3, hidden=16, **task_kwargs):
    torch.manual_seed(0)
    task = task_cls(in_dim=8, hidden=hidden, num_classes=3, **task_kwargs)
    fed = FederatedLightningModule(task, clients_per_round=4, local_steps=2, executor=executor)
    trace = Trace()
    quiet_trainer(max_steps=rounds, callbacks=[trace, *callbacks]).fit(fed, datamodule=_data())
    return fed, trace


def _assert_identical(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), name


# ------------------------------------------------------------------ the pool survives dying workers
def test_idle_worker_killed_between_rounds_is_replaced_and_no_client_fails():
    ref, ref_trace = _fit("sequential")
    with pytest.warns(UserWarning, match=r"died while idle \(killed by SIGKILL\)"):
        fed, trace = _fit(ProcessPoolExecutor(wait_for_workers=True, num_workers=2), callbacks=[KillIdleWorker()])
    assert trace.failed == ref_trace.failed == {0: [], 1: [], 2: []}
    _assert_identical(fed, ref)
    assert len(trace.pids) == 3  # two workers, one replaced
    assert all(_gone(pid) for pid in trace.pids)  # and the pool is gone after fit


def test_worker_killed_before_it_received_its_client_loses_no_client():
    # hidden=1024: a ~4 MB payload, more than a socket buffer holds, so part of it stays unsent
    ref, ref_trace = _fit("sequential", hidden=1024)
    with pytest.warns(UserWarning, match=r"died before it received client \d+ \(killed by SIGKILL\)"):
        fed, trace = _fit(ProcessPoolExecutor(wait_for_workers=True, num_workers=2, start_method="fork"), callbacks=[KillWorkerWhileSending()],
                          hidden=1024)
    assert trace.failed == ref_trace.failed == {0: [], 1: [], 2: []}
    _assert_identical(fed, ref)


def test_worker_killed_while_training_fails_only_its_client():
    ref, ref_trace = _fit("sequential", FaultTask, fault="raise", at=(1, 2))
    with pytest.warns(UserWarning, match=r"died while training client 2 in round 1 \(killed by SIGKILL\)"):
        fed, trace = _fit(ProcessPoolExecutor(wait_for_workers=True, num_workers=2, start_method="fork"), FaultTask, fault="kill", at=(1, 2))
    assert trace.failed == ref_trace.failed == {0: [], 1: [2], 2: []}
    _assert_identical(fed, ref)


def test_client_timeout_kills_a_stuck_client_and_the_round_goes_on():
    ref, ref_trace = _fit("sequential", FaultTask, fault="raise", at=(1, 3))
    pool = ProcessPoolExecutor(wait_for_workers=True, num_workers=2, start_method="fork", client_timeout=4)
    with pytest.warns(UserWarning, match=r"Client 3 ran past client_timeout=4 s in round 1"):
        fed, trace = _fit(pool, FaultTask, fault="hang", at=(1, 3))
    assert trace.failed == ref_trace.failed == {0: [], 1: [3], 2: []}
    _assert_identical(fed, ref)


@pytest.mark.parametrize(("kwargs", "argument"), [
    ({"startup_timeout": 0}, "startup_timeout"), ({"startup_timeout": float("inf")}, "startup_timeout"),
    ({"startup_timeout": True}, "startup_timeout"), ({"client_timeout": -1}, "client_timeout"),
    ({"client_timeout": "10"}, "client_timeout"), ({"startup_attempts": 0}, "startup_attempts"),
    ({"startup_attempts": 1.5}, "startup_attempts"), ({"num_workers": True}, "num_workers"),
])
def test_bad_arguments_are_rejected_naming_the_argument(kwargs, argument):
    with pytest.raises(ValueError, match=f"`{argument}` must be"):
        ProcessPoolExecutor(**kwargs)


# ------------------------------------------------------------------ start-up
def _start(fault: str, **pool_kwargs) -> ProcessPoolExecutor:
    pool = ProcessPoolExecutor(wait_for_workers=True, num_workers=1, start_method="fork", **pool_kwargs)
    pool.setup(StartupFaultTask(fault, in_dim=8, hidden=16, num_classes=3), _data().client_data(),
               ClientConfig(local_steps=1))
    pool.wait_ready()  # start-up faults surface here (or in the first round, which waits for a worker as needed)
    return pool


def test_a_worker_that_keeps_dying_at_start_up_gives_up_after_startup_attempts():
    with pytest.warns(UserWarning, match=r"exited during start-up \(killed by SIGKILL\) \(attempt 1 of 2\)"):
        with pytest.raises(WorkerStartupError, match=r"exited during start-up \(killed by SIGKILL\) on each of 2 attempts"):
            _start("kill", startup_attempts=2)
    assert _pool_children() == []


def test_a_worker_stuck_at_start_up_is_bounded_by_startup_timeout():
    started = time.monotonic()
    with pytest.raises(WorkerStartupError, match=r"did not finish start-up within startup_timeout=1 s on each of 1 attempts"):
        _start("hang", startup_timeout=1, startup_attempts=1)
    assert time.monotonic() - started < 30
    assert _pool_children() == []


def test_a_task_that_cannot_be_loaded_fails_at_once_with_the_workers_traceback():
    with pytest.raises(WorkerStartupError, match=r"could not load the task(.|\n)*cannot load this task here"):
        _start("raise", startup_attempts=3)
    assert _pool_children() == []


# ------------------------------------------------------------------ teardown on every exit path
def test_pool_is_torn_down_when_fit_raises():
    fds_before = _pipes_and_sockets()
    raising = RaiseInRound(2)
    pool = ProcessPoolExecutor(wait_for_workers=True, num_workers=2, start_method="fork")
    with pytest.raises(RuntimeError, match="callback fault"):
        _fit(pool, callbacks=[raising])
    assert len(raising.pids) == 2
    assert all(_gone(pid) for pid in raising.pids)
    assert _pool_children() == [] and pool.worker_pids == []
    assert _pipes_and_sockets() == fds_before


# ------------------------------------------------------------------ the connection itself
def test_connection_loss_is_noticed_at_every_point_without_blocking():
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    worker = _Worker(proc=None, sock=ours, attempt=1, deadline=0.0)
    frame = pickle.dumps(("result", list(range(1000))))
    theirs.sendall(_HEADER.pack(len(frame)) + frame[:100])
    assert worker.receive() == [] and not worker.broken  # a partial frame: nothing yet, no wait
    theirs.sendall(frame[100:] + _HEADER.pack(len(frame)) + frame[:5])
    assert worker.receive() == [("result", list(range(1000)))]
    theirs.close()  # the worker dies in the middle of its next frame
    assert worker.receive() == [] and worker.broken
    # sending to a worker that is gone marks it broken instead of raising or blocking
    ours2, theirs2 = socket.socketpair()
    ours2.setblocking(False)
    worker2 = _Worker(proc=None, sock=ours2, attempt=1, deadline=0.0)
    theirs2.close()
    worker2.queue(bytes(4 << 20))
    worker2.flush()
    assert worker2.broken
    ours.close()
    ours2.close()


# ------------------------------------------------------------------ scripts (spawn re-imports them)
SCRIPT = '''
import torch
import lightning.pytorch as pl
from lightning_fedprune import FederatedDataModule, FederatedLightningModule, ProcessPoolExecutor
from lightning_fedprune.demos import GaussianMixtureDataset, MLPClassifier


def fit(executor):
    torch.manual_seed(0)
    task = MLPClassifier(in_dim=32, hidden=16, num_classes=3)
    # 2,000 samples: the task + data sent to a worker (~300 kB) exceed a pipe's 64 kB buffer
    dm = FederatedDataModule(GaussianMixtureDataset(2000, dim=32, num_classes=3), num_clients=4, batch_size=16)
    fed = FederatedLightningModule(task, clients_per_round=4, local_steps=2, executor=executor)
    pl.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False).fit(fed, datamodule=dm)
    return fed


torch.set_num_threads(1)
'''

KILLED_AT_START_UP = '''
import multiprocessing, os, signal

# a worker importing this script while it starts (not the process that only tells when the forkserver is ready)
if __name__ == "__mp_main__" and multiprocessing.current_process().name.startswith("fedprune-worker"):
    try:
        os.close(os.open("first-worker", os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        pass
    else:  # the first worker dies here, before it has read anything the server sends it
        os.kill(os.getpid(), signal.SIGKILL)
''' + SCRIPT + '''
if __name__ == "__main__":
    pool = fit(ProcessPoolExecutor(wait_for_workers=True, num_workers=1))
    ref = fit("sequential")
    same = all(torch.equal(a, b) for a, b in zip(pool.state_dict().values(), ref.state_dict().values()))
    print("IDENTICAL" if same else "DIFFERENT")
'''

UNGUARDED = SCRIPT + '''
fit(ProcessPoolExecutor(wait_for_workers=True, num_workers=1))
'''


def _run_script(tmp_path: Path, source: str) -> subprocess.CompletedProcess:
    script = tmp_path / "train.py"
    script.write_text(source)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    try:
        return subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=SCRIPT_TIMEOUT_S)
    except subprocess.TimeoutExpired as err:
        stderr = err.stderr.decode(errors="replace") if isinstance(err.stderr, bytes) else err.stderr
        pytest.fail(f"the script hung (killed after {SCRIPT_TIMEOUT_S} s); its stderr:\n{stderr}")


def test_worker_killed_at_start_up_with_a_large_payload_is_restarted(tmp_path):
    out = _run_script(tmp_path, KILLED_AT_START_UP)
    assert out.returncode == 0, out.stderr
    assert "exited during start-up (killed by SIGKILL) (attempt 1 of 3); starting it again" in out.stderr
    assert out.stdout.strip().splitlines()[-1] == "IDENTICAL"


def test_unguarded_main_script_fails_with_a_clear_error(tmp_path):
    out = _run_script(tmp_path, UNGUARDED)
    assert out.returncode == 1
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("lightning_fedprune.federated.executors.pool.WorkerStartupError: A worker process re-ran the "
                           "training script")
    assert 'if __name__ == "__main__":' in last and 'executor="sequential"' in last and 'start_method="fork"' in last


# ------------------------------------------------------------------ a fit never waits for start-up
class SlowStart(MLPClassifier):
    """Unpickling it in a worker takes a while (a task whose modules are slow to import)."""

    def __setstate__(self, state):
        if mp.parent_process() is not None:
            time.sleep(3.0)
        super().__setstate__(state)


class ReadyAtRoundStart(FederatedCallback):
    def __init__(self) -> None:
        self.ready: list[int] = []

    def on_fed_round_start(self, trainer, pl_module, round, cohort):
        self.ready.append(sum(w.ready for w in pl_module.executor._workers))


def test_the_server_trains_clients_itself_until_a_worker_has_started_and_the_result_is_the_same():
    ref, _ = _fit("sequential", task_cls=SlowStart)
    watch = ReadyAtRoundStart()
    start = time.perf_counter()
    fed, trace = _fit(ProcessPoolExecutor(num_workers=2), task_cls=SlowStart, callbacks=[watch], rounds=3)
    assert watch.ready[0] == 0  # round 0 started at once, no worker ready yet: the server trained its clients
    assert trace.failed == {0: [], 1: [], 2: []}
    _assert_identical(fed, ref)
    assert time.perf_counter() - start < 30


class ReleaseForkserverAt(FederatedCallback):
    """Holds the forkserver "not ready" until round ``at`` starts, and records the workers at each round's start."""

    def __init__(self, event, at: int) -> None:
        self.event, self.at, self.workers = event, at, []

    def on_fed_round_start(self, trainer, pl_module, round, cohort):
        self.workers.append(len(pl_module.executor.worker_pids))
        if round == self.at:
            self.event.set()


def test_workers_wait_for_a_forkserver_still_importing_and_the_server_trains_meanwhile(monkeypatch):
    """A forkserver still importing torch would block each worker's start for seconds: setup returns at once, the
    server trains the clients, and the workers start as soon as the forkserver is ready, mid-fit."""
    import threading

    from lightning_fedprune.federated.executors import pool

    ref, ref_trace = _fit("sequential", rounds=4)
    not_ready = threading.Event()
    monkeypatch.setattr(pool, "_FORKSERVER_READY", not_ready)
    release = ReleaseForkserverAt(not_ready, at=2)
    executor = ProcessPoolExecutor(num_workers=2, start_method="forkserver")
    fed, trace = _fit(executor, callbacks=[release], rounds=4)
    assert release.workers == [0, 0, 0, 2]  # none while the forkserver "imports"; started in round 2, when it was ready
    assert trace.failed == ref_trace.failed
    _assert_identical(fed, ref)
