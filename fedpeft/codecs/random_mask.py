"""Random-mask sparsification from shared randomness: only the kept values travel.

Client and server draw the same mask from a seed derived from (run seed, round,
client id, tensor name), so no index is sent: the payload is ``ceil(density * n)``
values per tensor, in the order of the mask's indices. With ``shared`` the client id
drops out of the seed: every client of a round keeps the same entries, so the sum of
their payloads decodes to the sum of their masked deltas (secure aggregation).

Paper: Federated Learning: Strategies for Improving Communication Efficiency
(Konečný et al., 2016), "random mask" structured updates.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from fedpeft.codecs._wire import WireDtype, check_wire_dtype, from_wire, to_wire
from fedpeft.codecs.base import CODECS, CodecContext, CodecMemory, Payload, check_payload_names
from fedpeft.errors import PayloadError


def shared_mask_indices(numel: int, density: float, generator: torch.Generator) -> Tensor:
    """``ceil(density * numel)`` distinct flat indices, sorted, drawn with ``generator``."""
    keep = max(1, math.ceil(density * numel))
    return torch.randperm(numel, generator=generator)[:keep].sort().values


@CODECS.register("random_mask")
class RandomMask:
    """Keep a shared random subset of each tensor's entries.

    Args:
        density: Fraction of entries kept per tensor, in (0, 1].
        dtype: Wire precision of the kept values.
        rescale: Divide decoded values by ``density`` so that the estimate is unbiased
            over the mask's randomness (otherwise decode is exactly the masked delta).
        shared: One mask for every client of a round (drawn from the round-wide
            context) instead of one per client; needed under secure aggregation.

    """

    def __init__(
        self,
        density: float = 0.1,
        dtype: WireDtype = "float32",
        rescale: bool = False,
        shared: bool = False,
    ) -> None:
        if not 0 < density <= 1:
            raise ValueError(f"density must be in (0, 1], got {density}")
        self.density = density
        self.wire_dtype = check_wire_dtype(dtype)
        self.rescale = rescale
        self.shared = shared

    @property
    def summable(self) -> bool:
        """Decode is a linear scatter; summable when the mask is round-wide.

        Not in bfloat16, which travels as int16 bit patterns that do not add up.
        """
        return self.shared and self.wire_dtype != torch.bfloat16

    def mask_indices(self, name: str, numel: int, context: CodecContext) -> Tensor:
        """The flat indices kept for tensor ``name`` in this round (and client, unless shared)."""
        seed_context = context.round_wide() if self.shared else context
        return shared_mask_indices(numel, self.density, seed_context.generator_for(name))

    def encode(self, delta: Mapping[str, Tensor], context: CodecContext, memory: CodecMemory) -> Payload:
        """Gather the masked values of each tensor."""
        payload = {}
        for name, tensor in delta.items():
            indices = self.mask_indices(name, tensor.numel(), context)
            payload[name] = to_wire(tensor.reshape(-1)[indices], self.wire_dtype)
        return payload

    def decode(
        self, payload: Mapping[str, Tensor], context: CodecContext, reference: Mapping[str, Tensor]
    ) -> dict[str, Tensor]:
        """Scatter the values back into zeros at the regenerated mask."""
        check_payload_names(payload, reference.keys())
        decoded = {}
        for name, ref in reference.items():
            indices = self.mask_indices(name, ref.numel(), context)
            values = payload[name]
            if values.dim() != 1 or values.numel() != indices.numel():
                raise PayloadError(
                    f"payload tensor {name}: {values.numel()} values, expected {indices.numel()}"
                )
            flat = torch.zeros(ref.numel(), dtype=torch.float32)
            flat[indices] = from_wire(values, self.wire_dtype, name)
            if self.rescale:
                flat *= ref.numel() / indices.numel()  # 1 / inclusion probability
            decoded[name] = flat.reshape(ref.shape).to(ref.dtype)
        return decoded
