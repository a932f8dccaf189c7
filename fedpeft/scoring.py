"""Scores of generated responses against references: what a task counts as right.

``exact_match`` compares final answers: the text after the last ``####`` when the
reference has one (GSM8K's worked solutions end in ``#### 72``), else the whole
response, both normalised (case, spaces, commas in numbers, a trailing period).
With a ``####`` in the references, ``exact_match`` comes with ``final_answer_rate``: the
share of answers that end in a final answer at all (a small model fine-tuned for a few
rounds learns the format long before it solves the problems).
``label`` asks which label word the answer names first (a classification posed as a
question answered by a label word). ``rouge_l`` is the
ROUGE-L F-measure (Lin, 2004) of Google's ``rouge-score``, as the attacks report it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

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


def gives_final_answer(generated: str, reference: str) -> float | None:
    """1.0 when an answer ends in ``#### something``; None when the reference has no mark."""
    if _FINAL_MARK not in reference:
        return None
    return float(_FINAL_MARK in generated and bool(final_answer(generated)))


def label_match(generated: str, reference: str, choices: Sequence[str] = ()) -> float:
    """1.0 when the answer names the reference label.

    With the task's label words (``choices``), the label named first in the answer is
    its answer ("The sentiment is positive." answers positive); without them, the
    answer must start with the reference's words.
    """
    words, label = _WORD.findall(generated.lower()), _WORD.findall(reference.lower())
    if not choices:
        return float(bool(words) and words[: len(label)] == label)
    options = {tuple(_WORD.findall(choice.lower())) for choice in choices} | {tuple(label)}
    for start in range(len(words)):
        named = [o for o in options if o and tuple(words[start : start + len(o)]) == o]
        if named:
            return float(max(named, key=len) == tuple(label))
    return 0.0


def rouge_l(generated: str, reference: str) -> float:
    """ROUGE-L F-measure of ``generated`` against ``reference`` (no stemming)."""
    return float(_ROUGE_L.score(reference, generated)["rougeL"].fmeasure)


def make_scorer(name: str, choices: Sequence[str] = ()) -> Callable[[str, str], float]:
    """``(generated, reference) -> score in [0, 1]`` for ``data.instruction.scorer`` ``name``.

    ``choices`` are the task's label words (``value_words``), which ``label`` reads.
    """
    if name == "label":
        return lambda generated, reference: label_match(generated, reference, choices)
    return {"exact_match": exact_match, "rouge_l": rouge_l}[name]
