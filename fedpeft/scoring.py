"""Scores of generated responses against references: what a task counts as right.

``exact_match`` compares final answers: the text after the last ``####`` when the
reference has one (GSM8K's worked solutions end in ``#### 72``), else the whole
response, both normalised (case, spaces, commas in numbers, a trailing period).
``label`` asks whether the response starts with the reference's words (a
classification posed as a question answered by a label word). ``rouge_l`` is the
ROUGE-L F-measure (Lin, 2004) of Google's ``rouge-score``, as the attacks report it.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from rouge_score import rouge_scorer

_FINAL_MARK = "####"
_WORD = re.compile(r"[\w'-]+")
_ROUGE_L = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def final_answer(text: str) -> str:
    """The answer after the last ``####`` (or the text), normalised for comparison."""
    if _FINAL_MARK in text:
        text = text.rsplit(_FINAL_MARK, 1)[1]
    text = text.strip().lower().rstrip(".")
    text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text)  # 1,000 -> 1000
    return " ".join(text.split())


def exact_match(generated: str, reference: str) -> float:
    """1.0 when the final answers agree (the reference's mark decides what is compared)."""
    if _FINAL_MARK in reference and _FINAL_MARK not in generated:
        return 0.0
    return float(final_answer(generated) == final_answer(reference))


def label_match(generated: str, reference: str) -> float:
    """1.0 when the response starts with the reference label's words."""
    words, label = _WORD.findall(generated.lower()), _WORD.findall(reference.lower())
    return float(bool(words) and words[: len(label)] == label)


def rouge_l(generated: str, reference: str) -> float:
    """ROUGE-L F-measure of ``generated`` against ``reference`` (no stemming)."""
    return float(_ROUGE_L.score(reference, generated)["rougeL"].fmeasure)


SCORERS: dict[str, Callable[[str, str], float]] = {
    "exact_match": exact_match,
    "label": label_match,
    "rouge_l": rouge_l,
}
"""Scorer name (``data.instruction.scorer``) -> per-example score in [0, 1]."""
