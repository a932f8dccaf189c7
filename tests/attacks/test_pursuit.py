"""Simultaneous pursuit: exact sparse fits past the rank of the rows' span."""

from __future__ import annotations

import pytest
import torch

from fedpeft.attacks.pursuit import OrthogonalResidual, simultaneous_pursuit
from fedpeft.attacks.span import distance_to_span, row_span_basis


def sparse_rows(atoms: int, width: int, support: int, rows: int, seed: int = 0):
    """A dictionary and ``rows`` random combinations of ``support`` of its atoms."""
    generator = torch.Generator().manual_seed(seed)
    dictionary = torch.randn(atoms, width, generator=generator, dtype=torch.float64)
    true = torch.randperm(atoms, generator=generator)[:support]
    coefficients = torch.randn(rows, support, generator=generator, dtype=torch.float64)
    return dictionary, true, coefficients @ dictionary[true]


def test_the_pursuit_finds_a_support_larger_than_the_rank() -> None:
    dictionary, true, rows = sparse_rows(atoms=3000, width=96, support=20, rows=4)
    # Four rows span 4 dimensions: most of the 20 atoms are not in that span.
    basis = row_span_basis([rows])
    assert int((distance_to_span(basis, dictionary[true]) < 0.05).sum()) == 0
    fit = simultaneous_pursuit(rows, dictionary, max_atoms=48)
    assert fit.converged and fit.relative_residual < 1e-5
    assert set(fit.support()) == set(true.tolist())


def test_noise_leaves_no_exact_fit() -> None:
    dictionary, _, rows = sparse_rows(atoms=3000, width=96, support=20, rows=4)
    noisy = rows + 0.05 * rows.abs().mean() * torch.randn(
        rows.shape, generator=torch.Generator().manual_seed(2)
    )
    fit = simultaneous_pursuit(noisy, dictionary, max_atoms=48)
    assert not fit.converged
    assert len(fit.atoms) == 48
    assert fit.relative_residual > 1e-3


def test_zero_rows_need_no_atoms() -> None:
    fit = simultaneous_pursuit(torch.zeros(2, 8), torch.randn(10, 8), max_atoms=4)
    assert fit.converged and fit.support() == []


def test_an_atom_already_taken_adds_no_direction() -> None:
    residual = OrthogonalResidual(torch.randn(3, 8, dtype=torch.float64))
    atom = torch.randn(8, dtype=torch.float64)
    assert residual.take(atom)
    assert not residual.take(2.0 * atom)
    assert float(residual.scores((atom / atom.norm()).unsqueeze(0))) == pytest.approx(0.0, abs=1e-12)


def test_bad_shapes_are_named() -> None:
    with pytest.raises(ValueError, match="disagree"):
        simultaneous_pursuit(torch.zeros(2, 8), torch.zeros(10, 9), max_atoms=4)
    with pytest.raises(ValueError, match="max_atoms"):
        simultaneous_pursuit(torch.zeros(2, 8), torch.zeros(10, 8), max_atoms=9)
