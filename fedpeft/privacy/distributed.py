"""Distributed user-level DP under secure aggregation: a client's Skellam noise share.

Paper: The Skellam Mechanism for Differentially Private Federated Learning (Agarwal,
Kairouz and Liu, NeurIPS 2021).

With secure aggregation the server learns only the sum of the cohort's integer vectors,
so nobody may see an un-noised sum and the server cannot add the noise: every client
adds a share of it. Continuous Gaussian shares would not survive the protocol's integer
encoding exactly, so each client sends integers:

1. clip its update to L2 norm C (``clipping_norm``, payload units, float64);
2. scale by ``scale`` (s, integer grid steps per payload unit) and round stochastically
   onto the integers (unbiased: ``floor(v) + Bernoulli(frac(v))``);
3. add Skellam noise ``Poisson(mu / 2k) - Poisson(mu / 2k)``, its share of variance
   ``mu / k`` for a cohort of k.

The Skellam family is closed under summation: the sum of k independent shares is
exactly Skellam of variance mu. Because every client quantises *before* adding noise,
the server's view (the exact modular sum, which does not wrap) is exactly the integer
sum of the rounded updates plus one Skellam draw of variance mu: the Skellam mechanism,
with no approximation left between what runs and what is accounted.

Sensitivity (integer grid units): stochastic rounding moves each coordinate by less
than 1, so a rounded update u of a clipped y satisfies ``||u - s y||_inf < 1`` and
``||u||_2 <= C s + sqrt(d)`` (d coordinates), ``||u||_1 <= sqrt(d) ||u||_2``. The
neighbouring relation is add/remove one client in the zero-out form: the server knows
who was sampled, so an "absent" client is one whose data gives a zero update while it
still adds its noise share (the zero vector rounds to exactly zero); the sum then moves
by ``u``, so the sensitivities are the bounds on ``||u||`` above. The rounding is random,
but the bounds hold for every outcome of it, so by the joint convexity of Renyi
divergence (over the rounding draws, coupled across the two neighbours) the mechanism's
RDP is at most that of a fixed shift with those norms.

Notes:
    The guarantee holds only if:

    * Every sampled client adds its share, drawn from randomness the server and the
      other clients cannot know (a ``numpy.random.Generator`` seeded from the operating
      system, never from the run seed). The accounting counts the shares that actually
      reach the sum (``survivors``): a client dropped by secure aggregation takes its
      noise with it.
    * The sum does not wrap modulo the protocol's modulus and no share is clamped by the
      encoder's range; the clamp probability (:func:`clamp_probability`) is charged to
      delta (see :func:`delta_with_clamps`).
    * No amplification by subsampling is credited: the server knows who was sampled, so
      each round is one Skellam mechanism at sample rate 1.
    * Poisson variates come from NumPy's floating-point sampler, which is not an exact
      sampler in the sense of Canonne et al. (2020); its deviations are not accounted.

"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import skellam


def quantise_stochastic(values: np.ndarray, scale: float, rng: np.random.Generator) -> np.ndarray:
    """``values x scale`` rounded to a neighbouring integer, up with probability its fraction.

    Unbiased (the expectation is ``values x scale``) and never more than 1 away from it:
    the rounding the sensitivity bound ``C s + sqrt(d)`` rests on.

    Args:
        values: Any shape, float (computed in float64).
        scale: Integer grid steps per unit of ``values`` (> 0).
        rng: The source of the rounding draws.

    Returns:
        int64 array of the same shape.

    """
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive number, got {scale}")
    scaled = np.asarray(values, dtype=np.float64) * scale
    if not np.all(np.isfinite(scaled)):
        raise ValueError("values must be finite")
    low = np.floor(scaled)
    up = rng.random(scaled.shape) < scaled - low
    return (low + up).astype(np.int64)


def skellam_noise(shape: int | tuple[int, ...], variance: float, rng: np.random.Generator) -> np.ndarray:
    """Symmetric Skellam noise, ``Poisson(variance / 2) - Poisson(variance / 2)``, per coordinate.

    Args:
        shape: The output shape.
        variance: Variance per coordinate (>= 0; 0 gives zeros).
        rng: The source of the Poisson draws.

    Returns:
        int64 array of ``shape``.

    """
    if not (math.isfinite(variance) and variance >= 0):
        raise ValueError(f"variance must be a finite number >= 0, got {variance}")
    if variance == 0:
        return np.zeros(shape, dtype=np.int64)
    rate = variance / 2
    return rng.poisson(rate, shape).astype(np.int64) - rng.poisson(rate, shape).astype(np.int64)


@dataclass(frozen=True)
class SkellamShare:
    """One round's distributed Skellam mechanism, seen from a client adding its share.

    Args:
        clipping_norm: C, the L2 bound of a client's update in payload units.
        noise_multiplier: The Gaussian-equivalent noise multiplier: the released sum's
            noise std over its L2 sensitivity (in grid units).
        scale: s, integer grid steps per payload unit (1 / the quantisation step).
        dim: d, how many payload coordinates a client sends.

    """

    clipping_norm: float
    noise_multiplier: float
    scale: float
    dim: int

    def __post_init__(self) -> None:
        if not (math.isfinite(self.clipping_norm) and self.clipping_norm > 0):
            raise ValueError(f"clipping_norm must be a positive number, got {self.clipping_norm}")
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0):
            raise ValueError(f"noise_multiplier must be a finite number >= 0, got {self.noise_multiplier}")
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"scale must be a positive number, got {self.scale}")
        if self.dim < 1:
            raise ValueError(f"dim must be >= 1, got {self.dim}")

    @property
    def l2_sensitivity(self) -> float:
        """``C s + sqrt(d)``: the largest L2 norm of a clipped, rounded update (grid units)."""
        return self.clipping_norm * self.scale + math.sqrt(self.dim)

    @property
    def l1_sensitivity(self) -> float:
        """``sqrt(d) (C s + sqrt(d))``: the largest L1 norm of a clipped, rounded update.

        The direct bound ``||s y||_1 + d <= C s sqrt(d) + d`` is the same number.
        """
        return math.sqrt(self.dim) * self.l2_sensitivity

    @property
    def variance(self) -> float:
        """``(noise_multiplier x l2_sensitivity)^2``: the released sum's noise variance per coordinate."""
        return (self.noise_multiplier * self.l2_sensitivity) ** 2

    def share_variance(self, cohort: int) -> float:
        """One of ``cohort`` clients' share of :attr:`variance` (the shares add up to it)."""
        if cohort < 1:
            raise ValueError(f"cohort must be >= 1, got {cohort}")
        return self.variance / cohort

    def client_share(self, vector: np.ndarray, cohort: int, rng: np.random.Generator) -> np.ndarray:
        """What one of ``cohort`` clients sends: its clipped, rounded update plus its noise share.

        Args:
            vector: The client's flat update, shape (dim,), payload units.
            cohort: How many clients were sampled this round (each adds a share).
            rng: OS-seeded randomness the server cannot know (rounding and noise).

        Returns:
            int64 array of shape (dim,), grid units.

        """
        flat = np.asarray(vector, dtype=np.float64)
        if flat.shape != (self.dim,):
            raise ValueError(f"vector must have shape ({self.dim},), got {flat.shape}")
        if not np.all(np.isfinite(flat)):
            raise ValueError("vector must be finite")
        norm = float(np.linalg.norm(flat))
        if norm > self.clipping_norm:
            flat = flat * (self.clipping_norm / norm)
        rounded = quantise_stochastic(flat, self.scale, rng)
        return rounded + skellam_noise(self.dim, self.share_variance(cohort), rng)


def skellam_rdp(orders: Sequence[float], variance: float, l2: float, l1: float) -> np.ndarray:
    """Renyi DP of the multidimensional Skellam mechanism at integer ``orders`` > 1.

    The bound of Agarwal et al. (2021) for the multidimensional Skellam mechanism: for
    a shift with L2 norm at most ``l2`` and L1 norm at most ``l1`` and noise of variance
    mu per coordinate (``Poisson(mu / 2) - Poisson(mu / 2)``),

        eps(alpha) <= alpha l2^2 / (2 mu)
                      + min(((2 alpha - 1) l2^2 + 6 l1) / (4 mu^2), 3 l1 / (2 mu)).

    The first term is the Gaussian mechanism's RDP at noise std sqrt(mu); the second
    vanishes relative to it as mu grows, so at a fixed Gaussian-equivalent noise
    multiplier ``sqrt(mu) / l2`` a finer grid (larger ``l2``) approaches the Gaussian.

    Args:
        orders: Integer Renyi orders alpha > 1.
        variance: mu, the released noise variance per coordinate (0: unbounded).
        l2: L2 sensitivity (grid units).
        l1: L1 sensitivity (grid units).

    Returns:
        eps(alpha) per order, float64 (inf everywhere when ``variance`` is 0).

    """
    alpha = np.asarray(orders, dtype=np.float64)
    if alpha.ndim != 1 or np.any(alpha <= 1) or np.any(alpha != np.round(alpha)):
        raise ValueError(f"orders must be integers > 1, got {list(orders)}")
    if variance < 0 or l2 < 0 or l1 < 0:
        raise ValueError(f"variance, l2 and l1 must be >= 0, got {variance}, {l2}, {l1}")
    if variance == 0:
        return np.full(alpha.shape, math.inf)
    mu = variance
    gaussian = alpha * l2**2 / (2 * mu)
    correction = np.minimum(((2 * alpha - 1) * l2**2 + 6 * l1) / (4 * mu**2), 3 * l1 / (2 * mu))
    return gaussian + correction


def clamp_probability(noise: SkellamShare, cohort: int, clipping_range: float) -> float:
    """An upper bound on the chance that the encoder clamps any coordinate of a round's shares.

    Flower's quantiser clamps each coordinate of a client's value to [-R, R]
    (``clipping_range``, payload units) before encoding. A share's coordinate is
    ``u_i + n_i`` with ``|u_i| <= C s + 1`` (clipped, rounded) and ``n_i`` the Skellam
    share, so it is clamped only if ``|n_i| > R s - C s - 1``. A union bound over the
    ``cohort`` clients and ``dim`` coordinates, with the symmetric tail counted twice:
    ``cohort x dim x 2 x P(Sk > R s - C s - 1)`` (capped at 1).

    Without clamps the released sum is exactly the Skellam mechanism; the clamped one
    differs from it only on this event, of probability at most p under any data.

    Args:
        noise: The round's mechanism.
        cohort: How many clients add shares.
        clipping_range: R, payload units.

    Returns:
        The bound p in [0, 1].

    """
    if cohort < 1:
        raise ValueError(f"cohort must be >= 1, got {cohort}")
    if not (math.isfinite(clipping_range) and clipping_range > 0):
        raise ValueError(f"clipping_range must be a positive number, got {clipping_range}")
    threshold = math.floor((clipping_range - noise.clipping_norm) * noise.scale - 1)
    if threshold < 0:
        return 1.0
    rate = noise.share_variance(cohort) / 2
    if rate == 0:
        return 0.0
    tail = float(skellam.sf(threshold, rate, rate))
    return min(1.0, cohort * noise.dim * 2 * tail)


def delta_with_clamps(delta: float, epsilon: float, clamp: float) -> float:
    """The delta of the clamped mechanism, from the un-clamped one's (epsilon, delta).

    If two mechanisms differ only on an event of probability at most p (under every
    dataset), their output distributions are within p in total variation, so for any
    set S: ``P[M'(D) in S] <= P[M(D) in S] + p <= e^eps P[M(D') in S] + delta + p
    <= e^eps P[M'(D') in S] + delta + (1 + e^eps) p``.

    Args:
        delta: The Skellam mechanism's delta at ``epsilon``.
        epsilon: Its epsilon.
        clamp: p, from :func:`clamp_probability` (summed over the rounds composed).

    Returns:
        The delta, capped at 1.

    """
    if clamp == 0:
        return delta
    if epsilon > 700:  # e^eps overflows; no useful delta is left anyway
        return 1.0
    return min(1.0, delta + (1 + math.exp(epsilon)) * clamp)
