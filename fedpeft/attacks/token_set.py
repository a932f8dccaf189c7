"""Token-set recovery from the span of the first layer's LoRA A gradients.

Which vocabulary tokens (and, for encoders, at which positions) were in the batch.

Paper: DAGER: Exact Gradient Inversion for Large Language Models (Petrov et al., 2024).

Notes:
    Needs a non-zero LoRA B on the first layer (dL/dA = s B^T dL/dh x^T vanishes at
    peft's B = 0 init): any round after the first, or a malicious server that sends
    one. Exact while the distinct first-layer inputs of the batch number at most the
    stacked rank of the observed A gradients (q, k and v each add up to r), with no
    dropout on the way to them; beyond that, batch tokens fail the test too and the
    result degrades to the tokens closest to the span.

"""

from __future__ import annotations

import torch

from fedpeft.attacks.base import ATTACKS, Reconstruction
from fedpeft.attacks.first_layer import observe_first_layer
from fedpeft.attacks.observation import Observation
from fedpeft.attacks.span import distance_to_span
from fedpeft.models import LoadedModel


@ATTACKS.register("token_set")
class TokenSet:
    """DAGER's first-layer span check, on the gradient of LoRA A.

    Args:
        distance_threshold: A candidate whose normalised input lies closer than this to
            the gradients' row span was in the batch (DAGER's LoRA setting: 0.05).
        rank_tolerance: Relative singular-value cut-off of the span.
        max_positions: Positions to scan for absolute-position encoders; the scan also
            stops at the first position where no token passes.

    """

    def __init__(
        self, distance_threshold: float = 0.05, rank_tolerance: float = 1e-5, max_positions: int = 128
    ) -> None:
        if not 0 < distance_threshold < 1:
            raise ValueError(f"distance_threshold must be in (0, 1), got {distance_threshold}")
        if not 0 < rank_tolerance < 1:
            raise ValueError(f"rank_tolerance must be in (0, 1), got {rank_tolerance}")
        if max_positions < 1:
            raise ValueError(f"max_positions must be >= 1, got {max_positions}")
        self.distance_threshold = distance_threshold
        self.rank_tolerance = rank_tolerance
        self.max_positions = max_positions

    def reconstruct(self, observation: Observation, target: LoadedModel) -> Reconstruction:
        """Tokens whose first-layer input lies in the span of the observed A gradients."""
        seen = observe_first_layer(observation, target.model, self.rank_tolerance)
        first, basis, details = seen.layer, seen.basis, seen.details()
        if basis.shape[1] == 0:
            return Reconstruction((), (), (), details)
        if first.positions == "rotary":
            distances = distance_to_span(basis, first.candidates())
            passed = torch.nonzero(distances < self.distance_threshold).flatten()
            order = passed[torch.argsort(distances[passed])]
            return Reconstruction(tuple(order.tolist()), tuple(distances[order].tolist()), (), details)
        # Absolute positions: one candidate set per position, scanned until one is empty.
        # At batch size 1 the closest token of each position is the sentence itself.
        best: dict[int, float] = {}
        sequence: list[int] = []
        for position in range(min(self.max_positions, first.max_positions)):
            distances = distance_to_span(basis, first.candidates(position))
            passed = torch.nonzero(distances < self.distance_threshold).flatten()
            if passed.numel() == 0:
                break
            for token, distance in zip(passed.tolist(), distances[passed].tolist(), strict=True):
                best[token] = min(distance, best.get(token, float("inf")))
            sequence.append(int(passed[torch.argmin(distances[passed])]))
        details["positions_scanned"] = len(sequence)
        ranked = sorted(best, key=best.__getitem__)
        sequences = (tuple(sequence),) if sequence else ()
        return Reconstruction(tuple(ranked), tuple(best[t] for t in ranked), sequences, details)
