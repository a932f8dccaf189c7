"""Sentence peeling: token pairing past the rank, one sentence of the batch at a time.

A layer's LoRA A gradient rows are combinations of the layer's inputs at every position
of the batch. Past the stacked rank (24 for r = 8 on q/k/v) they combine more inputs
than they have rows, so the input of a true prefix is only *closer* to their span than
a wrong one, not in it: on SmolLM2 at batch 4 the true next token ranks first at 58 %
and 83 % of steps (two clients, the middle layers' relative distance).

Were every other sentence of the batch known, projecting their inputs out of the rows
would leave combinations of one sentence's inputs alone: fewer than the rank, so the
span is exact again, and the true next token ranks first at every step (of every
sentence of the same clients). The peeling gets there by alternating:

1. **Peel.** The likeliest start token (its input at position 0 of the early layers,
   scored against the rows with the sentences found so far projected out) is grown
   greedily to ``max_length`` or until nothing is left to explain, with its own prefix
   projected out as it grows (so a sentence longer than the rank comes within it once
   its first part is read), and its inputs are projected out in turn; until the rows
   are explained, or no start is closer than ``start_ratio``.
2. **Sweep.** Each sentence is grown again from its start with every other sentence
   projected out. Wrong tokens in the others cost little (their inputs remove a few of
   the 576 dimensions); a true one missing leaves the span inexact. That is why the peel
   grows past where it is sure, and why only the output is trimmed.
3. **Trim.** Each sentence ends at its last step whose extension was closer than
   ``pairing_ratio``. The last token of a sentence never reaches a gradient (it predicts
   nothing), so it is not recovered.

fedpeft's own method (the ReCIT paper pairs tokens at the second layer); its steps are
the ones a rank-deficient simultaneous pursuit suggests, with prefixes as atoms.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from fedpeft.attacks.progress import heartbeat
from fedpeft.attacks.second_layer import PrefixLayers
from fedpeft.attacks.sequence_assembly import repeats_its_only_token
from fedpeft.attacks.span import distance_to_span


class ProjectedSpans:
    """Each layer's gradient rows, with the inputs of the sentences taken as known projected out.

    Args:
        rows: Per layer, the ``(m, d)`` stacked LoRA A gradient rows.
        known: Per known sentence, per layer, its ``(length, d)`` inputs.
        rank_tolerance: Relative singular-value cut-off of the spans.
        layers: The layers (indices into ``rows``) to project and score; default all.

    """

    def __init__(
        self,
        rows: Sequence[Tensor],
        known: Sequence[tuple[Tensor, ...]],
        rank_tolerance: float,
        layers: Sequence[int] | None = None,
    ) -> None:
        self.layers = range(len(rows)) if layers is None else layers
        self._known: dict[int, Tensor] = {}
        self._bases: dict[int, Tensor] = {}
        left = 0.0
        for layer in self.layers:
            layer_rows = rows[layer]
            states = [sentence[layer] for sentence in known]
            basis = _orthonormal(torch.cat(states)) if states else layer_rows.new_zeros(len(layer_rows.T), 0)
            residual = layer_rows - (layer_rows @ basis) @ basis.T
            self._known[layer] = basis
            # Ranked against the rows themselves, not against what is left: rows the
            # known sentences explain whole leave rounding noise, which spans nothing.
            self._bases[layer] = _orthonormal(residual, rank_tolerance, reference=layer_rows)
            left += float(residual.norm() / layer_rows.norm().clamp_min(1e-300))
        self.unexplained = left / len(self.layers)
        """Mean over the layers of ``||rows left|| / ||rows||`` (0: the known sentences make up the rows)."""

    def relative_distance(self, inputs: Sequence[Tensor]) -> Tensor:
        """Each candidate's distance to what is left of the span, relative to the candidates' median.

        Averaged over the spans' layers (``inputs`` holds every layer's): 0 where the
        spans are exact and hold the candidate, about 1 for a wrong one.
        """
        total = torch.zeros(inputs[0].shape[0], dtype=torch.float64)
        for layer in self.layers:
            distances = self.distance(layer, inputs[layer])
            total += distances / distances.median().clamp_min(1e-12)
        return total / len(self.layers)

    def distance(self, layer: int, inputs: Tensor) -> Tensor:
        """``(n,)`` distance of each input's unexplained part to what is left of ``layer``'s span.

        An input the known sentences explain whole (a start token they share) has no
        unexplained part, and gets 1 like any vector that tells nothing.
        """
        known = self._known[layer]
        left = inputs - (inputs @ known) @ known.T
        unexplained = left.norm(dim=1) > 1e-6 * inputs.norm(dim=1)
        return torch.where(
            unexplained, distance_to_span(self._bases[layer], left), torch.ones_like(left[:, 0])
        )


@dataclass(frozen=True)
class SentencePeeling:
    """Sentences of a batch from its token set and the A gradients of a decoder's layers.

    Attributes:
        start_ratio: A start is taken while its relative distance is below this
            (SmolLM2 at batch 4, nothing known yet: true starts 0.19-0.79, the closest
            wrong ones 0.71-0.79; each sentence projected out brings the rest closer).
        pairing_ratio: A sentence ends after its last extension closer than this.
        sweeps: Rounds of growing every sentence again with the others projected out.
        max_sentences: Most sentences peeled.
        max_length: Tokens each sentence is grown to.
        lm_weight: Weight of the model's negative log-likelihood against the relative
            distance when choosing an extension (a tie-breaker).
        explained: Peeling stops once the rows left are below this share of the rows
            (float32 gradients leave ~1e-6 once every sentence is known; a short
            sentence can make up as little as 2 % of the rows).
        max_branch: Longest first part a new sentence may share with one found already.
            1 (the default) covers [CLS] and BOS; templated text needs more, at a risk:
            on a planted message at batch 1, 8 grew a wrong second sentence off the
            first one's opening, and the sweep then spoiled the first (ROUGE-1 0.60,
            against 0.88 with 1).
        rank_tolerance: Relative singular-value cut-off of the spans.

    """

    start_ratio: float = 0.7
    pairing_ratio: float = 0.3
    sweeps: int = 2
    max_sentences: int = 16
    max_length: int = 64
    lm_weight: float = 0.02
    explained: float = 1e-3
    max_branch: int = 1
    rank_tolerance: float = 1e-5

    def __post_init__(self) -> None:
        for name in ("start_ratio", "pairing_ratio", "explained"):
            if not 0 < getattr(self, name) < 1:
                raise ValueError(f"{name} must be in (0, 1), got {getattr(self, name)}")
        if (
            min(self.sweeps, self.max_branch, self.lm_weight) < 0
            or min(self.max_sentences, self.max_length) < 1
        ):
            raise ValueError(
                "sweeps, max_branch and lm_weight must be >= 0, max_sentences and max_length >= 1; got "
                f"{self.sweeps}, {self.max_branch}, {self.lm_weight}, {self.max_sentences}, {self.max_length}"
            )

    def sentences(
        self, layers: PrefixLayers, gradients: dict[str, Tensor], tokens: Sequence[int]
    ) -> list[tuple[int, ...]]:
        """The batch's sentences, in the order they were peeled (none shorter than two tokens).

        Args:
            layers: The layers read, shallow to deep: starts are scored with the first
                half of them, extensions with the second (both halves hold the middle
                one; a single layer serves both).
            gradients: The observed adapter gradients, by adapter-state name.
            tokens: The batch's token set (the filter's output).

        """
        count = len(layers.layers)
        early, late = range((count + 1) // 2), range(count // 2, count)
        rows = layers.rows(gradients)
        vocabulary = torch.tensor(list(tokens), dtype=torch.long)
        starts: list[tuple[int, ...]] = []
        grown: list[tuple[int, ...]] = []
        closeness: list[list[float]] = []  # each sentence's extensions, from its last growth
        inputs: list[tuple[Tensor, ...]] = []
        while len(grown) < self.max_sentences:
            spans = ProjectedSpans(rows, inputs, self.rank_tolerance, early)
            if spans.unexplained < self.explained:
                break
            start = self._start(layers, spans, vocabulary, grown)
            if start is None:
                break
            heartbeat("peeling: growing sentence %d of at most %d", len(grown) + 1, self.max_sentences)
            sentence, steps = self._grow(layers, rows, inputs, vocabulary, start, late)
            starts.append(start)
            grown.append(sentence)
            closeness.append(steps)
            inputs.append(layers.sentence(torch.tensor(sentence)))
        for sweep in range(self.sweeps if len(grown) > 1 else 0):
            changed = False
            for i, sentence in enumerate(grown):
                heartbeat("peeling: sweep %d, sentence %d of %d", sweep + 1, i + 1, len(grown))
                # The first tokens it shares with another sentence are explained by that
                # one's inputs, so they cannot be checked: it grows again after them.
                shared = max(_common_prefix(sentence, other) for j, other in enumerate(grown) if j != i)
                starts[i] = sentence[: max(len(starts[i]), shared)]
                others = inputs[:i] + inputs[i + 1 :]
                grown[i], closeness[i] = self._grow(layers, rows, others, vocabulary, starts[i], late)
                if grown[i] != sentence:
                    changed = True
                    inputs[i] = layers.sentence(torch.tensor(grown[i]))
            if not changed:
                break
        trimmed = [
            self._trim(sentence, len(start), steps)
            for start, sentence, steps in zip(starts, grown, closeness, strict=True)
        ]
        return [sentence for sentence in trimmed if len(sentence) > 1]  # a start alone orders nothing

    def _start(
        self, layers: PrefixLayers, spans: ProjectedSpans, vocabulary: Tensor, grown: list[tuple[int, ...]]
    ) -> tuple[int, ...] | None:
        """The prefix likeliest to open a sentence not found yet, if one is closer than ``start_ratio``.

        A new start token, or a branch off a sentence found already: its first ``k``
        tokens (``k`` up to ``max_branch``) and another next token. Tokenizers that
        open every sentence with [CLS] or BOS, and templated text ("Hello, my name
        is ..."), make sentences share their first tokens, whose inputs the first
        sentence found explains whole.
        """
        taken = {sentence[0] for sentence in grown}
        candidates: list[tuple[int, ...]] = [(token,) for token in vocabulary.tolist() if token not in taken]
        relative = [self._relative_at(layers, spans, candidates)] if candidates else []
        branch_points = {
            sentence[:k] for sentence in grown for k in range(1, min(len(sentence), self.max_branch + 1))
        }
        for prefix in sorted(branch_points):
            view, _ = layers.extensions(torch.tensor(prefix), vocabulary)
            candidates += [(*prefix, token) for token in vocabulary.tolist()]
            relative.append(spans.relative_distance(view.layer_inputs))
        if not candidates:
            return None
        closeness = torch.cat(relative)
        best = int(closeness.argmin())
        return candidates[best] if closeness[best] < self.start_ratio else None

    @staticmethod
    def _relative_at(
        layers: PrefixLayers, spans: ProjectedSpans, prefixes: Sequence[tuple[int, ...]]
    ) -> Tensor:
        """Relative distance of equally long ``prefixes`` at their last position (against each other)."""
        return spans.relative_distance(layers.last_position(torch.tensor(prefixes)).layer_inputs)

    def _grow(
        self,
        layers: PrefixLayers,
        rows: list[Tensor],
        others: list[tuple[Tensor, ...]],
        vocabulary: Tensor,
        start: tuple[int, ...],
        late: range,
    ) -> tuple[tuple[int, ...], list[float]]:
        """``start`` extended greedily to ``max_length``, and each extension's relative distance.

        The sentence's own prefix is projected out too, step by step: what is left
        combines its inputs still to come, so a sentence longer than the rank (a
        planted message of ~50 tokens against 24) comes back within it once its first
        half is read.
        """
        sentence, closeness = list(start), []
        while len(sentence) < self.max_length:
            heartbeat("peeling: a sentence at %d tokens", len(sentence))
            view, own = layers.extensions(torch.tensor(sentence), vocabulary)
            spans = ProjectedSpans(rows, [*others, own], self.rank_tolerance, late)
            if spans.unexplained < self.explained:  # nothing is left for a next token to explain
                break
            relative = spans.relative_distance(view.layer_inputs)
            scores = relative - self.lm_weight * view.log_probs
            for index, token in enumerate(vocabulary.tolist()):
                if repeats_its_only_token(tuple(sentence), token) or repeats_a_trigram(sentence, token):
                    scores[index] = float("inf")
            best = int(scores.argmin())
            if not torch.isfinite(scores[best]):
                break
            sentence.append(int(vocabulary[best]))
            closeness.append(float(relative[best]))
        return tuple(sentence), closeness

    def _trim(self, sentence: tuple[int, ...], start: int, closeness: list[float]) -> tuple[int, ...]:
        """``sentence`` up to its last extension closer than ``pairing_ratio``; its ``start`` tokens stay."""
        kept = [step for step, value in enumerate(closeness) if value < self.pairing_ratio]
        return sentence[: start + kept[-1] + 1] if kept else sentence[:start]


def repeats_a_trigram(prefix: Sequence[int], token: int) -> bool:
    """Whether ``prefix`` + ``token`` ends in a trigram it already holds.

    Past the exact regime a loop ("as long as long as") stays close to the span at
    every step; real sentences rarely repeat a trigram, so the search forbids it.
    """
    if len(prefix) < 2:
        return False
    last = (*prefix[-2:], token)
    return any(tuple(prefix[i : i + 3]) == last for i in range(len(prefix) - 2))


def _common_prefix(first: Sequence[int], second: Sequence[int]) -> int:
    """How many first tokens ``first`` and ``second`` share."""
    shared = 0
    for a, b in zip(first, second, strict=False):  # of any lengths
        if a != b:
            break
        shared += 1
    return shared


def _orthonormal(vectors: Tensor, tolerance: float = 1e-8, reference: Tensor | None = None) -> Tensor:
    """``(d, k)`` orthonormal basis of the rows of ``vectors`` (repeated rows count once).

    Singular values below ``tolerance`` times the largest of ``reference`` (default:
    ``vectors``) count as zero.
    """
    _, singular, vh = torch.linalg.svd(vectors.double(), full_matrices=False)
    scale = singular[0] if reference is None else torch.linalg.matrix_norm(reference.double(), ord=2)
    return vh[singular > tolerance * scale].T.contiguous()
