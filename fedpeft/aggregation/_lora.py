"""LoRA factor bookkeeping: pairing A and B tensors, and the error of averaging them apart.

Averaging LoRA factors separately is not averaging the updates they make:
``mean(B_i) mean(A_i) != mean(B_i A_i)``. These functions measure and remove that gap.

Both work in rank space: a sum of k rank-r products ``sum_i L_i R_i`` is the single
product ``L R`` of the stacked factors ``L = [L_1 ... L_k]`` (out x kr) and
``R = [R_1; ...; R_k]`` (kr x in), whose norm and SVD follow from kr x kr matrices:
the Gram matrices ``L^T L`` and ``R R^T`` for the norm, the core ``R_L R_R^T`` of the
QRs ``L = Q_L R_L`` and ``R^T = Q_R R_R`` for the SVD. For cohorts of tens no out x in
matrix is formed:
with r = 8, 20 clients and d = 2048 the work is on 160 x 160 matrices instead of
2048 x 2048 ones per layer, and the cost falls from ``O(k r d^2)`` to
``O(k^2 r^2 d)``. Once kr exceeds about d/2 (hundreds of clients) the Gram matrices
would outgrow a layer, and the norm comes from one product of the stacks instead
(``O(k r d^2)``, one out x in matrix per layer rather than one per client).
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


@dataclass(frozen=True)
class FactoredProduct:
    """``left @ right`` kept as its factors, never multiplied out.

    Attributes:
        left: out x K, in float64.
        right: K x in, in float64.

    """

    left: Tensor
    right: Tensor


@dataclass(frozen=True)
class RankRFactors:
    """The best rank-r factors of a product and what they leave out.

    Attributes:
        b: out x r.
        a: r x in.
        dropped: Frobenius norm of the product minus ``b @ a`` (Eckart-Young: the
            norm of the singular values beyond r).

    """

    b: Tensor
    a: Tensor
    dropped: float


def lora_pairs(names: Sequence[str]) -> list[LoraPair]:
    """Pairs of LoRA factor names present in ``names`` (peft's ``.lora_A.``/``.lora_B.``)."""
    available = set(names)
    return [
        LoraPair(a=name, b=name.replace(_A, _B))
        for name in names
        if _A in name and name.replace(_A, _B) in available
    ]


def _probabilities(weights: Sequence[float], count: int) -> list[float]:
    """``w_i / sum_j w_j``; raises ValueError unless there is one positive-sum weight per update."""
    if count == 0:
        raise ValueError("LoRA factor averaging needs at least one update")
    if len(weights) != count:
        raise ValueError(f"one weight per update is required: {len(weights)} weights, {count} updates")
    total = float(sum(weights))
    if not total > 0:
        raise ValueError(f"weights must sum to a positive number, got {total}")
    return [float(w) / total for w in weights]


def _factor_deltas(
    global_state: Mapping[str, Tensor], deltas: Sequence[Mapping[str, Tensor]], name: str, dim: int
) -> Tensor:
    """Every client's delta of factor ``name`` in float64, stacked along ``dim``; absent is 0.

    B factors stack along dim 1, (out, k, r), so that ``[B_1 ... B_k]`` is a view of
    them (a reshape to out x kr); A factors along dim 0, (k, r, in).
    """
    zero = torch.zeros(global_state[name].shape, dtype=torch.float64)
    return torch.stack([d[name].to(torch.float64) if name in d else zero for d in deltas], dim=dim)


def mean_product_factors(
    global_state: Mapping[str, Tensor],
    deltas: Sequence[Mapping[str, Tensor]],
    weights: Sequence[float],
    pair: LoraPair,
) -> FactoredProduct:
    """``sum_i w_i B_i A_i / sum_i w_i`` as stacked factors, ``B_i``/``A_i`` the clients' local factors.

    A client's local factor is the global one plus its delta (an absent delta leaves it
    unchanged). Returns ``left = [p_1 B_1 ... p_k B_k]`` (out x kr) and
    ``right = [A_1; ...; A_k]`` (kr x in) with ``p_i = w_i / sum_j w_j``.
    """
    p = torch.tensor(_probabilities(weights, len(deltas)), dtype=torch.float64)
    b = _factor_deltas(global_state, deltas, pair.b, dim=1)
    b += global_state[pair.b].to(torch.float64)[:, None, :]
    b *= p[None, :, None]
    a = _factor_deltas(global_state, deltas, pair.a, dim=0)
    a += global_state[pair.a].to(torch.float64)
    return FactoredProduct(left=b.reshape(b.shape[0], -1), right=a.reshape(-1, a.shape[2]))


def averaging_gap_factors(
    global_state: Mapping[str, Tensor],
    deltas: Sequence[Mapping[str, Tensor]],
    weights: Sequence[float],
    pair: LoraPair,
) -> FactoredProduct:
    """``mean(B_i A_i) - mean(B_i) mean(A_i)`` (weighted) as stacked factors.

    The gap is the weighted covariance of the factors,
    ``sum_i p_i (B_i - mean B)(A_i - mean A)``, since the ``p_i`` sum to one. Centred,
    the global factors cancel (only the deltas enter): a shared A (FFA-LoRA) gives
    factors that are exactly zero, identical clients factors of rounding size, rather
    than a difference of two large, nearly equal products.
    """
    p = torch.tensor(_probabilities(weights, len(deltas)), dtype=torch.float64)
    b = _factor_deltas(global_state, deltas, pair.b, dim=1)
    b -= torch.einsum("k,okr->or", p, b)[:, None, :]
    b *= p[None, :, None]
    a = _factor_deltas(global_state, deltas, pair.a, dim=0)
    a -= torch.einsum("k,kri->ri", p, a)
    return FactoredProduct(left=b.reshape(b.shape[0], -1), right=a.reshape(-1, a.shape[2]))


_GRAM_RELATIVE_ERROR = 2e-6
"""Largest rounding error, relative to the squared norm, that the Gram route may risk."""


def product_norm(product: FactoredProduct) -> float:
    """``||left @ right||_F``; the product is formed only when that is cheaper (K (o + i) > o i).

    ``||L R||_F^2 = sum((L^T L) * (R R^T))``: two K x K Gram matrices, the cheapest
    route while K (o + i) <= o i (a QR costs 2-4x as much); beyond, at hundreds of
    clients, one out x in product ``L R`` costs less than the K x K Grams. The Gram
    route squares magnitudes, so where the terms of that sum cancel (a gap small
    against the factors that make it) its rounding could swamp the result; then the
    norm comes from the R factors of two QRs, ``||R_L R_R^T||_F``, accurate to float64
    rounding of the factors themselves.
    """
    rows, stacked, cols = product.left.shape[0], product.left.shape[1], product.right.shape[1]
    if stacked * (rows + cols) > rows * cols:
        # More stacked factors than the layer is wide (hundreds of clients): the Gram
        # matrices would outgrow the product, so one product of the stacks is cheaper.
        return float(torch.linalg.matrix_norm(product.left @ product.right))
    left_gram = product.left.T @ product.left
    right_gram = product.right @ product.right.T
    squared = float((left_gram * right_gram).sum())
    # A Gram entry is a dot product of length m, exact to m * eps times the product of
    # the two vectors' norms; through the sum the error stays below eps * length * scale.
    scale = float((left_gram.diagonal() * right_gram.diagonal()).clamp_min(0).sqrt().sum()) ** 2
    length = rows + cols + stacked
    rounding = length * torch.finfo(torch.float64).eps * scale
    if rounding <= _GRAM_RELATIVE_ERROR * squared or scale == 0:
        return max(squared, 0.0) ** 0.5
    r_left = torch.linalg.qr(product.left, mode="r").R
    r_right = torch.linalg.qr(product.right.T, mode="r").R
    return float(torch.linalg.matrix_norm(r_left @ r_right.T))


def factor_averaging_error(
    global_state: Mapping[str, Tensor],
    deltas: Sequence[Mapping[str, Tensor]],
    weights: Sequence[float],
) -> float:
    """``sqrt(sum over layers ||mean(B_i A_i) - mean(B_i) mean(A_i)||_F^2)`` (unscaled by alpha/r).

    Computed in rank space (see the module docstring); equal to the dense formula up
    to float64 rounding.
    """
    squared = 0.0
    for pair in lora_pairs(list(global_state)):
        squared += product_norm(averaging_gap_factors(global_state, deltas, weights, pair)) ** 2
    return squared**0.5


def refactor_product_rank_r(product: FactoredProduct, rank: int) -> RankRFactors:
    """Best rank-``rank`` factors of ``left @ right`` (Eckart-Young), in rank space.

    With ``left = Q_L R_L`` and ``right^T = Q_R R_R`` (reduced QR) and the SVD
    ``R_L R_R^T = U S V^T`` of the small core, ``left @ right = (Q_L U) S (Q_R V)^T`` is
    an SVD of the product: the same singular values and, up to the usual sign and
    rotation freedom, the same singular vectors as a dense SVD would give.

    Returns:
        ``B = Q_L U_r S_r^1/2`` (out x rank), ``A = S_r^1/2 (Q_R V_r)^T`` (rank x in),
        each singular pair's sign fixed, and the norm of the singular values beyond
        ``rank``.

    Raises:
        ValueError: ``rank`` exceeds the product's smaller side (it could not be
            filled).

    """
    rows, cols = product.left.shape[0], product.right.shape[1]
    if not 0 < rank <= min(rows, cols):
        raise ValueError(f"rank must be in [1, {min(rows, cols)}] for a {rows} x {cols} product, got {rank}")
    # Householder QRs kept as reflectors (geqrf): Q is only ever applied to the r
    # singular vectors kept (ormqr), never formed (orgqr would cost more than the QR).
    reflectors_left, tau_left = torch.geqrf(product.left)
    reflectors_right, tau_right = torch.geqrf(product.right.T)
    r_left = reflectors_left[: min(rows, product.left.shape[1])].triu()
    r_right = reflectors_right[: min(cols, product.right.shape[0])].triu()
    u, s, vh = torch.linalg.svd(r_left @ r_right.T, full_matrices=False)
    kept = min(rank, s.shape[0])  # the core has min(rows, cols, K) values; beyond K they are 0
    left_vectors = torch.ormqr(reflectors_left, tau_left, _padded(u[:, :kept], rows))
    right_vectors = torch.ormqr(reflectors_right, tau_right, _padded(vh[:kept].T, cols)).T
    # Each singular pair is defined up to a joint sign, which here depends on the order
    # the clients were stacked in; fixing it (largest entry of the left vector positive,
    # as scikit-learn's svd_flip) makes the factors independent of client order.
    largest = left_vectors.abs().argmax(dim=0)
    signs = left_vectors[largest, torch.arange(kept)].sign()
    signs[signs == 0] = 1.0
    root = s[:kept].sqrt()
    b = torch.zeros(rows, rank, dtype=torch.float64)
    a = torch.zeros(rank, cols, dtype=torch.float64)
    b[:, :kept] = left_vectors * (signs * root)
    a[:kept] = (signs * root)[:, None] * right_vectors
    dropped = float(s[kept:].pow(2).sum().sqrt())
    return RankRFactors(b=b, a=a, dropped=dropped)


def _padded(vectors: Tensor, rows: int) -> Tensor:
    """``vectors`` (m x c, m <= rows) with zero rows below it: rows x c, for ormqr's full Q."""
    padded = torch.zeros(rows, vectors.shape[1], dtype=vectors.dtype)
    padded[: vectors.shape[0]] = vectors
    return padded


def refactor_rank_r(product: Tensor, rank: int) -> tuple[Tensor, Tensor, float]:
    """Best rank-``rank`` factors of a dense ``product`` (Eckart-Young): ``B = U S^1/2``, ``A = S^1/2 V^T``.

    For a product that is only known dense (SLoRA's sparse stage); a sum of LoRA
    products goes through :func:`refactor_product_rank_r` instead.

    Returns:
        B (out x rank), A (rank x in) and the Frobenius norm of what the truncation drops.

    """
    u, s, vh = torch.linalg.svd(product, full_matrices=False)
    root = s[:rank].sqrt()
    b = u[:, :rank] * root
    a = root[:, None] * vh[:rank]
    dropped = float(s[rank:].pow(2).sum().sqrt())
    return b, a, dropped
