"""The analysis of a grid: per-configuration measures, paired tests per comparison, and a verdict per finding
that follows mechanically from the tests.

**The tests** (:mod:`~lightning_fedprune.ablation.stats`, on ``scipy.stats``). Every comparison of two
configurations ``a`` and ``b`` is paired by seed (a seed fixes the initialisation, the cohorts and the
clients' data order for every configuration alike) and works on ``d_s = a_s - b_s`` (WER: negative means
``a`` is better):

* a two-sided paired t-test of "no difference", with the ``confidence`` interval of ``mean(d)``;
* a TOST equivalence test of "the difference lies within ``±margin``" (the margin is stated in the grid
  file before the run);
* for "more stable": the Pitman–Morgan test of equal variances over the seeds (paired);
* Holm–Bonferroni over **every** p-value on the page (both tests of every comparison and every variance
  test): a test counts when its Holm-adjusted p-value is below ``alpha``;
* the minimum detectable effect (MDE) of each comparison: the mean difference its paired t-test would
  detect with probability ``power`` at level ``alpha / m`` (``m`` the number of tests on the page: the
  level Holm's first step demands), from the standard deviation of its per-seed differences.

**The outcome of a comparison**: *significantly lower* / *significantly higher* (the difference test
counts; "within the margin" is added when the equivalence test counts too), *equivalent within ±margin*
(only the equivalence test counts), or *no conclusion at this n* (neither: the MDE says what the grid
could have seen).

**The verdict of a claim** (``supported``, ``contradicted``, ``no conclusion``; ``not run`` while cells are
missing) follows from the outcomes by the rule printed next to it (:data:`RULES`). A gain smaller than the
margin counts as none: "A beats B" is supported only by a significant difference that is not within the
margin, and contradicted by a significant difference the other way or by equivalence.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from lightning_fedprune.ablation import stats as S
from lightning_fedprune.ablation.grid import Grid, Statistics
from lightning_fedprune.ablation.runner import read_json

SUPPORTED, CONTRADICTED, NO_CONCLUSION, NOT_RUN = "supported", "contradicted", "no conclusion", "not run"
LOWER, HIGHER, EQUIVALENT, UNDECIDED, INSUFFICIENT = ("significantly lower", "significantly higher", "equivalent",
                                                      "no conclusion", "insufficient data")

#: what this project calls a row and a column, and what the article's framework (likely TensorFlow/Lingvo) calls them
CONVENTION = ("A Linear's weight is stored as `W[out, in]` (PyTorch). A **column** `W[:, c]` is one **input "
              "feature** of the layer (for a convolution: one input channel at one kernel position); a **row** "
              "`W[r, :]` is one **output unit** (an output channel). **Half-column**: `W = [W1; W2]` split by output "
              "units into two halves, a group is one input feature of one half; **half-row**: `W = [W1 | W2]` split "
              "by input features, a group is one output unit of one half. A framework that stores `W` as `[in, out]` "
              "(TensorFlow/Lingvo, `x·W`, likely the article's) calls an input feature a *row* and an output unit "
              "a *column*: if the article used that layout, its \"column pruning\" removes output units, which is "
              "this project's `row` pattern. The findings are therefore named by what is removed as well as by the "
              "article's words.")

#: the article's five findings (METHOD.md): number, the claim in the article's words, and its claims as tested
FINDINGS: dict[str, tuple[int, str]] = {
    "importance": (1, "Weight-based importance reaches the same WER as gradient and weight x gradient, and is more "
                      "stable."),
    "adaptive": (2, "At 50 % sparsity, adaptive per-layer sparsity beats uniform sparsity."),
    "patterns": (3, "Column and half-column pruning beat row pruning; whole column is best (this project's names: "
                    "column = input features removed, row = output units removed)."),
    "sparsity": (4, "Clear quality loss above 30 % sparsity for every pattern."),
    "refinement": (5, "Mask refinement lowers WER."),
}

#: the verdict rule of each finding, as printed on the page
RULES: dict[str, str] = {
    "importance": "Two claims. *Same WER*: supported if every alternative is equivalent to weight within the margin; "
                  "contradicted if one differs significantly and is not within the margin; otherwise no conclusion. "
                  "*More stable*: supported if weight's WER has a significantly smaller variance over the seeds than "
                  "every alternative's (Pitman–Morgan); contradicted if some alternative's is significantly smaller; "
                  "otherwise no conclusion. The finding is supported if both are, contradicted if either is.",
    "adaptive": "Supported if some adaptive allocation beats uniform (a significantly lower WER, not within the "
                "margin); contradicted if every adaptive allocation is significantly higher or equivalent within the "
                "margin; otherwise no conclusion.",
    "patterns": "Three claims, each \"A beats B\" (a significantly lower WER, not within the margin; contradicted by a "
                "significantly higher one or equivalence): column (input features) beats row (output units); "
                "half-column beats row; column beats every other pattern (best). The finding is supported if all "
                "three are, contradicted if any is.",
    "sparsity": "Per pattern: supported if the WER at the first sparsity above the threshold is significantly higher "
                "than at the threshold (not within the margin); contradicted if even the highest sparsity is not "
                "(significantly lower, equivalent, or higher only within the margin); otherwise no conclusion. The "
                "finding is supported if every pattern is, contradicted if any is.",
    "refinement": "Supported if the run with mask refinement beats the one without (a significantly lower WER, not "
                  "within the margin); contradicted if it is significantly higher or equivalent; otherwise no "
                  "conclusion.",
}


# ---------------------------------------------------------------------------------------------- what is compared
@dataclass(frozen=True)
class Planned:
    """One comparison a findings spec asks for: ``a - b`` (``kind="difference"``: the paired t-test and
    TOST) or the variances of ``a`` and ``b`` (``kind="variance"``), in section ``section``."""

    section: str
    a: str
    b: str
    kind: str = "difference"

    @property
    def id(self) -> str:
        return f"{self.section}:{self.kind}:{self.a}-{self.b}"


def _curves(spec: dict[str, Any]) -> dict[str, dict[float, str]]:
    return {p: {float(s): n for s, n in c.items()} for p, c in spec["curves"].items()}


def planned_comparisons(findings: dict[str, Any], baselines: dict[str, Any]) -> list[Planned]:
    """Every comparison the findings and baselines specs ask for, in page order."""
    out: list[Planned] = []
    for key in sorted(findings, key=lambda k: FINDINGS[k][0] if k in FINDINGS else 99):
        if key not in FINDINGS:
            raise ValueError(f"findings.{key}: unknown finding; expected some of {sorted(FINDINGS)}")
        spec = findings[key]
        try:
            if key == "importance":
                for alt in dict(spec["alternatives"]).values():
                    out.append(Planned(key, alt, spec["reference"]))
                    out.append(Planned(key, spec["reference"], alt, "variance"))
            elif key == "adaptive":
                out += [Planned(key, name, spec["uniform"]) for name in dict(spec["adaptive"]).values()]
            elif key == "patterns":
                column, half, row = spec["column"], spec["half_column"], spec["row"]
                out += [Planned(key, column, row), Planned(key, half, row), Planned(key, column, half)]
                out += [Planned(key, column, other) for other in dict(spec.get("others") or {}).values()]
            elif key == "sparsity":
                threshold = float(spec.get("threshold", 0.3))
                for pattern, curve in _curves(spec).items():
                    if threshold not in curve:
                        raise ValueError(f"findings.sparsity.curves.{pattern}: no configuration at the threshold "
                                         f"{threshold}")
                    above = sorted(s for s in curve if s > threshold)
                    if not above:
                        raise ValueError(f"findings.sparsity.curves.{pattern}: no sparsity above the threshold "
                                         f"{threshold}")
                    out.append(Planned(key, curve[above[0]], curve[threshold]))
                    if len(above) > 1:
                        out.append(Planned(key, curve[above[-1]], curve[threshold]))
                if spec.get("dense"):
                    out += [Planned(key, curve[threshold], spec["dense"]) for curve in _curves(spec).values()]
            elif key == "refinement":
                out.append(Planned(key, spec["with"], spec["without"]))
        except (KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"findings.{key}: malformed spec ({type(err).__name__}: {err}); see docs/ablation.md for "
                             "its keys") from err
    if baselines:
        if "reference" not in baselines:
            raise ValueError("baselines: needs `reference` (a configuration) and `others` ({label: configuration})")
        out += [Planned("baselines", baselines["reference"], name)
                for name in dict(baselines.get("others") or {}).values()]
    seen: dict[str, Planned] = {}
    for p in out:
        seen.setdefault(p.id, p)
    return list(seen.values())


# ---------------------------------------------------------------------------------------------- per-seed values
def _values(summary: dict[str, dict[str, Any]], name: str) -> dict[int, float]:
    conf = summary[name]
    return dict(zip(conf.get("value_seeds") or range(len(conf["values"])), conf["values"]))


def _paired(summary: dict[str, dict[str, Any]], a: str, b: str) -> tuple[list[int], list[float], list[float]]:
    va, vb = _values(summary, a), _values(summary, b)
    seeds = [s for s in va if s in vb]
    return seeds, [va[s] for s in seeds], [vb[s] for s in seeds]


def paired_comparison(planned: Planned, summary: dict[str, dict[str, Any]], statistics: Statistics) -> dict[str, Any]:
    """The raw tests of one comparison (p-values before the family-wise adjustment)."""
    seeds, a, b = _paired(summary, planned.a, planned.b)
    out: dict[str, Any] = {"id": planned.id, "section": planned.section, "kind": planned.kind, "a": planned.a,
                           "b": planned.b, "seeds": seeds, "n": len(seeds)}
    if planned.kind == "variance":
        if len(seeds) < 3:
            return {**out, "p": math.nan}
        return {**out, **S.pitman_morgan(a, b).to_dict()}
    if len(seeds) < 2:
        return {**out, "mean": math.nan, "p_difference": math.nan, "p_equivalence": math.nan}
    t = S.paired_t(a, b, statistics.confidence)
    return {**out, "mean": t.mean, "sd": t.sd, "t": t.t, "df": t.df, "ci_low": t.ci_low, "ci_high": t.ci_high,
            "confidence": t.confidence, "p_difference": t.p,
            "p_equivalence": S.tost(a, b, statistics.margin), "margin": statistics.margin}


def planned_tests(planned: list[Planned]) -> int:
    """The number of tests a page makes when every cell has finished: two per difference comparison (the
    paired t-test and TOST), one per variance comparison."""
    return sum(2 if p.kind == "difference" else 1 for p in planned)


def adjust(comparisons: list[dict[str, Any]], statistics: Statistics, planned: int | None = None) -> int:
    """Holm–Bonferroni over every p-value of ``comparisons`` (in place: ``*_holm`` fields, the MDE and the
    outcome of each); returns ``m``, the number of tests in the family. The MDE is stated at level
    ``alpha / planned`` (the tests the page makes once every cell has finished; default: ``m``)."""
    slots = []
    for c in comparisons:
        for key in ("p_difference", "p_equivalence") if c["kind"] == "difference" else ("p",):
            slots.append((c, key))
    adjusted = S.holm([c[key] for c, key in slots])
    for (c, key), value in zip(slots, adjusted):
        c[key + "_holm"] = value
    m = sum(1 for v in adjusted if math.isfinite(v))
    family = planned if planned is not None else m
    level = statistics.alpha / family if family else statistics.alpha
    for c in comparisons:
        c["tests_on_page"] = m
        if c["kind"] == "variance":
            c["outcome"] = _variance_outcome(c, statistics.alpha)
            continue
        c["mde"] = S.mde_paired(c.get("sd", math.nan), c["n"], level, statistics.power) if c["n"] >= 2 else math.nan
        c["mde_alpha"] = level
        c["outcome"], c["within_margin"] = _outcome(c, statistics.alpha)
    return m


def _outcome(c: dict[str, Any], alpha: float) -> tuple[str, bool]:
    if c["n"] < 2 or not math.isfinite(c.get("p_difference_holm", math.nan)):
        return INSUFFICIENT, False
    different = c["p_difference_holm"] < alpha
    equivalent = c["p_equivalence_holm"] < alpha
    if different:
        return (LOWER if c["mean"] < 0 else HIGHER), equivalent
    return (EQUIVALENT if equivalent else UNDECIDED), equivalent


def _variance_outcome(c: dict[str, Any], alpha: float) -> str:
    if not math.isfinite(c.get("p_holm", math.nan)):
        return INSUFFICIENT
    if c["p_holm"] >= alpha:
        return UNDECIDED
    return LOWER if c["ratio"] < 1 else HIGHER  # a's variance significantly lower / higher than b's


# ---------------------------------------------------------------------------------------------- claims
def beats(c: dict[str, Any]) -> str:
    """The verdict of "``a`` beats ``b``" (``a - b`` significantly negative, not within the margin)."""
    if c["outcome"] == INSUFFICIENT:
        return NOT_RUN
    if c["outcome"] == LOWER and not c["within_margin"]:
        return SUPPORTED
    if c["outcome"] in (HIGHER, EQUIVALENT) or (c["outcome"] == LOWER and c["within_margin"]):
        return CONTRADICTED
    return NO_CONCLUSION


def loses(c: dict[str, Any]) -> str:
    """The verdict of "``a`` is clearly worse than ``b``" (``a - b`` significantly positive, not within the margin)."""
    if c["outcome"] == INSUFFICIENT:
        return NOT_RUN
    if c["outcome"] == HIGHER and not c["within_margin"]:
        return SUPPORTED
    if c["outcome"] in (LOWER, EQUIVALENT) or (c["outcome"] == HIGHER and c["within_margin"]):
        return CONTRADICTED
    return NO_CONCLUSION


def same(c: dict[str, Any]) -> str:
    """The verdict of "``a`` and ``b`` reach the same WER" (equivalent within the margin)."""
    if c["outcome"] == INSUFFICIENT:
        return NOT_RUN
    if c["within_margin"]:
        return SUPPORTED
    return CONTRADICTED if c["outcome"] in (LOWER, HIGHER) else NO_CONCLUSION


def stabler(c: dict[str, Any]) -> str:
    """The verdict of "``a``'s WER varies less over the seeds than ``b``'s" (a variance comparison)."""
    return {INSUFFICIENT: NOT_RUN, LOWER: SUPPORTED, HIGHER: CONTRADICTED}.get(c["outcome"], NO_CONCLUSION)


def all_of(verdicts: Iterable[str]) -> str:
    """Supported if every part is, contradicted if any is, not run if a part lacks data, else no conclusion."""
    v = list(verdicts)
    if not v or NOT_RUN in v:
        return NOT_RUN
    if CONTRADICTED in v:
        return CONTRADICTED
    return SUPPORTED if all(x == SUPPORTED for x in v) else NO_CONCLUSION


def any_of(verdicts: Iterable[str]) -> str:
    """Supported if some part is, contradicted if every part is, not run if a part lacks data, else no conclusion."""
    v = list(verdicts)
    if not v:
        return NOT_RUN
    if SUPPORTED in v:
        return SUPPORTED
    if NOT_RUN in v:
        return NOT_RUN
    return CONTRADICTED if all(x == CONTRADICTED for x in v) else NO_CONCLUSION


def judge(key: str, spec: dict[str, Any], by_id: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """A finding's claims (name, verdict, the comparisons behind it) and its verdict."""
    def get(a: str, b: str, kind: str = "difference") -> dict[str, Any]:
        return by_id[Planned(key, a, b, kind).id]

    claims: list[dict[str, Any]] = []

    def claim(name: str, verdict: str, comps: list[dict[str, Any]]) -> None:
        claims.append({"claim": name, "verdict": verdict, "comparisons": [c["id"] for c in comps]})

    if key == "importance":
        ref, alts = spec["reference"], list(dict(spec["alternatives"]).values())
        wer = [get(alt, ref) for alt in alts]
        var = [get(ref, alt, "variance") for alt in alts]
        claim("same WER as " + ", ".join(f"`{a}`" for a in alts), all_of(same(c) for c in wer), wer)
        claim("more stable than " + ", ".join(f"`{a}`" for a in alts), all_of(stabler(c) for c in var), var)
        verdict = all_of(c["verdict"] for c in claims)
    elif key == "adaptive":
        comps = [get(name, spec["uniform"]) for name in dict(spec["adaptive"]).values()]
        claim(f"some adaptive allocation beats uniform `{spec['uniform']}`", any_of(beats(c) for c in comps), comps)
        verdict = claims[0]["verdict"]
    elif key == "patterns":
        column, half, row = spec["column"], spec["half_column"], spec["row"]
        others = [half, *dict(spec.get("others") or {}).values()]
        c_row, h_row = get(column, row), get(half, row)
        best = [get(column, o) for o in others]
        claim(f"column `{column}` (input features) beats row `{row}` (output units)", beats(c_row), [c_row])
        claim(f"half-column `{half}` beats row `{row}`", beats(h_row), [h_row])
        claim(f"column `{column}` beats every other pattern", all_of(beats(c) for c in best), best)
        verdict = all_of(c["verdict"] for c in claims)
    elif key == "sparsity":
        threshold = float(spec.get("threshold", 0.3))
        for pattern, curve in _curves(spec).items():
            above = sorted(s for s in curve if s > threshold)
            first, highest = get(curve[above[0]], curve[threshold]), get(curve[above[-1]], curve[threshold])
            v_first, v_high = loses(first), loses(highest)
            if v_first == SUPPORTED:
                v = SUPPORTED
            elif NOT_RUN in (v_first, v_high):
                v = NOT_RUN
            elif v_high == CONTRADICTED:
                v = CONTRADICTED
            else:
                v = NO_CONCLUSION
            claim(f"{pattern}: clear loss at {above[0]:g} vs {threshold:g}", v,
                  [first] + ([highest] if highest is not first else []))
        verdict = all_of(c["verdict"] for c in claims)
    elif key == "refinement":
        c = get(spec["with"], spec["without"])
        claim(f"`{spec['with']}` (with refinement) beats `{spec['without']}`", beats(c), [c])
        verdict = claims[0]["verdict"]
    else:  # pragma: no cover (planned_comparisons refuses unknown keys first)
        raise ValueError(f"findings.{key}: unknown finding")
    return {"verdict": verdict, "claims": claims}


#: the patterns the article's finding 4 speaks of ("for every pattern")
ARTICLE_PATTERNS = ("column", "row", "half_column")


def scope(key: str, spec: dict[str, Any], full_spec: dict[str, Any] | None = None) -> str | None:
    """How a grid restates a finding it tests only in part (None: as the article states it)."""
    if key != "sparsity":
        return None
    patterns = list(spec["curves"])
    missing = [p for p in ARTICLE_PATTERNS if p not in patterns]
    if not missing:
        return None
    in_full = full_spec is not None and all(p in full_spec.get("curves", {}) for p in missing)
    return (f"restated for {', '.join(patterns)} only: {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not in this grid" + (" (the --full grid runs them)" if in_full else ""))


# ---------------------------------------------------------------------------------------------- collection
def _round(value: Any, digits: int = 6) -> Any:
    if isinstance(value, float):
        return float(f"{value:.{digits}g}") if math.isfinite(value) else None
    return value


def cell_measures(record: dict[str, Any], warm: dict[str, Any] | None) -> dict[str, Any]:
    """What a cell measured, from its ``record.json`` joined with its warm start's (the rounds before it).
    Fields a record does not hold (an older version) are None: *not recorded*."""
    rounds = (warm or {}).get("rounds_log", []) + record.get("rounds_log", []) if "rounds_log" in record else None
    out: dict[str, Any] = {k: record.get(k) for k in (
        "total_params", "prunable_params", "client_params_final", "compact", "eval_utterances", "eval_words",
        "eval_speakers", "layer_sparsity", "weights_sha256", "dense_bytes_per_client_round",
        "bytes_per_client_round_final")}
    out["rounds"] = record.get("rounds")
    if rounds:
        clients = sum(r["clients"] for r in rounds)
        out["bytes_per_client_round_mean"] = sum(r["bytes_down"] + r["bytes_up"] for r in rounds) / clients
        params = [r["client_params"] for r in rounds if r.get("client_params") is not None]
        out["client_params_mean"] = sum(params) / len(params) if params else None
        out["bytes_per_client_round"] = [_round((r["bytes_down"] + r["bytes_up"]) / r["clients"]) for r in rounds]
        out["loss_curve"] = [[r["round"], r.get("train_loss")] for r in rounds]
        out["mask_updates"] = [[r["round"], r.get("phase"), r.get("flips"), r.get("restored"), r.get("pruned")]
                               for r in rounds if r.get("flips")]
        refine = [r for r in rounds if r.get("phase") == "REFINE" and r.get("flips") is not None]
        out["refinement_flips"] = [[r["round"], r["flips"], r["restored"]] for r in refine]
    else:
        out["bytes_per_client_round_mean"] = record.get("bytes_per_client_round_mean")
        out["client_params_mean"] = record.get("client_params_mean")
        out.update(bytes_per_client_round=None, loss_curve=None, mask_updates=None, refinement_flips=None)
    if "validations" in record:
        vals = (warm or {}).get("validations", []) + record["validations"]
        out["wer_curve"] = [[v["round"], (v.get("metrics") or {}).get("val/wer")] for v in vals]
    else:
        out["wer_curve"] = None
    return out


def collect_cells(grid: Grid, previous: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Every measured cell of the grid with what it measured (``status``: done, failed, missing, stale, ...).

    A cell is read from its folder; a cell whose folder is absent is taken from ``previous`` (the
    ``cells`` of an earlier results.json) when it is recorded there as done with the same config hash."""
    from lightning_fedprune.ablation.runner import cell_done

    earlier = {(c.get("configuration"), c.get("seed")): c for c in previous or []}
    cells = []
    for cell in grid.cells():
        digest = grid.cell_digest(cell)
        row: dict[str, Any] = {"configuration": cell.configuration, "seed": cell.seed, "hash": digest}
        info = read_json(cell.dir / "cell.json")
        if info is None:
            old = earlier.get((cell.configuration, cell.seed))
            if old is not None and old.get("status") == "done" and old.get("hash") == digest:
                cells.append(old)
                continue
            row["status"] = "stale" if old is not None and old.get("status") == "done" else "missing"
            cells.append(row)
            continue
        if cell_done(cell, digest):
            summary = read_json(cell.dir / "summary.json") or {}
            record = read_json(cell.dir / "record.json") or {}
            warm_cell = grid.warm_cell(cell)
            warm_info = read_json(warm_cell.dir / "cell.json") if warm_cell is not None else None
            warm_record = read_json(warm_cell.dir / "record.json") if warm_cell is not None else None
            value = (summary.get("metrics") or {}).get(grid.metric)
            machine = info.get("machine") or {}
            row.update(
                status="done", metric=value if isinstance(value, (int, float)) and math.isfinite(value) else None,
                seconds=info.get("seconds"), fit_seconds=summary.get("seconds"), sparsity=summary.get("sparsity"),
                load=info.get("load"), machine=(f"{machine.get('cpu')}, {machine.get('cores')} cores"
                                                + (f", {machine['accelerator']}" if machine.get("accelerator") else "")
                                                if machine else None),
                warm_start=({"configuration": warm_cell.configuration, "rounds": grid.warm_start.rounds,
                             "seconds": (warm_info or {}).get("seconds")} if warm_cell is not None else None),
                **cell_measures(record, warm_record))
        else:
            status = info.get("status")
            row["status"] = "stale" if status == "done" else (status or "missing")
            if info.get("error"):
                row["error"] = info["error"].splitlines()[0]
        cells.append(row)
    return cells


def _mean(values: Iterable[Any]) -> float | None:
    vals = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
    return math.fsum(vals) / len(vals) if vals else None


def _distinct(values: Iterable[Any]) -> list[Any]:
    return sorted({v for v in values if v is not None}, key=str)


def summarise(grid: Grid, cells: list[dict[str, Any]], confidence: float = 0.95) -> dict[str, dict[str, Any]]:
    """Per configuration: the metric over the seeds done (mean, sd, the ``confidence`` interval of the mean)
    and the means of the other measures (None where no cell recorded them)."""
    out = {}
    for name, conf in grid.configurations.items():
        rows = [c for c in cells if c["configuration"] == name]
        done = [c for c in rows if c["status"] == "done"]
        ok = [c for c in done if c.get("metric") is not None]
        values = [float(c["metric"]) for c in ok]
        n = len(values)
        mean = math.fsum(values) / n if n else math.nan
        sd = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1)) if n >= 2 else math.nan
        half = S.stats.t.ppf(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n) if n >= 2 and sd > 0 else (
            0.0 if n >= 2 else math.nan)
        layers: dict[str, list[float]] = {}
        for c in done:
            for layer, value in (c.get("layer_sparsity") or {}).items():
                layers.setdefault(layer, []).append(value)
        layer_mean = {k: _round(_mean(v)) for k, v in layers.items()}
        refine = [f[1] for c in done for f in (c.get("refinement_flips") or [])]
        out[name] = {
            "label": conf.label, "seeds": len(grid.seeds), "done": len(done), "n": n,
            "failed": sum(1 for c in rows if c["status"] == "failed") + len(done) - n,
            "mean": mean, "sd": sd, "ci_low": mean - half, "ci_high": mean + half, "values": values,
            "value_seeds": [int(c["seed"]) for c in ok],
            "warm_start": grid.warm_source(name),
            "seconds": _mean(c.get("seconds") for c in done),
            "warm_seconds": _mean((c.get("warm_start") or {}).get("seconds") for c in done),
            "sparsity": _mean(c.get("sparsity") for c in done),
            "client_params": _mean(c.get("client_params_final") for c in done),
            "client_params_mean": _mean(c.get("client_params_mean") for c in done),
            "total_params": _mean(c.get("total_params") for c in done),
            "bytes_per_client_round": _mean(c.get("bytes_per_client_round_mean") for c in done),
            "bytes_per_client_round_final": _mean(c.get("bytes_per_client_round_final") for c in done),
            "dense_bytes_per_client_round": _mean(c.get("dense_bytes_per_client_round") for c in done),
            "compact": all(c.get("compact", True) is not False for c in done) if done else None,
            "eval_utterances": _distinct(c.get("eval_utterances") for c in done),
            "eval_words": _distinct(c.get("eval_words") for c in done),
            "machines": _distinct(c.get("machine") for c in done),
            "layer_sparsity": layer_mean or None,
            "layer_sparsity_spread": (max(layer_mean.values()) - min(layer_mean.values())) if layer_mean else None,
            "refinement_flips_mean": _mean(refine) if refine else None,
            "refinement_updates": len(refine) if done else None,
        }
    return out


# ---------------------------------------------------------------------------------------------- the power plan
def power_plan(grid: Grid, planned_here: list[Planned], m: int) -> dict[str, Any] | None:
    """For every comparison of this grid and of its ``--full`` findings: the standard deviation of the
    per-seed differences in the calibration (``planning.calibration``, a results.json of earlier seeds),
    and the seeds the paired t-test needs to detect ``planning.target_mde`` with the stated power at level
    ``alpha / m`` (``m`` the tests this page plans, or the full grid's page for its comparisons)."""
    if not grid.planning:
        return None
    calibration = read_json(grid.planning["calibration"]) or {}
    values: dict[str, dict[int, float]] = {}
    for c in calibration.get("cells", []):
        if c.get("status") == "done" and isinstance(c.get("metric"), (int, float)):
            values.setdefault(c["configuration"], {})[int(c["seed"])] = float(c["metric"])
    target = grid.planning["target_mde"]
    st = grid.statistics
    rows = []
    full = planned_comparisons(grid.full_findings, grid.full_baselines) if grid.full_findings else []
    here_ids = {p.id for p in planned_here}
    m_full = planned_tests(full) if full else None
    for p, where, tests in [*((p, "this grid", m) for p in planned_here),
                            *((p, "--full", m_full) for p in full if p.id not in here_ids)]:
        if p.kind != "difference":
            continue
        va, vb = values.get(p.a, {}), values.get(p.b, {})
        seeds = [s for s in va if s in vb]
        sd = S.stats.tstd([va[s] - vb[s] for s in seeds]) if len(seeds) >= 2 else math.nan
        level = st.alpha / tests if tests else st.alpha
        need = S.required_n(target, float(sd), level, st.power) if math.isfinite(sd) else None
        rows.append({"id": p.id, "section": p.section, "a": p.a, "b": p.b, "where": where, "calibration_n": len(seeds),
                     "calibration_sd": float(sd), "alpha": level, "seeds_needed": need,
                     "seeds_run": len(grid.seeds) if where == "this grid" else None})
    return {"calibration": str(calibration.get("description") or grid.planning["calibration"].name),
            "calibration_seeds": sorted({s for v in values.values() for s in v}), "target_mde": target,
            "power": st.power, "rows": rows}


# ---------------------------------------------------------------------------------------------- everything
def analyse(grid: Grid, previous: dict[str, Any] | None = None) -> dict[str, Any]:
    """Cells, per-configuration measures, every comparison's tests (Holm-adjusted over the page), the
    findings' claims and verdicts, the baselines' comparisons and the power plan. ``previous``: an
    earlier results.json whose cells stand in for cell folders that are absent."""
    st = grid.statistics
    cells = collect_cells(grid, (previous or {}).get("cells"))
    summary = summarise(grid, cells, st.confidence)
    planned = planned_comparisons(grid.findings, grid.baselines)
    comparisons = [paired_comparison(p, summary, st) for p in planned]
    m_planned = planned_tests(planned)
    m = adjust(comparisons, st, m_planned)
    by_id = {c["id"]: c for c in comparisons}
    findings = []
    for key, spec in grid.findings.items():
        number, claim = FINDINGS[key]
        findings.append({"key": key, "number": number, "claim": claim, "rule": RULES[key], **judge(key, spec, by_id),
                         "scope": scope(key, spec, grid.full_findings.get(key)),
                         "configurations": list(dict.fromkeys(n for p in planned if p.section == key for n in (p.a, p.b)))})
    findings.sort(key=lambda f: f["number"])
    baselines: dict[str, Any] = {}
    if grid.baselines:
        baselines = {"reference": grid.baselines["reference"], "others": dict(grid.baselines.get("others") or {}),
                     "comparisons": [c["id"] for c in comparisons if c["section"] == "baselines"]}
    missing = [f"{c['configuration']}/seed{c['seed']}" for c in cells if c["status"] != "done"]
    return {"grid": grid.name, "metric": grid.metric, "full": grid.full,
            "statistics": {"alpha": st.alpha, "margin": st.margin, "power": st.power, "confidence": st.confidence,
                           "tests_on_page": m, "tests_planned": m_planned,
                           "mde_alpha": st.alpha / m_planned if m_planned else st.alpha,
                           "correction": "Holm-Bonferroni over every p-value on the page"},
            "seeds": {"grid": grid.seeds, "calibration": grid.calibration_seeds},
            "warm_start": ({"rounds": grid.warm_start.rounds, "configuration": grid.warm_start.configuration}
                           if grid.warm_start else None),
            "configurations": summary, "comparisons": comparisons, "findings": findings, "baselines": baselines,
            "power_plan": power_plan(grid, planned, m_planned), "cells": cells, "missing": missing}
