"""The analysis of a grid: statistics per configuration and a mechanical verdict per finding.

The rule (stated on the page): the WER of two configurations *differs clearly* when the mean of their
per-seed differences ``d_s = a_s - b_s`` is larger than twice its standard error,
``|mean(d)| > 2 * std(d) / sqrt(n)``, and at least ``min_difference`` (a floor for seeds that agree
exactly). The comparison is paired because a seed fixes the model's initialisation, the cohorts and the
clients' data order for every configuration alike, so most of the seed-to-seed spread (here: when
training breaks through its plateau) cancels in ``d_s``. Fewer than 2 seeds done on both sides:
*insufficient*.
Each finding's verdict (``confirmed``, ``refuted``, ``inconclusive``; ``not run`` while cells are
missing) follows from its comparisons by the rule written next to it in :data:`RULES`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from lightning_fedprune.ablation.grid import Grid
from lightning_fedprune.ablation.runner import read_json

CONFIRMED, REFUTED, INCONCLUSIVE, NOT_RUN = "confirmed", "refuted", "inconclusive", "not run"
LOWER, HIGHER, SAME, INSUFFICIENT = "lower", "higher", "no clear difference", "insufficient data"

#: the article's five findings (METHOD.md) with the grid section that tests each
FINDINGS: dict[str, tuple[int, str]] = {
    "importance": (1, "Weight-based importance reaches the same WER as gradient and weight x gradient, and is more "
                      "stable."),
    "adaptive": (2, "At 50 % sparsity, adaptive per-layer sparsity beats uniform sparsity."),
    "patterns": (3, "Column and half-column pruning beat row pruning; whole column is best."),
    "sparsity": (4, "Clear quality loss above 30 % sparsity for every pattern."),
    "refinement": (5, "Mask refinement lowers WER."),
}

#: the verdict rule of each finding, as printed on the page
RULES: dict[str, str] = {
    "importance": "Refuted if an alternative importance has a clearly lower WER than weight. Otherwise confirmed if "
                  "weight's WER also has the smallest standard deviation over the seeds (more stable; a failed or "
                  "diverged seed counts as unstable), inconclusive if not.",
    "adaptive": "Confirmed if some adaptive allocation has a clearly lower WER than uniform at the same sparsity; "
                "refuted if uniform's is clearly lower than every adaptive allocation's; inconclusive otherwise.",
    "patterns": "Confirmed if column and half-column both have a clearly lower WER than row and no pattern's WER is "
                "clearly lower than column's; refuted if row's WER is clearly lower than column's or half-column's, "
                "or another pattern's is clearly lower than column's; inconclusive otherwise.",
    "sparsity": "For every pattern, the WER at the first sparsity above the threshold is compared with the WER at the "
                "threshold. Confirmed if it is clearly higher for every pattern; refuted if some pattern shows no "
                "clear rise even at its highest sparsity; inconclusive otherwise.",
    "refinement": "Confirmed if the run with mask refinement has a clearly lower WER than the one without; refuted if "
                  "it is clearly higher; inconclusive otherwise.",
}


@dataclass(frozen=True)
class Stat:
    """A configuration's metric over its seeds."""

    values: tuple[float, ...]
    failed: int = 0  # seeds that ran but gave no finite metric (failed or diverged)
    seeds: tuple[int, ...] = ()  # the seed of each value (for paired comparisons)

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return math.fsum(self.values) / self.n if self.n else math.nan

    @property
    def std(self) -> float:
        if self.n < 2:
            return math.nan
        m = self.mean
        return math.sqrt(math.fsum((v - m) ** 2 for v in self.values) / (self.n - 1))

    @property
    def se(self) -> float:
        return self.std / math.sqrt(self.n) if self.n >= 2 else math.nan


def compare(a: Stat, b: Stat, min_difference: float = 0.0) -> dict[str, Any]:
    """``a`` versus ``b`` by the rule, paired by seed: ``outcome`` is ``lower``/``higher`` (a is clearly
    lower/higher than b), ``no clear difference``, or ``insufficient data``; with the mean per-seed
    difference, its standard error, the threshold ``max(2 * se, min_difference)`` and the seeds used.
    Values without seeds are paired in order.

    >>> compare(Stat((0.10, 0.30, 0.20)), Stat((0.12, 0.33, 0.21)))["outcome"]  # lower in every seed
    'lower'
    >>> compare(Stat((0.10, 0.30, 0.20)), Stat((0.12, 0.27, 0.21)))["outcome"]
    'no clear difference'
    >>> compare(Stat((0.1,)), Stat((0.2, 0.3)))["outcome"]
    'insufficient data'
    """
    va = dict(zip(a.seeds or range(a.n), a.values))
    vb = dict(zip(b.seeds or range(b.n), b.values))
    common = [s for s in va if s in vb]
    d = Stat(tuple(va[s] - vb[s] for s in common))
    out: dict[str, Any] = {"difference": d.mean, "se": d.se, "threshold": math.nan, "seeds": common}
    if d.n < 2:
        out["outcome"] = INSUFFICIENT
        return out
    threshold = max(2.0 * d.se, min_difference)
    out["threshold"] = threshold
    out["outcome"] = LOWER if d.mean < -threshold else HIGHER if d.mean > threshold else SAME
    return out


# ---------------------------------------------------------------------------------------------- collection
def collect_cells(grid: Grid) -> list[dict[str, Any]]:
    """Every cell of the grid with what it measured (``status``: done, failed, missing, ...)."""
    from lightning_fedprune.ablation.grid import config_hash
    from lightning_fedprune.ablation.runner import cell_done

    cells = []
    for cell in grid.cells():
        info = read_json(cell.dir / "cell.json") or {}
        row: dict[str, Any] = {"configuration": cell.configuration, "seed": cell.seed, "dir": str(cell.dir)}
        if cell_done(cell, config_hash(grid.cell_config(cell))):
            summary = read_json(cell.dir / "summary.json") or {}
            record = read_json(cell.dir / "record.json") or {}
            value = (summary.get("metrics") or {}).get(grid.metric)
            row.update(status="done", metric=value if isinstance(value, (int, float)) and math.isfinite(value) else None,
                       seconds=info.get("seconds"), fit_seconds=summary.get("seconds"), sparsity=summary.get("sparsity"),
                       load=info.get("load"), **{k: record.get(k) for k in (
                           "rounds", "total_params", "prunable_params", "client_params_final", "client_params_mean",
                           "bytes_per_client_round_mean", "bytes_per_client_round_final",
                           "dense_bytes_per_client_round", "compact")})
        else:
            status = info.get("status")
            row["status"] = "stale" if status == "done" else (status or "missing")
            if info.get("error"):
                row["error"] = info["error"].splitlines()[0]
        cells.append(row)
    return cells


def _mean(values: list[Any]) -> float | None:
    vals = [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return math.fsum(vals) / len(vals) if vals else None


def summarise(grid: Grid, cells: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per configuration: the metric's mean, std, se over the seeds done, and the means of the other measures."""
    out = {}
    for name, conf in grid.configurations.items():
        rows = [c for c in cells if c["configuration"] == name]
        done = [c for c in rows if c["status"] == "done"]
        stat = _stat(rows)
        out[name] = {
            "label": conf.label, "seeds": len(grid.seeds), "done": len(done), "n": stat.n, "failed": stat.failed,
            "mean": stat.mean, "std": stat.std, "se": stat.se, "values": list(stat.values),
            "value_seeds": list(stat.seeds),
            "seconds": _mean([c.get("seconds") for c in done]),
            "sparsity": _mean([c.get("sparsity") for c in done]),
            "client_params": _mean([c.get("client_params_final") for c in done]),
            "client_params_mean": _mean([c.get("client_params_mean") for c in done]),
            "total_params": _mean([c.get("total_params") for c in done]),
            "bytes_per_client_round": _mean([c.get("bytes_per_client_round_mean") for c in done]),
            "bytes_per_client_round_final": _mean([c.get("bytes_per_client_round_final") for c in done]),
            "dense_bytes_per_client_round": _mean([c.get("dense_bytes_per_client_round") for c in done]),
            "compact": all(c.get("compact", True) for c in done) if done else None,
        }
    return out


def _stat(rows: list[dict[str, Any]]) -> Stat:
    ok = [c for c in rows if c["status"] == "done" and c.get("metric") is not None]
    failed = sum(1 for c in rows if c["status"] == "failed" or (c["status"] == "done" and c.get("metric") is None))
    return Stat(tuple(float(c["metric"]) for c in ok), failed, tuple(int(c["seed"]) for c in ok))


# ---------------------------------------------------------------------------------------------- findings
def _too_few_seeds(summary: dict[str, dict[str, Any]], names: list[str]) -> list[str]:
    return [n for n in names if summary[n]["n"] < 2]


def _cmp(summary: dict[str, dict[str, Any]], a: str, b: str, min_difference: float) -> dict[str, Any]:
    sa, sb = (Stat(tuple(summary[x]["values"]), summary[x]["failed"], tuple(summary[x].get("value_seeds") or ()))
              for x in (a, b))
    return {"a": a, "b": b, **compare(sa, sb, min_difference)}


def _against(summary: dict, reference: str, others: list[str], min_difference: float) -> tuple[list[str], list[dict]]:
    """The configurations with too few seeds, and every one of ``others`` compared with ``reference``."""
    return (_too_few_seeds(summary, [reference, *others]),
            [_cmp(summary, name, reference, min_difference) for name in others])


def finding_importance(spec: dict[str, Any], summary: dict, min_difference: float) -> dict[str, Any]:
    ref, others = spec["reference"], dict(spec["alternatives"])
    missing, comps = _against(summary, ref, list(others.values()), min_difference)
    if missing:
        return {"verdict": NOT_RUN, "missing": missing, "comparisons": comps}
    better = [c["a"] for c in comps if c["outcome"] == LOWER]
    # fewer failed seeds first, then the smaller std (equal up to rounding counts as "as stable")
    instability = {n: (summary[n]["failed"], round(summary[n]["std"], 9)) for n in [ref, *others.values()]}
    most_stable = all(instability[ref] <= instability[n] for n in others.values())
    verdict = REFUTED if better else CONFIRMED if most_stable else INCONCLUSIVE
    return {"verdict": verdict, "comparisons": comps, "most_stable": most_stable, "clearly_better_than_weight": better}


def finding_adaptive(spec: dict[str, Any], summary: dict, min_difference: float) -> dict[str, Any]:
    missing, comps = _against(summary, spec["uniform"], list(dict(spec["adaptive"]).values()), min_difference)
    if missing:
        return {"verdict": NOT_RUN, "missing": missing, "comparisons": comps}
    winners = [c["a"] for c in comps if c["outcome"] == LOWER]
    verdict = CONFIRMED if winners else REFUTED if all(c["outcome"] == HIGHER for c in comps) else INCONCLUSIVE
    return {"verdict": verdict, "comparisons": comps, "beats_uniform": winners}


def finding_patterns(spec: dict[str, Any], summary: dict, min_difference: float) -> dict[str, Any]:
    column, half_column, row = spec["column"], spec["half_column"], spec["row"]
    others = dict(spec.get("others") or {})
    missing = _too_few_seeds(summary, [column, half_column, row, *others.values()])
    comps = [_cmp(summary, column, row, min_difference), _cmp(summary, half_column, row, min_difference)]
    comps += [_cmp(summary, name, column, min_difference) for name in [half_column, row, *others.values()]]
    if missing:
        return {"verdict": NOT_RUN, "missing": missing, "comparisons": comps}
    col_row, half_row_cmp, *versus_column = comps
    beats_row = col_row["outcome"] == LOWER and half_row_cmp["outcome"] == LOWER
    column_best = not any(c["outcome"] == LOWER for c in versus_column)
    row_wins = col_row["outcome"] == HIGHER or half_row_cmp["outcome"] == HIGHER
    verdict = REFUTED if row_wins or not column_best else CONFIRMED if beats_row else INCONCLUSIVE
    return {"verdict": verdict, "comparisons": comps, "column_and_half_column_beat_row": beats_row,
            "column_best": column_best}


def finding_sparsity(spec: dict[str, Any], summary: dict, min_difference: float) -> dict[str, Any]:
    threshold = float(spec.get("threshold", 0.3))
    curves = {p: {float(s): n for s, n in c.items()} for p, c in spec["curves"].items()}
    names = [n for c in curves.values() for n in c.values()]
    if spec.get("dense"):
        names.append(spec["dense"])
    missing = _too_few_seeds(summary, names)
    per_pattern, comps = {}, []
    for pattern, curve in curves.items():
        if threshold not in curve:
            raise ValueError(f"findings.sparsity.curves.{pattern}: no configuration at the threshold {threshold}")
        above = sorted(s for s in curve if s > threshold)
        if not above:
            raise ValueError(f"findings.sparsity.curves.{pattern}: no sparsity above the threshold {threshold}")
        first = _cmp(summary, curve[above[0]], curve[threshold], min_difference)
        highest = _cmp(summary, curve[above[-1]], curve[threshold], min_difference)
        comps += [first] + ([highest] if len(above) > 1 else [])
        per_pattern[pattern] = {"first_above": above[0], "rise": first["outcome"] == HIGHER,
                                "highest": above[-1], "rise_at_highest": highest["outcome"] == HIGHER}
    if spec.get("dense"):  # informative: the threshold against dense training
        comps += [_cmp(summary, curve[threshold], spec["dense"], min_difference) for curve in curves.values()]
    if missing:
        return {"verdict": NOT_RUN, "missing": missing, "comparisons": comps, "patterns": per_pattern}
    if all(p["rise"] for p in per_pattern.values()):
        verdict = CONFIRMED
    elif any(not p["rise_at_highest"] for p in per_pattern.values()):
        verdict = REFUTED
    else:
        verdict = INCONCLUSIVE
    return {"verdict": verdict, "comparisons": comps, "patterns": per_pattern, "threshold": threshold}


def finding_refinement(spec: dict[str, Any], summary: dict, min_difference: float) -> dict[str, Any]:
    with_, without = spec["with"], spec["without"]
    comps = [_cmp(summary, with_, without, min_difference)]
    missing = _too_few_seeds(summary, [with_, without])
    if missing:
        return {"verdict": NOT_RUN, "missing": missing, "comparisons": comps}
    outcome = comps[0]["outcome"]
    verdict = CONFIRMED if outcome == LOWER else REFUTED if outcome == HIGHER else INCONCLUSIVE
    return {"verdict": verdict, "comparisons": comps}


JUDGES = {"importance": finding_importance, "adaptive": finding_adaptive, "patterns": finding_patterns,
          "sparsity": finding_sparsity, "refinement": finding_refinement}


def analyse(grid: Grid, min_difference: float = 0.005) -> dict[str, Any]:
    """Cells, per-configuration statistics, the findings' verdicts and the baselines' comparisons."""
    cells = collect_cells(grid)
    summary = summarise(grid, cells)
    findings = []
    for key, spec in grid.findings.items():
        if key not in JUDGES:
            raise ValueError(f"findings.{key}: unknown finding; expected some of {sorted(JUDGES)}")
        number, claim = FINDINGS[key]
        result = JUDGES[key](spec, summary, min_difference)
        findings.append({"key": key, "number": number, "claim": claim, "rule": RULES[key], **result})
    findings.sort(key=lambda f: f["number"])
    baselines: dict[str, Any] = {}
    if grid.baselines:
        reference = grid.baselines["reference"]
        baselines = {"reference": reference, "others": dict(grid.baselines.get("others") or {}),
                     "comparisons": [_cmp(summary, reference, name, min_difference)
                                     for name in (grid.baselines.get("others") or {}).values()]}
    missing = [f"{c['configuration']}/seed{c['seed']}" for c in cells if c["status"] != "done"]
    return {"grid": grid.name, "metric": grid.metric, "min_difference": min_difference, "seeds": grid.seeds,
            "configurations": summary, "findings": findings, "baselines": baselines, "cells": cells,
            "missing": missing}

