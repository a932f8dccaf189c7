"""Which vocabulary inputs make up a gradient, past the rank of its span.

Every row of the first layer's LoRA A gradient is a linear combination of the layer's
inputs in the batch (:mod:`fedpeft.attacks.span`), and each input is one of a finite
dictionary: the layer's input for one vocabulary token. The span test asks whether a
candidate lies in the rows' span, which is exact only while the batch has fewer
distinct tokens than the stacked rank (24 for r = 8 on q/k/v). The rows say more than
their span: all of them are *sparse* combinations of the same few dictionary atoms,
and a sparse representation over a known dictionary is identifiable as long as the
atoms number well below the input width (576 for SmolLM2), not the rank.

Simultaneous orthogonal matching pursuit finds that shared support greedily: pick the
atom most correlated with every row's residual at once, project all rows off the atoms
picked so far, repeat. On an exact gradient the residual falls off a cliff to float
precision once the last batch token is in; on a noisy one (DP-SGD, lossy codecs) or
one with too many tokens for the width it never does, which is how the caller tells
a recovered token set from a guess.

Paper: Tropp, Gilbert & Strauss, Algorithms for simultaneous sparse approximation.
Part I: Greedy pursuit (Signal Processing, 2006). Its use on LoRA gradients is
fedpeft's own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fedpeft.attacks.progress import heartbeat


@dataclass(frozen=True)
class SparseFit:
    """The atoms a pursuit chose and how well they explain the rows.

    Attributes:
        atoms: ``(k,)`` dictionary indices in the order chosen.
        weights: ``(k,)`` norm of each atom's least-squares coefficients over the rows,
            relative to the largest (1.0); atoms a converged fit did not need are ~0.
        relative_residual: ``||rows - fit|| / ||rows||`` after the last atom.
        converged: The residual fell below the tolerance, so the rows are an exact
            combination of ``atoms`` (up to float precision).

    """

    atoms: Tensor
    weights: Tensor
    relative_residual: float
    converged: bool

    def support(self, min_weight: float = 1e-5) -> list[int]:
        """Atoms carrying at least ``min_weight`` of the largest weight, heaviest first."""
        keep = torch.nonzero(self.weights >= min_weight).flatten()
        order = keep[torch.argsort(self.weights[keep], descending=True)]
        return [int(self.atoms[i]) for i in order]


class OrthogonalResidual:
    """Rows minus their projection on the atoms taken so far, updated one atom at a time.

    Gram-Schmidt runs twice per atom: one pass loses orthogonality once dozens of
    correlated embeddings are in.
    """

    def __init__(self, rows: Tensor) -> None:
        self.rows = rows.double()
        self.residual = self.rows
        self._basis = self.rows.new_zeros(self.rows.shape[1], 0)
        self._total = float(self.rows.norm())

    @property
    def relative(self) -> float:
        """``||residual|| / ||rows||`` (0 for zero rows)."""
        return float(self.residual.norm()) / self._total if self._total > 0 else 0.0

    def scores(self, atoms: Tensor) -> Tensor:
        """``(n,)`` how much of the residual each unit atom explains, over all rows at once."""
        return (atoms @ self.residual.T).norm(dim=1)

    def take(self, atom: Tensor) -> bool:
        """Project the residual off ``atom``; False if it adds no new direction."""
        direction = atom.double()
        for _ in range(2):
            direction = direction - self._basis @ (self._basis.T @ direction)
        size = direction.norm()
        if size < 1e-10:
            return False
        direction = direction / size
        self._basis = torch.cat([self._basis, direction.unsqueeze(1)], dim=1)
        self.residual = self.residual - torch.outer(self.residual @ direction, direction)
        return True


def unit_rows(vectors: Tensor) -> Tensor:
    """Rows scaled to norm 1 (zero rows stay zero, so they never explain anything)."""
    vectors = vectors.double()
    return vectors / vectors.norm(dim=1, keepdim=True).clamp_min(1e-300)


def relative_weights(atoms: Tensor, rows: Tensor) -> Tensor:
    """Norm of each atom's least-squares coefficients over ``rows``, relative to the largest."""
    coefficients = torch.linalg.lstsq(atoms.double().T, rows.double().T).solution  # (k, m)
    weights = coefficients.norm(dim=1)
    return weights / weights.max().clamp_min(1e-300)


def simultaneous_pursuit(
    rows: Tensor, dictionary: Tensor, max_atoms: int, tolerance: float = 1e-5
) -> SparseFit:
    """Greedy sparse fit of every row of ``rows`` over shared atoms of ``dictionary``.

    Args:
        rows: ``(m, d)`` measurements (the stacked gradient rows).
        dictionary: ``(n, d)`` candidate atoms (zero rows are never chosen).
        max_atoms: Most atoms to choose; at most ``d``, where any rows fit exactly.
        tolerance: Stop once the relative residual is below this (float32 gradients
            reach ~1e-7 with the true atoms).

    Raises:
        ValueError: Shapes disagree, or ``max_atoms`` is not in [1, d].

    """
    if rows.ndim != 2 or dictionary.ndim != 2 or rows.shape[1] != dictionary.shape[1]:
        raise ValueError(f"rows {tuple(rows.shape)} and dictionary {tuple(dictionary.shape)} disagree")
    width = rows.shape[1]
    if not 1 <= max_atoms <= width:
        raise ValueError(f"max_atoms must be in [1, {width}], got {max_atoms}")
    atoms = unit_rows(dictionary)
    fit = OrthogonalResidual(rows)
    chosen: list[int] = []
    while len(chosen) < max_atoms and fit.relative >= tolerance:
        heartbeat("pursuit: %d atoms of at most %d chosen", len(chosen), max_atoms)
        best = int(fit.scores(atoms).argmax())
        if not fit.take(atoms[best]):  # the best atom is already explained: nothing is left
            break
        chosen.append(best)
    index = torch.tensor(chosen, dtype=torch.long)
    weights = relative_weights(atoms[index], rows) if chosen else rows.new_zeros(0, dtype=torch.float64)
    return SparseFit(index, weights, fit.relative, fit.relative < tolerance)
