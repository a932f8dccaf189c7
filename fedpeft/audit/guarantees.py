"""The report's guarantees: epsilon per client and per round from a run's privacy ledger.

Every number comes from the ledger (:mod:`fedpeft.privacy.ledger`), the same source
``metrics.json`` uses; this module only arranges it and states what it rests on.
"""

from __future__ import annotations

import math
from typing import Any

from fedpeft.config import Config
from fedpeft.privacy.ledger import (
    SERVER,
    Accountant,
    PrivacyLedger,
    Unit,
    epsilon_of,
    example_epsilon_of_client_dp,
)


def _finite(value: float) -> float | None:
    """JSON has no infinity: an unbounded epsilon is written as null."""
    return value if math.isfinite(value) else None


def _text(epsilon: float | None) -> str:
    return "unbounded" if epsilon is None else f"{epsilon:.2f}"


def _epsilon_by_round(
    ledger: PrivacyLedger, party: str, unit: Unit, delta: float, accountant: Accountant, rounds: int
) -> list[float | None]:
    """``party``'s epsilon (``unit``-level) after each of rounds 1..``rounds``, composed so far."""
    events = ledger.select(party, unit)
    composed = ([e for e in events if e.round <= r] for r in range(1, rounds + 1))
    return [_finite(epsilon_of(so_far, delta, accountant)) for so_far in composed]


SECURE_AGGREGATION_NOTE = (
    "Secure aggregation (Flower's SecAgg+): the server sees only each round's sum of the "
    "sampled clients' updates, never one client's, so the attacks on captured updates run on "
    "those sums and are scored against the union of the summed clients' batches. It is no "
    "differential privacy: the sum and the final model still carry every client's data, and "
    "it assumes an honest-but-curious server that does not add or drop clients to isolate one. "
    "The shadow models (LiRA) rerun the federation in-process without the protocol: its sum is "
    "the plain sum up to its quantisation grid, so the final model is the same function of the "
    "data up to quantisation (and, under user-level DP, Gaussian noise of about the variance in "
    "place of the clients' Skellam shares)."
)
"""What a variant under ``federation.secure_aggregation`` adds to its assumptions."""


def assumptions_of(config: Config, smallest_client: int) -> list[str]:
    """What the reported epsilons rest on, in plain words, for this config."""
    example, client = config.privacy.example, config.privacy.client
    secure = config.federation.secure_aggregation.enabled
    if not example.enabled and not client.enabled:
        return [
            "No differential privacy: the run makes no formal privacy promise. Everything "
            "else in this report is an empirical measurement, a lower bound on the leak.",
            *([SECURE_AGGREGATION_NOTE] if secure else []),
        ]
    notes = [SECURE_AGGREGATION_NOTE] if secure else []
    if example.enabled:
        notes += [
            "Unit: one training example of one client (example-level DP-SGD, Opacus). A person "
            "with several examples, or a canary inserted r times, is protected only by group "
            "privacy, which weakens the guarantee about r-fold.",
            "Each client's epsilon covers its own data over every round it trained; clients' "
            "epsilons do not add up, the report shows the largest.",
            "Batches are Poisson-sampled at rate q = batch / examples, as the accountant assumes; "
            "noise and sampling use operating-system randomness the server cannot know.",
            "The client runs the unmodified fedpeft client: the server cannot check that noise was added.",
            "Hyperparameter tuning on the private data and the choice of which examples a client "
            "holds are not accounted.",
        ]
        if example.delta * smallest_client >= 1:
            notes.append(
                f"Warning: delta = {example.delta:g} is not small against the smallest client's "
                f"{smallest_client} examples (delta x n >= 1 allows leaking an example outright)."
            )
    if client.enabled and secure:
        notes += [
            "Unit: a whole client (distributed user-level DP): each sampled client clips its "
            "update, rounds it onto the protocol's integer grid and adds a Skellam noise share "
            "from randomness the server cannot know, so the server never sees an un-noised sum. "
            "The client runs the unmodified fedpeft client: nobody can check that it added its share.",
            "Each unmasked sum is one Skellam mechanism at sample rate 1 (the server knows who was "
            "sampled, so no amplification is credited), with the noise of the shares that reached "
            "it; the chance that a share is clamped by the protocol's range is added to delta.",
        ]
    elif client.enabled:
        notes += [
            "Unit: a whole client (user-level DP-FedAvg on the server). It trusts the server, "
            "which sees the clipped updates before noise.",
            "Clients are Poisson-sampled at q = federation.fraction_train from operating-system "
            "randomness, and the noised mean divides by the expected cohort q N however many "
            "replied; the ledger records one subsampled Gaussian at q per released mean.",
        ]
    return notes


def guarantees_section(config: Config, ledger: PrivacyLedger, client_sizes: list[int]) -> dict[str, Any]:
    """Epsilon per client and per round (cumulative), unit, accountant, delta and assumptions."""
    example, central = config.privacy.example, config.privacy.client
    rounds = config.federation.rounds
    section: dict[str, Any] = {
        "dp": example.enabled or central.enabled,
        "units": [],
        "assumptions": assumptions_of(config, min(client_sizes) if client_sizes else 0),
        "per_round": [],
    }
    if example.enabled:
        parties = sorted(ledger.parties("example"), key=int)
        per_client = {
            party: _epsilon_by_round(ledger, party, "example", example.delta, example.accountant, rounds)
            for party in parties
        }
        noise = {p: sorted({e.noise_multiplier for e in ledger.select(p, "example")}) for p in parties}
        final = {p: values[-1] for p, values in per_client.items()}
        section["units"].append(
            {
                "unit": "example",
                "mechanism": "DP-SGD (client side)",
                "accountant": example.accountant,
                "delta": example.delta,
                "target_epsilon": example.target_epsilon,
                "max_grad_norm": example.max_grad_norm,
                "noise_multiplier": {p: v[0] for p, v in noise.items() if v},
                "epsilon_final": final,
                "epsilon_max": max((v for v in final.values() if v is not None), default=None),
                "epsilon_by_round": per_client,
            }
        )
    if central.enabled:
        by_round = _epsilon_by_round(ledger, SERVER, "client", central.delta, central.accountant, rounds)
        per_example = _finite(example_epsilon_of_client_dp(ledger.select(SERVER, "client"), central.delta))
        section["units"].append(
            {
                "unit": "client",
                "mechanism": (
                    "Skellam shares (clients, under secure aggregation)"
                    if config.federation.secure_aggregation.enabled
                    else "DP-FedAvg (server side)"
                ),
                "accountant": central.accountant,
                "delta": central.delta,
                "target_epsilon": None,
                "max_grad_norm": central.clipping_norm,
                "noise_multiplier": {SERVER: central.noise_multiplier},
                "epsilon_final": {SERVER: by_round[-1]},
                "epsilon_max": by_round[-1],
                "epsilon_by_round": {SERVER: by_round},
                "epsilon_example": per_example,
            }
        )
        section["assumptions"].append(
            f"The client-level epsilon ({_text(by_round[-1])}) is not a per-example bound: one "
            "example can move its client's clipped update by 2C, so one example of a client is "
            f"protected at epsilon {_text(per_example)} (delta {central.delta:g}; replace-one "
            "accounting of the same ledger events with dp_accounting's PLD), the number this "
            "report compares attacks with."
        )
    return section


def example_epsilon(section: dict[str, Any], clients: list[int]) -> float | None:
    """The epsilon that protects one example of ``clients`` (None: no guarantee).

    Example-level DP bounds it directly (largest over those clients); user-level DP
    bounds it too, but not at its client-level epsilon: one example moves its client's
    clipped update by up to 2C, so the bound is the replace-one ``epsilon_example`` of
    the same events (:func:`fedpeft.privacy.ledger.example_epsilon_of_client_dp`). The
    smaller bound holds.
    """
    bounds = []
    for unit in section["units"]:
        if unit["unit"] == "example":
            values = [unit["epsilon_final"].get(str(c)) for c in clients]
            if values and all(v is not None for v in values):
                bounds.append(max(values))
        elif unit.get("epsilon_example") is not None:
            bounds.append(unit["epsilon_example"])
    return min(bounds) if bounds else None
