"""Sequence assembly: order a recovered token set into sentences, one position at a time.

A prefix extended by a token is kept while the second layer's input at the new
position lies in the span of the second layer's LoRA A gradients (DAGER's decoder
search); among the extensions that pass, a beam keeps the ones the model itself finds
likeliest, so the gradient decides what is possible and the language model breaks ties.

Paper: DAGER: Exact Gradient Inversion for Large Language Models (Petrov et al., 2024).

Notes:
    Causal LMs only. The last token of each example feeds only the unused last logit,
    so it reaches no gradient and is not recovered unless it occurs earlier. Exact while
    the positions of the batch number at most the stacked rank of the second layer's A
    gradients (q, k and v each add up to r).

"""

from __future__ import annotations

import torch

from fedpeft.attacks.base import ATTACKS, Reconstruction
from fedpeft.attacks.observation import Observation
from fedpeft.attacks.second_layer import second_layer_of
from fedpeft.attacks.span import distance_to_span, row_span_basis
from fedpeft.attacks.token_set import TokenSet
from fedpeft.models import LoadedModel, load_adapter_state


@ATTACKS.register("sequence_assembly")
class SequenceAssembly:
    """Token set (first layer), then a beam search checked against the second layer.

    Args:
        distance_threshold: Span-distance cut-off of the first layer's token check.
        second_layer_threshold: Cut-off of the second layer's prefix check (DAGER's
            default). Tighter than the first layer's: at layer 0 the residual stream
            still carries mostly the token itself, so a wrong continuation, such as the
            last token repeated, can land within a few 1e-2 of the span.
        rank_tolerance: Relative singular-value cut-off of both spans.
        beam_width: Prefixes kept per length.
        max_length: Longest sequence searched.
        lm_weight: Weight of the model's negative log-likelihood in a prefix's score
            (its span distances are the rest); a tie-breaker among passing tokens.

    """

    def __init__(
        self,
        distance_threshold: float = 0.05,
        second_layer_threshold: float = 1e-3,
        rank_tolerance: float = 1e-5,
        beam_width: int = 16,
        max_length: int = 64,
        lm_weight: float = 1e-3,
    ) -> None:
        if beam_width < 1 or max_length < 1:
            raise ValueError("beam_width and max_length must be >= 1")
        if not 0 < second_layer_threshold < 1:
            raise ValueError(f"second_layer_threshold must be in (0, 1), got {second_layer_threshold}")
        if lm_weight < 0:
            raise ValueError(f"lm_weight must be >= 0, got {lm_weight}")
        self.token_set = TokenSet(distance_threshold, rank_tolerance)
        self.second_layer_threshold = second_layer_threshold
        self.rank_tolerance = rank_tolerance
        self.beam_width = beam_width
        self.max_length = max_length
        self.lm_weight = lm_weight

    def reconstruct(self, observation: Observation, target: LoadedModel) -> Reconstruction:
        """Recovered tokens, and the sequences they assemble into."""
        tokens = self.token_set.reconstruct(observation, target)
        if not tokens.token_ids:
            return tokens
        second = second_layer_of(target.model)
        gradients = observation.gradient_estimate()
        basis = row_span_basis([gradients[name] for name in second.lora_a_names[0]], self.rank_tolerance)
        load_adapter_state(target.model, observation.global_state)
        target.model.eval()
        vocabulary = torch.tensor(tokens.token_ids)
        beams: list[tuple[tuple[int, ...], float]] = [((), 0.0)]
        finished: list[tuple[tuple[int, ...], float]] = []
        for _ in range(self.max_length):
            prefixes = torch.tensor([list(prefix) for prefix, _ in beams], dtype=torch.long)
            extended = torch.cat(
                [prefixes.repeat_interleave(len(vocabulary), 0), vocabulary.repeat(len(beams)).unsqueeze(1)],
                dim=1,
            )
            view = second.last_position(extended)
            distances = distance_to_span(basis, view.layer_inputs[0]).view(len(beams), -1)
            scores = distances - self.lm_weight * view.log_probs.view(len(beams), -1)
            candidates = []
            for b, (prefix, total) in enumerate(beams):
                passing = [
                    i
                    for i in torch.nonzero(distances[b] < self.second_layer_threshold).flatten().tolist()
                    if not repeats_its_only_token(prefix, int(vocabulary[i]))
                ]
                if not passing and prefix:
                    finished.append((prefix, total / len(prefix)))
                candidates += [((*prefix, int(vocabulary[i])), total + float(scores[b, i])) for i in passing]
            if not candidates:
                break
            beams = sorted(candidates, key=lambda c: c[1])[: self.beam_width]
        else:
            finished += [(prefix, total / len(prefix)) for prefix, total in beams]
        sequences = longest_distinct(finished)
        details = dict(tokens.details) | {"second_layer_rank": basis.shape[1]}
        return Reconstruction(tokens.token_ids, tokens.token_scores, tuple(sequences), details)


def repeats_its_only_token(prefix: tuple[int, ...], token: int) -> bool:
    """Whether ``prefix`` + ``token`` is one token repeated from the start.

    Such a run gives the same state at every position (all values attended to are
    equal), so "t t" passes wherever "t" does: DAGER rejects it, and so does this
    search (a sentence that truly starts "t t" is lost).
    """
    return bool(prefix) and all(t == token for t in prefix)


def longest_distinct(found: list[tuple[tuple[int, ...], float]]) -> list[tuple[int, ...]]:
    """Best-scored first, without sequences that are a prefix of another one found."""
    keep = []
    for sequence, _ in sorted(found, key=lambda f: f[1]):
        if sequence in keep:
            continue
        if any(other[: len(sequence)] == sequence for other, _ in found if len(other) > len(sequence)):
            continue
        keep.append(sequence)
    return keep
