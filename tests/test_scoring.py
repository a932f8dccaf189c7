"""Scorers of generated answers: each against values worked out by hand."""

import pytest

from fedpeft.scoring import exact_match, final_answer, gives_final_answer, label_match, rouge_l


def test_exact_match_compares_gsm8k_final_answers() -> None:
    reference = "Natalia sold 48/2 = 24 clips in May.\n#### 72"
    assert exact_match("48 + 24 = 72 in all.\n#### 72", reference) == 1.0
    assert exact_match("#### 1,072", "#### 1072") == 1.0  # thousands separators
    assert exact_match("#### 71", reference) == 0.0
    # The reference marks its answer: an answer without the mark has none to compare.
    assert exact_match("72", reference) == 0.0
    assert exact_match("Paris.", "paris") == 1.0  # no mark: the whole, normalised
    assert final_answer("  The  Answer \n") == "the answer"


def test_a_final_answer_is_given_when_a_marked_answer_ends_in_one() -> None:
    reference = "48 / 2 = 24\n#### 72"
    assert gives_final_answer("So 70 in all.\n#### 70", reference) == 1.0  # given, though wrong
    assert gives_final_answer("So 72 in all.", reference) == 0.0
    assert gives_final_answer("So 72 in all.\n####  ", reference) == 0.0  # a mark with nothing after
    assert gives_final_answer("#### 72", "72") is None  # the task has no marked answers


def test_label_match_takes_the_label_the_answer_names_first() -> None:
    choices = ["positive", "negative"]
    assert label_match("The sentiment of this review is positive.", "positive", choices) == 1.0
    assert label_match("Not positive: negative overall.", "negative", choices) == 0.0  # names positive first
    assert label_match("It is negative, not positive.", "negative", choices) == 1.0
    assert label_match("No idea.", "negative", choices) == 0.0
    # The longest label wins where labels overlap ("very good" before "good").
    assert label_match("It was very good", "very good", ["good", "very good"]) == 1.0
    assert label_match("It was very good", "good", ["good", "very good"]) == 0.0


def test_label_match_without_label_words_reads_the_first_words() -> None:
    assert label_match("Positive. The review praises it.", "positive") == 1.0
    assert label_match("negative", "positive") == 0.0
    assert label_match("", "positive") == 0.0
    assert label_match("sci/tech news", "Sci/Tech") == 1.0
    assert label_match("sci", "Sci/Tech") == 0.0


@pytest.mark.parametrize(
    ("generated", "reference", "expected"),
    [
        ("the cat sat on the mat", "the cat sat on the mat", 1.0),
        # LCS "the cat the mat" = 4 of 6 generated and 4 of 5 reference words.
        ("the cat was on the mat", "the cat lay the mat", 2 * (4 / 6) * (4 / 5) / (4 / 6 + 4 / 5)),
        ("dogs bark", "the cat sat", 0.0),
        ("The Cat!", "the cat", 1.0),  # case and punctuation do not count
        ("", "something", 0.0),
    ],
)
def test_rouge_l_is_the_lcs_f_measure_over_words(generated, reference, expected) -> None:
    assert rouge_l(generated, reference) == pytest.approx(expected)
