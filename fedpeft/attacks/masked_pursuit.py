"""The batch's tokens from a *sparsified* gradient: a pursuit over masked atoms.

Random-mask and top-k codecs send a few entries of each LoRA A gradient row. That
looks like it destroys the span the first-layer attacks read, and it does destroy
the span test (:mod:`fedpeft.attacks.span`): a masked row is no combination of whole
token inputs. But the server knows *which* entries it got (the random mask is drawn
from a seed both sides share; top-k sends its indices), and each kept entry is still
an exact linear measurement of the same sparse combination. So row ``i`` is
``mask_i * (sum_t c[i, t] * x_t)``: a sparse fit of every row over the same few
dictionary atoms, each row seeing its atoms through its own mask.

That is the simultaneous pursuit of :mod:`fedpeft.attacks.pursuit` with one basis per
row. Candidates are scored by their exact orthogonal-least-squares gain summed over
the rows (an atom's masked part is projected off what the row already holds: with
about 50 kept entries per row, picks scored without that projection go wrong early).
The support is identifiable while the batch's distinct tokens number well below the
kept entries per row (about 50 of 576 at 10 % density): beyond that every row fits
any atoms.

Wire precision decides when to stop. float16 values leave a residual floor near 1e-3,
so no fit is exact; but once the last true token is in, the residual drops by an
order of magnitude in one step (the *cliff*) and afterwards only creeps down as atoms
fit rounding noise. A fit counts as found when such a cliff is followed by that flat
floor; DP noise or too many tokens leave no cliff.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fedpeft.attacks.progress import heartbeat
from fedpeft.attacks.pursuit import SparseFit, unit_rows


class MaskedResidual:
    """Each row minus its projection on the taken atoms, seen through the row's mask."""

    def __init__(self, rows: Tensor, judges: Tensor | None = None) -> None:
        self.rows = rows.double()
        self.mask = (self.rows != 0).double()
        self._kept = [row.nonzero().flatten() for row in self.mask]
        self.residual = self.rows.clone()
        self._bases = [self.rows.new_zeros(self.rows.shape[1], 0) for _ in range(self.rows.shape[0])]
        self._judges = torch.ones(len(rows), dtype=torch.bool) if judges is None else judges
        self._total = float(self.rows[self._judges].norm())

    @property
    def relative(self) -> float:
        """``||residual|| / ||rows||`` over the judging rows (0 for zero rows)."""
        return float(self.residual[self._judges].norm()) / self._total if self._total > 0 else 0.0

    def gains(self, atoms: Tensor, candidates: Tensor) -> Tensor:
        """``(len(candidates),)`` residual energy each unit atom would remove, all rows summed."""
        chosen = atoms[candidates]
        correlation = chosen @ self.residual.T  # (c, m); the residual is zero off the mask
        gains = torch.zeros(len(candidates), dtype=torch.float64)
        for i, (basis, kept) in enumerate(zip(self._bases, self._kept, strict=True)):
            if basis.shape[1] >= len(kept):  # the row is already fit by anything
                continue
            seen = chosen[:, kept]
            left = (seen**2).sum(1) - ((seen @ basis[kept]) ** 2).sum(1)
            gains += correlation[:, i] ** 2 / left.clamp_min(1e-12)
        return gains

    def take(self, atom: Tensor) -> None:
        """Project every row's residual off its masked view of ``atom``."""
        for i, basis in enumerate(self._bases):
            direction = atom.double() * self.mask[i]
            for _ in range(2):  # twice: one Gram-Schmidt pass drifts with correlated atoms
                direction = direction - basis @ (basis.T @ direction)
            size = direction.norm()
            if size < 1e-8:
                continue
            direction = direction / size
            self._bases[i] = torch.cat([basis, direction.unsqueeze(1)], dim=1)
            self.residual[i] = self.residual[i] - (self.residual[i] @ direction) * direction


def masked_weights(atoms: Tensor, rows: Tensor) -> Tensor:
    """How much of the observed rows each atom carries (masked least squares), relative to the largest."""
    rows = rows.double()
    energy = atoms.new_zeros(len(atoms), dtype=torch.float64)
    for row in rows:
        kept = row.nonzero().flatten()
        if len(kept) <= len(atoms):  # any atoms fit this row: it weighs nothing
            continue
        seen = atoms[:, kept].double().T
        coefficients = torch.linalg.lstsq(seen, row[kept].unsqueeze(1)).solution.flatten()
        energy += (coefficients * seen.norm(dim=0)) ** 2
    weights = energy.sqrt()
    return weights / weights.max().clamp_min(1e-300)


def masked_pursuit(
    rows: Tensor,
    dictionary: Tensor,
    max_atoms: int,
    cliff_ratio: float = 0.3,
    floor_ratio: float = 0.7,
    confirm_steps: int = 5,
    tolerance: float = 1e-5,
    screen: int = 2048,
) -> SparseFit:
    """Greedy sparse fit of masked ``rows`` (zeros: entries not observed) over ``dictionary``.

    Args:
        rows: ``(m, d)`` the observed gradient rows, exactly zero where not sent.
        dictionary: ``(n, d)`` candidate atoms.
        max_atoms: Most atoms to choose; only rows with more kept entries than this
            judge the residual (the others help pick atoms).
        cliff_ratio: A step that leaves at most this fraction of the residual, followed
            by a flat floor (``confirm_steps`` steps, or as many as the atom limit
            allows, at least one), ends the fit there.
        floor_ratio: Every step after the cliff must leave at least this fraction:
            what is left is rounding noise, not a token.
        confirm_steps: Flat steps after a cliff that confirm it (and stop the search).
        tolerance: Relative residual that counts as an exact fit (float32 values).
        screen: Candidates rescored exactly per step, taken from a cheap first score.

    Returns:
        A :class:`SparseFit` cut at the cliff (converged) or holding every pick (not).

    Raises:
        ValueError: Shapes disagree, or ``max_atoms`` is not positive.

    """
    if rows.ndim != 2 or dictionary.ndim != 2 or rows.shape[1] != dictionary.shape[1]:
        raise ValueError(f"rows {tuple(rows.shape)} and dictionary {tuple(dictionary.shape)} disagree")
    if max_atoms < 1:
        raise ValueError(f"max_atoms must be >= 1, got {max_atoms}")
    atoms = unit_rows(dictionary)
    # A row with few kept entries fits any atoms once they number nearly as many, and
    # that sudden fit would look like a cliff: every row helps pick atoms, but only
    # rows with room to spare judge the residual.
    judges = (rows != 0).sum(1) > max_atoms
    if rows.abs().sum() > 0 and not judges.any():  # every row fits anything: nothing to read
        empty = torch.zeros(0, dtype=torch.long)
        return SparseFit(empty, empty.double(), 1.0, False)
    fit = MaskedResidual(rows, judges)
    # Cheap score: each row's correlation over the atom's masked energy, ignoring the
    # atoms already taken; it only shortlists candidates for the exact gain.
    energy = (atoms**2) @ fit.mask.T
    chosen: list[int] = []
    history = [fit.relative]
    cliff = None
    while len(chosen) < min(max_atoms, len(atoms)) and fit.relative >= tolerance:
        heartbeat("masked pursuit: %d atoms of at most %d chosen", len(chosen), max_atoms)
        rough = ((atoms @ fit.residual.T) ** 2 / energy.clamp_min(1e-12)).sum(1)
        if chosen:
            rough[torch.tensor(chosen)] = -1.0
        shortlist = rough.topk(min(screen, len(atoms) - len(chosen))).indices
        best = int(shortlist[fit.gains(atoms, shortlist).argmax()])
        fit.take(atoms[best])
        chosen.append(best)
        history.append(fit.relative)
        ratio = history[-1] / max(history[-2], 1e-300)
        if ratio <= cliff_ratio:
            cliff = len(chosen)
        elif ratio < floor_ratio:
            cliff = None  # still finding structure: the earlier cliff was not the last token
        elif cliff is not None and len(chosen) - cliff >= confirm_steps:
            break
    if fit.relative < tolerance:
        cliff = len(chosen)
    found = cliff is not None and (len(chosen) > cliff or fit.relative < tolerance)
    keep = chosen[:cliff] if found and cliff is not None else chosen
    index = torch.tensor(keep, dtype=torch.long)
    weights = masked_weights(atoms[index], rows) if keep else rows.new_zeros(0, dtype=torch.float64)
    return SparseFit(index, weights, history[len(keep)], found)
