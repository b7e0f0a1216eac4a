"""Compact client layers and the masked-dense fallback.

With a pattern that has a compact layer (``row``, ``column``, ``half_row``, ``half_column``:
:data:`~lightning_fedprune.pruning.patterns.COMPACT_PATTERNS`; see ``docs/design.md``) a client's
``nn.Linear`` can be replaced by a :class:`CompactLinear` that holds only the kept slice of the
weight, so weights, gradients and optimiser state physically shrink and the matmuls get smaller.
The pattern object does the work (:meth:`~lightning_fedprune.pruning.patterns.Pattern.linear_forward`,
``split``, ``scatter_``); it computes exactly what the masked-dense ``nn.Linear`` computes (up to
float summation order):

* ``column``      ``y = W[:, keep] x[..., keep] + b``
* ``row``         ``y[..., keep] = W[keep] x + b[keep]``; pruned outputs are ``b`` (a pruned row
  of ``W`` gives ``0 + b[r]`` in the masked-dense reference, the bias is not pruned unless
  it has its own mask);
* ``half_column`` ``W = [W1 ; W2]``: ``y = cat(W1[:, k0] x[..., k0], W2[:, k1] x[..., k1]) + b``
* ``half_row``    ``W = [W1 | W2]``: ``y = scatter_k0(W1[k0] x[..., :C/2]) + scatter_k1(W2[k1] x[..., C/2:]) + b``

A :class:`CompactLinear` keeps the ``nn.Linear`` attribute surface a task may read inside
``training_step`` (``weight``, ``bias``, ``in_features``, ``out_features``): ``weight`` is a
read-only, differentiable full-shape view (the kept blocks scattered into zeros), so an L2
penalty or weight norm over ``layer.weight`` trains the compact blocks exactly as it trains the
kept entries of the masked-dense layer.

:func:`compact_module` compacts a whole task: besides :class:`CompactLinear`, the sliced layers of
:mod:`lightning_fedprune.pruning.sliced` hold whatever whole rows and columns the masks keep -- the
dependent masks of the task's links (:mod:`lightning_fedprune.pruning.structure`) included -- for an
``nn.Linear``, a pointwise ``nn.Conv1d`` and an ``nn.LSTM``, and linked layers pass their features compact.
Everything else (other convolutions, embeddings, ``nn.MultiheadAttention`` projections, tied weights,
``unstructured`` masks) stays a full tensor kept pruned by the masked-dense mechanism :class:`MaskedDense`;
:func:`plan_compaction` says which, module by module, with the reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .patterns import COMPACT_PATTERNS, STRUCTURED_PATTERNS, Pattern, check_pattern, expand_groups, get_pattern, groups_from_mask
from .sliced import SlicedDropout, SlicedLinear, SlicedLSTM, positions

__all__ = [
    "CompactLinear",
    "compact_linear",
    "compact_module",
    "CompactedModule",
    "LayerDecision",
    "MaskedDense",
    "plan_compaction",
]


def _compact_pattern(pattern: str, who: str) -> Pattern:
    """The pattern object, if it has a compact layer."""
    if pattern not in COMPACT_PATTERNS:
        raise ValueError(f"{who} needs a structured pattern with a compact layer {tuple(COMPACT_PATTERNS)}, got {pattern!r}")
    return get_pattern(pattern)


class CompactLinear(nn.Module):
    """An ``nn.Linear`` of full size ``in_features -> out_features`` storing only the kept
    slice of its weight for ``pattern`` (one of :data:`~lightning_fedprune.pruning.patterns.COMPACT_PATTERNS`).

    Parameters: ``weight_blocks`` (a ``ParameterList`` of one block for ``row``/``column``,
    two for the half patterns, shapes as in :meth:`Pattern.split <lightning_fedprune.pruning.patterns.Pattern.split>`)
    and ``bias`` (full ``(out_features,)``, or ``None``). ``kept[h]`` are the block's kept indices
    (rows of the block for ``row``/``half_row``, columns for ``column``/``half_column``), ascending.
    :attr:`pattern` is the :class:`~lightning_fedprune.pruning.patterns.Pattern` object.
    :attr:`weight` reads like ``nn.Linear.weight`` (full shape, zeros at pruned entries). To build
    one from a wire payload use :func:`lightning_fedprune.federated.wire.compact_linear_from_encoded`.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        pattern: str,
        kept: Sequence[torch.Tensor],
        blocks: Sequence[torch.Tensor],
        bias: torch.Tensor | None = None,
        *,
        requires_grad: bool = True,
    ) -> None:
        super().__init__()
        p = _compact_pattern(pattern, "CompactLinear")
        nb = p.num_blocks
        if len(kept) != nb or len(blocks) != nb:
            raise ValueError(f"pattern {pattern!r} needs {nb} block(s), got {len(kept)} index sets / {len(blocks)} blocks")
        check_pattern(pattern, (out_features, in_features), "CompactLinear weight")
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.pattern = p
        limit = p.num_groups(self.out_features, self.in_features) // nb  # groups per block
        params = []
        for i, (k, w) in enumerate(zip(kept, blocks)):
            k = torch.as_tensor(k, dtype=torch.long, device=w.device).reshape(-1)
            expect = p.block_shape(k.numel(), self.out_features, self.in_features)
            w = w.reshape(expect) if w.numel() == math.prod(expect) else w
            if tuple(w.shape) != expect:
                raise ValueError(f"block {i} of a {pattern!r} CompactLinear should be {expect}, got {tuple(w.shape)}")
            if k.numel() and (int(k.min()) < 0 or int(k.max()) >= limit or bool((k[1:] <= k[:-1]).any())):
                raise ValueError(f"kept indices of block {i} must be ascending, unique and in [0, {limit})")
            self.register_buffer(f"keep{i}", k, persistent=False)
            params.append(nn.Parameter(w.detach().clone(), requires_grad=requires_grad))
        self.weight_blocks = nn.ParameterList(params)
        self._kept_names = tuple(f"keep{i}" for i in range(nb))
        if bias is not None:
            if tuple(bias.shape) != (self.out_features,):
                raise ValueError(f"bias should have shape ({self.out_features},), got {tuple(bias.shape)}")
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=requires_grad)
        else:
            self.register_parameter("bias", None)

    @property
    def kept(self) -> list[torch.Tensor]:
        """The kept index buffer of every block (``keep0``, ``keep1``, ...)."""
        buffers = self._buffers  # read directly: this runs on every forward
        return [buffers[name] for name in self._kept_names]

    # -- forward --------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = list(self.weight_blocks._parameters.values())  # in block order; cheaper than iterating the list
        return self.pattern.linear_forward(x, weights, self.kept, self.bias, self.out_features)

    # -- back to full coordinates -------------------------------------------------------
    def mask(self) -> torch.Tensor:
        """Full ``(out_features, in_features)`` bool keep-mask."""
        p = self.pattern
        flags = torch.zeros(p.num_groups(self.out_features, self.in_features), dtype=torch.bool,
                            device=self.weight_blocks[0].device)
        per_block = flags.numel() // p.num_blocks
        for h, kept in enumerate(self.kept):
            flags[h * per_block + kept] = True
        return expand_groups(flags, p.name, (self.out_features, self.in_features))

    def _scatter(self, blocks: Sequence[torch.Tensor]) -> torch.Tensor:
        """The blocks placed in a full ``(out_features, in_features)`` tensor, zeros elsewhere.

        Written into a new zero tensor by the pattern's ``scatter_`` (``index_copy_`` into it or
        its block views), so it is differentiable: a loss on the result sends its gradient to the
        kept entries of ``blocks`` (see :attr:`weight`)."""
        out = blocks[0].new_zeros(self.out_features, self.in_features)
        return self.pattern.scatter_(out, list(zip(self.kept, blocks)))

    @property
    def weight(self) -> torch.Tensor:
        """The full ``(out_features, in_features)`` weight, as ``nn.Linear.weight`` reads: exact zeros at
        pruned entries, the kept values elsewhere.

        It keeps the ``nn.Linear`` attribute surface for tasks that read ``layer.weight`` in
        ``training_step`` (an L2 penalty, a weight norm): the tensor is a differentiable scatter of
        :attr:`weight_blocks`, so a penalty's gradient reaches the kept blocks exactly as it reaches
        the kept entries of the masked-dense layer. It is computed on every read (a full-size
        temporary; the stored parameters stay compact), so it is read-only: assigning ``.weight``
        raises, and in-place changes to the returned tensor do not reach the layer (change
        ``weight_blocks`` instead)."""
        return self._scatter(list(self.weight_blocks))

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "weight":
            raise AttributeError(
                f"{type(self).__name__}.`weight` is computed from `weight_blocks` (the kept slice of a compacted "
                "nn.Linear) and is read-only; write to `weight_blocks` (or train without compaction: "
                "`compact_clients=False`)."
            )
        super().__setattr__(name, value)

    @torch.no_grad()
    def full_weight(self) -> torch.Tensor:
        """The weight in full coordinates, exact zeros at pruned entries (a new tensor, no autograd)."""
        return self._scatter(list(self.weight_blocks))

    @torch.no_grad()
    def full_grad(self) -> torch.Tensor | None:
        """The weight gradient in full coordinates (zeros at pruned entries), or ``None``."""
        if any(w.grad is None for w in self.weight_blocks):
            return None
        return self._scatter([w.grad for w in self.weight_blocks])

    @torch.no_grad()
    def full_bias(self) -> torch.Tensor | None:
        return None if self.bias is None else self.bias.detach().clone()

    def full_state(self) -> dict[str, torch.Tensor]:
        """``{"weight": ..., "bias": ...}`` in full coordinates (like ``nn.Linear.state_dict``)."""
        out = {"weight": self.full_weight()}
        if self.bias is not None:
            out["bias"] = self.full_bias()
        return out

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` holding :meth:`full_state` (masked-dense equivalent)."""
        w = self.weight_blocks[0]
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            lin.weight.copy_(self.full_weight())
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    def num_kept(self) -> int:
        return int(sum(w.numel() for w in self.weight_blocks))

    def extra_repr(self) -> str:
        dense = self.in_features * self.out_features
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, pattern={self.pattern.name!r}, "
            f"kept={self.num_kept()}/{dense}, bias={self.bias is not None}"
        )


def compact_linear(linear: nn.Linear, mask: torch.Tensor, pattern: str, *, requires_grad: bool | None = None) -> CompactLinear:
    """A :class:`CompactLinear` equal to ``linear`` with ``mask`` applied (the values at pruned
    entries are dropped). ``mask`` must be a union of whole ``pattern`` groups."""
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"compact_linear needs an nn.Linear, got {type(linear).__name__}")
    p = _compact_pattern(pattern, "compact_linear")
    W = linear.weight.detach()
    if tuple(mask.shape) != tuple(W.shape):
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match weight shape {tuple(W.shape)}")
    flags = groups_from_mask(mask.to(W.device), pattern, "linear weight")
    kept, blocks = zip(*p.split(W, flags))
    rg = linear.weight.requires_grad if requires_grad is None else requires_grad
    return CompactLinear(linear.in_features, linear.out_features, pattern, kept, blocks, linear.bias, requires_grad=rg)


# --------------------------------------------------------------------------------------
# Whole-module compaction
# --------------------------------------------------------------------------------------


@dataclass
class CompactedModule:
    """What :func:`compact_module` did to ``root``; undo it with :meth:`restore`.

    * ``compacted``: module name -> the compact module now in ``root`` (a :class:`CompactLinear`, a
      :class:`~lightning_fedprune.pruning.sliced.SlicedLinear` or
      :class:`~lightning_fedprune.pruning.sliced.SlicedLSTM`, or the compact stand-in of a module the
      features pass through, e.g. a :class:`~lightning_fedprune.pruning.sliced.SlicedDropout`);
    * ``originals``: module name -> the module it replaced;
    * ``compacted_names``: the masked parameter names now held compactly;
    * ``fallback``: masked parameter name -> why it stays masked-dense;
    * ``fallback_masks``: the masks still to enforce masked-dense on the compacted ``root``
      (pass them to :class:`MaskedDense` / :func:`apply_masks_`);
    * ``layers``: one :class:`LayerDecision` per module with a masked parameter (what the run summary prints).
    """

    root: nn.Module
    compacted: dict[str, nn.Module] = field(default_factory=dict)
    originals: dict[str, nn.Module] = field(default_factory=dict)
    fallback: dict[str, str] = field(default_factory=dict)
    fallback_masks: dict[str, torch.Tensor] = field(default_factory=dict)
    state_keys: list[str] = field(default_factory=list)
    covered: dict[str, list[str]] = field(default_factory=dict)
    layers: list[LayerDecision] = field(default_factory=list)
    restored: bool = False
    released: bool = False

    @property
    def compacted_names(self) -> list[str]:
        return [n for names in self.covered.values() for n in names]

    def full_state(self) -> dict[str, torch.Tensor]:
        """Full-coordinate parameters of every compacted module, by parameter name."""
        out: dict[str, torch.Tensor] = {}
        for name, cl in self.compacted.items():
            full_state = getattr(cl, "full_state", None)
            for k, v in (full_state() if full_state is not None else {}).items():
                out[_join(name, k)] = v
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        """``root``'s state dict in the original (full) coordinates and key order."""
        current = self.root.state_dict()
        full = self.full_state()
        return {k: (full[k] if k in full else current[k]) for k in self.state_keys}

    def param_map(self) -> dict[int, list[torch.Tensor]]:
        """``id(original parameter) -> the parameters that hold it now`` (to point an optimiser at them)."""
        out: dict[int, list[torch.Tensor]] = {}
        for name, original in self.originals.items():
            layer = self.compacted[name]
            if isinstance(layer, CompactLinear):
                held = {"weight": list(layer.weight_blocks)}
                if layer.bias is not None:
                    held["bias"] = [layer.bias]
            else:
                held = layer.kept_parameters() if hasattr(layer, "kept_parameters") else {}
            for local, params in held.items():
                out[id(getattr(original, local))] = params
        return out

    @torch.no_grad()
    def restore(self, copy_back: bool = True) -> None:
        """Put the original modules back; with ``copy_back`` their parameters are overwritten by the
        trained compact values (exact zeros at pruned entries)."""
        if self.restored:
            return
        if self.released and not copy_back:
            raise RuntimeError("compact_module(..., release=True) freed the original weights: restore needs copy_back=True")
        for name, orig in self.originals.items():
            if copy_back:
                full_state = getattr(self.compacted[name], "full_state", None)
                for local, value in (full_state() if full_state is not None else {}).items():
                    param = getattr(orig, local)
                    if self.released:
                        param.data = value.detach()  # same Parameter object, new full-size storage
                    else:
                        param.copy_(value)
            _set_submodule(self.root, name, orig)
        self.restored = True


@dataclass
class LayerDecision:
    """How a client trains one module with masked parameters: ``mode`` is ``"compact"`` (``kind`` says which
    compact layer) or ``"masked-dense"`` (``reason`` says why); ``params`` are its masked parameters."""

    module: str
    kind: str
    mode: str
    params: list[str]
    reason: str = ""
    shape: str = ""


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def _product(m2d: torch.Tensor, pattern: str | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(kept rows, kept columns)`` (bool) if the mask is exactly their product, else ``None``. A ``row`` or
    ``column`` mask (a union of whole rows / columns, as every mask is of the pattern it travels with) is one
    by construction and is read from one column / row."""
    if pattern == "column":
        cols = m2d[0].clone()
        return torch.full_like(m2d[:, 0], bool(cols.any())), cols
    if pattern == "row":
        rows = m2d[:, 0].clone()
        return rows, torch.full_like(m2d[0], bool(rows.any()))
    rows, cols = m2d.any(1), m2d.any(0)
    return (rows, cols) if torch.equal(m2d, rows[:, None] & cols[None, :]) else None


def _kept(flags: torch.Tensor) -> torch.Tensor | None:
    """Ascending kept indices, or ``None`` when everything is kept."""
    return None if bool(flags.all()) else flags.nonzero().reshape(-1)


def _is_pointwise_conv(mod: nn.Module) -> bool:
    return (type(mod) is nn.Conv1d and mod.kernel_size == (1,) and mod.stride == (1,) and mod.dilation == (1,)
            and mod.groups == 1 and mod.padding in ((0,), "valid") and mod.padding_mode == "zeros")


@dataclass
class _Sliced:
    """The analysis of one module that can be sliced."""

    name: str
    module: nn.Module
    kind: str  # "linear", "conv1d", "lstm"
    masked: list[str]
    rows: torch.Tensor | None = None  # kept outputs (linear/conv) or kept units of the last layer (lstm), in full coordinates
    cols: torch.Tensor | None = None  # kept inputs (full coordinates)
    out_width: int = 0
    in_width: int = 0
    units: list[torch.Tensor] = field(default_factory=list)  # lstm: kept units per layer
    layer_inputs: list[torch.Tensor] = field(default_factory=list)  # lstm: kept inputs of layers >= 1
    gather: torch.Tensor | None = None
    scatter: bool = True


def _analyse_linear(name: str, mod: nn.Module, masks: Mapping[str, torch.Tensor], masked: list[str],
                    patterns: Mapping[str, str]) -> _Sliced | str:
    w = masks.get(_join(name, "weight"))
    b = masks.get(_join(name, "bias")) if mod.bias is not None else None
    O, I = mod.weight.shape[0], mod.weight.shape[1]
    if w is None:
        return "only its bias is masked"
    prod = _product(w.reshape(O, I).to(mod.weight.device), patterns.get(_join(name, "weight")))
    if prod is None:
        return "its weight mask is not whole rows and columns"
    rows, cols = prod
    if mod.bias is not None:
        if b is None and not bool(rows.all()):
            return "rows pruned while their bias entries are not (a pruned output equals its bias)"
        if b is not None and not torch.equal(b.to(rows.device), rows):
            return "its bias mask is not the kept rows"
    kind = "conv1d" if isinstance(mod, nn.Conv1d) else "linear"
    return _Sliced(name, mod, kind, masked, _kept(rows), _kept(cols), O, I)


def _analyse_lstm(name: str, mod: nn.LSTM, masks: Mapping[str, torch.Tensor], masked: list[str],
                  patterns: Mapping[str, str]) -> _Sliced | str:
    if mod.bidirectional or mod.proj_size or mod.mode != "LSTM":
        return "a bidirectional or projected LSTM"
    H, L = mod.hidden_size, mod.num_layers
    device = mod.weight_hh_l0.device
    units: list[torch.Tensor] = []
    inputs: list[torch.Tensor] = []  # kept inputs of each layer (bool, full coordinates)
    for l in range(L):
        names = [f"weight_ih_l{l}", f"weight_hh_l{l}"] + ([f"bias_ih_l{l}", f"bias_hh_l{l}"] if mod.bias else [])
        unit = None
        cols: dict[str, torch.Tensor] = {}
        for local in names:
            p = getattr(mod, local)
            m = masks.get(_join(name, local))
            m2d = torch.ones(p.shape[0], p.numel() // p.shape[0], dtype=torch.bool, device=device) if m is None \
                else m.reshape(p.shape[0], -1).to(device)
            prod = _product(m2d, None if m is None else patterns.get(_join(name, local)))
            if prod is None:
                return f"the mask of {local} is not whole rows and columns"
            gates = prod[0].reshape(4, H)
            if not bool((gates == gates[0]).all()):
                return f"{local} keeps a unit's row in some gates and not in others"
            if unit is not None and not torch.equal(unit, gates[0]):
                return f"layer {l}'s tensors keep different hidden units"
            unit = gates[0]
            cols[local] = prod[1]
        if not torch.equal(cols[f"weight_hh_l{l}"], unit):
            return f"weight_hh_l{l}'s kept columns are not its kept units"
        units.append(unit)
        inputs.append(cols[f"weight_ih_l{l}"])
    for l in range(1, L):
        if bool((inputs[l] & ~units[l - 1]).any()):
            return f"weight_ih_l{l} reads units that layer {l - 1} removed"
    units_idx = [u.nonzero().reshape(-1) for u in units]
    return _Sliced(name, mod, "lstm", masked, _kept(units[-1]), _kept(inputs[0]), H, mod.input_size, units_idx,
                   [i.nonzero().reshape(-1) for i in inputs[1:]])


def _owner_map(root: nn.Module) -> dict[str, str]:
    owner: dict[str, str] = {}
    for mod_name, mod in root.named_modules(remove_duplicate=False):
        for pn, _ in mod.named_parameters(recurse=False, remove_duplicate=False):
            owner[_join(mod_name, pn)] = mod_name
    return owner


def _task_links(root: nn.Module) -> tuple:
    get_links = getattr(root, "pruning_links", None)
    return tuple(get_links()) if callable(get_links) else ()


def plan_compaction(root: nn.Module, masks: Mapping[str, torch.Tensor], patterns: Mapping[str, str],
                    links: Sequence[Any] | None = None) -> tuple[list[LayerDecision], dict[str, Any]]:
    """Decide, without changing ``root``, how each module with a masked parameter trains on a client.

    Returns the decisions (one :class:`LayerDecision` per module, in ``root``'s order) and what
    :func:`compact_module` needs to carry them out. ``links`` default to ``root.pruning_links()`` when ``root``
    has that method (see :mod:`lightning_fedprune.pruning.structure`).
    """
    links = _task_links(root) if links is None else tuple(links)
    owner = _owner_map(root)
    modules = dict(root.named_modules(remove_duplicate=False))
    counts: dict[int, int] = {}
    for _, p in root.named_parameters(remove_duplicate=False):
        counts[id(p)] = counts.get(id(p), 0) + 1
    by_module: dict[str, list[str]] = {}
    fallback: dict[str, str] = {}
    for pname in masks:
        mod_name = owner.get(pname)
        if mod_name is None:
            fallback[pname] = "not a parameter of root"
        else:
            by_module.setdefault(mod_name, []).append(pname)
    in_link = {p for link in links for p in link.consumers}
    out_link = {p for link in links for p in link.producers}

    decisions: dict[str, LayerDecision] = {}
    sliced: dict[str, _Sliced] = {}
    legacy: dict[str, str] = {}  # module name -> pattern, for CompactLinear
    order = {n: i for i, n in enumerate(modules)}
    for mod_name in sorted(by_module, key=order.__getitem__):
        mod, masked = modules[mod_name], by_module[mod_name]
        parent = modules.get(mod_name.rpartition(".")[0]) if mod_name else None
        kind = type(mod).__name__
        reason = None
        if not mod_name:
            reason = "root module itself (cannot be swapped in place)"
        elif isinstance(parent, nn.MultiheadAttention):
            reason = "owned by nn.MultiheadAttention (reads the weight directly)"
        elif any(counts[id(p)] > 1 for p in mod.parameters(recurse=False)):
            reason = "shared (tied) parameter"
        elif torch.nn.utils.parametrize.is_parametrized(mod) or mod._forward_hooks or mod._forward_pre_hooks:
            reason = "parametrized or has forward hooks"
        elif isinstance(mod, nn.Linear) and type(mod).forward is not nn.Linear.forward:
            reason = f"{kind} overrides forward"
        elif not (isinstance(mod, nn.Linear) or _is_pointwise_conv(mod) or type(mod) is nn.LSTM):
            reason = f"{kind} has no compact layer"
        linked = any(p in in_link or p in out_link for p, _ in mod.named_parameters(prefix=mod_name, recurse=False))
        if reason is None and isinstance(mod, nn.Linear) and not linked:
            # a Linear no link touches: its weight's own pattern decides (CompactLinear), as it always has
            wname = _join(mod_name, "weight")
            pattern = patterns.get(wname, "unstructured")
            if wname not in masked:
                reason = f"{kind}.bias is not an nn.Linear weight"
            elif pattern not in STRUCTURED_PATTERNS:
                reason = f"pattern {pattern!r} is not structured"
            elif pattern not in COMPACT_PATTERNS:
                reason = f"pattern {pattern!r} has no compact nn.Linear layer"
            else:
                legacy[mod_name] = pattern
                decisions[mod_name] = LayerDecision(mod_name, "CompactLinear", "compact", [wname], shape=pattern)
                masked = [p for p in masked if p != wname]
                reason = f"{kind}.bias is not an nn.Linear weight"
                if not masked:
                    continue
                for pname in masked:
                    fallback[pname] = reason
                continue
        if reason is None and not linked and not isinstance(mod, nn.LSTM):
            pattern = patterns.get(_join(mod_name, "weight"), "unstructured")
            if pattern not in STRUCTURED_PATTERNS:
                reason = f"pattern {pattern!r} is not structured"
        if reason is None:
            result = _analyse_lstm(mod_name, mod, masks, masked, patterns) if isinstance(mod, nn.LSTM) \
                else _analyse_linear(mod_name, mod, masks, masked, patterns)
            if isinstance(result, str):
                reason = result
            else:
                sliced[mod_name] = result
                continue
        for pname in masked:
            fallback[pname] = reason
        decisions[mod_name] = LayerDecision(mod_name, kind, "masked-dense", masked, reason)

    # the links between sliced modules: features travel compact where both sides are sliced
    replacements: dict[str, Any] = {}  # between-module name -> (index, width, dim)
    port_in: dict[str, Any] = {}
    port_out: set[str] = set()
    for link in links:
        prod_mods = {owner.get(p) for p in link.producers}
        internal_mods = prod_mods & {m for m, s in sliced.items() if s.kind == "lstm"}
        cons_mods = {owner.get(c) for c in link.consumers} - internal_mods
        if not cons_mods or None in prod_mods or None in cons_mods:
            continue
        units = [sliced.get(m) for m in prod_mods]
        readers = [sliced.get(m) for m in cons_mods]
        if any(u is None for u in units) or any(r is None for r in readers):
            continue
        if any(u.kind == "lstm" and not any(p.endswith(f"_l{u.module.num_layers - 1}") for p in link.producers
                                            if owner.get(p) == u.name) for u in units):
            continue  # an LSTM's inner layer feeding something outside it
        emitted = [u.rows for u in units]
        widths = {u.out_width for u in units}
        if len(widths) != 1 or any((e is None) != (emitted[0] is None) or (e is not None and not torch.equal(e, emitted[0]))
                                   for e in emitted):
            continue
        E, width = emitted[0], widths.pop()
        if any(r.in_width != width for r in readers):
            continue
        if E is not None and any(r.cols is None or bool(~torch.isin(r.cols, E).all()) for r in readers):
            continue
        between = {}
        for b in link.between:
            mod = modules.get(b)
            if mod is None or not (isinstance(mod, nn.Dropout) or hasattr(mod, "compact_features")):
                between = None
                break
            between[b] = mod
        if between is None:
            continue
        for u in units:
            port_out.add(u.name)
        for r in readers:
            port_in[r.name] = E
        if E is not None:
            dim = 1 if any(u.kind == "conv1d" for u in units) else -1
            for b in between:
                replacements[b] = (E, width, dim)
    for name, s in sliced.items():
        s.scatter = name not in port_out and s.rows is not None
        if name in port_in and port_in[name] is not None:
            s.gather = positions(s.cols, port_in[name]) if s.cols is not None else None
        else:
            s.gather = s.cols
        kr = s.out_width if s.rows is None else s.rows.numel()
        kc = s.in_width if s.cols is None else s.cols.numel()
        if s.kind == "lstm":
            shape = f"units {[int(u.numel()) for u in s.units]}/{s.out_width}, inputs {kc}/{s.in_width}"
        else:
            shape = f"{kr}x{kc} of {s.out_width}x{s.in_width}"
        io = ("in: compact" if name in port_in else "in: gather" if s.gather is not None else "in: full") + \
            (", out: compact" if name in port_out else ", out: scatter" if s.scatter else ", out: full")
        kind = {"linear": "SlicedLinear", "conv1d": "SlicedLinear(Conv1d)", "lstm": "SlicedLSTM"}[s.kind]
        decisions[name] = LayerDecision(name, kind, "compact", s.masked, shape=f"{shape}; {io}")
    ordered = [decisions[n] for n in sorted(decisions, key=order.__getitem__)]
    state_keys = list(root.state_dict().keys())
    return ordered, {"sliced": sliced, "legacy": legacy, "replacements": replacements, "fallback": fallback,
                     "modules": modules, "owner": owner, "state_keys": state_keys}


def _build_sliced(s: _Sliced) -> nn.Module:
    mod = s.module
    if s.kind == "lstm":
        weights = []
        H = mod.hidden_size
        for l, u in enumerate(s.units):
            rows = torch.cat([u + g * H for g in range(4)])
            cols = (s.cols if l == 0 else s.layer_inputs[l - 1])
            w = {"weight_ih": getattr(mod, f"weight_ih_l{l}").detach().index_select(0, rows),
                 "weight_hh": getattr(mod, f"weight_hh_l{l}").detach().index_select(0, rows).index_select(1, u)}
            if cols is not None:
                w["weight_ih"] = w["weight_ih"].index_select(1, cols)
            if mod.bias:
                for b in ("bias_ih", "bias_hh"):
                    w[b] = getattr(mod, f"{b}_l{l}").detach().index_select(0, rows)
            weights.append(w)
        rg = mod.weight_hh_l0.requires_grad
        return SlicedLSTM(mod, s.units, s.cols, weights, gather=s.gather, scatter=s.scatter,
                          layer_inputs=s.layer_inputs, requires_grad=rg)
    W = mod.weight.detach().reshape(mod.weight.shape[0], -1)
    if s.rows is not None:
        W = W.index_select(0, s.rows)
    if s.cols is not None:
        W = W.index_select(1, s.cols)
    b = None
    if mod.bias is not None:
        b = mod.bias.detach() if s.rows is None else mod.bias.detach().index_select(0, s.rows)
    return SlicedLinear(s.in_width, s.out_width, s.rows, s.cols, W, b, gather=s.gather, scatter=s.scatter,
                        conv=s.kind == "conv1d", requires_grad=mod.weight.requires_grad)


#: The last plan :func:`compact_module` made, with the (root, masks, patterns) objects it was made for: a
#: client compacts the same replica with the same decoded masks for every client of a round.
_LAST_PLAN: dict[str, Any] = {}


def compact_module(
    root: nn.Module,
    masks: Mapping[str, torch.Tensor],
    patterns: Mapping[str, str],
    *,
    release: bool = False,
    links: Sequence[Any] | None = None,
) -> CompactedModule:
    """Swap, in place on ``root``, every module whose masked parameters a compact layer can hold:

    * an ``nn.Linear`` whose weight has a structured mask of its own (and no link): a :class:`CompactLinear`;
    * an ``nn.Linear`` or pointwise ``nn.Conv1d`` whose masks remove whole rows and/or whole columns (its bias
      entries pruned with its rows): a :class:`~lightning_fedprune.pruning.sliced.SlicedLinear`;
    * an ``nn.LSTM`` whose masks remove whole hidden units (all four gate rows, biases, the recurrent column)
      and/or input features: a :class:`~lightning_fedprune.pruning.sliced.SlicedLSTM`.

    Between two sliced modules joined by a link (``links``, default ``root.pruning_links()``) the features
    travel compact, and the modules the link passes through are swapped for their compact forms (an
    ``nn.Dropout`` for a :class:`~lightning_fedprune.pruning.sliced.SlicedDropout`, a module with
    ``compact_features`` for what it returns). Left to the masked-dense fallback (reported in ``.fallback``
    and ``.layers``): other modules, masks that are not whole rows/columns (``unstructured``, the half
    patterns outside a CompactLinear), Linear subclasses with their own ``forward``, Linears owned by
    ``nn.MultiheadAttention`` (it reads ``out_proj.weight`` directly), shared (tied) weights, parametrized
    modules or modules with forward hooks, and ``root`` itself.

    With ``release=True`` the original full-size parameters' storage is freed while compacted (so only the
    kept slices occupy memory) and re-created by ``restore(copy_back=True)``. Called again with the same
    ``root``, ``masks`` and ``patterns`` objects (not copies) and default ``links``, it reuses its last
    decisions: change masks by passing a new dict, not by editing one in place."""
    cached = _LAST_PLAN.get("key")
    if links is None and cached is not None and all(a is b for a, b in zip(cached, (root, masks, patterns))):
        decisions, plan = _LAST_PLAN["plan"]  # the same replica and round (a client's case): the same decisions
    else:
        decisions, plan = plan_compaction(root, masks, patterns, links)
        _LAST_PLAN.clear()
        if links is None:
            _LAST_PLAN.update(key=(root, masks, patterns), plan=(decisions, plan))
    result = CompactedModule(root=root, state_keys=list(plan["state_keys"]), layers=decisions)
    result.fallback = dict(plan["fallback"])
    owner = plan["owner"]
    for pname, reason in plan["fallback"].items():
        if pname in owner:
            result.fallback_masks[pname] = masks[pname]
    modules = plan["modules"]
    for mod_name, pattern in plan["legacy"].items():
        mod = modules[mod_name]
        wname = _join(mod_name, "weight")
        cl = compact_linear(mod, masks[wname], pattern)
        result.originals[mod_name], result.compacted[mod_name] = mod, cl
        result.covered[mod_name] = [wname]
        _set_submodule(root, mod_name, cl)
        if release:
            mod.weight.data = torch.empty(0, dtype=mod.weight.dtype, device=mod.weight.device)
    for mod_name, s in plan["sliced"].items():
        layer = _build_sliced(s).train(s.module.training)
        result.originals[mod_name], result.compacted[mod_name] = s.module, layer
        result.covered[mod_name] = list(s.masked)
        _set_submodule(root, mod_name, layer)
        if release:
            for p in s.module.parameters(recurse=False):
                p.data = torch.empty(0, dtype=p.dtype, device=p.device)
    for mod_name, (index, width, dim) in plan["replacements"].items():
        mod = modules[mod_name]
        index = index.to(next((b.device for b in mod.buffers()), index.device))
        stand_in = SlicedDropout(mod.p, index, width, dim) if isinstance(mod, nn.Dropout) \
            else mod.compact_features(index, width)
        stand_in.train(mod.training)
        result.originals[mod_name], result.compacted[mod_name] = mod, stand_in
        _set_submodule(root, mod_name, stand_in)
    result.released = release
    return result


# --------------------------------------------------------------------------------------
# Masked-dense fallback
# --------------------------------------------------------------------------------------


def _named_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    out = dict(module.named_parameters(remove_duplicate=False))
    out.update(module.named_buffers(remove_duplicate=False))
    return out


class MaskedDense:
    """The masked-dense mechanism: tensors whose pruned entries stay exact zeros while they train.

    The federated client uses it for everything it does not compact (it calls :meth:`mask_grads_` and
    :meth:`apply_` at the points of Lightning's step order); :meth:`attach` does the same with hooks for
    a plain torch loop. Build it from ``(tensor, mask)`` pairs (``True`` = kept) or with
    :meth:`from_module` from names. Pruned entries are set with ``masked_fill_`` (an exact ``+0``);
    the inverted masks are made once, on each tensor's device.

    * :meth:`apply_`: pruned entries to 0 (momentum, weight decay or a stray gradient would move them);
    * :meth:`mask_grads_`: their gradients to 0 (before clipping, so gradient norms match a compact layer);
    * :meth:`subset`: the pairs among some parameters (one optimiser's).
    """

    def __init__(self, pairs: Iterable[tuple[torch.Tensor, torch.Tensor]] = ()) -> None:
        self._pairs = [(t, ~m.to(device=t.device, dtype=torch.bool)) for t, m in pairs]
        self._handles: list[Any] = []

    @classmethod
    def from_module(cls, module: nn.Module, masks: Mapping[str, torch.Tensor], *, strict: bool = True) -> MaskedDense:
        """The parameters/buffers of ``module`` named in ``masks`` (a missing name raises unless ``strict=False``)."""
        tensors = _named_tensors(module)
        pairs = []
        for name, m in masks.items():
            t = tensors.get(name)
            if t is None:
                if strict:
                    raise KeyError(f"mask for {name!r} but the module has no such parameter or buffer")
                continue
            if tuple(m.shape) != tuple(t.shape):
                raise ValueError(f"mask shape {tuple(m.shape)} does not match {name!r} shape {tuple(t.shape)}")
            pairs.append((t, m))
        return cls(pairs)

    def subset(self, tensors: Iterable[torch.Tensor]) -> MaskedDense:
        """The pairs whose tensor is one of ``tensors`` (e.g. the parameters of one optimiser)."""
        ids = {id(t) for t in tensors}
        out = MaskedDense()
        out._pairs = [(t, pm) for t, pm in self._pairs if id(t) in ids]
        return out

    def __len__(self) -> int:
        return len(self._pairs)

    def apply_(self) -> None:
        if self._pairs:  # (no grad-mode switch when there is nothing to mask: this runs every step)
            with torch.no_grad():
                for t, pm in self._pairs:
                    t.masked_fill_(pm, 0)

    def mask_grads_(self) -> None:
        for t, pm in self._pairs:
            if t.grad is not None:
                t.grad.masked_fill_(pm, 0)  # a gradient has no autograd history to record

    def attach(self, optimizer: torch.optim.Optimizer | None = None, *, grad_hooks: bool = True) -> MaskedDense:
        """Apply the masks now, mask every gradient as backward produces it (a post-accumulate-grad hook)
        and re-zero after every step of ``optimizer`` (a step post-hook); :meth:`detach` removes the hooks."""
        self.apply_()
        if grad_hooks:
            for t, pm in self._pairs:
                if isinstance(t, nn.Parameter) and t.requires_grad:

                    def hook(p: torch.Tensor, pm: torch.Tensor = pm) -> None:
                        if p.grad is not None:
                            with torch.no_grad():
                                p.grad.masked_fill_(pm, 0)

                    self._handles.append(t.register_post_accumulate_grad_hook(hook))
        if optimizer is not None:
            self._handles.append(optimizer.register_step_post_hook(lambda *_: self.apply_()))
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
