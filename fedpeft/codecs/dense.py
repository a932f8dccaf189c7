"""Dense codec: every delta value travels, optionally in half precision. The baseline."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch
from torch import Tensor

from fedpeft.codecs.base import CODECS, CodecContext, Payload, check_payload_tensors

_WIRE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@CODECS.register("dense")
class Dense:
    """Send the delta as is (exact in float32).

    Args:
        dtype: Wire precision of the values: float32 (exact), float16 or bfloat16.

    """

    def __init__(self, dtype: Literal["float32", "float16", "bfloat16"] = "float32") -> None:
        if dtype not in _WIRE_DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_WIRE_DTYPES)}, got {dtype!r}")
        self.wire_dtype = _WIRE_DTYPES[dtype]

    def encode(self, delta: Mapping[str, Tensor], context: CodecContext) -> Payload:
        """Cast each tensor to the wire dtype.

        bfloat16 travels as its int16 bit pattern: Flower's arrays are NumPy arrays and
        NumPy has no bfloat16.
        """
        payload = {}
        for name, tensor in delta.items():
            wire = tensor.detach().to("cpu", self.wire_dtype).contiguous()
            payload[name] = wire.view(torch.int16) if self.wire_dtype == torch.bfloat16 else wire
        return payload

    def decode(
        self, payload: Mapping[str, Tensor], context: CodecContext, reference: Mapping[str, Tensor]
    ) -> dict[str, Tensor]:
        """Check names, shapes, dtype and finiteness; cast back to the reference dtype."""
        if self.wire_dtype == torch.bfloat16:
            check_payload_tensors(
                payload, {n: tuple(t.shape) for n, t in reference.items()}, (torch.int16,), finite=False
            )
            payload = {name: t.view(torch.bfloat16) for name, t in payload.items()}
        check_payload_tensors(payload, {n: tuple(t.shape) for n, t in reference.items()}, (self.wire_dtype,))
        return {name: payload[name].to(reference[name].dtype) for name in reference}
