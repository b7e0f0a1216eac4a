"""Pictures of the pruning (a per-layer sparsity bar chart and mask images) for TensorBoard and the
other loggers that take images."""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable

import lightning.pytorch as pl
import numpy as np
import torch.nn.functional as F
from lightning.pytorch.loggers import Logger, MLFlowLogger, TensorBoardLogger
from torch import Tensor

from lightning_fedprune.pruning.plan import Phase
from lightning_fedprune.pruning.state import PruningState
from lightning_fedprune.validation import check_bool, check_int, check_regex

CHART_TAG = "prune/layer_sparsity_chart"
MASK_TAG = "prune/mask/"


#: ``sink(tag, image, step)``: writes one image to one logger.
ImageSink = Callable[[str, np.ndarray, int], None]


class PruningImages(pl.Callback):
    """Logs images of the masks to the Trainer's loggers whenever the masks change (a ramp step, a
    refinement, the first masks after a resume).

    * ``prune/layer_sparsity_chart``: a horizontal bar chart of every masked parameter's actual
      sparsity, with the overall sparsity as a dashed line (drawn with matplotlib's Agg canvas, so
      it needs no display and leaves no figure open);
    * ``prune/mask/<parameter name>``: the mask of up to ``max_layers`` parameters as a picture of
      its 2-D view ``t.reshape(t.shape[0], -1)`` (rows = output units); white = kept, black = pruned.
      A mask larger than ``max_size`` pixels along a side is shrunk by averaging (grey = the kept
      fraction of the cell), a tiny one is enlarged by repeating pixels.

    Each logger gets them through its own image method: ``TensorBoardLogger`` (``add_image``), a logger
    with a ``log_image(key, images, step)`` method (``WandbLogger``) and ``MLFlowLogger``
    (``MlflowClient.log_image`` with ``key`` and ``step``). A logger without one (e.g. ``CSVLogger``),
    or no logger at all, gets a warning naming it, once, and no pictures.

    Change detection is cheap: the callback compares ``pl_module.pruning.last_update_round`` at the
    end of every round with the last round it drew.

    Args:
        max_layers: number of parameters whose mask is drawn (in the masks' order: the order of
            the task's parameters); ``0`` draws no mask pictures.
        layers: optional regular expression (``re.fullmatch`` over parameter names) choosing which
            masked parameters are drawn (still at most ``max_layers``).
        max_size: largest side of a mask picture in pixels (>= 8).
        bar_chart: draw the per-layer sparsity bar chart.
        dpi: resolution of the bar chart.
    """

    def __init__(self, max_layers: int = 4, layers: str | None = None, max_size: int = 256, bar_chart: bool = True,
                 dpi: int = 80) -> None:
        self.max_layers = check_int(max_layers, "max_layers", min=0)
        self._layers = check_regex(layers, "layers")
        self.layers = layers
        self.max_size = check_int(max_size, "max_size", min=8)
        self.bar_chart = check_bool(bar_chart, "bar_chart")
        self.dpi = check_int(dpi, "dpi", min=10, max=600)
        self._drawn_round: int | None = None
        self._warned: set[str] = set()
        self.images_logged = 0

    # ------------------------------------------------------------------ hooks
    def on_fed_round_end(self, trainer: pl.Trainer, pl_module: Any, summary: Any) -> None:
        state = getattr(pl_module, "pruning", None)
        if not isinstance(state, PruningState) or not state.masks:
            return
        if state.last_update_round == self._drawn_round:
            return
        self._drawn_round = state.last_update_round
        if not trainer.is_global_zero:
            return
        sinks = []
        for logger in trainer.loggers:
            sink = image_sink(logger)
            if sink is not None:
                sinks.append(sink)
            else:
                self._warn_once(f"PruningImages: {type(logger).__name__} has no image method, so it gets no pictures of "
                                "the masks (TensorBoardLogger, WandbLogger and MLFlowLogger do).")
        if not trainer.loggers:
            self._warn_once("PruningImages: the Trainer has no logger (logger=False), so no pictures of the masks are "
                            "logged.")
        if sinks:
            self.log_images(sinks, state, step=int(summary.round), round=int(summary.round))

    def _warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            warnings.warn(message, UserWarning, stacklevel=2)

    # ------------------------------------------------------------------ drawing
    def log_images(self, sinks: list[ImageSink], state: PruningState, step: int, round: int) -> None:
        """Draw the chart and the selected masks once and write them to every sink (see :func:`image_sink`)."""
        images: dict[str, np.ndarray] = {}
        if self.bar_chart:
            images[CHART_TAG] = sparsity_chart(state, round=round, dpi=self.dpi)
        for name in self.selected_layers(state):
            images[MASK_TAG + name] = mask_image(state.masks[name], self.max_size)
        for sink in sinks:
            for tag, img in images.items():
                sink(tag, img, step)
        self.images_logged += len(images) * len(sinks)

    def selected_layers(self, state: PruningState) -> list[str]:
        names = list(state.masks)
        if self._layers is not None:
            names = [n for n in names if self._layers.fullmatch(n)]
        return names[: self.max_layers]


def _uint8(img: np.ndarray) -> np.ndarray:
    return img if img.dtype == np.uint8 else (np.clip(img, 0, 1) * 255).round().astype(np.uint8)


def image_sink(logger: Logger) -> ImageSink | None:
    """How ``logger`` takes an image (``(H, W)`` float in ``[0, 1]`` or ``(H, W, 3)`` uint8), or None when it
    cannot: TensorBoard's ``add_image``, a ``log_image(key, images, step)`` method (``WandbLogger``), or
    ``MlflowClient.log_image`` for ``MLFlowLogger``."""
    if isinstance(logger, TensorBoardLogger):
        def tensorboard(tag: str, img: np.ndarray, step: int) -> None:
            writer = logger.experiment
            writer.add_image(tag, img, global_step=step, dataformats="HW" if img.ndim == 2 else "HWC")
            writer.flush()

        return tensorboard
    if isinstance(logger, MLFlowLogger):
        def mlflow(tag: str, img: np.ndarray, step: int) -> None:
            logger.experiment.log_image(logger.run_id, _uint8(img), key=tag, step=step)

        return mlflow
    if callable(getattr(logger, "log_image", None)):
        def log_image(tag: str, img: np.ndarray, step: int) -> None:
            logger.log_image(key=tag, images=[_uint8(img)], step=step)

        return log_image
    return None


def mask_image(mask: Tensor, max_size: int = 256, min_size: int = 64) -> np.ndarray:
    """The 2-D view of ``mask`` as a float ``(H, W)`` image in ``[0, 1]`` (1 = kept).

    Shrunk by area averaging so that no side exceeds ``max_size``; enlarged by an integer factor
    (nearest) while the longer side is below ``min_size``.
    """
    m = mask.detach().reshape(mask.shape[0], -1).float() if mask.dim() > 0 else mask.detach().reshape(1, 1).float()
    rows, cols = m.shape
    longest = max(rows, cols)
    if longest > max_size:
        scale = longest / max_size
        out = (max(1, min(max_size, math.ceil(rows / scale))), max(1, min(max_size, math.ceil(cols / scale))))
        m = F.adaptive_avg_pool2d(m[None, None], out)[0, 0]
    elif longest < min_size:
        factor = max(1, min(min_size // longest, max_size // longest))
        m = m.repeat_interleave(factor, 0).repeat_interleave(factor, 1)
    return m.clamp(0, 1).cpu().numpy()


def sparsity_chart(state: PruningState, round: int | None = None, dpi: int = 80) -> np.ndarray:
    """A horizontal bar chart of the per-layer sparsity as an ``(H, W, 3)`` uint8 image."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    per_layer = state.actual_layer_sparsity()
    names = list(per_layer)
    values = [per_layer[n] for n in names]
    overall = state.sparsity()
    fig = Figure(figsize=(7.0, 1.2 + 0.24 * max(1, len(names))), dpi=dpi)
    canvas = FigureCanvasAgg(fig)
    try:
        ax = fig.add_subplot()
        y = np.arange(len(names))
        bars = ax.barh(y, values, color="tab:blue", height=0.7)
        ax.bar_label(bars, fmt="%.3f", fontsize=7, padding=2)
        ax.axvline(overall, color="tab:red", linestyle="--", linewidth=1, label=f"overall {overall:.3f}")
        ax.set_yticks(y, labels=names, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlim(0, 1)
        ax.set_xlabel("sparsity (fraction pruned)")
        title = f"phase {Phase(state.phase).label}, target {state.target_sparsity:.3f}"
        if round is not None:
            title = f"round {round}: {title}"
        ax.set_title(title, fontsize=9)
        ax.legend(loc="lower right", fontsize=7)
        fig.tight_layout()
        canvas.draw()
        return np.asarray(canvas.buffer_rgba())[..., :3].copy()
    finally:
        fig.clear()
