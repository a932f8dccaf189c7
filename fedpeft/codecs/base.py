"""The codec interface and the shared-randomness context it runs in."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from fedpeft.errors import PayloadError
from fedpeft.registry import Registry

Payload = dict[str, Tensor]
"""What travels: named tensors that Flower carries in an ArrayRecord and counts."""


@dataclass(frozen=True)
class CodecContext:
    """Who sent an update and when: the seed of every shared random draw.

    Client and server build the same context from (run seed, round, client id), so a
    codec regenerates masks or projections on both sides without sending them.
    """

    run_seed: int
    server_round: int
    client_id: int

    def seed_for(self, tensor_name: str) -> int:
        """A 63-bit seed unique to (run seed, round, client id, tensor name)."""
        key = f"{self.run_seed}/{self.server_round}/{self.client_id}/{tensor_name}".encode()
        return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") >> 1

    def generator_for(self, tensor_name: str) -> torch.Generator:
        """A CPU generator seeded by :meth:`seed_for`."""
        return torch.Generator().manual_seed(self.seed_for(tensor_name))


class UpdateCodec(Protocol):
    """Turns an adapter delta into a payload and back.

    ``decode`` must reject a payload that does not fit ``reference`` (names, shapes,
    dtypes, non-finite values) with a :class:`PayloadError`; it never sees anything the
    client did not send.
    """

    def encode(self, delta: Mapping[str, Tensor], context: CodecContext) -> Payload:
        """Client side: ``delta`` (name -> tensor shaped as the adapter weight) to a payload."""
        ...

    def decode(
        self, payload: Mapping[str, Tensor], context: CodecContext, reference: Mapping[str, Tensor]
    ) -> dict[str, Tensor]:
        """Server side: a payload to a delta estimate shaped like ``reference``."""
        ...


CODECS: Registry[UpdateCodec] = Registry("codec", "federation.codec")


def check_payload_tensors(
    payload: Mapping[str, Tensor],
    expected: Mapping[str, tuple[int, ...]],
    allowed_dtypes: tuple[torch.dtype, ...],
    finite: bool = True,
) -> None:
    """Raise PayloadError unless ``payload`` matches ``expected`` exactly.

    Checks names, shapes, that the dtype is allowed and (with ``finite``) that every
    value is finite.
    """
    missing = expected.keys() - payload.keys()
    unexpected = payload.keys() - expected.keys()
    if missing:
        raise PayloadError(f"payload lacks tensor(s) {sorted(missing)[:3]}")
    if unexpected:
        raise PayloadError(f"payload has unexpected tensor(s) {sorted(unexpected)[:3]}")
    for name, shape in expected.items():
        tensor = payload[name]
        if tuple(tensor.shape) != tuple(shape):
            raise PayloadError(f"payload tensor {name}: shape {tuple(tensor.shape)}, expected {tuple(shape)}")
        if tensor.dtype not in allowed_dtypes:
            raise PayloadError(f"payload tensor {name}: dtype {tensor.dtype} not allowed")
        if finite and not torch.isfinite(tensor).all():
            raise PayloadError(f"payload tensor {name}: contains NaN or Inf")
