"""Top-k magnitude sparsification with client-side error feedback.

The client sends the k largest-magnitude entries (indices + values) of its delta plus
the residual it did not send in earlier rounds; the new residual (everything not
sent, including rounding of the sent values) stays in the client's memory. Error
feedback makes the compression error vanish over rounds instead of accumulating.

Paper: Sparsified SGD with Memory (Stich, Cordonnier & Jaggi, 2018); Deep Gradient
Compression (Lin et al., 2018).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Literal

import torch
from torch import Tensor

from fedpeft.codecs._wire import WireDtype, check_wire_dtype, from_wire, to_wire
from fedpeft.codecs.base import CODECS, CodecContext, CodecMemory, Payload, check_payload_names
from fedpeft.errors import PayloadError

_INDICES = "indices"
_VALUES = "values"
_GLOBAL = "__all__"


@CODECS.register("topk")
class TopK:
    """Send the ``density`` fraction of largest-magnitude entries.

    Args:
        density: Fraction of entries sent, in (0, 1].
        scope: ``tensor`` picks the top entries of each tensor; ``global`` picks them
            over all adapter tensors together (layers with larger updates get more).
        dtype: Wire precision of the values (indices are int32).
        error_feedback: Keep the unsent residual and add it to the next delta.

    """

    def __init__(
        self,
        density: float = 0.01,
        scope: Literal["tensor", "global"] = "tensor",
        dtype: WireDtype = "float32",
        error_feedback: bool = True,
    ) -> None:
        if not 0 < density <= 1:
            raise ValueError(f"density must be in (0, 1], got {density}")
        if scope not in ("tensor", "global"):
            raise ValueError(f"scope must be 'tensor' or 'global', got {scope!r}")
        self.density = density
        self.scope = scope
        self.wire_dtype = check_wire_dtype(dtype)
        self.error_feedback = error_feedback

    @property
    def summable(self) -> bool:
        """Never: each client picks its own indices, and a sum of index lists means nothing."""
        return False

    def _keep(self, numel: int) -> int:
        return max(1, math.ceil(self.density * numel))

    def _groups(self, shapes: Mapping[str, torch.Size]) -> dict[str, list[str]]:
        """Payload group -> the tensors it covers, in order."""
        return {_GLOBAL: list(shapes)} if self.scope == "global" else {name: [name] for name in shapes}

    def encode(self, delta: Mapping[str, Tensor], context: CodecContext, memory: CodecMemory) -> Payload:
        """Top-k of (delta + residual); the unsent part becomes the new residual."""
        accumulated = {
            name: t.detach().float().cpu() + (memory[name] if self.error_feedback and name in memory else 0)
            for name, t in delta.items()
        }
        payload: Payload = {}
        for group, names in self._groups({n: t.shape for n, t in accumulated.items()}).items():
            flat = torch.cat([accumulated[n].reshape(-1) for n in names])
            indices = flat.abs().topk(self._keep(flat.numel()), sorted=False).indices.sort().values
            wire = to_wire(flat[indices], self.wire_dtype)
            payload[f"{group}/{_INDICES}"] = indices.to(torch.int32)
            payload[f"{group}/{_VALUES}"] = wire
            if self.error_feedback:
                residual = flat.clone()
                residual[indices] -= from_wire(wire, self.wire_dtype, group)
                offset = 0
                for name in names:
                    size = accumulated[name].numel()
                    memory[name] = residual[offset : offset + size].reshape(accumulated[name].shape)
                    offset += size
        return payload

    def decode(
        self, payload: Mapping[str, Tensor], context: CodecContext, reference: Mapping[str, Tensor]
    ) -> dict[str, Tensor]:
        """Scatter values at their indices; check counts, index range and uniqueness."""
        groups = self._groups({n: t.shape for n, t in reference.items()})
        check_payload_names(payload, [f"{g}/{part}" for g in groups for part in (_INDICES, _VALUES)])
        decoded = {}
        for group, names in groups.items():
            numel = sum(reference[n].numel() for n in names)
            keep = self._keep(numel)
            indices, values = payload[f"{group}/{_INDICES}"], payload[f"{group}/{_VALUES}"]
            if indices.dtype != torch.int32 or indices.dim() != 1 or indices.numel() != keep:
                raise PayloadError(f"payload {group}/indices: expected {keep} int32 indices")
            if values.dim() != 1 or values.numel() != keep:
                raise PayloadError(f"payload {group}/values: {values.numel()} values, expected {keep}")
            index = indices.long()
            if index.min() < 0 or index.max() >= numel or index.unique().numel() != keep:
                raise PayloadError(f"payload {group}/indices: out of range or repeated")
            flat = torch.zeros(numel, dtype=torch.float32)
            flat[index] = from_wire(values, self.wire_dtype, group)
            offset = 0
            for name in names:
                size = reference[name].numel()
                decoded[name] = (
                    flat[offset : offset + size].reshape(reference[name].shape).to(reference[name].dtype)
                )
                offset += size
        return decoded
