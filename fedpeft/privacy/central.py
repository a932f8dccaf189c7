"""User-level DP on the server: DP-FedAvg's clipped, equally weighted, noised mean.

Paper: Learning Differentially Private Recurrent Language Models (McMahan et al., ICLR
2018). Each client's decoded update is clipped to L2 norm C over all its tensors; the
server sums the clipped updates, divides by the *planned* number of sampled clients m
(not by how many replied, so one client changes the mean by at most C / m) and adds
Gaussian noise of std ``sigma C / m``. The noised mean is then what the configured
aggregator (FedAvg, FedAdam, ...) steps with, so everything after it is
post-processing.

Accounting assumption (stated in every report): clients are sampled with rate
q = m / N. fedpeft samples a fixed-size subset, which the accountant treats as
Poisson sampling with the same rate, the usual approximation in DP-FedAvg practice.
The noise comes from OS randomness: clients must not be able to regenerate it.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

import torch

from fedpeft.aggregation import ClientUpdate
from fedpeft.aggregation._math import clip_update_norm, update_norm
from fedpeft.config import ClientPrivacyConfig


def noisy_mean(
    updates: Sequence[ClientUpdate],
    planned_clients: int,
    config: ClientPrivacyConfig,
    generator: torch.Generator | None = None,
) -> tuple[ClientUpdate, dict[str, float]]:
    """The DP-FedAvg mean of ``updates`` as one update, and diagnostics.

    Args:
        updates: The decoded client updates of the round.
        planned_clients: m, the number of clients sampled for the round.
        config: Clipping norm and noise multiplier.
        generator: Noise source; None means fresh OS randomness.

    """
    if not updates:
        raise ValueError("no update to average")
    if planned_clients < len(updates):
        raise ValueError(f"{len(updates)} updates but only {planned_clients} clients were sampled")
    generator = generator or torch.Generator().manual_seed(secrets.randbits(63))
    norms = [update_norm(u.delta) for u in updates]
    total = {name: torch.zeros_like(t, dtype=torch.float32) for name, t in updates[0].delta.items()}
    for update in updates:
        for name, t in clip_update_norm(update.delta, config.clipping_norm).items():
            total[name] += t.float()
    std = config.noise_multiplier * config.clipping_norm / planned_clients
    mean = {
        name: t / planned_clients + std * torch.randn(t.shape, generator=generator)
        for name, t in total.items()
    }
    ordered = sorted(norms)
    diagnostics = {
        "dp_update_norm_median": ordered[len(ordered) // 2],
        "dp_clipped_fraction": sum(n > config.clipping_norm for n in norms) / len(norms),
        "dp_noise_std": std,
    }
    return ClientUpdate(client_id=-1, delta=mean, num_examples=1), diagnostics
