"""The layers after the first of a rotary decoder, as an attacker sees them.

Their input at position i is a function of the tokens up to i (causal attention), so a
prefix can be checked against the span of a layer's LoRA A gradients one position at
a time: DAGER's way (with the second layer) of turning a token set into sequences.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from fedpeft.attacks.first_layer import lora_a_names_of, unwrap
from fedpeft.errors import AttackError


class PrefixViews(NamedTuple):
    """What the model makes of a batch of prefixes at their last position, at several layers."""

    layer_inputs: tuple[Tensor, ...]
    """One ``(n, d)`` float64 tensor per layer: that layer's q/k/v input."""
    log_probs: Tensor
    """``(n,)`` float64: log p(last token | the tokens before it); 0 for one-token prefixes."""


@dataclass(frozen=True)
class PrefixLayers:
    """Layers whose inputs are functions of the prefix, read in one forward pass.

    The second layer alone is DAGER's check (:func:`second_layer_of`). Past its rank
    its input says little about which prefix is right: it is dominated by its own
    token, so a wrong prefix ending in the right token lies nearly as close to the
    span as the true one. Deeper layers mix in more context; on SmolLM2 at batch 4
    the true next token ranks first among the batch's tokens at 6-8 % of steps by the
    second layer's span and at 49-81 % by the mean over layers 10 to 20
    (:func:`prefix_layers_of`).

    Attributes:
        layers: Layer indices (1 is the second layer).
        lora_a_names: Per layer, the adapter-state names of its q/k/v LoRA A weights.

    """

    layers: tuple[int, ...]
    lora_a_names: tuple[tuple[str, ...], ...]
    _model: nn.Module
    _norms: tuple[nn.Module, ...]

    def rows(self, gradients: Mapping[str, Tensor]) -> list[Tensor]:
        """Each layer's LoRA A gradient rows stacked, ``(m, d)`` float64, from an adapter gradient."""
        return [torch.cat([gradients[name].double() for name in names]) for names in self.lora_a_names]

    def last_position(self, token_ids: Tensor) -> PrefixViews:
        """Every layer's input at the last position of each ``(n, length)`` prefix.

        Also the log probability the model gives that last token after the rest.
        """
        with torch.no_grad():
            out = self._model(
                input_ids=token_ids, attention_mask=torch.ones_like(token_ids), output_hidden_states=True
            )
            inputs = self._inputs(out.hidden_states, -1)
            if token_ids.shape[1] < 2:
                return PrefixViews(inputs, inputs[0].new_zeros(token_ids.shape[0]))
            log_probs = torch.log_softmax(out.logits[:, -2].double(), dim=-1)
            return PrefixViews(inputs, log_probs.gather(1, token_ids[:, -1:]).squeeze(1))

    def extensions(self, prefix: Tensor, vocabulary: Tensor) -> tuple[PrefixViews, tuple[Tensor, ...]]:
        """:meth:`last_position` of ``prefix`` extended by each token of ``vocabulary``, from one cache.

        The prefix runs once; its keys and values are shared by every extension, so
        a step costs one token per candidate instead of the whole prefix again. That
        run's inputs come back too, as :meth:`sentence` gives them.

        Args:
            prefix: ``(length,)`` token ids.
            vocabulary: ``(n,)`` candidate next tokens.

        """
        hf, inner = unwrap(self._model)
        cache_name = _cache_argument(inner)
        with torch.no_grad():
            out = inner(input_ids=prefix.unsqueeze(0), use_cache=True, output_hidden_states=True)
            log_probs = torch.log_softmax(hf.lm_head(out.last_hidden_state[:, -1]).double(), dim=-1)[0]
            cache = out[cache_name]
            cache.batch_repeat_interleave(len(vocabulary))
            extended = inner(
                input_ids=vocabulary.unsqueeze(1),
                attention_mask=torch.ones(len(vocabulary), len(prefix) + 1, dtype=torch.long),
                output_hidden_states=True,
                **{cache_name: cache},
            )
        views = PrefixViews(self._inputs(extended.hidden_states, -1), log_probs[vocabulary])
        return views, tuple(states[0] for states in self._inputs(out.hidden_states, slice(None)))

    def sentence(self, token_ids: Tensor) -> tuple[Tensor, ...]:
        """Every layer's ``(length, d)`` inputs at every position of one ``(length,)`` sentence."""
        _, inner = unwrap(self._model)
        with torch.no_grad():
            out = inner(input_ids=token_ids.unsqueeze(0), output_hidden_states=True)
        return tuple(states[0] for states in self._inputs(out.hidden_states, slice(None)))

    def _inputs(self, hidden_states: tuple[Tensor, ...], position: int | slice) -> tuple[Tensor, ...]:
        """Each chosen layer's normed input at ``position``, float64."""
        return tuple(
            norm(hidden_states[layer][:, position]).double()
            for layer, norm in zip(self.layers, self._norms, strict=True)
        )


def _cache_argument(inner: nn.Module) -> str:
    """The keyword the installed transformers takes a key/value cache by (renamed in 5.x)."""
    return "cache" if "cache" in inspect.signature(inner.forward).parameters else "past_key_values"


def second_layer_of(model: nn.Module) -> PrefixLayers:
    """The second layer of a peft-wrapped rotary decoder (one entry in every field).

    Raises:
        AttackError: Not a Llama-style decoder, fewer than two layers, or no LoRA on
            the second layer's q/k/v projections.

    """
    return _layers_with_lora(model, range(1, 2))


def prefix_layers_of(model: nn.Module, first: float = 1 / 3, last: float = 2 / 3) -> PrefixLayers:
    """The layers from ``first`` to ``last`` of the depth (never the first layer) that carry LoRA.

    Raises:
        AttackError: As :func:`second_layer_of`, or no chosen layer carries LoRA.

    """
    depth = len(_decoder(model).layers)
    deepest = min(depth - 1, max(1, int(depth * last)))
    return _layers_with_lora(model, range(max(1, int(depth * first)), deepest + 1))


def _decoder(model: nn.Module) -> Any:
    """The Llama-style inner model of ``model``, checked to have two layers or more."""
    hf, inner = unwrap(model)
    if not (hasattr(inner, "embed_tokens") and hasattr(inner, "layers")):
        raise AttackError(
            f"{type(hf).__name__}: sequence assembly by prefix needs a causal decoder "
            "(Llama-style); for encoders the token_set attack orders tokens by position"
        )
    if len(inner.layers) < 2:
        raise AttackError(f"{type(hf).__name__}: sequence assembly needs two layers")
    return inner


def _layers_with_lora(model: nn.Module, chosen: range) -> PrefixLayers:
    """The layers of ``chosen`` whose q/k/v projections carry LoRA."""
    inner = _decoder(model)
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
        span = f"layer {chosen.start}" if len(chosen) == 1 else f"layers {chosen.start}-{chosen.stop - 1}"
        raise AttackError(f"{type(unwrap(model)[0]).__name__}: no LoRA on the q/k/v projections of {span}")
    return PrefixLayers(tuple(layers), tuple(names), model, tuple(norms))
