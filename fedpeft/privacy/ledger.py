"""The privacy ledger: every DP event of a run, recorded declaratively, and its epsilon.

Every epsilon fedpeft prints is computed here from the recorded events, never kept as a
running number: a ledger can be saved, reloaded and re-audited with another
accountant. An event is one party's repeated subsampled Gaussian mechanism in one
round (a client's DP-SGD steps, or the server's noisy aggregate); it maps one to one
onto ``dp_accounting``'s ``SelfComposedDpEvent(PoissonSampledDpEvent(q,
GaussianDpEvent(sigma)), steps)``.

Accountants (Opacus' implementations):

* ``rdp``: Renyi DP of the sampled Gaussian (Mironov et al., 2019) at the integer
  orders 2..256, converted with Balle et al. (2020). Integer orders because Opacus and
  ``dp_accounting`` compute the same closed form there (they bound fractional orders
  differently), so both libraries agree to ~1e-13; fractional orders only tighten
  epsilon above about 10.
* ``prv``: privacy random variables (Gopi et al., 2021), numerically tight.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal

import dp_accounting
from opacus.accountants import PRVAccountant
from opacus.accountants.analysis import rdp as rdp_analysis

Unit = Literal["example", "client"]
Accountant = Literal["rdp", "prv"]

RDP_ORDERS: tuple[int, ...] = tuple(range(2, 257))
"""The Renyi orders of the ``rdp`` accountant (see the module docstring)."""

SERVER = "server"
"""The party name of server-side (user-level) noise events."""


@dataclass(frozen=True)
class DpEvent:
    """``steps`` compositions of a Poisson-subsampled Gaussian mechanism.

    Args:
        round: The federation round it happened in.
        party: Who added the noise: a client id (as text) or :data:`SERVER`.
        unit: What one participation protects: an ``example`` or a whole ``client``.
        noise_multiplier: Noise std / sensitivity (sigma).
        sample_rate: Poisson sampling probability q of one unit per step.
        steps: How many times the mechanism ran.

    """

    round: int
    party: str
    unit: Unit
    noise_multiplier: float
    sample_rate: float
    steps: int

    def __post_init__(self) -> None:
        if not 0 < self.sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {self.sample_rate}")
        if self.noise_multiplier < 0 or self.steps < 0:
            raise ValueError("noise_multiplier and steps must be >= 0")

    def to_dp_accounting(self) -> dp_accounting.DpEvent:
        """The same event in ``dp_accounting``'s vocabulary."""
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
        """The selected events as one ``dp_accounting`` ComposedDpEvent."""
        return dp_accounting.ComposedDpEvent([e.to_dp_accounting() for e in self.select(party, unit)])

    def to_data(self) -> list[dict[str, object]]:
        """Plain data: one dict per event."""
        return [asdict(e) for e in self.events]

    def to_json(self) -> str:
        """Plain JSON (a list of events)."""
        return json.dumps(self.to_data())

    @classmethod
    def from_json(cls, text: str) -> PrivacyLedger:
        """Read back :meth:`to_json`."""
        return cls([DpEvent(**item) for item in json.loads(text)])


def epsilon_of(events: Sequence[DpEvent], delta: float, accountant: Accountant = "rdp") -> float:
    """Epsilon at ``delta`` of composing ``events`` under ``accountant``."""
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    active = [e for e in events if e.steps > 0]
    if not active:
        return 0.0
    if any(e.noise_multiplier == 0 for e in active):
        return math.inf
    if accountant == "rdp":
        rdp = sum(
            rdp_analysis.compute_rdp(
                q=e.sample_rate, noise_multiplier=e.noise_multiplier, steps=e.steps, orders=RDP_ORDERS
            )
            for e in active
        )
        epsilon, _ = rdp_analysis.get_privacy_spent(orders=RDP_ORDERS, rdp=rdp, delta=delta)
        return float(epsilon)
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
    """
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    active = [e for e in events if e.steps > 0]
    if not active:
        return 0.0
    if any(e.noise_multiplier == 0 for e in active):
        return math.inf
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
