"""Noise against signal of a DP configuration: the start-time warning for a run that cannot learn.

A DP step releases a mean of clipped contributions plus Gaussian noise. DP-SGD
(``privacy.example``) adds noise of std ``noise_multiplier x max_grad_norm / B`` per
coordinate to the mean of an expected B clipped per-example gradients; DP-FedAvg
(``privacy.client``) adds ``noise_multiplier x clipping_norm / (q N)`` to the mean of
an expected q N clipped client updates. That mean has L2 norm at most C, so spread
over the d noised coordinates it is at most C / sqrt(d) per coordinate. Per step,

    per_step = noise_multiplier x sqrt(d) / B        (B: expected batch, or q N)

is how far the noise per coordinate stands above the largest possible signal. Over S
noised steps the signal can add up to at most S C / sqrt(d) per coordinate (every
step's clipped mean at full norm, all pointing the same way) while independent noise
adds up to noise_multiplier C sqrt(S) / B, so the run's ratio is

    over_run = per_step / sqrt(S)

Threshold: ``over_run > 1`` means that not even that best case lifts the signal above
the noise the steps accumulate, in every coordinate: the trained tensors end up
mostly noise, whatever the learning rate. It is a necessary condition, not a
sufficient one: real clipped means are a fraction of C (examples disagree), so a
config just below 1 can still fail; the measured configs that learn sit far below it
(README, "Measured: what DP costs"). S counts what composes in the released model:
a client's local steps over every round for DP-SGD, the rounds for DP-FedAvg. Under
DP-SGD each client has its own ratio (its own batch, sigma and steps) and the warning
counts every client above the threshold: a drowned client's update is noise even in
the best case, whatever the others send (averaging with other clients is not credited:
their updates need not agree). The remedies follow from the formula: a larger expected batch (or cohort),
fewer noised coordinates (FFA-LoRA, smaller r, fewer modules), or a larger epsilon
(a smaller noise multiplier).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from fedpeft.config import Config
from fedpeft.privacy.central import AdaptiveClipping, update_noise_multiplier
from fedpeft.privacy.dp_sgd import steps_per_round

THRESHOLD = 1.0
"""``over_run`` above this: even a perfectly consistent full-norm signal stays below the noise."""


@dataclass(frozen=True)
class NoiseToSignal:
    """Noise per coordinate over the largest clipped signal per coordinate, per step and over the run."""

    unit: Literal["example", "client"]
    noise_multiplier: float
    expected_batch: float
    """B for DP-SGD (capped at the client's examples); the expected cohort q N for DP-FedAvg."""
    coordinates: int
    """d: the noised (trainable) coordinates."""
    steps: int
    """S: noised steps that compose in the released model."""

    @property
    def per_step(self) -> float:
        """``noise_multiplier x sqrt(d) / B``: per-coordinate noise over C / sqrt(d)."""
        return self.noise_multiplier * math.sqrt(self.coordinates) / self.expected_batch

    @property
    def over_run(self) -> float:
        """``per_step / sqrt(S)``: the accumulated noise over the best-case accumulated signal."""
        return self.per_step / math.sqrt(max(self.steps, 1))

    @property
    def drowned(self) -> bool:
        """Whether even the best case stays below the noise (``over_run > THRESHOLD``)."""
        return self.over_run > THRESHOLD


def example_level(
    noise_multipliers: Mapping[int, float], sizes: Sequence[int], config: Config, coordinates: int
) -> list[NoiseToSignal]:
    """DP-SGD's ratio of every client, in client order.

    Args:
        noise_multipliers: Each client's sigma (``Experiment.privacy_plan``).
        sizes: Each client's number of examples (the partition sizes).
        config: The run (``train.batch_size``, steps per round, rounds).
        coordinates: Trainable coordinates of the adapter.

    """
    return [
        NoiseToSignal(
            unit="example",
            noise_multiplier=noise_multipliers[client],
            expected_batch=min(config.train.batch_size, size),
            coordinates=coordinates,
            steps=config.federation.rounds * steps_per_round(config.train, size),
        )
        for client, size in enumerate(sizes)
    ]


def client_level(config: Config, coordinates: int) -> NoiseToSignal:
    """DP-FedAvg's ratio: noise sigma C / (q N) on the mean of q N clipped updates, once a round.

    Under adaptive clipping sigma is the update's raised multiplier (the count takes its share).
    """
    central = config.privacy.client
    expected = config.federation.fraction_train * config.partition.num_clients
    sigma = central.noise_multiplier
    if central.adaptive_clipping:
        sigma = update_noise_multiplier(sigma, AdaptiveClipping.of(central, expected).count_stddev)
    return NoiseToSignal(
        unit="client",
        noise_multiplier=sigma,
        expected_batch=expected,
        coordinates=coordinates,
        steps=config.federation.rounds,
    )


def describe(ratio: NoiseToSignal, drowned: int = 1, clients: int = 1) -> str:
    """The warning for a drowned configuration: the ratio, where it comes from, what to change.

    Args:
        ratio: The worst ratio (for DP-SGD, the worst client's).
        drowned: How many clients are above the threshold (DP-SGD).
        clients: Of how many.

    """
    if ratio.unit == "example":
        who = f"{drowned} of {clients} clients; for the worst, " if clients > 1 else ""
        batch = f"expected batch {ratio.expected_batch:g} (train.batch_size, capped at its examples)"
        steps = f"its {ratio.steps} noised steps"
        larger = (
            "a larger train.batch_size (privacy.example.max_physical_batch_size bounds its memory), "
            "fewer clients with more examples each"
        )
        epsilon = "a larger privacy.example.target_epsilon"
    else:
        batch = f"expected cohort {ratio.expected_batch:g} (fraction_train x num_clients)"
        steps = f"the run's {ratio.steps} noised rounds"
        who = ""
        larger = "many more clients per round (a larger expected cohort q N)"
        epsilon = "a smaller privacy.client.noise_multiplier (a larger epsilon)"
    return (
        f"privacy.{ratio.unit}: the noise drowns the signal ({who}per step the noise per coordinate "
        f"is {ratio.per_step:.3g} x the largest clipped signal (noise_multiplier "
        f"{ratio.noise_multiplier:.3g} x sqrt({ratio.coordinates} trainable coordinates) / {batch}), "
        f"and over {steps} still {ratio.over_run:.3g} x even a perfectly consistent full-norm "
        f"signal; above {THRESHOLD:g} training follows the noise). Change: {larger}; fewer "
        f"trainable coordinates (adapter.freeze_lora_a, a smaller adapter.r, fewer "
        f"target_modules); or {epsilon}"
    )


def noise_warnings(
    config: Config, coordinates: int, noise_multipliers: Mapping[int, float], sizes: Sequence[int]
) -> list[str]:
    """Warnings for every enabled DP unit whose noise drowns the signal (empty when none does).

    Args:
        config: The run.
        coordinates: Trainable coordinates of the adapter (the noised ones).
        noise_multipliers: Each client's DP-SGD sigma (empty without ``privacy.example``).
        sizes: Each client's number of examples.

    """
    notes = []
    if config.privacy.example.enabled:
        ratios = example_level(noise_multipliers, sizes, config, coordinates)
        drowned = [r for r in ratios if r.drowned]
        if drowned:
            worst = max(drowned, key=lambda r: r.over_run)
            notes.append(describe(worst, len(drowned), len(ratios)))
    if config.privacy.client.enabled:
        central = client_level(config, coordinates)
        if central.drowned:
            notes.append(describe(central))
    return notes
