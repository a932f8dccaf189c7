"""A codec payload as the one vector SecAgg+ carries: names, shapes and their order.

Its own module, light to import: every ClientApp process of a deployed SecAgg+ round
(Flower starts one per message, four per round) imports it, and only the training stage
needs torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from fedpeft.errors import PayloadError

if TYPE_CHECKING:
    from torch import Tensor


@dataclass(frozen=True)
class PayloadLayout:
    """Names and shapes of a codec's payload, in the order the protocol carries them.

    Sorted by name, so that client and server flatten the same way whatever order a
    codec builds its payload in.
    """

    shapes: tuple[tuple[str, tuple[int, ...]], ...]

    @classmethod
    def of(cls, payload: Mapping[str, Tensor]) -> PayloadLayout:
        """The layout of ``payload``."""
        return cls(tuple((name, tuple(payload[name].shape)) for name in sorted(payload)))

    @property
    def size(self) -> int:
        """Coordinates in all."""
        return sum(math.prod(shape) for _, shape in self.shapes)

    def flatten(self, payload: Mapping[str, Tensor]) -> np.ndarray:
        """One float64 vector of the payload's values, in layout order."""
        return np.concatenate(
            [payload[name].detach().cpu().double().reshape(-1).numpy() for name, _ in self.shapes]
        )

    def split(self, vector: np.ndarray) -> list[np.ndarray]:
        """The arrays of ``vector``, shaped as the payload's tensors."""
        arrays, offset = [], 0
        for _, shape in self.shapes:
            count = math.prod(shape)
            arrays.append(vector[offset : offset + count].reshape(shape))
            offset += count
        return arrays

    def to_payload(self, arrays: Sequence[np.ndarray]) -> dict[str, Tensor]:
        """Arrays in layout order -> a float32 payload (checked against the layout)."""
        import torch

        if len(arrays) != len(self.shapes):
            raise PayloadError(f"aggregate holds {len(arrays)} arrays, the payload has {len(self.shapes)}")
        payload = {}
        for (name, shape), array in zip(self.shapes, arrays, strict=True):
            if tuple(array.shape) != shape:
                raise PayloadError(f"aggregate {name}: shape {tuple(array.shape)}, expected {shape}")
            payload[name] = torch.from_numpy(np.asarray(array, dtype=np.float64)).float()
        return payload
