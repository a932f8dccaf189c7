"""Row spans of weight gradients, and how far a vector lies from one.

For a linear layer y = W x, the weight gradient is a sum of outer products
g_t x_t^T over the tokens t of the batch, so every row of it lies in the span of the
layer's inputs x_t. The same holds for LoRA's A in h = W x + s B A x, whose gradient
is s B^T g_t x_t^T summed over t, as long as B is not zero. Testing whether a candidate
input lies in that span tells whether it was in the batch.

Paper: DAGER: Exact Gradient Inversion for Large Language Models (Petrov et al., 2024).

Notes:
    The test is exact only while the gradient's rank reaches the number of distinct
    inputs: a rank-r LoRA A shows at most r of them per projection, so with more
    distinct tokens than the stacked rank, batch tokens fail the test too.
    LoRA dropout perturbs each input per element and turns the exact test into an
    approximate one.

"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def row_span_basis(gradients: Sequence[Tensor], rank_tolerance: float = 1e-5) -> Tensor:
    """An orthonormal basis of the span of the rows of every gradient, stacked.

    Args:
        gradients: Weight gradients sharing their input dimension d (each ``(rows, d)``).
        rank_tolerance: Singular values below ``rank_tolerance`` times the largest
            count as numerical zero.

    Returns:
        ``(d, rank)`` float64 tensor with orthonormal columns; ``(d, 0)`` when every
        gradient is zero.

    """
    if not gradients:
        raise ValueError("no gradient to take a span of")
    widths = {g.shape[-1] for g in gradients}
    if len(widths) != 1:
        raise ValueError(f"gradients differ in input dimension: {sorted(widths)}")
    rows = torch.cat([g.detach().double().reshape(-1, g.shape[-1]) for g in gradients])
    _, singular, vh = torch.linalg.svd(rows, full_matrices=False)
    if singular.numel() == 0 or singular[0] == 0:
        return rows.new_zeros(rows.shape[1], 0)
    keep = singular > rank_tolerance * singular[0]
    return vh[keep].T.contiguous()


def distance_to_span(basis: Tensor, vectors: Tensor) -> Tensor:
    """Distance of each normalised vector to the span of ``basis``.

    Args:
        basis: ``(d, rank)`` orthonormal columns (:func:`row_span_basis`).
        vectors: ``(n, d)`` candidates.

    Returns:
        ``(n,)`` float64 distances in [0, 1]: 0 inside the span, 1 orthogonal to it.
        A zero vector (e.g. the embedding row of a padding token) lies in every span
        and so tells nothing: it gets 1.

    """
    unit = vectors.double()
    norms = unit.norm(dim=1, keepdim=True)
    unit = unit / norms.clamp_min(1e-300)
    if basis.shape[1] == 0:
        return unit.new_ones(unit.shape[0])
    residual = (unit - (unit @ basis) @ basis.T).norm(dim=1)
    return torch.where(norms.squeeze(1) > 0, residual, torch.ones_like(residual))
