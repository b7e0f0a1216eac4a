"""`fedprune ablate`: grid expansion and overrides, grid-file errors, the verdict rules on the tests' outcomes,
the runner (parallel, resumable, warm starts, failures, timeouts, progress), the page, figure and README block
from partial grids and from results.json, and the smoke grid end to end (tests/test_ablation_warmstart.py:
real cells resumed from a warm start equal uninterrupted ones)."""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from lightning_fedprune.ablation import analysis as A
from lightning_fedprune.ablation import runner as R
from lightning_fedprune.ablation.analysis import (
    CONTRADICTED,
    EQUIVALENT,
    HIGHER,
    INSUFFICIENT,
    LOWER,
    NO_CONCLUSION,
    NOT_RUN,
    SUPPORTED,
    UNDECIDED,
    Planned,
    analyse,
)
from lightning_fedprune.ablation.command import ablate_main
from lightning_fedprune.ablation.grid import HARNESS_CALLBACKS, Statistics, apply_overrides, config_hash, load_grid
from lightning_fedprune.ablation.report import README_BEGIN, README_END, readme_block
from lightning_fedprune.ablation.runner import GridRunner, RunStats
from lightning_fedprune.cli import main as cli_main

REPO = Path(__file__).resolve().parents[1]
FAKE_FIT = (sys.executable, str(REPO / "tests" / "data" / "fake_fit.py"))
pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")


# ---------------------------------------------------------------------------------------------- grid
def test_overrides_set_paths_and_add_change_or_remove_callbacks():
    cfg = yaml.safe_load((REPO / "examples" / "asr" / "smoke.yaml").read_text())
    apply_overrides(cfg, {
        "model.clients_per_round": 3,
        "data.init_args.corpus.noise_snr_db": 20,
        "trainer.new.deep": 1,
        "callbacks.SparsityRampCallback.target_sparsity": 0.5,
        "callbacks.MaskRefinementCallback": None,
        "callbacks.AdaptiveLayerSparsity": {"method": "global"},
        "callbacks.PruneFL": {"target_sparsity": 0.5},
        "callbacks.FineTuneFreeze": {"start_round": 5},
    })
    assert cfg["model"]["clients_per_round"] == 3 and cfg["data"]["init_args"]["corpus"]["noise_snr_db"] == 20
    assert cfg["trainer"]["new"] == {"deep": 1}
    by_name = {c["class_path"].rpartition(".")[2]: c for c in cfg["trainer"]["callbacks"]}
    assert list(by_name) == ["SparsityRampCallback", "FineTuneFreeze", "AdaptiveLayerSparsity", "PruneFL"]
    assert by_name["SparsityRampCallback"]["init_args"]["target_sparsity"] == 0.5
    assert by_name["SparsityRampCallback"]["init_args"]["pattern"] == "column"  # the others kept
    assert by_name["FineTuneFreeze"]["init_args"] == {"start_round": 5}  # a mapping replaces the init_args
    assert by_name["AdaptiveLayerSparsity"]["class_path"] == "lightning_fedprune.callbacks.AdaptiveLayerSparsity"
    assert by_name["PruneFL"]["class_path"] == "lightning_fedprune.baselines.PruneFL"
    with pytest.raises(ValueError, match="no MaskRefinementCallback callback to change"):
        apply_overrides(cfg, {"callbacks.MaskRefinementCallback.every_n_rounds": 2})
    with pytest.raises(ValueError, match="not a class of"):
        apply_overrides(cfg, {"callbacks.NoSuchCallback": {}})
    with pytest.raises(ValueError, match="not a mapping"):
        apply_overrides(cfg, {"model.clients_per_round.x": 1})
    with pytest.raises(ValueError, match="override key"):
        apply_overrides(cfg, {"model..x": 1})


def _write_grid(tmp_path: Path, grid: dict, base: dict | None = None, name: str = "grid.yaml") -> Path:
    base = base if base is not None else {"fake": {"wer": 0.1}, "trainer": {"callbacks": []}}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    grid = {"base": "base.yaml", "out": str(tmp_path / "cells"), "page": str(tmp_path / "page.md"),
            "figure": str(tmp_path / "fig.png"), **grid}
    path = tmp_path / name
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    return path


def test_matrix_expansion_typed_substitution_full_section_and_reference_checks(tmp_path):
    path = _write_grid(tmp_path, {
        "seeds": [0, 1],
        "configurations": {
            "a": {"label": "A"},
            "col_{s}_{p}": {"matrix": {"s": [0.3, 0.7], "p": ["row", "column"]}, "label": "{p} at {s}",
                            "set": {"fake.wer": "{s}", "fake.pattern": "x-{p}", "fake.regex": r"\d{2}"}},
        },
        "full": {"seeds": [0, 1, 2, 3], "out": str(tmp_path / "full")},
    })
    grid = load_grid(path)
    assert list(grid.configurations) == ["a", "col_0.3_row", "col_0.3_column", "col_0.7_row", "col_0.7_column"]
    conf = grid.configurations["col_0.7_row"]
    assert conf.label == "row at 0.7" and conf.overrides == {"fake.wer": 0.7, "fake.pattern": "x-row", "fake.regex": r"\d{2}"}
    cells = grid.cells()
    assert [c.key for c in cells[:2]] == ["a/seed0", "col_0.3_row/seed0"] and len(cells) == 10  # seed-major
    cfg = grid.cell_config(cells[-1])
    assert cfg["seed_everything"] == 1 and cfg["model"]["seed"] == 1 and cfg["fake"]["wer"] == 0.7 and cfg["quiet"]
    harness = [c["class_path"] for c in cfg["trainer"]["callbacks"]]
    assert harness == ["lightning_fedprune.observers.summary.RunSummary", "lightning_fedprune.ablation.record.CellRecord"]
    assert cfg["trainer"]["logger"]["init_args"]["save_dir"] == str(cells[-1].dir) and "ckpt_path" not in cfg
    assert config_hash(cfg) != config_hash(grid.cell_config(cells[-2]))
    assert grid.statistics == Statistics() and grid.warm_start is None and grid.warm_cells() == []
    full = load_grid(path, full=True)
    assert full.seeds == [0, 1, 2, 3] and full.out == tmp_path / "full" and len(full.cells()) == 20
    bad = _write_grid(tmp_path, {"configurations": {"a": {}}, "findings": {"refinement": {"with": "a", "without": "b"}}})
    with pytest.raises(ValueError, match=r"not defined: \['b'\]"):
        load_grid(bad)
    with pytest.raises(ValueError, match="unknown keys"):
        load_grid(_write_grid(tmp_path, {"configurations": {"a": {}}, "sedes": [1]}))
    with pytest.raises(ValueError, match="no `full` section"):
        load_grid(_write_grid(tmp_path, {"configurations": {"a": {}}}), full=True)
    with pytest.raises(ValueError, match="defined twice"):
        load_grid(_write_grid(tmp_path, {"configurations": {"a_{x}": {"matrix": {"x": [1, 1]}}}}))


@pytest.mark.parametrize("section, message", [
    ({"seeds": [1, 2], "calibration_seeds": [2, 1000]}, r"`seeds` \[2\] are also `calibration_seeds`"),
    ({"seeds": [1, 1]}, "`seeds` lists a seed twice"),
    ({"statistics": {"margin": -0.01}}, "`statistics.margin` must be"),
    ({"statistics": {"alpha": 1.5}}, "`statistics.alpha` must be"),
    ({"statistics": {"marign": 0.01}}, r"statistics: unknown keys \['marign'\]"),
    ({"warm_start": {"rounds": 10}}, "`warm_start` must be a mapping"),
    ({"warm_start": {"rounds": 0, "configuration": "a"}}, "`warm_start.rounds` must be"),
    ({"warm_start": {"rounds": 5, "configuration": "zz"}}, "`warm_start.configuration` 'zz' is not a configuration"),
    ({"configurations": {"a": {"warm_start": "zz"}}, "warm_start": {"rounds": 5, "configuration": "a"}},
     "configurations.a.warm_start names 'zz'"),
    ({"configurations": {"a": {"warm_start": 3}}}, "`configurations.a.warm_start` must be"),
    ({"configurations": {"a": {"warm_start": "a"}}}, "configurations.a.warm_start needs the grid's `warm_start"),
    ({"configurations": {"a": {"sett": {}}}}, r"configurations.a: unknown keys \['sett'\]"),
    ({"planning": {"calibration": "nope.json", "target_mde": 0.01}}, "planning.calibration .* does not exist"),
    ({"full": {"sedes": [1]}}, r"unknown keys \['sedes'\] in `full`"),
    ({"findings": [1]}, "`findings` must be a mapping"),
])
def test_a_malformed_grid_file_is_refused_naming_the_key(tmp_path, section, message):
    grid = {"seeds": [0], "configurations": {"a": {}}, **section}
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        load_grid(_write_grid(tmp_path, grid))


def test_a_malformed_findings_spec_is_refused_naming_the_finding(tmp_path):
    grid = load_grid(_write_grid(tmp_path, {"configurations": {"a": {}, "b": {}},
                                             "findings": {"refinement": {"with": "a", "wihtout": "b"}}}))
    with pytest.raises(ValueError, match=r"findings.refinement: malformed spec \(KeyError"):
        analyse(grid)
    grid = load_grid(_write_grid(tmp_path, {"configurations": {"a": {}}, "findings": {"pruning": {"x": "a"}}}))
    with pytest.raises(ValueError, match="findings.pruning: unknown finding"):
        analyse(grid)


def test_warm_start_cells_configs_and_digests(tmp_path):
    grid = load_grid(_write_grid(tmp_path, {
        "seeds": [3, 4], "warm_start": {"rounds": 10, "configuration": "fp"},
        "configurations": {"fp": {}, "row": {"set": {"fake.wer": 0.2}}, "fd": {"warm_start": False},
                           "grad": {"warm_start": "grad"}, "wxg": {"warm_start": "grad"}}}))
    assert [c.key for c in grid.warm_cells()] == ["_warm_start:fp/seed3", "_warm_start:grad/seed3",
                                                  "_warm_start:fp/seed4", "_warm_start:grad/seed4"]
    row = next(c for c in grid.cells() if c.key == "row/seed4")
    warm = grid.warm_cell(row)
    assert warm.dir == tmp_path / "cells" / "_warm_start" / "fp" / "seed4"
    cfg = grid.cell_config(row)
    assert cfg["ckpt_path"] == str(warm.dir / "warm_start.ckpt") and cfg["model"]["resume_config_change"] == "apply"
    warm_cfg = grid.cell_config(warm)
    stop = warm_cfg["trainer"]["callbacks"][-1]
    assert stop["class_path"].endswith("WarmStartCheckpoint") and stop["init_args"]["round"] == 10
    assert warm_cfg["trainer"]["enable_checkpointing"] and "ckpt_path" not in warm_cfg and warm_cfg["fake"]["wer"] == 0.1
    assert grid.warm_cell(next(c for c in grid.cells() if c.configuration == "fd")) is None
    assert grid.warm_source("wxg") == "grad" and grid.warm_source("fd") is None
    # a cell's digest changes with its warm start's config
    before = grid.cell_digest(row)
    grid.configurations["fp"].overrides["fake.wer"] = 0.3
    assert grid.cell_digest(row) != before


# ---------------------------------------------------------------------------------------------- outcomes and rules
def _comp(outcome: str, within: bool = False, kind: str = "difference") -> dict:
    return {"outcome": outcome, "within_margin": within, "kind": kind}


@pytest.mark.parametrize("outcome, within, beats, loses, same", [
    (LOWER, False, SUPPORTED, CONTRADICTED, CONTRADICTED),
    (LOWER, True, CONTRADICTED, CONTRADICTED, SUPPORTED),  # a real difference smaller than the margin
    (HIGHER, False, CONTRADICTED, SUPPORTED, CONTRADICTED),
    (HIGHER, True, CONTRADICTED, CONTRADICTED, SUPPORTED),
    (EQUIVALENT, True, CONTRADICTED, CONTRADICTED, SUPPORTED),
    (UNDECIDED, False, NO_CONCLUSION, NO_CONCLUSION, NO_CONCLUSION),
    (INSUFFICIENT, False, NOT_RUN, NOT_RUN, NOT_RUN),
])
def test_claim_verdicts_follow_the_outcomes(outcome, within, beats, loses, same):
    c = _comp(outcome, within)
    assert (A.beats(c), A.loses(c), A.same(c)) == (beats, loses, same)


def test_stability_and_combinations():
    assert A.stabler(_comp(LOWER, kind="variance")) == SUPPORTED
    assert A.stabler(_comp(HIGHER, kind="variance")) == CONTRADICTED
    assert A.stabler(_comp(UNDECIDED, kind="variance")) == NO_CONCLUSION
    assert A.all_of([SUPPORTED, SUPPORTED]) == SUPPORTED and A.all_of([SUPPORTED, NO_CONCLUSION]) == NO_CONCLUSION
    assert A.all_of([NO_CONCLUSION, CONTRADICTED]) == CONTRADICTED and A.all_of([SUPPORTED, NOT_RUN]) == NOT_RUN
    assert A.any_of([NO_CONCLUSION, SUPPORTED]) == SUPPORTED and A.any_of([CONTRADICTED, CONTRADICTED]) == CONTRADICTED
    assert A.any_of([CONTRADICTED, NO_CONCLUSION]) == NO_CONCLUSION and A.any_of([]) == NOT_RUN


def _summary(**values):
    """name -> a configuration summary with those per-seed values (seeds 0, 1, ...; None: a failed seed)."""
    out = {}
    for name, vals in values.items():
        seeds = [s for s, v in enumerate(vals) if v is not None]
        out[name] = {"values": [vals[s] for s in seeds], "value_seeds": seeds}
    return out


SEED_EFFECT = [0.05, 0.20, 0.10, 0.30, 0.08, 0.15, 0.12, 0.25, 0.06, 0.18]  # a plateau that breaks late or early
JITTER = [0.002, -0.001, 0.0005, -0.002, 0.001, 0.0, -0.0015, 0.0025, -0.0005, 0.001]


def _shift(delta: float, jitter: float = 1.0) -> list[float]:
    return [s + delta + jitter * j for s, j in zip(SEED_EFFECT, JITTER)]


def _tested(planned: list[Planned], summary: dict, st: Statistics | None = None) -> dict[str, dict]:
    st = st or Statistics()
    comps = [A.paired_comparison(p, summary, st) for p in planned]
    A.adjust(comps, st)
    return {c["id"]: c for c in comps}


def test_outcomes_are_paired_holm_adjusted_and_state_the_mde():
    """A steady per-seed difference of 0.03 is significant although the seeds spread 0.05-0.30; a difference of
    0.001 is equivalent within ±0.01; noisy differences give no conclusion with the MDE; Holm's m counts both
    tests of every comparison."""
    noisy = [s + d for s, d in zip(SEED_EFFECT, [0.04, -0.03, 0.05, -0.04, 0.03, -0.05, 0.02, -0.02, 0.06, -0.01])]
    summary = _summary(ref=_shift(0.0), better=_shift(-0.03, 2.0), same=_shift(0.001, 1.5), noisy=noisy,
                       few=[0.1, None, None, None, None, None, None, None, None, None])
    planned = [Planned("x", "better", "ref"), Planned("x", "same", "ref"), Planned("x", "noisy", "ref"),
               Planned("x", "few", "ref")]
    by_id = _tested(planned, summary)
    better, same, noisy_c, few = (by_id[p.id] for p in planned)
    assert better["outcome"] == LOWER and not better["within_margin"] and better["n"] == 10
    assert better["mean"] == pytest.approx(-0.03 + sum(JITTER) / 10) and better["ci_high"] < 0
    assert same["outcome"] in (EQUIVALENT, HIGHER) and same["within_margin"]
    assert noisy_c["outcome"] == UNDECIDED and noisy_c["mde"] > abs(noisy_c["mean"])
    assert few["outcome"] == INSUFFICIENT
    assert better["tests_on_page"] == 6 and better["mde_alpha"] == pytest.approx(0.05 / 6)
    assert better["p_difference_holm"] >= better["p_difference"]
    # unpaired, the seed spread would hide the difference: the paired test is what finds it
    from scipy import stats

    assert stats.ttest_ind(summary["better"]["values"], summary["ref"]["values"]).pvalue > 0.3


def test_judge_each_finding_from_designed_data():
    summary = _summary(w=_shift(0.0), g=_shift(0.001, 1.5), x=[v + 0.5 * (v - 0.15) for v in _shift(0.0, 3.0)],
                       u=_shift(0.0), p=_shift(-0.04, 2.0), gl=_shift(0.0, 2.5),
                       c=_shift(0.0), h=_shift(0.02, 2.0), r=_shift(0.05, 2.0),
                       c3=_shift(0.0), c5=_shift(0.03, 2.0), c7=_shift(0.08, 2.0),
                       r3=_shift(0.0), r5=_shift(0.002, 1.2), r7=_shift(0.001, 2.2), d=_shift(-0.01, 2.0),
                       with_=_shift(0.0), without=_shift(0.0005, 1.3))
    findings = {
        "importance": {"reference": "w", "alternatives": {"gradient": "g", "wxg": "x"}},
        "adaptive": {"uniform": "u", "adaptive": {"power": "p", "global": "gl"}},
        "patterns": {"column": "c", "half_column": "h", "row": "r"},
        "sparsity": {"dense": "d", "threshold": 0.3, "curves": {"column": {0.3: "c3", 0.5: "c5", 0.7: "c7"},
                                                                "row": {0.3: "r3", 0.5: "r5", 0.7: "r7"}}},
        "refinement": {"with": "with_", "without": "without"},
    }
    by_id = _tested(A.planned_comparisons(findings, {}), summary)
    verdicts = {k: A.judge(k, spec, by_id) for k, spec in findings.items()}
    importance = {c["claim"].split(" ")[0]: c["verdict"] for c in verdicts["importance"]["claims"]}
    assert importance == {"same": NO_CONCLUSION, "more": NO_CONCLUSION} or importance["same"] != SUPPORTED
    assert verdicts["importance"]["claims"][1]["verdict"] in (NO_CONCLUSION, SUPPORTED)
    assert verdicts["adaptive"]["verdict"] == SUPPORTED  # power beats uniform by 0.04
    assert [c["verdict"] for c in verdicts["patterns"]["claims"]] == [SUPPORTED, SUPPORTED, SUPPORTED]
    assert verdicts["patterns"]["verdict"] == SUPPORTED
    sparsity = [c["verdict"] for c in verdicts["sparsity"]["claims"]]
    assert sparsity == [SUPPORTED, CONTRADICTED]  # column rises at 0.5; row stays within the margin up to 0.7
    assert verdicts["sparsity"]["verdict"] == CONTRADICTED
    assert verdicts["refinement"]["verdict"] == CONTRADICTED  # equivalent: no gain of the margin's size


def test_more_stable_needs_a_significant_variance_test():
    """Weight varies half as much as the alternative over the seeds: Pitman–Morgan finds it; equal spreads
    give no conclusion (what the former rule called "confirmed" on the order of three standard deviations)."""
    wide = [0.15 + 2.0 * (v - 0.15) for v in _shift(0.0)]
    summary = _summary(w=_shift(0.0), wide=wide, twin=_shift(0.002, 3.0))
    spec = {"reference": "w", "alternatives": {"wide": "wide", "twin": "twin"}}
    by_id = _tested(A.planned_comparisons({"importance": spec}, {}), summary)
    stable = A.judge("importance", spec, by_id)["claims"][1]
    comps = [by_id[i] for i in stable["comparisons"]]
    assert comps[0]["outcome"] == LOWER and comps[0]["ratio"] == pytest.approx(0.25, rel=0.05)
    assert comps[1]["outcome"] == UNDECIDED and stable["verdict"] == NO_CONCLUSION


# ---------------------------------------------------------------------------------------------- the runner
FAKE_GRID = {
    "name": "fake",
    "seeds": list(range(10, 20)),
    "calibration_seeds": [0, 1, 2],
    "statistics": {"alpha": 0.05, "margin": 0.01, "power": 0.8},
    "warm_start": {"rounds": 10, "configuration": "fp"},
    "description": "A fake setting for the tests.",
    "set": {"fake.record": "new", "fake.spread": 0.01, "fake.noise": 0.001},
    "configurations": {
        "fp": {"label": "FP", "set": {"fake.wer": 0.10}},
        "grad": {"set": {"fake.wer": 0.1005}, "warm_start": "grad"},
        "wxg": {"set": {"fake.wer": 0.13}, "warm_start": "grad"},
        "power": {"set": {"fake.wer": 0.10, "fake.layer_spread": 0.2}},
        "global": {"set": {"fake.wer": 0.05, "fake.layer_spread": 0.1}},
        "row": {"set": {"fake.wer": 0.30}},
        "half_column": {"set": {"fake.wer": 0.13}},
        "col_0.3": {"set": {"fake.wer": 0.05, "fake.sparsity": 0.3}},
        "col_0.7": {"set": {"fake.wer": 0.3, "fake.sparsity": 0.7}},
        "row_{s}": {"matrix": {"s": [0.1, 0.6]}, "set": {"fake.wer": "{s}", "fake.sparsity": "{s}"}},
        "norefine": {"set": {"fake.wer": 0.105}},
        "dense": {"set": {"fake.wer": 0.02, "fake.sparsity": 0.0}},
        "fd": {"warm_start": False, "set": {"fake.wer": 0.15, "fake.sparsity": 0.0, "fake.record": "old"}},
    },
    "findings": {
        "importance": {"reference": "fp", "alternatives": {"gradient_l2": "grad", "weight_x_gradient": "wxg"}},
        "adaptive": {"uniform": "fp", "adaptive": {"power": "power", "global": "global"}},
        "patterns": {"column": "fp", "half_column": "half_column", "row": "row"},
        "sparsity": {"dense": "dense", "threshold": 0.3, "curves": {"column": {0.3: "col_0.3", 0.5: "fp", 0.7: "col_0.7"},
                                                                    "row": {0.3: "row_0.1", 0.5: "row", 0.7: "row_0.6"}}},
        "refinement": {"with": "fp", "without": "norefine"},
    },
    "baselines": {"reference": "fp", "others": {"dense FedAvg": "dense", "Federated Dropout": "fd"}},
}
N_CELLS = 14 * 10


@pytest.fixture()
def fast_poll(monkeypatch):
    monkeypatch.setattr(R, "POLL_S", 0.02)


@pytest.fixture(scope="module")
def fake_run(tmp_path_factory):
    """The fake grid run once (140 cells and 20 warm starts of the fake `fedprune fit`), shared by the tests
    that only read it; the tests that change it copy it first."""
    tmp_path = tmp_path_factory.mktemp("fake")
    R.POLL_S, saved = 0.02, R.POLL_S
    try:
        grid = load_grid(_write_grid(tmp_path, FAKE_GRID))
        lines: list[str] = []
        stats = GridRunner(grid, jobs=6, print_fn=lines.append, fit_command=FAKE_FIT).run(RunStats("now", 6, "test"))
    finally:
        R.POLL_S = saved
    return tmp_path, grid, stats, lines


def test_runner_runs_warm_starts_first_in_parallel_and_resumes(fake_run, fast_poll):
    _, grid, stats, lines = fake_run
    assert stats.cells_run == N_CELLS and stats.warm_starts_run == 20 and stats.cells_failed == 0
    assert f"{N_CELLS} cells (14 configurations x 10 seeds), 0 finished before, {N_CELLS} to run after 20 warm " \
           "start(s) with 6 job(s)" in lines[0]
    progress = lines[1:]
    assert len(progress) == N_CELLS + 20 and all(" left, ~" in line and "to go" in line for line in progress)
    # every cell started after its warm start had finished (fake_fit fails without the checkpoint)
    for cell in grid.cells():
        info = json.loads((cell.dir / "cell.json").read_text())
        warm = grid.warm_cell(cell)
        if warm is not None:
            warm_info = json.loads((warm.dir / "cell.json").read_text())
            assert warm_info["started"] + warm_info["seconds"] <= info["started"] + 0.5
        assert info["machine"]["cores"] >= 1
    # resumable: nothing runs again
    lines2: list[str] = []
    again = GridRunner(grid, jobs=4, print_fn=lines2.append, fit_command=FAKE_FIT).run(RunStats("now", 4, "test"))
    assert again.cells_run == 0 and again.warm_starts_run == 0 and again.cells_skipped == N_CELLS and len(lines2) == 1


def test_analysis_of_the_fake_grid(fake_run):
    _, grid, _, _ = fake_run
    results = analyse(grid)
    assert results["seeds"] == {"grid": list(range(10, 20)), "calibration": [0, 1, 2]}
    assert results["warm_start"] == {"rounds": 10, "configuration": "fp"}
    verdicts = {f["key"]: f["verdict"] for f in results["findings"]}
    assert verdicts["patterns"] == SUPPORTED and verdicts["sparsity"] == SUPPORTED
    assert verdicts["refinement"] == CONTRADICTED  # 0.005 apart, within the ±0.01 margin: equivalent
    assert verdicts["adaptive"] == SUPPORTED  # global 0.05 below uniform
    fp = results["configurations"]["fp"]
    assert fp["n"] == 10 and fp["mean"] == pytest.approx(0.10 + 0.01 * 13.5, abs=0.002)
    assert fp["ci_low"] < fp["mean"] < fp["ci_high"]
    assert fp["eval_utterances"] == [960] and fp["eval_words"] == [2890] and fp["refinement_flips_mean"] == 40
    assert results["configurations"]["power"]["layer_sparsity_spread"] == pytest.approx(0.2)
    cell = next(c for c in results["cells"] if c["configuration"] == "fp" and c["seed"] == 10)
    # the warm start's 10 rounds and the cell's 20 joined: bytes per client and round over all 30
    assert [r for r, _ in cell["loss_curve"]] == list(range(30)) and cell["bytes_per_client_round_mean"] == 1.5e6
    assert cell["warm_start"]["configuration"] == "fp" and cell["wer_curve"][-1][0] == 30
    old = next(c for c in results["cells"] if c["configuration"] == "fd")  # an old-format record
    assert old["loss_curve"] is None and old["eval_utterances"] is None and old["warm_start"] is None
    assert results["configurations"]["fd"]["eval_utterances"] == []
    m = results["statistics"]["tests_on_page"]
    assert m == results["statistics"]["tests_planned"]
    assert m == sum(2 if c["kind"] == "difference" else 1 for c in results["comparisons"])
    assert all(c["tests_on_page"] == m for c in results["comparisons"])


def test_a_failed_warm_start_fails_its_cells_and_both_run_again(tmp_path, fast_poll):
    grid = load_grid(_write_grid(tmp_path, {
        "seeds": [0], "warm_start": {"rounds": 10, "configuration": "a"},
        "configurations": {"a": {"set": {"fake.fail_warm": True}}, "b": {}, "c": {"warm_start": False}}}))
    lines: list[str] = []
    stats = GridRunner(grid, jobs=2, print_fn=lines.append, fit_command=FAKE_FIT).run(RunStats("now", 2, "test"))
    assert stats.cells_run == 1 and stats.cells_failed == 2 and stats.warm_starts_run == 0
    assert any("b/seed0" in line and "its warm start _warm_start:a/seed0 failed" in line for line in lines)
    cells = {c["configuration"]: c for c in analyse(grid)["cells"]}
    assert cells["c"]["status"] == "done" and cells["b"]["status"] == "failed"
    assert cells["b"]["error"] == "its warm start _warm_start:a/seed0 failed"
    again = GridRunner(grid, jobs=2, print_fn=lines.append, fit_command=FAKE_FIT).run(RunStats("now", 2, "test"))
    assert again.cells_skipped == 1 and again.cells_failed == 2


def test_failed_and_timed_out_cells_are_reported_and_run_again(tmp_path, fast_poll):
    grid = load_grid(_write_grid(tmp_path, {
        "seeds": [0], "configurations": {"ok": {}, "bad": {"set": {"fake.fail": True}},
                                         "slow": {"set": {"fake.sleep": 30}}}}))
    lines: list[str] = []
    stats = GridRunner(grid, jobs=3, cell_timeout=2.0, print_fn=lines.append, fit_command=FAKE_FIT).run(
        RunStats("now", 3, "test"))
    assert stats.cells_run == 1 and stats.cells_failed == 2
    cells = {c["configuration"]: c for c in analyse(grid)["cells"]}
    assert cells["ok"]["status"] == "done" and cells["bad"]["status"] == cells["slow"]["status"] == "failed"
    assert cells["bad"]["error"] == "exit code 1" and cells["slow"]["error"] == "timed out after 2 s"
    assert "fake failure" in json.loads((grid.out / "bad" / "seed0" / "cell.json").read_text())["error"]
    assert any("FAILED" in line and "bad/seed0" in line for line in lines)
    again = GridRunner(grid, jobs=3, cell_timeout=2.0, print_fn=lines.append, fit_command=FAKE_FIT).run(
        RunStats("now", 3, "test"))
    assert again.cells_skipped == 1 and again.cells_failed == 2  # failed cells are not "finished"


def test_the_run_is_recorded_after_every_cell_so_a_killed_run_keeps_its_record(tmp_path, fast_poll, monkeypatch):
    """A grid killed outright (no Ctrl-C, no SIGTERM: e.g. the machine taken away) still has its run on the page,
    counted to its last finished cell."""
    import lightning_fedprune.ablation.command as C

    path = _write_grid(tmp_path, {"seeds": [0, 1], "configurations": {"a": {}, "b": {}}})
    grid = load_grid(path)
    monkeypatch.setattr(GridRunner, "__init__", _with_fake_fit(GridRunner.__init__))
    written: list[list[dict]] = []
    write = C._write_json

    def spy(target, value):
        if Path(target).name == "runs.json":
            written.append(json.loads(json.dumps(value["runs"])))
        write(target, value)

    monkeypatch.setattr(C, "_write_json", spy)
    assert ablate_main(["--config", str(path), "--jobs", "1"]) == 0
    assert [w[-1]["cells_run"] for w in written] == [1, 2, 3, 4, 4]  # after each cell, then at the end
    assert all(not w[-1]["finished"] for w in written[:-1]) and written[-1][-1]["finished"]
    assert written[1][-1]["wall_seconds"] > 0 and written[1][-1]["machine"]["cores"] >= 1
    # as if killed after the second cell: the record written then is what the next page shows
    (grid.out / "runs.json").write_text(json.dumps({"runs": written[1]}))
    assert ablate_main(["--config", str(path), "--report_only"]) == 0
    page = (tmp_path / "page.md").read_text()
    assert "(stopped before it finished: counted to its last finished cell)" in page
    assert "| 2 / 0 / 0 (0) |" in page


def test_sigterm_interrupts_the_grid_like_ctrl_c(tmp_path, fast_poll, monkeypatch):
    import os
    import signal
    import threading

    path = _write_grid(tmp_path, {"seeds": [0], "configurations": {"ok": {}, "slow": {"set": {"fake.sleep": 30}}}})
    grid = load_grid(path)
    monkeypatch.setattr(GridRunner, "__init__", _with_fake_fit(GridRunner.__init__))
    before = signal.getsignal(signal.SIGTERM)
    timer = threading.Timer(3.0, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    try:
        assert ablate_main(["--config", str(path), "--jobs", "2"]) == 130
    finally:
        timer.cancel()
    assert signal.getsignal(signal.SIGTERM) == before
    run = json.loads((grid.out / "runs.json").read_text())["runs"][-1]
    assert run["interrupted"] and run["cells_run"] == 1 and run["finished"]
    assert json.loads((grid.out / "slow" / "seed0" / "cell.json").read_text())["status"] == "interrupted"
    assert "min (interrupted) |" in (tmp_path / "page.md").read_text()


def _with_fake_fit(init):
    def patched(self, *args, **kwargs):
        init(self, *args, **{**kwargs, "fit_command": FAKE_FIT})

    return patched


README = "# Project\n\nIntro.\n\n{begin}\nhand-written claims\n{end}\n\nMore text.\n"


def test_page_figure_and_readme_block_from_a_partial_grid_then_the_whole(tmp_path, fast_poll, monkeypatch, capsys):
    readme = tmp_path / "README.md"
    readme.write_text(README.format(begin=README_BEGIN.format(name="fake"), end=README_END.format(name="fake")))
    small = {**FAKE_GRID, "seeds": [10, 11, 12], "readme": str(readme)}
    path = _write_grid(tmp_path, small)
    grid = load_grid(path)
    # only seed 10 of every configuration and seed 11 of one: the verdicts wait, the page still renders
    GridRunner(grid, jobs=4, print_fn=lambda _: None, fit_command=FAKE_FIT, only="seed10").run(RunStats("now", 4, "t"))
    GridRunner(grid, jobs=4, print_fn=lambda _: None, fit_command=FAKE_FIT, only="fp/seed11").run(RunStats("now", 4, "t"))
    assert ablate_main(["--config", str(path), "--report_only"]) == 0
    page = (tmp_path / "page.md").read_text()
    results = json.loads((tmp_path / "page.json").read_text())
    assert all(f["verdict"] == NOT_RUN for f in results["findings"])
    assert "*not run yet*" in page and "## Missing cells" in page and "`grad/seed11`" in page
    assert "| `fp`: FP | 0.195 ± 0.007 [0.136, 0.254] (2/3) | 1.50 MB | 450 k | 0.50 | 960 (2890) |" in page
    assert "A fake setting for the tests." in page and "## Where this setting differs from the article's" in page
    assert "## Rows and columns" in page and "input feature" in page and "TensorFlow/Lingvo" in page
    assert "calibration): [0, 1, 2]" in page and "Holm–Bonferroni over every p-value on this page" in page
    assert (tmp_path / "fig.png").stat().st_size > 10_000 and "![" in page
    assert len(results["missing"]) == 42 - 15
    block = readme.read_text()
    assert "hand-written claims" not in block and "Intro." in block and "More text." in block
    assert "finding 4: not run" in block
    # the rest of the grid through the command line: every verdict now, the run recorded on the page
    monkeypatch.setattr(GridRunner, "__init__", _with_fake_fit(GridRunner.__init__))
    cli_main(["ablate", "--config", str(path), "--jobs", "4", "--only", "grad/"])  # returns: no cell failed
    assert ablate_main(["--config", str(path), "--jobs", "4"]) == 0
    out = capsys.readouterr().out
    assert "finding 3: supported" in out and f"the fake block of {readme}" in out
    page = (tmp_path / "page.md").read_text()
    assert "## Missing cells" not in page and "**supported**" in page and "| 4 |" in page
    assert "Pitman–Morgan" in page and "TOST ±0.01" in page and "MDE" in page and "bytes per client and round" in page
    runs = json.loads((grid.out / "runs.json").read_text())["runs"]
    assert [r["cells_run"] for r in runs] == [2, 25] and all(r["load"] for r in runs)
    assert "Total wall time of the runs" in page and runs[-1]["machine"]["cores"] >= 1
    results = json.loads((tmp_path / "page.json").read_text())
    assert readme_block(results, "page.md") in readme.read_text()


def test_report_only_regenerates_from_results_json_without_the_cells(fake_run, tmp_path):
    """Cells copied to another folder stay finished (their hash does not depend on where they lie); and a fresh
    checkout has results.json but no cells: --report_only then renders the same verdicts and README block from
    results.json."""
    src, _, _, _ = fake_run
    shutil.copytree(src / "cells", tmp_path / "cells")
    readme = tmp_path / "README.md"
    readme.write_text(README.format(begin=README_BEGIN.format(name="fake"), end=README_END.format(name="fake")))
    path = _write_grid(tmp_path, {**FAKE_GRID, "readme": str(readme)})
    assert ablate_main(["--config", str(path), "--report_only"]) == 0
    first = json.loads((tmp_path / "page.json").read_text())
    assert first["missing"] == [] and "hand-written" not in readme.read_text()
    block = readme.read_text()
    shutil.rmtree(tmp_path / "cells")
    readme.write_text(README.format(begin=README_BEGIN.format(name="fake"), end=README_END.format(name="fake")))
    assert ablate_main(["--config", str(path), "--report_only"]) == 0
    second = json.loads((tmp_path / "page.json").read_text())
    assert second["missing"] == [] and second["comparisons"] == first["comparisons"]
    assert readme.read_text() == block
    # a changed configuration: its cells in results.json are stale, not reused
    changed = _write_grid(tmp_path, {**FAKE_GRID, "readme": str(readme),
                                     "configurations": {**FAKE_GRID["configurations"], "row": {"set": {"fake.wer": 0.2}}}})
    assert ablate_main(["--config", str(changed), "--report_only"]) == 0
    third = json.loads((tmp_path / "page.json").read_text())
    assert sorted(m for m in third["missing"]) == sorted(f"row/seed{s}" for s in range(10, 20))


@pytest.mark.parametrize("results_file", ["results.json", "results_full.json"])
def test_the_committed_readme_block_is_generated_from_the_committed_results(results_file):
    """README.md's paragraph about the findings is the block `fedprune ablate` writes from docs/results.json
    (and docs/results_full.json): no verdict in it is written by hand."""
    results = json.loads((REPO / "docs" / results_file).read_text())
    readme = (REPO / "README.md").read_text()
    name = results["grid"]
    begin, end = README_BEGIN.format(name=name), README_END.format(name=name)
    assert begin in readme and end in readme, f"README.md lacks the generated {name} results block"
    inside = readme.split(begin, 1)[1].split(end, 1)[0].strip()
    assert inside == readme_block(results, "docs/" + results_file.replace(".json", ".md"))
    for word in ("confirmed", "clearly", "indistinguishable"):
        assert word not in inside


# ---------------------------------------------------------------------------------------------- the shipped grids
def test_the_shipped_grids_expand_and_state_their_tests_and_seeds():
    """examples/ablation/grid.yaml: the default and --full grids load, every name the findings use exists, the
    seeds are fresh, the statistics are stated, Federated Dropout and PruneFL act on the same weights as Federated
    Pruning (the base config's ramp), and the held-out set has at least 900 utterances."""
    path = REPO / "examples" / "ablation" / "grid.yaml"
    default, full = load_grid(path), load_grid(path, full=True)
    for grid in (default, full):
        assert len(grid.seeds) >= 10 and not set(grid.seeds) & set(grid.calibration_seeds)
        assert grid.statistics.margin > 0 and grid.warm_start is not None and grid.planning
        cfg = {c.configuration: grid.cell_config(c) for c in grid.cells() if c.seed == grid.seeds[0]}
        ref = cfg[grid.baselines["reference"]]
        ramp = next(c for c in ref["trainer"]["callbacks"] if c["class_path"].endswith("SparsityRampCallback"))
        targets = ramp["init_args"]["parameters"]
        assert cfg["federated_dropout"]["model"]["strategy"]["init_args"]["parameters"] == targets
        prunefl = next(c for c in cfg["prunefl"]["trainer"]["callbacks"] if c["class_path"].endswith("PruneFL"))
        assert prunefl["init_args"]["parameters"] == targets
        corpus = ref["data"]["init_args"]["corpus"]
        assert corpus["test_speakers"] * corpus["test_utterances_per_speaker"] >= 900
        assert ref["trainer"]["val_check_interval"] == ref["trainer"]["max_steps"]  # evaluated once, at the end
    assert set(default.configurations) < set(full.configurations) and len(full.seeds) > len(default.seeds)
    assert set(default.findings) == {"sparsity", "refinement"}
    assert set(full.findings) == {"importance", "adaptive", "patterns", "sparsity", "refinement"}
    assert default.readme == Path("README.md") and full.readme == Path("README.md") and default.name != full.name


def test_the_pilot_runs_the_grids_baselines_and_allocations():
    """examples/ablation/pilot.yaml (the numbers in docs/ablation.md): its baselines and adaptive allocations are
    the cells the grids run, on calibration seeds only."""
    path = REPO / "examples" / "ablation"
    pilot, grid, full = (load_grid(path / "pilot.yaml"), load_grid(path / "grid.yaml"),
                         load_grid(path / "grid.yaml", full=True))
    assert set(pilot.seeds) <= set(grid.calibration_seeds)

    def config(g, name):  # what the cell trains: the model, the data, the pruning callbacks (no seeds, no paths)
        cfg = g.cell_config(next(c for c in g.cells() if c.configuration == name))
        model = {k: v for k, v in cfg["model"].items() if k != "seed"}
        callbacks = [c for c in cfg["trainer"]["callbacks"] if c["class_path"].rpartition(".")[2] not in HARNESS_CALLBACKS]
        trainer = {k: v for k, v in cfg["trainer"].items() if k not in ("callbacks", "logger", "default_root_dir")}
        return model, cfg["data"], callbacks, trainer

    for name in ("federated_dropout", "prunefl", "column_0.5"):
        assert config(pilot, name) == config(grid, name), name
    assert config(pilot, "adaptive_power_t1") == config(full, "column_0.5_adaptive_power")
    assert config(pilot, "adaptive_global") == config(full, "column_0.5_adaptive_global")


# ---------------------------------------------------------------------------------------------- the smoke grid
def test_smoke_grid_runs_real_cells_end_to_end_and_resumes(tmp_path, monkeypatch, capsys):
    """3 real `fedprune fit` cells at toy size -- a warm start, Federated Pruning resumed from it and Federated
    Dropout from round 0 --, in parallel."""
    pytest.importorskip("torchaudio")
    monkeypatch.setenv("FEDPRUNE_CACHE", str(tmp_path / "cache"))
    args = ["--config", str(REPO / "examples" / "ablation" / "smoke.yaml"), "--jobs", "2", "--out", str(tmp_path / "cells"),
            "--page", str(tmp_path / "results.md"), "--figure", str(tmp_path / "results.png")]
    assert ablate_main(args) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    cells = {c["configuration"]: c for c in results["cells"] if c["seed"] == 0}
    assert {c["status"] for c in cells.values()} == {"done"}
    for name in ("fp", "fd"):
        assert 0 <= cells[name]["metric"] <= 1.5
        assert cells[name]["client_params_final"] < cells[name]["total_params"]
        assert cells[name]["bytes_per_client_round_mean"] < cells[name]["dense_bytes_per_client_round"]
        assert cells[name]["eval_utterances"] == 4 and len(cells[name]["loss_curve"]) == 4
    assert cells["fp"]["sparsity"] == pytest.approx(0.3, abs=0.02) and cells["fd"]["sparsity"] == 0.0
    assert cells["fp"]["warm_start"]["rounds"] == 1 and cells["fd"]["warm_start"] is None
    assert set(cells["fp"]["layer_sparsity"]) and cells["fp"]["weights_sha256"]
    config = yaml.safe_load((tmp_path / "cells" / "fd" / "seed0" / "config.yaml").read_text())
    assert config["model"]["strategy"]["class_path"] == "lightning_fedprune.baselines.FederatedDropout"
    assert (tmp_path / "cells" / "fp" / "seed0" / "logs").is_dir()  # its own log dir
    page = (tmp_path / "results.md").read_text()
    assert "## Baselines in the same harness" in page and (tmp_path / "results.png").is_file()
    before = (tmp_path / "cells" / "fp" / "seed0" / "summary.json").stat().st_mtime_ns
    capsys.readouterr()
    assert ablate_main(args) == 0  # resumable: both cells are finished
    assert "2 finished before, 0 to run" in capsys.readouterr().out
    assert (tmp_path / "cells" / "fp" / "seed0" / "summary.json").stat().st_mtime_ns == before
    assert math.isfinite(results["configurations"]["fp"]["mean"])
