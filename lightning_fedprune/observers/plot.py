"""Plot a run's quality and sparsity over rounds from its TensorBoard event files.

    python -m lightning_fedprune.observers.plot runs/fedprune/version_0 --out docs/img/main_job.png
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from lightning_fedprune.validation import check_path, check_str

#: what :func:`plot_run` plots when no ``metric`` is given: the first of these that is logged
DEFAULT_METRICS = ("val/wer", "val/acc", "val/loss")
#: a metric with fewer points than this is drawn as markers only, each labelled with its value (a line
#: through two validations would suggest a course between them that nobody measured)
MIN_POINTS_FOR_LINE = 3


def read_scalars(log_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """All scalar series of the event files under ``log_dir``: tag -> [(step, value)]."""
    log_dir = check_path(log_dir, "log_dir", kind="dir", must_exist=True, optional=False)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = sorted(log_dir.rglob("events.out.tfevents.*"))
    if not files:
        raise FileNotFoundError(f"no TensorBoard event files under {log_dir}")
    out: dict[str, list[tuple[int, float]]] = {}
    for f in files:
        acc = EventAccumulator(str(f), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            out.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return {k: sorted(v) for k, v in out.items()}


def plot_run(log_dir: str | Path, out: str | Path, metric: str | None = None, title: str | None = None) -> Path:
    """Quality metric (``metric``; default: the first of :data:`DEFAULT_METRICS` that is logged) and
    ``prune/sparsity`` vs round, saved as ``out`` (a PNG; its folder is created)."""
    out = check_path(out, "out", kind="file", optional=False)
    check_str(metric, "metric", optional=True)
    check_str(title, "title", optional=True, empty=True)
    scalars = read_scalars(log_dir)
    if metric is None:
        metric = next((m for m in DEFAULT_METRICS if m in scalars), None)
        if metric is None:
            raise ValueError(f"none of the default metrics {DEFAULT_METRICS} is logged in {str(log_dir)!r}: give "
                             f"`metric`, one of the logged scalars {sorted(scalars)}.")
    elif metric not in scalars:
        raise ValueError(f"`metric` {metric!r} is not logged in {str(log_dir)!r}; logged scalars: {sorted(scalars)}.")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = make_figure(scalars, metric, title)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def make_figure(scalars: dict[str, list[tuple[int, float]]], metric: str, title: str | None = None) -> Any:
    """The figure of :func:`plot_run` from ``scalars`` (tag -> [(step, value)], as :func:`read_scalars` gives).

    ``metric`` is drawn with a marker at every logged point; the markers are joined by a line only from
    :data:`MIN_POINTS_FOR_LINE` points on, and fewer points are labelled with their values.
    ``prune/sparsity`` (logged every round) is a line on a second axis, ``prune/phase`` changes are
    dotted vertical lines.
    """
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=110)
    steps, values = zip(*scalars[metric])
    joined = len(steps) >= MIN_POINTS_FOR_LINE
    ax.plot(steps, values, "o-" if joined else "o", color="tab:blue", label=metric)
    if not joined:
        for step, value in zip(steps, values):
            ax.annotate(f"{value:.4g}", (step, value), textcoords="offset points", xytext=(0, 7), ha="center",
                        fontsize=8, color="tab:blue")
        low, high = min(values), max(values)
        pad = 0.15 * (high - low) if high > low else 0.1 * abs(high) or 0.1
        ax.set_ylim(low - pad, high + 2 * pad)
    ax.set_xlabel("federated round")
    ax.set_ylabel(metric, color="tab:blue")
    if "prune/sparsity" in scalars:
        ax2 = ax.twinx()
        s_steps, s_values = zip(*scalars["prune/sparsity"])
        ax2.plot(s_steps, s_values, "-", color="tab:red", label="prune/sparsity")
        ax2.set_ylabel("sparsity", color="tab:red")
        ax2.set_ylim(0, 1)
        if "prune/phase" in scalars:
            changes = [(s, int(p)) for i, (s, p) in enumerate(scalars["prune/phase"])
                       if i == 0 or int(p) != int(scalars["prune/phase"][i - 1][1])]
            names = {0: "dense", 1: "ramp", 2: "refine", 3: "fine-tune"}
            for s, p in changes:
                ax.axvline(s, color="grey", lw=0.6, ls=":")
                ax.text(s, ax.get_ylim()[1], f" {names.get(p, p)}", fontsize=7, va="top", color="grey")
    ax.set_title(title or f"{metric} and sparsity over rounds")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("log_dir", help="a TensorBoard log directory (e.g. runs/fedprune/version_0)")
    parser.add_argument("--out", default="run.png", help="output PNG")
    parser.add_argument("--metric", default=None, help="scalar to plot (default: val/wer, val/acc or val/loss)")
    parser.add_argument("--title", default=None)
    args = parser.parse_args(argv)
    print(plot_run(args.log_dir, args.out, args.metric, args.title))


if __name__ == "__main__":
    main()
