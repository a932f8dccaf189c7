"""Sentence polishing: edit recovered sentences while the exact test says an edit is better.

While a sentence is being grown, the inputs still to come are unknown, and past the
stacked rank (a planted message of ~50 tokens against 24 rows) the span test that
picks each next token is only approximate: rare tokens the model's likelihood does
not favour (a surname, the digits of a phone number) are where the growth goes wrong.
Once every sentence is read, that changes. The rows are combinations of the batch's
inputs and nothing else, so with *all* of them known the test is exact: the true
sentences leave nothing of the rows unexplained (float32: about 1e-14 of their
energy), and a wrong or missing token leaves its input's share.

So the sentences are edited one token at a time. For every position of every
sentence, each candidate token's input there (one cached run of the prefix, one token
per candidate) is scored by how much of the rows it leaves unexplained with every other
input of the batch projected out, as a substitution of that position's token and as an
insertion before it. Any added input explains something (one more dimension), so only
tokens far ahead of the median token in the same place count. The best-scored edits
are checked by running the edited sentence again, and the one that explains most is
kept if it lowers what is left by ``min_gain``; polishing stops when none does. The
scores take the other positions' inputs from the sentence before the edit (a token
changes what follows it through attention), which is why each edit is checked whole;
and all sentences compete in each round, because an input one sentence lacks is also
explained, less well, by inserting it into another. When no single edit helps, two
tokens are inserted at once (a phone number's digit comes with the space before it,
and neither may explain enough alone). Once the sentences explain the rows whole,
tokens whose removal keeps them explained are pruned.

On SmolLM2 with a planted message at batch 1, this turned "My phone number is 2 2."
into "... 2 2 4 0 5 1 2 9" and "Elena." into "Elena Rossi.": the whole secret.

fedpeft's own step, the counterpart of a pursuit's final least-squares refit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from fedpeft.attacks.progress import heartbeat
from fedpeft.attacks.second_layer import PrefixLayers


@dataclass(frozen=True)
class SentencePolish:
    """Token edits (substitute, insert) of recovered sentences, kept while the exact test improves.

    Attributes:
        max_edits: Most edits kept, per sentence.
        tries: Edits checked whole per round, best predicted first; the one that
            explains most is kept.
        min_gain: An edit is kept when it lowers the unexplained share of the rows by
            at least this fraction of it.
        min_ratio: An edit is tried when its token would explain at least this many
            times what the median token in its place would.
        min_unexplained: Nothing is edited once the energy left is below this share of
            the rows' (float32 gradients leave ~1e-14 of true sentences).
        explained: Below this share left the sentences explain the rows, and a token
            whose removal keeps them below it is not needed (pruned).

    """

    max_edits: int = 24
    tries: int = 6
    min_gain: float = 0.02
    min_ratio: float = 3.0
    min_unexplained: float = 1e-8
    explained: float = 1e-6

    def __post_init__(self) -> None:
        if self.max_edits < 0 or self.tries < 1:
            raise ValueError(f"max_edits must be >= 0 and tries >= 1, got {self.max_edits}, {self.tries}")
        for name in ("min_gain", "min_unexplained", "explained"):
            if not 0 < getattr(self, name) < 1:
                raise ValueError(f"{name} must be in (0, 1), got {getattr(self, name)}")

    def sentences(
        self,
        layers: PrefixLayers,
        rows: Sequence[Tensor],
        sentences: Sequence[tuple[int, ...]],
        vocabulary: Tensor,
    ) -> list[tuple[int, ...]]:
        """``sentences``, edited while an edit explains more of ``rows`` (per layer, ``(m, d)``).

        Each round scores every edit of every sentence, checks the ``tries`` best whole
        and keeps the one that explains most: an input one sentence misses can also be
        explained, less well, by inserting it into another. A sentence's first token
        stays (the start was chosen against every token).
        """
        polished = list(sentences)
        inputs = [layers.sentence(torch.tensor(s)) for s in polished]
        current = unexplained(rows, inputs)
        for edit in range(self.max_edits * len(polished)):
            if current < self.min_unexplained:
                break
            heartbeat("polishing: edit %d, %.2e of the rows unexplained", edit + 1, current)
            # One token first; two at once only when no single edit helps: two inputs
            # explain more than one, whatever they are.
            best = None
            for pairs in (False, True):
                scored = [
                    (score, index, edited)
                    for index, sentence in enumerate(polished)
                    for score, edited in self._edits(
                        layers,
                        rows,
                        inputs[:index] + inputs[index + 1 :],
                        sentence,
                        inputs[index],
                        vocabulary,
                        pairs,
                    )
                ]
                best = self._check(layers, rows, inputs, sorted(scored)[: self.tries], current)
                if best is not None:
                    break
            if best is None:
                break
            current, index, polished[index], inputs[index] = best
        return self._prune(layers, rows, polished, inputs, current)

    def _check(
        self,
        layers: PrefixLayers,
        rows: Sequence[Tensor],
        inputs: list[tuple[Tensor, ...]],
        scored: list[tuple[float, int, tuple[int, ...]]],
        current: float,
    ) -> tuple[float, int, tuple[int, ...], tuple[Tensor, ...]] | None:
        """Of the ``scored`` edits, run whole, the one that explains most, if it gains ``min_gain``."""
        best = None
        for _, index, edited in scored:
            states = layers.sentence(torch.tensor(edited))
            left = unexplained(rows, [*inputs[:index], states, *inputs[index + 1 :]])
            if left < current * (1 - self.min_gain) and (best is None or left < best[0]):
                best = (left, index, edited, states)
        return best

    def _prune(
        self,
        layers: PrefixLayers,
        rows: Sequence[Tensor],
        sentences: list[tuple[int, ...]],
        inputs: list[tuple[Tensor, ...]],
        current: float,
    ) -> list[tuple[int, ...]]:
        """``sentences`` without the tokens nothing needs, last first, once they explain the rows.

        An inserted input always explains something, so edits can leave a token whose
        share another one took over later. The exact test cannot tell that it is extra
        (more inputs never explain less), but once the sentences explain the rows whole
        it can tell that it is not needed: taking it out leaves them explained. Before
        that, a true token whose share other inputs happen to cover would go too.
        """
        if current >= self.explained:  # the share ``inputs`` leave unexplained
            return sentences
        for index in range(len(sentences)):
            position = len(sentences[index]) - 1
            while position >= 1:
                shorter = sentences[index][:position] + sentences[index][position + 1 :]
                states = layers.sentence(torch.tensor(shorter))
                left = unexplained(rows, [*inputs[:index], states, *inputs[index + 1 :]])
                if left < self.explained:
                    sentences[index], inputs[index] = shorter, states
                position -= 1
        return sentences

    def _edits(
        self,
        layers: PrefixLayers,
        rows: Sequence[Tensor],
        others: list[tuple[Tensor, ...]],
        sentence: tuple[int, ...],
        own: tuple[Tensor, ...],
        vocabulary: Tensor,
        pairs: bool,
    ) -> list[tuple[float, tuple[int, ...]]]:
        """Edits of ``sentence`` worth checking (substitutions, insertions), with their predicted share left.

        Any input added explains some of the rows (one more dimension), so an edit is
        worth checking only when its token would explain ``min_ratio`` times what the
        median token in the same place would.
        """
        edits: list[tuple[float, tuple[int, ...]]] = []
        every = KnownSpan(rows, [*others, own])  # an insertion keeps every current input
        for position in range(1, len(sentence) + 1):
            prefix, rest = sentence[:position], sentence[position:]
            view, _ = layers.extensions(torch.tensor(prefix), vocabulary)
            for index, left in self._picks(every, view.layer_inputs):
                token = int(vocabulary[index])
                if not pairs:
                    edits.append((left, (*prefix, token, *rest)))
                    continue
                # Two tokens at once: a digit of a phone number comes with its space,
                # and neither may explain enough before the other is in.
                first = tuple(inputs[index : index + 1] for inputs in view.layer_inputs)
                pair = KnownSpan(rows, [*others, own, first])
                after, _ = layers.extensions(torch.tensor((*prefix, token)), vocabulary)
                for second, pair_left in self._picks(pair, after.layer_inputs):
                    edits.append((pair_left, (*prefix, token, int(vocabulary[second]), *rest)))
            if rest and not pairs:  # a substitution takes the position's own input out
                kept = tuple(torch.cat([states[:position], states[position + 1 :]]) for states in own)
                for index, left in self._picks(KnownSpan(rows, [*others, kept]), view.layer_inputs):
                    if int(vocabulary[index]) != rest[0]:
                        edits.append((left, (*prefix, int(vocabulary[index]), *rest[1:])))
        return edits

    def _picks(self, span: KnownSpan, candidates: Sequence[Tensor]) -> list[tuple[int, float]]:
        """The two candidates that leave least unexplained, if ``min_ratio`` ahead of the median."""
        left = span.unexplained_with(candidates)
        gains = span.unexplained - left
        ratios = gains / gains.median().clamp_min(1e-300)
        return [(i, float(left[i])) for i in torch.argsort(left)[:2].tolist() if ratios[i] >= self.min_ratio]


class KnownSpan:
    """Each layer's span of known inputs, and what it leaves of the layer's gradient rows.

    Args:
        rows: Per layer, the ``(m, d)`` stacked LoRA A gradient rows.
        known: Per known sentence, per layer, its ``(length, d)`` inputs.

    """

    def __init__(self, rows: Sequence[Tensor], known: Sequence[tuple[Tensor, ...]]) -> None:
        self._bases = [_basis(torch.cat([states[layer] for states in known])) for layer in range(len(rows))]
        self._residuals = [r - (r @ basis) @ basis.T for r, basis in zip(rows, self._bases, strict=True)]
        self._energies = [float(r.norm() ** 2) for r in rows]

    @property
    def unexplained(self) -> float:
        """Mean over the layers of the share of the rows' energy outside the span."""
        shares = [
            float(r.norm() ** 2) / max(e, 1e-300)
            for r, e in zip(self._residuals, self._energies, strict=True)
        ]
        return sum(shares) / len(shares)

    def unexplained_with(self, candidates: Sequence[Tensor]) -> Tensor:
        """:attr:`unexplained` with each candidate input added to the span, ``(n,)``.

        ``candidates`` holds per layer an ``(n, d)`` input per candidate. A candidate's
        part outside the span removes ``||R u||^2 / ||u||^2`` of the residual rows ``R``.
        """
        total = torch.zeros(candidates[0].shape[0], dtype=torch.float64)
        for layer, basis in enumerate(self._bases):
            inputs, residual = candidates[layer], self._residuals[layer]
            outside = inputs - (inputs @ basis) @ basis.T
            energy = outside.norm(dim=1) ** 2
            removed = ((residual @ outside.T) ** 2).sum(0) / energy.clamp_min(1e-300)
            removed = torch.where(energy > 1e-12 * inputs.norm(dim=1) ** 2, removed, 0.0)
            total += (residual.norm() ** 2 - removed) / max(self._energies[layer], 1e-300)
        return total / len(self._bases)


def unexplained(rows: Sequence[Tensor], known: Sequence[tuple[Tensor, ...]]) -> float:
    """Mean over the layers of the share of ``rows``' energy outside the span of the ``known`` inputs."""
    return KnownSpan(rows, known).unexplained


def _basis(vectors: Tensor, tolerance: float = 1e-10) -> Tensor:
    """``(d, k)`` orthonormal basis of the rows of ``vectors``."""
    _, singular, vh = torch.linalg.svd(vectors.double(), full_matrices=False)
    return vh[singular > tolerance * singular[0]].T.contiguous()
