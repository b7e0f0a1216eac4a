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

Everything else (convolutions, embeddings, ``nn.MultiheadAttention`` projections, tied
weights, ``unstructured`` masks, biases with their own mask) stays a full tensor and is kept
pruned by the masked-dense mechanism :class:`MaskedDense`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .patterns import COMPACT_PATTERNS, STRUCTURED_PATTERNS, Pattern, check_pattern, expand_groups, get_pattern, groups_from_mask

__all__ = [
    "CompactLinear",
    "compact_linear",
    "compact_module",
    "CompactedModule",
    "MaskedDense",
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

    * ``compacted``: module name -> the :class:`CompactLinear` now in ``root``;
    * ``compacted_names``: the weight names (``"<module>.weight"``) that were compacted;
    * ``fallback``: masked parameter name -> why it stays masked-dense;
    * ``fallback_masks``: the masks still to enforce masked-dense on the compacted ``root``
      (pass them to :class:`MaskedDense` / :func:`apply_masks_`).
    """

    root: nn.Module
    compacted: dict[str, CompactLinear] = field(default_factory=dict)
    originals: dict[str, nn.Module] = field(default_factory=dict)
    fallback: dict[str, str] = field(default_factory=dict)
    fallback_masks: dict[str, torch.Tensor] = field(default_factory=dict)
    state_keys: list[str] = field(default_factory=list)
    restored: bool = False
    released: bool = False

    @property
    def compacted_names(self) -> list[str]:
        return [_join(n, "weight") for n in self.compacted]

    def full_state(self) -> dict[str, torch.Tensor]:
        """Full-coordinate ``weight`` (and ``bias``) of every compacted layer, by parameter name."""
        out: dict[str, torch.Tensor] = {}
        for name, cl in self.compacted.items():
            for k, v in cl.full_state().items():
                out[_join(name, k)] = v
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        """``root``'s state dict in the original (full) coordinates and key order."""
        current = self.root.state_dict()
        full = self.full_state()
        return {k: (full[k] if k in full else current[k]) for k in self.state_keys}

    @torch.no_grad()
    def restore(self, copy_back: bool = True) -> None:
        """Put the original modules back; with ``copy_back`` their weight/bias are overwritten
        by the trained compact values (exact zeros at pruned weight entries)."""
        if self.restored:
            return
        if self.released and not copy_back:
            raise RuntimeError("compact_module(..., release=True) freed the original weights: restore needs copy_back=True")
        for name, orig in self.originals.items():
            cl = self.compacted[name]
            if copy_back and self.released:
                orig.weight.data = cl.full_weight().detach()  # same Parameter object, new full-size storage
                if orig.bias is not None:
                    orig.bias.copy_(cl.bias)
            elif copy_back:
                orig.weight.copy_(cl.full_weight())
                if orig.bias is not None:
                    orig.bias.copy_(cl.bias)
            _set_submodule(self.root, name, orig)
        self.restored = True


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def compact_module(
    root: nn.Module,
    masks: Mapping[str, torch.Tensor],
    patterns: Mapping[str, str],
    *,
    release: bool = False,
) -> CompactedModule:
    """Swap, in place on ``root``, every ``nn.Linear`` whose ``.weight`` has a structured mask
    for a :class:`CompactLinear`. Left to the masked-dense fallback (reported in
    ``.fallback``): non-Linear modules, ``unstructured`` masks, Linear subclasses with their
    own ``forward``, Linears owned by ``nn.MultiheadAttention`` (it reads
    ``out_proj.weight`` directly), shared (tied) weights, parametrized modules or modules with
    forward hooks, and ``root`` itself.

    With ``release=True`` the original full-size weights' storage is freed while compacted (so
    only the kept slices occupy memory) and re-created by ``restore(copy_back=True)``."""
    param_owner: dict[str, str] = {}
    for mod_name, mod in root.named_modules(remove_duplicate=False):
        for pn, _ in mod.named_parameters(recurse=False, remove_duplicate=False):
            param_owner[_join(mod_name, pn)] = mod_name
    counts: dict[int, int] = {}
    for _, p in root.named_parameters(remove_duplicate=False):
        counts[id(p)] = counts.get(id(p), 0) + 1
    modules = dict(root.named_modules(remove_duplicate=False))

    result = CompactedModule(root=root, state_keys=list(root.state_dict().keys()))
    for pname, mask in masks.items():
        pattern = patterns.get(pname, "unstructured")
        mod_name = param_owner.get(pname)
        leaf = pname.rpartition(".")[2]
        reason = None
        if mod_name is None:
            reason = "not a parameter of root"
        else:
            mod = modules[mod_name]
            parent = modules.get(mod_name.rpartition(".")[0]) if mod_name else None
            if leaf != "weight" or not isinstance(mod, nn.Linear):
                reason = f"{type(mod).__name__}.{leaf} is not an nn.Linear weight"
            elif pattern not in STRUCTURED_PATTERNS:
                reason = f"pattern {pattern!r} is not structured"
            elif pattern not in COMPACT_PATTERNS:
                reason = f"pattern {pattern!r} has no compact nn.Linear layer"
            elif isinstance(parent, nn.MultiheadAttention):
                reason = "owned by nn.MultiheadAttention (reads the weight directly)"
            elif type(mod).forward is not nn.Linear.forward:
                reason = f"{type(mod).__name__} overrides forward"
            elif not mod_name:
                reason = "root module itself (cannot be swapped in place)"
            elif counts[id(mod.weight)] > 1 or (mod.bias is not None and counts[id(mod.bias)] > 1):
                reason = "shared (tied) parameter"
            elif torch.nn.utils.parametrize.is_parametrized(mod) or mod._forward_hooks or mod._forward_pre_hooks:
                reason = "parametrized or has forward hooks"
            elif mod_name in result.compacted:
                reason = "module already compacted"
        if reason is not None:
            result.fallback[pname] = reason
            if mod_name is not None:
                result.fallback_masks[pname] = mask
            continue
        cl = compact_linear(mod, mask, pattern)
        result.originals[mod_name] = mod
        result.compacted[mod_name] = cl
        _set_submodule(root, mod_name, cl)
        if release:
            mod.weight.data = torch.empty(0, dtype=mod.weight.dtype, device=mod.weight.device)
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
