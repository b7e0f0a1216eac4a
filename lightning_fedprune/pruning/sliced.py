"""Sliced client layers: a layer holding only the kept rows and columns of its weights.

When a mask removes whole rows and/or whole columns of a weight (``row``, ``column`` and the dependent
masks of :mod:`lightning_fedprune.pruning.structure`), the kept part is a smaller dense matrix
``W[rows][:, cols]``. These layers hold exactly that part, so weights, gradients and optimiser state
shrink and the matmuls get smaller; they compute what the masked-dense layer computes:

* :class:`SlicedLinear`: an ``nn.Linear`` or a pointwise (kernel-1) ``nn.Conv1d``;
* :class:`SlicedLSTM`: an ``nn.LSTM`` with fewer hidden units (every unit's four gate rows, its biases
  and its recurrent column removed together) and fewer input features;
* :class:`SlicedDropout`: an ``nn.Dropout`` on features that arrive compact, drawing its random mask at
  full width (so a compact client draws the same random numbers as a masked-dense one).

Where a layer meets the layer that makes its input (a :class:`~lightning_fedprune.pruning.structure.Link`
whose both sides are sliced) the features travel compact: the first layer emits only its kept outputs
and the next reads them as they come, with nothing scattered or gathered in between (``Linear(d, k) ->
act -> Linear(k, d)``). Elsewhere a sliced layer gathers its kept inputs from a full-width input
(``gather``) and scatters its kept outputs into a full-width output of zeros (``scatter``); an output it
drops is an exact zero in the masked-dense layer too, because its bias entry is pruned with the row.

Every layer keeps the attribute surface tasks read (``in_features``/``out_features``, ``weight``/``bias``
as read-only, differentiable full-shape tensors, ``hidden_size``...), and ``full_state()`` gives its
parameters back in the original layer's coordinates (exact zeros where pruned).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["SlicedDropout", "SlicedLSTM", "SlicedLinear", "dropout_kept", "full_like_layout", "positions"]


def positions(kept: Tensor, within: Tensor) -> Tensor | None:
    """Where the (ascending) indices ``kept`` sit in the ascending indices ``within`` (``kept`` must be a
    subset), or ``None`` when they are the same set (nothing to gather)."""
    if kept.numel() == within.numel():
        return None
    return torch.searchsorted(within, kept)


def full_like_layout(x: Tensor, width: int, dim: int, fill: float | None = 1.0, dtype: torch.dtype | None = None) -> Tensor:
    """A tensor of ``x``'s shape with ``width`` entries along ``dim``, laid out in memory like ``x`` (the same
    dimension order): the tensor a full-width layer would have produced, for drawing a dropout mask. Filled
    with ``fill`` (``None``: uninitialised); ``dtype`` defaults to ``x``'s."""
    dim = dim % x.dim()
    order = sorted(range(x.dim()), key=lambda d: (-x.stride(d), d))  # outermost first
    shape = [width if d == dim else x.shape[d] for d in order]
    dtype = x.dtype if dtype is None else dtype
    buf = x.new_empty(shape, dtype=dtype) if fill is None else x.new_full(shape, fill, dtype=dtype)
    return buf.permute([order.index(d) for d in range(x.dim())])


def dropout_kept(x: Tensor, p: float, width: int, dim: int, index: Tensor) -> Tensor:
    """``nn.Dropout(p)`` (training) of the full-width input, restricted to its features ``index`` along ``dim``,
    for an ``x`` that holds only those features: the same random numbers, the same arithmetic.

    On the CPU ``F.dropout`` draws ``empty_like(input).bernoulli_(1 - p)``, divides it by ``1 - p`` and
    multiplies; this draws the same full-width mask (as bytes: the draws do not depend on the dtype, which
    ``tests/test_compact_kinds.py`` checks) and does the rest on the kept features only. Other devices (a
    fused dropout kernel) get the kept part of ``F.dropout`` applied to full-width ones."""
    if x.device.type == "cpu":
        noise = full_like_layout(x, width, dim, None, torch.uint8).bernoulli_(1 - p)
        return x * noise.index_select(dim, index).to(x.dtype).div_(1 - p)
    return x * F.dropout(full_like_layout(x, width, dim), p, True).index_select(dim, index)


class SlicedDropout(nn.Module):
    """``nn.Dropout(p)`` for inputs holding only the features ``index`` (ascending) of ``width`` along ``dim``.

    The random mask is drawn at full width, laid out as the full-width input would be, and its kept
    features are used: bit for bit the numbers the masked-dense client's ``nn.Dropout`` applies to them.
    """

    def __init__(self, p: float, index: Tensor, width: int, dim: int = -1) -> None:
        super().__init__()
        self.p, self.width, self.dim = float(p), int(width), int(dim)
        self.register_buffer("index", index.to(torch.long), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        return dropout_kept(x, self.p, self.width, self.dim, self.index)

    def extra_repr(self) -> str:
        return f"p={self.p}, features={self.index.numel()}/{self.width}"


def _scatter_rows(values: Tensor, rows: Tensor | None, shape: Sequence[int], dim: int) -> Tensor:
    """``values`` placed at ``rows`` of a zero tensor of ``shape`` along ``dim`` (differentiable)."""
    if rows is None:
        return values.reshape(shape)
    return values.new_zeros(shape).index_copy(dim, rows, values)


class SlicedLinear(nn.Module):
    """An ``nn.Linear`` (or, with ``conv=True``, a pointwise ``nn.Conv1d``) of full size ``in_features ->
    out_features`` holding only ``W[rows][:, cols]`` and ``b[rows]``.

    Args:
        in_features, out_features: the full layer's sizes.
        rows, cols: the kept output / input features (ascending, long), or ``None`` for all.
        weight: the kept weight ``(len(rows), len(cols))``; bias: the kept bias ``(len(rows),)`` or ``None``.
        gather: positions of the kept inputs in the incoming feature dimension, or ``None`` if the input
            holds exactly the kept inputs (full width without pruned columns, or a compact input).
        scatter: put the outputs into a full-width tensor of zeros (else emit the kept outputs only).
        conv: a pointwise ``Conv1d``: features on dim 1 (``(B, C, T)``), ``weight`` reads ``(out, in, 1)``.
    """

    def __init__(self, in_features: int, out_features: int, rows: Tensor | None, cols: Tensor | None,
                 weight: Tensor, bias: Tensor | None, *, gather: Tensor | None = None, scatter: bool = True,
                 conv: bool = False, requires_grad: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features, self.conv = int(in_features), int(out_features), bool(conv)
        kr = out_features if rows is None else rows.numel()
        kc = in_features if cols is None else cols.numel()
        if tuple(weight.shape) != (kr, kc):
            raise ValueError(f"SlicedLinear weight should be ({kr}, {kc}), got {tuple(weight.shape)}")
        if bias is not None and tuple(bias.shape) != (kr,):
            raise ValueError(f"SlicedLinear bias should be ({kr},), got {tuple(bias.shape)}")
        self.register_buffer("rows", None if rows is None else rows.to(weight.device, torch.long), persistent=False)
        self.register_buffer("cols", None if cols is None else cols.to(weight.device, torch.long), persistent=False)
        self.register_buffer("gather", None if gather is None else gather.to(weight.device, torch.long), persistent=False)
        self.scatter = bool(scatter) and rows is not None
        self.weight_kept = nn.Parameter(weight.detach().clone(), requires_grad=requires_grad)
        if bias is not None:
            self.bias_kept = nn.Parameter(bias.detach().clone(), requires_grad=requires_grad)
        else:
            self.register_parameter("bias_kept", None)

    # -- forward --------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        dim = 1 if self.conv else -1
        if self.gather is not None:
            x = x.index_select(dim, self.gather)
        if self.conv:
            y = F.conv1d(x, self.weight_kept.unsqueeze(-1), self.bias_kept)
        else:
            y = F.linear(x, self.weight_kept, self.bias_kept)
        if self.scatter:
            shape = list(y.shape)
            shape[dim] = self.out_features
            y = y.new_zeros(shape).index_copy(dim, self.rows, y)
        return y

    # -- full coordinates -----------------------------------------------------------------
    def _full_weight(self, w: Tensor) -> Tensor:
        full = w
        if self.cols is not None:
            full = full.new_zeros(full.shape[0], self.in_features).index_copy(1, self.cols, full)
        full = _scatter_rows(full, self.rows, (self.out_features, self.in_features), 0)
        return full.unsqueeze(-1) if self.conv else full

    @property
    def weight(self) -> Tensor:
        """The full weight (``(out, in)``, or ``(out, in, 1)`` for a convolution) as the masked-dense layer holds it:
        a differentiable, read-only scatter of ``weight_kept`` (zeros elsewhere)."""
        return self._full_weight(self.weight_kept)

    @property
    def bias(self) -> Tensor | None:
        """The full bias (zeros at dropped outputs), read-only and differentiable; ``None`` without one."""
        b = self.bias_kept
        return None if b is None else _scatter_rows(b, self.rows, (self.out_features,), 0)

    def __setattr__(self, name: str, value) -> None:
        if name in ("weight", "bias"):
            raise AttributeError(f"SlicedLinear.`{name}` is computed from `{name}_kept` (the kept slice) and is read-only.")
        super().__setattr__(name, value)

    @torch.no_grad()
    def full_state(self) -> dict[str, Tensor]:
        """``{"weight": ..., "bias": ...}`` in the original layer's coordinates (exact zeros where pruned)."""
        out = {"weight": self._full_weight(self.weight_kept.detach())}
        if self.bias_kept is not None:
            out["bias"] = _scatter_rows(self.bias_kept.detach(), self.rows, (self.out_features,), 0)
        own = {p.data_ptr() for p in self.parameters()}
        return {k: v.clone() if v.data_ptr() in own else v for k, v in out.items()}  # never a view of ours

    def kept_parameters(self) -> dict[str, list[Tensor]]:
        """Original parameter name -> the parameters that now hold it."""
        out = {"weight": [self.weight_kept]}
        if self.bias_kept is not None:
            out["bias"] = [self.bias_kept]
        return out

    def extra_repr(self) -> str:
        kr, kc = self.weight_kept.shape
        what = "Conv1d(kernel 1)" if self.conv else "Linear"
        return (f"{what} {self.in_features}->{self.out_features}, kept {kr}x{kc}, gather={self.gather is not None}, "
                f"scatter={self.scatter}, bias={self.bias_kept is not None}")


class SlicedLSTM(nn.Module):
    """An ``nn.LSTM`` (unidirectional, no projection) whose layer ``l`` keeps the hidden units ``units[l]`` and,
    in layer 0, the input features ``inputs``.

    A removed unit loses its four gate rows in both weight matrices, its biases and its column in the
    recurrent matrix (and in the next layer's input matrix): in the masked-dense LSTM such a unit stays at
    ``c = h = 0``, so nothing else changes. Each layer is a single-layer ``nn.LSTM`` with the kept sizes (the
    fused kernel runs unchanged); the dropout between layers draws its mask at full width, as the fused
    multi-layer LSTM does. The state in and out has the full layout ``(num_layers, B, hidden_size)`` (zeros for
    removed units); the output is full width with zeros for removed units, or, with ``scatter=False``, the kept
    units of the last layer only.

    Args:
        lstm: the full layer (its configuration is copied; its weights are not used).
        units: per layer, the kept hidden units (ascending, long).
        inputs: kept input features of layer 0 (ascending), or ``None`` for all.
        weights: per layer, ``{"weight_ih": (4k, i), "weight_hh": (4k, k), "bias_ih": (4k,), "bias_hh": (4k,)}``
            (the kept parts, gate blocks in the LSTM's order i, f, g, o; biases only if the LSTM has them).
        gather: positions of the kept inputs in the incoming features (``None``: the input holds exactly them).
        layer_inputs: per layer ``l >= 1``, the kept input features of layer ``l`` (a subset of ``units[l - 1]``).
    """

    def __init__(self, lstm: nn.LSTM, units: Sequence[Tensor], inputs: Tensor | None,
                 weights: Sequence[dict[str, Tensor]], *, gather: Tensor | None = None, scatter: bool = True,
                 layer_inputs: Sequence[Tensor] = (), requires_grad: bool = True) -> None:
        super().__init__()
        if lstm.bidirectional or lstm.proj_size or lstm.mode != "LSTM":
            raise ValueError("SlicedLSTM supports unidirectional LSTMs without projections")
        self.input_size, self.hidden_size, self.num_layers = lstm.input_size, lstm.hidden_size, lstm.num_layers
        self.batch_first, self.dropout, self.bias = lstm.batch_first, float(lstm.dropout), lstm.bias
        self.scatter = bool(scatter)
        device = weights[0]["weight_hh"].device
        layers = []
        for l, w in enumerate(weights):
            k = int(units[l].numel())
            i = int(w["weight_ih"].shape[1])
            with torch.device("meta"):
                layer = nn.LSTM(i, k, 1, bias=self.bias, batch_first=self.batch_first)
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                if name in w:
                    setattr(layer, f"{name}_l0", nn.Parameter(w[name].detach().clone(), requires_grad=requires_grad))
            layers.append(layer)
        self.layers = nn.ModuleList(layers)
        for l, u in enumerate(units):
            self.register_buffer(f"units{l}", u.to(device, torch.long), persistent=False)
        self.register_buffer("inputs", None if inputs is None else inputs.to(device, torch.long), persistent=False)
        self.register_buffer("gather", None if gather is None else gather.to(device, torch.long), persistent=False)
        for l in range(1, self.num_layers):  # layer l's kept inputs: in full coordinates, and their positions
            cols = layer_inputs[l - 1].to(device, torch.long)  # in layer l - 1's kept units (None: all of them)
            self.register_buffer(f"inputs{l}", cols, persistent=False)
            self.register_buffer(f"between{l}", positions(cols, units[l - 1].to(device)), persistent=False)

    def units(self, layer: int) -> Tensor:
        return self._buffers[f"units{layer}"]

    def forward(self, input: Tensor, hx: tuple[Tensor, Tensor] | None = None):  # noqa: A002
        x = input
        feat = -1
        if self.gather is not None:
            x = x.index_select(feat, self.gather)
        batch = x.shape[0] if self.batch_first else x.shape[1]
        hs, cs = [], []
        for l, layer in enumerate(self.layers):
            if l > 0:
                if self.dropout > 0 and self.training:
                    x = dropout_kept(x, self.dropout, self.hidden_size, feat, self.units(l - 1))
                pos = self._buffers[f"between{l}"]
                if pos is not None:
                    x = x.index_select(feat, pos)
            state = None
            if hx is not None:
                u = self.units(l)
                state = (hx[0][l : l + 1].index_select(-1, u), hx[1][l : l + 1].index_select(-1, u))
            x, (h, c) = layer(x, state)
            hs.append(h)
            cs.append(c)
        full = (1, batch, self.hidden_size)
        h_n = torch.cat([_scatter_rows(h, self.units(l), full, 2) for l, h in enumerate(hs)])
        c_n = torch.cat([_scatter_rows(c, self.units(l), full, 2) for l, c in enumerate(cs)])
        if self.scatter:
            shape = list(x.shape)
            shape[feat] = self.hidden_size
            x = x.new_zeros(shape).index_copy(x.dim() - 1, self.units(self.num_layers - 1), x)
        return x, (h_n, c_n)

    def _rows(self, layer: int) -> Tensor:
        u = self.units(layer)
        return torch.cat([u + g * self.hidden_size for g in range(4)])

    @torch.no_grad()
    def full_state(self) -> dict[str, Tensor]:
        """The original LSTM's parameters (``weight_ih_l<k>``, ...) in full coordinates, zeros where removed."""
        out: dict[str, Tensor] = {}
        H = self.hidden_size
        for l, layer in enumerate(self.layers):
            rows = self._rows(l)
            in_full = self.input_size if l == 0 else H
            in_cols = self.inputs if l == 0 else self._buffers[f"inputs{l}"]
            w_ih = layer.weight_ih_l0.detach()
            full = w_ih.new_zeros(w_ih.shape[0], in_full)
            full = full.index_copy(1, in_cols, w_ih) if in_cols is not None else w_ih.clone()
            out[f"weight_ih_l{l}"] = w_ih.new_zeros(4 * H, in_full).index_copy(0, rows, full)
            w_hh = layer.weight_hh_l0.detach()
            full = w_hh.new_zeros(w_hh.shape[0], H).index_copy(1, self.units(l), w_hh)
            out[f"weight_hh_l{l}"] = w_hh.new_zeros(4 * H, H).index_copy(0, rows, full)
            if self.bias:
                for name in ("bias_ih", "bias_hh"):
                    b = getattr(layer, f"{name}_l0").detach()
                    out[f"{name}_l{l}"] = b.new_zeros(4 * H).index_copy(0, rows, b)
        return out

    def kept_parameters(self) -> dict[str, list[Tensor]]:
        out = {}
        for l, layer in enumerate(self.layers):
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                p = getattr(layer, f"{name}_l0", None)
                if p is not None:
                    out[f"{name}_l{l}"] = [p]
        return out

    def extra_repr(self) -> str:
        units = [int(self.units(l).numel()) for l in range(self.num_layers)]
        inputs = self.input_size if self.inputs is None else int(self.inputs.numel())
        return (f"input_size={inputs}/{self.input_size}, hidden units={units}/{self.hidden_size}, "
                f"num_layers={self.num_layers}, batch_first={self.batch_first}, scatter={self.scatter}")
