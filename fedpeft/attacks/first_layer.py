"""The first transformer layer as an attacker sees it.

Which LoRA A gradients hold the layer's inputs, and what that input is for every
vocabulary token.

Two families are supported, after DAGER's reference implementation:

* decoders with rotary positions (Llama, SmolLM2, Qwen2, Mistral, ...): the input of the
  first layer's q/k/v projections is ``input_layernorm(embed_tokens[v])``, a function
  of the token alone, since the rotation acts after the projection;
* encoders with absolute positions (BERT, MiniLM, RoBERTa, ...): the input is
  ``LayerNorm(word[v] + position[p] + token_type[0])``, one candidate per
  (token, position).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from peft.tuners.lora import LoraLayer
from torch import Tensor, nn

from fedpeft.attacks.observation import Observation
from fedpeft.attacks.span import row_span_basis
from fedpeft.errors import AttackError

PositionKind = Literal["rotary", "absolute"]


@dataclass(frozen=True)
class FirstLayer:
    """What a span check needs to know about one model.

    Attributes:
        positions: ``rotary``: one candidate set for every position; ``absolute``:
            one per position.
        lora_a_names: Adapter-state names of the LoRA A weights whose input is the
            first layer's input (q/k/v projections that carry LoRA).
        max_positions: Positions the model embeds (absolute positions only matter).

    """

    positions: PositionKind
    lora_a_names: tuple[str, ...]
    max_positions: int
    _candidates: Callable[[int], Tensor]

    def candidates(self, position: int = 0) -> Tensor:
        """``(vocab, d)``: the first layer's input for every token at ``position``."""
        with torch.no_grad():
            return self._candidates(position).detach().double()


def unwrap(model: nn.Module) -> tuple[Any, Any]:
    """The transformers model inside a peft wrapper, and its base (``LlamaModel``, ...).

    Typed Any: architectures are told apart by their attributes, which nn.Module's
    __getattr__ types as Tensor | Module.
    """
    wrapped: Any = model
    hf: Any = wrapped.get_base_model() if hasattr(wrapped, "get_base_model") else wrapped
    return hf, getattr(hf, "base_model", hf)


def lora_a_names_of(model: nn.Module, projections: list[Any]) -> tuple[str, ...]:
    """Adapter-state names of the LoRA A weights of ``projections`` (modules of ``model``)."""
    names = {id(module): name for name, module in model.named_modules()}
    return tuple(
        f"{names[id(projection)]}.lora_A.{adapter}.weight"
        for projection in projections
        if isinstance(projection, LoraLayer)
        for adapter in projection.lora_A  # type: ignore[attr-defined]
    )


def first_layer_of(model: nn.Module) -> FirstLayer:
    """Locate the first layer of a peft-wrapped ``model`` and its LoRA A weights.

    Raises:
        AttackError: The architecture is not one of the supported families, or no
            first-layer projection carries LoRA.

    """
    hf, inner = unwrap(model)
    if hasattr(inner, "embed_tokens") and hasattr(inner, "layers"):
        layer = inner.layers[0]
        norm, embed = layer.input_layernorm, inner.embed_tokens
        projections = [getattr(layer.self_attn, p, None) for p in ("q_proj", "k_proj", "v_proj")]
        kind: PositionKind = "rotary"
        max_positions = int(getattr(hf.config, "max_position_embeddings", 2048))

        def candidates(position: int) -> Tensor:
            return norm(embed.weight)

    elif hasattr(inner, "embeddings") and hasattr(inner.embeddings, "position_embeddings"):
        embeddings = inner.embeddings
        attention = inner.encoder.layer[0].attention.self
        projections = [getattr(attention, p, None) for p in ("query", "key", "value")]
        kind = "absolute"
        max_positions = embeddings.position_embeddings.num_embeddings
        token_type = getattr(embeddings, "token_type_embeddings", None)

        def candidates(position: int) -> Tensor:
            summed = embeddings.word_embeddings.weight + embeddings.position_embeddings.weight[position]
            if token_type is not None:
                summed = summed + token_type.weight[0]
            return embeddings.LayerNorm(summed)

    else:
        raise AttackError(
            f"{type(hf).__name__}: first-layer attacks support rotary decoders (Llama-style "
            "embed_tokens/layers) and absolute-position encoders (BERT-style embeddings)"
        )
    lora_a_names = lora_a_names_of(model, projections)
    if not lora_a_names:
        raise AttackError(
            f"{type(hf).__name__}: no LoRA on the first layer's q/k/v projections "
            "(adapter.target_modules), so no gradient holds the layer's inputs"
        )
    return FirstLayer(kind, lora_a_names, max_positions, candidates)


@dataclass(frozen=True)
class ObservedFirstLayer:
    """The first layer, and what one observation shows of it.

    Attributes:
        layer: Where the first layer's inputs show (:func:`first_layer_of`).
        gradients: The observation's gradient estimate, every adapter tensor.
        basis: ``(d, rank)`` orthonormal basis of the first layer's A gradient rows.

    """

    layer: FirstLayer
    gradients: dict[str, Tensor]
    basis: Tensor

    @property
    def rows(self) -> Tensor:
        """The first layer's A gradients stacked: ``(sum of ranks, d)``."""
        return torch.cat([self.gradients[name] for name in self.layer.lora_a_names])

    @property
    def saturated(self) -> bool:
        """Whether the span has as many dimensions as rows: more inputs than rank, maybe."""
        return self.basis.shape[1] >= self.rows.shape[0]

    def details(self) -> dict[str, float | int | str]:
        """What every first-layer attack reports; with a note when the gradient is zero."""
        details: dict[str, float | int | str] = {
            "gradient_rank": self.basis.shape[1],
            "positions": self.layer.positions,
        }
        if self.basis.shape[1] == 0:
            details["note"] = "the first layer's LoRA A gradient is zero (LoRA B = 0?)"
        return details


def observe_first_layer(
    observation: Observation, model: nn.Module, rank_tolerance: float
) -> ObservedFirstLayer:
    """Locate the first layer of ``model`` and take the span of its A gradients.

    Raises:
        AttackError: The architecture is unsupported, or the observed update lacks the
            first layer's LoRA A (a codec or config that does not send it).

    """
    layer = first_layer_of(model)
    missing = [name for name in layer.lora_a_names if name not in observation.update]
    if missing:
        raise AttackError(f"the observed update lacks the first layer's LoRA A: {missing[:2]}")
    gradients = observation.gradient_estimate()
    basis = row_span_basis([gradients[name] for name in layer.lora_a_names], rank_tolerance)
    return ObservedFirstLayer(layer, gradients, basis)
