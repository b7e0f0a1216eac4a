"""Checkpoints of federated runs: what they hold, how a file is checked, resume with a changed
configuration, and export of the plain task for serving.

A checkpoint of a :class:`~lightning_fedprune.FederatedLightningModule` is an ordinary Lightning
checkpoint **of the task**: its ``state_dict`` has the task's own keys and ``hyper_parameters`` the task's
own, so ``MyTask.load_from_checkpoint("…/last.ckpt")`` loads the trained model as it loads a checkpoint of a
plain ``Trainer``. The ``state_dict`` holds the *pruned* model whenever masks exist (pruned entries are
exact zeros): the model clients get and evaluation sees. Its ``"fedprune"`` section holds

* ``pruning``: the :class:`~lightning_fedprune.pruning.state.PruningState` (masks, per-layer
  sparsity, phase, importance statistics);
* ``server_values``: ``{parameter name: 1-D tensor}``, the server's values of the pruned entries
  (in ``mask == False`` order). The server keeps them, restorable, until pruning is made permanent;
  :func:`restore_federated_state` puts them back into ``state_dict`` before Lightning loads it, so a
  resumed run continues bit for bit;
* ``config``: the federation and pruning configuration (:func:`run_config`), compared on resume;
* ``hyper_parameters`` (and ``hparams_name``): the federated module's own, from which
  ``FederatedLightningModule.load_from_checkpoint`` rebuilds it (:func:`to_module_layout` turns the file
  back into the module's layout: its keys under ``task.``, its hyperparameters at the top).

The task is recorded in the module's hyperparameters as ``task: {"class_path", "init_args"}``
(:func:`task_spec`), so ``FederatedLightningModule.load_from_checkpoint(path)`` rebuilds it, and
:func:`export_task_checkpoint` writes a checkpoint of the plain task that ``Task.load_from_checkpoint``
reads.
"""

from __future__ import annotations

import importlib
import inspect
import io
import os
import warnings
import zipfile
from pathlib import Path
from typing import Any, Literal, get_args

import lightning.pytorch as pl
import torch
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor

from lightning_fedprune._compat import _WrappingCheckpointIO
from lightning_fedprune.federated.protocol import OptimState
from lightning_fedprune.pruning.masking import pruned, pruned_values, restore_pruned
from lightning_fedprune.pruning.state import PruningState

# The functions below take the federated module (``fed``) as a LightningModule with a ``pruning`` state:
# this module sits below module.py (which calls it from its checkpoint hooks), so it does not import it.

# 4: the server optimiser's state is the strategy's; 3: the file is a checkpoint of the task (its keys, its
# hyperparameters); 2: of the module
FORMAT_VERSION = 4
TASK_PREFIX = "task."  # the task's keys in the federated module's state_dict
HPARAMS_KEYS = ("hyper_parameters", "hparams_name")  # Lightning's checkpoint keys of a module's hyperparameters
ResumeConfigChange = Literal["error", "apply"]
RESUME_CONFIG_CHANGES: tuple[str, ...] = get_args(ResumeConfigChange)
# Pruning settings that shape the masks: once the masks are frozen (fine-tuning) they cannot change.
# None = every field of that callback, and adding or removing the callback.
MASK_SHAPING: dict[str, set[str] | None] = {
    "SparsityRampCallback": {"target_sparsity", "pattern", "importance", "parameters", "exclude", "targets"},
    "AdaptiveLayerSparsity": None,
    "FineTuneFreeze": None,
}


# A checkpoint taken after a round holds the state after the server step, which is what a round-level
# checkpoint should hold; Lightning's generic warning about manual optimisation does not apply.
warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization", category=UserWarning)


class _Absent:
    """The value of a setting (or callback) that one side of a comparison does not have."""

    def __repr__(self) -> str:
        return "<absent>"


_ABSENT = _Absent()


class CheckpointError(ValueError):
    """A file that is not a valid checkpoint (empty, truncated, not a zip archive, damaged)."""


# ---------------------------------------------------------------------------------------------- file checks
def validate_checkpoint_file(path: Any) -> None:
    """Raise :class:`CheckpointError` naming ``path`` unless it is an intact torch zip archive.

    ``torch.save`` writes a zip archive with a CRC-32 per record; ``torch.load`` does not check them,
    so a damaged tensor would load silently. This reads every record and checks its CRC (the cost is
    one read of the file: see docs/troubleshooting.md). Paths that are not local files (URLs,
    file objects, missing files) are left to the loader and its own errors.
    """
    if not isinstance(path, (str, os.PathLike)):
        return
    p = Path(path)
    if not p.is_file():
        return
    if p.stat().st_size == 0:
        raise CheckpointError(f"{p} is not a valid checkpoint: the file is empty.")
    with open(p, "rb") as f:
        head = f.read(4)
    try:
        archive = zipfile.ZipFile(p)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        if head == b"PK\x03\x04":
            raise CheckpointError(
                f"{p} is not a valid checkpoint: it is truncated (it starts as a zip archive but its end, the zip "
                "directory, is missing; was the copy or the write interrupted?)."
            ) from None
        raise CheckpointError(
            f"{p} is not a valid checkpoint: it is not a zip archive (torch checkpoints are zip files; this one "
            f"starts with {head!r})."
        ) from None
    with archive:
        records = archive.infolist()
        if not any(r.filename.endswith("/data.pkl") for r in records):
            raise CheckpointError(f"{p} is not a valid checkpoint: a zip archive without a torch data.pkl record.")
        for record in records:
            try:
                with archive.open(record) as stream:  # zipfile checks the CRC-32 when the record is read to its end
                    while stream.read(1 << 24):
                        pass
            except (zipfile.BadZipFile, EOFError, OSError, ValueError) as err:
                if "CRC" in str(err):
                    raise CheckpointError(
                        f"{p} is not a valid checkpoint: record {record.filename!r} failed its CRC check (the file "
                        "is damaged)."
                    ) from None
                raise CheckpointError(f"{p} is not a valid checkpoint: record {record.filename!r} is damaged ({err}).") from None


class ValidatingCheckpointIO(_WrappingCheckpointIO):
    """Runs :func:`validate_checkpoint_file` before the wrapped CheckpointIO loads a file.

    ``trainer.fit/validate/test(ckpt_path=...)`` load the file through the strategy's CheckpointIO
    after the module's ``setup``; the module installs this wrapper there
    (:func:`install_checkpoint_validation`), which delegates everything else. The file is read to the host
    (``map_location="cpu"`` unless given): Lightning moves the state where the model is, so a checkpoint written
    on a GPU resumes on a machine without one.
    """

    def load_checkpoint(self, path: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        validate_checkpoint_file(path)
        if not args:
            kwargs.setdefault("map_location", "cpu")
        return super().load_checkpoint(path, *args, **kwargs)

    def teardown(self) -> None:
        if self.checkpoint_io is not None:
            self.checkpoint_io.teardown()


def install_checkpoint_validation(trainer: pl.Trainer) -> None:
    strategy = trainer.strategy
    if not isinstance(strategy.checkpoint_io, ValidatingCheckpointIO):
        strategy.checkpoint_io = ValidatingCheckpointIO(strategy.checkpoint_io)


# ---------------------------------------------------------------------------------------------- the task
def _is_plain(value: Any) -> bool:
    """Values ``torch.load(weights_only=True)`` and YAML both read back."""
    if value is None or isinstance(value, (bool, int, float, str, Tensor)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_is_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_plain(v) for k, v in value.items())
    return False


def task_spec(task: pl.LightningModule) -> dict[str, Any]:
    """``{"class_path", "init_args"}`` that rebuilds ``task``: its class and its ``save_hyperparameters``.

    ``init_args`` is None when they are unknown: the task records no hyperparameters although its
    class takes arguments, or they are not plain values (checkpoints are loaded with
    ``weights_only=True``). Loading then needs ``task=``.
    """
    cls = type(task)
    hparams = dict(task.hparams)
    name = getattr(task, "_hparams_name", None)
    takes_args = any(p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
                     for p in list(inspect.signature(cls.__init__).parameters.values())[1:])
    init_args: dict[str, Any] | None
    if not hparams:
        init_args = None if takes_args else {}
    elif not _is_plain(hparams):
        init_args = None
    elif name not in (None, "kwargs"):  # save_hyperparameters(namespace): the class takes it as one argument
        init_args = {name: hparams}
    else:
        init_args = hparams
    return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": init_args}


def _import_class(class_path: str) -> type:
    parts = class_path.split(".")
    for i in range(len(parts) - 1, 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        try:
            for attr in parts[i:]:
                obj = getattr(obj, attr)
        except AttributeError:
            break
        return obj
    where = (" (it was defined in the script that was run, `__main__`; define it in a module to load it by name)"
             if class_path.startswith("__main__.") else "")
    raise ImportError(f"`task`: cannot import {class_path!r}{where}: pass the task, e.g. "
                      f"`load_from_checkpoint(path, task={parts[-1]}(...))`.")


def instantiate_task(spec: Any) -> pl.LightningModule:
    """Build the task from a :func:`task_spec` dict (imports its class; it must be a LightningModule)."""
    if not isinstance(spec, dict) or not isinstance(spec.get("class_path"), str):
        raise TypeError(f"`task` must be a LightningModule or a dict {{'class_path': ..., 'init_args': {{...}}}}, got {spec!r}.")
    class_path = spec["class_path"]
    cls = _import_class(class_path)
    if not (isinstance(cls, type) and issubclass(cls, pl.LightningModule)):
        raise TypeError(f"`task`: {class_path!r} is not a LightningModule class.")
    init_args = spec.get("init_args", {})
    if init_args is None:
        raise ValueError(
            f"The task {class_path} was saved without its constructor arguments (its __init__ does not call "
            f"`self.save_hyperparameters()`, or they are not plain values): pass the task, e.g. "
            f"`load_from_checkpoint(path, task={cls.__name__}(...))`."
        )
    params = inspect.signature(cls.__init__).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        init_args = {k: v for k, v in init_args.items() if k in params}
    try:
        return cls(**init_args)
    except TypeError as err:
        raise TypeError(
            f"The task {class_path} cannot be rebuilt from its recorded hyperparameters ({err}): pass the task, e.g. "
            f"`load_from_checkpoint(path, task={cls.__name__}(...))`."
        ) from err


# ---------------------------------------------------------------------------------------------- configuration
def federation_config(fed: pl.LightningModule) -> dict[str, Any]:
    """The module's settings that change the computation (the effective values: local_epochs is 1 when
    neither local_steps nor local_epochs was given; only the server optimiser's own settings)."""
    cc = fed.client_config if fed.client_config is not None else fed.client_settings
    config: dict[str, Any] = {
        "task": fed.hparams_initial.get("task"),
        "clients_per_round": fed.clients_per_round,
        "local_steps": cc.local_steps,
        "local_epochs": cc.local_epochs,
        "seed": fed.seed,
        "compact_clients": cc.compact,
        "client_gradient_clip_val": cc.gradient_clip_val,
        **fed.strategy.config(),  # server_optimizer, server_lr, weighting and the strategy's own settings
    }
    if cc.gradient_clip_val is not None:
        config["client_gradient_clip_algorithm"] = cc.gradient_clip_algorithm
    if cc.payload_bits is not None:
        config["payload_bits"] = cc.payload_bits
    return config


def run_config(fed: pl.LightningModule) -> dict[str, dict[str, Any]]:
    """``{"FederatedLightningModule": federation_config, "<PruningCallback>": its part of the plan, ...}``
    (the ramp's part also lists the parameter names its regexes selected, ``targets``)."""
    config = {"FederatedLightningModule": federation_config(fed), **fed.pruning.plan.config()}
    if "SparsityRampCallback" in config:
        config["SparsityRampCallback"]["targets"] = list(fed.pruning.targets)
    return config


def _comparable(value: Any) -> Any:
    """Tuples and lists compare equal (YAML and the CLI give lists); tensors compare by value."""
    if isinstance(value, Tensor):
        return ("tensor", value.dtype, value.tolist())
    if isinstance(value, (list, tuple)):
        return [_comparable(v) for v in value]
    if isinstance(value, dict):
        return {k: _comparable(v) for k, v in value.items()}
    return value


def config_changes(saved: dict[str, Any], now: dict[str, Any], prefix: str = "") -> list[tuple[str, Any, Any]]:
    """``[(dotted name, checkpoint value, current value)]`` of every differing field; a callback present
    on one side only is one entry whose value on the other side prints as ``<absent>``."""
    changes: list[tuple[str, Any, Any]] = []
    for key in dict.fromkeys([*saved, *now]):
        a, b = saved.get(key, _ABSENT), now.get(key, _ABSENT)
        name = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict) and a and b:
            changes += config_changes(a, b, prefix=f"{name}.")
        elif _comparable(a) != _comparable(b):
            changes.append((name, a, b))
    return changes


def _refusals(changes: list[tuple[str, Any, Any]], saved_pruning: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """Changes that cannot take effect consistently, with the reason (refused even with ``"apply"``)."""
    from lightning_fedprune.pruning.importance import get_importance

    reasons = []
    frozen = bool(saved_pruning.get("frozen")) or bool(saved_pruning.get("permanent"))
    has_masks = bool(saved_pruning.get("masks"))
    for name, _, _ in changes:
        section, _, field = name.partition(".")
        if section in MASK_SHAPING and frozen and (MASK_SHAPING[section] is None or field in MASK_SHAPING[section]):
            why = "pruning is permanent (the pruned values are gone)" if saved_pruning.get("permanent") \
                else "fine-tuning has started (the masks are frozen)"
            reasons.append(f"{name}: {why}; the pattern and sparsity can no longer change")
    if has_masks and "SparsityRampCallback" not in now:
        reasons.append("SparsityRampCallback: the checkpoint has masks, a run without the ramp cannot keep them consistent")
    ramp = now.get("SparsityRampCallback")
    changed_sections = {name.partition(".")[0] for name, _, _ in changes}
    if ramp is not None and not frozen and changed_sections & {"SparsityRampCallback", "AdaptiveLayerSparsity"}:
        needed = get_importance(ramp["importance"]).needs
        if needed == "momentum" and ramp["momentum_source"] == "server_optimizer":
            needed = None
        if "ClientStatistics" in now:  # the clients upload it before the next recomputation
            needed = None
        if needed is not None:
            missing = [t for t in ramp["targets"] if t not in saved_pruning.get(needed, {})]
            if missing:
                reasons.append(
                    f"SparsityRampCallback.importance: {ramp['importance']!r} needs server-side {needed} statistics, "
                    f"which the checkpoint lacks for {missing[:4]}{' ...' if len(missing) > 4 else ''}"
                )
    return reasons


def check_resume_config(fed: pl.LightningModule, checkpoint: dict[str, Any]) -> bool:
    """On resume, compare the checkpoint's configuration with the current one; returns whether the masks must be
    recomputed under a changed plan when training starts.

    ``resume_config_change="error"`` refuses any difference with one message listing every field;
    ``"apply"`` warns with the list and makes the new configuration take effect (see
    docs/troubleshooting.md), except for changes that cannot (e.g. the pattern after fine-tuning
    started), which are refused with the reason. A different server optimiser starts from a fresh state; the
    same one keeps its state (momentum, moments) with the new settings.
    """
    trainer = fed.trainer
    section = checkpoint["fedprune"]
    saved = section.get("config")
    where = trainer.ckpt_path or "the checkpoint"
    if saved is None:
        warnings.warn(f"{where} was written by an older lightning-fedprune: its configuration is not checked on resume.",
                      stacklevel=2)
        return False
    now = run_config(fed)
    changes = config_changes(saved, now)
    if not changes:
        return False
    listing = "\n".join(f"  {name}: checkpoint={a!r}, now={b!r}" for name, a, b in changes)
    if fed.resume_config_change == "error":
        raise ValueError(
            f"Resuming from {where} with a configuration that differs from the checkpoint's:\n{listing}\n"
            "Restore these settings, or pass `resume_config_change='apply'` to FederatedLightningModule "
            "(`--model.resume_config_change apply` with the CLI) to continue with the new ones (docs/troubleshooting.md)."
        )
    refused = _refusals(changes, section["pruning"], now)
    if refused:
        raise ValueError(f"Resuming from {where}: these changes cannot be applied:\n"
                         + "\n".join(f"  {r}" for r in refused))
    names = {name for name, _, _ in changes}
    if {"FederatedLightningModule.server_optimizer", "FederatedLightningModule.strategy"} & names:
        section.pop("strategy", None)  # a different server optimiser starts afresh
    warnings.warn(f"Resuming from {where} with a changed configuration (resume_config_change='apply'):\n{listing}",
                  stacklevel=2)
    return any(n.partition(".")[0] in ("SparsityRampCallback", "AdaptiveLayerSparsity") for n in names)


# ---------------------------------------------------------------------------------------------- save / load
def _state_keys(task: torch.nn.Module) -> dict[str, list[str]]:
    """Every state_dict key of each parameter (a tied parameter has several)."""
    by_param: dict[int, list[str]] = {}
    for name, p in task.named_parameters(remove_duplicate=False):
        by_param.setdefault(id(p), []).append(name)
    return {name: by_param[id(p)] for name, p in task.named_parameters()}


def save_federated_state(fed: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
    """Prune ``checkpoint["state_dict"]`` and add the ``"fedprune"`` section (called by ``on_save_checkpoint``)."""
    state = fed.pruning
    sd = checkpoint["state_dict"]
    server_values: dict[str, Tensor] = {}
    if not state.permanent:
        keys = _state_keys(fed.task)
        for name, mask in state.masks.items():
            first = sd[TASK_PREFIX + name]
            server_values[name] = pruned_values(first, mask)
            for key in keys[name]:
                sd[TASK_PREFIX + key] = pruned(first, mask)  # a new tensor: the live model is untouched
    clock = fed.client_clock
    section = checkpoint["fedprune"] = {
        "version": FORMAT_VERSION,
        "pruning": state.state_dict(),
        "server_values": server_values,
        "config": run_config(fed),
        "strategy": fed.strategy.state_dict(),
        "channel": fed.channel.state_dict(),
        "client_clock": {"global_step": clock.global_step, "epoch": clock.epoch},
    }
    _to_task_layout(fed.task, checkpoint, section)


def _to_task_layout(task: pl.LightningModule, checkpoint: dict[str, Any], section: dict[str, Any]) -> None:
    """Make ``checkpoint`` a checkpoint of ``task``: its keys without ``task.``, its hyperparameters at the top;
    the module's hyperparameters move into ``section``."""
    for key in HPARAMS_KEYS:
        if key in checkpoint:
            section[key] = checkpoint.pop(key)
    if task.hparams:
        checkpoint["hyper_parameters"] = dict(task.hparams)
        if getattr(task, "_hparams_name", None) is not None:
            checkpoint["hparams_name"] = task._hparams_name
    sd = checkpoint["state_dict"]
    checkpoint["state_dict"] = type(sd)((k[len(TASK_PREFIX):], v) for k, v in sd.items())


def to_module_layout(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """Turn a federated checkpoint read from a file into the layout of the module that wrote it, in place:
    the state_dict's keys under ``task.``, the module's hyperparameters at the top (a no-op for older files
    and for a checkpoint already in that layout). Returns ``checkpoint``."""
    section = checkpoint.get("fedprune")
    if not isinstance(section, dict) or section.get("version", 0) < 3 or section.get("layout") == "module":
        return checkpoint
    for key in HPARAMS_KEYS:
        checkpoint.pop(key, None)
        if key in section:
            checkpoint[key] = section[key]
    sd = checkpoint["state_dict"]
    checkpoint["state_dict"] = type(sd)((TASK_PREFIX + k, v) for k, v in sd.items())
    section["layout"] = "module"
    return checkpoint


def module_layout_file(path: Any, map_location: Any = None, weights_only: bool | None = None) -> io.BytesIO:
    """The checkpoint at ``path`` in the federated module's layout (:func:`to_module_layout`), as a file Lightning's
    ``load_from_checkpoint`` reads (default ``map_location``: the CPU, so a GPU run's checkpoint loads anywhere)."""
    checkpoint = torch.load(path, map_location=map_location or "cpu", weights_only=weights_only)
    buffer = io.BytesIO()
    torch.save(to_module_layout(checkpoint), buffer)
    buffer.seek(0)
    return buffer


def federated_hyperparameters(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The federated module's hyperparameters of a checkpoint (either layout)."""
    section = checkpoint.get("fedprune")
    if isinstance(section, dict) and section.get("version", 0) >= 3 and section.get("layout") != "module":
        return dict(section.get("hyper_parameters") or {})
    return dict(checkpoint.get("hyper_parameters") or {})


def restore_federated_state(fed: pl.LightningModule, checkpoint: dict[str, Any]) -> bool:
    """Load the ``"fedprune"`` section (called by ``on_load_checkpoint``, before Lightning loads the state_dict);
    returns whether the masks must be recomputed under a changed plan when training starts.

    Resuming a fit (``trainer.fit(ckpt_path=...)``) first compares the configuration
    (:func:`check_resume_config`), then restores the server optimiser's state (the strategy's), the
    channel's residual and the clients' schedule position, and puts the server's pruned values back into
    ``state_dict``, so training continues from the exact server state. Any other load (``load_from_checkpoint``,
    ``trainer.validate/test/predict(ckpt_path=...)``) gives the pruned model, like Lightning's own loading
    leaves out the optimiser state.
    """
    section = checkpoint.get("fedprune")
    if section is None:
        return False
    to_module_layout(checkpoint)
    _migrate(section, checkpoint)
    resuming = fed._trainer is not None and fed.trainer.state.fn == TrainerFn.FITTING
    reapply = check_resume_config(fed, checkpoint) if resuming else False
    fed.pruning.load_state_dict(section["pruning"])
    if not resuming:
        return False
    fed.strategy.load_state_dict(section.get("strategy", {}))
    fed.channel.load_state_dict(section.get("channel", {}))
    clock = section.get("client_clock", {})
    fed.client_clock = OptimState(global_step=int(clock.get("global_step", 0)), epoch=int(clock.get("epoch", 0)))
    sd = checkpoint["state_dict"]
    keys = _state_keys(fed.task)
    for name, values in section.get("server_values", {}).items():
        for key in keys[name]:
            sd[TASK_PREFIX + key] = restore_pruned(sd[TASK_PREFIX + key], fed.pruning.masks[name], values)
    return reapply


def _migrate(section: dict[str, Any], checkpoint: dict[str, Any]) -> None:
    """Older sections: the server optimiser was the first of Lightning's optimisers (before version 4), the
    channel's residual was ``downlink_residual``."""
    if section.get("version", 0) < 4:
        states = checkpoint.get("optimizer_states")
        if states and "strategy" not in section:
            section["strategy"] = {"optimizer": states.pop(0)}
        if "downlink_residual" in section:
            section["channel"] = {"residual": section.pop("downlink_residual")}
        section["version"] = FORMAT_VERSION


# ---------------------------------------------------------------------------------------------- export
def pruned_task_state_dict(fed: pl.LightningModule) -> dict[str, Tensor]:
    """The task's state_dict (keys without the ``task.`` prefix) with pruned entries set to exact zeros."""
    state = {k: v.detach().clone() for k, v in fed.task.state_dict().items()}
    keys = _state_keys(fed.task)
    for name, mask in fed.pruning.masks.items():
        for key in keys[name]:
            state[key] = pruned(state[key], mask)
    return state


def export_task_checkpoint(source: Any, out_path: str | os.PathLike) -> Path:
    """Write a Lightning checkpoint of the plain, pruned task, for serving: ``Task.load_from_checkpoint(out_path)``.

    Args:
        source: a :class:`~lightning_fedprune.FederatedLightningModule`, or the path of one of its checkpoints.
        out_path: where to write. The file holds ``state_dict`` (the task's keys, pruned entries exact
            zeros), ``hyper_parameters`` (the task's own), ``pytorch-lightning_version``, and
            ``fedprune_export`` (the task's class path, masks, patterns and sparsity).

    Returns:
        ``out_path`` as a Path.
    """
    if isinstance(source, pl.LightningModule) and isinstance(getattr(source, "pruning", None), PruningState):
        spec = source.hparams_initial["task"]
        state = pruned_task_state_dict(source)
        masks, patterns = dict(source.pruning.masks), dict(source.pruning.patterns)
        step = int(source.global_step) if source._trainer is not None else 0
        epoch = int(source.current_epoch) if source._trainer is not None else 0
    elif isinstance(source, (str, os.PathLike)):
        validate_checkpoint_file(source)
        ckpt = to_module_layout(torch.load(source, map_location="cpu", weights_only=True))
        spec = ckpt.get("hyper_parameters", {}).get("task")
        if "fedprune" not in ckpt or not isinstance(spec, dict):
            raise ValueError(f"{source} is not a checkpoint of a FederatedLightningModule written by this version "
                             "(no 'fedprune' section or no recorded task).")
        pruning = ckpt["fedprune"]["pruning"]
        masks, patterns = pruning["masks"], pruning["patterns"]
        state = {k[len(TASK_PREFIX):]: v for k, v in ckpt["state_dict"].items() if k.startswith(TASK_PREFIX)}
        for name, mask in masks.items():  # already pruned in this format; zeroing again is a no-op
            state[name] = pruned(state[name], mask)
        step, epoch = int(ckpt.get("global_step", 0)), int(ckpt.get("epoch", 0))
    else:
        raise TypeError(f"`source` must be a FederatedLightningModule or a checkpoint path, got {type(source).__name__}.")
    init_args = spec["init_args"]
    if init_args is None:
        warnings.warn(
            f"The task {spec['class_path']} recorded no hyperparameters: pass its constructor arguments to "
            "`load_from_checkpoint(path, ...)` when loading the export.", stacklevel=2)
    total = sum(m.numel() for m in masks.values())
    kept = sum(int(m.sum()) for m in masks.values())
    out = {
        "epoch": epoch,
        "global_step": step,
        "pytorch-lightning_version": pl.__version__,
        "state_dict": state,
        "hyper_parameters": dict(init_args or {}),
        "fedprune_export": {
            "class_path": spec["class_path"],
            "masks": {n: m.clone() for n, m in masks.items()},
            "patterns": dict(patterns),
            "sparsity": (1 - kept / total) if total else 0.0,
        },
    }
    out_path = Path(out_path)
    tmp = out_path.with_name(out_path.name + ".tmp")
    torch.save(out, tmp)
    os.replace(tmp, out_path)  # never a half-written export under the final name
    return out_path
