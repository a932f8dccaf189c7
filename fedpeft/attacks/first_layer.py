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
