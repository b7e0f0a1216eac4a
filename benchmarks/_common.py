"""Shared helpers of the benchmark scripts (not a benchmark itself).

Every benchmark measures "ours" and "the reference" side by side in one process, alternating
(ours, ref, ours, ref, ...) so that a change in machine load hits both alike, and reports the
median of >= 5 repetitions together with the machine load (``/proc/loadavg``) at that time.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python benchmarks/<name>.py` from anywhere, without installing
    sys.path.insert(0, str(ROOT))


def load() -> str:
    """The 1/5/15-minute load averages, as ``uptime`` prints them."""
    try:
        with open("/proc/loadavg") as f:
            a, b, c = f.read().split()[:3]
        return f"load {a} {b} {c}"
    except OSError:  # pragma: no cover - non-Linux
        a, b, c = os.getloadavg()
        return f"load {a:.2f} {b:.2f} {c:.2f}"


def rss_bytes() -> int:
    """Current resident set size (psutil if installed, else /proc/self/status VmRSS)."""
    try:
        import psutil  # type: ignore

        return int(psutil.Process().memory_info().rss)
    except ImportError:
        return _proc_status("VmRSS")


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (/proc/self/status VmHWM)."""
    return _proc_status("VmHWM")


def _proc_status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def machine() -> str:
    import torch

    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:  # pragma: no cover
        pass
    return (f"{platform.node()} | {os.cpu_count()} cores ({cpu}) | python {platform.python_version()} | "
            f"torch {torch.__version__} ({torch.get_num_threads()} intra-op threads)")


def header(title: str, args: argparse.Namespace | None = None) -> None:
    print(f"== {title}")
    print(f"   {machine()}")
    print(f"   start: {time.strftime('%Y-%m-%d %H:%M:%S')}  {load()}")
    if args is not None:
        print(f"   args: {vars(args)}")
    sys.stdout.flush()


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def alternate(fns: dict[str, Callable[[], float]], reps: int, *, verbose: bool = True) -> dict[str, list[float]]:
    """Call every fn once per repetition, in turn (a, b, a, b, ...; the order flips every
    repetition so that neither side always runs first); each returns one measurement."""
    out: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for rep in range(reps):
        order = names if rep % 2 == 0 else names[::-1]
        for name in order:
            out[name].append(float(fns[name]()))
        if verbose:
            vals = "  ".join(f"{n}={out[n][-1]:.4g}" for n in names)
            print(f"   rep {rep + 1}/{reps}: {vals}   [{load()}]")
            sys.stdout.flush()
    return out


def table(rows: Sequence[Sequence[object]], headers: Sequence[str]) -> str:
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(cells[0], widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    for r in cells[1:]:
        lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")
    return "\n".join(lines)


def _fmt(c: object) -> str:
    if isinstance(c, float):
        if c == 0:
            return "0"
        if abs(c) >= 1000:
            return f"{c:,.0f}"
        if abs(c) >= 100:
            return f"{c:.1f}"
        if abs(c) >= 1:
            return f"{c:.3f}"
        return f"{c:.4f}"
    return str(c)


def verdict(name: str, value: float, goal: float, unit: str = "x", lower_is_better: bool = True) -> bool:
    met = value <= goal if lower_is_better else value >= goal
    sign = "<=" if lower_is_better else ">="
    print(f"GOAL {name}: {value:.3f}{unit} (goal {sign} {goal}{unit}) -> {'MET' if met else 'NOT MET'}   [{load()}]")
    sys.stdout.flush()
    return met


def mib(n: float) -> float:
    return n / 2**20


def base_parser(description: str, threads: int | None = 1) -> argparse.ArgumentParser:
    """``--threads`` defaults to 1: on this shared 2-core machine (load > cores) two intra-op threads make
    small-op step times 10-50x slower and erratic (OpenMP threads spin-wait for a descheduled peer);
    pass ``--threads 0`` for torch's default."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="fast smoke mode (fewer repetitions, smaller sizes)")
    p.add_argument("--threads", type=int, default=threads,
                   help=f"torch intra-op threads (default {threads}; 0 = torch's default)")
    return p


def apply_threads(args: argparse.Namespace) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)


def quiet_lightning() -> None:
    import logging
    import warnings

    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*GPU available but not used.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", category=UserWarning, module="lightning")


def quiet_trainer(**kwargs):
    import lightning.pytorch as pl

    defaults = dict(accelerator="cpu", devices=1, enable_progress_bar=False, logger=False, enable_checkpointing=False,
                    enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    defaults.update(kwargs)
    return pl.Trainer(**defaults)
