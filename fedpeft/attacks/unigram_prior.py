"""The no-gradient baseline for models without a language-model head: frequent words.

``lm_prior`` asks a causal LM what text usually looks like; an encoder classifier
(MiniLM, BERT) has no head to ask. What any party knows without a client's update is
how often each word occurs in public text of the same kind, so this baseline guesses a
batch's tokens as the commonest tokens of a reference corpus. Give it the same budget
the attacks spend (about a sentence's worth of distinct tokens per example) and an
attack is a leak only to the extent it beats this guess.

The default reference is the SST-2 test split shipped with fedpeft: disjoint from the
training split the clients hold, and from the same domain, which makes the baseline
strong rather than weak.
"""

from __future__ import annotations

from collections import Counter

from fedpeft.attacks.base import ATTACKS, Reconstruction
from fedpeft.attacks.observation import Observation
from fedpeft.config import DataConfig
from fedpeft.data.loading import load_text_data
from fedpeft.models import LoadedModel


@ATTACKS.register("unigram_prior")
class UnigramPrior:
    """The ``num_tokens`` commonest non-special tokens of a reference corpus.

    Args:
        num_tokens: How many tokens to guess (give it about 12 per example of the batch:
            an SST-2 sentence has 12 to 15 distinct tokens).
        reference: Public text the adversary knows: a CSV/TSV/JSONL path or
            ``builtin:<file>``, read like ``data.train``.
        text_column: Its text column.

    """

    def __init__(
        self, num_tokens: int = 16, reference: str = "builtin:sst2/test.jsonl", text_column: str = "sentence"
    ) -> None:
        if num_tokens < 1:
            raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
        self.num_tokens = num_tokens
        self.reference = reference
        self.text_column = text_column
        self._counts: dict[str, Counter[int]] = {}

    def reconstruct(self, observation: Observation, target: LoadedModel) -> Reconstruction:
        """Guess the commonest tokens; ``observation.update`` is not read."""
        counts = self._token_counts(target)
        special = set(target.tokenizer.all_special_ids)
        top = [token for token, _ in counts.most_common() if token not in special][: self.num_tokens]
        total = sum(counts.values())
        return Reconstruction(
            tuple(top),
            tuple(-counts[t] / total for t in top),
            (),
            {"reference": self.reference, "reference_tokens": total},
        )

    def _token_counts(self, target: LoadedModel) -> Counter[int]:
        """Token frequencies of the reference under the target's tokenizer (read once)."""
        key = target.tokenizer.name_or_path
        if key not in self._counts:
            data = DataConfig(
                train=self.reference, test=self.reference, text_column=self.text_column, label_column=None
            )
            texts = load_text_data(data).train["text"]
            encoded = target.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
            self._counts[key] = Counter(token for ids in encoded for token in ids)
        return self._counts[key]
