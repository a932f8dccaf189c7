"""Mean pooling for a sequence classifier's head: the pooling sentence encoders learned.

A BERT classifier reads the ``[CLS]`` state through its pooler (a dense layer and tanh).
Sentence encoders such as sentence-transformers' all-MiniLM-L6-v2 were trained to mean
the token states instead; their ``[CLS]`` state and pooler were never trained for what
a sentence means. On SST-2 a linear probe of MiniLM's frozen features reaches 70.5 %
through the pooler and 80.9 % on the token mean. Under DP-SGD the gap decides whether
anything is learned: the noise swamps the small class signal of the pooler's output
(docs/differential-privacy.md).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

from fedpeft.errors import ConfigError


class MeanPooler(nn.Module):
    """Replaces a pooler: the mean of the last hidden states over the real (non-pad) tokens.

    The pooler is called with the hidden states only, so the attention mask of the
    current forward pass is handed over by a pre-hook on the encoder (:func:`use_mean_pooling`).
    """

    def __init__(self) -> None:
        super().__init__()
        self.attention_mask: Tensor | None = None

    def remember_mask(self, encoder: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Forward pre-hook of the encoder: keep the attention mask of the pass starting.

        A bound method, not a closure, so that a deep copy of the model hooks its own pooler.
        """
        mask = kwargs.get("attention_mask")
        if mask is None and len(args) > 1:
            mask = args[1]  # BertModel.forward(input_ids, attention_mask, ...)
        self.attention_mask = mask if isinstance(mask, torch.Tensor) else None

    def forward(self, hidden_states: Tensor) -> Tensor:
        """The masked mean over the sequence: ``(batch, length, width) -> (batch, width)``."""
        mask = self.attention_mask
        if mask is None:
            return hidden_states.mean(dim=1)
        weights = mask.to(hidden_states.dtype).unsqueeze(-1)
        return (hidden_states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


def use_mean_pooling(model: PreTrainedModel) -> None:
    """Make ``model``'s classification head read the token mean in place of its pooler.

    Raises:
        ConfigError: The classifier does not read a pooler module (only BERT-family
            classifiers do; RoBERTa's and Llama's heads pick one token themselves).

    """
    encoder = model.base_model
    if not isinstance(getattr(encoder, "pooler", None), nn.Module):
        raise ConfigError(
            f"model.pooling = 'mean': the {model.config.model_type} classifier does not read a "
            "pooler module; mean pooling is for BERT-family classifiers (bert, MiniLM, ...)"
        )
    pooler = MeanPooler()
    encoder.pooler = pooler
    encoder.register_forward_pre_hook(pooler.remember_mask, with_kwargs=True)
