import math
import random

import pytest
from scipy.stats import binom

from fedpeft.audit.one_run import (
    correct_guesses,
    default_guess_counts,
    epsilon_for,
    epsilon_lower_bound,
    p_value,
)


def test_p_value_without_delta_is_the_binomial_tail() -> None:
    q = 1 / (1 + math.exp(-1.0))
    assert p_value(100, 20, 15, 1.0, 0.0) == pytest.approx(binom.sf(14, 20, q))


def test_delta_term_by_hand() -> None:
    # r = 2, v = 1 at eps 0 (p = 1/2): tail P[B >= 1] = 3/4, window max_i P[1-i <= B < 1]/i = P[B=0] = 1/4.
    assert p_value(10, 2, 1, 0.0, 0.01) == pytest.approx(0.75 + 2 * 10 * 0.01 * 0.25)


def test_all_correct_guesses_by_hand() -> None:
    # 100 of 100 right: p^100 = 0.05 at the bound, so eps = log(p / (1 - p)) with p = 0.05^(1/100).
    p = 0.05 ** (1 / 100)
    assert epsilon_for(1000, 100, 100, 0.0, 0.05) == pytest.approx(math.log(p / (1 - p)), abs=1e-3)


def test_delta_and_fewer_correct_guesses_lower_the_bound() -> None:
    exact = epsilon_for(1000, 100, 100, 0.0, 0.05)
    assert epsilon_for(1000, 100, 100, 1e-4, 0.05) < exact
    assert epsilon_for(1000, 100, 90, 0.0, 0.05) < exact
    assert epsilon_for(1000, 100, 50, 0.0, 0.05) == 0.0  # chance proves nothing


def test_correct_guesses() -> None:
    scores = [0.9, 0.1, 0.8, 0.2, 0.5]
    included = [True, False, False, False, True]
    # Highest two (0.9, 0.8) say in: one right; lowest two (0.1, 0.2) say out: both right.
    assert correct_guesses(scores, included, 2, 2) == 3
    with pytest.raises(ValueError, match="guesses"):
        correct_guesses(scores, included, 3, 3)


def test_perfect_scores_give_a_large_bound_and_random_scores_none() -> None:
    rng = random.Random(0)
    included = [rng.random() < 0.5 for _ in range(1000)]
    perfect = epsilon_lower_bound([float(x) for x in included], included, delta=1e-5)
    assert perfect.epsilon > 4 and perfect.correct == perfect.k_plus + perfect.k_minus
    assert perfect.pairs_tried == len(default_guess_counts(1000))
    noise = epsilon_lower_bound([rng.random() for _ in included], included, delta=1e-5)
    assert noise.epsilon < 0.5


def test_trying_more_pairs_costs_confidence() -> None:
    included = [i % 2 == 0 for i in range(200)]
    scores = [float(x) + 0.001 * i for i, x in enumerate(included)]
    one = epsilon_lower_bound(scores, included, 0.0, guess_counts=[(20, 20)])
    many = epsilon_lower_bound(scores, included, 0.0, guess_counts=[(20, 20)] * 10)
    assert many.epsilon < one.epsilon


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="v <= r <= m"):
        p_value(10, 5, 6, 1.0, 0.0)
    with pytest.raises(ValueError, match="inclusion flags"):
        epsilon_lower_bound([1.0], [True, False], 0.0)
