"""Norm clipping keeps its bound in every dtype: DP's sensitivity rests on it."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedpeft.aggregation import ClientUpdate
from fedpeft.aggregation._math import clip_update_norm, update_norm
from fedpeft.config import ClientPrivacyConfig
from fedpeft.privacy.central import noisy_mean

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@settings(max_examples=400, deadline=None)
@given(
    dtype=st.sampled_from(DTYPES),
    log_scale=st.floats(min_value=-3, max_value=3),
    max_norm=st.floats(min_value=1e-3, max_value=1e3),
    sizes=st.lists(st.integers(min_value=1, max_value=300), min_size=1, max_size=3),
    seed=st.integers(min_value=0, max_value=2**31 - 1),
)
def test_a_clipped_update_is_within_the_bound_in_its_own_dtype(
    dtype: torch.dtype, log_scale: float, max_norm: float, sizes: list[int], seed: int
) -> None:
    generator = torch.Generator().manual_seed(seed)
    scale = 10.0**log_scale
    delta = {f"t{i}": (torch.randn(n, generator=generator) * scale).to(dtype) for i, n in enumerate(sizes)}
    clipped = clip_update_norm(delta, max_norm)
    assert all(clipped[name].dtype == dtype for name in delta)
    assert update_norm(clipped) <= max_norm
    if update_norm(delta) > max_norm:  # clipped, not zeroed: the margin costs at most a few ulps
        assert update_norm(clipped) >= max_norm * (1 - 4 * torch.finfo(dtype).eps)


def test_the_reviewed_bfloat16_overshoot_is_gone() -> None:
    # Before: the float64 scale, rounded back to bfloat16, left norms up to 1.0006 for C = 1.
    overshoots = 0
    for seed in range(200):
        delta = {"w": torch.randn(64, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16) * 5}
        overshoots += update_norm(clip_update_norm(delta, 1.0)) > 1.0
    assert overshoots == 0


def test_noisy_mean_sums_clipped_updates_in_float64() -> None:
    # One update of 1 and 4096 of 1e-8: a float32 running sum stays at 1 (1e-8 is below
    # half an ulp of 1), the float64 sum keeps the 4.096e-5 the small ones add.
    updates = [ClientUpdate(0, {"w": torch.tensor([1.0])}, 1)]
    updates += [ClientUpdate(i, {"w": torch.tensor([1e-8])}, 1) for i in range(1, 4097)]
    config = ClientPrivacyConfig(enabled=True, clipping_norm=1.0, noise_multiplier=0.0)
    mean, _ = noisy_mean(updates, 1.0, config)
    assert abs(float(mean.delta["w"]) - (1 + 4096e-8)) < 1e-6
