"""Runs the cells of a grid: each an ordinary ``fedprune fit`` in a subprocess, ``--jobs`` at a time.

A cell's folder holds ``config.yaml`` (the complete fit config), ``log.txt`` (its output),
``summary.json`` (:class:`~lightning_fedprune.observers.summary.RunSummary`), ``record.json``
(:class:`~lightning_fedprune.ablation.record.CellRecord`), ``logs/`` (TensorBoard) and ``cell.json``
(status, config hash, wall time, the machine). A cell is finished when ``cell.json`` says ``done`` for the
same config hash and both JSON files exist: finished cells are never run again, so an interrupted grid
resumes where it stopped, and a changed configuration reruns only its own cells.

With a shared warm start (:class:`~lightning_fedprune.ablation.grid.WarmStart`) the warm-start cells run
first; a cell starts once the warm start it resumes from is finished, and is reported failed (and run
again next time) when that warm start failed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import yaml

from lightning_fedprune.ablation.grid import WARM_CHECKPOINT, Cell, Grid
from lightning_fedprune.validation import check_float, check_int

#: seconds a cell gets to exit after SIGTERM before it is killed
TERMINATE_GRACE_S = 10.0
#: how often the runner looks at its running cells
POLL_S = 0.5


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``, or None when it is missing or unreadable (a cell killed mid-write)."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def cell_done(cell: Cell, digest: str) -> bool:
    """Whether ``cell`` finished with the config whose hash is ``digest`` (a warm-start cell: and its
    checkpoint exists)."""
    info = read_json(cell.dir / "cell.json")
    return (info is not None and info.get("status") == "done" and info.get("hash") == digest
            and (cell.dir / "summary.json").is_file() and (cell.dir / "record.json").is_file()
            and (not cell.warm or (cell.dir / WARM_CHECKPOINT).is_file()))


def machine_info() -> dict[str, Any]:
    """The machine the cells run on: CPU model, cores, memory, accelerator, OS, Python and torch versions."""
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                memory = round(int(line.split()[1]) / 1024 ** 2, 1)
                break
    except (OSError, ValueError):
        pass
    import torch

    accelerator = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": memory, "accelerator": accelerator,
            "os": platform.platform(terse=True), "python": platform.python_version(), "torch": torch.__version__}


@dataclass
class _Running:
    cell: Cell
    process: subprocess.Popen
    log: TextIO
    started: float
    digest: str


@dataclass
class RunStats:
    """What one invocation of the runner did (recorded in ``runs.json`` and on the page)."""

    started: str
    jobs: int
    command: str
    load: list[float] = field(default_factory=list)  # 1-minute load averages sampled during the run
    finished: str = ""
    wall_seconds: float = 0.0
    cells_run: int = 0
    cells_failed: int = 0
    cells_skipped: int = 0
    warm_starts_run: int = 0
    interrupted: bool = False
    cpu_seconds: float = 0.0  # CPU time of the cells (children)

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def _load() -> float:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:  # pragma: no cover (no load average on this platform)
        return float("nan")


def _format_seconds(seconds: float) -> str:
    if seconds != seconds:  # NaN
        return "?"
    seconds = int(round(seconds))
    if seconds < 90:
        return f"{seconds} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _terminate(process: subprocess.Popen) -> None:
    """Stop a cell and everything it started (its own process group), bounded."""
    if process.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, TERMINATE_GRACE_S), (signal.SIGKILL, TERMINATE_GRACE_S)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class GridRunner:
    """Runs the unfinished cells of ``grid`` with ``jobs`` parallel processes.

    Args:
        grid: the loaded grid.
        jobs: cells at a time (each a separate ``fedprune fit`` process).
        cell_timeout: seconds one cell may run before it is stopped and counted as failed.
        only: run only the cells whose key (``<configuration>/seed<k>``) contains this text.
        print_fn: where progress lines go.
        fit_command: the command a cell runs, followed by ``--config <cell>/config.yaml``.
    """

    def __init__(self, grid: Grid, jobs: int = 1, cell_timeout: float = 3600.0, only: str | None = None,
                 print_fn: Callable[[str], None] = print,
                 fit_command: Sequence[str] = (sys.executable, "-m", "lightning_fedprune", "fit")) -> None:
        self.grid = grid
        self.jobs = check_int(jobs, "jobs", min=1)
        self.cell_timeout = check_float(cell_timeout, "cell_timeout", min=0, min_open=True)
        self.only = only
        self.print = print_fn
        self.fit_command = list(fit_command)

    def prepare(self) -> list[tuple[Cell, str]]:
        """Write the ``config.yaml`` of every cell to run; return them with their config hash: the
        unfinished warm-start cells the selected cells need first, then the unfinished cells (seed-major)."""
        todo, warm = [], {}
        self.finished = 0
        for cell in self.grid.cells():
            digest = self.grid.cell_digest(cell)
            if cell_done(cell, digest):
                self.finished += 1
                continue
            if self.only is not None and self.only not in cell.key:
                continue
            source = self.grid.warm_cell(cell)
            if source is not None and source.key not in warm:
                source_digest = self.grid.cell_digest(source)
                if not cell_done(source, source_digest):
                    warm[source.key] = (source, source_digest)
            todo.append((cell, digest))
        for cell, _ in [*warm.values(), *todo]:
            cell.dir.mkdir(parents=True, exist_ok=True)
            (cell.dir / "config.yaml").write_text(yaml.safe_dump(self.grid.cell_config(cell), sort_keys=False))
        return [*warm.values(), *todo]

    def _start(self, cell: Cell, digest: str) -> _Running:
        for stale in ("summary.json", "record.json"):
            (cell.dir / stale).unlink(missing_ok=True)
        log = open(cell.dir / "log.txt", "w")  # noqa: SIM115 (closed when the cell ends)
        started = time.time()
        self._write_cell(cell, digest, "running", started=started)
        process = subprocess.Popen(
            [*self.fit_command, "--config", str(cell.dir / "config.yaml")],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        return _Running(cell, process, log, started, digest)

    def _write_cell(self, cell: Cell, digest: str, status: str, **extra: Any) -> None:
        info = {"configuration": cell.configuration, "seed": cell.seed, "warm_start_cell": cell.warm, "hash": digest,
                "status": status, **extra}
        (cell.dir / "cell.json").write_text(json.dumps(info, indent=2) + "\n")

    def _previous_seconds(self) -> list[float]:
        out = []
        for cell in self.grid.cells():  # the measured cells (warm starts are shorter)
            info = read_json(cell.dir / "cell.json")
            if info and info.get("status") == "done" and isinstance(info.get("seconds"), (int, float)):
                out.append(float(info["seconds"]))
        return out

    def run(self, stats: RunStats, on_cell: Callable[[RunStats], None] | None = None) -> RunStats:
        """Run the unfinished cells; progress goes to ``print_fn``, one line per finished cell, and ``on_cell``
        gets the run's statistics so far after each (so a run killed outright leaves its record up to then)."""
        total = len(self.grid.cells())
        todo = self.prepare()
        warm_todo = sum(1 for cell, _ in todo if cell.warm)
        stats.cells_skipped = self.finished
        left_out = total - self.finished - (len(todo) - warm_todo)
        self.print(f"fedprune ablate: {self.grid.name}: {total} cells ({len(self.grid.configurations)} configurations x "
                   f"{len(self.grid.seeds)} seeds), {stats.cells_skipped} finished before, "
                   f"{f'{left_out} not selected by --only, ' if left_out else ''}{len(todo) - warm_todo} to run"
                   f"{f' after {warm_todo} warm start(s)' if warm_todo else ''} with {self.jobs} job(s); "
                   f"cells in {self.grid.out}")
        durations = self._previous_seconds()
        pending = list(todo)
        running: list[_Running] = []
        failed_warm: set[str] = set()
        done_now = 0
        start = time.time()
        cpu_before = os.times()
        stats.load.append(_load())
        machine = machine_info()

        def tally() -> None:
            cpu_now = os.times()
            stats.cpu_seconds = round((cpu_now.children_user - cpu_before.children_user)
                                      + (cpu_now.children_system - cpu_before.children_system), 1)
            stats.wall_seconds = round(time.time() - start, 1)
        try:
            while pending or running:
                while len(running) < self.jobs:
                    ready = self._next_ready(pending, running, failed_warm)
                    if ready is None:
                        break
                    cell, digest = ready
                    blocked = self.grid.warm_cell(cell)
                    if blocked is not None and blocked.key in failed_warm:
                        done_now += 1
                        stats.cells_failed += 1
                        self._write_cell(cell, digest, "failed", error=f"its warm start {blocked.key} failed")
                        self.print(f"[{done_now:>{len(str(len(todo)))}}/{len(todo)}] {cell.key:<32} FAILED: its warm "
                                   f"start {blocked.key} failed")
                        continue
                    running.append(self._start(cell, digest))
                if not running:
                    if pending:  # pragma: no cover (a pending cell waits only on a pending or running warm start)
                        raise RuntimeError(f"cells wait on warm starts that are not scheduled: {[c.key for c, _ in pending]}")
                    continue
                time.sleep(POLL_S)
                for job in list(running):
                    elapsed = time.time() - job.started
                    code = job.process.poll()
                    if code is None and elapsed <= self.cell_timeout:
                        continue
                    timed_out = code is None
                    if timed_out:
                        _terminate(job.process)
                    job.log.close()
                    running.remove(job)
                    done_now += 1
                    ok = not timed_out and code == 0 and (job.cell.dir / "summary.json").is_file() \
                        and (job.cell.dir / "record.json").is_file()
                    status = "done" if ok else "failed"
                    error = None if ok else (f"timed out after {self.cell_timeout:.0f} s" if timed_out
                                             else f"exit code {code}") + "\n" + _tail(job.cell.dir / "log.txt")
                    self._write_cell(job.cell, job.digest, status, started=job.started, seconds=round(elapsed, 1),
                                     error=error, load=_load(), machine=machine)
                    stats.load.append(_load())
                    if job.cell.warm:
                        stats.warm_starts_run += ok
                        if not ok:
                            failed_warm.add(job.cell.key)
                    elif ok:
                        stats.cells_run += 1
                        durations.append(elapsed)
                    else:
                        stats.cells_failed += 1
                    self.print(self._progress(job, ok, elapsed, done_now, len(todo), pending, running, durations))
                    if on_cell is not None:
                        tally()
                        on_cell(stats)
        except KeyboardInterrupt:
            stats.interrupted = True
            self.print(f"interrupted: stopping {len(running)} running cell(s); they will run again next time")
            for job in running:
                _terminate(job.process)
                job.log.close()
                self._write_cell(job.cell, job.digest, "interrupted", started=job.started)
        finally:
            tally()
        return stats

    def _next_ready(self, pending: list[tuple[Cell, str]], running: list[_Running],
                    failed_warm: set[str]) -> tuple[Cell, str] | None:
        """Take the first pending cell that can start: a warm-start cell, or a cell whose warm start is
        finished (or failed: it is then reported failed); None when every pending cell waits."""
        waiting = {c.key for c, _ in pending if c.warm} | {r.cell.key for r in running if r.cell.warm}
        for i, (cell, digest) in enumerate(pending):
            warm = self.grid.warm_cell(cell)
            if warm is None or warm.key in failed_warm or warm.key not in waiting:
                return pending.pop(i)
        return None

    def _progress(self, job: _Running, ok: bool, elapsed: float, done_now: int, todo: int, pending: list,
                  running: list[_Running], durations: list[float]) -> str:
        mean = sum(durations) / len(durations) if durations else float("nan")
        left = len(pending) + len(running)
        work = len(pending) * mean + sum(max(mean - (time.time() - r.started), 0.0) for r in running)
        eta = work / max(1, min(self.jobs, left)) if left else 0.0
        summary = read_json(job.cell.dir / "summary.json") or {}
        value = (summary.get("metrics") or {}).get(self.grid.metric)
        result = f"{self.grid.metric} {value:.4f}" if ok and isinstance(value, (int, float)) else \
            ("FAILED (see " + str(job.cell.dir / "log.txt") + ")" if not ok else
             "warm start saved" if job.cell.warm else "no metric")
        return (f"[{done_now:>{len(str(todo))}}/{todo}] {job.cell.key:<32} {result:<20} {_format_seconds(elapsed):>8} | "
                f"{left} left, ~{_format_seconds(eta)} to go (load {_load():.1f})")
