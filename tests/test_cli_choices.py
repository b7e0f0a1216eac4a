"""Choice arguments are typed: `--help` shows the choices and the parser rejects a typo before anything is built."""

from __future__ import annotations

import typing
from pathlib import Path

import pytest

from lightning_fedprune import FederatedDataModule, FederatedLightningModule
from lightning_fedprune.baselines import FederatedDropout, PruneFL
from lightning_fedprune.callbacks import AdaptiveLayerSparsity, SparsityRampCallback
from lightning_fedprune.cli import build_cli

ROOT = Path(__file__).resolve().parent.parent

#: (class, argument, the choices its annotation must offer)
CHOICES = [
    (FederatedLightningModule, "server_optimizer", {"sgd", "sgdm", "adam"}),
    (FederatedLightningModule, "weighting", {"num_samples", "num_examples", "uniform"}),
    (FederatedLightningModule, "executor", {"sequential", "process", "flower"}),
    (FederatedLightningModule, "start_method", {"fork", "spawn", "forkserver"}),
    (FederatedLightningModule, "client_gradient_clip_algorithm", {"norm", "value"}),
    (FederatedLightningModule, "payload_bits", {8, 4}),
    (FederatedLightningModule, "resume_config_change", {"error", "apply"}),
    (SparsityRampCallback, "schedule", {"one_shot", "linear", "cubic", "step"}),
    (SparsityRampCallback, "pattern", {"unstructured", "row", "column", "half_row", "half_column"}),
    (SparsityRampCallback, "importance", {"weight_l1", "weight_l2", "gradient_l1", "gradient_l2", "momentum_l1",
                                          "momentum_l2", "weight_x_gradient", "sq_gradient_l1"}),
    (SparsityRampCallback, "momentum_source", {"ema", "server_optimizer"}),
    (AdaptiveLayerSparsity, "normalize", {"fan_in", "none"}),
    (AdaptiveLayerSparsity, "method", {"power", "global"}),
    (FederatedDataModule, "partition", {"iid", "dirichlet", "by_key"}),
    (FederatedDropout, "server_optimizer", {"sgd", "sgdm", "adam"}),
    (PruneFL, "pattern", {"unstructured", "row", "column", "half_row", "half_column"}),
    (PruneFL, "statistics", {"clients", "server"}),
]


def _literal_values(annotation) -> set:
    values = set()
    for arg in typing.get_args(annotation) or ():
        values |= _literal_values(arg)
    if typing.get_origin(annotation) is typing.Literal:
        values |= set(typing.get_args(annotation))
    return values


@pytest.mark.parametrize("cls, arg, choices", CHOICES, ids=[f"{c.__name__}.{a}" for c, a, _ in CHOICES])
def test_choice_arguments_are_literals_with_every_choice(cls, arg, choices):
    hints = typing.get_type_hints(cls.__init__, include_extras=True)
    assert _literal_values(hints[arg]) == choices


@pytest.mark.parametrize("override, arg", [
    ("--model.server_optimizer=adamw", "server_optimizer"),
    ("--model.weighting=by_size", "weighting"),
    ("--model.payload_bits=16", "payload_bits"),
    ("--data.init_args.partition=dirichlett", "partition"),
])
def test_the_parser_rejects_a_typo_naming_the_argument(override, arg, capsys):
    with pytest.raises(SystemExit):
        build_cli(["fit", "--config", str(ROOT / "examples/quickstart.yaml"), override], run=False)
    err = capsys.readouterr().err
    assert arg in err and "Literal" in err


def test_help_lists_the_choices(capsys):
    with pytest.raises(SystemExit):
        build_cli(["fit", "--help"], run=False)
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps long lines
    assert "Literal['sgd', 'sgdm', 'adam']" in out and "Literal['num_samples', 'num_examples', 'uniform']" in out
