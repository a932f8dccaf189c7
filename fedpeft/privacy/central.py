"""User-level DP on the server: DP-FedAvg's Poisson-sampled, clipped, noised mean.

Paper: Learning Differentially Private Recurrent Language Models (McMahan et al., ICLR
2018). Each round every connected client is sampled independently with probability
q = ``federation.fraction_train`` (Poisson sampling). Each sampled client's decoded
update is clipped to L2 norm C over all its tensors; the server sums the clipped
updates (in float64), divides by the *expected* cohort q N (N: the clients connected
when the round is sampled), not by how many were sampled or replied, and adds Gaussian
noise of std ``sigma C / (q N)``. Adding or removing one client changes the sum by at
most C, so the noised mean is one Poisson-subsampled Gaussian mechanism
``PoissonSampled(q, Gaussian(sigma))``, which is what the ledger records for every
mean the server releases. The noised mean is then what the configured aggregator
(FedAvg, FedAdam, ...) steps with, so everything after it is post-processing.

Adaptive clipping (Andrew et al., "Differentially Private Learning with Adaptive
Clipping", NeurIPS 2021; ``privacy.client.adaptive_clipping``): a fixed C is either far
above the updates' norms (noise std sigma C / (q N) wasted on headroom) or far below
them (every update shrunk, its direction biased), and the right C moves as training
goes. Each round the server also releases how many updates it did *not* clip, noised:
``(sum_i (b_i - 1/2) + N(0, sigma_b^2)) / (q N) + 1/2`` with ``b_i = [||u_i|| <= C]``,
and moves C geometrically toward the target quantile gamma of the norms,
``C <- C exp(-eta_C (b - gamma))``. Adding or removing one client changes the clipped
sum by at most C and the centred count by 1/2, so the pair is one Gaussian mechanism
of multiplier ``(sigma_u^-2 + (2 sigma_b)^-2)^-1/2`` (their Theorem 1); the update's
noise multiplier sigma_u is raised to keep that equal to the configured sigma
(:func:`update_noise_multiplier`), and the ledger records ``PoissonSampled(q,
Gaussian(sigma))`` for each release as without adaptive clipping. C itself is
post-processing of earlier releases.

Notes:
    The guarantee holds only if:

    * The sampling is Poisson and secret: :func:`poisson_sample` draws from the
      operating system's randomness, never from the run seed, so neither the clients
      nor anyone who knows the config can tell who took part (the amplification by
      subsampling needs that). Without user-level DP the server samples a fixed-size
      subset seeded from the run seed (reproducible runs); no amplification is ever
      credited for that sampling.
    * The release does not depend on who took part: the mean of every round is
      released, noised and divided by q N, however many clients were sampled or
      replied (none: noise only); a round is never retried for too few replies, which
      would tell who was absent. ``federation.min_train_clients`` is the smallest
      *expected* cohort: the server waits until q N reaches it.
    * N, the number of connected clients, is public (as the population size is in
      McMahan et al.), and the server is trusted: it sees the clipped updates, and who
      was sampled, before the noise.
    * The noise comes from OS randomness: clients cannot regenerate it.

"""

from __future__ import annotations

import math
import random
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from fedpeft.aggregation import ClientUpdate
from fedpeft.aggregation._math import clip_update_norm, update_norm
from fedpeft.config import ClientPrivacyConfig


def poisson_sample(nodes: Sequence[int], sample_rate: float, rng: random.Random | None = None) -> list[int]:
    """Each of ``nodes`` independently with probability ``sample_rate`` (sorted).

    Args:
        nodes: The population (node or client ids).
        sample_rate: q in (0, 1].
        rng: The source of the draws; None: the operating system's randomness
            (``random.SystemRandom``), which a deployment must use. Only a
            simulation of the process (the audit's shadow federations) passes a
            seeded one.

    """
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
    draw = rng if rng is not None else random.SystemRandom()
    return sorted(node for node in nodes if sample_rate == 1 or draw.random() < sample_rate)


def update_noise_multiplier(noise_multiplier: float, count_stddev: float) -> float:
    """sigma_u: the update's noise multiplier that, with the count's std sigma_b, spends sigma.

    Adaptive clipping releases the clipped sum (sensitivity C, noise sigma_u C) and the
    centred unclipped count (sensitivity 1/2, noise sigma_b) together; as one Gaussian
    mechanism their multiplier is ``(sigma_u^-2 + (2 sigma_b)^-2)^-1/2``, which this
    solves for sigma_u so that it equals ``noise_multiplier``.

    Raises:
        ValueError: ``2 sigma_b <= sigma``: the count alone would spend the whole budget.

    """
    if not noise_multiplier > 0:
        raise ValueError("adaptive clipping needs noise: noise_multiplier must be > 0")
    if not 2 * count_stddev > noise_multiplier:
        raise ValueError(
            f"privacy.client.clipped_count_stddev = {count_stddev:g} leaves no budget for the "
            f"update: it must exceed noise_multiplier / 2 = {noise_multiplier / 2:g} "
            "(Andrew et al. suggest the expected cohort / 20)"
        )
    return (noise_multiplier**-2 - (2 * count_stddev) ** -2) ** -0.5


@dataclass
class AdaptiveClipping:
    """The clipping norm C as it follows a quantile of the update norms, round by round.

    Args:
        clipping_norm: C for the next round (the config's ``clipping_norm`` at first).
        target_unclipped_quantile: gamma: the fraction of updates C should leave unclipped.
        learning_rate: eta_C of the geometric step.
        count_stddev: sigma_b, the std of the noise on the unclipped count.

    """

    clipping_norm: float
    target_unclipped_quantile: float
    learning_rate: float
    count_stddev: float

    @classmethod
    def of(cls, config: ClientPrivacyConfig, expected_clients: float) -> AdaptiveClipping:
        """The start of a run under ``config`` (sigma_b: its value, or q N / 20)."""
        stddev = config.clipped_count_stddev or expected_clients / 20
        update_noise_multiplier(config.noise_multiplier, stddev)  # fail at start, not in round 1
        return cls(config.clipping_norm, config.target_unclipped_quantile, config.clipping_norm_lr, stddev)

    def step(self, noised_unclipped_fraction: float) -> None:
        """``C <- C exp(-eta_C (b - gamma))``: shrink C when more than gamma went unclipped."""
        self.clipping_norm *= math.exp(
            -self.learning_rate * (noised_unclipped_fraction - self.target_unclipped_quantile)
        )


class NoisyMean:
    """DP-FedAvg's mean, streamed: clip and sum each update as it is decoded, noise once.

    Each update is clipped and folded into a float64 sum as it is decoded; the noise is
    added once, in :meth:`finish`.

    The sum is the same float64 sum of clipped updates the batch formula takes, so the
    result equals it up to float64 rounding in any arrival order (then cast to
    float32). Memory: the sum and one norm per update, whatever the cohort.

    Args:
        expected_clients: q N, the fixed denominator (the expected cohort).
        config: Clipping norm and noise multiplier.
        like: Names and shapes of the update's tensors (the global adapter): the sum
            starts from it, so a round with no update releases noise alone.
        adaptive: Under adaptive clipping, the run's C and sigma_b: the mean is
            clipped to its C, the noised unclipped fraction is released beside it, and
            :meth:`finish` moves C with that fraction for the next round.

    """

    def __init__(
        self,
        expected_clients: float,
        config: ClientPrivacyConfig,
        like: Mapping[str, Tensor],
        adaptive: AdaptiveClipping | None = None,
    ) -> None:
        if not (math.isfinite(expected_clients) and expected_clients > 0):
            raise ValueError(f"expected_clients must be a positive number, got {expected_clients}")
        self.expected_clients = expected_clients
        self.config = config
        self.adaptive = adaptive
        self.clipping_norm = adaptive.clipping_norm if adaptive is not None else config.clipping_norm
        # float64: a low-precision running sum would lose small updates next to large ones.
        self.total = {name: torch.zeros(t.shape, dtype=torch.float64) for name, t in like.items()}
        self.norms: list[float] = []

    def add(self, update: ClientUpdate) -> None:
        """Clip one update to the round's C and add it to the sum."""
        norm = update_norm(update.delta)
        for name, t in clip_update_norm(update.delta, self.clipping_norm).items():
            self.total[name] += t.to(torch.float64)
        self.norms.append(norm)

    def finish(self, generator: torch.Generator | None = None) -> tuple[ClientUpdate, dict[str, float]]:
        """The noised mean (float32 tensors; ``client_id`` -1) and its diagnostics.

        Under adaptive clipping this is also where C takes its step (once per release).

        Args:
            generator: Noise source; None means fresh OS randomness.

        """
        generator = generator or torch.Generator().manual_seed(secrets.randbits(63))
        config, expected, clip = self.config, self.expected_clients, self.clipping_norm
        multiplier = config.noise_multiplier
        if self.adaptive is not None:
            multiplier = update_noise_multiplier(multiplier, self.adaptive.count_stddev)
        std = multiplier * clip / expected
        mean = {
            name: (t / expected).float() + std * torch.randn(t.shape, generator=generator)
            for name, t in self.total.items()
        }
        ordered = sorted(self.norms)
        diagnostics = {
            "dp_clients": float(len(ordered)),
            "dp_expected_clients": float(expected),
            "dp_update_norm_median": ordered[len(ordered) // 2] if ordered else 0.0,
            "dp_clipped_fraction": sum(n > clip for n in ordered) / len(ordered) if ordered else 0.0,
            "dp_noise_std": std,
            "dp_clipping_norm": clip,
        }
        if self.adaptive is not None:
            # Only this noised count may steer C: the exact one is not private.
            centred = sum(n <= clip for n in ordered) - len(ordered) / 2
            noise = float(torch.randn((), generator=generator, dtype=torch.float64))
            noise *= self.adaptive.count_stddev
            diagnostics["dp_unclipped_fraction_noised"] = (centred + noise) / expected + 0.5
            self.adaptive.step(diagnostics["dp_unclipped_fraction_noised"])
        return ClientUpdate(client_id=-1, delta=mean, num_examples=1), diagnostics


def noisy_mean(
    updates: Sequence[ClientUpdate],
    expected_clients: float,
    config: ClientPrivacyConfig,
    generator: torch.Generator | None = None,
    like: Mapping[str, Tensor] | None = None,
    adaptive: AdaptiveClipping | None = None,
) -> tuple[ClientUpdate, dict[str, float]]:
    """The DP-FedAvg mean of ``updates`` as one update, and diagnostics (:class:`NoisyMean` at once).

    Args:
        updates: The decoded client updates of the round (may be empty).
        expected_clients: q N, the fixed denominator (the expected cohort).
        config: Clipping norm and noise multiplier.
        generator: Noise source; None means fresh OS randomness.
        like: Names and shapes of the update's tensors when ``updates`` is empty
            (the global adapter); the mean is then noise alone.
        adaptive: Adaptive clipping's state; :meth:`NoisyMean.finish` steps it.

    Returns:
        The noised mean (float32 tensors; ``client_id`` -1) and its diagnostics.

    """
    if not (math.isfinite(expected_clients) and expected_clients > 0):
        raise ValueError(f"expected_clients must be a positive number, got {expected_clients}")
    template = updates[0].delta if updates else like
    if template is None:
        raise ValueError("no update to average and no shapes (like) to noise")
    running = NoisyMean(expected_clients, config, template, adaptive)
    for update in updates:
        running.add(update)
    return running.finish(generator)
