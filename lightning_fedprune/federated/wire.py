"""Wire format: what the server sends to a client and what a client sends back.

A tensor is encoded into a few plain :class:`numpy.ndarray` objects that could go on a wire
as they are; bytes are counted from those arrays (``EncodedTensor.nbytes`` is exactly the sum
of their ``.nbytes``), so communication numbers are measured, not estimated. Metadata (names,
shapes, dtypes, pattern) travels in a small JSON-able *spec* and is not counted, just as
plain FedAvg is counted as the raw tensor bytes only (:func:`dense_nbytes`).

Kinds (``EncodedTensor.kind``) and the arrays each one carries::

    dense         values                       the tensor, full shape
    unstructured  mask_bits, values            numpy.packbits of the flat mask (1 bit/entry,
                                               big-endian bit order) + kept values, row-major
    row           index|index_bits, values     values = W2d[kept_rows]          (k, C)
    column        index|index_bits, values     values = W2d[:, kept_cols]       (R, k)
    half_row      index|index_bits, values0, values1
                                               W2d = [W1 | W2]: values_h = Wh[kept_h, :]
    half_column   index|index_bits, values0, values1
                                               W2d = [W1 ; W2]: values_h = Wh[:, kept_h]

``W2d``, the groups and their block-major indices (``half_row``: group ``h*R + r``;
``half_column``: group ``h*C + c``) are those of :mod:`lightning_fedprune.pruning.patterns`;
indices are sorted ascending. Any tensor can go ``dense`` (0-d and empty ones included); a
masked one must be one :func:`~lightning_fedprune.pruning.patterns.check_pattern` accepts (at
least one dimension and one entry, an even split axis for the half patterns).

Nothing here names a pattern: the kind is a registered
:class:`~lightning_fedprune.pruning.patterns.Pattern`, whose ``values`` are the arrays sent
(``values`` for one block, ``values0``, ``values1``, ... for more) and whose ``scatter_`` rebuilds
the tensor; its ``structured`` flag picks the index encoding below. A registered pattern
therefore travels without any change to this module.

**Index encoding** (structured kinds): the kept group indices are sent either as ``index``
(int32, one per kept group) or as ``index_bits`` (``numpy.packbits`` over all groups, one
bit per group) -- whichever is smaller, the bitmask on a tie. An unstructured kind always
sends ``mask_bits`` (one bit per entry). ``EncodedTensor.index`` records the choice
(``"int32"`` / ``"bits"``; ``None`` when no index is sent).

**send_index=False** (the upward direction: the server already knows the mask) sends the
values only; :func:`decode_tensor` / :meth:`EncodedTensor.kept_groups` then need the mask.

**Quantised values** (``bits=8`` or ``4``, :func:`encode_tensor`): every values array ``k`` is sent as
``k.q`` (int8 codes, or two 4-bit codes per uint8) and ``k.scale`` (float32, one per row of the
array's 2-D view; a 1-D array is cut into rows of :data:`QUANT_ROW` entries): value = code * scale,
``scale = max|row| / (2**(bits-1) - 1)``. Rounding is to nearest, or stochastic (unbiased, with a
``generator``). Indices and masks never change; pruned entries stay exact zeros. ``relative``
marks values sent as the difference to the receiver's copy (a client's upload against its
broadcast). The spec then carries ``quant``, ``qshapes`` and ``relative``.

**dtypes** are preserved bit-exactly: numpy-native dtypes (float16/32/64, int*, uint8, bool,
complex) go as they are; ``bfloat16`` travels as a ``uint16`` view and float8 types as a
``uint8`` view, ``EncodedTensor.dtype`` holds the torch dtype name used to view them back.
"""

from __future__ import annotations

import io
import json
import math
import struct
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch

from lightning_fedprune.federated.codec import QUANT_BITS, QUANT_ROW, dequantize, quantize
from lightning_fedprune.federated.codec import dtype_from_name as _dtype_from_name
from lightning_fedprune.federated.codec import dtype_name as _dtype_name
from lightning_fedprune.federated.codec import from_numpy as _from_numpy
from lightning_fedprune.federated.codec import to_numpy as _to_numpy
from lightning_fedprune.pruning.compact import CompactLinear
from lightning_fedprune.pruning.patterns import (
    COMPACT_PATTERNS,
    STRUCTURED_PATTERNS,
    Pattern,
    expand_groups,
    get_pattern,
    groups_from_mask,
    num_groups,
    shape_2d,
    to_2d,
)

__all__ = [
    "QUANT_BITS",
    "QUANT_ROW",
    "STRUCTURED_PATTERNS",  # re-exported from pruning.patterns
    "EncodedTensor",
    "Payload",
    "compact_linear_from_encoded",
    "encode_tensor",
    "decode_tensor",
    "encode_state",
    "decode_state",
    "dense_nbytes",
    "dequantize",
    "quantize",
]

# --------------------------------------------------------------------------------------
# Array keys of a pattern's kept part
# --------------------------------------------------------------------------------------


def _value_keys(pattern: Pattern) -> tuple[str, ...]:
    """``("values",)`` for one block, ``("values0", "values1", ...)`` for more."""
    if pattern.num_blocks == 1:
        return ("values",)
    return tuple(f"values{i}" for i in range(pattern.num_blocks))


def _bits_key(pattern: Pattern) -> str:
    """The array of a bitmask index: one bit per entry (unstructured) or per group."""
    return "index_bits" if pattern.structured else "mask_bits"


# --------------------------------------------------------------------------------------
# EncodedTensor
# --------------------------------------------------------------------------------------


@dataclass
class EncodedTensor:
    """One tensor on the wire. ``arrays`` are exactly what would be sent."""

    kind: str  # "dense" or a pattern name
    shape: tuple[int, ...]
    dtype: str  # torch dtype name, e.g. "float32", "bfloat16"
    index: str | None = None  # "int32" | "bits" (unstructured: always "bits") | None (not sent)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    quant: int | None = None  # bits of the values' codes (None: raw values)
    qshapes: dict[str, list[int]] = field(default_factory=dict)  # shape of every quantised values array
    relative: bool = False  # values are differences to the receiver's copy

    def values_array(self, key: str, device: torch.device | str | None = None) -> torch.Tensor:
        """The values array ``key`` (``"values"``, ``"values0"``, ...) as a tensor on ``device`` (default: the
        CPU), dequantised if need be (on the CPU: the codes are what arrived)."""
        if self.quant is None:
            t = _from_numpy(self.arrays[key], self.torch_dtype)
        else:
            t = dequantize(self.arrays[f"{key}.q"], self.arrays[f"{key}.scale"], self.quant, self.qshapes[key],
                           self.torch_dtype)
        return t if device is None else t.to(device, non_blocking=True)

    @property
    def nbytes(self) -> int:
        return int(sum(a.nbytes for a in self.arrays.values()))

    @property
    def has_index(self) -> bool:
        return self.kind == "dense" or self.index is not None

    @property
    def torch_dtype(self) -> torch.dtype:
        return _dtype_from_name(self.dtype)

    @property
    def shape2d(self) -> tuple[int, int]:
        return shape_2d(self.shape)

    @property
    def num_groups(self) -> int:
        if self.kind == "dense":
            return 1
        return num_groups(self.kind, self.shape)

    @property
    def _pattern(self) -> Pattern:
        return get_pattern(self.kind, "kind")

    # -- indices --------------------------------------------------------------------
    def group_flags(self, mask: torch.Tensor | None = None, *, trusted: bool = False) -> torch.Tensor:
        """Per-group keep flags (bool, block-major), on ``mask``'s device when a mask is given. ``mask`` is
        needed iff no index was sent; given with an index, the two must agree. ``trusted``: the mask is the
        receiver's own (a union of whole groups by construction), so it is neither checked nor compared."""
        if self.kind == "dense":
            return torch.ones(1, dtype=torch.bool)
        if self.has_index and not (trusted and mask is not None):
            if self.index == "bits":
                bits = np.unpackbits(self.arrays[_bits_key(self._pattern)], count=self.num_groups)
                flags = torch.from_numpy(bits.astype(np.bool_))
            else:
                flags = torch.zeros(self.num_groups, dtype=torch.bool)
                flags[torch.from_numpy(self.arrays["index"].astype(np.int64))] = True
            if mask is not None:
                self._check_mask_shape(mask)
                flags = flags.to(mask.device)
                if not torch.equal(groups_from_mask(mask, self.kind), flags):
                    raise ValueError("the mask given does not match the index sent with the tensor")
            return flags
        if mask is None:
            raise ValueError(f"this {self.kind!r} tensor was encoded with send_index=False: pass its mask")
        self._check_mask_shape(mask)
        if trusted:
            return self._pattern.trusted_flags(to_2d(mask))
        return groups_from_mask(mask, self.kind)

    def mask(self, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The full bool keep-mask of ``shape``."""
        if self.kind == "dense":
            return torch.ones(self.shape, dtype=torch.bool)
        return expand_groups(self.group_flags(mask), self.kind, self.shape)

    def blocks(self, mask: torch.Tensor | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``[(kept, values), ...]`` without scattering, for building a compact layer.

        * a pattern: the blocks of its :meth:`~lightning_fedprune.pruning.patterns.Pattern.split`
          (one for ``row``/``column``, two for the half patterns; ``unstructured``: one block, flat
          kept indices and the 1-D kept values);
        * ``dense``: one block, ``arange(R)`` and the 2-D view (a 0-d tensor is ``(1, 1)``).
        """
        if self.kind == "dense":
            W = to_2d(torch.atleast_1d(self.values_array("values").reshape(self.shape)))
            return [(torch.arange(W.shape[0]), W)]
        return self._blocks(self.group_flags(mask))

    def _blocks(self, flags: torch.Tensor, device: torch.device | str | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        pattern = self._pattern
        values = [self.values_array(key, device) for key in _value_keys(pattern)]
        return list(zip(pattern.kept(flags if device is None else flags.to(device)), values))

    def _check_mask_shape(self, mask: torch.Tensor) -> None:
        if tuple(mask.shape) != tuple(self.shape):
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match tensor shape {tuple(self.shape)}")

    # -- spec -------------------------------------------------------------------------
    def spec(self) -> dict[str, Any]:
        """JSON-able metadata: everything but the array contents."""
        spec = {
            "kind": self.kind,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "index": self.index,
            "keys": list(self.arrays),
        }
        if self.quant is not None:
            spec.update(quant=self.quant, qshapes=dict(self.qshapes))
        if self.relative:
            spec["relative"] = True
        return spec


def encode_tensor(
    t: torch.Tensor,
    mask: torch.Tensor | None = None,
    pattern: str | None = None,
    *,
    send_index: bool = True,
    name: str = "tensor",
    bits: int | None = None,
    generator: torch.Generator | None = None,
    relative: bool = False,
    trusted: bool = False,
) -> EncodedTensor:
    """Encode ``t``; with a ``mask`` only the kept entries travel (see module docstring).

    ``pattern`` defaults to ``"unstructured"`` when a mask is given (valid for any mask of a
    tensor with at least one dimension and one entry); without a mask the tensor is sent
    ``dense`` whatever the pattern. ``bits`` (8 or 4) quantises the values of a floating-point
    tensor (rounded to nearest, or stochastically with ``generator``); ``relative`` only marks them
    as differences to the receiver's copy. ``trusted``: the mask is a union of whole groups by construction
    (the sender's own pruning state), so it is not checked.
    """
    p = get_pattern("unstructured" if pattern is None else pattern)  # checked even when the tensor goes dense
    shape = tuple(int(s) for s in t.shape)
    dtype = _dtype_name(t.dtype)
    t = t.detach()
    if bits is not None and bits not in QUANT_BITS:
        raise ValueError(f"`bits` must be one of {QUANT_BITS} or None, got {bits!r}")
    if mask is None:
        return _with_values(EncodedTensor("dense", shape, dtype, None, relative=relative), {"values": t},
                            bits, generator)
    if tuple(mask.shape) != shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match shape {shape} of {name}")
    if mask.dtype != torch.bool:
        raise ValueError(f"mask of {name} must be a bool tensor (True = kept), got {mask.dtype}")
    mask = mask.detach().to(t.device)
    # validates the shape and the groups, unless they come from the sender's own pruning state
    flags = p.trusted_flags(to_2d(mask)) if trusted else groups_from_mask(mask, p.name, name)
    index, arrays = _encode_index(p, flags) if send_index else (None, {})
    enc = EncodedTensor(p.name, shape, dtype, index, arrays, relative=relative)
    return _with_values(enc, dict(zip(_value_keys(p), p.values(to_2d(t), flags))), bits, generator)


def _with_values(enc: EncodedTensor, values: dict[str, torch.Tensor], bits: int | None,
                 generator: torch.Generator | None) -> EncodedTensor:
    """Add the values arrays to ``enc``: raw, or quantised when ``bits`` is given and they are floating point."""
    if bits is None or not all(v.is_floating_point() for v in values.values()):
        enc.arrays.update((key, _to_numpy(v)) for key, v in values.items())
        return enc
    enc.quant = bits
    for key, v in values.items():
        enc.arrays[f"{key}.q"], enc.arrays[f"{key}.scale"] = quantize(v, bits, generator)
        enc.qshapes[key] = list(v.shape)
    return enc


def _encode_index(pattern: Pattern, flags: torch.Tensor) -> tuple[str, dict[str, np.ndarray]]:
    """``(index kind, arrays)`` of the kept groups: a bitmask, or int32 indices where that is smaller
    (structured patterns only; the bitmask on a tie)."""
    if pattern.structured:
        kept = flags.nonzero().reshape(-1).cpu()
        if 4 * kept.numel() < (flags.numel() + 7) // 8:
            return "int32", {"index": kept.numpy().astype(np.int32)}
    return "bits", {_bits_key(pattern): np.packbits(_to_numpy(flags))}


def decode_tensor(enc: EncodedTensor, mask: torch.Tensor | None = None, *, device: torch.device | str | None = None,
                  trusted: bool = False) -> torch.Tensor:
    """Full-shape tensor with exact zeros at pruned entries, on ``device`` (default: ``mask``'s, else the CPU):
    the kept values are copied there and scattered there. ``mask`` is required iff ``enc`` was encoded with
    ``send_index=False`` (if both are present they must agree, unless ``trusted``: see
    :meth:`EncodedTensor.group_flags`)."""
    dtype = enc.torch_dtype
    shape = tuple(enc.shape)
    if device is None and mask is not None:
        device = mask.device
    if enc.kind == "dense":
        return enc.values_array("values", device).reshape(shape)
    flags = enc.group_flags(None if mask is None else mask.to(device), trusted=trusted)
    blocks = enc._blocks(flags, device)
    return enc._pattern.scatter_(torch.zeros(enc.shape2d, dtype=dtype, device=device), blocks).reshape(shape)


def compact_linear_from_encoded(
    enc: EncodedTensor,
    bias: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    *,
    device: torch.device | str | None = None,
    requires_grad: bool = True,
) -> CompactLinear:
    """A :class:`~lightning_fedprune.pruning.compact.CompactLinear` built straight from a wire-encoded
    ``nn.Linear`` weight: its blocks become the layer's parameters, nothing is scattered to full size.

    ``enc`` must be a 2-D weight encoded with a pattern that has a compact layer
    (:data:`~lightning_fedprune.pruning.patterns.COMPACT_PATTERNS`); ``mask`` is needed iff it was
    encoded with ``send_index=False``.
    """
    if enc.kind not in COMPACT_PATTERNS or len(enc.shape) != 2:
        raise ValueError(
            f"need a 2-D weight encoded with a pattern that has a compact layer {tuple(COMPACT_PATTERNS)}, "
            f"got kind {enc.kind!r} shape {enc.shape}"
        )
    kept, blocks = zip(*enc.blocks(mask))
    out_features, in_features = enc.shape
    return CompactLinear(
        in_features,
        out_features,
        enc.kind,
        [k.to(device) for k in kept],
        [w.to(device) for w in blocks],
        None if bias is None else bias.to(device),
        requires_grad=requires_grad,
    )


# --------------------------------------------------------------------------------------
# Payload: a whole state
# --------------------------------------------------------------------------------------

_MAGIC = b"FPW1"


@dataclass
class Payload:
    """An ordered ``name -> EncodedTensor`` map: one plan's or one result's weights."""

    tensors: dict[str, EncodedTensor] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return int(sum(e.nbytes for e in self.tensors.values()))

    @property
    def dense_nbytes(self) -> int:
        """Bytes plain FedAvg would send for the same tensors: every one dense."""
        return int(sum(math.prod(e.shape) * e.torch_dtype.itemsize for e in self.tensors.values()))

    def read(self, device: torch.device | str | None = None
             ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, str]]:
        """``(state, masks, patterns)``: what a receiver rebuilds from a payload encoded with its indices
        (the server's broadcast): full tensors with exact zeros at pruned entries, the keep-mask and the
        pattern of every tensor that travelled pruned — on ``device`` (default: the CPU; the kept values are
        copied there and scattered there)."""
        state, masks, patterns = {}, {}, {}
        for name, enc in self.tensors.items():
            shape = tuple(enc.shape)
            if enc.kind == "dense":
                state[name] = enc.values_array("values", device).reshape(shape)
                continue
            pattern = enc._pattern
            flags = enc.group_flags()
            if device is not None:
                flags = flags.to(device, non_blocking=True)
            blocks = enc._blocks(flags, device)
            zeros = torch.zeros(enc.shape2d, dtype=enc.torch_dtype, device=device)
            state[name] = pattern.scatter_(zeros, blocks).reshape(shape)
            masks[name] = pattern.expand(flags, *enc.shape2d).reshape(shape).contiguous()
            patterns[name] = enc.kind
        return state, masks, patterns

    def __len__(self) -> int:
        return len(self.tensors)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def __getitem__(self, name: str) -> EncodedTensor:
        return self.tensors[name]

    def keys(self):
        return self.tensors.keys()

    def items(self):
        return self.tensors.items()

    # -- flat arrays + spec (pipes, Flower ArrayRecord, ...) -----------------------
    def spec(self) -> list[dict[str, Any]]:
        """JSON-able description; together with :meth:`to_arrays` it rebuilds the payload."""
        return [{"name": name, **enc.spec()} for name, enc in self.tensors.items()]

    def to_arrays(self) -> list[np.ndarray]:
        """All arrays, in ``spec()`` order (tensor by tensor, keys in ``spec[i]['keys']`` order)."""
        return [a for enc in self.tensors.values() for a in enc.arrays.values()]

    @classmethod
    def from_arrays(cls, arrays: Sequence[np.ndarray], spec: Sequence[Mapping[str, Any]]) -> "Payload":
        arrays = list(arrays)
        need = sum(len(s["keys"]) for s in spec)
        if need != len(arrays):
            raise ValueError(f"spec describes {need} arrays, got {len(arrays)}")
        tensors: dict[str, EncodedTensor] = {}
        it = iter(arrays)
        for s in spec:
            tensors[s["name"]] = EncodedTensor(
                kind=s["kind"],
                shape=tuple(int(x) for x in s["shape"]),
                dtype=s["dtype"],
                index=s.get("index"),
                arrays={k: np.asarray(next(it)) for k in s["keys"]},
                quant=s.get("quant"),
                qshapes={k: list(v) for k, v in (s.get("qshapes") or {}).items()},
                relative=bool(s.get("relative", False)),
            )
        return cls(tensors)

    # -- one bytes blob ----------------------------------------------------------------
    def to_bytes(self) -> bytes:
        """``b"FPW1" + u64 header length + JSON header + raw array bytes`` (C order)."""
        arrays = self.to_arrays()
        header = {
            "spec": self.spec(),
            "arrays": [{"dtype": a.dtype.str, "shape": list(a.shape)} for a in arrays],
        }
        h = json.dumps(header, separators=(",", ":")).encode()
        buf = io.BytesIO()
        buf.write(_MAGIC)
        buf.write(struct.pack("<Q", len(h)))
        buf.write(h)
        for a in arrays:
            buf.write(np.ascontiguousarray(a).tobytes())
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> "Payload":
        data = memoryview(data)
        if bytes(data[:4]) != _MAGIC:
            raise ValueError("not a fedprune payload (bad magic)")
        (hlen,) = struct.unpack("<Q", data[4:12])
        header = json.loads(bytes(data[12 : 12 + hlen]))
        off = 12 + hlen
        arrays = []
        for a in header["arrays"]:
            dt = np.dtype(a["dtype"])
            count = math.prod(a["shape"])
            arr = np.frombuffer(data, dtype=dt, count=count, offset=off).reshape(a["shape"])
            arrays.append(arr)
            off += count * dt.itemsize
        if off != len(data):
            raise ValueError(f"payload has {len(data) - off} trailing bytes")
        return cls.from_arrays(arrays, header["spec"])


def encode_state(
    state: Mapping[str, torch.Tensor],
    masks: Mapping[str, torch.Tensor] | None = None,
    patterns: Mapping[str, str] | None = None,
    *,
    send_index: bool = True,
    bits: int | None = None,
    quantized: Iterable[str] = (),
    generator: torch.Generator | None = None,
    relative: bool = False,
    trusted: bool = False,
) -> Payload:
    """Encode every tensor of ``state`` (in its order). Tensors with a mask in ``masks`` send
    their kept entries only, with ``patterns[name]`` (default ``"unstructured"``); the
    others go dense. Masks for names absent from ``state`` are ignored. The tensors named in
    ``quantized`` are sent with ``bits``-bit codes (and marked ``relative``); ``generator`` rounds
    them stochastically."""
    masks = masks or {}
    patterns = patterns or {}
    quantized = set(quantized) if bits is not None else set()
    return Payload(
        {
            name: encode_tensor(t, masks.get(name), patterns.get(name), send_index=send_index, name=name,
                                bits=bits if name in quantized else None, generator=generator,
                                relative=relative and name in quantized, trusted=trusted)
            for name, t in state.items()
        }
    )


def decode_state(payload: Payload, masks: Mapping[str, torch.Tensor] | None = None, *,
                 like: Mapping[str, torch.Tensor] | None = None, trusted: bool = False) -> dict[str, torch.Tensor]:
    """Full-shape tensors with exact zeros at pruned entries. ``masks`` is needed for the tensors encoded with
    ``send_index=False``; each tensor is decoded onto the device of ``like[name]`` when given (the receiver's
    copy), else its mask's, else the CPU. ``trusted``: the masks are the receiver's own (no check)."""
    masks = masks or {}
    out = {}
    for name, enc in payload.items():
        m = masks.get(name)
        if not enc.has_index and m is None:
            raise ValueError(f"{name!r} was encoded with send_index=False: decode_state needs masks[{name!r}]")
        device = like[name].device if like is not None and name in like else None
        out[name] = decode_tensor(enc, m, device=device, trusted=trusted)
    return out


def dense_nbytes(state: Mapping[str, torch.Tensor] | Iterable[torch.Tensor]) -> int:
    """Bytes plain FedAvg sends for ``state``: every tensor dense."""
    tensors = state.values() if isinstance(state, Mapping) else state
    return int(sum(t.numel() * t.element_size() for t in tensors))
