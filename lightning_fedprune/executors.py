"""Executors: where clients run. The seam between the server loop and the compute.

* :class:`SequentialExecutor` (default) runs the cohort's clients one after another in-process on
  one persistent replica of the task.
* :class:`ProcessPoolExecutor` runs them in persistent worker processes (started once per fit and
  reused across rounds). A round's global payload is sent to each worker once; clients are then
  handed out one at a time to whichever worker is free, and results are put back into cohort order
  before aggregation, so both executors aggregate identically.

A later Flower executor plugs in here by turning the same plans/results into Flower messages.
"""

from __future__ import annotations

import multiprocessing as mp
import pickle
import warnings
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection, wait
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_fedprune.client import ClientData, ClientRunner
from lightning_fedprune.protocol import ClientConfig, ClientPlan, ClientResult, RoundPayload

EXECUTORS = ("sequential", "process")
ResultCallback = Callable[[ClientResult], None]


class Executor:
    """Base class: ``setup`` once per fit, ``run`` once per round, ``teardown`` at the end."""

    def setup(self, task: pl.LightningModule, data: ClientData, config: ClientConfig, weighting: str) -> None:
        raise NotImplementedError

    def run(self, payload: RoundPayload, plans: Sequence[ClientPlan], on_result: ResultCallback | None = None) -> list[ClientResult]:
        raise NotImplementedError

    def teardown(self) -> None:
        pass


class SequentialExecutor(Executor):
    """Runs clients one after another in the server process."""

    def __init__(self) -> None:
        self.runner: ClientRunner | None = None

    def setup(self, task: pl.LightningModule, data: ClientData, config: ClientConfig, weighting: str) -> None:
        self.runner = ClientRunner(task, data, config, weighting)

    def run(self, payload: RoundPayload, plans: Sequence[ClientPlan], on_result: ResultCallback | None = None) -> list[ClientResult]:
        if self.runner is None:
            raise RuntimeError("SequentialExecutor.run called before setup")
        results = []
        for plan in plans:
            result = self.runner.run(payload, plan)
            if on_result is not None:
                on_result(result)
            results.append(result)
        return results

    def teardown(self) -> None:
        self.runner = None


def _worker_main(conn: Connection, init_blob: bytes, num_threads: int) -> None:
    torch.set_num_threads(num_threads)
    task, data, config, weighting = pickle.loads(init_blob)
    runner = ClientRunner(task, data, config, weighting)
    payload: RoundPayload | None = None
    while True:
        try:
            kind, obj = pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):
            return
        if kind == "payload":
            payload = obj
        elif kind == "plan":
            assert payload is not None
            result = runner.run(payload, obj)
            conn.send_bytes(pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL))
        elif kind == "stop":
            return


class ProcessPoolExecutor(Executor):
    """Runs clients in ``num_workers`` persistent worker processes.

    Args:
        num_workers: worker processes (>= 1).
        start_method: ``"spawn"`` (default, safe with threads and loggers), ``"forkserver"`` or
            ``"fork"`` (fastest start, shares datasets copy-on-write; only safe before threads start).
        threads_per_worker: torch intra-op threads per worker (default: cores // workers, >= 1).
    """

    def __init__(self, num_workers: int = 2, start_method: str = "spawn", threads_per_worker: int | None = None) -> None:
        if not isinstance(num_workers, int) or num_workers < 1:
            raise ValueError(f"`num_workers` must be a positive integer, got {num_workers!r}.")
        if start_method not in mp.get_all_start_methods():
            raise ValueError(f"`start_method` must be one of {mp.get_all_start_methods()}, got {start_method!r}.")
        if threads_per_worker is not None and (not isinstance(threads_per_worker, int) or threads_per_worker < 1):
            raise ValueError(f"`threads_per_worker` must be a positive integer, got {threads_per_worker!r}.")
        self.num_workers = num_workers
        self.start_method = start_method
        self.threads_per_worker = threads_per_worker or max(1, torch.get_num_threads() // num_workers)
        self._init_blob: bytes | None = None
        self._workers: list[tuple[Any, Connection]] = []

    def _start_worker(self) -> tuple[Any, Connection]:
        ctx = mp.get_context(self.start_method)
        parent, child = ctx.Pipe(duplex=True)
        proc = ctx.Process(target=_worker_main, args=(child, self._init_blob, self.threads_per_worker), daemon=True)
        proc.start()
        child.close()
        return proc, parent

    def setup(self, task: pl.LightningModule, data: ClientData, config: ClientConfig, weighting: str) -> None:
        self.teardown()
        if hasattr(data, "client_data"):  # a data module: ship only its picklable client-data view
            data = data.client_data()
        trainer = task._trainer
        task._trainer = None
        try:
            self._init_blob = pickle.dumps((task, data, config, weighting), protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as err:
            raise TypeError(
                "ProcessPoolExecutor must pickle the task and the client datasets to send them to worker processes "
                f"and could not: {err}. Define the task and dataset classes at module level (not inside a function), "
                "or use executor='sequential'."
            ) from err
        finally:
            task._trainer = trainer
        self._workers = [self._start_worker() for _ in range(self.num_workers)]

    def run(self, payload: RoundPayload, plans: Sequence[ClientPlan], on_result: ResultCallback | None = None) -> list[ClientResult]:
        if not self._workers:
            raise RuntimeError("ProcessPoolExecutor.run called before setup")
        # the round's broadcast goes to each worker once, in wire form (kept entries + indices / bitmasks)
        blob = pickle.dumps(("payload", payload.for_transport()), protocol=pickle.HIGHEST_PROTOCOL)
        for _, conn in self._workers:
            conn.send_bytes(blob)
        pending = list(plans)
        busy: dict[int, ClientPlan] = {}
        results: dict[int, ClientResult] = {}

        def dispatch(slot: int) -> None:
            if pending:
                plan = pending.pop(0)
                busy[slot] = plan
                self._workers[slot][1].send_bytes(pickle.dumps(("plan", plan), protocol=pickle.HIGHEST_PROTOCOL))

        for slot in range(len(self._workers)):
            dispatch(slot)
        while busy:
            conns = {self._workers[slot][1]: slot for slot in busy}
            for conn in wait(list(conns)):
                slot = conns[conn]
                plan = busy.pop(slot)
                try:
                    result = pickle.loads(conn.recv_bytes())
                except (EOFError, OSError) as err:
                    proc = self._workers[slot][0]
                    proc.join(timeout=1)
                    result = ClientResult(plan.client_id, plan.round,
                                          error=f"worker process died (exit code {proc.exitcode}): {err!r}")
                    warnings.warn(f"Restarting a dead client worker (client {plan.client_id}, round {plan.round}).", stacklevel=2)
                    self._workers[slot] = self._start_worker()
                    self._workers[slot][1].send_bytes(blob)
                results[id(plan)] = result
                if on_result is not None:
                    on_result(result)
                dispatch(slot)
        return [results[id(p)] for p in plans]

    def teardown(self) -> None:
        for proc, conn in self._workers:
            try:
                conn.send_bytes(pickle.dumps(("stop", None)))
            except (OSError, ValueError):
                pass
        for proc, conn in self._workers:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.terminate()
            conn.close()
        self._workers = []


def make_executor(executor: str | Executor, num_workers: int = 2, start_method: str = "spawn") -> Executor:
    if isinstance(executor, Executor):
        return executor
    if executor == "sequential":
        return SequentialExecutor()
    if executor == "process":
        return ProcessPoolExecutor(num_workers=num_workers, start_method=start_method)
    raise ValueError(f"`executor` must be one of {EXECUTORS} or an Executor instance, got {executor!r}.")
