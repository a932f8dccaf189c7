"""ReCIT: filter-based token extraction, then token pairing into sequences.

Paper: ReCIT: Reconstructing Full Private Data from Gradient in Parameter-Efficient
Fine-Tuning of Large Language Models (Xie, He, Li, Jia, Ji, 2025).

DAGER's span test is exact only while a batch's distinct first-layer inputs number at
most the stacked LoRA rank (24 for r = 8 on q/k/v); past that a true token is no longer
*in* the span, only closer to it than chance, and a fixed distance threshold recovers
nothing. ReCIT's answer, as implemented here:

1. **Filter.** While the gradient has rank to spare (fewer distinct inputs than the
   stacked rank) the span is exact and DAGER's fixed threshold decides. Once the rank
   is saturated, a simultaneous pursuit over the vocabulary
   (:mod:`fedpeft.attacks.pursuit`) looks for the few tokens whose inputs make up
   every gradient row exactly: identifiable up to about a third of the input width
   (576 for SmolLM2), not the rank, so a batch of 16 sentences is read whole. Rows a
   sparsifying codec cut down (random mask, top-k: most entries exactly zero) get the
   masked pursuit (:mod:`fedpeft.attacks.masked_pursuit`), which fits each row through
   its own mask and accepts a float16 residual floor. If no
   exact fit exists (DP noise, projections, too many tokens), every vocabulary
   token's span distance becomes a robust z-score against the whole vocabulary
   (median and MAD: nearly every token is absent, so the vocabulary is its own null
   distribution), and tokens more than ``filter_z`` deviations closer than chance pass.
2. **Pairing.** Sentences are grown from the tokens that pass, one position at a time,
   by sentence peeling (:mod:`fedpeft.attacks.peeling`): a prefix's inputs to the
   layers after the first (functions of the prefix,
   :class:`~fedpeft.attacks.second_layer.PrefixLayers`) must lie in
   each layer's A gradient span, scored relative to the step's other extensions and
   combined with the model's own log-likelihood. Past the rank that test is only
   approximate, until every other sentence's inputs are projected out of the rows:
   the peeling finds the sentences one by one, then grows each again with the others
   projected out, where the span is exact once more. Then the sentences are
   **polished** (:mod:`fedpeft.attacks.polishing`): with every input of the batch
   hypothesised, the rows must lie in their span exactly, and token edits
   (substitutions, insertions of one or two tokens) are kept while they bring the
   rows closer to it, which mends the rare tokens a greedy growth past the rank gets
   wrong (a surname, a phone number's digits).
3. **Memorisation boost.** A malicious server sends an adapter fine-tuned on personal
   notes (:mod:`fedpeft.attacks.memorisation_boost`, ``capture.boost_steps``); it is the
   model this attack scores likelihoods with, since it runs at the observed adapter.

Notes:
    Interpreted from the paper's abstract and descriptions (its method section was not
    available): the z-score filter is this implementation's reading of "filter-based
    token extraction"; both pursuits, the peeling and the polishing (its "token
    pairing" past the rank) are fedpeft's own. Sparsified rows get no pairing: the layers' span tests
    need whole rows.
    Rotary decoders get the whole pipeline. Encoders get the filter per position and
    a sequence that places every token passed at one position by a minimum-cost
    assignment (:func:`assign_positions`); under their embedding dropout (BERT, MiniLM:
    p = 0.1 while training) no input lies exactly in the span, and a token passes at
    ``encoder_ratio`` of the position's median distance instead. Past
    the rank they get a token set only, from a pursuit over each token's input
    averaged over positions (MiniLM's position embeddings move an input much less
    than its word does), stopped once the best atom explains less than ``min_gain``
    of what is left.

"""

from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from fedpeft.attacks.base import ATTACKS, Reconstruction
from fedpeft.attacks.first_layer import FirstLayer, observe_first_layer
from fedpeft.attacks.masked_pursuit import masked_pursuit
from fedpeft.attacks.observation import Observation
from fedpeft.attacks.peeling import SentencePeeling
from fedpeft.attacks.polishing import SentencePolish
from fedpeft.attacks.progress import heartbeat
from fedpeft.attacks.pursuit import OrthogonalResidual, SparseFit, simultaneous_pursuit, unit_rows
from fedpeft.attacks.second_layer import prefix_layers_of
from fedpeft.attacks.sequence_assembly import longest_distinct
from fedpeft.attacks.span import distance_to_span
from fedpeft.errors import AttackError
from fedpeft.models import LoadedModel, load_adapter_state


def assign_positions(scores: Tensor, tokens: list[int]) -> list[int]:
    """A sentence from per-position scores: every token placed, at the least total score.

    ``scores[p, j]`` scores ``tokens[j]`` at word position ``p`` (lower: closer). Under
    an encoder's embedding dropout a position's best token is often its neighbour's
    (MiniLM's position embeddings move an input far less than its word), so reading
    each position's best repeats some tokens and drops others. The token set is known
    better than any one position, so each token gets its own position by a minimum-cost
    assignment (Hungarian, scipy's ``linear_sum_assignment``); positions left over
    (a word the sentence repeats) keep their best token, and past as many tokens as
    positions the worst-placed ones are left out. Left-over positions at the end are
    dropped: with weak position embeddings a word seems present a little past the
    sentence's end too.
    """
    cost = scores.double().numpy()
    sequence = [tokens[int(j)] for j in cost.argmin(axis=1)]
    rows, columns = linear_sum_assignment(cost)
    for position, column in zip(rows, columns, strict=True):
        sequence[int(position)] = tokens[int(column)]
    return sequence[: int(rows.max()) + 1]


def robust_z(values: Tensor, reference: Tensor | None = None) -> Tensor:
    """``(values - median) / (1.4826 MAD)`` of ``reference`` (default: ``values``).

    1.4826 MAD estimates a normal distribution's standard deviation while ignoring
    the few outliers (here: the tokens that were in the batch).
    """
    reference = values if reference is None else reference
    median = reference.median()
    spread = 1.4826 * (reference - median).abs().median()
    return (values - median) / spread.clamp_min(1e-12)


@ATTACKS.register("recit")
class ReCIT:
    """ReCIT's token filter and token pairing on LoRA A gradients.

    Args:
        exact_threshold: Span distance below which a token was in the batch while the
            span is exact (DAGER's LoRA setting: 0.05).
        filter_z: Deviations below the vocabulary's median distance a token must lie to
            pass the filter (among ~50k absent tokens the closest sit near -2.3).
        pairing_ratio: A sentence ends after its last extension whose span distance,
            relative to the median over the step's extensions and averaged over the
            pairing layers, is below this (:class:`~fedpeft.attacks.peeling.SentencePeeling`).
        start_ratio: A sentence is started from a token while its relative distance at
            position 0 is below this.
        sweeps: Rounds of growing every sentence again with the others projected out.
        lm_weight: Weight of the model's negative log-likelihood against the relative
            distance when ranking extensions (a tie-breaker).
        max_length: Longest sentence searched.
        max_candidates: Most tokens kept by the filter (best first).
        max_sentences: Most sentences peeled.
        rank_tolerance: Relative singular-value cut-off of both spans.
        max_positions: Positions scanned for absolute-position encoders.
        encoder_ratio: Under dropout, an encoder's token passes at a position where its
            span distance is below this fraction of the median (MiniLM on SST-2: the
            batch's tokens at most 0.39, absent ones at least 0.65; a random 256-wide
            BERT: at most 0.51 and, special tokens aside, at least 0.83).
        min_gain: An encoder's pursuit past the rank stops once the best token explains
            less than this share of the remaining gradient (MiniLM: true tokens 2-9 %,
            wrong ones mostly below 1 %).
        min_weight: Past the rank, an atom of an exact pursuit fit whose weight is below
            this fraction of the largest was not needed (wrong picks sit near 1e-7,
            the rarest true tokens near 1e-3).
        max_pairing_tokens: Past this many filtered tokens the pairing is skipped and
            the token set returned alone: each step scores every token as the next one,
            with the whole model, for every sentence and sweep (a batch of 16 has ~160
            tokens).
        masked_min_weight: The same cut for a sparsified update (random mask, top-k),
            whose float16 values leave every atom a noise weight: atoms fitting only
            rounding noise weighed at most 1.2e-3 on SmolLM2, true tokens at least 3.7e-3.
        max_edits: Most token edits per peeled sentence once all are read, each kept
            only if the exact full-batch test improves
            (:class:`~fedpeft.attacks.polishing.SentencePolish`; 0: none).

    """

    def __init__(
        self,
        exact_threshold: float = 0.05,
        filter_z: float = 4.0,
        pairing_ratio: float = 0.3,
        start_ratio: float = 0.7,
        sweeps: int = 2,
        lm_weight: float = 0.02,
        max_length: int = 64,
        max_candidates: int = 256,
        max_sentences: int = 16,
        rank_tolerance: float = 1e-5,
        max_positions: int = 64,
        min_weight: float = 1e-5,
        max_pairing_tokens: int = 64,
        masked_min_weight: float = 2e-3,
        encoder_ratio: float = 0.6,
        min_gain: float = 0.015,
        max_edits: int = 24,
    ) -> None:
        if not 0 < exact_threshold < 1:
            raise ValueError(f"exact_threshold must be in (0, 1), got {exact_threshold}")
        if filter_z <= 0:
            raise ValueError(f"filter_z must be > 0, got {filter_z}")
        if min(max_candidates, max_positions, max_pairing_tokens) < 1:
            raise ValueError("max_candidates, max_positions and max_pairing_tokens must be >= 1")
        if not 0 < min_weight < 1 or not 0 < masked_min_weight < 1:
            raise ValueError(
                f"min_weight and masked_min_weight must be in (0, 1), got {min_weight}, {masked_min_weight}"
            )
        if not 0 < encoder_ratio < 1 or not 0 < min_gain < 1:
            raise ValueError(f"encoder_ratio and min_gain must be in (0, 1), got {encoder_ratio}, {min_gain}")
        self.exact_threshold = exact_threshold
        self.filter_z = filter_z
        self.peeling = SentencePeeling(
            pairing_ratio=pairing_ratio,
            start_ratio=start_ratio,
            sweeps=sweeps,
            max_sentences=max_sentences,
            max_length=max_length,
            lm_weight=lm_weight,
            rank_tolerance=rank_tolerance,
        )
        self.polish = SentencePolish(max_edits=max_edits)
        self.max_candidates = max_candidates
        self.rank_tolerance = rank_tolerance
        self.max_positions = max_positions
        self.min_weight = min_weight
        self.max_pairing_tokens = max_pairing_tokens
        self.masked_min_weight = masked_min_weight
        self.encoder_ratio = encoder_ratio
        self.min_gain = min_gain

    def reconstruct(self, observation: Observation, target: LoadedModel) -> Reconstruction:
        """Filtered tokens, and for rotary decoders the sentences they pair into."""
        seen = observe_first_layer(observation, target.model, self.rank_tolerance)
        first, basis, gradients, details = seen.layer, seen.basis, seen.gradients, seen.details()
        if basis.shape[1] == 0:
            return Reconstruction((), (), (), details)
        special = set(target.tokenizer.all_special_ids)
        saturated = seen.saturated
        details["saturated"] = int(saturated)
        if first.positions == "absolute":
            return self._encoder(first, basis, seen.rows, saturated, special, details)
        heartbeat(
            "recit: filtering the vocabulary against %d gradient rows (%s the rank)",
            seen.rows.shape[0],
            "past" if saturated else "within",
            major=True,
        )
        # Special tokens ([CLS], BOS) can start a sentence: the pairing needs them, the
        # reported token set (scored as the batch's words) does not.
        passed, scores_of = self._filter(first.candidates(), basis, seen.rows, saturated, details)
        tokens = [t for t in passed if t not in special]
        details["filtered"] = len(tokens)
        if not tokens:
            return Reconstruction((), (), (), details)
        scores = tuple(scores_of[t] for t in tokens)
        if len(passed) > self.max_pairing_tokens:
            details["note"] = f"no pairing: {len(passed)} tokens > max_pairing_tokens"
            return Reconstruction(tuple(tokens), scores, (), details)
        if details["filter"] == "masked_pursuit":
            details["note"] = "no pairing: the second layer's span test needs whole rows, not sparsified ones"
            return Reconstruction(tuple(tokens), scores, (), details)
        try:
            layers = prefix_layers_of(target.model, 0.0, 2 / 3)
        except AttackError as err:
            details["note"] = f"no pairing: {err}"
            return Reconstruction(tuple(tokens), scores, (), details)
        load_adapter_state(target.model, observation.global_state)
        target.model.eval()
        details["pairing_layers"] = f"{layers.layers[0]}-{layers.layers[-1]}"
        heartbeat("recit: pairing %d tokens into sentences (peeling)", len(passed), major=True)
        peeled = self.peeling.sentences(layers, gradients, passed)
        if peeled and self.polish.max_edits:
            # The exact test holds at any layer; the middle third mixes in the most context.
            middle = prefix_layers_of(target.model, 1 / 3, 2 / 3)
            vocabulary = torch.tensor(passed, dtype=torch.long)
            heartbeat("recit: polishing %d sentence(s)", len(peeled), major=True)
            peeled = self.polish.sentences(middle, middle.rows(gradients), peeled, vocabulary)
        sequences = longest_distinct([(sentence, -len(sentence)) for sentence in peeled])
        return Reconstruction(tuple(tokens), scores, tuple(sequences), details)

    def _filter(
        self, candidates: Tensor, basis: Tensor, rows: Tensor, saturated: bool, details: dict
    ) -> tuple[list[int], dict[int, float]]:
        """The tokens of the batch, best first, and a score for each (lower is surer).

        With rank to spare, DAGER's span test is exact. Past it, a pursuit that fits
        the rows exactly is too (weights as scores); one that cannot (noise, lossy
        codecs, more tokens than the width resolves) leaves the statistical z filter.
        """
        if saturated:
            fit, filter_name, min_weight = self._pursue(rows, candidates)
            details["pursuit_residual"] = fit.relative_residual
            if fit.converged:
                details["filter"] = filter_name
                weight = dict(zip(fit.atoms.tolist(), fit.weights.tolist(), strict=True))
                passed = fit.support(min_weight)[: self.max_candidates]
                return passed, {t: -weight[t] for t in passed}
        distances = distance_to_span(basis, candidates)
        statistical = saturated or not self._exact(distances)
        details["filter"] = "z_score" if statistical else "span"
        z = robust_z(distances)
        passed = self._select(distances, z, statistical)
        return passed, {t: float(z[t]) for t in passed}

    def _exact(self, distances: Tensor) -> bool:
        """Whether some candidate lies in the span, as every true input does when it is exact.

        Below the rank it is, unless the inputs were perturbed on the way: an encoder's
        embedding dropout (BERT, MiniLM: p = 0.1 in training) zeroes a tenth of every
        input, and the true tokens then sit at distance ~0.25 instead of 0.
        """
        return float(distances.min()) < self.exact_threshold

    def _pursue(self, rows: Tensor, candidates: Tensor) -> tuple[SparseFit, str, float]:
        """The pursuit that suits the rows: masked where most entries were not sent."""
        sent = rows[rows.abs().sum(1) > 0]
        if len(sent) and float((sent == 0).double().mean()) > 0.5:  # a random mask or top-k
            kept = int((sent != 0).sum(1).double().quantile(0.75))
            # Three quarters of the better-kept rows' entries: past that any atoms fit
            # them (top-k keeps 3 entries of some rows and 100 of others).
            fit = masked_pursuit(rows, candidates, max_atoms=max(1, 3 * kept // 4))
            return fit, "masked_pursuit", self.masked_min_weight
        # Half the input width: past it greedy picks go wrong even on exact rows.
        fit = simultaneous_pursuit(rows, candidates, max_atoms=max(1, rows.shape[1] // 2))
        return fit, "pursuit", self.min_weight

    def _select(self, distances: Tensor, z: Tensor, statistical: bool) -> list[int]:
        """The filter: closest first, at most ``max_candidates``.

        Where the span holds every input exactly, DAGER's fixed test decides; once it
        is saturated or perturbed, the z-score against the vocabulary does.
        """
        passing = z < -self.filter_z if statistical else distances < self.exact_threshold
        found = torch.nonzero(passing).flatten()
        ordered = found[torch.argsort(distances[found])].tolist()
        return [int(t) for t in ordered][: self.max_candidates]

    def _encoder(
        self,
        first: FirstLayer,
        basis: Tensor,
        rows: Tensor,
        saturated: bool,
        special: set[int],
        details: dict[str, float | int | str],
    ) -> Reconstruction:
        """The filter at every position: each token's best score, and each position's best token.

        Whether the span is exact is read at position 0, which every sentence fills
        (with [CLS]). Below the rank the span has one dimension per input, so a batch
        of one fills exactly ``rank`` positions.
        """
        positions = min(self.max_positions, first.max_positions)
        if saturated:
            return self._encoder_pursuit(first, rows, positions, special, details)
        at_start = distance_to_span(basis, first.candidates(0))
        exact = self._exact(at_start)
        details["filter"] = "span" if exact else "relative_span"
        threshold = self.exact_threshold if exact else self.encoder_ratio
        best: dict[int, float] = {}
        slots: list[Tensor] = []  # each word position's scores over the vocabulary
        for position in range(positions if exact else min(positions, basis.shape[1])):
            distances = at_start if position == 0 else distance_to_span(basis, first.candidates(position))
            scores = distances if exact else distances / distances.median().clamp_min(1e-12)
            passing = torch.nonzero(scores < threshold).flatten()
            ordered = [int(t) for t in passing[torch.argsort(scores[passing])]]
            passed = [t for t in ordered if t not in special]
            for token in passed:
                best[token] = min(float(scores[token]), best.get(token, float("inf")))
            if passed and ordered[0] == passed[0]:  # not a [CLS] or [SEP] position
                slots.append(scores)
        ranked = sorted(best, key=best.__getitem__)[: self.max_candidates]
        details["filtered"] = len(ranked)
        sequence = assign_positions(torch.stack(slots)[:, ranked], ranked) if slots and ranked else []
        sequences = (tuple(sequence),) if sequence else ()
        return Reconstruction(tuple(ranked), tuple(best[t] for t in ranked), sequences, details)

    def _encoder_pursuit(
        self, first: FirstLayer, rows: Tensor, positions: int, special: set[int], details: dict
    ) -> Reconstruction:
        """Past the rank: greedy tokens over position-averaged inputs, while each explains enough."""
        total = first.candidates(0)
        for position in range(1, positions):
            total = total + first.candidates(position)
        atoms = unit_rows(total / positions)
        fit = OrthogonalResidual(rows)
        gains: dict[int, float] = {}
        while len(gains) < min(self.max_candidates, rows.shape[1]):
            scores = fit.scores(atoms)
            best = int(scores.argmax())
            gain = float(scores[best]) ** 2 / max(float(fit.residual.norm()) ** 2, 1e-300)
            if gain < self.min_gain or not fit.take(atoms[best]):
                break
            gains[best] = gain
        details["filter"] = "position_averaged_pursuit"
        details["pursuit_residual"] = fit.relative
        tokens = [t for t in gains if t not in special]
        details["filtered"] = len(tokens)
        return Reconstruction(tuple(tokens), tuple(-gains[t] for t in tokens), (), details)
