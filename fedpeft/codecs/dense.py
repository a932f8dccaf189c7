"""Dense codec: every delta value travels, optionally in half precision. The baseline."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from fedpeft.codecs._wire import WireDtype, check_wire_dtype, from_wire, to_wire
from fedpeft.codecs.base import CODECS, CodecContext, CodecMemory, Payload, check_payload_names
from fedpeft.errors import PayloadError


@CODECS.register("dense")
class Dense:
    """Send the delta as is (exact in float32).

    Args:
        dtype: Wire precision of the values: float32 (exact), float16 or bfloat16.

    """

    def __init__(self, dtype: WireDtype = "float32") -> None:
        self.wire_dtype = check_wire_dtype(dtype)

    @property
    def summable(self) -> bool:
        """Decode is a cast, linear in the values, with no randomness.

        Except for bfloat16, which travels as int16 bit patterns: their sum is not the
        bit pattern of the values' sum.
        """
        return self.wire_dtype != torch.bfloat16

    def encode(self, delta: Mapping[str, Tensor], context: CodecContext, memory: CodecMemory) -> Payload:
        """Cast each tensor to the wire dtype."""
        return {name: to_wire(tensor, self.wire_dtype) for name, tensor in delta.items()}

    def decode(
        self, payload: Mapping[str, Tensor], context: CodecContext, reference: Mapping[str, Tensor]
    ) -> dict[str, Tensor]:
        """Check names, shapes, dtype and finiteness; cast back to the reference dtype."""
        check_payload_names(payload, reference.keys())
        decoded = {}
        for name, ref in reference.items():
            values = payload[name]
            if values.shape != ref.shape:
                raise PayloadError(
                    f"payload tensor {name}: shape {tuple(values.shape)}, expected {tuple(ref.shape)}"
                )
            decoded[name] = from_wire(values, self.wire_dtype, name).to(ref.dtype)
        return decoded
