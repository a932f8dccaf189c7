import math
import random

import numpy as np
import pytest

from fedpeft.audit.membership import (
    lira_scores,
    logit_confidence,
    roc_auc,
    roc_curve,
    tpr_at_fpr,
    tpr_p_value,
)


def test_auc_by_hand() -> None:
    # Members 0.9 and 0.7, non-members 0.8 and 0.6: 3 of the 4 pairs are ordered right.
    assert roc_auc([0.9, 0.8, 0.7, 0.6], [True, False, True, False]) == pytest.approx(0.75)
    assert roc_auc([1.0, 1.0], [True, False]) == pytest.approx(0.5)  # a tie is half right
    assert roc_auc([0.0, 1.0], [True, False]) == 0.0


def test_auc_is_the_mann_whitney_statistic() -> None:
    rng = random.Random(1)
    scores = [round(rng.gauss(0, 1), 1) for _ in range(200)]  # rounded: many ties
    members = [rng.random() < 0.4 for _ in scores]
    pos = [s for s, m in zip(scores, members, strict=True) if m]
    neg = [s for s, m in zip(scores, members, strict=True) if not m]
    expected = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg) / (len(pos) * len(neg))
    assert roc_auc(scores, members) == pytest.approx(expected)


def test_roc_curve_and_tpr_at_low_fpr_by_hand() -> None:
    scores, members = [5, 4, 3, 2, 1], [True, True, False, True, False]
    curve = roc_curve(scores, members)
    assert curve.fpr == [0.0, 0.0, 0.0, 0.5, 0.5, 1.0]
    assert curve.tpr == pytest.approx([0.0, 1 / 3, 2 / 3, 2 / 3, 1.0, 1.0])
    assert tpr_at_fpr(scores, members, 0.001) == pytest.approx(2 / 3)
    assert tpr_at_fpr(scores, members, 0.5) == 1.0


def test_roc_needs_both_classes() -> None:
    with pytest.raises(ValueError, match="one member and one non-member"):
        roc_auc([1.0, 2.0], [True, True])
    with pytest.raises(ValueError, match="labels"):
        roc_auc([1.0], [True, False])


def test_logit_confidence() -> None:
    phi = logit_confidence([math.log(2), -math.log(0.9), 50.0, 1e-9])
    assert phi[0] == pytest.approx(0.0, abs=1e-12)
    assert phi[1] == pytest.approx(math.log(9))
    assert phi[2] == pytest.approx(-50.0)  # p = e^-50: logit ~ log p
    assert phi[3] == pytest.approx(-math.log(1e-9), rel=1e-6)  # p ~ 1 - 1e-9


def test_lira_by_hand() -> None:
    # Two examples, two complementary shadows; losses chosen so phi is easy: loss ln 2 -> 0.
    half = math.log(2)
    low = -math.log(0.9)  # phi = ln 9
    shadow_losses = [[low, half], [half, low]]
    included = [[True, False], [False, True]]
    # mu_in = ln 9 and mu_out = 0 for both examples; residuals are 0, so std = min_std.
    scores = lira_scores([low, half], shadow_losses, included, min_std=1.0)
    a = math.log(9)
    assert scores.online[0] == pytest.approx(0.0 - (-0.5 * a * a))  # at mu_in
    assert scores.online[1] == pytest.approx(-0.5 * a * a)  # at mu_out
    assert scores.offline == pytest.approx([a, 0.0])


def test_lira_separates_members_on_synthetic_shadows() -> None:
    rng = np.random.default_rng(0)
    n, shadows = 400, 8
    difficulty = rng.normal(0, 2, n)  # per-example offsets the loss attack cannot remove
    member = rng.random(n) < 0.5
    inside = rng.random((shadows, n)) < 0.5

    def loss(is_in: np.ndarray) -> np.ndarray:
        phi = difficulty + 1.0 * is_in + rng.normal(0, 0.3, is_in.shape)
        return -np.log(1 / (1 + np.exp(-phi)))  # loss with logit(p) = phi

    target = loss(member)
    lira = lira_scores(target, loss(inside), inside)
    assert roc_auc(lira.online, member.tolist()) > 0.9
    assert roc_auc(lira.offline, member.tolist()) > 0.85
    assert roc_auc((-target).tolist(), member.tolist()) < 0.75  # difficulty hides the loss signal


def test_lira_shapes_are_checked() -> None:
    with pytest.raises(ValueError, match="shapes"):
        lira_scores([0.1, 0.2], [[0.1]], [[True]])
    with pytest.raises(ValueError, match=r"shapes|at least one"):
        lira_scores([0.1], np.zeros((0, 1)), np.zeros((0, 1), dtype=bool))


def test_tpr_p_value_by_hand_and_by_simulation() -> None:
    # 6 of 195 members above the 3rd of 205 non-members (1 % FPR allows 2): at least 6
    # members among the first 8 of 400 scores.
    by_hand = sum(math.comb(195, k) * math.comb(205, 8 - k) for k in range(6, 9)) / math.comb(400, 8)
    assert tpr_p_value(6 / 195, 195, 205, 0.01) == pytest.approx(by_hand, rel=1e-9)
    assert 0.1 < by_hand < 0.15
    assert tpr_p_value(0.0, 195, 205, 0.01) == 1.0
    # A scorer that knows nothing: the fraction of runs reaching 6 members matches.
    rng = random.Random(0)
    labels = [True] * 195 + [False] * 205
    hits = 0
    for _ in range(2000):
        scores = [rng.random() for _ in labels]
        hits += tpr_at_fpr(scores, labels, 0.01) >= 6 / 195 - 1e-12
    assert hits / 2000 == pytest.approx(by_hand, abs=0.025)
