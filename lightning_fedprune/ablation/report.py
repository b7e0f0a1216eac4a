"""The results page (Markdown), its figure and the README block, generated from
:func:`~lightning_fedprune.ablation.analysis.analyse` (or from a results.json written by it).

Everything on the page comes from the grid file, the cells' records and the runner's record of its runs;
cells that have not finished are listed and left out of the statistics, so a partial run renders. Every
sentence that judges a finding is produced by a rule of :mod:`~lightning_fedprune.ablation.analysis` from
the tests; nothing on the page or in the README block is written by hand.
"""

from __future__ import annotations

import copy
import math
import os
import re
from pathlib import Path
from typing import Any

from lightning_fedprune.ablation.analysis import (
    CONVENTION,
    EQUIVALENT,
    FINDINGS,
    HIGHER,
    INSUFFICIENT,
    LOWER,
    UNDECIDED,
)
from lightning_fedprune.ablation.grid import Grid, apply_overrides
from lightning_fedprune.ablation.runner import machine_info

__all__ = ["machine_info", "make_figure", "readme_block", "write_page", "write_readme"]

VERDICT_MARK = {"supported": "**supported**", "contradicted": "**contradicted**",
                "no conclusion": "**no conclusion**", "not run": "*not run yet*"}
#: the markers of the README block a grid rewrites: ``<!-- results:<name>:begin -->`` ... ``end``
README_BEGIN, README_END = "<!-- results:{name}:begin -->", "<!-- results:{name}:end -->"


# ---------------------------------------------------------------------------------------------- formatting
def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _num(value: Any, fmt: str = ".3f", missing: str = "–") -> str:
    return format(value, fmt) if _finite(value) else missing


def _p(value: Any) -> str:
    """``= 0.0123`` or ``< 0.0001``: written after a ``p``."""
    if not _finite(value):
        return "= –"
    return "< 0.0001" if value < 1e-4 else f"= {value:.4f}" if value < 0.01 else f"= {value:.3f}"


def _bytes(value: Any) -> str:
    if not _finite(value):
        return "not recorded"
    return f"{value / 1e6:.2f} MB" if value >= 1e5 else f"{value / 1e3:.1f} kB"


def _params(value: Any) -> str:
    if not _finite(value):
        return "–"
    return f"{value / 1e6:.2f} M" if value >= 1e6 else f"{value / 1e3:.0f} k"


def _seconds(value: Any) -> str:
    return f"{value:.0f} s" if _finite(value) else "–"


def _list(values: Any, missing: str = "not recorded") -> str:
    return ", ".join(str(v) for v in values) if values else missing


def _wer(conf: dict[str, Any]) -> str:
    if conf["n"] == 0:
        return f"– (0/{conf['seeds']})"
    text = f"{conf['mean']:.3f}"
    if conf["n"] >= 2:
        text += f" ± {conf['sd']:.3f} [{conf['ci_low']:.3f}, {conf['ci_high']:.3f}]"
    text += f" ({conf['n']}/{conf['seeds']}" + (f", {conf['failed']} failed" if conf["failed"] else "") + ")"
    return text


def config_table(results: dict[str, Any], names: list[str]) -> list[str]:
    """A Markdown table of configurations: WER, traffic next to it, client size, sparsity, eval set, time."""
    confs = results["configurations"]
    metric = results["metric"]
    conf_level = round(100 * results["statistics"]["confidence"])
    lines = [f"| configuration | {metric}: mean ± sd [{conf_level} % CI of the mean] (seeds) | bytes per client "
             "and round (down + up, run mean) | client parameters (final) | sparsity | eval utterances (words) "
             "| time per cell |", "|---|---|---|---|---|---|---|"]
    for name in dict.fromkeys(names):
        c = confs[name]
        compact = "" if c["compact"] in (True, None) else " (masked-dense)"
        warm = f" + {_seconds(c['warm_seconds'])} shared" if c.get("warm_seconds") is not None else ""
        lines.append(f"| `{name}`: {c['label']} | {_wer(c)} | {_bytes(c['bytes_per_client_round'])} | "
                     f"{_params(c['client_params'])}{compact} | {_num(c['sparsity'], '.2f')} | "
                     f"{_list(c.get('eval_utterances'))} ({_list(c.get('eval_words'))}) | "
                     f"{_seconds(c['seconds'])}{warm} |")
    return lines


def outcome_text(c: dict[str, Any], margin: float) -> str:
    """The wording of a comparison's outcome, as the tests allow it."""
    o = c["outcome"]
    if o == INSUFFICIENT:
        return "insufficient data (fewer than 2 common seeds)" if c["kind"] == "difference" else \
            "insufficient data (fewer than 3 common seeds)"
    if c["kind"] == "variance":
        if o == UNDECIDED:
            return f"no conclusion at n = {c['n']}"
        return f"`{c['a']}` varies significantly **{'less' if o == LOWER else 'more'}** over the seeds"
    if o in (LOWER, HIGHER):
        return (f"**{o}**" + (f", within ±{margin:g}" if c["within_margin"] else ""))
    if o == EQUIVALENT:
        return f"**equivalent within ±{margin:g}**"
    return f"no conclusion at n = {c['n']} (MDE {_num(c.get('mde'), '.4f')})"


def comparison_line(c: dict[str, Any], results: dict[str, Any]) -> str:
    st = results["statistics"]
    confs = results["configurations"]
    if c["kind"] == "variance":
        if c["outcome"] == INSUFFICIENT:
            return f"- sd of `{c['a']}` vs sd of `{c['b']}`: {outcome_text(c, st['margin'])}"
        return (f"- sd of `{c['a']}` vs sd of `{c['b']}` over {c['n']} seeds: {_num(c['sd_a'], '.4f')} vs "
                f"{_num(c['sd_b'], '.4f')} (variance ratio {_num(c['ratio'], '.2f')}); Pitman–Morgan p {_p(c['p'])} "
                f"(Holm-adjusted p {_p(c.get('p_holm'))}): {outcome_text(c, st['margin'])}")
    traffic = (f" — bytes per client and round: {_bytes(confs[c['a']]['bytes_per_client_round'])} vs "
               f"{_bytes(confs[c['b']]['bytes_per_client_round'])}")
    if c["outcome"] == INSUFFICIENT:
        return f"- `{c['a']}` − `{c['b']}`: {outcome_text(c, st['margin'])}{traffic}"
    conf_level = round(100 * c["confidence"])
    return (f"- `{c['a']}` − `{c['b']}`: {c['mean']:+.4f} [{conf_level} % CI {c['ci_low']:+.4f}, {c['ci_high']:+.4f}] "
            f"over {c['n']} seeds; paired t p {_p(c['p_difference'])} (Holm-adjusted p {_p(c['p_difference_holm'])}), "
            f"TOST ±{c['margin']:g} p {_p(c['p_equivalence'])} (Holm-adjusted p {_p(c['p_equivalence_holm'])}): "
            f"{outcome_text(c, st['margin'])}{traffic}")


def _glance(results: dict[str, Any], grid: Grid) -> list[str]:
    """The summary table: every finding of the article, its verdict here and its claims as tested."""
    by_key = {f["key"]: f for f in results["findings"]}
    lines = ["## The five findings at a glance", "",
             "| # | the article says | here | the claims as tested |", "|---|---|---|---|"]
    plan = results.get("power_plan") or {}
    for key, (number, claim) in sorted(FINDINGS.items(), key=lambda kv: kv[1][0]):
        f = by_key.get(key)
        if f is None:
            where = {r["where"] for r in plan.get("rows", []) if r["section"] == key}
            note = "not in this grid" + (" (it runs with `--full`; see the power plan)" if "--full" in where else "")
            lines.append(f"| {number} | {claim} | – | {note} |")
            continue
        parts = "; ".join(f"{c['claim']}: {c['verdict']}" for c in f["claims"])
        if f.get("scope"):
            parts = f"*{f['scope']}*; {parts}"
        lines.append(f"| {number} | {claim} | {VERDICT_MARK[f['verdict']]} | {parts} |")
    return lines + ["", "Each verdict follows from the tests by the rule stated in its section; the words "
                        "*supported*, *contradicted* and *no conclusion* are the rule's, not a reading of the numbers.",
                    ""]


def _method_lines(results: dict[str, Any], grid: Grid) -> list[str]:
    st = results["statistics"]
    seeds = results["seeds"]
    metric = results["metric"]
    evals = sorted({v for c in results["configurations"].values() for v in c.get("eval_utterances") or []})
    words = sorted({v for c in results["configurations"].values() for v in c.get("eval_words") or []})
    warm = results.get("warm_start")
    cold = [n for n, c in results["configurations"].items() if warm and c.get("warm_start") is None]
    other_warm = sorted({c["warm_start"] for c in results["configurations"].values()
                         if warm and c.get("warm_start") not in (None, warm["configuration"])})
    lines = [
        "## How the claims are tested", "",
        "Stated in the grid file before the run: "
        f"family-wise α = {st['alpha']:g}, equivalence margin ±{st['margin']:g} {metric}, power {st['power']:g}.", "",
        f"- **Seeds.** Every configuration runs with the seeds {seeds['grid']}; a seed fixes the model's "
        "initialisation, the cohorts and the clients' data order, the same for every configuration. Seeds used to "
        f"choose the setting and its size (calibration): {seeds['calibration'] or 'none recorded'}; they are never "
        "test seeds (the grid file is refused if the two sets overlap).",
        f"- **The measure.** `{metric}`: the word error rate on the held-out speakers, evaluated once at the end of "
        f"training" + (f", on {_list(evals)} utterances ({_list(words)} words) per cell, as recorded by the cells."
                       if evals else f": {_configured_eval(grid)}; the cells record the count they evaluated."),
    ]
    if warm:
        lines.append(
            f"- **Shared warm start.** The first {warm['rounds']} rounds (before any pruning) are trained once per "
            f"seed, as `{warm['configuration']}` trains them, saved as a checkpoint, and every configuration resumes "
            "from it with its own settings — bit for bit what an uninterrupted run of that configuration does "
            "(`tests/test_ablation_warmstart.py` checks the final weights' digest), so the seeds are spent on what "
            "differs." + (f" Trained from round 0 instead: {', '.join(f'`{n}`' for n in cold)}." if cold else "")
            + (f" Their own warm start: {', '.join(f'`{n}`' for n in other_warm)}." if other_warm else ""))
    lines += [
        "- **Paired tests.** Two configurations are compared seed by seed, on `d_s = a_s − b_s` (negative: `a` has "
        "the lower WER): a two-sided paired t-test of no difference with the "
        f"{round(100 * st['confidence'])} % confidence interval of `mean(d)`, and a TOST equivalence test "
        f"(two one-sided paired t-tests) of `|mean(d)| < {st['margin']:g}`. \"More stable\" is the Pitman–Morgan "
        "test of equal variances over the seeds (paired: the correlation of `a + b` with `a − b`).",
        f"- **Multiple comparisons.** Holm–Bonferroni over every p-value on this page ({st['tests_on_page']} tests "
        f"made, of the {st['tests_planned']} the page makes once every cell has finished: both tests of every "
        f"comparison and every variance test). A test counts when its Holm-adjusted p-value is below {st['alpha']:g}.",
        f"- **Power.** Each comparison's minimum detectable effect (MDE) is the mean difference its paired t-test "
        f"detects with probability {st['power']:g} at level α/m = {st['alpha']:g}/{st['tests_planned']} = "
        f"{_num(st['mde_alpha'], '.2g')} (the level Holm's first step demands), from the standard deviation of its "
        "own per-seed differences.",
        "- **Wording.** *significantly lower/higher* (the difference test counts; *within ±margin* is added when the "
        "equivalence test counts too), *equivalent within ±margin* (only the equivalence test counts), or *no "
        "conclusion at this n* with the MDE. A gain smaller than the margin counts as none.",
        "",
    ]
    return lines


def _configured_eval(grid: Grid) -> str:
    cfg, _ = _setting(grid, {"configurations": {}})
    corpus = _base_value(cfg, "data", "init_args", "corpus") or {}
    speakers, per = corpus.get("test_speakers"), corpus.get("test_utterances_per_speaker")
    if isinstance(speakers, int) and isinstance(per, int):
        return f"{speakers} held-out speakers × {per} utterances = {speakers * per} utterances as configured"
    return "the held-out set as configured"


def _finding_lines(f: dict[str, Any], results: dict[str, Any]) -> list[str]:
    by_id = {c["id"]: c for c in results["comparisons"]}
    lines = [f"## Finding {f['number']}: {f['claim']}", "",
             f"Verdict: {VERDICT_MARK[f['verdict']]}" + (f" ({f['scope']})" if f.get("scope") else "") + ".", "",
             f"Rule: {f['rule']}", ""]
    lines += [f"- {c['claim']}: {VERDICT_MARK[c['verdict']]}" for c in f["claims"]] + [""]
    lines += config_table(results, f["configurations"]) + [""]
    ids = list(dict.fromkeys(i for c in f["claims"] for i in c["comparisons"]))
    ids += [c["id"] for c in results["comparisons"] if c["section"] == f["key"] and c["id"] not in ids]
    lines += [comparison_line(by_id[i], results) for i in ids] + [""]
    confs = results["configurations"]
    if f["key"] == "adaptive":
        lines += layer_table(results, f["configurations"])
    if f["key"] == "refinement":
        for name in f["configurations"]:
            c = confs[name]
            if c.get("refinement_updates") is None:
                continue
            lines.append(f"Mask flips per refinement update of `{name}`: "
                         + (f"{c['refinement_flips_mean']:.0f} entries on average over {c['refinement_updates']} "
                            "updates (all seeds)" if c.get("refinement_flips_mean") is not None
                            else "not recorded or none") + ".")
        lines.append("")
    return lines


def layer_table(results: dict[str, Any], names: list[str]) -> list[str]:
    """Per-layer sparsity (mean over the seeds) of ``names``, one column each, and the spread."""
    confs = results["configurations"]
    shown = [n for n in names if confs[n].get("layer_sparsity")]
    if not shown:
        return ["Per-layer sparsity: not recorded.", ""]
    layers = sorted({layer for n in shown for layer in confs[n]["layer_sparsity"]})
    lines = ["Per-layer sparsity (mean over the seeds):", "",
             "| layer | " + " | ".join(f"`{n}`" for n in shown) + " |", "|---|" + "---|" * len(shown)]
    for layer in layers:
        lines.append(f"| `{layer}` | " + " | ".join(_num(confs[n]["layer_sparsity"].get(layer), ".3f") for n in shown)
                     + " |")
    lines.append("| spread (max − min) | " + " | ".join(_num(confs[n]["layer_sparsity_spread"], ".3f") for n in shown)
                 + " |")
    return lines + [""]


def power_lines(results: dict[str, Any]) -> list[str]:
    plan = results.get("power_plan")
    if not plan:
        return []
    lines = ["## The power plan", "",
             f"Seeds each comparison needs for its paired t-test to detect a difference of {plan['target_mde']:g} "
             f"with power {plan['power']:g} at level α/m, from the standard deviation of its per-seed differences in "
             f"the calibration ({plan['calibration']}; seeds {plan['calibration_seeds']}, not test seeds). A "
             "calibration of a few seeds gives a rough standard deviation: the plan sizes the grid, the tests above "
             "use the grid's own data.", "",
             "| comparison | in | calibration sd (seeds) | α/m | seeds needed | seeds here |", "|---|---|---|---|---|---|"]
    for r in plan["rows"]:
        need = r["seeds_needed"] if r["seeds_needed"] is not None else "no data" if not r["calibration_n"] else "> 100000"
        lines.append(f"| {r['section']}: `{r['a']}` − `{r['b']}` | {r['where']} | {_num(r['calibration_sd'], '.4f')} "
                     f"({r['calibration_n']}) | {_num(r['alpha'], '.2g')} | {need} | "
                     f"{r['seeds_run'] if r['seeds_run'] is not None else '–'} |")
    under = [r for r in plan["rows"] if r["where"] == "this grid" and isinstance(r["seeds_needed"], int)
             and r["seeds_run"] is not None and r["seeds_needed"] > r["seeds_run"]]
    if under:
        lines += ["", f"Not powered for {plan['target_mde']:g} at this grid's seeds (by the calibration): "
                  + ", ".join(f"`{r['a']}` − `{r['b']}`" for r in under)
                  + ". Their MDE above states what they can detect."]
    return lines + [""]


def write_page(grid: Grid, results: dict[str, Any], runs: list[dict[str, Any]], command: str, page: Path,
               figure: Path | None) -> Path:
    """Write the results page for ``results`` (see :func:`~lightning_fedprune.ablation.analysis.analyse`)."""
    done = sum(1 for c in results["cells"] if c["status"] == "done")
    total = len(results["cells"])
    machines = sorted({m for c in results["configurations"].values() for m in c.get("machines") or []})
    lines = [f"# Results: the article's five findings on the embedded speech corpus ({grid.name} grid)", "",
             "<!-- GENERATED by `fedprune ablate`; do not edit by hand: rerun the command. -->", "",
             f"Generated by `{command}` on {results['generated']}, from {done} of {total} cells "
             f"({len(grid.configurations)} configurations × {len(grid.seeds)} seeds"
             f"{'; the missing cells are listed at the end' if done < total else ''})"
             + (f", run on: {'; '.join(machines)}" if machines else "") + ".", ""]
    if done == 0:
        lines += ["**No cell of this grid has finished yet: nothing below is a result.** Run the command at the end "
                  "of docs/ablation.md to produce them.", ""]
    lines += _glance(results, grid)
    lines += _method_lines(results, grid)
    lines += ["## Rows and columns", "", CONVENTION, ""]
    lines += ["## The setting", ""]
    if grid.description:
        lines += [grid.description.strip(), ""]
    lines += setting_lines(grid, results) + [""]
    for f in results["findings"]:
        lines += _finding_lines(f, results)
    if results.get("baselines"):
        b = results["baselines"]
        by_id = {c["id"]: c for c in results["comparisons"]}
        lines += ["## Baselines in the same harness", "",
                  "Every baseline runs on the same pruning state, wire format and compact clients as Federated "
                  "Pruning, so bytes (counted from the encoded payloads, down + up) and client size (the parameter "
                  "entries a client receives and trains) are measured the same way; comparisons at unequal traffic "
                  "show it next to the WER.", ""]
        lines += config_table(results, [b["reference"], *b["others"].values()]) + [""]
        lines += [comparison_line(by_id[i], results) for i in b["comparisons"]] + [""]
    lines += power_lines(results)
    if figure is not None and figure.is_file():
        rel = os.path.relpath(figure, page.parent)
        lines += ["## Figure", "", f"![{results['metric']} per configuration, traffic and per-layer sparsity]({rel})", "",
                  "Mean over the seeds with the confidence interval of the mean: WER against sparsity per pattern "
                  "(dense FedAvg dashed); WER against bytes per client and round of Federated Pruning and the "
                  "baselines; per-layer sparsity of the adaptive allocations against uniform; training loss per "
                  "round.", ""]
    lines += differences_lines(grid, results) + [""]
    lines += runs_lines(runs, results) + [""]
    missing = results["missing"]
    if missing:
        lines += ["## Missing cells", "", f"{len(missing)} cell(s) have not finished: "
                  + ", ".join(f"`{m}`" for m in missing[:60]) + (" …" if len(missing) > 60 else ""), ""]
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text("\n".join(lines).rstrip() + "\n")
    return page


# ---------------------------------------------------------------------------------------------- README block
def readme_block(results: dict[str, Any], page: str) -> str:
    """The README paragraph about the findings, generated from ``results`` (a results.json)."""
    done = sum(1 for c in results["cells"] if c["status"] == "done")
    total = len(results["cells"])
    n_conf = len(results["configurations"])
    seeds = results["seeds"]["grid"]
    head = "**On more seeds.**" if results.get("full") else "**Does it reproduce the article?**"
    machines = sorted({m for c in results["configurations"].values() for m in c.get("machines") or []})
    intro = (f"{head} [{page}]({page}) holds the evidence, generated by "
             f"`{results.get('command', 'fedprune ablate')}`: the {results['grid']} grid, {n_conf} configurations × "
             f"{len(seeds)} seeds, paired tests with Holm's correction over the page, equivalence within "
             f"±{results['statistics']['margin']:g} WER" + (f"; run on {'; '.join(machines)}" if machines else "") + ".")
    if done == 0:
        return intro + " No cell of the current grid has finished yet, so no finding is judged here."
    parts = []
    by_key = {f["key"]: f for f in results["findings"]}
    for key, (number, _) in sorted(FINDINGS.items(), key=lambda kv: kv[1][0]):
        f = by_key.get(key)
        if f is None:
            continue
        parts.append(f"finding {number}: {f['verdict']} ("
                     + (f"{f['scope']}; " if f.get("scope") else "")
                     + "; ".join(f"{c['claim'].replace('`', '')}: {c['verdict']}" for c in f["claims"]) + ")")
    absent = [str(n) for k, (n, _) in sorted(FINDINGS.items(), key=lambda kv: kv[1][0]) if k not in by_key]
    text = intro + f" From {done} of {total} cells: " + "; ".join(parts) + "."
    if absent:
        text += f" Finding{'s' if len(absent) > 1 else ''} {', '.join(absent)} {'are' if len(absent) > 1 else 'is'} " \
                "not in this grid."
    by_id = {c["id"]: c for c in results["comparisons"]}
    base = results.get("baselines") or {}
    confs = results["configurations"]
    if base.get("comparisons"):
        names = {v: k for k, v in base["others"].items()}
        words = []
        for cid in base["comparisons"]:
            c = by_id[cid]
            diff = (f"{c['mean']:+.3f} WER [{round(100 * c['confidence'])} % CI {c['ci_low']:+.3f}, {c['ci_high']:+.3f}]"
                    if c["outcome"] != INSUFFICIENT else "no paired seeds")
            words.append(f"minus {names.get(c['b'], c['b'])} {diff} at {_bytes(confs[c['a']]['bytes_per_client_round'])} "
                         f"vs {_bytes(confs[c['b']]['bytes_per_client_round'])} per client and round: "
                         + outcome_text(c, results["statistics"]["margin"]).replace("**", ""))
        text += f" Federated Pruning (`{base['reference']}`) " + "; ".join(words) + "."
    return text


def write_readme(readme: Path, name: str, block: str) -> bool:
    """Replace the text between the grid's markers in ``readme`` with ``block``; False when the markers are
    absent (the README is left alone)."""
    if not readme.is_file():
        return False
    text = readme.read_text()
    begin, end = README_BEGIN.format(name=name), README_END.format(name=name)
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if not pattern.search(text):
        return False
    new = pattern.sub(lambda _: f"{begin}\n{block}\n{end}", text, count=1)
    if new != text:
        readme.write_text(new)
    return True


# ---------------------------------------------------------------------------------------------- setting, runs
def _base_value(cfg: dict[str, Any], *path: str) -> Any:
    node: Any = cfg
    for part in path:
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return node


def _setting(grid: Grid, results: dict[str, Any]) -> tuple[dict[str, Any], float | None]:
    """The base config with the grid's overrides, and the model's parameter count (from a finished cell)."""
    cfg = copy.deepcopy(grid.base)
    apply_overrides(cfg, grid.overrides)
    confs = [c for c in results["configurations"].values() if c["total_params"]]
    return cfg, confs[0]["total_params"] if confs else None


def setting_lines(grid: Grid, results: dict[str, Any]) -> list[str]:
    """The numbers of the setting, read from the base config and the cells."""
    cfg, total = _setting(grid, results)
    init = _base_value(cfg, "model", "task", "init_args") or {}
    corpus = _base_value(cfg, "data", "init_args", "corpus") or {}
    model = ", ".join(f"{k} {init[k]}" for k in ("d_model", "num_layers", "num_heads", "ffn_dim", "pred_dim", "joint_dim",
                                                   "loss", "ctc_weight", "lr") if k in init)
    return [
        "| | |", "|---|---|",
        f"| model | {_base_value(cfg, 'model', 'task', 'class_path') or '?'} ({model}); {_params(total)} parameters |",
        f"| corpus | synthetic eSpeak NG speech: {corpus.get('vocabulary', 'digits')} vocabulary, "
        f"{corpus.get('num_speakers', '?')} training speakers (= clients) × {corpus.get('utterances_per_speaker', '?')} "
        f"utterances, {corpus.get('test_speakers', '?')} held-out speakers × "
        f"{corpus.get('test_utterances_per_speaker', '?')}, noise SNR {corpus.get('noise_snr_db', 40)} dB |",
        f"| federation | {_base_value(cfg, 'model', 'clients_per_round')} clients per round, "
        f"{_base_value(cfg, 'model', 'local_steps')} local steps, {_base_value(cfg, 'trainer', 'max_steps')} rounds, "
        f"server {_base_value(cfg, 'model', 'server_optimizer') or 'sgd'} |",
        f"| base config | `{os.path.relpath(grid.base_path)}`, grid `{os.path.relpath(grid.path)}` |",
    ]


def differences_lines(grid: Grid, results: dict[str, Any]) -> list[str]:
    """Where this setting differs from the article's (LibriSpeech, a Conformer-Transducer of 17 x 512 layers, 30,000 rounds)."""
    cfg, total = _setting(grid, results)
    rounds = _base_value(cfg, "trainer", "max_steps")
    return [
        "## Where this setting differs from the article's", "",
        "- **Speech.** The article trains on LibriSpeech (970 h of read speech by ~2,300 real speakers). Here the "
        "speech is synthesised by eSpeak NG from a small closed vocabulary: every word always sounds the same for a "
        "given voice, speakers differ by voice, rate and pitch only, and the held-out speakers are other synthetic "
        "voices. The task is far easier and far less varied, so absolute WERs say nothing about LibriSpeech; only "
        "the *comparisons* between configurations in the same setting are evidence.",
        f"- **Model size.** The article's Conformer-Transducer has 17 layers of dimension 512 (this library's `paper` preset of it: 116.1 M parameters); "
        f"this one has {_params(total)}. The article's question is how much of a heavily over-parameterised "
        "model can go; a small model has less to spare, so a given sparsity may cost more here than at the "
        "article's size.",
        f"- **Rounds.** The article runs 30,000 federated rounds; this grid runs {rounds}. The pruning, "
        "refinement and fine-tuning phases are correspondingly short (a few mask updates instead of thousands), "
        "so effects that need long training — refinement recovering wrongly pruned weights, adaptive "
        "allocation settling — have much less room to show.",
        "- **Statistics.** The article reports single runs; here every configuration has several seeds and every "
        "claim a stated test, so a claim can end as *no conclusion* where the article states a difference.",
        "- **Importance statistics.** Gradient and weight×gradient importance use the server-side pseudo-gradient "
        "(the aggregated client update), not client gradients: one of the choices the article leaves open "
        "(docs/design.md).",
    ]


def _run_end(run: dict[str, Any]) -> str:
    """How a run ended, when not by finishing: interrupted (Ctrl-C, SIGTERM), or killed outright (its record is
    the one written after its last finished cell)."""
    if run.get("interrupted"):
        return " (interrupted)"
    if not run.get("finished"):
        return " (stopped before it finished: counted to its last finished cell)"
    return ""


def runs_lines(runs: list[dict[str, Any]], results: dict[str, Any]) -> list[str]:
    lines = ["## Runs, machines and load", ""]
    if runs:
        lines += ["| started | command | machine | jobs | wall time | cells run / failed / already done (warm starts) "
                  "| load (1 min) mean / max | CPU time of the cells |", "|---|---|---|---|---|---|---|---|"]
        for r in runs:
            m = r.get("machine") or {}
            machine = (f"{m.get('cpu')}, {m.get('cores')} cores, {m.get('memory_gib')} GiB"
                       + (f", {m['accelerator']}" if m.get("accelerator") else "")
                       + f"; {m.get('os')}, torch {m.get('torch')}") if m else "not recorded"
            load = [x for x in r.get("load", []) if _finite(x)]
            load_text = f"{sum(load) / len(load):.1f} / {max(load):.1f}" if load else "–"
            lines.append(f"| {r['started']} | `{r['command']}` | {machine} | {r['jobs']} | "
                         f"{r['wall_seconds'] / 60:.1f} min{_run_end(r)} | "
                         f"{r['cells_run']} / {r['cells_failed']} / {r['cells_skipped']} ({r.get('warm_starts_run', 0)}) "
                         f"| {load_text} | {r.get('cpu_seconds', 0) / 60:.1f} min |")
        wall = sum(r["wall_seconds"] for r in runs)
        lines += ["", f"Total wall time of the runs: {wall / 60:.1f} min."]
    else:
        lines.append("No run of this grid is recorded.")
    times = [c["seconds"] for c in results["cells"] if c["status"] == "done" and _finite(c.get("seconds"))]
    warm = [c["warm_start"]["seconds"] for c in results["cells"] if c["status"] == "done"
            and c.get("warm_start") and _finite(c["warm_start"].get("seconds"))]
    if times:
        lines += [f"Per cell: {sum(times) / len(times):.0f} s on average (min {min(times):.0f} s, max {max(times):.0f} s) "
                  f"over {len(times)} cells, each one `fedprune fit` process including start-up and evaluation"
                  + (f"; a warm start {sum(warm) / len(warm):.0f} s, once per seed" if warm else "") + "."]
    return lines


# ---------------------------------------------------------------------------------------------- figure
def make_figure(grid: Grid, results: dict[str, Any], path: Path) -> Path | None:
    """WER vs sparsity per pattern, WER vs traffic of the baselines, per-layer sparsity of the adaptive
    allocations and the training-loss curves (a PNG); None when no cell has finished."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    confs = results["configurations"]
    if not any(c["n"] for c in confs.values()):
        return None
    metric = results["metric"]
    sparsity = grid.findings.get("sparsity")
    adaptive = grid.findings.get("adaptive")
    baselines = grid.baselines
    layered = [n for n in ([adaptive["uniform"], *dict(adaptive["adaptive"]).values()] if adaptive else [])
               if confs[n].get("layer_sparsity")]
    curves = {c["configuration"]: c for c in results["cells"] if c.get("loss_curve")}
    panels = [p for p, on in (("sparsity", bool(sparsity)), ("traffic", bool(baselines)), ("layers", bool(layered)),
                              ("loss", bool(curves))) if on]
    if not panels:
        return None

    def err(c: dict[str, Any]) -> float:
        return (c["ci_high"] - c["mean"]) if c["n"] >= 2 and _finite(c["ci_high"]) else 0.0

    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        if panel == "sparsity":
            dense = confs.get(sparsity.get("dense") or "")
            for pattern, curve in sparsity["curves"].items():
                pts = sorted((float(s), confs[n]) for s, n in curve.items() if confs[n]["n"])
                if pts:
                    ax.errorbar([s for s, _ in pts], [c["mean"] for _, c in pts], yerr=[err(c) for _, c in pts],
                                marker="o", capsize=3, label=pattern)
            if dense and dense["n"]:
                ax.axhline(dense["mean"], color="k", ls="--", lw=1, label="dense FedAvg")
            ax.axvline(float(sparsity.get("threshold", 0.3)), color="grey", ls=":", lw=1)
            ax.set(xlabel="sparsity", ylabel=f"{metric} (held-out speakers)", title="WER vs sparsity per pattern")
        elif panel == "traffic":
            for n in [baselines["reference"], *dict(baselines.get("others") or {}).values()]:
                c = confs[n]
                if c["n"] and _finite(c["bytes_per_client_round"]):
                    ax.errorbar(c["bytes_per_client_round"] / 1e6, c["mean"], yerr=err(c), marker="o", capsize=3,
                                label=n)
            ax.set(xlabel="MB per client and round (down + up, run mean)", ylabel=metric, title="quality vs traffic")
        elif panel == "layers":
            layers = sorted({layer for n in layered for layer in confs[n]["layer_sparsity"]})
            width = 0.8 / len(layered)
            for i, n in enumerate(layered):
                ax.bar([j + i * width for j in range(len(layers))],
                       [confs[n]["layer_sparsity"].get(layer, math.nan) for layer in layers], width, label=n)
            ax.set_xticks(range(len(layers)), [str(j) for j in range(len(layers))], fontsize=7)
            ax.set(xlabel="pruned tensor (index, see the page's table)", ylabel="sparsity", title="per-layer sparsity")
        else:
            names = list(dict.fromkeys(c["configuration"] for c in results["cells"] if c.get("loss_curve")))
            for n in names[:10]:
                by_round: dict[int, list[float]] = {}
                for cell in results["cells"]:
                    if cell["configuration"] == n and cell.get("loss_curve"):
                        for r, v in cell["loss_curve"]:
                            if _finite(v):
                                by_round.setdefault(int(r), []).append(v)
                rounds = sorted(by_round)
                ax.plot(rounds, [sum(by_round[r]) / len(by_round[r]) for r in rounds], lw=1, label=n)
            ax.set(xlabel="round", ylabel="client training loss (mean over seeds)", title="training loss per round",
                   yscale="log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
