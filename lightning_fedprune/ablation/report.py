"""The results page (Markdown) and its figure, generated from :func:`~lightning_fedprune.ablation.analysis.analyse`.

Everything on the page comes from the grid, the cells' files and the runner's record of its runs;
cells that have not finished are listed and left out of the statistics, so a partial run renders.
"""

from __future__ import annotations

import copy
import math
import os
import platform
from pathlib import Path
from typing import Any

from lightning_fedprune.ablation.grid import Grid, apply_overrides, configuration_names

VERDICT_MARK = {"confirmed": "**confirmed**", "refuted": "**refuted**", "inconclusive": "**inconclusive**",
                "not run": "*not run yet*"}


def machine_info() -> dict[str, Any]:
    """The machine the cells ran on: CPU model, cores, memory, OS, Python and torch versions."""
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

    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": memory, "os": platform.platform(terse=True),
            "python": platform.python_version(), "torch": torch.__version__}


# ---------------------------------------------------------------------------------------------- formatting
def _num(value: Any, fmt: str = ".3f") -> str:
    return format(value, fmt) if isinstance(value, (int, float)) and math.isfinite(value) else "–"


def _wer(conf: dict[str, Any]) -> str:
    if conf["n"] == 0:
        return f"– (0/{conf['seeds']})"
    text = f"{conf['mean']:.3f}" + (f" ± {conf['std']:.3f}" if conf["n"] >= 2 else "")
    text += f" ({conf['n']}/{conf['seeds']}" + (f", {conf['failed']} failed" if conf["failed"] else "") + ")"
    return text


def _bytes(value: Any) -> str:
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return "–"
    return f"{value / 1e6:.2f} MB" if value >= 1e5 else f"{value / 1e3:.1f} kB"


def _params(value: Any) -> str:
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return "–"
    return f"{value / 1e6:.2f} M" if value >= 1e6 else f"{value / 1e3:.0f} k"


def _seconds(value: Any) -> str:
    return f"{value:.0f} s" if isinstance(value, (int, float)) and math.isfinite(value) else "–"


def config_table(results: dict[str, Any], names: list[str]) -> list[str]:
    """A Markdown table of configurations: WER, traffic, client size, time."""
    confs = results["configurations"]
    metric = results["metric"]
    lines = [f"| configuration | {metric} mean ± std (seeds) | sparsity | MB/client/round (run mean) | "
             "client parameters (final) | wall time/cell |", "|---|---|---|---|---|---|"]
    for name in dict.fromkeys(names):
        c = confs[name]
        compact = "" if c["compact"] in (True, None) else " (masked-dense)"
        lines.append(f"| `{name}`: {c['label']} | {_wer(c)} | {_num(c['sparsity'], '.2f')} | "
                     f"{_bytes(c['bytes_per_client_round'])} | {_params(c['client_params'])}{compact} | "
                     f"{_seconds(c['seconds'])} |")
    return lines


def comparison_lines(comparisons: list[dict[str, Any]]) -> list[str]:
    out = []
    for c in comparisons:
        diff = c["difference"]
        if c["outcome"] == "insufficient data":
            out.append(f"- `{c['a']}` vs `{c['b']}`: insufficient data (fewer than 2 seeds)")
            continue
        head = (f"- `{c['a']}` − `{c['b']}`: mean per-seed difference {diff:+.4f} (threshold ±{c['threshold']:.4f}, "
                f"{len(c.get('seeds') or [])} seeds): ")
        out.append(head + (f"{c['a']} is clearly **{c['outcome']}**" if c["outcome"] != "no clear difference"
                           else "no clear difference"))
    return out


def _verdict_numbers(finding: dict[str, Any]) -> str:
    """The paired differences behind a verdict (at most four), for the summary table."""
    parts = [f"{c['a']} − {c['b']}: {c['difference']:+.3f} (±{c['threshold']:.3f})"
             for c in finding["comparisons"] if c["outcome"] != "insufficient data"]
    return "; ".join(parts[:4]) + (" …" if len(parts) > 4 else "")


def _glance(findings: list[dict[str, Any]], metric: str) -> list[str]:
    """The summary table: every finding's claim, verdict and the paired differences behind it."""
    lines = ["## The five findings at a glance", "",
             f"| # | the article says | verdict here | mean per-seed difference of {metric} (threshold) |",
             "|---|---|---|---|"]
    for f in findings:
        lines.append(f"| {f['number']} | {f['claim']} | {VERDICT_MARK[f['verdict']]} | {_verdict_numbers(f)} |")
    return lines + ["", "The verdicts are mechanical (see *How the verdicts are made*); the numbers behind each are "
                        "in its section below.", ""]


# ---------------------------------------------------------------------------------------------- page
def write_page(grid: Grid, results: dict[str, Any], runs: list[dict[str, Any]], command: str, page: Path,
               figure: Path | None) -> Path:
    """Write the results page for ``results`` (see :func:`~lightning_fedprune.ablation.analysis.analyse`)."""
    metric = results["metric"]
    done = sum(1 for c in results["cells"] if c["status"] == "done")
    total = len(results["cells"])
    machine = runs[-1]["machine"] if runs and "machine" in runs[-1] else machine_info()
    lines = [f"# Results: the article's five findings, reproduced on the embedded speech corpus ({grid.name} grid)", "",
             "<!-- GENERATED by `fedprune ablate`; do not edit by hand: rerun the command. -->", "",
             f"Generated by `{command}` on {results['generated']}, from {done} of {total} cells "
             f"({len(grid.configurations)} configurations × {len(grid.seeds)} seeds"
             f"{'; the missing cells are listed at the end' if done < total else ''}).", ""]
    if results["findings"]:
        lines += _glance(results["findings"], metric)
    lines += ["## The setting", ""]
    if grid.description:
        lines += [grid.description.strip(), ""]
    lines += setting_lines(grid, results) + [""]
    lines += ["## How the verdicts are made", "",
              f"Every configuration runs with the seeds {grid.seeds}; a seed fixes the model's initialisation, the "
              "cohorts and the clients' data order, the same for every configuration (the corpus is always the "
              f"same). Its `{metric}` is the word error rate on the held-out speakers at the end of training "
              "(greedy decoding). Two configurations are compared **seed by seed**: with `d_s = a_s − b_s` the "
              "difference at seed `s`, they **differ clearly** when `|mean(d)| > 2·std(d)/sqrt(n)` and "
              f"`|mean(d)| ≥ {results['min_difference']}` (a floor for seeds that agree exactly); fewer than 2 "
              "common seeds is *insufficient data*. Pairing matters here: how fast a run leaves its plateau varies "
              "a lot from seed to seed, and that spread is shared by every configuration of a seed, so it cancels "
              "in `d_s`. The tables show the plain mean ± std over the seeds; the comparisons below each table "
              "show the paired difference and its threshold. With 3 seeds this is a rough screen, not a formal "
              "test: read *inconclusive* as \"this grid cannot tell\".", ""]
    # findings
    for f in results["findings"]:
        spec = grid.findings[f["key"]]
        lines += [f"## Finding {f['number']}: {f['claim']}", "", f"Verdict: {VERDICT_MARK[f['verdict']]}. "
                  f"Rule: {f['rule']}", ""]
        lines += config_table(results, configuration_names(spec)) + [""]
        lines += comparison_lines(f["comparisons"]) + [""]
        if f["key"] == "adaptive" and f.get("verdict") != "not run":
            winners = f.get("beats_uniform") or []
            lines += [f"Allocations that beat uniform: {', '.join(f'`{w}`' for w in winners) if winners else 'none'}.", ""]
        if f.get("missing"):
            lines += [f"Not enough seeds yet for: {', '.join(f'`{m}`' for m in f['missing'])}.", ""]
    # baselines
    if results.get("baselines"):
        b = results["baselines"]
        lines += ["## Baselines in the same harness", "",
                  "Every baseline runs on the same pruning state, wire format and compact clients as Federated "
                  "Pruning, so bytes (counted from the encoded payloads, down + up) and client size (the parameter "
                  "entries a client receives and trains) are measured the same way.", ""]
        lines += config_table(results, [b["reference"], *b["others"].values()]) + [""]
        lines += comparison_lines(b["comparisons"]) + [""]
    if figure is not None and figure.is_file():
        rel = os.path.relpath(figure, page.parent)
        lines += ["## Figure", "", f"![{metric} vs sparsity per pattern; uniform vs adaptive; quality vs traffic]({rel})", "",
                  " ".join(caption for spec, caption in (
                      (grid.findings.get("sparsity"), "WER vs sparsity per pattern: mean ± std over the seeds "
                                                      "(dense FedAvg: the dashed line and its ± std band)."),
                      (grid.findings.get("adaptive"), "Uniform vs adaptive allocations at the same sparsity."),
                      (grid.baselines, "Quality vs traffic (MB per client per round, down + up, mean over the run) "
                                       "of Federated Pruning and the baselines.")) if spec), ""]
    lines += differences_lines(grid, results) + [""]
    lines += runs_lines(runs, machine, results) + [""]
    missing = results["missing"]
    if missing:
        lines += ["## Missing cells", "", f"{len(missing)} cell(s) have not finished: "
                  + ", ".join(f"`{m}`" for m in missing[:60]) + (" …" if len(missing) > 60 else ""), ""]
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text("\n".join(lines).rstrip() + "\n")
    return page


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
    rows = [
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
    return rows


def differences_lines(grid: Grid, results: dict[str, Any]) -> list[str]:
    """Where this setting differs from the article's (LibriSpeech, a ~120 M Conformer-Transducer, 30,000 rounds)."""
    cfg, total = _setting(grid, results)
    rounds = _base_value(cfg, "trainer", "max_steps")
    return [
        "## Where this setting differs from the article's", "",
        "- **Speech.** The article trains on LibriSpeech (970 h of read speech by ~2,300 real speakers). Here the "
        "speech is synthesised by eSpeak NG from a small closed vocabulary: every word always sounds the same for a "
        "given voice, speakers differ by voice, rate and pitch only, and the held-out speakers are other synthetic "
        "voices. The task is far easier and far less varied, so absolute WERs say nothing about LibriSpeech; only "
        "the *comparisons* between configurations in the same setting are evidence.",
        f"- **Model size.** The article's Conformer-Transducer has ~120 M parameters (17 layers of dimension 512); "
        f"this one has {_params(total)}. The article's question is how much of a heavily over-parameterised "
        "model can go; a small model has less to spare, which is why pruning shows here at all after so few rounds, "
        "but it also means the cost of a given sparsity is larger than it would be at the article's size.",
        f"- **Rounds.** The article runs 30,000 federated rounds; this grid runs {rounds}. The pruning, "
        "refinement and fine-tuning phases are correspondingly short (a few masks updates instead of thousands), "
        "so findings that depend on long training — refinement recovering wrongly pruned weights, adaptive "
        "allocation settling — have much less room to show.",
        "- **Statistics.** The article reports single runs; here every configuration has several seeds and a "
        "stated rule, so a verdict can be *inconclusive* where the article states a difference.",
        "- **Importance statistics.** Gradient and weight×gradient importance use the server-side pseudo-gradient "
        "(the aggregated client update), not client gradients: one of the choices the article leaves open "
        "(docs/design.md).",
    ]


def runs_lines(runs: list[dict[str, Any]], machine: dict[str, Any], results: dict[str, Any]) -> list[str]:
    lines = ["## Runs, machine and load", "",
             f"Machine: {machine.get('cpu')}, {machine.get('cores')} cores, {machine.get('memory_gib')} GiB; "
             f"{machine.get('os')}; Python {machine.get('python')}, torch {machine.get('torch')}.", ""]
    if runs:
        lines += ["| started | command | jobs | wall time | cells run / failed / already done | load (1 min) mean / max "
                  "| CPU time of the cells |", "|---|---|---|---|---|---|---|"]
        for r in runs:
            load = [x for x in r.get("load", []) if isinstance(x, (int, float)) and math.isfinite(x)]
            load_text = f"{sum(load) / len(load):.1f} / {max(load):.1f}" if load else "–"
            lines.append(f"| {r['started']} | `{r['command']}` | {r['jobs']} | {r['wall_seconds'] / 60:.1f} min"
                         f"{' (interrupted)' if r.get('interrupted') else ''} | {r['cells_run']} / {r['cells_failed']} / "
                         f"{r['cells_skipped']} | {load_text} | {r.get('cpu_seconds', 0) / 60:.1f} min |")
        wall = sum(r["wall_seconds"] for r in runs)
        lines += ["", f"Total wall time of the runs: {wall / 60:.1f} min."]
    times = [c["seconds"] for c in results["cells"] if c["status"] == "done" and isinstance(c.get("seconds"), (int, float))]
    if times:
        lines += [f"Per cell: {sum(times) / len(times):.0f} s on average (min {min(times):.0f} s, max {max(times):.0f} s) "
                  f"over {len(times)} cells, each one `fedprune fit` process including start-up and evaluation."]
    return lines


# ---------------------------------------------------------------------------------------------- figure
def make_figure(grid: Grid, results: dict[str, Any], path: Path) -> Path | None:
    """WER vs sparsity per pattern, uniform vs adaptive, and quality vs traffic (a PNG); None when the grid
    names neither a sparsity curve, an adaptive comparison nor baselines, or no cell has finished."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    confs = results["configurations"]
    metric = results["metric"]
    sparsity = grid.findings.get("sparsity")
    adaptive = grid.findings.get("adaptive")
    baselines = grid.baselines
    panels = [p for p in (sparsity, adaptive, baselines) if p]
    if not panels or not any(c["n"] for c in confs.values()):
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), squeeze=False)
    axes = list(axes[0])
    if sparsity:
        ax = axes.pop(0)
        dense = confs.get(sparsity.get("dense") or "")
        for pattern, curve in sparsity["curves"].items():
            pts = sorted((float(s), confs[n]) for s, n in curve.items() if confs[n]["n"])
            if pts:
                ax.errorbar([s for s, _ in pts], [c["mean"] for _, c in pts],
                            yerr=[c["std"] if c["n"] >= 2 else 0 for _, c in pts], marker="o", capsize=3, label=pattern)
        if dense and dense["n"]:
            ax.axhline(dense["mean"], color="k", ls="--", lw=1, label="dense FedAvg")
            if dense["n"] >= 2:
                ax.axhspan(dense["mean"] - dense["std"], dense["mean"] + dense["std"], color="k", alpha=0.08)
        ax.axvline(float(sparsity.get("threshold", 0.3)), color="grey", ls=":", lw=1)
        ax.set(xlabel="sparsity", ylabel=f"{metric} (held-out speakers)", title="WER vs sparsity per pattern")
        ax.legend(fontsize=8)
    for spec, title in ((adaptive, "uniform vs adaptive allocation"), (baselines, "quality vs traffic")):
        if not spec:
            continue
        ax = axes.pop(0)
        if spec is adaptive:
            names = [spec["uniform"], *dict(spec["adaptive"]).values()]
            shown = [n for n in names if confs[n]["n"]]
            ax.bar(range(len(shown)), [confs[n]["mean"] for n in shown],
                   yerr=[confs[n]["std"] if confs[n]["n"] >= 2 else 0 for n in shown], capsize=4,
                   color=["tab:grey"] + ["tab:blue"] * (len(shown) - 1))
            ax.set_xticks(range(len(shown)), shown, rotation=15, fontsize=8)
            ax.set(ylabel=metric, title=title)
        else:
            names = [spec["reference"], *dict(spec.get("others") or {}).values()]
            for n in names:
                c = confs[n]
                if c["n"] and c["bytes_per_client_round"]:
                    ax.errorbar(c["bytes_per_client_round"] / 1e6, c["mean"], yerr=c["std"] if c["n"] >= 2 else 0,
                                marker="o", capsize=3, label=n)
            ax.set(xlabel="MB per client per round (down + up, run mean)", ylabel=metric, title=title)
            ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
