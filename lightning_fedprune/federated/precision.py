"""The clients' precision: Lightning's own precision plugins (autocast / dtype, input conversion, gradient
scaling, clipping), chosen from the Trainer's ``precision`` on the device the client trains on."""

from __future__ import annotations

from typing import Literal, get_args

from lightning.pytorch.plugins.precision import DoublePrecision, HalfPrecision, MixedPrecision, Precision

__all__ = ["CLIENT_PRECISIONS", "ClientPrecision", "client_precision_plugin"]

#: Precisions a client can train in (``Trainer(precision=...)`` after Lightning's normalisation).
ClientPrecision = Literal["32-true", "64-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true"]
CLIENT_PRECISIONS: tuple[str, ...] = get_args(ClientPrecision)


def client_precision_plugin(precision: str, device_type: str = "cpu") -> Precision:
    """Lightning's precision plugin for ``precision`` (autocast / dtype, input conversion, clipping)."""
    if precision in ("32-true", "32"):
        return Precision()
    if precision in ("64-true", "64"):
        return DoublePrecision()
    if precision in ("bf16-true", "16-true"):
        return HalfPrecision(precision)  # type: ignore[arg-type]
    if precision in ("bf16-mixed", "16-mixed"):
        return MixedPrecision(precision, device=device_type)  # type: ignore[arg-type]
    raise ValueError(
        f"Federated clients support the Trainer precisions {CLIENT_PRECISIONS}; got {precision!r} "
        "(plugins such as DeepSpeed, FSDP, bitsandbytes or Transformer Engine need a Trainer per client)."
    )
