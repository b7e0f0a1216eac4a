"""`fedprune ablate`: grid expansion and overrides, the runner (parallel, resumable, failures, timeouts,
progress), the verdict rules, the page and figure from partial grids, and the smoke grid end to end."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from lightning_fedprune.ablation import analysis as A
from lightning_fedprune.ablation import runner as R
from lightning_fedprune.ablation.analysis import CONFIRMED, INCONCLUSIVE, NOT_RUN, REFUTED, Stat, analyse
from lightning_fedprune.ablation.command import ablate_main
from lightning_fedprune.ablation.grid import apply_overrides, config_hash, load_grid
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


def _write_grid(tmp_path: Path, grid: dict, base: dict | None = None) -> Path:
    base = base if base is not None else {"fake": {"wer": 0.1}, "trainer": {"callbacks": []}}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    grid = {"base": "base.yaml", "out": str(tmp_path / "cells"), "page": str(tmp_path / "page.md"),
            "figure": str(tmp_path / "fig.png"), **grid}
    path = tmp_path / "grid.yaml"
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
    assert cfg["trainer"]["logger"]["init_args"]["save_dir"] == str(cells[-1].dir)
    assert config_hash(cfg) != config_hash(grid.cell_config(cells[-2]))
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


# ---------------------------------------------------------------------------------------------- verdict rules
def _summary(**values):
    """name -> a configuration summary with those per-seed values (None marks a failed seed)."""
    out = {}
    for name, vals in values.items():
        ok = tuple(v for v in vals if v is not None)
        stat = Stat(ok, failed=len(vals) - len(ok))
        out[name] = {"values": list(ok), "failed": stat.failed, "n": stat.n, "std": stat.std, "mean": stat.mean}
    return out


LOW, MID, HIGH, WIDE = (0.09, 0.10, 0.11), (0.19, 0.20, 0.21), (0.39, 0.40, 0.41), (0.05, 0.20, 0.35)


@pytest.mark.parametrize("values, verdict", [
    (dict(w=LOW, g=(0.08, 0.12, 0.14), x=(0.17, 0.20, 0.23)), CONFIRMED),  # same or worse, and weight the most stable
    (dict(w=MID, g=LOW, x=MID), REFUTED),  # gradient clearly better
    (dict(w=(0.05, 0.10, 0.15), g=LOW, x=(0.09, 0.11, 0.13)), INCONCLUSIVE),  # not the most stable
    (dict(w=(0.1, 0.1, None), g=LOW, x=LOW), INCONCLUSIVE),  # a failed seed counts as unstable
    (dict(w=(0.1,), g=LOW, x=LOW), NOT_RUN),
])
def test_importance_rule(values, verdict):
    spec = {"reference": "w", "alternatives": {"gradient": "g", "wxg": "x"}}
    assert A.finding_importance(spec, _summary(**values), 0.005)["verdict"] == verdict


@pytest.mark.parametrize("values, verdict, winners", [
    (dict(u=MID, p=MID, g=LOW), CONFIRMED, ["g"]),
    (dict(u=LOW, p=MID, g=HIGH), REFUTED, []),
    (dict(u=LOW, p=LOW, g=HIGH), INCONCLUSIVE, []),
])
def test_adaptive_rule(values, verdict, winners):
    result = A.finding_adaptive({"uniform": "u", "adaptive": {"power": "p", "global": "g"}}, _summary(**values), 0.005)
    assert result["verdict"] == verdict and result["beats_uniform"] == winners


@pytest.mark.parametrize("values, verdict", [
    (dict(c=LOW, h=MID, r=HIGH, u=MID), CONFIRMED),
    (dict(c=LOW, h=LOW, r=WIDE, u=MID), INCONCLUSIVE),  # row not clearly worse
    (dict(c=MID, h=HIGH, r=LOW, u=MID), REFUTED),  # row beats both
    (dict(c=MID, h=MID, r=HIGH, u=LOW), REFUTED),  # another pattern beats column
])
def test_patterns_rule(values, verdict):
    spec = {"column": "c", "half_column": "h", "row": "r", "others": {"unstructured": "u"}}
    assert A.finding_patterns(spec, _summary(**values), 0.005)["verdict"] == verdict


@pytest.mark.parametrize("values, verdict", [
    (dict(c3=LOW, c5=MID, c7=HIGH, r3=LOW, r5=MID, r7=HIGH, d=LOW), CONFIRMED),
    (dict(c3=LOW, c5=LOW, c7=HIGH, r3=LOW, r5=MID, r7=HIGH, d=LOW), INCONCLUSIVE),  # column rises only at 0.7
    (dict(c3=LOW, c5=LOW, c7=LOW, r3=LOW, r5=MID, r7=HIGH, d=LOW), REFUTED),  # column never rises
    (dict(c3=LOW, c5=LOW, c7=LOW, r3=LOW, r5=MID, r7=(0.4,), d=LOW), NOT_RUN),
])
def test_sparsity_rule(values, verdict):
    spec = {"dense": "d", "threshold": 0.3, "curves": {"column": {0.3: "c3", 0.5: "c5", 0.7: "c7"},
                                                     "row": {0.3: "r3", 0.5: "r5", 0.7: "r7"}}}
    assert A.finding_sparsity(spec, _summary(**values), 0.005)["verdict"] == verdict


@pytest.mark.parametrize("values, verdict", [(dict(a=LOW, b=MID), CONFIRMED), (dict(a=MID, b=LOW), REFUTED),
                                             (dict(a=LOW, b=LOW), INCONCLUSIVE), (dict(a=LOW, b=(0.1,)), NOT_RUN)])
def test_refinement_rule(values, verdict):
    assert A.finding_refinement({"with": "a", "without": "b"}, _summary(**values), 0.005)["verdict"] == verdict


def test_comparisons_are_paired_by_seed():
    """A seed that trains fast helps every configuration alike: a steady per-seed difference is clear even
    when the seeds spread far more than it (an unpaired comparison of means could not tell)."""
    a = Stat((0.05, 0.15, 0.30), seeds=(0, 1, 2))
    b = Stat((0.07, 0.18, 0.32), seeds=(0, 1, 2))
    result = A.compare(a, b)
    assert result["outcome"] == A.LOWER and result["seeds"] == [0, 1, 2]
    assert result["difference"] == pytest.approx(-0.07 / 3)
    # only the seeds both have count; values are matched by seed, not by position
    c = Stat((0.32, 0.07), seeds=(2, 0))
    assert A.compare(a, c)["seeds"] == [0, 2] and A.compare(a, c)["difference"] == pytest.approx(-0.02)
    assert A.compare(a, Stat((0.2,), seeds=(1,)))["outcome"] == A.INSUFFICIENT


def test_the_difference_floor_applies_when_seeds_agree_exactly():
    assert A.compare(Stat((0.100, 0.100)), Stat((0.103, 0.103)), 0.005)["outcome"] == A.SAME
    assert A.compare(Stat((0.100, 0.100)), Stat((0.106, 0.106)), 0.005)["outcome"] == A.LOWER


# ---------------------------------------------------------------------------------------------- the runner
FAKE_GRID = {
    "name": "fake",
    "seeds": [0, 1, 2],
    "description": "A fake setting for the tests.",
    "configurations": {
        "fp": {"label": "FP", "set": {"fake.wer": 0.10, "fake.spread": 0.005}},
        "grad": {"set": {"fake.wer": 0.12, "fake.spread": 0.02}},
        "wxg": {"set": {"fake.wer": 0.13, "fake.spread": 0.02}},
        "power": {"set": {"fake.wer": 0.10}},
        "global": {"set": {"fake.wer": 0.05}},
        "row": {"set": {"fake.wer": 0.30}},
        "half_column": {"set": {"fake.wer": 0.13}},
        "col_0.3": {"set": {"fake.wer": 0.05, "fake.sparsity": 0.3}},
        "col_0.7": {"set": {"fake.wer": 0.3, "fake.sparsity": 0.7}},
        "row_{s}": {"matrix": {"s": [0.1, 0.6]}, "set": {"fake.wer": "{s}", "fake.sparsity": "{s}"}},
        "norefine": {"set": {"fake.wer": 0.105}},
        "dense": {"set": {"fake.wer": 0.02, "fake.sparsity": 0.0}},
        "fd": {"set": {"fake.wer": 0.15, "fake.sparsity": 0.0}},
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


@pytest.fixture()
def fast_poll(monkeypatch):
    monkeypatch.setattr(R, "POLL_S", 0.02)


def test_runner_runs_in_parallel_resumes_and_reports_every_finding(tmp_path, fast_poll):
    grid = load_grid(_write_grid(tmp_path, FAKE_GRID))
    lines: list[str] = []
    stats = GridRunner(grid, jobs=4, print_fn=lines.append, fit_command=FAKE_FIT).run(RunStats("now", 4, "test"))
    assert stats.cells_run == 42 and stats.cells_failed == 0 and stats.cells_skipped == 0 and not stats.interrupted
    assert "42 cells (14 configurations x 3 seeds), 0 finished before, 42 to run with 4 job(s)" in lines[0]
    progress = lines[1:]
    assert len(progress) == 42 and all(" left, ~" in line and "to go" in line for line in progress)
    assert progress[-1].startswith("[42/42]") and "0 left" in progress[-1]
    results = analyse(grid)
    verdicts = {f["key"]: f["verdict"] for f in results["findings"]}
    assert verdicts == {"importance": CONFIRMED, "adaptive": CONFIRMED, "patterns": CONFIRMED, "sparsity": CONFIRMED,
                        "refinement": INCONCLUSIVE}
    fp = results["configurations"]["fp"]
    assert fp["n"] == 3 and fp["mean"] == pytest.approx(0.10) and fp["std"] == pytest.approx(0.005)
    assert fp["bytes_per_client_round"] == pytest.approx(3.0e6) and fp["client_params"] == 450000
    # resumable: nothing runs again; a changed configuration reruns its own cells only
    lines.clear()
    again = GridRunner(grid, jobs=4, print_fn=lines.append, fit_command=FAKE_FIT).run(RunStats("now", 4, "test"))
    assert again.cells_run == 0 and again.cells_skipped == 42 and len(lines) == 1
    grid.configurations["norefine"].overrides["fake.wer"] = 0.2
    lines.clear()
    third = GridRunner(grid, jobs=4, print_fn=lines.append, fit_command=FAKE_FIT).run(RunStats("now", 4, "test"))
    assert third.cells_run == 3 and all("norefine" in line for line in lines[1:])
    assert {f["key"]: f["verdict"] for f in analyse(grid)["findings"]}["refinement"] == CONFIRMED


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


def test_page_and_figure_render_from_a_partial_grid(tmp_path, fast_poll, monkeypatch, capsys):
    path = _write_grid(tmp_path, FAKE_GRID)
    grid = load_grid(path)
    # only seed 0 of every configuration and seed 1 of some: the verdicts wait, the page still renders
    GridRunner(grid, jobs=4, print_fn=lambda _: None, fit_command=FAKE_FIT, only="seed0").run(RunStats("now", 4, "t"))
    GridRunner(grid, jobs=4, print_fn=lambda _: None, fit_command=FAKE_FIT, only="fp/seed1").run(RunStats("now", 4, "t"))
    assert ablate_main(["--config", str(path), "--report_only"]) == 0
    page = (tmp_path / "page.md").read_text()
    results = json.loads((tmp_path / "page.json").read_text())
    assert all(f["verdict"] == NOT_RUN for f in results["findings"])
    assert "*not run yet*" in page and "## Missing cells" in page and "`grad/seed1`" in page
    assert "| `fp`: FP | 0.098 ± 0.004 (2/3) |" in page and "– (0/3)" not in page
    assert "A fake setting for the tests." in page and "## Where this setting differs from the article's" in page
    assert (tmp_path / "fig.png").stat().st_size > 10_000 and "![" in page
    assert len(results["missing"]) == 42 - 15
    # the rest of the grid through the command line: every verdict now, the run recorded on the page
    monkeypatch.setattr(GridRunner, "__init__", _with_fake_fit(GridRunner.__init__))
    cli_main(["ablate", "--config", str(path), "--jobs", "4", "--only", "grad/"])  # returns: no cell failed
    assert ablate_main(["--config", str(path), "--jobs", "4"]) == 0
    out = capsys.readouterr().out
    assert "finding 1: confirmed" in out and "finding 5: inconclusive" in out
    page = (tmp_path / "page.md").read_text()
    assert "## Missing cells" not in page and "**confirmed**" in page and "| 4 |" in page
    runs = json.loads((grid.out / "runs.json").read_text())["runs"]
    assert [r["cells_run"] for r in runs] == [2, 25] and all(r["load"] for r in runs)
    assert "Total wall time of the runs" in page and runs[-1]["machine"]["cores"] >= 1


def _with_fake_fit(init):
    def patched(self, *args, **kwargs):
        init(self, *args, **{**kwargs, "fit_command": FAKE_FIT})

    return patched


# ---------------------------------------------------------------------------------------------- the smoke grid
pytest.importorskip("torchaudio")


def test_smoke_grid_runs_real_cells_end_to_end_and_resumes(tmp_path, monkeypatch, capsys):
    """2 real `fedprune fit` cells at toy size (Federated Pruning and Federated Dropout), in parallel."""
    monkeypatch.setenv("FEDPRUNE_CACHE", str(tmp_path / "cache"))
    args = ["--config", str(REPO / "examples" / "ablation" / "smoke.yaml"), "--jobs", "2", "--out", str(tmp_path / "cells"),
            "--page", str(tmp_path / "results.md"), "--figure", str(tmp_path / "results.png")]
    assert ablate_main(args) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    cells = {c["configuration"]: c for c in results["cells"]}
    assert {c["status"] for c in cells.values()} == {"done"} and results["missing"] == []
    for name in ("fp", "fd"):
        assert 0 <= cells[name]["metric"] <= 1.5
        assert cells[name]["client_params_final"] < cells[name]["total_params"]
        assert cells[name]["bytes_per_client_round_mean"] < cells[name]["dense_bytes_per_client_round"]
    assert cells["fp"]["sparsity"] == pytest.approx(0.3, abs=0.02) and cells["fd"]["sparsity"] == 0.0
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


def test_the_shipped_grids_expand_and_their_baselines_act_on_the_pruned_weights():
    """examples/ablation/grid.yaml: the default and --full grids load, every name the findings use exists, and
    Federated Dropout and PruneFL act on the same weights as Federated Pruning (the base config's ramp)."""
    path = REPO / "examples" / "ablation" / "grid.yaml"
    default, full = load_grid(path), load_grid(path, full=True)
    assert len(default.cells()) == 54 and len(full.cells()) == 150
    assert set(default.configurations) < set(full.configurations)
    for grid in (default, full):
        cfg = {c.configuration: grid.cell_config(c) for c in grid.cells() if c.seed == 0}
        ramp = next(c for c in cfg["column_0.5"]["trainer"]["callbacks"] if c["class_path"].endswith("SparsityRampCallback"))
        targets = ramp["init_args"]["parameters"]
        assert cfg["federated_dropout"]["model"]["strategy"]["init_args"]["parameters"] == targets
        prunefl = next(c for c in cfg["prunefl"]["trainer"]["callbacks"] if c["class_path"].endswith("PruneFL"))
        assert prunefl["init_args"]["parameters"] == targets
        assert cfg["column_0.5"]["trainer"]["max_steps"] == (50 if grid is default else 100)
