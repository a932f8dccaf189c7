"""Masked pursuit: the batch's atoms from rows a sparsifying codec cut down."""

from __future__ import annotations

import pytest
import torch

from fedpeft.attacks.masked_pursuit import masked_pursuit
from fedpeft.attacks.pursuit import simultaneous_pursuit
from tests.attacks.test_pursuit import sparse_rows


def masked(rows: torch.Tensor, density: float, seed: int = 1) -> torch.Tensor:
    """``rows`` with a random ``density`` of entries kept, rounded to float16 as on the wire."""
    keep = torch.rand(rows.shape, generator=torch.Generator().manual_seed(seed)) < density
    return (rows * keep).half().double()


def test_the_masked_pursuit_reads_float16_rows_with_most_entries_dropped() -> None:
    dictionary, true, rows = sparse_rows(atoms=3000, width=192, support=12, rows=16)
    observed = masked(rows, density=0.25)  # ~48 of 192 entries per row
    # Masked rows are no sparse combination of whole atoms: the plain pursuit finds none.
    assert not simultaneous_pursuit(observed, dictionary, max_atoms=96).converged
    fit = masked_pursuit(observed, dictionary, max_atoms=36)
    assert fit.converged
    assert 1e-5 < fit.relative_residual < 1e-2  # float16 leaves a floor, not an exact fit
    assert set(fit.support(2e-3)) == set(true.tolist())


def test_float32_masked_rows_fit_exactly() -> None:
    dictionary, true, rows = sparse_rows(atoms=3000, width=192, support=12, rows=16, seed=3)
    keep = torch.rand(rows.shape, generator=torch.Generator().manual_seed(4)) < 0.25
    fit = masked_pursuit(rows * keep, dictionary, max_atoms=36)
    assert fit.converged and fit.relative_residual < 1e-5
    assert set(fit.support(1e-5)) == set(true.tolist())


def test_noise_leaves_no_cliff() -> None:
    dictionary, _, rows = sparse_rows(atoms=3000, width=192, support=12, rows=16)
    noise = 0.3 * rows.abs().mean() * torch.randn(rows.shape, generator=torch.Generator().manual_seed(2))
    fit = masked_pursuit(masked(rows + noise, density=0.25), dictionary, max_atoms=36)
    assert not fit.converged
    assert len(fit.atoms) == 36  # every pick is kept for the caller's fallback


def test_more_atoms_than_kept_entries_leave_no_cliff() -> None:
    # 60 atoms against ~29 kept entries per row: every row fits anything.
    dictionary, _, rows = sparse_rows(atoms=3000, width=192, support=60, rows=16)
    assert not masked_pursuit(masked(rows, density=0.15), dictionary, max_atoms=24).converged


def test_bad_shapes_are_named() -> None:
    with pytest.raises(ValueError, match="disagree"):
        masked_pursuit(torch.zeros(2, 8), torch.zeros(10, 9), max_atoms=4)
    with pytest.raises(ValueError, match="max_atoms"):
        masked_pursuit(torch.zeros(2, 8), torch.zeros(10, 8), max_atoms=0)


def test_rows_with_fewer_kept_entries_than_atoms_read_nothing() -> None:
    dictionary, _, rows = sparse_rows(atoms=3000, width=192, support=12, rows=16)
    fit = masked_pursuit(masked(rows, density=0.05), dictionary, max_atoms=36)  # ~10 entries per row
    assert not fit.converged and fit.support() == []
