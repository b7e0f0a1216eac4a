"""Tensors as plain numpy arrays, bit for bit, and as integer codes: the arrays the wire format carries.

* dtypes are preserved bit-exactly: numpy-native dtypes go as they are; ``bfloat16`` travels as a
  ``uint16`` view and float8 types as a ``uint8`` view (:func:`to_numpy` / :func:`from_numpy`);
* :func:`quantize` / :func:`dequantize`: ``bits``-bit codes (8, or two 4-bit codes per byte) with a float32
  scale per row of the array's 2-D view (a 1-D array is cut into rows of :data:`QUANT_ROW` entries), rounded
  to nearest or stochastically (unbiased). Rounding happens on the host, where the codes are.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["QUANT_BITS", "QUANT_ROW", "dequantize", "dtype_from_name", "dtype_name", "from_numpy", "quantize",
           "to_numpy"]


# --------------------------------------------------------------------------------------
# dtypes
# --------------------------------------------------------------------------------------

# torch dtypes numpy cannot hold: sent as an unsigned-integer view of the same width.
_VIEW_DTYPES: dict[torch.dtype, torch.dtype] = {torch.bfloat16: torch.uint16}
for _name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu"):
    if hasattr(torch, _name):
        _VIEW_DTYPES[getattr(torch, _name)] = torch.uint8


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown torch dtype {name!r}")
    return dtype


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """A contiguous CPU numpy array holding ``t``'s bits (a copy, never a view of ``t``)."""
    t = t.detach().resolve_conj().resolve_neg()
    if t.device.type != "cpu":
        t = t.cpu()
    view = _VIEW_DTYPES.get(t.dtype)
    if view is not None:
        t = t.contiguous().view(view)
    return np.array(t.contiguous().numpy(), copy=True, order="C")


def from_numpy(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    if not (a.flags.writeable and a.flags.c_contiguous):
        a = np.array(a, copy=True, order="C")  # read-only (e.g. from bytes) or strided: copy
    t = torch.from_numpy(a)  # otherwise share memory: a decoded tensor may alias its payload's array
    if t.dtype != dtype:
        if dtype in _VIEW_DTYPES and t.dtype == _VIEW_DTYPES[dtype]:
            t = t.view(dtype)
        else:
            raise ValueError(f"wire array has dtype {a.dtype}, cannot be read as {dtype}")
    return t


# --------------------------------------------------------------------------------------
# Quantised values
# --------------------------------------------------------------------------------------

#: Entries per scale when a 1-D values array is quantised (a 2-D view's row otherwise).
QUANT_ROW = 256
#: Supported code widths.
QUANT_BITS = (4, 8)


def _row_view(v: torch.Tensor) -> torch.Tensor:
    """``v`` as rows sharing one scale: its 2-D view, or a 1-D one cut into rows of ``QUANT_ROW`` (padded)."""
    if v.dim() >= 2:
        return v.reshape(v.shape[0], -1)
    flat = v.reshape(-1)
    rows = max(1, math.ceil(flat.numel() / QUANT_ROW))
    return torch.nn.functional.pad(flat, (0, rows * QUANT_ROW - flat.numel())).reshape(rows, QUANT_ROW)


def quantize(v: torch.Tensor, bits: int, generator: torch.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(codes, scales)`` of a float tensor: symmetric per-row scales, codes in ``[-qmax, qmax]``.

    Without a ``generator`` the codes are rounded to nearest (error <= scale / 2); with one, stochastically:
    ``floor(x + u)``, ``u ~ U[0, 1)``, whose expectation is ``x`` exactly (unbiased). 4-bit codes are packed
    two per byte (the first in the low nibble).

    >>> codes, scales = quantize(torch.tensor([[1.0, -0.5, 0.25]]), 8)
    >>> codes.tolist(), scales.tolist()
    ([[127, -64, 32]], [0.007874015718698502])
    """
    qmax = 2 ** (bits - 1) - 1
    rows = _row_view(v.detach().to(device="cpu", dtype=torch.float32))  # the codes are host arrays: round there
    scale = rows.abs().amax(dim=1) / qmax
    x = rows / torch.where(scale > 0, scale, torch.ones_like(scale))[:, None]
    if generator is None:
        q = torch.round(x)
    else:
        q = torch.floor(x + torch.rand(x.shape, generator=generator, dtype=x.dtype))
    q = q.clamp_(-qmax, qmax).to(torch.int8).reshape(-1)[: v.numel()]
    codes = q.reshape(v.shape).numpy()
    if bits == 4:
        flat = (q.to(torch.int16) & 0xF).to(torch.uint8)
        if flat.numel() % 2:
            flat = torch.cat([flat, flat.new_zeros(1)])
        codes = (flat[0::2] | (flat[1::2] << 4)).numpy()
    return np.ascontiguousarray(codes), scale.numpy().astype(np.float32)


def dequantize(codes: np.ndarray, scales: np.ndarray, bits: int, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """The tensor of ``shape`` and ``dtype`` that :func:`quantize` codes describe."""
    n = math.prod(shape)
    if bits == 4:
        packed = torch.from_numpy(np.asarray(codes, dtype=np.uint8).copy())
        nibbles = torch.stack([packed & 0xF, packed >> 4], dim=1).reshape(-1)[:n].to(torch.int16)
        q = torch.where(nibbles > 7, nibbles - 16, nibbles).to(torch.float32)
    else:
        q = torch.from_numpy(np.asarray(codes, dtype=np.int8).copy()).reshape(-1).to(torch.float32)
    scale = torch.from_numpy(np.asarray(scales, dtype=np.float32).copy())
    if len(shape) >= 2:
        out = q.reshape(shape[0], -1) * scale[:, None]
    else:
        padded = torch.nn.functional.pad(q, (0, scale.numel() * QUANT_ROW - n)).reshape(-1, QUANT_ROW)
        out = (padded * scale[:, None]).reshape(-1)[:n]
    return out.reshape(tuple(shape)).to(dtype)
