"""The privacy ledger: every DP event of a run, recorded declaratively, and its epsilon.

Every epsilon fedpeft prints is computed here from the recorded events, never kept as a
running number: a ledger can be saved, reloaded and re-audited with another
accountant. An event is one party's repeated subsampled Gaussian mechanism in one
round (a client's DP-SGD steps, or the server's noisy aggregate); it maps one to one
onto ``dp_accounting``'s ``SelfComposedDpEvent(PoissonSampledDpEvent(q,
GaussianDpEvent(sigma)), steps)``. Under secure aggregation the clients' shares of
user-level noise make one Skellam mechanism per round instead
(:mod:`fedpeft.privacy.distributed`): a ``skellam`` event, which only the ``rdp``
accountant composes (neither Opacus' PRV nor ``dp_accounting`` knows it).

Accountants (Opacus' implementations):

* ``rdp``: Renyi DP of the sampled Gaussian (Mironov et al., 2019) at the integer
  orders 2..256, converted with Balle et al. (2020). Integer orders because Opacus and
  ``dp_accounting`` compute the same closed form there (they bound fractional orders
  differently), so both libraries agree to ~1e-13; fractional orders only tighten
  epsilon above about 10.
* ``prv``: privacy random variables (Gopi et al., 2021), numerically tight.
"""

from __future__ import annotations

import functools
import json
import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal

import dp_accounting
import numpy as np
from opacus.accountants import PRVAccountant
from opacus.accountants.analysis import rdp as rdp_analysis

from fedpeft.privacy.distributed import SkellamShare, skellam_rdp

Unit = Literal["example", "client"]
Accountant = Literal["rdp", "prv"]
Mechanism = Literal["gaussian", "skellam"]

RDP_ORDERS: tuple[int, ...] = tuple(range(2, 257))
"""The Renyi orders of the ``rdp`` accountant (see the module docstring)."""

SERVER = "server"
"""The party name of server-side (user-level) noise events."""


_SKELLAM_FIELDS = ("mechanism", "variance", "l2_sensitivity", "l1_sensitivity")
"""The fields a ``skellam`` event adds; Gaussian events (and old ledgers) go without them."""


@dataclass(frozen=True)
class DpEvent:
    """``steps`` compositions of a Poisson-subsampled Gaussian (or a Skellam) mechanism.

    Args:
        round: The federation round it happened in.
        party: Who added the noise: a client id (as text) or :data:`SERVER`.
        unit: What one participation protects: an ``example`` or a whole ``client``.
        noise_multiplier: Noise std / sensitivity (sigma); for a Skellam event the
            Gaussian-equivalent ``sqrt(variance) / l2_sensitivity``, for reports.
        sample_rate: Poisson sampling probability q of one unit per step (1 for Skellam:
            no amplification by subsampling is credited).
        steps: How many times the mechanism ran.
        mechanism: ``gaussian`` or ``skellam`` (distributed noise under secure aggregation).
        variance: Skellam only: the released noise variance per coordinate (grid units).
        l2_sensitivity: Skellam only: the L2 sensitivity (grid units).
        l1_sensitivity: Skellam only: the L1 sensitivity (grid units).

    """

    round: int
    party: str
    unit: Unit
    noise_multiplier: float
    sample_rate: float
    steps: int
    mechanism: Mechanism = "gaussian"
    variance: float | None = None
    l2_sensitivity: float | None = None
    l1_sensitivity: float | None = None

    def __post_init__(self) -> None:
        if not 0 < self.sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {self.sample_rate}")
        if self.noise_multiplier < 0 or self.steps < 0:
            raise ValueError("noise_multiplier and steps must be >= 0")
        skellam = (self.variance, self.l2_sensitivity, self.l1_sensitivity)
        if self.mechanism == "gaussian":
            if any(value is not None for value in skellam):
                raise ValueError("variance and l1/l2_sensitivity belong to skellam events only")
        elif self.mechanism == "skellam":
            self._check_skellam()
        else:
            raise ValueError(f"mechanism must be gaussian or skellam, got {self.mechanism!r}")

    def _check_skellam(self) -> None:
        variance, l2, l1 = self.variance, self.l2_sensitivity, self.l1_sensitivity
        if variance is None or l2 is None or l1 is None:
            raise ValueError("a skellam event needs variance, l2_sensitivity and l1_sensitivity")
        if not (math.isfinite(variance) and variance >= 0):
            raise ValueError(f"variance must be a finite number >= 0, got {variance}")
        if not (math.isfinite(l2) and l2 > 0 and math.isfinite(l1) and l1 > 0):
            raise ValueError(f"l2_sensitivity and l1_sensitivity must be > 0, got {l2}, {l1}")
        if self.sample_rate != 1:
            raise ValueError(
                f"a skellam event has sample_rate 1 (no subsampled Skellam analysis), got {self.sample_rate}"
            )
        if not math.isclose(self.noise_multiplier, math.sqrt(variance) / l2, rel_tol=1e-9):
            raise ValueError(
                f"a skellam event's noise_multiplier is sqrt(variance) / l2_sensitivity = "
                f"{math.sqrt(variance) / l2}, got {self.noise_multiplier}"
            )

    def to_data(self) -> dict[str, object]:
        """Plain data; a Gaussian event has exactly the keys it had before Skellam events."""
        data = asdict(self)
        if self.mechanism == "gaussian":
            for key in _SKELLAM_FIELDS:
                del data[key]
        return data

    def to_dp_accounting(self) -> dp_accounting.DpEvent:
        """The same event in ``dp_accounting``'s vocabulary (Gaussian events only)."""
        if self.mechanism != "gaussian":
            raise ValueError(
                f"round {self.round}, party {self.party!r}: dp_accounting has no Skellam event; "
                "account skellam events with epsilon_of(..., accountant='rdp')"
            )
        sampled = dp_accounting.PoissonSampledDpEvent(
            self.sample_rate, dp_accounting.GaussianDpEvent(self.noise_multiplier)
        )
        return dp_accounting.SelfComposedDpEvent(sampled, self.steps)


@dataclass
class PrivacyLedger:
    """An append-only list of :class:`DpEvent` with epsilon per party and unit."""

    events: list[DpEvent] = field(default_factory=list)

    def record(self, event: DpEvent) -> None:
        """Append one event."""
        self.events.append(event)

    def select(self, party: str | None = None, unit: Unit | None = None) -> list[DpEvent]:
        """The events of one party and/or unit (all when None)."""
        return [
            e for e in self.events if (party is None or e.party == party) and (unit is None or e.unit == unit)
        ]

    def parties(self, unit: Unit | None = None) -> list[str]:
        """Parties with at least one event, in first-seen order."""
        return list(dict.fromkeys(e.party for e in self.select(unit=unit)))

    def epsilon(
        self,
        delta: float,
        party: str | None = None,
        unit: Unit | None = None,
        accountant: Accountant = "rdp",
    ) -> float:
        """Epsilon at ``delta`` of the composition of the selected events (0 if none)."""
        return epsilon_of(self.select(party, unit), delta, accountant)

    def to_dp_accounting(self, party: str | None = None, unit: Unit | None = None) -> dp_accounting.DpEvent:
        """The selected events as one ``dp_accounting`` ComposedDpEvent (Gaussian events only)."""
        return dp_accounting.ComposedDpEvent([e.to_dp_accounting() for e in self.select(party, unit)])

    def to_data(self) -> list[dict[str, object]]:
        """Plain data: one dict per event."""
        return [e.to_data() for e in self.events]

    def to_json(self) -> str:
        """Plain JSON (a list of events)."""
        return json.dumps(self.to_data())

    @classmethod
    def from_json(cls, text: str) -> PrivacyLedger:
        """Read back :meth:`to_json` (also ledgers written before Skellam events existed)."""
        return cls([DpEvent(**item) for item in json.loads(text)])


def _skellam_rdp(event: DpEvent, shift: float) -> np.ndarray:
    """A skellam event's RDP at :data:`RDP_ORDERS` (all its steps), sensitivities x ``shift``."""
    variance, l2, l1 = event.variance, event.l2_sensitivity, event.l1_sensitivity
    if variance is None or l2 is None or l1 is None:  # DpEvent refuses this; for the type checker
        raise ValueError(f"round {event.round}: not a skellam event")
    return event.steps * skellam_rdp(RDP_ORDERS, variance, shift * l2, shift * l1)


@functools.lru_cache(maxsize=4096)
def _gaussian_rdp_per_step(sample_rate: float, noise_multiplier: float) -> np.ndarray:
    """One step of the sampled Gaussian at :data:`RDP_ORDERS`, read-only.

    Cached because it is the slow part (about 0.13 s for the 255 orders) and a ledger
    repeats it: a DP-SGD client records one event per round with the same q and sigma,
    and epsilon is recomputed every round, by the client and by the server, so without
    the cache a run's accounting grew with the square of its rounds (5 s per epsilon
    after 40 rounds). RDP is linear in the steps, so the curve of ``steps`` steps is
    this one times ``steps``, exactly as Opacus computes it.
    """
    rdp = np.asarray(
        rdp_analysis.compute_rdp(
            q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=RDP_ORDERS
        ),
        dtype=np.float64,
    )
    rdp.setflags(write=False)
    return rdp


def _rdp(event: DpEvent) -> np.ndarray:
    """The event's RDP at :data:`RDP_ORDERS` (all its steps)."""
    if event.mechanism == "skellam":
        return _skellam_rdp(event, 1.0)
    return event.steps * _gaussian_rdp_per_step(event.sample_rate, event.noise_multiplier)


def _epsilon_of_rdp(rdp: np.ndarray, delta: float) -> float:
    epsilon, _ = rdp_analysis.get_privacy_spent(orders=RDP_ORDERS, rdp=rdp, delta=delta)
    return float(epsilon)


def epsilon_of(events: Sequence[DpEvent], delta: float, accountant: Accountant = "rdp") -> float:
    """Epsilon at ``delta`` of composing ``events`` under ``accountant``.

    Gaussian and Skellam events compose as RDP curves at the same orders, converted once.

    Raises:
        ValueError: ``prv`` with a skellam event (PRV has no Skellam mechanism; use rdp).

    """
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if accountant == "prv" and any(e.mechanism == "skellam" for e in events):
        raise ValueError(
            "the prv accountant has no Skellam mechanism (distributed noise under secure "
            "aggregation); account these events with accountant='rdp'"
        )
    active = [e for e in events if e.steps > 0]
    if not active:
        return 0.0
    if any(e.noise_multiplier == 0 for e in active):
        return math.inf
    if accountant == "rdp":
        return _epsilon_of_rdp(sum((_rdp(e) for e in active), np.zeros(len(RDP_ORDERS))), delta)
    if accountant == "prv":
        prv = PRVAccountant()
        prv.history = [(e.noise_multiplier, e.sample_rate, e.steps) for e in active]
        return float(prv.get_epsilon(delta))
    raise ValueError(f"unknown accountant {accountant!r} (rdp or prv)")


def example_epsilon_of_client_dp(events: Sequence[DpEvent], delta: float) -> float:
    """Epsilon at ``delta`` for one *example* of a client, implied by user-level DP ``events``.

    User-level DP's epsilon protects a whole client against its absence (add/remove one
    client); it is not a per-example bound at the same epsilon. Adding, removing or
    replacing one example leaves its client in the federation but may move the client's
    clipped update anywhere in the ball of radius C, so two updates differ by up to 2C:
    a sensitivity-2 question (for q = 1 exactly the Gaussian at noise multiplier
    sigma / 2). Under Poisson sampling the pair of output distributions is
    ``(1 - q) N(0) + q N(-C)`` against ``(1 - q) N(0) + q N(+C)``, which
    ``dp_accounting``'s PLD accountant computes tightly with
    ``NeighboringRelation.REPLACE_ONE`` from the same
    ``PoissonSampled(q, Gaussian(sigma))`` events; that is what this returns.

    Skellam events (distributed noise under secure aggregation) have no PLD here: their
    replace-one bound is Renyi DP with both sensitivities doubled (the rounded updates
    of one client before and after differ by at most ``2 l2`` in L2 and ``2 l1`` in
    L1), composed over the events and converted like :func:`epsilon_of`'s ``rdp``. With
    any Skellam event every event goes that way; a Gaussian one (sample rate 1, as
    a run under secure aggregation has) counts as the Gaussian at sigma / 2.

    Raises:
        NotImplementedError: Skellam events mixed with subsampled (q < 1) Gaussian ones,
            which no run records.

    """
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    active = [e for e in events if e.steps > 0]
    if not active:
        return 0.0
    if any(e.noise_multiplier == 0 for e in active):
        return math.inf
    if any(e.mechanism == "skellam" for e in active):
        return _epsilon_of_rdp(sum((_replace_one_rdp(e) for e in active), np.zeros(len(RDP_ORDERS))), delta)
    # Equal events compose as one self-composition: a PLD per round would take minutes.
    steps: dict[tuple[float, float], int] = {}
    for e in active:
        key = (e.sample_rate, e.noise_multiplier)
        steps[key] = steps.get(key, 0) + e.steps
    accountant = dp_accounting.pld.PLDAccountant(dp_accounting.NeighboringRelation.REPLACE_ONE)
    for (rate, sigma), count in steps.items():
        sampled = dp_accounting.PoissonSampledDpEvent(rate, dp_accounting.GaussianDpEvent(sigma))
        accountant.compose(dp_accounting.SelfComposedDpEvent(sampled, count))
    return float(accountant.get_epsilon(delta))


def _replace_one_rdp(event: DpEvent) -> np.ndarray:
    """The event's RDP at :data:`RDP_ORDERS` when one example of a client changes."""
    if event.mechanism == "skellam":
        return _skellam_rdp(event, 2.0)
    if event.sample_rate != 1:
        raise NotImplementedError(
            f"round {event.round}: a subsampled Gaussian event (q = {event.sample_rate}) composed with "
            "skellam events has no replace-one RDP here"
        )
    return event.steps * _gaussian_rdp_per_step(1.0, event.noise_multiplier / 2)


def skellam_event(round: int, noise: SkellamShare, cohort: int, survivors: int) -> DpEvent:
    """The ledger event of one round of client-added Skellam noise under secure aggregation.

    Each of the ``cohort`` sampled clients adds a share of variance
    ``noise.share_variance(cohort)``; only the ``survivors`` whose shares reach the sum
    (secure aggregation drops the rest) add noise to it, so the released noise has
    variance ``share_variance x survivors``: fewer survivors, less noise, larger epsilon.
    The server knows who was sampled, so the event is at sample rate 1.

    Args:
        round: The federation round.
        noise: The round's mechanism (clipping, noise multiplier, grid, dimension).
        cohort: How many clients were sampled (each added a share of 1 / cohort).
        survivors: How many of them are in the released sum (1..cohort; a round
            that releases no sum records no event).

    """
    if not 1 <= survivors <= cohort:
        raise ValueError(f"survivors must be in 1..cohort ({cohort}), got {survivors}")
    variance = noise.share_variance(cohort) * survivors
    l2 = noise.l2_sensitivity
    return DpEvent(
        round=round,
        party=SERVER,
        unit="client",
        noise_multiplier=math.sqrt(variance) / l2,
        sample_rate=1.0,
        steps=1,
        mechanism="skellam",
        variance=variance,
        l2_sensitivity=l2,
        l1_sensitivity=noise.l1_sensitivity,
    )


MAX_NOISE_MULTIPLIER = 100.0
"""Above this the noise drowns any update: a target needing more is refused."""


def calibrate_noise(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: Accountant = "rdp",
    prior: Iterable[DpEvent] = (),
) -> float:
    """The smallest noise multiplier (to 0.1 %) that keeps a plan within its target.

    The plan is ``steps`` steps at ``sample_rate``, composed after ``prior`` events;
    the target is ``target_epsilon`` at ``delta``.

    Raises:
        ValueError: The target needs more than :data:`MAX_NOISE_MULTIPLIER`.

    """
    prior = list(prior)

    def spent(sigma: float) -> float:
        planned = DpEvent(0, "plan", "example", sigma, sample_rate, steps)
        with warnings.catch_warnings():  # large trial sigmas peak at the largest order
            warnings.simplefilter("ignore", UserWarning)
            return epsilon_of([*prior, planned], delta, accountant)

    if spent(MAX_NOISE_MULTIPLIER) > target_epsilon:
        raise ValueError(
            f"target_epsilon {target_epsilon} at delta {delta} is out of reach: even noise_multiplier "
            f"{MAX_NOISE_MULTIPLIER:g} spends {spent(MAX_NOISE_MULTIPLIER):.3g} over {steps} steps at "
            f"sample rate {sample_rate:.3g}"
        )
    low, high = 0.0, MAX_NOISE_MULTIPLIER
    while high - low > 1e-3 * high:
        middle = (low + high) / 2
        if middle > 0 and spent(middle) <= target_epsilon:
            high = middle
        else:
            low = middle
    return high
