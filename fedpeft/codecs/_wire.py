"""Value precision on the wire, shared by codecs that send floats."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from fedpeft.errors import PayloadError

WireDtype = Literal["float32", "float16", "bfloat16"]

WIRE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def check_wire_dtype(name: str) -> torch.dtype:
    """The torch dtype for a ``dtype`` option; ValueError names the choices."""
    if name not in WIRE_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(WIRE_DTYPES)}, got {name!r}")
    return WIRE_DTYPES[name]


def to_wire(values: Tensor, dtype: torch.dtype) -> Tensor:
    """Cast to the wire dtype.

    bfloat16 travels as its int16 bit pattern: Flower's arrays are NumPy arrays and
    NumPy has no bfloat16.
    """
    wire = values.detach().to("cpu", dtype).contiguous()
    return wire.view(torch.int16) if dtype == torch.bfloat16 else wire


def from_wire(values: Tensor, dtype: torch.dtype, name: str) -> Tensor:
    """Undo :func:`to_wire`, checking the received dtype and that values are finite."""
    expected = torch.int16 if dtype == torch.bfloat16 else dtype
    if values.dtype != expected:
        raise PayloadError(f"payload tensor {name}: dtype {values.dtype}, expected {expected}")
    decoded = values.view(torch.bfloat16) if dtype == torch.bfloat16 else values
    if not torch.isfinite(decoded).all():
        raise PayloadError(f"payload tensor {name}: contains NaN or Inf")
    return decoded.to(torch.float32)
