"""The second transformer layer of a rotary decoder, as an attacker sees it.

Its input at position i is a function of the tokens up to i (causal attention), so a
prefix can be checked against the span of the second layer's LoRA A gradients one
position at a time: DAGER's way of turning a token set into sequences.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

from fedpeft.attacks.first_layer import lora_a_names_of, unwrap
from fedpeft.errors import AttackError


class PrefixView(NamedTuple):
    """What the model makes of a batch of prefixes at their last position."""

    layer_inputs: Tensor
    """``(n, d)`` float64: the second layer's input."""
    log_probs: Tensor
    """``(n,)`` float64: log p(last token | the tokens before it); 0 for one-token prefixes."""


@dataclass(frozen=True)
class SecondLayer:
    """Where the second layer's inputs show, and how to compute them for a prefix.

    Attributes:
        lora_a_names: Adapter-state names of the LoRA A weights of the second layer's
            q/k/v projections.

    """

    lora_a_names: tuple[str, ...]
    _model: nn.Module
    _norm: nn.Module

    def last_position(self, token_ids: Tensor) -> PrefixView:
        """The second layer's input at the last position of each prefix.

        Also the log probability the model gives that last token after the rest.

        Args:
            token_ids: ``(n, length)`` prefixes, unpadded.

        """
        with torch.no_grad():
            out = self._model(
                input_ids=token_ids, attention_mask=torch.ones_like(token_ids), output_hidden_states=True
            )
            inputs = self._norm(out.hidden_states[1][:, -1]).double()
            if token_ids.shape[1] < 2:
                return PrefixView(inputs, inputs.new_zeros(token_ids.shape[0]))
            log_probs = torch.log_softmax(out.logits[:, -2].double(), dim=-1)
            return PrefixView(inputs, log_probs.gather(1, token_ids[:, -1:]).squeeze(1))


def second_layer_of(model: nn.Module) -> SecondLayer:
    """Locate the second layer of a peft-wrapped rotary decoder.

    Raises:
        AttackError: Not a Llama-style decoder, fewer than two layers, or no LoRA on
            the second layer's q/k/v projections.

    """
    hf, inner = unwrap(model)
    if not (hasattr(inner, "embed_tokens") and hasattr(inner, "layers")):
        raise AttackError(
            f"{type(hf).__name__}: sequence assembly by prefix needs a causal decoder "
            "(Llama-style); for encoders the token_set attack orders tokens by position"
        )
    if len(inner.layers) < 2:
        raise AttackError(f"{type(hf).__name__}: sequence assembly needs two layers")
    layer = inner.layers[1]
    projections = [getattr(layer.self_attn, p, None) for p in ("q_proj", "k_proj", "v_proj")]
    lora_a_names = lora_a_names_of(model, projections)
    if not lora_a_names:
        raise AttackError(f"{type(hf).__name__}: no LoRA on the second layer's q/k/v projections")
    return SecondLayer(lora_a_names, model, layer.input_layernorm)
