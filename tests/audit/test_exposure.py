import math
import random

import pytest

from fedpeft.audit.exposure import canary_rank, exposure, extrapolated_exposure


def test_exposure_by_hand() -> None:
    # One reference (0.05) is below the canary's 0.1: rank 2 among 5 candidates.
    references = [0.5, 0.2, 0.05, 0.9]
    assert canary_rank(0.1, references) == 2
    assert exposure(0.1, references) == pytest.approx(math.log2(5) - 1)


def test_lowest_loss_has_the_largest_exposure_and_ties_count_against_the_canary() -> None:
    references = [1.0, 2.0, 3.0]
    assert exposure(0.5, references) == pytest.approx(2.0)  # rank 1 of 4
    assert exposure(1.0, references) == pytest.approx(1.0)  # tie with 1.0: rank 2
    assert exposure(5.0, references) == pytest.approx(0.0)  # last
    assert exposure(2.0, [2.0] * 7) == 0.0  # a constant model shows nothing


def test_unmemorised_canary_averages_about_log2_e_bits() -> None:
    rng = random.Random(0)
    values = [exposure(rng.random(), [rng.random() for _ in range(255)]) for _ in range(2000)]
    assert sum(values) / len(values) == pytest.approx(math.log2(math.e), abs=0.1)


def test_extrapolated_exposure_reads_the_normal_tail() -> None:
    references = [0.0, 1.0, 2.0]  # mean 1, standard deviation 1
    # 1.6449 standard deviations below the mean: tail 5 %, exposure log2(20).
    assert extrapolated_exposure(1 - 1.6448536, references) == pytest.approx(math.log2(20), rel=1e-5)
    assert extrapolated_exposure(1.0, references) == pytest.approx(1.0)
    # Beyond float range of the CDF the asymptote keeps it finite and increasing.
    far, farther = extrapolated_exposure(-45.0, references), extrapolated_exposure(-60.0, references)
    assert math.isfinite(far) and farther > far > extrapolated_exposure(-30.0, references)


def test_bad_inputs_fail_clearly() -> None:
    with pytest.raises(ValueError, match="at least one"):
        exposure(0.1, [])
    with pytest.raises(ValueError, match="NaN"):
        exposure(float("nan"), [1.0])
    with pytest.raises(ValueError, match="same loss"):
        extrapolated_exposure(0.1, [1.0, 1.0])
