"""What travels between the server and its clients, and how it is rounded: one owner.

The :class:`Channel` turns the global model into a broadcast and a client's trained model into an upload,
and reads both back, in the wire format of :mod:`lightning_fedprune.federated.wire` (only the kept part of
a pruned tensor travels; bytes are counted from the encoded arrays). With ``payload_bits`` (8 or 4) the
kept values of the floating-point parameters travel as integer codes with a scale per row:

* **down** (:meth:`Channel.broadcast`): rounded to nearest, with the rounding error fed back into the next
  round's broadcast (a residual the server keeps, :meth:`Channel.state_dict`), so the global model does not
  drift;
* **up** (:meth:`Channel.upload`): the client's change since the broadcast, rounded stochastically (unbiased,
  seeded by the client's seed), which :meth:`Channel.read_upload` adds to the server's own weights (so the
  rounding of the broadcast does not stay in the global model).

Masks and indices are exact; pruned entries stay exact zeros; buffers travel as they are. Client statistics
(:attr:`~lightning_fedprune.federated.protocol.ClientPlan.statistics`) travel up as dense float32 tensors, one
payload per statistic (:meth:`Channel.upload_statistics`, :meth:`Channel.read_statistics`). The executors,
the Flower bridge, the server and the clients call a channel; nothing else encodes or decodes. Decoding
lands on the device of the tensor the values meet (the server's weights, the client's replica): only the
kept values cross from the host.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from lightning_fedprune.federated.protocol import derive_seed
from lightning_fedprune.federated.wire import Payload, decode_state, decode_tensor, encode_state
from lightning_fedprune.pruning.masking import pruned

__all__ = ["QUANT_STREAM", "Channel"]

#: Mixed into the client's seed for the stochastic rounding of its quantised upload (a stream of its own).
QUANT_STREAM = 0x5155414E


class Channel:
    """Encodes and decodes both directions of a run.

    Args:
        payload_bits: ``None`` (values travel as they are), ``8`` or ``4``.
        quantized: the names of the tensors that travel quantised with ``payload_bits`` (the floating-point
            parameters; buffers travel as they are).
    """

    def __init__(self, payload_bits: int | None = None, quantized: Iterable[str] = ()) -> None:
        self.payload_bits = payload_bits
        self.quantized = tuple(quantized) if payload_bits is not None else ()
        self.residual: dict[str, Tensor] = {}  # what rounding left out of the last broadcast (server side)

    # ------------------------------------------------------------------ server
    def broadcast(self, state: Mapping[str, Tensor], masks: Mapping[str, Tensor], patterns: Mapping[str, str], *,
                  feedback: bool = True) -> Payload:
        """The global ``state`` in wire form: the kept values of ``masks`` and their indices. With
        ``payload_bits``, ``feedback`` adds the last round's rounding error and keeps this round's (the round's
        broadcast; a client's own sub-model broadcast has none)."""
        bits = self.payload_bits
        if bits is None:
            return encode_state(state, masks, patterns, send_index=True, trusted=True)
        if feedback and self.residual:
            state = {name: t + self.residual[name] if name in self.residual else t for name, t in state.items()}
        encoded = encode_state(state, masks, patterns, send_index=True, bits=bits, quantized=self.quantized,
                               trusted=True)
        if feedback:
            for name in self.quantized:
                sent = decode_tensor(encoded[name], device=state[name].device)
                residual = state[name] - sent
                self.residual[name] = pruned(residual, masks[name]) if name in masks else residual
        return encoded

    def read_upload(self, upload: Payload, masks: Mapping[str, Tensor], like: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """A client's parameters and buffers from its upload, on the devices of ``like`` (the server's tensors of
        the same names). A relative (quantised) tensor is the client's change since the broadcast, added to the
        server's own value. Pruned entries are exact zeros either way."""
        state = decode_state(upload, masks, like=like, trusted=True)
        for name, enc in upload.items():
            if enc.relative:
                value = like[name].detach() + state[name]
                state[name] = pruned(value, masks[name]) if name in masks else value
        return state

    # ------------------------------------------------------------------ client
    @staticmethod
    def read_broadcast(payload: Payload, device: torch.device | str | None = None
                       ) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, str]]:
        """``(state, masks, patterns)`` of a broadcast, on ``device``: the values the client starts from (exact
        zeros where pruned), the keep-masks and patterns of every tensor that travelled pruned."""
        return payload.read(device)

    def upload(self, trained: Mapping[str, Tensor], start: Mapping[str, Tensor], masks: Mapping[str, Tensor],
               patterns: Mapping[str, str], seed: int) -> Payload:
        """What travels up: the kept entries only (the server knows the masks, so no index is sent), so pruned
        entries never leave the client whatever their value here. With ``payload_bits`` the floating-point
        parameters go as their change since the broadcast (``start``), quantised with unbiased stochastic
        rounding seeded by the client's ``seed``. Encoding copies the tensors (the next client overwrites them)."""
        bits = self.payload_bits
        if bits is None:
            return encode_state(trained, masks, patterns, send_index=False, trusted=True)
        quantized = set(self.quantized)
        values = {name: t - start[name] if name in quantized else t for name, t in trained.items()}
        generator = torch.Generator().manual_seed(derive_seed(seed, QUANT_STREAM))
        return encode_state(values, masks, patterns, send_index=False, bits=bits, quantized=self.quantized,
                            generator=generator, relative=True, trusted=True)

    @staticmethod
    def upload_statistics(statistics: Mapping[str, Mapping[str, Tensor]]) -> dict[str, Payload]:
        """What a client's statistics send up: ``{statistic: payload}``, every tensor dense and as it is (float32
        sums over the client's local steps; every entry, pruned ones included). Encoding copies them."""
        return {stat: encode_state(dict(values)) for stat, values in statistics.items()}

    @staticmethod
    def read_statistics(statistics: Mapping[str, Payload], like: Mapping[str, Tensor]) -> dict[str, dict[str, Tensor]]:
        """A client's statistics from its upload, ``{statistic: {name: tensor}}``, on the devices of ``like``."""
        return {stat: decode_state(payload, like=like) for stat, payload in statistics.items()}

    # ------------------------------------------------------------------ state (the server's residual)
    def to(self, device: torch.device | str) -> Channel:
        """Move the residual to ``device`` (where the model is), in place; returns ``self``."""
        self.residual = {n: t.to(device) for n, t in self.residual.items()}
        return self

    def state_dict(self) -> dict[str, Any]:
        return {"residual": {n: t.detach().clone() for n, t in self.residual.items()}}

    def load_state_dict(self, state: Mapping[str, Any], like: Mapping[str, Tensor] | None = None) -> None:
        """Restore :meth:`state_dict`; each residual goes to the device of ``like[name]`` when given."""
        self.residual = {n: t.to(like[n].device, copy=True) if like is not None and n in like else t.clone()
                         for n, t in state.get("residual", {}).items()}
