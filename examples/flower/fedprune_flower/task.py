"""What the app builds from a fedprune YAML — the same file `fedprune fit --config` runs.

* the ServerApp: the Trainer, the FederatedLightningModule with its callbacks and the data module
  (LightningCLI, as `fedprune fit`), with a FlowerExecutor attached to the ServerApp's Grid;
* a node: the task and its clients' data, from the YAML text every job carries (plus the node's own
  ``overrides``), so a node needs no copy of the YAML and cannot train a different model.
"""

from __future__ import annotations

import contextlib
import shlex
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

from lightning_fedprune.cli import FedPruneCLI, build_cli
from lightning_fedprune.federated.client import ClientData
from lightning_fedprune.federated.flower import FlowerExecutor


def config_path(value: Any) -> Path:
    """The YAML of the run config's ``config``: an absolute path, or one relative to the working directory."""
    path = Path(str(value)).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"run config `config`={str(value)!r}: no such file (a relative path is resolved against {Path.cwd()}, the "
            "working directory of the SuperLink / simulation). Give an absolute path: flwr run examples/flower "
            "--run-config 'config=\"/abs/path/to/run.yaml\"'."
        )
    return path.resolve()


def fit(grid: Any, run_config: Mapping[str, Any]) -> FedPruneCLI:
    """``fedprune fit --config <config> <overrides>`` with the clients on the Grid's nodes; returns the CLI."""
    cli = server_cli(grid, run_config)
    ckpt_path = str(run_config.get("ckpt-path", "")) or None
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt_path)
    return cli


def server_cli(grid: Any, run_config: Mapping[str, Any]) -> FedPruneCLI:
    """The Trainer, module and data module of the run config's YAML, the module's executor a FlowerExecutor
    attached to ``grid`` (the YAML's own FlowerExecutor settings are kept; any other executor is replaced)."""
    path = config_path(run_config["config"])
    overrides = shlex.split(str(run_config.get("overrides", "")))
    quiet = ["--quiet=true"] if run_config.get("quiet", True) else []
    with _own_argv():
        cli = build_cli(["--config", str(path), *quiet, *overrides], run=False)
    fed = cli.model
    executor = fed.executor
    if not isinstance(executor, FlowerExecutor):  # the YAML's own executor runs elsewhere: Flower replaces it
        executor = FlowerExecutor(round_timeout=float(run_config.get("round-timeout", 600.0)),
                                  node_timeout=float(run_config.get("node-timeout", 120.0)))
    executor.attach(grid, {"config": path.read_text(), "overrides": overrides})
    fed.executor = executor
    return cli


def build_client(app: Mapping[str, Any], node_config: Mapping[str, Any]) -> tuple[pl.LightningModule, ClientData]:
    """A node's task and clients' data: the job's YAML and overrides, then the node's own ``overrides``."""
    node_overrides = shlex.split(str(node_config.get("overrides", "")))
    args = ["--config", str(app["config"]), *app.get("overrides", []), "--trainer.logger=false", "--quiet=true",
            *node_overrides]
    with _own_argv():
        cli = build_cli(args, run=False)
    return cli.model.task, cli.datamodule.client_data()


@contextlib.contextmanager
def _own_argv() -> Iterator[None]:
    """The process's command line is Flower's (or the node worker's), not fedprune arguments: LightningCLI
    reads only the ones given to it."""
    argv = sys.argv
    sys.argv = argv[:1]
    try:
        yield
    finally:
        sys.argv = argv
