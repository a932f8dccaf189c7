"""Synthetic personal data (names with phone numbers, e-mails, account numbers).

Planted into client text for leakage benchmarks, and the format knowledge a ReCIT
adversary trains its memorisation boost on.

Each record is a person with a name and one secret of a kind (phone number, e-mail,
account number). The secrets are random draws, so a model can produce one only by
reading it from the client's update, never from its pre-training.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

FIRST_NAMES = (
    "Juliana", "Marcus", "Ingrid", "Tomasz", "Amara", "Kenji", "Lucia", "Omar", "Freya", "Rahul",
    "Sofia", "Dmitri", "Chloe", "Mateo", "Aisha", "Lars", "Priya", "Nikolai", "Elena", "Kwame",
)  # fmt: skip
LAST_NAMES = (
    "Moreau", "Okafor", "Lindqvist", "Novak", "Haddad", "Tanaka", "Ferreira", "Kowalski", "Nguyen",
    "Schmidt", "Rossi", "Adeyemi", "Larsen", "Ivanova", "Garcia", "Brennan", "Mehta", "Dubois",
)  # fmt: skip
DOMAINS = ("mail.com", "post.org", "inbox.net", "example.org")
KINDS = ("phone number", "e-mail", "account number")

_OPENINGS = (
    "Hi, I'm {name}.",
    "This is {name} writing.",
    "Hello, my name is {name}.",
)
_REASONS = (
    "I would like to join the class you posted.",
    "Please update my details before the next invoice.",
    "I am writing about the order I placed last week.",
)


@dataclass(frozen=True)
class PiiRecord:
    """One person's planted secret.

    Attributes:
        name: First and last name.
        kind: One of :data:`KINDS`.
        secret: The value itself (what recovery is scored on).
        text: A message that discloses it, as a client might write it.
        note: The "personal note" restating it (ReCIT's PNote), e.g.
            ``"Juliana Moreau's phone number is 9 3 2 5 4 3 7 6."``.

    """

    name: str
    kind: str
    secret: str
    text: str
    note: str


def _secret(kind: str, name: str, rng: random.Random) -> str:
    if kind == "e-mail":
        first, last = name.lower().split()
        return f"{first}.{last}{rng.randrange(10, 100)}@{rng.choice(DOMAINS)}"
    digits = 8 if kind == "phone number" else 10
    return " ".join(str(rng.randrange(10)) for _ in range(digits))


def make_pii_records(count: int, seed: int, kinds: Sequence[str] = KINDS) -> list[PiiRecord]:
    """``count`` random people with one secret each, deterministic under ``seed``.

    Digits are space separated so that every tokenizer gives one token per digit: the
    secret's recovery then measures the attack, not a tokenizer's digit merges.
    """
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        raise ValueError(f"unknown PII kinds {unknown}; known: {list(KINDS)}")
    rng = random.Random(seed)
    records = []
    for _ in range(count):
        name = f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}"
        kind = rng.choice(list(kinds))
        secret = _secret(kind, name, rng)
        opening = rng.choice(_OPENINGS).format(name=name)
        text = f"{opening} {rng.choice(_REASONS)} My {kind} is {secret}."
        records.append(PiiRecord(name, kind, secret, text, f"{name}'s {kind} is {secret}."))
    return records


def plant_pii(texts: Sequence[str], records: Sequence[PiiRecord], every: int = 1) -> list[str]:
    """Every ``every``-th text with the next record's message prepended.

    Raises:
        ValueError: Fewer records than texts to plant into.

    """
    if every < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    needed = (len(texts) + every - 1) // every
    if len(records) < needed:
        raise ValueError(f"{needed} texts to plant into but only {len(records)} PII records")
    planted = list(texts)
    for slot, index in enumerate(range(0, len(texts), every)):
        planted[index] = f"{records[slot].text} {texts[index]}"
    return planted
