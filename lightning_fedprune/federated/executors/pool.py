"""Clients in persistent worker processes: started once per fit, reused across rounds, fault-contained.

A round's global payload is sent to each worker once; clients are then handed out one at a time to whichever
worker is free, and results are put back into cohort order before aggregation, so every executor aggregates
identically. The pool outlives its workers: a worker that dies is replaced and only the client it was training
fails; no wait on a worker is unbounded (see :class:`ProcessPoolExecutor`).
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import pickle
import selectors
import signal
import socket
import struct
import sys
import threading
import time
import traceback
import warnings
import weakref
from collections import deque
from collections.abc import Sequence
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from typing import Any, NoReturn

import lightning.pytorch as pl
import torch

from lightning_fedprune.federated.client import ClientData, ClientRunner
from lightning_fedprune.federated.executors.base import Executor, ResultCallback
from lightning_fedprune.federated.protocol import ClientConfig, ClientPlan, ClientResult, RoundPayload
from lightning_fedprune.federated.replica import make_replica, trainer_set

# ------------------------------------------------------------------ process pool
# Server <-> worker messages are length-prefixed frames of pickled ``(kind, object)`` tuples over a
# socket pair; the first frame to a worker is the pickled ``(task, data, config, weighting)``.
# The server's end is non-blocking and every wait is a selector over the sockets *and* the
# workers' process sentinels with a deadline, so a dead or stuck worker is noticed instead of
# blocking a send or a receive forever.
_HEADER = struct.Struct("!Q")  # frame header: the frame's length in bytes
_EXIT_UNGUARDED_MAIN = 86  # exit code of a worker whose start-up re-ran the user's training script
#: The default start method: a forkserver where the platform has one (fast, thread-safe starts), else spawn.
DEFAULT_START_METHOD = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
#: What the forkserver imports once before it forks workers.
PRELOAD = ("torch", "lightning.pytorch", "lightning_fedprune.federated.client")

_STOP_GRACE = 2.0  # seconds idle workers get at teardown to exit on their own (they take ~0.1 s) before they are killed
_JOIN_TIMEOUT = 5.0  # seconds to reap a killed worker process

UNGUARDED_MAIN_MESSAGE = (
    "A worker process re-ran the training script while starting: the code that calls `trainer.fit` is not under "
    '`if __name__ == "__main__":`. With start_method "forkserver" (the default) or "spawn" every worker process '
    "imports the main script again, so its unguarded top-level code starts training inside the worker. Put the "
    'training code under `if __name__ == "__main__":`, or use executor="sequential", or start_method="fork".'
)


class WorkerStartupError(RuntimeError):
    """A worker process of :class:`ProcessPoolExecutor` could not be started; the message says why."""


def _dumps(obj: Any) -> bytes:
    return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


def _recv_exact(sock: socket.socket, size: int) -> bytearray:
    buf = bytearray(size)
    view = memoryview(buf)
    filled = 0
    while filled < size:
        got = sock.recv_into(view[filled:])
        if got == 0:
            raise EOFError("the server closed the connection")
        filled += got
    return buf


def _send_frame(sock: socket.socket, frame: bytes) -> None:
    sock.sendall(_HEADER.pack(len(frame)))
    sock.sendall(frame)


def _recv_frame(sock: socket.socket) -> bytearray:
    (size,) = _HEADER.unpack(_recv_exact(sock, _HEADER.size))
    return _recv_exact(sock, size)


def _worker_main(sock: socket.socket, num_threads: int, server_end: socket.socket | None, device: str | None = None) -> None:
    """A worker's life: load the task (first frame), report ready, then train one client per plan.

    The worker exits on ``stop``, when the server closes its end (EOF, broken pipe) or when the
    server process dies (its sentinel), so workers do not outlive the server. SIGINT is ignored:
    Ctrl+C reaches the whole process group, and the server decides what happens to its workers.
    ``server_end`` is the server's end of the socket pair, inherited under ``fork``: closed at
    once, or this process would hold its own peer open and never see the server go.
    """
    if server_end is not None:
        server_end.close()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sock.setblocking(True)
    torch.set_num_threads(num_threads)
    parent = mp.parent_process()

    def receive() -> bytearray:
        if parent is not None and parent.sentinel in wait([sock, parent.sentinel]):
            raise EOFError("the server process died")
        return _recv_frame(sock)

    try:
        init = receive()
        try:
            task, data, config = pickle.loads(init)
            runner = ClientRunner(task, data, config, device=device)
        except Exception:
            _send_frame(sock, _dumps(("failed", traceback.format_exc())))
            _leave(1)
        del init
        _send_frame(sock, _dumps(("ready", None)))
        payload: RoundPayload | None = None
        while True:
            kind, obj = pickle.loads(receive())
            if kind == "payload":
                payload = obj
            elif kind == "plan":
                _send_frame(sock, _dumps(("result", runner.run(obj.payload or payload, obj))))
            else:  # "stop"
                break
    except (EOFError, OSError):  # the server closed its end or died
        pass
    _leave(0)


def _leave(code: int) -> NoReturn:
    """End a worker process at once: it has nothing to clean up, and finalising an interpreter with
    torch loaded costs seconds of CPU, which the server would wait for at every teardown."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "it did not exit"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


class _Worker:
    """The server's side of one worker process.

    A non-blocking socket with the frames still to send and the frame being received, plus the
    worker's state: starting (not ``ready``), idle, or training ``job``. ``deadline`` (monotonic
    seconds) bounds the start-up or the current client.
    """

    def __init__(self, proc: BaseProcess, sock: socket.socket, attempt: int, deadline: float) -> None:
        self.proc = proc
        self.sock = sock
        self.attempt = attempt  # start-up attempt of this worker slot (1 = first)
        self.deadline: float | None = deadline
        self.ready = False
        self.job: tuple[int, ClientPlan] | None = None  # (position in the cohort, plan) being trained
        self.broken = False  # the connection is gone (EOF, reset, broken pipe)
        self.exitcode: int | None = None
        self._closed = False
        self._out: deque[memoryview] = deque()
        self._header = bytearray(_HEADER.size)
        self._body: bytearray | None = None
        self._filled = 0

    @property
    def sending(self) -> bool:
        return bool(self._out)

    def alive(self) -> bool:
        """Whether an idle worker is still there: its process runs and its socket is not at end-of-file
        (a forkserver child's exit status reaches us later than its socket closes)."""
        if not self.proc.is_alive():
            return False
        try:
            return self.sock.recv(1, socket.MSG_PEEK) != b""  # an idle worker sends nothing: data would be a bug
        except BlockingIOError:
            return True
        except OSError:
            return False

    def queue(self, frame: bytes) -> None:
        self._out.append(memoryview(_HEADER.pack(len(frame))))
        self._out.append(memoryview(frame))

    def flush(self) -> None:
        """Send what the socket accepts now, without blocking."""
        try:
            while self._out:
                sent = self.sock.send(self._out[0])
                if sent < len(self._out[0]):
                    self._out[0] = self._out[0][sent:]
                    return
                self._out.popleft()
        except BlockingIOError:
            pass
        except OSError:  # BrokenPipeError, ConnectionResetError: the worker is gone
            self.broken = True

    def receive(self) -> list[tuple[str, Any]]:
        """Read what has arrived, without blocking; returns the messages completed by it."""
        messages = []
        while True:
            buf = self._header if self._body is None else self._body
            try:
                got = self.sock.recv_into(memoryview(buf)[self._filled:])
            except BlockingIOError:
                return messages
            except OSError:
                got = 0
            if got == 0:
                self.broken = True
                return messages
            self._filled += got
            if self._filled == len(buf):
                self._filled = 0
                if self._body is None:
                    self._body = bytearray(_HEADER.unpack(self._header)[0])  # frames are never empty
                else:
                    messages.append(pickle.loads(self._body))
                    self._body = None

    def kill(self) -> None:
        if not self._closed and self.proc.is_alive():
            self.proc.kill()

    def join(self, timeout: float) -> None:
        if not self._closed:
            self.proc.join(timeout)

    def close(self) -> str:
        """Kill the process if it still runs, reap it, close the socket; returns how it ended."""
        if not self._closed:
            self.kill()
            self.proc.join(_JOIN_TIMEOUT)
            self._closed = True
            self.exitcode = self.proc.exitcode
            if self.exitcode is not None:
                self.proc.close()  # releases its sentinel (an unreaped process keeps it)
            self.sock.close()
        return _describe_exit(self.exitcode)


def _shutdown(workers: list[_Worker]) -> None:
    """Stop and reap every worker of ``workers`` (emptied). Idle workers are asked to stop and get
    a short grace period; busy, starting and unresponsive ones are killed."""
    stopping, workers[:] = list(workers), []
    for w in stopping:
        if w.ready and w.job is None and not w.sending and not w.broken:
            w.queue(_dumps(("stop", None)))
            w.flush()
        else:
            w.kill()
    deadline = time.monotonic() + _STOP_GRACE
    for w in stopping:
        w.join(max(0.0, deadline - time.monotonic()))
    for w in stopping:
        w.close()


class ProcessPoolExecutor(Executor):
    """Runs clients in ``num_workers`` persistent worker processes.

    The workers start in parallel at ``setup``, in the background (with a forkserver that is still importing
    its preload, as soon as it is done, so ``setup`` never waits for it); each receives the pickled task and client
    data over its own socket and reports ready (until the first one is, the server trains clients itself). Faults are contained: a worker that dies (killed, crashed,
    out of memory) while idle, receiving, training or sending is restarted with the task and the
    round's payload, and only the client it was training fails (it is left out of the aggregate
    like any failed client). No wait is unbounded: every wait also watches the workers' processes,
    start-up is bounded by ``startup_timeout`` and ``startup_attempts``, a client by
    ``client_timeout``. The pool is torn down on every exit of ``fit``, including exceptions.

    Args:
        num_workers: worker processes (>= 1).
        start_method: ``"forkserver"`` (default where available; safe with threads and loggers: workers
            are forked from a clean server process that has imported ``preload`` once, so a worker starts
            in a fraction of a second), ``"spawn"`` (every worker imports torch anew: seconds) or
            ``"fork"`` (only safe before threads start). With ``"forkserver"``/``"spawn"`` the training
            script needs an ``if __name__ == "__main__":`` guard (a worker without it fails with a clear
            error).
        preload: modules the forkserver imports once, before it forks workers (``"forkserver"`` only;
            default: torch, Lightning and the client loop). The forkserver starts when the executor is
            made, so its imports overlap with the rest of the run's setup.
        threads_per_worker: torch intra-op threads per worker (default: cores // workers, >= 1).
        startup_timeout: seconds a worker may take from its start to ready (importing torch and the
            task's modules, unpickling the task and client data); a slower start counts as a failed one.
        client_timeout: seconds one client may take from dispatch to result; a client over it
            fails and its worker is killed and restarted. ``None`` (default): no limit (a worker that
            dies is still noticed at once).
        devices: the device of every worker, round-robin over the slots (e.g. ``["cuda:0", "cuda:1"]``: one
            worker per GPU of the machine; ``["cuda:0"] * 4``: four workers sharing one GPU); default: the
            device of the server's model. CUDA workers need ``start_method`` ``"forkserver"`` or ``"spawn"``
            (CUDA cannot be used in a forked child).
        wait_for_workers: ``setup`` blocks until every worker has started (default False: workers start in the
            background, and until the first is ready the server trains the round's clients itself with the same
            client loop, so a fit never waits for start-up and the results are the same).
        startup_attempts: attempts to start a worker (at setup, or to replace a dead one) before
            :class:`WorkerStartupError` is raised.
    """

    def __init__(self, num_workers: int = 2, start_method: str = DEFAULT_START_METHOD, threads_per_worker: int | None = None,
                 startup_timeout: float = 180.0, client_timeout: float | None = None, startup_attempts: int = 3,
                 preload: Sequence[str] = PRELOAD, devices: Sequence[str] | None = None,
                 wait_for_workers: bool = False) -> None:
        if not _is_int(num_workers) or num_workers < 1:
            raise ValueError(f"`num_workers` must be a positive integer, got {num_workers!r}.")
        if start_method not in mp.get_all_start_methods():
            raise ValueError(f"`start_method` must be one of {mp.get_all_start_methods()}, got {start_method!r}.")
        if isinstance(preload, str) or not all(isinstance(m, str) for m in preload):
            raise ValueError(f"`preload` must be a list of module names, got {preload!r}.")
        if threads_per_worker is not None and (not _is_int(threads_per_worker) or threads_per_worker < 1):
            raise ValueError(f"`threads_per_worker` must be a positive integer, got {threads_per_worker!r}.")
        if not _is_positive_seconds(startup_timeout):
            raise ValueError(f"`startup_timeout` must be a positive number of seconds, got {startup_timeout!r}.")
        if client_timeout is not None and not _is_positive_seconds(client_timeout):
            raise ValueError(f"`client_timeout` must be a positive number of seconds or None, got {client_timeout!r}.")
        if not _is_int(startup_attempts) or startup_attempts < 1:
            raise ValueError(f"`startup_attempts` must be a positive integer, got {startup_attempts!r}.")
        if devices is not None:
            if isinstance(devices, str) or not devices:
                raise ValueError(f"`devices` must be a non-empty list of devices (e.g. ['cuda:0', 'cuda:1']), got {devices!r}.")
            try:
                parsed = [torch.device(d) for d in devices]
            except (RuntimeError, TypeError) as err:
                raise ValueError(f"`devices`: {err}") from None
            if start_method == "fork" and any(d.type == "cuda" for d in parsed):
                raise ValueError("`start_method='fork'` cannot run CUDA workers (CUDA cannot be used in a forked child): "
                                 "use 'forkserver' (the default) or 'spawn'.")
            devices = [str(d) for d in parsed]
        self.devices = None if devices is None else list(devices)
        self.num_workers = num_workers
        self.start_method = start_method
        self.preload = list(preload)
        self.threads_per_worker = threads_per_worker or max(1, torch.get_num_threads() // num_workers)
        self.startup_timeout = float(startup_timeout)
        self.client_timeout = None if client_timeout is None else float(client_timeout)
        self.startup_attempts = startup_attempts
        self._init: bytes | None = None  # the first frame to every worker: pickled (task, data, config)
        self._config: ClientConfig | None = None
        self.wait_for_workers = bool(wait_for_workers)
        self._local_args: tuple | None = None  # (task, data, config) for the server's own runner until workers start
        self._local: ClientRunner | None = None
        self._payload: bytes | None = None  # the current round's payload frame (for workers started mid-round)
        self._pending: deque[tuple[int, ClientPlan]] = deque()  # the round's clients not handed out yet
        self._requeued: set[int] = set()  # clients given back once because their worker died before receiving them
        self._workers: list[_Worker] = []
        self._deferred = False  # setup found the forkserver still importing: the workers start once it is ready
        weakref.finalize(self, _shutdown, self._workers)  # last resort: garbage collection, interpreter exit
        if start_method == "forkserver" and not getattr(mp.current_process(), "_inheriting", False):
            _start_forkserver(preload)  # (not from a worker still importing an unguarded script: setup says why)

    @property
    def worker_pids(self) -> list[int]:
        """Process ids of the current workers (e.g. to account their CPU time); empty when torn down."""
        return [w.proc.pid for w in self._workers]

    def setup(self, task: pl.LightningModule, data: ClientData, config: ClientConfig) -> None:
        self.teardown()
        if getattr(mp.current_process(), "_inheriting", False):
            # this process is a worker still importing the main script, which started training again
            sys.stderr.write(f"lightning_fedprune: {UNGUARDED_MAIN_MESSAGE}\n")
            sys.stderr.flush()
            os._exit(_EXIT_UNGUARDED_MAIN)  # not SystemExit: a forkserver child would turn it into exit code 1
        if self.start_method == "fork" and torch.device(config.device).type == "cuda":
            raise ValueError("`start_method='fork'` cannot run CUDA workers (CUDA cannot be used in a forked child): "
                             "use 'forkserver' (the default) or 'spawn'.")
        self._config = config
        # the workers get the task's values on the CPU (they move them to their own device)
        on_cpu = all(t.device.type == "cpu" for t in [*task.parameters(), *task.buffers()])
        try:
            with trainer_set(task, None):
                self._init = _dumps((task if on_cpu else make_replica(task).cpu(), data, config))
        except Exception as err:
            raise TypeError(
                "ProcessPoolExecutor must pickle the task and the client datasets to send them to worker processes "
                f"and could not: {err}. Define the task and dataset classes at module level (not inside a function), "
                "or use executor='sequential'."
            ) from err
        # until a worker is ready, the server trains clients itself (run): a fit never waits for start-up
        self._local_args = (task, data, config)
        # a forkserver still importing its preload would block each worker's start until it is done: the workers
        # start once it is ready (run looks between clients), and the server trains meanwhile
        self._deferred = self.start_method == "forkserver" and not _forkserver_warm(self.preload)
        try:
            if not self._deferred:
                self._start_all()
            if self.wait_for_workers:
                self.wait_ready()
        except BaseException:
            self.teardown()
            raise

    def _start_all(self) -> None:
        self._deferred = False
        for slot in range(self.num_workers):
            self._workers.append(self._start(slot, attempt=1))

    def _start_deferred(self) -> None:
        """Start the workers whose start waited for the forkserver, if it is ready now."""
        if self._deferred and _FORKSERVER_READY.is_set():
            self._start_all()

    def wait_ready(self) -> None:
        """Block until every worker has started (raises :class:`WorkerStartupError` when one cannot)."""
        try:
            if self._deferred:
                self._start_all()  # blocks until the forkserver has imported its preload
            while not all(w.ready for w in self._workers):
                self._poll()
        except BaseException:
            self.teardown()
            raise

    def run(self, payload: RoundPayload, plans: Sequence[ClientPlan], on_result: ResultCallback | None = None) -> list[ClientResult]:
        if self._init is None:
            raise RuntimeError("ProcessPoolExecutor.run called before setup")
        try:
            return self._run_round(payload, plans, on_result)
        except BaseException:
            self.teardown()  # no stray workers, and no half-finished round for the next call to trip over
            raise
        finally:
            self._payload = None
            self._pending.clear()
            self._requeued.clear()

    def teardown(self) -> None:
        _shutdown(self._workers)
        self._deferred = False
        self._init = None
        self._local_args = self._local = None

    # ------------------------------------------------------------------ internals
    def _run_round(self, payload: RoundPayload, plans: Sequence[ClientPlan], on_result: ResultCallback | None) -> list[ClientResult]:
        # the round's broadcast goes to each worker once, in wire form (kept entries + indices / bitmasks)
        self._payload = _dumps(("payload", payload))
        self._start_deferred()  # (a worker started now gets the payload with its first frames)
        for slot, w in enumerate(self._workers):
            if w.alive():
                w.queue(self._payload)
            else:  # died while idle since the last round: replaced before it gets a client
                self._lost(slot, [])
        self._pending.extend(enumerate(plans))
        results: list[ClientResult | None] = [None] * len(plans)
        while self._pending or any(w.job is not None for w in self._workers):
            for w in self._workers:
                if self._pending and w.ready and w.job is None:
                    w.job = self._pending.popleft()
                    w.queue(_dumps(("plan", w.job[1])))
                    w.deadline = None if self.client_timeout is None else time.monotonic() + self.client_timeout
            if self._pending and self._local_args is not None and not any(w.ready for w in self._workers):
                # no worker has started yet: the server trains the next client itself (the same client loop, so
                # the same result), then looks at the workers without waiting
                index, plan = self._pending.popleft()
                done = [(index, self._local_runner().run(plan.payload or payload, plan))]
                self._start_deferred()
                done += self._poll(block=False)
            else:
                done = self._poll()
            for index, result in done:
                results[index] = result
                if on_result is not None:
                    on_result(result)
        if self._local_args is not None and not self._deferred and all(w.ready for w in self._workers):
            self._local_args = self._local = None  # every worker has started: the server's replica is not needed
        return results  # type: ignore[return-value]  # every position was filled

    def _local_runner(self) -> ClientRunner:
        if self._local is None:
            self._local = ClientRunner(*self._local_args)
        return self._local

    def _start(self, slot: int, attempt: int) -> _Worker:
        """Start a worker process and queue its first frame (and the round's payload, mid-round)."""
        ctx = mp.get_context(self.start_method)
        parent_sock, child_sock = socket.socketpair()
        try:
            server_end = parent_sock if self.start_method == "fork" else None  # spawn/forkserver: not inherited
            device = self.devices[slot % len(self.devices)] if self.devices else self._config.device
            proc = ctx.Process(target=_worker_main, args=(child_sock, self.threads_per_worker, server_end, device),
                               daemon=True, name=f"fedprune-worker-{slot}")
            proc.start()
        except Exception as err:
            parent_sock.close()
            hint = f" The forkserver process may have exited: {UNGUARDED_MAIN_MESSAGE}" if self.start_method == "forkserver" else ""
            raise WorkerStartupError(f"Could not start a worker process ({type(err).__name__}: {err}).{hint}") from err
        finally:
            child_sock.close()
        parent_sock.setblocking(False)
        worker = _Worker(proc, parent_sock, attempt, time.monotonic() + self.startup_timeout)
        assert self._init is not None
        worker.queue(self._init)
        if self._payload is not None:
            worker.queue(self._payload)
        return worker

    def _poll(self, block: bool = True) -> list[tuple[int, ClientResult]]:
        """Wait for socket I/O, a worker's exit or the nearest deadline (``block=False``: only look), and handle what
        happened.

        Returns the clients that finished as ``(position in the cohort, result)``, including those
        that failed because their worker died or ran past ``client_timeout``.
        """
        done: list[tuple[int, ClientResult]] = []
        deadlines = [w.deadline for w in self._workers if w.deadline is not None]
        timeout = max(0.0, min(deadlines) - time.monotonic()) if deadlines else None
        if not block:
            timeout = 0.0
        with selectors.DefaultSelector() as selector:
            for slot, w in enumerate(self._workers):
                selector.register(w.sock, selectors.EVENT_READ | (selectors.EVENT_WRITE if w.sending else 0), slot)
                selector.register(w.proc.sentinel, selectors.EVENT_READ, slot)
            active = sorted({key.data for key, _ in selector.select(timeout)})
        for slot in active:
            w = self._workers[slot]
            w.flush()
            for kind, obj in w.receive():
                if kind == "ready":
                    w.ready, w.deadline = True, None
                elif kind == "result":
                    assert w.job is not None
                    done.append((w.job[0], obj))
                    w.job, w.deadline = None, None
                else:  # "failed": loading the task raised; a deterministic error, so no retry
                    raise WorkerStartupError(f"A worker process could not load the task and client data:\n{obj}")
            if w.broken or not w.proc.is_alive():
                self._lost(slot, done)
        now = time.monotonic()
        for slot, w in enumerate(self._workers):
            if w.deadline is not None and now >= w.deadline:
                self._expired(slot, done)
        return done

    def _lost(self, slot: int, done: list[tuple[int, ClientResult]]) -> None:
        """Worker ``slot`` died or its connection broke: fail its client, if any, and replace it."""
        w = self._workers[slot]
        how = w.close()
        if not w.ready:
            self._retry_start(slot, w, f"exited during start-up ({how})")
            return
        if w.job is None:
            warnings.warn(f"A worker process died while idle ({how}); starting a new one.", stacklevel=3)
        elif w.sending and w.job[0] not in self._requeued:
            # part of the client's plan is still unsent (the plan is always the last frame queued), so
            # the worker cannot have started it: hand it out again, once (bounded, whatever kills workers)
            self._requeued.add(w.job[0])
            self._pending.appendleft(w.job)
            warnings.warn(f"A worker process died before it received client {w.job[1].client_id} ({how}); "
                          "the client goes to another worker, and a new worker is started.", stacklevel=3)
        else:
            index, plan = w.job
            done.append((index, ClientResult(plan.client_id, plan.round,
                                             error=f"the worker process training this client died ({how})")))
            warnings.warn(f"A worker process died while training client {plan.client_id} in round {plan.round} "
                          f"({how}); starting a new one.", stacklevel=3)
        self._workers[slot] = self._start(slot, attempt=1)

    def _expired(self, slot: int, done: list[tuple[int, ClientResult]]) -> None:
        """Worker ``slot`` ran past its deadline: kill it; a start-up is retried, a client fails."""
        w = self._workers[slot]
        w.close()
        if not w.ready:
            self._retry_start(slot, w, f"did not finish start-up within startup_timeout={self.startup_timeout:g} s")
            return
        assert w.job is not None
        index, plan = w.job
        done.append((index, ClientResult(plan.client_id, plan.round,
                                         error=f"the client ran past client_timeout={self.client_timeout:g} s")))
        warnings.warn(f"Client {plan.client_id} ran past client_timeout={self.client_timeout:g} s in round {plan.round}; "
                      "its worker process was killed, starting a new one.", stacklevel=3)
        self._workers[slot] = self._start(slot, attempt=1)

    def _retry_start(self, slot: int, w: _Worker, why: str) -> None:
        if w.exitcode == _EXIT_UNGUARDED_MAIN:
            raise WorkerStartupError(UNGUARDED_MAIN_MESSAGE)
        if w.attempt >= self.startup_attempts:
            raise WorkerStartupError(
                f"Could not start a worker process: it {why} on each of {w.attempt} attempts (`startup_attempts`). "
                "The worker's own error output (stderr) shows the cause. A worker imports the task's modules and "
                "unpickles the task and client data; with start_method 'spawn' or 'forkserver' it also imports the "
                'main script, whose training code must be under `if __name__ == "__main__":`. On a slow machine '
                "raise `startup_timeout`; or use executor='sequential'."
            )
        warnings.warn(f"A worker process {why} (attempt {w.attempt} of {self.startup_attempts}); starting it again.",
                      stacklevel=3)
        self._workers[slot] = self._start(slot, w.attempt + 1)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_positive_seconds(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


#: Set once the forkserver has forked a process, i.e. finished importing its preload (a start no longer blocks).
_FORKSERVER_READY = threading.Event()
_forkserver_probe: threading.Thread | None = None


def _probe() -> None:
    """The target of the process that tells when the forkserver is ready (it does nothing)."""


def _wait_for_forkserver() -> None:
    try:
        proc = mp.get_context("forkserver").Process(target=_probe, daemon=True, name="fedprune-forkserver-probe")
        proc.start()  # returns once the forkserver has forked it: after its preload
        proc.join(timeout=60.0)  # it does nothing; the bound only keeps this thread from waiting on a stuck child
    except Exception:  # noqa: BLE001 - a broken forkserver shows itself at a worker's start, with the reason
        pass
    finally:
        _FORKSERVER_READY.set()


def _forkserver_warm(preload: Sequence[str]) -> bool:
    """Whether a worker can start now without waiting for the forkserver's imports; starts the forkserver and
    a background probe of it if neither runs."""
    if _FORKSERVER_READY.is_set():
        return True
    if _forkserver_probe is None:
        _start_forkserver(preload)
    return _FORKSERVER_READY.is_set()


def _start_forkserver(preload: Sequence[str]) -> None:
    """Start the process's forkserver now (if it is not running) with ``preload`` imported in it, so that
    the imports happen while the caller goes on, and every worker forked later starts with them done.
    (``__main__`` is never preloaded: the server would run an unguarded training script.)"""
    from multiprocessing import forkserver

    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload([m for m in preload if m != "__main__"])
    forkserver.ensure_running()
    global _forkserver_probe
    if _forkserver_probe is None:
        _forkserver_probe = threading.Thread(target=_wait_for_forkserver, daemon=True, name="fedprune-forkserver-ready")
        _forkserver_probe.start()


