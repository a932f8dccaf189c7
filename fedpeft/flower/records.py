"""Message keys and conversions between adapter tensors and Flower records."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from flwr.app import ArrayRecord, RecordDict
from flwr.common import serde

if TYPE_CHECKING:  # torch is imported where tensors are made, not by every ClientApp start
    from torch import Tensor

GLOBAL_ADAPTER = "global-adapter"
"""ArrayRecord the server sends down: the current global adapter state."""
UPDATE = "update"
"""ArrayRecord a client sends up: its encoded delta (the codec payload)."""
TRAIN_METRICS = "train-metrics"
"""MetricRecord a client sends up: client-id, num-examples, train-loss, steps and, under
DP-SGD, dp-noise-multiplier, dp-sample-rate, dp-steps and epsilon."""
CODEC_MEMORY = "codec-memory"
"""ArrayRecord a client keeps in its own Context.state: its codec's memory (never sent)."""
PRIVACY_LEDGER = "privacy-ledger"
"""ConfigRecord a client keeps in its own Context.state: its DP events as JSON (never sent)."""
DECLINED = "declined"
"""ConfigRecord a client sends instead of an update when it will not train: its reason."""
ROUND_CONFIG = "config"
"""ConfigRecord the server sends down: server-round."""


def state_to_record(state: Mapping[str, Tensor]) -> ArrayRecord:
    """Named tensors -> ArrayRecord, keeping names and order."""
    return ArrayRecord({name: tensor.detach().cpu().contiguous() for name, tensor in state.items()})


def record_to_state(record: ArrayRecord) -> dict[str, Tensor]:
    """ArrayRecord -> named CPU tensors."""
    return dict(record.to_torch_state_dict())


def content_nbytes(content: RecordDict) -> int:
    """Serialised size of a message's content in Flower's protobuf encoding."""
    return serde.recorddict_to_proto(content).ByteSize()
