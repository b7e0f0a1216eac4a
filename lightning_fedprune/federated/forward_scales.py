"""Forward scales: a client's forward reads some parameters multiplied by a factor, their stored values unchanged.

:attr:`ClientPlan.forward_scales <lightning_fedprune.federated.protocol.ClientPlan.forward_scales>` asks for it
(Federated Dropout's inverted-dropout scaling: the weights that read the kept units are read ``1 / (1 - p)``
times larger). The forward sees ``s * w``, so the gradient reaching ``w`` is ``s`` times the gradient of the
weight the forward used — exactly what scaling the layer's *input* by ``s`` gives, since a linear layer or a
convolution is linear in its input and the bias is not scaled. The optimiser, weight decay, the masks and the
upload all see the stored ``w``.

Two ways, so that compaction is kept: a compact layer (:class:`~lightning_fedprune.pruning.compact.CompactLinear`,
whose forward reads its blocks directly) gets a forward pre-hook that scales its input; any other parameter gets
a :mod:`torch.nn.utils.parametrize` parametrization ``w -> s * w`` (this also covers a parameter that its owner
reads directly, such as ``nn.MultiheadAttention``'s ``out_proj.weight``). Both are removed after the client.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from lightning_fedprune.pruning.compact import CompactedModule

__all__ = ["ForwardScales"]


class _Scale(nn.Module):
    """The parametrization ``w -> factor * w``."""

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = float(factor)

    def forward(self, w: Tensor) -> Tensor:
        return w * self.factor


def _scale_input(factor: float, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    return (args[0] * factor, *args[1:])


class ForwardScales:
    """Applies ``scales`` (``{parameter name: factor}``) to ``root`` until :meth:`remove`.

    Args:
        root: the client's model.
        scales: the parameters its forward reads scaled, and the factors (finite, > 0).
        compacted: what compaction did to ``root`` (its compact layers are scaled at their input).
    """

    def __init__(self, root: nn.Module, scales: Mapping[str, float], compacted: CompactedModule | None = None) -> None:
        self._hooks: list[Any] = []
        self._parametrized: list[tuple[nn.Module, str, list[str]]] = []
        layers = compacted.compacted if compacted is not None else {}
        try:
            for name, factor in scales.items():
                factor = float(factor)
                if not (factor > 0 and factor != float("inf")):
                    raise ValueError(f"forward scale of {name!r} must be finite and > 0, got {factor!r}")
                prefix, _, leaf = name.rpartition(".")
                if prefix in layers and leaf == "weight":
                    self._hooks.append(layers[prefix].register_forward_pre_hook(
                        lambda module, args, factor=factor: _scale_input(factor, module, args)))
                    continue
                owner = root.get_submodule(prefix) if prefix else root
                if not isinstance(owner._parameters.get(leaf), nn.Parameter):
                    raise KeyError(f"forward scale of {name!r}: the model has no such parameter")
                order = list(owner._parameters)
                parametrize.register_parametrization(owner, leaf, _Scale(factor))
                self._parametrized.append((owner, leaf, order))
        except Exception:
            self.remove()
            raise

    def remove(self) -> None:
        """Undo every scale (the parameters are the same objects as before, with their values)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        with torch.no_grad():
            for owner, leaf, order in reversed(self._parametrized):
                parametrize.remove_parametrizations(owner, leaf, leave_parametrized=False)
                params = dict(owner._parameters)  # back in their registration order (state_dict order)
                owner._parameters.clear()
                owner._parameters.update((k, params[k]) for k in order)
        self._parametrized.clear()
