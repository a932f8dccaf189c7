"""Gradient matching: optimise a dummy batch until its adapter gradient matches the observed one.

Paper: Deep Leakage from Gradients (Zhu, Liu & Han, NeurIPS 2019); TAG: Gradient
Attack on Transformer-based Language Models (Deng et al., EMNLP Findings 2021); LAMP:
Extracting Text from Gradients with Language Model Priors (Balunović et al., NeurIPS 2022).

The optimisation-based family, as the baseline the span attacks are measured against.
Text is discrete, so the dummy batch is relaxed: each position holds logits over the
vocabulary, its input embedding is the softmax-weighted mix of the model's token
embeddings, and the loss the client computed is replayed with those soft tokens (soft
next-token targets for a causal LM, soft labels for a classifier). The distance between
the dummy batch's adapter gradient and the observed one (DLG's L2, TAG's L2 + L1, or
LAMP's cosine) is minimised with Adam through a second-order backward pass. LAMP's
language-model prior enters twice: as a perplexity term during the continuous phase
(the target model itself is the LM for causal models), and in the discrete phase,
where positions are re-chosen among each one's top candidates to lower gradient
distance plus ``prior_weight`` x perplexity.

Interpretations (documented because the papers leave them open for PEFT):
- the adversary is given the batch size and the sequence length (LAMP's and TAG's
  assumption); the first token is pinned to the tokenizer's BOS/[CLS] and, for
  encoders, the last to [SEP], the template every client's batch follows;
- only the adapter's gradient is matched (it is all a fedpeft client sends); under
  ``fedavg`` the update of several steps is treated as one step's gradient, which is
  the threat model's known weakness for this family.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from fedpeft.attacks.base import ATTACKS, Reconstruction
from fedpeft.attacks.observation import Observation
from fedpeft.attacks.progress import heartbeat
from fedpeft.errors import AttackError
from fedpeft.models import LoadedModel, load_adapter_state

Distance = Literal["cosine", "l2", "tag"]


@ATTACKS.register("gradient_matching")
class GradientMatching:
    """DLG/TAG/LAMP-style inversion of the adapter gradient.

    Args:
        batch_size: Sequences in the attacked batch (known to the adversary).
        length: Tokens per sequence, special tokens included (known to the adversary).
        steps: Adam steps of the continuous phase.
        lr: Adam's step size on the token logits.
        distance: ``cosine`` (LAMP), ``l2`` (DLG) or ``tag`` (L2 + ``l1_weight`` x L1).
        l1_weight: TAG's L1 weight.
        prior_weight: Weight of the LM perplexity (causal LMs; 0 turns the prior off).
        candidates: Top tokens per position tried in the discrete phase.
        refine_passes: Passes of the discrete phase over all positions (0: argmax only).
        final_temperature: The softmax temperature is annealed from 1 to this.
        seed: Seeds the dummy batch.

    """

    def __init__(
        self,
        batch_size: int = 1,
        length: int = 12,
        steps: int = 200,
        lr: float = 0.1,
        distance: Distance = "cosine",
        l1_weight: float = 0.01,
        prior_weight: float = 0.05,
        candidates: int = 4,
        refine_passes: int = 1,
        final_temperature: float = 0.1,
        seed: int = 0,
    ) -> None:
        if batch_size < 1 or length < 2 or steps < 0 or candidates < 1 or refine_passes < 0:
            raise ValueError("batch_size >= 1, length >= 2, steps >= 0, candidates >= 1, refine_passes >= 0")
        if distance not in ("cosine", "l2", "tag"):
            raise ValueError(f"distance must be cosine, l2 or tag, got {distance!r}")
        if lr <= 0 or l1_weight < 0 or prior_weight < 0:
            raise ValueError("lr must be > 0; l1_weight and prior_weight >= 0")
        self.batch_size = batch_size
        self.length = length
        self.steps = steps
        self.lr = lr
        self.distance = distance
        self.l1_weight = l1_weight
        self.prior_weight = prior_weight
        self.candidates = candidates
        self.refine_passes = refine_passes
        if not 0 < final_temperature <= 1:
            raise ValueError(f"final_temperature must be in (0, 1], got {final_temperature}")
        self.final_temperature = final_temperature
        self.seed = seed

    def reconstruct(self, observation: Observation, target: LoadedModel) -> Reconstruction:
        """Match the gradient with soft tokens, then choose discrete tokens."""
        model: Any = target.model
        base = model.get_base_model()
        previous = base.config._attn_implementation
        # Fused attention kernels have no second derivative; eager attention computes the same.
        base.set_attn_implementation("eager")
        try:
            return self._reconstruct(observation, target)
        finally:
            base.set_attn_implementation(previous)

    def _reconstruct(self, observation: Observation, target: LoadedModel) -> Reconstruction:
        model: Any = target.model
        load_adapter_state(model, observation.global_state)
        model.eval()  # no dropout: the adversary replays the computation, not its noise
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        observed = {n: g.to(torch.float32) for n, g in observation.gradient_estimate().items()}
        if not any(bool(g.abs().sum() > 0) for g in observed.values()):
            raise AttackError("gradient_matching: the observed update is zero, nothing to match")
        replay = _Replay(model, target.tokenizer, params, observed, self)
        generator = torch.Generator().manual_seed(self.seed)
        vocab = replay.embeddings.shape[0]
        logits = (
            0.1 * torch.randn(self.batch_size, self.length, vocab, generator=generator)
        ).requires_grad_()
        labels = None
        if replay.num_labels is not None:
            labels = torch.zeros(self.batch_size, replay.num_labels).requires_grad_()
        optimizer = torch.optim.Adam([t for t in (logits, labels) if t is not None], lr=self.lr)
        first_distance = last_distance = float("nan")
        heartbeat("gradient matching: %d optimisation steps", self.steps, major=True)
        for step in range(self.steps):
            heartbeat("gradient matching: step %d of %d", step + 1, self.steps)
            optimizer.zero_grad()
            # Anneal the softmax towards one-hot, so the soft batch that matches the
            # gradient ends near a discrete one (a soft mix can match what no text does).
            temperature = self.final_temperature ** (step / max(self.steps - 1, 1))
            probs = replay.pin(F.softmax(logits / temperature, dim=-1))
            soft_labels = F.softmax(labels, dim=-1) if labels is not None else None
            distance, perplexity = replay.score(probs, soft_labels, create_graph=True)
            (distance + self.prior_weight * perplexity).backward()
            optimizer.step()
            last_distance = float(distance.detach())
            if step == 0:
                first_distance = last_distance
        with torch.no_grad():
            probs = replay.pin(F.softmax(logits / self.final_temperature, dim=-1))
            hard_labels = labels.argmax(-1) if labels is not None else None
        tokens, score = self._discrete(replay, probs, hard_labels)
        confidence = probs.max(dim=-1).values
        order = sorted(
            (
                (float(confidence[b, i]), int(tokens[b, i]))
                for b in range(tokens.shape[0])
                for i in range(self.length)
            ),
            reverse=True,
        )
        seen: dict[int, float] = {}
        for conf, token in order:
            seen.setdefault(token, 1.0 - conf)
        return Reconstruction(
            tuple(seen),
            tuple(seen.values()),
            tuple(tuple(int(t) for t in row) for row in tokens),
            {
                "distance_first": first_distance,
                "distance_continuous": last_distance,
                "distance_discrete": score,
                "steps": self.steps,
                "distance_kind": self.distance,
            },
        )

    def _discrete(self, replay: _Replay, probs: Tensor, labels: Tensor | None) -> tuple[Tensor, float]:
        """Argmax tokens, then LAMP's discrete phase.

        Per position, keep the candidate that lowers gradient distance +
        ``prior_weight`` x perplexity.
        """
        tokens = probs.argmax(dim=-1)
        best = replay.hard_score(tokens, labels)
        top = probs.topk(min(self.candidates, probs.shape[-1]), dim=-1).indices
        for refine in range(self.refine_passes):
            heartbeat("gradient matching: discrete pass %d of %d", refine + 1, self.refine_passes, major=True)
            for b in range(tokens.shape[0]):
                for i in replay.free_positions(self.length):
                    for candidate in top[b, i].tolist():
                        if candidate == int(tokens[b, i]):
                            continue
                        trial = tokens.clone()
                        trial[b, i] = candidate
                        score = replay.hard_score(trial, labels)
                        if score < best:
                            tokens, best = trial, score
        return tokens, best


class _Replay:
    """The client's loss and adapter gradient, recomputed for a dummy batch."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        params: dict[str, Tensor],
        observed: dict[str, Tensor],
        attack: GradientMatching,
    ) -> None:
        self.model = model
        self.params = params
        self.observed = observed
        self.attack = attack
        self.embeddings = model.get_input_embeddings().weight.detach()
        self.causal = getattr(model.get_base_model(), "lm_head", None) is not None
        self.num_labels = None if self.causal else int(model.config.num_labels)
        self.observed_norm = torch.sqrt(sum((g**2).sum() for g in observed.values()))  # type: ignore[arg-type]
        self.observed_l1 = sum(g.abs().sum() for g in observed.values())
        start = next((t for t in (tokenizer.bos_token_id, tokenizer.cls_token_id) if t is not None), None)
        end = tokenizer.sep_token_id if tokenizer.cls_token_id is not None else None
        self.anchors = {i: t for i, t in ((0, start), (attack.length - 1, end)) if t is not None}

    def free_positions(self, length: int) -> Sequence[int]:
        return [i for i in range(length) if i not in self.anchors]

    def pin(self, probs: Tensor) -> Tensor:
        """``probs`` with the template's anchored positions set to their one-hot token."""
        if not self.anchors:
            return probs
        keep = torch.ones(probs.shape[1], 1)
        fixed = torch.zeros(probs.shape[1], probs.shape[2])
        for i, token in self.anchors.items():
            keep[i] = 0.0
            fixed[i, token] = 1.0
        return probs * keep + fixed

    def _loss(self, inputs_embeds: Tensor, targets: Tensor, labels: Tensor | None) -> tuple[Tensor, Tensor]:
        out = self.model(inputs_embeds=inputs_embeds, attention_mask=torch.ones(inputs_embeds.shape[:2]))
        if self.causal:
            log_probs = F.log_softmax(out.logits[:, :-1], dim=-1)
            loss = -(targets[:, 1:] * log_probs).sum(-1).mean()
            return loss, loss
        assert labels is not None
        loss = -(labels * F.log_softmax(out.logits, dim=-1)).sum(-1).mean()
        return loss, torch.zeros(())

    def _distance(self, grads: Sequence[Tensor]) -> Tensor:
        names = list(self.params)
        if self.attack.distance == "cosine":
            dot = sum((g * self.observed[n]).sum() for n, g in zip(names, grads, strict=True))
            norm = torch.sqrt(sum((g**2).sum() for g in grads))  # type: ignore[arg-type]
            return 1.0 - dot / (norm * self.observed_norm + 1e-12)  # type: ignore[operator]
        l2 = sum(((g - self.observed[n]) ** 2).sum() for n, g in zip(names, grads, strict=True))
        distance = l2 / self.observed_norm**2  # type: ignore[operator]
        if self.attack.distance == "tag":
            l1 = sum((g - self.observed[n]).abs().sum() for n, g in zip(names, grads, strict=True))
            distance = distance + self.attack.l1_weight * l1 / self.observed_l1  # type: ignore[operator]
        return distance  # type: ignore[return-value]

    def score(self, probs: Tensor, labels: Tensor | None, create_graph: bool) -> tuple[Tensor, Tensor]:
        """Gradient distance and perplexity term of a soft batch."""
        loss, perplexity = self._loss(probs @ self.embeddings, probs, labels)
        grads = torch.autograd.grad(
            loss, list(self.params.values()), create_graph=create_graph, allow_unused=True
        )
        grads = tuple(
            torch.zeros_like(p) if g is None else g for g, p in zip(grads, self.params.values(), strict=True)
        )
        return self._distance(grads), perplexity

    def hard_score(self, tokens: Tensor, labels: Tensor | None) -> float:
        """Gradient distance + prior of a discrete batch (the client's exact loss)."""
        onehot = F.one_hot(tokens, self.embeddings.shape[0]).to(self.embeddings.dtype)
        hard_labels = None
        if labels is not None and self.num_labels is not None:
            hard_labels = F.one_hot(labels, self.num_labels).to(torch.float32)
        distance, perplexity = self.score(onehot, hard_labels, create_graph=False)
        return float(distance + self.attack.prior_weight * perplexity.detach())
