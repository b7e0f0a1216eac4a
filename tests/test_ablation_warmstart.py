"""The shared warm start of `fedprune ablate` changes nothing: real cells that resume from a warm start
(trained as another configuration, then resumed with `resume_config_change: apply`) end in exactly the state
an uninterrupted run of the same configuration reaches -- the same final weights and masks (SHA-256 over
them), the same WER, the same bytes and losses every round -- with pruning added to a dense warm start
(column and row patterns, another sparsity), with nothing added (dense), with an importance that needs
the warm start's pseudo-gradient (weight x gradient resumed from a gradient-L2 warm start), and with the two
baselines that start after the dense warm-up: Federated Dropout (another strategy from round 1) and PruneFL
(the clients of round 1 upload their squared gradients, the masks of round 2 are computed from them)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from lightning_fedprune.ablation.grid import load_grid
from lightning_fedprune.ablation.runner import GridRunner, RunStats

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")
ROW = {"callbacks.SparsityRampCallback.pattern": "row", "callbacks.SparsityRampCallback.target_sparsity": 0.5}
GRAD = {"callbacks.SparsityRampCallback.importance": "gradient_l2"}
WXG = {"callbacks.SparsityRampCallback.importance": "weight_x_gradient"}
DENSE = {"callbacks.SparsityRampCallback": None, "callbacks.MaskRefinementCallback": None,
         "callbacks.FineTuneFreeze": None}
TARGETS = r"encoder\.conformer\.conformer_layers\.\d+\.(ffn[12]\.sequential\.[14]|self_attn\.out_proj)\.weight"
FD = {**DENSE, "model.strategy": {"class_path": "lightning_fedprune.baselines.FederatedDropout",
                                  "init_args": {"rate": 0.5, "start_round": 1, "parameters": TARGETS}}}
PRUNEFL = {**DENSE, "callbacks.PruneFL": {"target_sparsity": 0.5, "start_round": 2, "every_n_rounds": 1,
                                          "pattern": "column", "parameters": TARGETS}}


def test_cells_resumed_from_a_warm_start_equal_uninterrupted_runs(tmp_path, monkeypatch):
    pytest.importorskip("torchaudio")
    monkeypatch.setenv("FEDPRUNE_CACHE", str(tmp_path / "cache"))
    smoke = yaml.safe_load((REPO / "examples" / "ablation" / "smoke.yaml").read_text())
    grid_file = {**smoke, "base": str(REPO / "examples" / "asr" / "smoke.yaml"), "out": str(tmp_path / "cells"),
                 "page": str(tmp_path / "page.md"), "figure": str(tmp_path / "fig.png"),
                 "set": {**smoke["set"], "trainer.max_steps": 3, "trainer.val_check_interval": 3},
                 "warm_start": {"rounds": 1, "configuration": "dense_cold"},
                 "configurations": {"dense_cold": {"warm_start": False, "set": DENSE},
                                    "dense": {"set": DENSE},
                                    "row": {"set": ROW}, "row_cold": {"warm_start": False, "set": ROW},
                                    "grad_cold": {"warm_start": False, "set": GRAD},
                                    "wxg": {"warm_start": "grad_cold", "set": WXG},
                                    "wxg_cold": {"warm_start": False, "set": WXG},
                                    "fd": {"set": FD}, "fd_cold": {"warm_start": False, "set": FD},
                                    "prunefl": {"set": PRUNEFL}, "prunefl_cold": {"warm_start": False, "set": PRUNEFL}}}
    grid_file.pop("baselines")
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid_file, sort_keys=False))
    grid = load_grid(path)
    stats = GridRunner(grid, jobs=2, print_fn=lambda _: None).run(RunStats("now", 2, "test"))
    assert stats.cells_failed == 0 and stats.warm_starts_run == 2
    record = {c.configuration: json.loads((c.dir / "record.json").read_text()) for c in grid.cells()}
    summary = {c.configuration: json.loads((c.dir / "summary.json").read_text()) for c in grid.cells()}
    for resumed, cold in (("dense", "dense_cold"), ("row", "row_cold"), ("wxg", "wxg_cold"), ("fd", "fd_cold"),
                          ("prunefl", "prunefl_cold")):
        assert record[resumed]["first_round"] == 1 and record[cold]["first_round"] == 0
        assert record[resumed]["weights_sha256"] == record[cold]["weights_sha256"], resumed
        assert summary[resumed]["metrics"] == summary[cold]["metrics"], resumed
        assert record[resumed]["layer_sparsity"] == record[cold]["layer_sparsity"], resumed
        rounds, cold_rounds = record[resumed]["rounds_log"], record[cold]["rounds_log"][1:]
        assert [r["bytes_down"] + r["bytes_up"] for r in rounds] == [r["bytes_down"] + r["bytes_up"] for r in cold_rounds]
        assert [r["train_loss"] for r in rounds] == [r["train_loss"] for r in cold_rounds]
    selected = re.compile(r"encoder\.conformer\.conformer_layers\.\d+\.(ffn[12]\.sequential\.[14]|self_attn\.out_proj)\.weight")

    def targets(layers):  # the selected weights at S (the other masked tensors are their dependents)
        return {v for n, v in layers.items() if selected.fullmatch(n)}

    assert targets(record["row"]["layer_sparsity"]) == {0.5} and record["dense"]["layer_sparsity"] == {}
    digests = {record[n]["weights_sha256"] for n in ("dense", "row", "grad_cold", "wxg", "fd", "prunefl")}
    assert len(digests) == 6  # the configurations did change the run
    assert targets(record["prunefl"]["layer_sparsity"]) == {0.5}
    assert record["fd"]["client_params_final"] < record["dense"]["client_params_final"]
    up = {r["round"]: r["bytes_up"] for r in record["prunefl"]["rounds_log"]}
    assert up[1] > up[2]  # round 1 carried the clients' squared gradients (and a dense update)
