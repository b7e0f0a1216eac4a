"""TensorBoard output (scalars + PruningImages), the federated progress bar, and the drop-in example."""

from __future__ import annotations

import re
import runpy
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from helpers import GaussianMixtureDataset, MLPClassifier
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from lightning_fedprune import FederatedDataModule, FederatedLightningModule
from lightning_fedprune.callbacks import (
    AdaptiveLayerSparsity,
    FederatedProgressBar,
    FineTuneFreeze,
    MaskRefinementCallback,
    PruningImages,
    SparsityRampCallback,
)
from lightning_fedprune.observers.tensorboard import mask_image
from lightning_fedprune.pruning.state import PruningState

ROOT = Path(__file__).resolve().parents[1]
ROUNDS = 12


def _fed():
    torch.manual_seed(0)
    task = MLPClassifier(in_dim=16, hidden=32, num_classes=4, lr=0.1, momentum=0.9)
    dm = FederatedDataModule(GaussianMixtureDataset(240, dim=16, num_classes=4),
                             GaussianMixtureDataset(80, dim=16, num_classes=4, seed=1),
                             partition="dirichlet", num_clients=8, alpha=0.5, batch_size=8)
    return FederatedLightningModule(task, clients_per_round=3, local_steps=2), dm


def _pruning_callbacks():
    return [
        SparsityRampCallback(target_sparsity=0.5, start_round=2, end_round=5, schedule="linear", pattern="unstructured",
                             parameters=r"body\..*\.weight", every_n_rounds=1),
        MaskRefinementCallback(every_n_rounds=2),
        AdaptiveLayerSparsity(max_layer_sparsity=0.9),
        FineTuneFreeze(start_round=9),
    ]


class BarSpy(Callback):
    """Placed after the bar: reads what the bar shows as each client finishes and at each round's end."""

    def __init__(self, bar):
        self.bar = bar
        self.client_metrics = []
        self.postfixes = []
        self.update_rounds = []

    def on_fed_client_result(self, trainer, pl_module, result):
        self.client_metrics.append(self.bar.get_metrics(trainer, pl_module))
        self.postfixes.append(self.bar.train_progress_bar.postfix)

    def on_fed_round_end(self, trainer, pl_module, summary):
        self.update_rounds.append(pl_module.pruning.last_update_round)


@pytest.fixture(scope="module")
def tb_run(tmp_path_factory):
    """One short federated pruning fit with a TensorBoardLogger, PruningImages and FederatedProgressBar."""
    save_dir = tmp_path_factory.mktemp("tb")
    fed, dm = _fed()
    bar = FederatedProgressBar(client_refresh_interval=0)
    spy = BarSpy(bar)
    images = PruningImages(max_layers=1)
    trainer = pl.Trainer(max_steps=ROUNDS, val_check_interval=6, log_every_n_steps=1, num_sanity_val_steps=0,
                         enable_checkpointing=False, enable_model_summary=False,
                         logger=TensorBoardLogger(str(save_dir), name="fp"),
                         callbacks=[*_pruning_callbacks(), images, bar, spy])
    trainer.fit(fed, datamodule=dm)
    from tensorboard.backend.event_processing.event_accumulator import IMAGES, SCALARS, EventAccumulator

    (event_file,) = list(Path(trainer.logger.log_dir).glob("events.out.tfevents.*"))
    acc = EventAccumulator(str(event_file), size_guidance={IMAGES: 0, SCALARS: 0})
    acc.Reload()
    return SimpleNamespace(fed=fed, trainer=trainer, acc=acc, spy=spy, bar=bar, images=images)


# ---------------------------------------------------------------------------------------------- TensorBoard
def test_tensorboard_scalars(tb_run):
    scalars = set(tb_run.acc.Tags()["scalars"])
    expected = {"round/train_loss", "round/clients_ok", "round/clients_failed", "round/seconds", "prune/sparsity",
                "prune/target_sparsity", "prune/phase", "prune/mask_flips", "prune/restored",
                "prune/layer_sparsity/body.0.weight", "prune/layer_sparsity/body.2.weight", "val/acc", "val/loss",
                "comm/bytes_down", "comm/bytes_up", "comm/dense_bytes", "comm/ratio", "train/loss"}
    assert expected <= scalars, expected - scalars
    # one point per round for the round scalars, and the phases of the schedule in order
    assert [e.step for e in tb_run.acc.Scalars("round/clients_ok")] == list(range(ROUNDS))
    assert all(e.value == 3 for e in tb_run.acc.Scalars("round/clients_ok"))
    phases = [int(e.value) for e in tb_run.acc.Scalars("prune/phase")]
    assert phases == [0, 0, 1, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert tb_run.acc.Scalars("prune/sparsity")[-1].value == pytest.approx(0.5, abs=0.01)
    assert len(tb_run.acc.Scalars("val/acc")) == 2


def test_tensorboard_pruning_images(tb_run):
    images = set(tb_run.acc.Tags()["images"])
    assert images == {"prune/layer_sparsity_chart", "prune/mask/body.0.weight"}  # max_layers=1
    updates = sorted(set(r for r in tb_run.spy.update_rounds if r >= 0))
    assert updates == [2, 3, 4, 5, 6, 8]  # ramp every round 2..5, refinement at 6 and 8, frozen from 9
    chart = tb_run.acc.Images("prune/layer_sparsity_chart")
    assert [e.step for e in chart] == updates  # drawn once per mask change, at the round's step
    assert chart[0].width > 100 and chart[0].height > 50
    masks = tb_run.acc.Images("prune/mask/body.0.weight")
    assert [e.step for e in masks] == updates
    # (32, 16) mask, enlarged x2 to reach 64 pixels on the longer side: height = rows
    assert (masks[0].height, masks[0].width) == (64, 32)
    assert masks[0].encoded_image_string.startswith(b"\x89PNG")
    assert tb_run.images.images_logged == 2 * len(updates)


def _images_fit(logger, images, rounds=6):
    fed, dm = _fed()
    trainer = pl.Trainer(max_steps=rounds, logger=logger, enable_progress_bar=False, enable_checkpointing=False,
                         enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, log_every_n_steps=1,
                         callbacks=[SparsityRampCallback(target_sparsity=0.5, start_round=1, end_round=3,
                                                         schedule="linear", pattern="unstructured",
                                                         parameters=r"body\..*\.weight"), images])
    trainer.fit(fed, datamodule=dm)
    return fed


@pytest.mark.parametrize("logger", ["csv", "none"])
def test_pruning_images_warns_once_for_a_logger_without_images(tmp_path, logger):
    images = PruningImages()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fed = _images_fit(CSVLogger(str(tmp_path)) if logger == "csv" else False, images)
    mine = [str(w.message) for w in caught if "PruningImages" in str(w.message)]
    assert fed.pruning.last_update_round == 3 and images.images_logged == 0  # masks changed 3 times, no picture
    expected = "CSVLogger has no image method" if logger == "csv" else "the Trainer has no logger"
    assert len(mine) == 1 and expected in mine[0], mine


class ImageLogger(pl.loggers.Logger):
    """A logger with W&B's image method: ``log_image(key, images, step)``."""

    name, version = "images", 0
    log_hyperparams = log_metrics = lambda self, *args, **kwargs: None

    def __init__(self):
        super().__init__()
        self.logged = []

    def log_image(self, key, images, step=None, **kwargs):
        self.logged.append((key, step, images))


class FakeMlflowClient:
    def __init__(self):
        self.logged = []

    def log_image(self, run_id, image, artifact_file=None, key=None, step=None):
        self.logged.append((run_id, key, step, image))


class FakeMLFlowLogger(pl.loggers.MLFlowLogger):
    """MLFlowLogger's interface (``experiment`` is an ``MlflowClient``, ``run_id``) without an MLflow server."""

    def __init__(self):
        self.client = FakeMlflowClient()

    experiment = property(lambda self: self.client)
    run_id = property(lambda self: "run-1")
    name, version = "mlflow", 0
    log_hyperparams = log_metrics = finalize = save = lambda self, *args, **kwargs: None


def test_pruning_images_go_through_each_loggers_image_method():
    wandb_like, mlflow_like = ImageLogger(), FakeMLFlowLogger()
    images = PruningImages(max_layers=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _images_fit([wandb_like, mlflow_like], images)
    assert not [w for w in caught if "PruningImages" in str(w.message)]
    tags = ["prune/layer_sparsity_chart", "prune/mask/body.0.weight"]
    assert [(key, step) for key, step, _ in wandb_like.logged] == [(t, r) for r in (1, 2, 3) for t in tags]
    chart, mask = wandb_like.logged[0][2][0], wandb_like.logged[1][2][0]
    assert chart.dtype == np.uint8 and chart.ndim == 3 and chart.shape[2] == 3
    assert mask.dtype == np.uint8 and mask.shape == (64, 32) and set(np.unique(mask)) <= {0, 255}
    assert [(run, key, step) for run, key, step, _ in mlflow_like.client.logged] == [
        ("run-1", t, r) for r in (1, 2, 3) for t in tags]
    assert images.images_logged == 2 * 2 * 3


def test_mask_image_views_and_downsampling():
    conv = torch.rand(8, 3, 3, 3) > 0.5  # 2-D view (8, 27), enlarged x2
    img = mask_image(conv, max_size=256)
    assert img.shape == (16, 54)
    assert set(img.ravel().tolist()) <= {0.0, 1.0}
    big = torch.zeros(1000, 600, dtype=torch.bool)
    big[:, :300] = True
    img = mask_image(big, max_size=100)
    assert img.shape == (100, 60)
    assert img[:, :30].min() == 1.0 and img[:, 30:].max() == 0.0
    assert mask_image(torch.ones(5, dtype=torch.bool)).shape == (60, 12)  # 1-D -> (5, 1)


@pytest.mark.parametrize("kwargs, arg", [
    (dict(max_layers=-1), "max_layers"), (dict(max_layers=True), "max_layers"), (dict(layers="("), "layers"),
    (dict(max_size=4), "max_size"), (dict(bar_chart="yes"), "bar_chart"), (dict(dpi=0), "dpi"),
])
def test_pruning_images_validation(kwargs, arg):
    with pytest.raises(ValueError, match=f"`{arg}`"):
        PruningImages(**kwargs)


def test_pruning_images_layer_selection():
    state = PruningState()
    state.masks = {n: torch.ones(2, 2, dtype=torch.bool) for n in ("a.weight", "b.weight", "c.weight")}
    assert PruningImages(max_layers=2).selected_layers(state) == ["a.weight", "b.weight"]
    assert PruningImages(layers=r"[bc]\..*").selected_layers(state) == ["b.weight", "c.weight"]
    assert PruningImages(max_layers=0).selected_layers(state) == []


# ---------------------------------------------------------------------------------------------- progress bar
def test_progress_bar_fields_during_rounds(tb_run):
    spy = tb_run.spy
    assert len(spy.client_metrics) == 3 * ROUNDS
    for i, metrics in enumerate(spy.client_metrics):
        rnd, k = divmod(i, 3)
        assert metrics["round"] == rnd
        assert metrics["clients"] == f"{k + 1}/3"
        assert "prune/sparsity" not in metrics  # shown as `sparsity`
        assert list(metrics)[:4] == ["round", "phase", "sparsity", "clients"]
    phases = [m["phase"] for m in spy.client_metrics[::3]]
    assert phases == ["dense"] * 2 + ["ramp"] * 4 + ["refine"] * 3 + ["fine-tune"] * 3
    assert float(spy.client_metrics[-1]["sparsity"]) == pytest.approx(0.5, abs=0.01)
    assert float(spy.client_metrics[0]["sparsity"]) == 0.0
    # the bar itself was refreshed as each client finished
    assert "clients=2/3" in spy.postfixes[4] and "round=1" in spy.postfixes[4] and "phase=dense" in spy.postfixes[4]
    assert "phase=fine-tune" in spy.postfixes[-1] and "clients=3/3" in spy.postfixes[-1]


def test_progress_bar_counts_failed_clients_and_plain_modules():
    bar = FederatedProgressBar()
    module = SimpleNamespace(pruning=PruningState())
    bar.on_fed_round_start(None, module, 7, [1, 2, 3, 4])
    bar.on_fed_client_result(None, module, SimpleNamespace(ok=True))
    bar.on_fed_client_result(None, module, SimpleNamespace(ok=False))
    assert bar.fed_fields(module) == {"round": 7, "phase": "dense", "sparsity": "0.000", "clients": "1/4+1 failed"}
    assert bar.fed_fields(SimpleNamespace()) == {}  # not a federated module: an ordinary bar


@pytest.mark.parametrize("kwargs, arg", [(dict(refresh_rate=-1), "refresh_rate"), (dict(leave=1), "leave"),
                                         (dict(client_refresh_interval=-0.1), "client_refresh_interval")])
def test_progress_bar_validation(kwargs, arg):
    with pytest.raises(ValueError, match=f"`{arg}`"):
        FederatedProgressBar(**kwargs)


@pytest.mark.parametrize("extra, expected", [
    ([], "FederatedProgressBar"),
    (["--quiet", "true"], None),
    (["--trainer.enable_progress_bar", "false"], None),
    (["--trainer.callbacks+=lightning.pytorch.callbacks.TQDMProgressBar"], "TQDMProgressBar"),
])
def test_cli_default_progress_bar(tmp_path, monkeypatch, extra, expected):
    from lightning_fedprune.cli import build_cli

    monkeypatch.setattr(sys, "argv", ["fedprune"])
    cli = build_cli(["--config", str(ROOT / "examples" / "quickstart.yaml"), "--trainer.logger.init_args.save_dir",
                     str(tmp_path), *extra], run=False)
    bar = cli.trainer.progress_bar_callback
    assert (type(bar).__name__ if bar is not None else None) == expected


# ---------------------------------------------------------------------------------------------- drop-in example
def _run_script(name, args, monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [name, *args])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        runpy.run_path(str(ROOT / "examples" / "dropin" / name), run_name="__main__")
    return capsys.readouterr().out


def test_dropin_centralised(monkeypatch, capsys, tmp_path):
    out = _run_script("centralised.py", ["--max-steps", "150", "--quiet"], monkeypatch, capsys, tmp_path)
    acc = float(re.search(r"final accuracy: ([0-9.]+)", out).group(1))
    assert acc > 0.85, out


def test_dropin_federated(monkeypatch, capsys, tmp_path):
    out = _run_script("federated.py", ["--max-steps", "20", "--quiet"], monkeypatch, capsys, tmp_path)
    acc = float(re.search(r"final accuracy: ([0-9.]+)", out).group(1))
    sparsity = float(re.search(r"final sparsity: ([0-9.]+)", out).group(1))
    assert acc > 0.7, out
    assert sparsity == pytest.approx(0.5, abs=0.01)


def _unified_diff() -> str:
    out = subprocess.run(["diff", "-u", "examples/dropin/centralised.py", "examples/dropin/federated.py"], cwd=ROOT,
                         capture_output=True, text=True).stdout
    lines = out.splitlines()
    lines[:2] = [line.split("\t")[0] for line in lines[:2]]  # drop the timestamps of the header
    return "\n".join(lines)


@pytest.mark.skipif(shutil.which("diff") is None, reason="needs GNU diff")
def test_dropin_doc_diff_is_current():
    doc = (ROOT / "docs" / "dropin.md").read_text()
    shown = re.search(r"```diff\n(.*?)\n```", doc, re.S).group(1)
    assert shown == _unified_diff(), "docs/dropin.md is stale: regenerate the diff (see the command in the page)"
    # the task class is unchanged: no line of DigitsClassifier appears in the diff
    assert "class DigitsClassifier" not in "\n".join(
        line for line in shown.splitlines() if line.startswith(("+", "-")))
