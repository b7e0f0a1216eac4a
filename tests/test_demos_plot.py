"""The demo task/data and the run plot: arguments checked at construction, naming the argument."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from lightning_fedprune.demos import GaussianMixtureDataset, MLPClassifier


@pytest.mark.parametrize("ctor, kwargs, message", [
    (GaussianMixtureDataset, dict(num_samples=0), "`num_samples` must be a positive integer, got 0."),
    (GaussianMixtureDataset, dict(dim=2.0), "`dim` must be a positive integer, got 2.0."),
    (GaussianMixtureDataset, dict(num_classes=1), "`num_classes` must be an integer >= 2, got 1."),
    (GaussianMixtureDataset, dict(noise=-1.0), "`noise` must be a finite number >= 0, got -1.0."),
    (GaussianMixtureDataset, dict(seed="0"), "`seed` must be an integer, got '0' (a str)."),
    (MLPClassifier, dict(in_dim=0), "`in_dim` must be a positive integer, got 0."),
    (MLPClassifier, dict(depth=-1), "`depth` must be an integer >= 0, got -1."),
    (MLPClassifier, dict(lr=0.0), "`lr` must be a finite number > 0, got 0.0."),
    (MLPClassifier, dict(momentum=math.nan), "`momentum` must be a finite number >= 0, got nan."),
    (MLPClassifier, dict(weight_decay="1e-3"), "`weight_decay` must be a finite number >= 0, got '1e-3' (a str)."),
])
def test_demo_arguments_are_checked(ctor, kwargs, message):
    with pytest.raises(ValueError) as info:
        ctor(**kwargs)
    assert str(info.value) == message


def test_demo_defaults_still_build():
    ds = GaussianMixtureDataset(num_samples=10, dim=4, num_classes=3, noise=0)
    x, y = ds[0]
    assert x.shape == (4,) and 0 <= int(y) < 3
    assert MLPClassifier(in_dim=4, hidden=8, num_classes=3, depth=0)(x[None]).shape == (1, 3)


@pytest.fixture()
def run_dir(tmp_path: Path) -> Path:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path / "run"))
    for step in range(4):
        writer.add_scalar("val/acc", 0.5 + 0.1 * step, step)
        writer.add_scalar("prune/sparsity", 0.1 * step, step)
        writer.add_scalar("prune/phase", min(step, 3), step)
    writer.close()
    return tmp_path / "run"


def test_plot_run_and_its_argument_checks(run_dir: Path, tmp_path: Path):
    pytest.importorskip("matplotlib")
    from lightning_fedprune.observers.plot import plot_run, read_scalars

    assert [v for _, v in read_scalars(run_dir)["prune/sparsity"]] == pytest.approx([0.0, 0.1, 0.2, 0.3])
    out = plot_run(run_dir, tmp_path / "img" / "run.png")  # val/acc: the first default metric logged
    assert out.read_bytes().startswith(b"\x89PNG")
    with pytest.raises(ValueError, match=r"^`metric` 'val/wer' is not logged in .*; logged scalars: \['prune/phase', "):
        plot_run(run_dir, tmp_path / "x.png", metric="val/wer")
    with pytest.raises(ValueError, match=r"^`log_dir` does not exist: .*nowhere"):
        plot_run(tmp_path / "nowhere", tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"^`out` is an existing directory"):
        plot_run(run_dir, tmp_path)
    with pytest.raises(ValueError, match=r"^`metric` must be a non-empty string or None, got 3\.$"):
        plot_run(run_dir, tmp_path / "x.png", metric=3)
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("points, joined", [(2, False), (1, False), (3, True), (8, True)])
def test_plot_draws_each_validation_as_a_marker_and_joins_only_a_series(points, joined):
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lightning_fedprune.observers.plot import make_figure

    steps = [19 + 20 * i for i in range(points)]
    values = [0.1 / (i + 1) for i in range(points)]
    scalars = {"val/wer": list(zip(steps, values)), "prune/sparsity": [(r, min(0.3, r / 60)) for r in range(40)]}
    fig = make_figure(scalars, "val/wer")
    try:
        ax = fig.axes[0]
        (line,) = [ln for ln in ax.get_lines() if ln.get_label() == "val/wer"]
        assert line.get_marker() == "o" and list(line.get_xdata()) == steps
        assert (line.get_linestyle() != "None") == joined  # two validations are two markers, not a line
        labels = [t.get_text() for t in ax.texts if t.get_text().startswith("0.")]
        assert labels == ([] if joined else [f"{v:.4g}" for v in values])
    finally:
        plt.close(fig)
