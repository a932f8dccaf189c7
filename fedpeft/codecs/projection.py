"""Ferret-style randomly projected updates: K coefficients per block travel, not the delta.

The client splits its update into blocks (consecutive tensors grouped to about 0.9 x
the median tensor size, as Ferret's reference groups parameters), and for each block b
of size d_b sends ``gamma_k = <delta_b, v_k>`` for K random directions ``v_k`` drawn from
shared randomness. The server regenerates the same directions and reconstructs

    delta_b_hat = (1 / K) * sum_k gamma_k v_k,

which is unbiased because ``E[v v^T] = I`` for standard normal ``v``:
``E[delta_hat] = E[v v^T] delta = delta``. Its variance falls as 1/K; with d_b >> K each
single reconstruction is very noisy, and averaging over clients and rounds (with a
server step size below 1) is what makes the method work.

Directions are generated one at a time per block (memory O(d_b), never a d x K matrix).
They differ per client unless ``shared`` draws them round-wide: then decode, linear in
the coefficients, turns the sum of a round's payloads into the sum of their
reconstructions (secure aggregation).

Paper: Ferret: Federated Full-Parameter Tuning at Scale for Large Language Models
(Shu et al., 2024). Interpretation: Ferret's reference code draws truncated-normal bases
and allocates directions per block in proportion to the block's update norm; fedpeft
uses standard normal directions (exactly unbiased with the 1/K scaling above) and the
same K for every block, so the payload size is fixed and checkable.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from statistics import median

import torch
from torch import Tensor

from fedpeft.codecs.base import CODECS, CodecContext, CodecMemory, Payload, check_payload_names
from fedpeft.errors import PayloadError


def group_into_blocks(sizes: Mapping[str, int], block_fraction: float = 0.9) -> list[list[str]]:
    """Group consecutive tensor names into blocks of about the median tensor size.

    A block is closed when the next tensor would take it past ``block_fraction`` x the
    median size; a large tensor is a block of its own.
    """
    target = block_fraction * median(sizes.values())
    blocks: list[list[str]] = []
    current: list[str] = []
    filled = 0
    for name, size in sizes.items():
        if current and filled + size > target:
            blocks.append(current)
            current, filled = [], 0
        current.append(name)
        filled += size
    if current:
        blocks.append(current)
    return blocks


COEFFICIENTS = "coefficients"
"""The one payload tensor: blocks x K projection coefficients."""


def _block_key(names: Sequence[str]) -> str:
    """The shared-randomness key of a block (its first tensor's name)."""
    return f"block:{names[0]}"


def _direction(generator: torch.Generator, size: int) -> Tensor:
    return torch.randn(size, generator=generator, dtype=torch.float32)


@CODECS.register("projection")
class Projection:
    """Send K random-projection coefficients per block.

    Args:
        directions: K, the number of random directions per block.
        block_fraction: Block size as a fraction of the median tensor size.
        shared: One set of directions for every client of a round (drawn from the
            round-wide context) instead of one per client; needed under secure
            aggregation.

    """

    def __init__(self, directions: int = 32, block_fraction: float = 0.9, shared: bool = False) -> None:
        if directions < 1:
            raise ValueError(f"directions must be >= 1, got {directions}")
        if block_fraction <= 0:
            raise ValueError(f"block_fraction must be > 0, got {block_fraction}")
        self.directions = directions
        self.block_fraction = block_fraction
        self.shared = shared

    @property
    def summable(self) -> bool:
        """Decode is linear in the coefficients; summable when the directions are round-wide."""
        return self.shared

    def block_generator(self, names: Sequence[str], context: CodecContext) -> torch.Generator:
        """The generator of a block's directions in this round (and client, unless shared)."""
        seed_context = context.round_wide() if self.shared else context
        return seed_context.generator_for(_block_key(names))

    def blocks(self, shapes: Mapping[str, torch.Size]) -> list[list[str]]:
        """The blocks for tensors of these shapes (same on client and server)."""
        return group_into_blocks({n: s.numel() for n, s in shapes.items()}, self.block_fraction)

    def encode(self, delta: Mapping[str, Tensor], context: CodecContext, memory: CodecMemory) -> Payload:
        """Project each block's delta onto K shared random directions.

        All coefficients travel as one (blocks x K) tensor: per-array framing would
        otherwise cost more than the coefficients themselves.
        """
        blocks = self.blocks({n: t.shape for n, t in delta.items()})
        coefficients = torch.empty(len(blocks), self.directions, dtype=torch.float32)
        for row, names in enumerate(blocks):
            flat = torch.cat([delta[n].detach().float().cpu().reshape(-1) for n in names])
            generator = self.block_generator(names, context)
            for k in range(self.directions):
                coefficients[row, k] = torch.dot(flat, _direction(generator, flat.numel()))
        return {COEFFICIENTS: coefficients}

    def decode(
        self, payload: Mapping[str, Tensor], context: CodecContext, reference: Mapping[str, Tensor]
    ) -> dict[str, Tensor]:
        """Regenerate the directions and rebuild ``(1/K) sum_k gamma_k v_k`` per block."""
        blocks = self.blocks({n: t.shape for n, t in reference.items()})
        check_payload_names(payload, [COEFFICIENTS])
        coefficients = payload[COEFFICIENTS]
        expected = (len(blocks), self.directions)
        if coefficients.dtype != torch.float32 or tuple(coefficients.shape) != expected:
            raise PayloadError(
                f"payload tensor {COEFFICIENTS}: {coefficients.dtype} {tuple(coefficients.shape)}, "
                f"expected float32 {expected}"
            )
        if not torch.isfinite(coefficients).all():
            raise PayloadError(f"payload tensor {COEFFICIENTS}: contains NaN or Inf")
        decoded = {}
        for row, names in enumerate(blocks):
            size = sum(reference[n].numel() for n in names)
            generator = self.block_generator(names, context)
            flat = torch.zeros(size, dtype=torch.float32)
            for k in range(self.directions):
                flat.add_(_direction(generator, size), alpha=float(coefficients[row, k]))
            flat /= self.directions
            offset = 0
            for name in names:
                ref = reference[name]
                decoded[name] = flat[offset : offset + ref.numel()].reshape(ref.shape).to(ref.dtype)
                offset += ref.numel()
        return decoded
