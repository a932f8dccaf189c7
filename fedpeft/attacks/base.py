"""The attack interface: an observation and the public model in, a reconstruction out."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from fedpeft.attacks.observation import Observation
from fedpeft.models import LoadedModel
from fedpeft.registry import Registry


@dataclass(frozen=True)
class Reconstruction:
    """What an attack recovered from one observation.

    Attributes:
        token_ids: Recovered vocabulary tokens, most confident first, no repeats.
        token_scores: One score per entry of ``token_ids`` (lower is more confident;
            for span checks, the distance to the gradient's row span).
        sequences: Recovered token sequences (empty for a pure token-set attack).
        details: Attack-specific diagnostics (e.g. the gradient rank it saw).

    """

    token_ids: tuple[int, ...]
    token_scores: tuple[float, ...]
    sequences: tuple[tuple[int, ...], ...] = ()
    details: dict[str, float | int | str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.token_ids) != len(self.token_scores):
            raise ValueError("token_ids and token_scores differ in length")
        if len(set(self.token_ids)) != len(self.token_ids):
            raise ValueError("token_ids repeat a token")


class Attack(Protocol):
    """A gradient-inversion attack.

    ``target`` is the public model (base weights, tokenizer, adapter config): every
    party of a federation has it. The attack may load ``observation.global_state``
    into it and run it, but receives nothing of the client's data.
    """

    def reconstruct(self, observation: Observation, target: LoadedModel) -> Reconstruction:
        """Recover what the observed update reveals of the client's batch."""
        ...


ATTACKS: Registry[Attack] = Registry("attack", "attack.name")
"""Every attack, by name (file stem = registry key)."""
