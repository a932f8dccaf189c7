"""The no-gradient baseline: what the public language model alone would guess.

It reads nothing of the observed update, so whatever it "recovers" is what any party
could write without the client: common words, frequent openings. An attack is only a
leak to the extent it beats this; under strong DP it should not.
"""

from __future__ import annotations

from typing import Any

import torch

from fedpeft.attacks.base import ATTACKS, Reconstruction
from fedpeft.attacks.observation import Observation
from fedpeft.errors import AttackError
from fedpeft.models import LoadedModel, load_adapter_state


@ATTACKS.register("lm_prior")
class LmPrior:
    """Greedy continuations of the model's start token, with the sent adapter applied.

    Args:
        num_sequences: How many sequences to guess (give it the batch size to be fair).
        length: Tokens per guessed sequence.

    """

    def __init__(self, num_sequences: int = 1, length: int = 24) -> None:
        if num_sequences < 1 or length < 1:
            raise ValueError("num_sequences and length must be >= 1")
        self.num_sequences = num_sequences
        self.length = length

    def reconstruct(self, observation: Observation, target: LoadedModel) -> Reconstruction:
        """Guess sequences from the model alone; ``observation.update`` is not read."""
        model: Any = target.model
        if not hasattr(model.get_base_model(), "generate") or model.config.is_encoder_decoder:
            raise AttackError("lm_prior needs a causal language model")
        if getattr(model.get_base_model(), "lm_head", None) is None:
            raise AttackError("lm_prior needs a causal language model (no lm_head)")
        tokenizer = target.tokenizer
        start = next(
            (
                t
                for t in (tokenizer.bos_token_id, tokenizer.cls_token_id, tokenizer.eos_token_id)
                if t is not None
            ),
            None,
        )
        if start is None:
            raise AttackError("lm_prior: the tokenizer has no BOS, CLS or EOS token to start from")
        load_adapter_state(target.model, observation.global_state)
        model.eval()
        with torch.no_grad():
            # Beam-free diversity: the i-th guess starts from the i-th likeliest first token.
            first = model(input_ids=torch.tensor([[start]])).logits[0, -1].topk(self.num_sequences).indices
            prompts = torch.stack([torch.full_like(first, start), first], dim=1)
            out = model.generate(
                input_ids=prompts,
                attention_mask=torch.ones_like(prompts),
                max_new_tokens=max(self.length - 2, 1),
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else start,
            )
        sequences = tuple(tuple(int(t) for t in row) for row in out)
        seen: dict[int, None] = {}
        for sequence in sequences:
            seen |= dict.fromkeys(sequence)
        tokens = tuple(seen)
        return Reconstruction(tokens, tuple(1.0 for _ in tokens), sequences, {"start_token": start})
