"""``fedprune ablate``: the evidence harness. A grid of ordinary ``fedprune fit`` runs (configurations x
seeds on one base YAML, with an optional shared warm start per seed, :mod:`~lightning_fedprune.ablation.grid`),
run resumably and in parallel (:mod:`~lightning_fedprune.ablation.runner`), analysed with paired tests,
equivalence tests and Holm's correction (:mod:`~lightning_fedprune.ablation.stats`,
:mod:`~lightning_fedprune.ablation.analysis`) and published as results.json, a Markdown page, a figure and a
README block (:mod:`~lightning_fedprune.ablation.report`). See docs/ablation.md.
"""

from lightning_fedprune.ablation.analysis import analyse
from lightning_fedprune.ablation.command import ablate_main
from lightning_fedprune.ablation.grid import Cell, Grid, apply_overrides, load_grid
from lightning_fedprune.ablation.record import CellRecord, WarmStartCheckpoint
from lightning_fedprune.ablation.runner import GridRunner

__all__ = ["Cell", "CellRecord", "Grid", "GridRunner", "WarmStartCheckpoint", "ablate_main", "analyse",
           "apply_overrides", "load_grid"]
