"""How much of a batch an attack recovered.

ROUGE, token precision and recall, exact sequences and planted secrets (PII).

Ground truth enters fedpeft's attack code here and nowhere else.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass

from rouge_score import rouge_scorer
from transformers import PreTrainedTokenizerBase

from fedpeft.attacks.base import Reconstruction

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


@dataclass(frozen=True)
class LeakageMetrics:
    """Recovery of one batch.

    Attributes:
        rouge1, rouge2, rougeL: F1, averaged over the true sequences, each scored
            against the recovered sequence that matches it best.
        token_precision, token_recall: Of the distinct recovered / true tokens.
        exact_sequence_rate: Fraction of true sequences recovered token for token.
        pii_recovery_rate: Fraction of planted secrets found verbatim in the
            recovered text (None when no secret was planted).

    """

    rouge1: float
    rouge2: float
    rougeL: float
    token_precision: float
    token_recall: float
    exact_sequence_rate: float
    pii_recovery_rate: float | None


def token_precision_recall(
    recovered: Iterable[int], truth: Iterable[int], ignore: Collection[int] = ()
) -> tuple[float, float]:
    """Precision and recall of the distinct recovered tokens against the true ones.

    Tokens in ``ignore`` (padding, special tokens) count on neither side. An empty
    recovery has precision 1 (it claims nothing false); an empty truth, recall 1.
    """
    found = set(recovered) - set(ignore)
    true = set(truth) - set(ignore)
    hits = len(found & true)
    precision = hits / len(found) if found else 1.0
    recall = hits / len(true) if true else 1.0
    return precision, recall


def best_match_rouge(recovered: Sequence[str], truth: Sequence[str]) -> dict[str, float]:
    """Mean over ``truth`` of each text's best ROUGE F1 against any recovered text.

    A best match per reference, per ROUGE type, as in LAMP's evaluation of batches;
    an empty recovery scores 0.
    """
    if not truth:
        raise ValueError("no true text to score against")
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=False)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for reference in truth:
        scores = [scorer.score(reference, candidate) for candidate in recovered]
        for kind in ROUGE_TYPES:
            totals[kind] += max((s[kind].fmeasure for s in scores), default=0.0)
    return {kind: total / len(truth) for kind, total in totals.items()}


def exact_sequence_rate(
    recovered: Iterable[Sequence[int]], truth: Sequence[Sequence[int]], ignore: Collection[int] = ()
) -> float:
    """Fraction of true sequences (``ignore`` tokens dropped) among the recovered ones."""
    if not truth:
        raise ValueError("no true sequence to score against")

    def strip(sequence: Sequence[int]) -> tuple[int, ...]:
        return tuple(t for t in sequence if t not in ignore)

    found = {strip(s) for s in recovered}
    return sum(strip(s) in found for s in truth) / len(truth)


def _squash(text: str) -> str:
    return re.sub(r"\s+", "", text).lower()


def secrets_found(texts: Iterable[str], secrets: Sequence[str]) -> list[str]:
    """The ``secrets`` that occur verbatim (case and spacing aside) in ``texts``.

    Spacing is ignored because detokenisers differ in where they put it
    (``john . doe @ mail . com`` is the same secret).
    """
    haystack = "\n".join(_squash(text) for text in texts)
    return [secret for secret in secrets if _squash(secret) in haystack]


def pii_recovery_rate(recovered_text: Iterable[str], secrets: Sequence[str]) -> float | None:
    """Fraction of ``secrets`` found in the recovered text (:func:`secrets_found`); None without secrets."""
    if not secrets:
        return None
    return len(secrets_found(recovered_text, secrets)) / len(secrets)


def score_reconstruction(
    reconstruction: Reconstruction,
    true_sequences: Sequence[Sequence[int]],
    tokenizer: PreTrainedTokenizerBase,
    secrets: Sequence[str] = (),
) -> LeakageMetrics:
    """Every metric of one reconstruction against the batch it came from.

    Special tokens (padding, [CLS], BOS, ...) count nowhere. A reconstruction without
    sequences (a token-set attack) is scored as one bag of its tokens in confidence
    order: ROUGE-1 is then meaningful, ROUGE-2/L and the secrets only by chance.
    """
    ignore = set(tokenizer.all_special_ids)
    true_tokens = [t for sequence in true_sequences for t in sequence]
    precision, recall = token_precision_recall(reconstruction.token_ids, true_tokens, ignore)
    candidates = reconstruction.sequences or (reconstruction.token_ids,)
    recovered_text = [str(tokenizer.decode(list(s), skip_special_tokens=True)) for s in candidates]
    true_text = [str(tokenizer.decode(list(s), skip_special_tokens=True)) for s in true_sequences]
    rouge = best_match_rouge(recovered_text, true_text)
    return LeakageMetrics(
        rouge1=rouge["rouge1"],
        rouge2=rouge["rouge2"],
        rougeL=rouge["rougeL"],
        token_precision=precision,
        token_recall=recall,
        exact_sequence_rate=exact_sequence_rate(reconstruction.sequences, true_sequences, ignore),
        pii_recovery_rate=pii_recovery_rate(recovered_text, secrets),
    )
