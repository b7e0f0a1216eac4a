"""The ServerApp: `fedprune fit` of the run config's YAML, its clients trained on the federation's nodes."""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedprune_flower.task import fit

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    fit(grid, context.run_config)
