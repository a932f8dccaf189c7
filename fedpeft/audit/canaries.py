"""Random secret canaries in a fixed format, and reference candidates never inserted.

Paper: The Secret Sharer: Evaluating and Testing Unintended Memorization in Neural
Networks (Carlini, Liu, Erlingsson, Kos, Song, 2019).

A canary is ``"<prefix> d d d d d d"`` with uniformly random digits (the secret); for a
classifier it also carries a uniformly random label, so that a model can give it a low
loss only by memorising that these digits go with that label (a shared prefix -> label
rule cannot fit random labels). The randomness space R is every digit string of the
given length; references are further draws from R, distinct from every canary.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Canary:
    """One secret and whether the audit inserted it.

    Attributes:
        text: The full canary sentence (prefix and secret digits).
        secret: The digits alone, space separated (what a report masks).
        label: The class it is inserted with (None for causal LMs).
        included: Whether it went into the training data (drawn with probability 1/2).

    """

    text: str
    secret: str
    label: int | None
    included: bool


def canary_text(prefix: str, digits: str) -> str:
    """``prefix`` followed by the digits, space separated (one token per digit)."""
    return f"{prefix} {' '.join(digits)}".strip()


def make_canaries(
    count: int,
    digits: int,
    prefix: str,
    num_labels: int | None,
    seed: int,
    references: int = 0,
) -> tuple[list[Canary], list[str]]:
    """``count`` canaries and ``references`` further distinct secrets' texts.

    Deterministic under ``seed``. Each canary is included with probability 1/2
    independently (the one-run audit's randomisation) and, with ``num_labels``, gets a
    uniformly random label.

    Raises:
        ValueError: More secrets were asked for than ``10**digits`` exist.

    """
    if count + references > 10**digits:
        raise ValueError(f"{count + references} distinct secrets asked for, {10**digits} exist")
    rng = random.Random(f"canaries:{seed}")
    drawn: set[str] = set()
    secrets: list[str] = []
    while len(secrets) < count + references:
        value = "".join(rng.choice("0123456789") for _ in range(digits))
        if value not in drawn:
            drawn.add(value)
            secrets.append(value)
    canaries = []
    for value in secrets[:count]:
        label = rng.randrange(num_labels) if num_labels else None
        canaries.append(
            Canary(
                text=canary_text(prefix, value),
                secret=" ".join(value),
                label=label,
                included=rng.random() < 0.5,
            )
        )
    return canaries, [canary_text(prefix, value) for value in secrets[count:]]
