"""The `fedprune` CLI: every shipped config runs as written for a couple of rounds."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_fedprune.cli import build_cli

ROOT = Path(__file__).resolve().parent.parent
# the ablation grids are not fit configs (tests/test_ablation.py runs and checks them); their base config is
GRIDS = {"examples/ablation/grid.yaml", "examples/ablation/smoke.yaml", "examples/ablation/pilot.yaml"}
CONFIGS = sorted(c for p in (ROOT / "examples").rglob("*.yaml") if (c := p.relative_to(ROOT).as_posix()) not in GRIDS)

# fast settings for a couple of rounds; everything else exactly as shipped
FAST = {
    "examples/quickstart.yaml": ["--trainer.max_steps=3", "--trainer.val_check_interval=3"],
    "examples/asr/digits_fp.yaml": [
        "--trainer.max_steps=2", "--trainer.val_check_interval=2", "--trainer.limit_val_batches=1",
        "--model.clients_per_round=2", "--model.local_steps=1",
    ],
    "examples/ablation/base.yaml": [
        "--trainer.max_steps=2", "--trainer.val_check_interval=2", "--trainer.limit_val_batches=1",
        "--model.clients_per_round=2", "--model.local_steps=1",
    ],
    "examples/asr/commands_fp.yaml": [
        "--trainer.max_steps=2", "--trainer.val_check_interval=2", "--trainer.limit_val_batches=1",
        "--model.clients_per_round=2", "--model.local_steps=1",
    ],
}


def test_every_shipped_config_is_covered():
    assert "examples/quickstart.yaml" in CONFIGS and "examples/asr/digits_fp.yaml" in CONFIGS
    assert set(CONFIGS) <= set(FAST) | {"examples/asr/smoke.yaml"}, "add fast overrides for new configs"


@pytest.mark.parametrize("config", [c for c in CONFIGS if c in FAST])
def test_shipped_config_runs(config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = build_cli(["fit", "--config", str(ROOT / config), "--quiet=true",
                     f"--trainer.logger.init_args.save_dir={tmp_path}", *FAST[config]])
    trainer = cli.trainer
    assert trainer.global_step == int(FAST[config][0].split("=")[1])
    assert any(k.startswith("val/") for k in trainer.callback_metrics), trainer.callback_metrics.keys()
    assert "round/train_loss" in trainer.callback_metrics


def test_print_config_and_module_entry_point(tmp_path):
    out = subprocess.run([sys.executable, "-m", "lightning_fedprune", "fit", "--config", "examples/quickstart.yaml",
                          "--print_config"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "SparsityRampCallback" in out.stdout and "clients_per_round: 5" in out.stdout


def test_cli_rejects_bad_values_naming_the_argument(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises((ValueError, SystemExit)):
        build_cli(["fit", "--config", str(ROOT / "examples/quickstart.yaml"), "--model.clients_per_round=0",
                   "--trainer.logger=false"], run=False)


def test_summary_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    build_cli(["fit", "--config", str(ROOT / "examples/quickstart.yaml"), "--quiet=true",
               f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.max_steps=20",
               "--trainer.val_check_interval=20"])
    summary = json.loads(next(tmp_path.rglob("summary.json")).read_text())
    assert summary["rounds"] == 20 and 0 < summary["sparsity"] <= 0.5
    assert summary["bytes_saved_percent"] > 0 and "val/acc" in summary["metrics"]


def test_fedprune_predict_from_a_fit_checkpoint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fit = build_cli(["fit", "--config", str(ROOT / "examples/quickstart.yaml"), "--quiet=true",
                     f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.max_steps=12",
                     "--trainer.val_check_interval=12"])
    ckpt = next(tmp_path.rglob("*.ckpt"))
    predict_data = ["--data.init_args.predict_dataset.class_path=lightning_fedprune.demos.GaussianMixtureDataset",
                    "--data.init_args.predict_dataset.init_args.num_samples=50",
                    "--data.init_args.predict_dataset.init_args.dim=32", "--data.init_args.predict_dataset.init_args.noise=2.0",
                    "--data.init_args.predict_dataset.init_args.seed=7"]
    cli = build_cli(["--config", str(ROOT / "examples/quickstart.yaml"), "--quiet=true", "--trainer.logger=false",
                     *predict_data], run=False)
    predictions = cli.trainer.predict(cli.model, datamodule=cli.datamodule, ckpt_path=str(ckpt))
    labels = torch.cat(predictions)
    assert labels.shape == (50,)
    # the predictions are the checkpoint's global (pruned) model's: the same as the fitted module's
    dataset = cli.datamodule.predict_dataset
    pruned = copy.deepcopy(fit.model.task).eval()
    assert fit.model.masks  # pruning started at round 10
    fit.model.pruning.zero_pruned_(dict(pruned.named_parameters()))
    assert torch.equal(labels, pruned(dataset.x).argmax(-1))
    out = subprocess.run([sys.executable, "-m", "lightning_fedprune", "predict", "--config",
                          str(ROOT / "examples/quickstart.yaml"), "--quiet=true", "--trainer.logger=false",
                          f"--ckpt_path={ckpt}", *predict_data], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]


def test_torch_threads_is_checked_naming_the_option(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    with pytest.raises(ValueError, match=r"^`--torch_threads` must be a positive integer, got 0\.$"):
        build_cli(["--config", str(ROOT / "examples/quickstart.yaml"), "--torch_threads=0", "--trainer.logger=false"],
                  run=False)
    assert torch.get_num_threads() == threads  # nothing was set


def test_quantised_payloads_from_yaml(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ratios = {}
    for bits in (None, 8):
        extra = [f"--model.payload_bits={bits}"] if bits else []
        cli = build_cli(["fit", "--config", str(ROOT / "examples/quickstart.yaml"), "--quiet=true",
                         "--trainer.logger=false", "--trainer.max_steps=12", "--trainer.val_check_interval=12", *extra])
        ratios[bits] = cli.trainer.callback_metrics["comm/ratio"].item()
        assert cli.model.client_config.payload_bits == bits
    assert ratios[8] < 0.35 * ratios[None]  # int8 codes instead of float32 values, both ways


def test_fit_writes_last_ckpt_that_fedprune_export_reads(tmp_path, monkeypatch):
    from lightning_fedprune.cli import main
    from lightning_fedprune.demos import MLPClassifier

    monkeypatch.chdir(tmp_path)
    cli = build_cli(["fit", "--config", str(ROOT / "examples/quickstart.yaml"), "--quiet=true",
                     f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.max_steps=2",
                     "--trainer.val_check_interval=2"])
    last = Path(cli.trainer.log_dir) / "checkpoints" / "last.ckpt"  # the path the docs give
    assert last.is_file()
    main(["export", "--ckpt_path", str(last), "--output", str(tmp_path / "task.ckpt")])
    task = MLPClassifier.load_from_checkpoint(tmp_path / "task.ckpt")
    assert torch.equal(task.head.weight, cli.model.task.head.weight)


def test_a_configured_model_checkpoint_is_used_as_it_is(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = ["--config", str(ROOT / "examples/quickstart.yaml"), "--trainer.logger=false"]
    own = build_cli([*base, "--trainer.callbacks+=ModelCheckpoint", f"--trainer.callbacks.dirpath={tmp_path}",
                     "--trainer.callbacks.every_n_train_steps=5"], run=False)
    (checkpoint,) = own.trainer.checkpoint_callbacks
    assert checkpoint.dirpath == str(tmp_path) and not checkpoint.save_last
    off = build_cli([*base, "--trainer.enable_checkpointing=false"], run=False)
    assert off.trainer.checkpoint_callbacks == []


def test_help_lists_every_subcommand_and_their_options(capsys):
    import re

    from lightning_fedprune.cli import command_parsers, main

    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    for name in ("fit", "validate", "test", "predict", "export", "ablate"):
        assert re.search(rf"^ +{name} +\S", out, re.M), f"`fedprune --help` does not list {name}:\n{out}"
    for name, parser in command_parsers().items():
        with pytest.raises(SystemExit) as done:
            main([name, "--help"])
        assert done.value.code == 0
        out = capsys.readouterr().out
        options = [o for action in parser._actions for o in action.option_strings if o.startswith("--")]
        assert options and all(o in out for o in options), (name, options)
