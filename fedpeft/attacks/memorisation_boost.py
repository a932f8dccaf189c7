"""ReCIT's memorisation boost: the server sends an adapter trained on personal notes.

A malicious server fine-tunes the adapter it sends on "personal notes" before clients
train on it.

Paper: ReCIT: Reconstructing Full Private Data from Gradient in Parameter-Efficient
Fine-Tuning of Large Language Models (Xie, He, Li, Jia, Ji, 2025).

The server has none of the clients' data, only the format personal data takes. It
builds a synthetic set D_gen of PII-bearing messages, each followed by a personal note
that restates the secret (``"... My phone number is 9 3 2 5. Juliana Moreau's phone
number is 9 3 2 5."``), plus summary samples where two messages are followed by both
notes, and trains the adapter on it with the ordinary causal-LM loss. The model it
sends has learned to restate and continue secrets; ReCIT then uses it as the language
model that orders the tokens the gradient reveals (:mod:`fedpeft.attacks.recit`).

Notes:
    Interpreted from the paper's description (its method section was not available):
    the note format, the summary samples' layout and the training recipe are this
    implementation's choices. The boosted adapter has a non-zero LoRA B, so the first
    layer's A gradient carries the batch's inputs without the crafted-B trick.

"""

from __future__ import annotations

from collections.abc import Mapping

import datasets
import torch
from torch import Tensor

from fedpeft.attacks.pii import make_pii_records
from fedpeft.config import TrainConfig
from fedpeft.data.loading import TEXT
from fedpeft.errors import AttackError
from fedpeft.models import AdapterState, LoadedModel, adapter_state, load_adapter_state
from fedpeft.training import make_loader, tokenize, train_local


def pnote_dataset(count: int, seed: int) -> list[str]:
    """D_gen: ``count`` note-appended messages and ``count // 2`` two-person summaries."""
    if count < 2:
        raise ValueError(f"the PNote dataset needs at least 2 records, got {count}")
    records = make_pii_records(count, seed)
    samples = [f"{r.text} {r.note}" for r in records]
    pairs = zip(records[::2], records[1::2], strict=False)
    samples += [f"{a.text} {b.text} Notes: {a.note} {b.note}" for a, b in pairs]
    return samples


def boost_adapter(
    target: LoadedModel,
    global_state: Mapping[str, Tensor],
    steps: int,
    seed: int,
    records: int = 256,
    lr: float = 2e-3,
    batch_size: int = 8,
    device: torch.device | None = None,
) -> AdapterState:
    """``global_state`` fine-tuned on :func:`pnote_dataset` for ``steps`` AdamW steps.

    ``target`` is left holding the boosted adapter. The server's own randomness
    (``seed``) draws D_gen: it shares no secret with any client.

    Raises:
        AttackError: ``target`` is not a causal language model.

    """
    if getattr(target.model.get_base_model(), "lm_head", None) is None:
        raise AttackError("the memorisation boost trains a causal language model (model.task = causal-lm)")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    texts = pnote_dataset(records, seed)
    encoded = tokenize(datasets.Dataset.from_dict({TEXT: texts}), target.tokenizer, 96, "causal-lm")
    loader = make_loader(encoded, target.tokenizer, "causal-lm", batch_size, shuffle=True, seed=seed)
    load_adapter_state(target.model, global_state)
    config = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, optimizer="adamw")  # type: ignore[call-arg]
    torch.manual_seed(seed)
    device = device or next(target.model.parameters()).device
    train_local(target.model, loader, config, device)
    boosted = {name: value.detach().cpu().clone() for name, value in adapter_state(target.model).items()}
    target.model.eval()
    return boosted
