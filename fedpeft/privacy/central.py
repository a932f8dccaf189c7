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

    """

    def __init__(
        self, expected_clients: float, config: ClientPrivacyConfig, like: Mapping[str, Tensor]
    ) -> None:
        if not (math.isfinite(expected_clients) and expected_clients > 0):
            raise ValueError(f"expected_clients must be a positive number, got {expected_clients}")
        self.expected_clients = expected_clients
        self.config = config
        # float64: a low-precision running sum would lose small updates next to large ones.
        self.total = {name: torch.zeros(t.shape, dtype=torch.float64) for name, t in like.items()}
        self.norms: list[float] = []

    def add(self, update: ClientUpdate) -> None:
        """Clip one update to ``clipping_norm`` and add it to the sum."""
        norm = update_norm(update.delta)
        for name, t in clip_update_norm(update.delta, self.config.clipping_norm).items():
            self.total[name] += t.to(torch.float64)
        self.norms.append(norm)

    def finish(self, generator: torch.Generator | None = None) -> tuple[ClientUpdate, dict[str, float]]:
        """The noised mean (float32 tensors; ``client_id`` -1) and its diagnostics.

        Args:
            generator: Noise source; None means fresh OS randomness.

        """
        generator = generator or torch.Generator().manual_seed(secrets.randbits(63))
        config, expected = self.config, self.expected_clients
        std = config.noise_multiplier * config.clipping_norm / expected
        mean = {
            name: (t / expected).float() + std * torch.randn(t.shape, generator=generator)
            for name, t in self.total.items()
        }
        ordered = sorted(self.norms)
        diagnostics = {
            "dp_clients": float(len(ordered)),
            "dp_expected_clients": float(expected),
            "dp_update_norm_median": ordered[len(ordered) // 2] if ordered else 0.0,
            "dp_clipped_fraction": sum(n > config.clipping_norm for n in ordered) / len(ordered)
            if ordered
            else 0.0,
            "dp_noise_std": std,
        }
        return ClientUpdate(client_id=-1, delta=mean, num_examples=1), diagnostics


def noisy_mean(
    updates: Sequence[ClientUpdate],
    expected_clients: float,
    config: ClientPrivacyConfig,
    generator: torch.Generator | None = None,
    like: Mapping[str, Tensor] | None = None,
) -> tuple[ClientUpdate, dict[str, float]]:
    """The DP-FedAvg mean of ``updates`` as one update, and diagnostics (:class:`NoisyMean` at once).

    Args:
        updates: The decoded client updates of the round (may be empty).
        expected_clients: q N, the fixed denominator (the expected cohort).
        config: Clipping norm and noise multiplier.
        generator: Noise source; None means fresh OS randomness.
        like: Names and shapes of the update's tensors when ``updates`` is empty
            (the global adapter); the mean is then noise alone.

    Returns:
        The noised mean (float32 tensors; ``client_id`` -1) and its diagnostics.

    """
    if not (math.isfinite(expected_clients) and expected_clients > 0):
        raise ValueError(f"expected_clients must be a positive number, got {expected_clients}")
    template = updates[0].delta if updates else like
    if template is None:
        raise ValueError("no update to average and no shapes (like) to noise")
    running = NoisyMean(expected_clients, config, template)
    for update in updates:
        running.add(update)
    return running.finish(generator)
