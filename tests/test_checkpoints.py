"""Checkpoints: the pruned model in every checkpoint, loading without `task=`, export for serving,
invalid and damaged files, and resume with a changed configuration."""

from __future__ import annotations

import pickle
import re
import struct
import zipfile
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
import yaml
from helpers import GaussianMixtureDataset, MLPClassifier, quiet_trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch import nn

from lightning_fedprune import FederatedDataModule, FederatedLightningModule
from lightning_fedprune.callbacks import FineTuneFreeze, MaskRefinementCallback, SparsityRampCallback
from lightning_fedprune.federated.checkpoint import CheckpointError, export_task_checkpoint, to_module_layout
from lightning_fedprune.cli import build_cli
from lightning_fedprune.cli import main as cli_main

ROOT = Path(__file__).resolve().parent.parent
ROUNDS = 14  # ramp 2-6, refinement 7-10, fine-tuning from 11


def _make(seed: int = 0, **fed_kwargs):
    torch.manual_seed(seed)
    task = MLPClassifier(in_dim=16, hidden=32, num_classes=4, lr=0.1, momentum=0.9)
    dm = FederatedDataModule(GaussianMixtureDataset(240, dim=16, num_classes=4), partition="dirichlet", num_clients=8,
                             alpha=0.5, batch_size=8)
    fed_kwargs = {"clients_per_round": 3, "local_steps": 2, **fed_kwargs}
    return FederatedLightningModule(task, **fed_kwargs), dm


def _callbacks(target=0.5, pattern="column", make_permanent=True, refine=True):
    cbs = [SparsityRampCallback(target_sparsity=target, start_round=2, end_round=6, schedule="cubic", pattern=pattern,
                                parameters=r"body\..*\.weight", every_n_rounds=2)]
    if refine:
        cbs.append(MaskRefinementCallback(every_n_rounds=2, until_round=10))
    cbs.append(FineTuneFreeze(start_round=11, make_permanent=make_permanent))
    return cbs


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One uninterrupted run that writes a checkpoint every 2 rounds (mid-ramp 4, refinement 8, fine-tuning
    12) and last.ckpt after the last round; the live module is the reference."""
    folder = tmp_path_factory.mktemp("ckpts")
    fed, dm = _make()
    ckpt = ModelCheckpoint(dirpath=folder, every_n_train_steps=2, save_top_k=-1, save_last=True, filename="{step}")
    quiet_trainer(max_steps=ROUNDS, enable_checkpointing=True, callbacks=_callbacks() + [ckpt]).fit(fed, datamodule=dm)
    return fed, folder


def _resume(path, callbacks=None, max_steps=ROUNDS, **fed_kwargs):
    fed, dm = _make(**fed_kwargs)
    trainer = quiet_trainer(max_steps=max_steps, callbacks=_callbacks() if callbacks is None else callbacks)
    trainer.fit(fed, datamodule=dm, ckpt_path=str(path))
    return fed, trainer


def _assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


# ------------------------------------------------------------------ what a checkpoint holds
@pytest.mark.parametrize("step", [4, 8, 12])
def test_state_dict_is_the_pruned_model_and_server_values_are_kept_aside(run, step):
    _, folder = run
    ckpt = torch.load(folder / f"step={step}.ckpt", weights_only=True)
    pruning = ckpt["fedprune"]["pruning"]
    assert pruning["masks"]
    for name, mask in pruning["masks"].items():
        assert torch.all(ckpt["state_dict"][name][~mask] == 0), name
        values = ckpt["fedprune"]["server_values"].get(name)
        if pruning["permanent"]:
            assert values is None
        else:  # restorable until fine-tuning: the server's values of exactly the pruned entries
            assert values.numel() == int((~mask).sum()) and torch.all(values != 0), name
    assert pruning["permanent"] == (step >= 11)  # make_permanent acts when fine-tuning starts


def test_resume_from_mid_ramp_is_bit_identical_to_the_uninterrupted_run(run):
    fed, folder = run
    resumed, _ = _resume(folder / "step=4.ckpt")
    _assert_same_state(fed.task, resumed.task)
    for name, mask in fed.masks.items():
        assert torch.equal(mask, resumed.masks[name]), name


def test_permanence_at_finetune_start_does_not_change_training():
    def final(make_permanent):
        fed, dm = _make()
        quiet_trainer(max_steps=ROUNDS, callbacks=_callbacks(make_permanent=make_permanent)).fit(fed, datamodule=dm)
        return fed

    permanent, kept = final(True), final(False)
    assert permanent.pruning.permanent and not kept.pruning.permanent
    params_p, params_k = dict(permanent.task.named_parameters()), dict(kept.task.named_parameters())
    for name, p in params_p.items():
        mask = permanent.masks.get(name, torch.ones_like(p, dtype=torch.bool))
        assert torch.equal(mask, kept.masks.get(name, mask)), name
        assert torch.equal(p[mask], params_k[name][mask]), name  # the trained weights are the same
        assert torch.all(p[~mask] == 0) and torch.all(params_k[name][~mask] != 0), name


# ------------------------------------------------------------------ loading and export
def test_last_checkpoint_loads_as_the_pruned_model_without_task_and_exports(run, tmp_path):
    fed, folder = run
    x = torch.randn(5, 16)
    fed.eval()
    with torch.no_grad():
        expected = fed(x)

    loaded = FederatedLightningModule.load_from_checkpoint(folder / "last.ckpt")  # no task=
    assert type(loaded.task) is MLPClassifier and dict(loaded.task.hparams) == dict(fed.task.hparams)
    _assert_same_state(fed.task, loaded.task)
    for name, mask in fed.masks.items():
        assert torch.all(dict(loaded.task.named_parameters())[name][~mask] == 0), name
        assert torch.equal(loaded.masks[name], mask)
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)

    out = export_task_checkpoint(folder / "last.ckpt", tmp_path / "task.ckpt")
    plain = MLPClassifier.load_from_checkpoint(out)
    _assert_same_state(fed.task, plain)
    plain.eval()
    with torch.no_grad():
        assert torch.equal(plain(x), expected)
    # the same export from the live module
    plain2 = MLPClassifier.load_from_checkpoint(export_task_checkpoint(fed, tmp_path / "task2.ckpt"))
    _assert_same_state(plain, plain2)


@pytest.mark.parametrize("name", ["last.ckpt", "step=8.ckpt"])
def test_the_task_class_loads_a_federated_checkpoint_as_the_pruned_task(run, name):
    """`MyTask.load_from_checkpoint` — the first thing a Lightning user tries — reads a federated checkpoint as it
    reads a plain Trainer's: the task's keys and hyperparameters, the pruned model."""
    fed, folder = run
    plain = MLPClassifier.load_from_checkpoint(folder / name)
    loaded = FederatedLightningModule.load_from_checkpoint(folder / name)
    assert dict(plain.hparams) == dict(fed.task.hparams)
    _assert_same_state(loaded.task, plain)
    section = torch.load(folder / name, weights_only=True)["fedprune"]
    for param, mask in section["pruning"]["masks"].items():
        assert torch.all(dict(plain.named_parameters())[param][~mask] == 0), param


def test_an_older_checkpoint_in_the_module_layout_still_loads(run, tmp_path):
    fed, folder = run
    ckpt = to_module_layout(torch.load(folder / "last.ckpt", weights_only=True))
    ckpt["fedprune"]["version"] = 2
    del ckpt["fedprune"]["layout"]
    torch.save(ckpt, tmp_path / "v2.ckpt")
    assert all(k.startswith("task.") for k in ckpt["state_dict"])
    _assert_same_state(FederatedLightningModule.load_from_checkpoint(tmp_path / "v2.ckpt").task,
                       FederatedLightningModule.load_from_checkpoint(folder / "last.ckpt").task)


def test_a_checkpoint_before_finetuning_loads_as_the_pruned_model(run):
    fed, folder = run
    ckpt = torch.load(folder / "step=8.ckpt", weights_only=True)
    loaded = FederatedLightningModule.load_from_checkpoint(folder / "step=8.ckpt")
    for name, mask in ckpt["fedprune"]["pruning"]["masks"].items():
        weight = dict(loaded.task.named_parameters())[name]
        assert torch.all(weight[~mask] == 0) and torch.equal(weight, ckpt["state_dict"][name]), name


class NoHparamsTask(pl.LightningModule):
    """A task that does not call save_hyperparameters and needs an argument."""

    def __init__(self, hidden: int, in_dim: int = 16, num_classes: int = 4):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x):
        return self.head(self.body(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_task_without_hyperparameters_needs_task_argument(tmp_path):
    torch.manual_seed(0)
    fed = FederatedLightningModule(NoHparamsTask(hidden=8), clients_per_round=2, local_steps=1)
    dm = FederatedDataModule(GaussianMixtureDataset(40, dim=16, num_classes=4), num_clients=4, batch_size=8)
    trainer = quiet_trainer(max_steps=1)
    trainer.fit(fed, datamodule=dm)
    trainer.save_checkpoint(tmp_path / "a.ckpt")
    with pytest.raises(ValueError, match=r"NoHparamsTask was saved without its constructor arguments.*task=NoHparamsTask\(\.\.\.\)"):
        FederatedLightningModule.load_from_checkpoint(tmp_path / "a.ckpt")
    loaded = FederatedLightningModule.load_from_checkpoint(tmp_path / "a.ckpt", task=NoHparamsTask(hidden=8))
    _assert_same_state(fed.task, loaded.task)


@pytest.mark.parametrize("logger_cls", [CSVLogger, TensorBoardLogger])
def test_task_hyperparameters_in_checkpoint_and_hparams_yaml(tmp_path, logger_cls):
    fed, dm = _make()
    logger = logger_cls(tmp_path, name="run")
    trainer = quiet_trainer(max_steps=1, logger=logger)
    trainer.fit(fed, datamodule=dm)
    expected = {"class_path": "lightning_fedprune.demos.MLPClassifier", "init_args": dict(fed.task.hparams)}
    assert expected["init_args"]["hidden"] == 32
    hparams = yaml.safe_load((Path(logger.log_dir) / "hparams.yaml").read_text())
    assert hparams["task"] == expected and hparams["clients_per_round"] == 3
    trainer.save_checkpoint(tmp_path / "a.ckpt")
    ckpt = torch.load(tmp_path / "a.ckpt", weights_only=True)
    assert ckpt["fedprune"]["hyper_parameters"]["task"] == expected
    assert ckpt["hyper_parameters"] == expected["init_args"]  # the file is a checkpoint of the task


def test_cli_checkpoint_loads_without_task_exports_and_refuses_changed_resume(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = str(ROOT / "examples/quickstart.yaml")
    fast = ["--quiet=true", "--trainer.max_steps=2", "--trainer.val_check_interval=2", "--trainer.logger=false",
            f"--trainer.default_root_dir={tmp_path}"]
    cli_main(["fit", "--config", config, *fast])
    path = next(tmp_path.rglob("*.ckpt"))
    loaded = FederatedLightningModule.load_from_checkpoint(path)
    assert type(loaded.task).__name__ == "MLPClassifier" and loaded.task.hparams["hidden"] == 128
    cli_main(["export", "--ckpt_path", str(path), "--output", str(tmp_path / "task.ckpt")])
    plain = type(loaded.task).load_from_checkpoint(tmp_path / "task.ckpt")
    _assert_same_state(loaded.task, plain)
    with pytest.raises(ValueError, match=re.escape("FederatedLightningModule.clients_per_round: checkpoint=5, now=3")):
        cli_main(["fit", "--config", config, *fast, "--trainer.max_steps=3", "--model.clients_per_round=3",
                  "--ckpt_path", str(path)])


def test_cli_validate_with_checkpoint_of_a_task_without_hyperparameters(tmp_path, monkeypatch):
    """validate takes the model's settings from the checkpoint, except a task recorded without arguments."""
    monkeypatch.chdir(tmp_path)
    task = {"model": {"task": {"class_path": f"{__name__}.NoHparamsTask",
                               "init_args": {"hidden": 8, "in_dim": 32, "num_classes": 10}}}}
    (tmp_path / "task.yaml").write_text(yaml.safe_dump(task))
    args = ["--config", str(ROOT / "examples/quickstart.yaml"), "--config", str(tmp_path / "task.yaml"), "--quiet=true",
            "--trainer.logger=false", f"--trainer.default_root_dir={tmp_path}"]
    cli_main(["fit", *args, "--trainer.max_steps=2", "--trainer.val_check_interval=2"])
    path = next(tmp_path.rglob("*.ckpt"))
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["fedprune"]["hyper_parameters"]["task"]["init_args"] is None and "hyper_parameters" not in ckpt
    cli = build_cli(["validate", *args, "--ckpt_path", str(path)])
    assert type(cli.model.task) is NoHparamsTask
    for name, value in cli.model.task.state_dict().items():
        assert torch.equal(value, ckpt["state_dict"][name]), name


# ------------------------------------------------------------------ invalid and damaged files
def _flip_inside_largest_tensor(path: Path) -> None:
    """XOR 64 bytes in the middle of the largest tensor record's data."""
    with zipfile.ZipFile(path) as zf:
        info = max((i for i in zf.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    raw = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26:info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len + info.file_size // 2
    raw[start:start + 64] = bytes(b ^ 0xFF for b in raw[start:start + 64])
    path.write_bytes(bytes(raw))


def _broken(kind: str, good: Path, folder: Path) -> tuple[Path, str]:
    path = folder / f"{kind}.ckpt"
    data = good.read_bytes()
    if kind == "empty":
        path.write_bytes(b"")
        return path, "the file is empty"
    if kind == "truncated":
        path.write_bytes(data[: len(data) // 2])
        return path, "it is truncated"
    if kind == "random":
        path.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0),
                                       dtype=torch.uint8).numpy().tobytes())
        return path, "it is not a zip archive"
    path.write_bytes(data)
    _flip_inside_largest_tensor(path)
    return path, r"record '[^']+/data/\d+' failed its CRC check \(the file is damaged\)"


@pytest.mark.parametrize("kind", ["empty", "truncated", "random", "bitflip"])
@pytest.mark.parametrize("entry", ["fit", "validate", "load_from_checkpoint", "export"])
def test_invalid_checkpoint_files_are_refused_naming_the_file(run, tmp_path, kind, entry):
    _, folder = run
    path, reason = _broken(kind, folder / "step=8.ckpt", tmp_path)
    match = re.escape(f"{path} is not a valid checkpoint: ") + reason
    with pytest.raises(CheckpointError, match=match):
        if entry == "fit":
            _resume(path)
        elif entry == "validate":
            fed, dm = _make()
            quiet_trainer().validate(fed, datamodule=dm, ckpt_path=str(path), verbose=False)
        elif entry == "load_from_checkpoint":
            FederatedLightningModule.load_from_checkpoint(path)
        else:
            export_task_checkpoint(path, tmp_path / "out.ckpt")


def test_cli_refuses_an_invalid_checkpoint_before_building_anything(tmp_path):
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match=re.escape(f"{empty} is not a valid checkpoint: the file is empty")):
        cli_main(["fit", "--config", str(ROOT / "examples/quickstart.yaml"), "--ckpt_path", str(empty)])


# ------------------------------------------------------------------ resume with a changed configuration
def test_changed_configuration_is_refused_listing_every_field(run):
    _, folder = run
    changed = _callbacks(target=0.3, pattern="row", refine=False)
    with pytest.raises(ValueError) as err:
        _resume(folder / "step=8.ckpt", callbacks=changed, clients_per_round=2)
    message = str(err.value)
    for line in ["FederatedLightningModule.clients_per_round: checkpoint=3, now=2",
                 "SparsityRampCallback.target_sparsity: checkpoint=0.5, now=0.3",
                 "SparsityRampCallback.pattern: checkpoint='column', now='row'",
                 "MaskRefinementCallback: checkpoint={'every_n_rounds': 2, 'start_round': None, 'until_round': 10}, "
                 "now=<absent>"]:
        assert line in message, message
    assert message.count("checkpoint=") == 4, message
    assert "resume_config_change='apply'" in message


class MaskRecorder(Callback):
    def __init__(self):
        self.masks = {}

    def on_fed_round_end(self, trainer, pl_module, summary):
        self.masks[summary.round] = {n: m.clone() for n, m in pl_module.masks.items()}


def test_changed_configuration_is_applied_with_apply(run):
    _, folder = run
    recorder = MaskRecorder()
    changed = _callbacks(target=0.3, pattern="row")
    with pytest.warns(UserWarning, match=r"changed configuration.*\n.*SparsityRampCallback.target_sparsity: "
                                         r"checkpoint=0.5, now=0.3\n.*SparsityRampCallback.pattern"):
        fed, _ = _resume(folder / "step=4.ckpt", callbacks=changed + [recorder], resume_config_change="apply")
    ramp = changed[0]
    for rnd in (4, 8, ROUNDS - 1):  # from the first resumed round: the new pattern and sparsity schedule
        masks = recorder.masks[rnd]
        for name, mask in masks.items():
            assert torch.equal(mask, mask.any(dim=1, keepdim=True).expand_as(mask)), (rnd, name)  # whole rows
        kept = sum(int(m.sum()) for m in masks.values())
        total = sum(m.numel() for m in masks.values())
        assert abs((1 - kept / total) - ramp.plan_parts()["ramp"].sparsity_at(rnd)) < 0.02, rnd
    assert abs(fed.pruning.sparsity() - 0.3) < 0.02 and fed.pruning.permanent


def test_changed_server_learning_rate_is_applied_to_the_restored_optimizer(run):
    _, folder = run
    with pytest.warns(UserWarning, match="server_lr: checkpoint=1.0, now=0.5"):
        resumed, _ = _resume(folder / "step=8.ckpt", max_steps=9, server_lr=0.5, resume_config_change="apply")
    assert resumed.strategy.optimizer.param_groups[0]["lr"] == 0.5  # not the checkpoint's 1.0


def test_pattern_change_after_finetuning_started_is_refused_even_with_apply(run):
    _, folder = run
    with pytest.raises(ValueError, match=r"SparsityRampCallback.pattern: pruning is permanent"):
        _resume(folder / "step=12.ckpt", callbacks=_callbacks(pattern="row"), resume_config_change="apply")


def test_resume_config_change_is_validated():
    with pytest.raises(ValueError, match="resume_config_change"):
        _make(resume_config_change="ignore")


def test_checkpoint_without_stored_configuration_resumes_with_a_warning(run, tmp_path):
    """A checkpoint of the first format (no configuration, full server values in state_dict) still resumes exactly."""
    fed, folder = run
    ckpt = to_module_layout(torch.load(folder / "step=4.ckpt", weights_only=True))  # the first format's layout
    section = ckpt["fedprune"]
    for name, values in section.pop("server_values").items():
        key = f"task.{name}"
        ckpt["state_dict"][key] = ckpt["state_dict"][key].masked_scatter(~section["pruning"]["masks"][name], values)
    del section["config"]
    section["version"] = 1
    torch.save(ckpt, tmp_path / "v1.ckpt")
    with pytest.warns(UserWarning, match="older lightning-fedprune: its configuration is not checked"):
        resumed, _ = _resume(tmp_path / "v1.ckpt")
    _assert_same_state(fed.task, resumed.task)


class Payload:
    """Stands for any pickled object a checkpoint should not be able to smuggle in."""


@pytest.mark.parametrize("entry", ["load_from_checkpoint", "export"])
def test_pickled_objects_in_a_checkpoint_are_refused(run, tmp_path, entry):
    _, folder = run
    ckpt = torch.load(folder / "step=4.ckpt", weights_only=True)
    ckpt["extra"] = Payload()
    torch.save(ckpt, tmp_path / "pickle.ckpt")
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        if entry == "load_from_checkpoint":
            FederatedLightningModule.load_from_checkpoint(tmp_path / "pickle.ckpt")
        else:
            export_task_checkpoint(tmp_path / "pickle.ckpt", tmp_path / "out.ckpt")
