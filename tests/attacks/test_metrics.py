import pytest

from fedpeft.attacks.metrics import (
    best_match_rouge,
    exact_sequence_rate,
    pii_recovery_rate,
    token_precision_recall,
)


def test_token_precision_recall_by_hand() -> None:
    # recovered {1, 2, 3, 9}, truth {1, 2, 4, 5, 6}; 0 is padding and counts nowhere
    precision, recall = token_precision_recall([1, 2, 3, 9, 0, 0], [1, 2, 4, 5, 6, 0], ignore={0})
    assert precision == pytest.approx(2 / 4)
    assert recall == pytest.approx(2 / 5)


def test_rouge_by_hand() -> None:
    # unigrams: 5 of 5 recovered are right, 5 of 6 true found: F1 = 10/11
    # bigrams: 3 of 4 right, 3 of 5 found: F1 = 2/3; LCS 5: F1 = 10/11
    scores = best_match_rouge(["the cat on the mat"], ["the cat sat on the mat"])
    assert scores["rouge1"] == pytest.approx(10 / 11)
    assert scores["rouge2"] == pytest.approx(2 / 3)
    assert scores["rougeL"] == pytest.approx(10 / 11)


def test_rouge_takes_the_best_match_per_reference_and_averages() -> None:
    scores = best_match_rouge(
        ["dogs bark", "the cat sat on the mat"], ["the cat sat on the mat", "birds sing"]
    )
    assert scores["rouge1"] == pytest.approx((1.0 + 0.0) / 2)
    assert best_match_rouge([], ["anything"])["rougeL"] == 0.0


def test_exact_sequence_rate_ignores_special_tokens() -> None:
    truth = [[101, 5, 6, 7, 102], [101, 8, 9, 102]]
    assert exact_sequence_rate([[5, 6, 7], [8, 9, 10]], truth, ignore={101, 102}) == 0.5
    assert exact_sequence_rate([], truth) == 0.0


def test_pii_recovery_ignores_case_and_spacing() -> None:
    text = ["my mail is john . doe @ example . com and my phone 555 - 0142"]
    assert pii_recovery_rate(text, ["John.Doe@example.com", "555-0142", "DE44 5001 0517"]) == pytest.approx(
        2 / 3
    )
    assert pii_recovery_rate(text, []) is None
