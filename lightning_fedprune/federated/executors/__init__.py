"""Executors: where clients run — the seam between the server loop and the compute (see :mod:`.base`)."""

from __future__ import annotations

import importlib
from typing import Literal, get_args

from lightning_fedprune.federated.executors.base import Executor, ExecutorTeardown, ResultCallback
from lightning_fedprune.federated.executors.pool import (
    DEFAULT_START_METHOD,
    PRELOAD,
    UNGUARDED_MAIN_MESSAGE,
    ProcessPoolExecutor,
    WorkerStartupError,
)
from lightning_fedprune.federated.executors.sequential import SequentialExecutor

__all__ = ["DEFAULT_START_METHOD", "EXECUTORS", "OPTIONAL_EXECUTORS", "PRELOAD", "UNGUARDED_MAIN_MESSAGE", "Executor",
           "ExecutorName", "ExecutorTeardown", "ProcessPoolExecutor", "ResultCallback", "SequentialExecutor",
           "StartMethod", "WorkerStartupError", "make_executor"]

ExecutorName = Literal["sequential", "process", "flower"]
EXECUTORS: tuple[str, ...] = get_args(ExecutorName)
#: Multiprocessing start methods (those of the platform are ``multiprocessing.get_all_start_methods()``).
StartMethod = Literal["fork", "spawn", "forkserver"]
#: Executors of optional extras, loaded by name when asked for (their module needs the extra's packages).
OPTIONAL_EXECUTORS = {"flower": "lightning_fedprune.federated.flower.executor.FlowerExecutor"}


def make_executor(executor: str | Executor, num_workers: int = 2, start_method: str = DEFAULT_START_METHOD) -> Executor:
    if isinstance(executor, Executor):
        return executor
    if executor == "sequential":
        return SequentialExecutor()
    if executor == "process":
        return ProcessPoolExecutor(num_workers=num_workers, start_method=start_method)
    if executor in OPTIONAL_EXECUTORS:
        module, _, name = OPTIONAL_EXECUTORS[executor].rpartition(".")
        return getattr(importlib.import_module(module), name)()
    raise ValueError(f"`executor` must be one of {EXECUTORS} or an Executor instance, got {executor!r}.")
