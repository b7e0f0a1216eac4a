"""``fedprune ablate``: run a grid of ``fedprune fit`` cells, analyse them, write results.json, the page, the
figure and the README block.

    fedprune ablate --config examples/ablation/grid.yaml --jobs 2
    fedprune ablate --config examples/ablation/grid.yaml --full --jobs 16
    fedprune ablate --config examples/ablation/grid.yaml --report_only      # re-render, run nothing
    fedprune ablate --config examples/ablation/grid.yaml --dry_run          # list the cells, run nothing

``--report_only`` analyses the finished cells in the grid's ``out`` folder; a cell whose folder is absent
(a fresh checkout: ``runs/`` is not committed) is taken from the existing results.json when it is recorded
there with the same config hash, so the page, figure and README block can be regenerated from results.json.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lightning_fedprune.ablation.analysis import analyse
from lightning_fedprune.ablation.grid import load_grid
from lightning_fedprune.ablation.report import make_figure, readme_block, write_page, write_readme
from lightning_fedprune.ablation.runner import GridRunner, RunStats, cell_done, machine_info, read_json
from lightning_fedprune.validation import check_float, check_int


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedprune ablate",
        description="Run a grid of `fedprune fit` cells (configurations x seeds on one base config), resumably; "
                    "then write results.json, the results page and its figure from whatever cells have finished.")
    parser.add_argument("--config", required=True, help="the grid YAML (e.g. examples/ablation/grid.yaml)")
    parser.add_argument("--full", action="store_true", help="use the grid's `full` section (a bigger machine)")
    parser.add_argument("--jobs", type=int, default=None, help="cells run in parallel (default: the grid's `jobs`, 1)")
    parser.add_argument("--cell_timeout", type=float, default=None,
                        help="seconds before a cell is stopped and counted as failed (default: the grid's, 3600)")
    parser.add_argument("--out", default=None, help="folder of the cells (default: the grid's `out`)")
    parser.add_argument("--page", default=None, help="the results page to write (default: the grid's `page`; "
                                                     "results.json goes next to it)")
    parser.add_argument("--figure", default=None, help="the figure to write (default: the grid's `figure`)")
    parser.add_argument("--only", default=None, help="run only cells whose '<configuration>/seed<k>' contains this "
                                                     "(and the warm starts they need)")
    parser.add_argument("--report_only", action="store_true",
                        help="run nothing; re-render the page, figure and README block from the finished cells (or, "
                             "for cells whose folder is absent, from the existing results.json)")
    parser.add_argument("--dry_run", action="store_true", help="list the cells and what is finished; run nothing")
    return parser


def _write_json(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)

    def clean(v: Any) -> Any:  # JSON has no NaN
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    path.write_text(json.dumps(clean(value), indent=2) + "\n")


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM (``kill``, a job scheduler's stop) interrupts the grid as Ctrl-C does: the running cells are
    stopped and marked to run again, and the run's record and the page are written."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def ablate_main(args: list[str]) -> int:
    """Run ``fedprune ablate`` with ``args``; returns the exit code (1 when a cell failed, 130 when interrupted)."""
    ns = _parser().parse_args(args)
    grid = load_grid(ns.config, full=ns.full)
    for name in ("out", "page", "figure"):
        if getattr(ns, name) is not None:
            setattr(grid, name, Path(getattr(ns, name)))
    jobs = check_int(ns.jobs if ns.jobs is not None else grid.jobs, "--jobs", min=1)
    timeout = check_float(ns.cell_timeout if ns.cell_timeout is not None else grid.cell_timeout, "--cell_timeout",
                          min=0, min_open=True)
    command = "fedprune ablate " + " ".join(args)
    if ns.dry_run:
        cells = grid.cells()
        warm = grid.warm_cells()
        for cell in [*warm, *cells]:
            done = cell_done(cell, grid.cell_digest(cell))
            print(f"{'done ' if done else 'to do'}  {cell.key}")
        print(f"{len(cells)} cells ({len(grid.configurations)} configurations x {len(grid.seeds)} seeds)"
              + (f" and {len(warm)} warm starts ({grid.warm_start.rounds} rounds each)" if warm else "")
              + f" in {grid.out}")
        return 0
    runs_path = grid.out / "runs.json"
    runs = (read_json(runs_path) or {}).get("runs", [])
    code = 0
    if not ns.report_only:
        stats = RunStats(started=dt.datetime.now().astimezone().isoformat(timespec="seconds"), jobs=jobs, command=command)
        machine = machine_info()
        runs.append({})

        def record(current: RunStats) -> None:  # after every cell: a run killed outright keeps its record so far
            runs[-1] = {**current.to_dict(), "machine": machine}
            _write_json(runs_path, {"runs": runs})

        with _sigterm_interrupts():
            GridRunner(grid, jobs=jobs, cell_timeout=timeout, only=ns.only).run(stats, on_cell=record)
        stats.finished = dt.datetime.now().astimezone().isoformat(timespec="seconds")
        record(stats)
        code = 130 if stats.interrupted else 1 if stats.cells_failed else 0
    results_path = grid.page.with_suffix(".json")
    results = analyse(grid, previous=read_json(results_path))
    config = os.path.relpath(grid.path)
    results.update(generated=dt.datetime.now().astimezone().isoformat(timespec="seconds"),
                   command=f"fedprune ablate --config {config}" + (" --full" if grid.full else ""), config=config,
                   rendered_by=command, runs=runs)
    figure = make_figure(grid, results, grid.figure)
    write_page(grid, results, runs, command, grid.page, figure)
    _write_json(results_path, results)
    wrote = [str(grid.page), str(results_path)] + ([str(figure)] if figure else [])
    if grid.readme is not None:
        page = os.path.relpath(grid.page, grid.readme.parent)
        if write_readme(grid.readme, grid.name, readme_block(json.loads(results_path.read_text()), page)):
            wrote.append(f"the {grid.name} block of {grid.readme}")
        else:
            print(f"warning: {grid.readme} has no `<!-- results:{grid.name}:begin -->` ... `end -->` block: not written")
    for f in results["findings"]:
        print(f"finding {f['number']}: {f['verdict']:<14} {f['claim']}")
    print("wrote " + ", ".join(wrote) + (f"; {len(results['missing'])} cell(s) missing" if results["missing"] else ""))
    return code
