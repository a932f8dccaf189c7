"""LoRA factor bookkeeping: pairing A and B tensors, and the error of averaging them apart.

Averaging LoRA factors separately is not averaging the updates they make:
``mean(B_i) mean(A_i) != mean(B_i A_i)``. These functions measure and remove that gap.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

_A, _B = ".lora_A.", ".lora_B."


@dataclass(frozen=True)
class LoraPair:
    """The A (r x in) and B (out x r) tensor names of one LoRA-adapted layer."""

    a: str
    b: str


def lora_pairs(names: Sequence[str]) -> list[LoraPair]:
    """Pairs of LoRA factor names present in ``names`` (peft's ``.lora_A.``/``.lora_B.``)."""
    available = set(names)
    return [
        LoraPair(a=name, b=name.replace(_A, _B))
        for name in names
        if _A in name and name.replace(_A, _B) in available
    ]


def client_factors(
    global_state: Mapping[str, Tensor], delta: Mapping[str, Tensor], pair: LoraPair
) -> tuple[Tensor, Tensor]:
    """A client's local (B, A) in float64: global factor + its delta (absent: unchanged)."""
    a = global_state[pair.a].double() + (delta[pair.a].double() if pair.a in delta else 0)
    b = global_state[pair.b].double() + (delta[pair.b].double() if pair.b in delta else 0)
    return b, a


def mean_product(
    global_state: Mapping[str, Tensor],
    deltas: Sequence[Mapping[str, Tensor]],
    weights: Sequence[float],
    pair: LoraPair,
) -> Tensor:
    """``sum_i w_i B_i A_i / sum_i w_i`` (out x in), in float64."""
    total = float(sum(weights))
    product = torch.zeros(global_state[pair.b].shape[0], global_state[pair.a].shape[1], dtype=torch.float64)
    for delta, weight in zip(deltas, weights, strict=True):
        b, a = client_factors(global_state, delta, pair)
        product += (weight / total) * (b @ a)
    return product


def factor_averaging_error(
    global_state: Mapping[str, Tensor],
    deltas: Sequence[Mapping[str, Tensor]],
    weights: Sequence[float],
) -> float:
    """``sqrt(sum over layers ||mean(B_i A_i) - mean(B_i) mean(A_i)||_F^2)`` (unscaled by alpha/r)."""
    total = float(sum(weights))
    squared = 0.0
    for pair in lora_pairs(list(global_state)):
        mean_b = sum(
            (w / total) * client_factors(global_state, d, pair)[0]
            for d, w in zip(deltas, weights, strict=True)
        )
        mean_a = sum(
            (w / total) * client_factors(global_state, d, pair)[1]
            for d, w in zip(deltas, weights, strict=True)
        )
        gap = mean_product(global_state, deltas, weights, pair) - mean_b @ mean_a  # type: ignore[operator]
        squared += float((gap**2).sum())
    return squared**0.5


def refactor_rank_r(product: Tensor, rank: int) -> tuple[Tensor, Tensor, float]:
    """Best rank-``rank`` factors of ``product`` (Eckart-Young): ``B = U S^1/2``, ``A = S^1/2 V^T``.

    Returns:
        B (out x rank), A (rank x in) and the Frobenius norm of what the truncation drops.

    """
    u, s, vh = torch.linalg.svd(product, full_matrices=False)
    root = s[:rank].sqrt()
    b = u[:, :rank] * root
    a = root[:, None] * vh[:rank]
    dropped = float(s[rank:].pow(2).sum().sqrt())
    return b, a, dropped
