"""``fedprune ablate``: the evidence harness. A grid of ordinary ``fedprune fit`` runs (configurations x
seeds on one base YAML, :mod:`~lightning_fedprune.ablation.grid`), run resumably and in parallel
(:mod:`~lightning_fedprune.ablation.runner`), analysed with a stated rule per finding
(:mod:`~lightning_fedprune.ablation.analysis`) and published as results.json, a Markdown page and a
figure (:mod:`~lightning_fedprune.ablation.report`). See docs/ablation.md.
"""

from lightning_fedprune.ablation.analysis import analyse, compare
from lightning_fedprune.ablation.command import ablate_main
from lightning_fedprune.ablation.grid import Cell, Grid, apply_overrides, load_grid
from lightning_fedprune.ablation.record import CellRecord
from lightning_fedprune.ablation.runner import GridRunner

__all__ = ["Cell", "CellRecord", "Grid", "GridRunner", "ablate_main", "analyse", "apply_overrides", "compare",
           "load_grid"]
