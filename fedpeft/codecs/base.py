"""The codec interface and the shared-randomness context it runs in."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Protocol

import torch
from torch import Tensor

from fedpeft.errors import PayloadError
from fedpeft.registry import Registry

Payload = dict[str, Tensor]
"""What travels: named tensors that Flower carries in an ArrayRecord and counts."""

ROUND_WIDE = -1
"""The client id of a round-wide context: no real client has it (ids are >= 0).

Seeds drawn under it depend on (run seed, round, tensor name) only, so every client of
a round draws the same randomness, which secure aggregation needs (see
:attr:`UpdateCodec.summable`).
"""


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

    def round_wide(self) -> CodecContext:
        """The same context with the client id replaced by :data:`ROUND_WIDE`.

        Draws from it are the same for every client of the round and differ between
        rounds and runs; a codec that uses it for all its randomness can be decoded
        from the sum of its clients' payloads.
        """
        return replace(self, client_id=ROUND_WIDE)


CodecMemory = dict[str, Tensor]
"""A client's codec state across rounds (e.g. the error-feedback residual).

Keyed by adapter tensor name; the client keeps it in its Flower ``Context.state`` and
drops entries of tensors it no longer trains. It never travels.
"""


class UpdateCodec(Protocol):
    """Turns an adapter delta into a payload and back.

    ``decode`` must reject a payload that does not fit ``reference`` (names, shapes,
    dtypes, non-finite values) with a :class:`PayloadError`; it never sees anything the
    client did not send.
    """

    @property
    def summable(self) -> bool:
        """Whether the server may decode the sum of a round's payloads instead of each one.

        True only when ``decode`` is linear in the payload's values (including how they
        sit on the wire) and every random draw it depends on is round-wide
        (:meth:`CodecContext.round_wide`), so that ``decode(sum_i payload_i)`` equals
        ``sum_i decode(payload_i)`` for payloads of one round, up to float rounding.
        Secure aggregation shows the server only that sum, so only a summable codec
        can run under it.
        """
        ...

    def encode(self, delta: Mapping[str, Tensor], context: CodecContext, memory: CodecMemory) -> Payload:
        """Client side: ``delta`` (name -> tensor shaped as the adapter weight) to a payload.

        ``memory`` is this client's state from earlier rounds; the codec may update it
        in place.
        """
        ...

    def decode(
        self, payload: Mapping[str, Tensor], context: CodecContext, reference: Mapping[str, Tensor]
    ) -> dict[str, Tensor]:
        """Server side: a payload to a delta estimate shaped like ``reference``."""
        ...


CODECS: Registry[UpdateCodec] = Registry("codec", "federation.codec")


def check_payload_names(payload: Mapping[str, Tensor], expected: Iterable[str]) -> None:
    """Raise PayloadError unless ``payload`` holds exactly the ``expected`` tensor names."""
    wanted = set(expected)
    missing = wanted - payload.keys()
    unexpected = payload.keys() - wanted
    if missing:
        raise PayloadError(f"payload lacks tensor(s) {sorted(missing)[:3]}")
    if unexpected:
        raise PayloadError(f"payload has unexpected tensor(s) {sorted(unexpected)[:3]}")


def check_decoded_delta(delta: Mapping[str, Tensor], reference: Mapping[str, Tensor]) -> None:
    """Raise PayloadError unless ``delta`` fits ``reference`` and is finite.

    Run on every decoded delta, whatever the codec: a codec checks its payload, but
    finite payload values can still decode to Inf (projection coefficients near the
    float32 maximum times a direction), and the aggregator must only ever see deltas
    with the global adapter's names, shapes and dtypes.

    Args:
        delta: name -> tensor, as ``decode`` returned it.
        reference: name -> tensor, the global adapter the delta applies to.

    """
    check_payload_names(delta, reference)
    for name, ref in reference.items():
        tensor = delta[name]
        if not isinstance(tensor, Tensor) or tensor.shape != ref.shape or tensor.dtype != ref.dtype:
            got = (
                f"{tensor.dtype} {tuple(tensor.shape)}"
                if isinstance(tensor, Tensor)
                else type(tensor).__name__
            )
            raise PayloadError(f"decoded delta {name}: {got}, expected {ref.dtype} {tuple(ref.shape)}")
        if not torch.isfinite(tensor).all():
            raise PayloadError(f"decoded delta {name}: contains NaN or Inf")
