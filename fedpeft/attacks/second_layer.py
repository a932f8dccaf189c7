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


class PrefixViews(NamedTuple):
    """What the model makes of a batch of prefixes at their last position, at several layers."""

    layer_inputs: tuple[Tensor, ...]
    """One ``(n, d)`` float64 tensor per layer: that layer's q/k/v input."""
    log_probs: Tensor
    """``(n,)`` float64: log p(last token | the tokens before it); 0 for one-token prefixes."""


@dataclass(frozen=True)
class PrefixLayers:
    """Several layers whose inputs are functions of the prefix, read in one forward pass.

    Past the second layer's rank its input says little about which prefix is right:
    it is dominated by its own token, so a wrong prefix ending in the right token lies
    nearly as close to the span as the true one. Deeper layers mix in more context;
    on SmolLM2 at batch 4 the true next token ranks first among the batch's tokens
    at 6-8 % of steps by the second layer's span and at 49-81 % by the mean over
    layers 10 to 20.

    Attributes:
        layers: Layer indices (1 is the second layer).
        lora_a_names: Per layer, the adapter-state names of its q/k/v LoRA A weights.

    """

    layers: tuple[int, ...]
    lora_a_names: tuple[tuple[str, ...], ...]
    _model: nn.Module
    _norms: tuple[nn.Module, ...]

    def last_position(self, token_ids: Tensor) -> PrefixViews:
        """Every layer's input at the last position of each ``(n, length)`` prefix."""
        with torch.no_grad():
            out = self._model(
                input_ids=token_ids, attention_mask=torch.ones_like(token_ids), output_hidden_states=True
            )
            inputs = tuple(
                norm(out.hidden_states[layer][:, -1]).double()
                for layer, norm in zip(self.layers, self._norms, strict=True)
            )
            if token_ids.shape[1] < 2:
                return PrefixViews(inputs, inputs[0].new_zeros(token_ids.shape[0]))
            log_probs = torch.log_softmax(out.logits[:, -2].double(), dim=-1)
            return PrefixViews(inputs, log_probs.gather(1, token_ids[:, -1:]).squeeze(1))


def prefix_layers_of(model: nn.Module, first: float = 1 / 3, last: float = 2 / 3) -> PrefixLayers:
    """The layers from ``first`` to ``last`` of the depth (at least the second) that carry LoRA.

    Raises:
        AttackError: As :func:`second_layer_of`, or no chosen layer carries LoRA.

    """
    second_layer_of(model)  # the same checks: a Llama-style decoder with two layers or more
    _, inner = unwrap(model)
    depth = len(inner.layers)
    chosen = range(max(1, int(depth * first)), max(1, int(depth * last)) + 1)
    layers, names, norms = [], [], []
    for index in chosen:
        layer = inner.layers[index]
        projections = [getattr(layer.self_attn, p, None) for p in ("q_proj", "k_proj", "v_proj")]
        found = lora_a_names_of(model, projections)
        if found:
            layers.append(index)
            names.append(found)
            norms.append(layer.input_layernorm)
    if not layers:
        raise AttackError(f"no LoRA on the q/k/v projections of layers {chosen.start}-{chosen.stop - 1}")
    return PrefixLayers(tuple(layers), tuple(names), model, tuple(norms))
