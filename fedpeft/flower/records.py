"""Message keys and conversions between adapter tensors and Flower records."""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import Array, ArrayRecord, RecordDict
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


PACKED = "packed-safetensors"
"""The one Array of a packed ArrayRecord: every tensor of a state in one safetensors buffer."""


def state_to_record(state: Mapping[str, Tensor]) -> ArrayRecord:
    """Named tensors -> an ArrayRecord holding them packed in one Array, keeping names and order.

    Flower 1.41 moves each Array of a message as objects of their own, one request each
    (an adapter of 26 tensors: about 55 requests a message, over TLS on a deployment;
    4-5 s a message on localhost). Packed, a message is a handful of objects. The
    buffer is safetensors (no code in it, every offset checked against its length) with
    the tensors' order in its metadata.
    """
    if not state:
        return ArrayRecord()
    from safetensors.numpy import save

    arrays = {name: np.ascontiguousarray(tensor.detach().cpu().numpy()) for name, tensor in state.items()}
    packed = save(arrays, metadata={"order": json.dumps(list(state))})
    return ArrayRecord({PACKED: Array(np.frombuffer(packed, dtype=np.uint8))})


def is_packed(record: ArrayRecord) -> bool:
    """Whether ``record`` is one :func:`state_to_record` packed."""
    return list(record.keys()) == [PACKED]


def record_to_state(record: ArrayRecord) -> dict[str, Tensor]:
    """ArrayRecord (packed, or one Array per tensor as Flower makes them) -> named CPU tensors."""
    if is_packed(record):
        return unpack_state(record[PACKED].numpy().tobytes())
    return dict(record.to_torch_state_dict())


ACCEPTED_DTYPES = frozenset(
    {"float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "uint32", "bool"}
)
"""Array dtypes torch can take without a copy or a surprise; codecs then check their own."""

_SAFETENSORS_DTYPES = {
    "F16": "float16", "F32": "float32", "F64": "float64", "I8": "int8", "I16": "int16",
    "I32": "int32", "I64": "int64", "U8": "uint8", "U32": "uint32", "BOOL": "bool",
}  # fmt: skip
"""safetensors' dtype codes, by the NumPy name :data:`ACCEPTED_DTYPES` uses."""


def unpack_state(packed: bytes) -> dict[str, Tensor]:
    """The tensors of a packed buffer, in their order.

    The header is read and checked first (its size against the buffer, every dtype,
    the order naming each tensor once); safetensors then checks every offset against
    the bytes before anything is allocated.

    Raises:
        ValueError: Any of those checks fails.

    """
    import torch
    from safetensors import SafetensorError
    from safetensors.numpy import load

    header = _packed_header(packed)
    tensors = {name: info for name, info in header.items() if name != "__metadata__"}
    for name, info in tensors.items():
        dtype = str(info.get("dtype")) if isinstance(info, dict) else "none"
        if _SAFETENSORS_DTYPES.get(dtype) not in ACCEPTED_DTYPES:
            raise ValueError(f"tensor {name[:80]!r}: dtype {str(dtype)[:20]} is not accepted")
    metadata = header.get("__metadata__")
    listed = metadata.get("order") if isinstance(metadata, dict) else None
    order = _json(listed) if isinstance(listed, str) else None
    if (
        not isinstance(order, list)
        or not all(isinstance(n, str) for n in order)
        or sorted(order) != sorted(tensors)
    ):
        raise ValueError("its order metadata does not name each of its tensors once")
    try:
        arrays = load(packed)
    except SafetensorError as err:
        raise ValueError(f"not a safetensors buffer: {err}") from None
    return {name: torch.from_numpy(arrays[name]) for name in order}


def _packed_header(packed: bytes) -> dict:
    """The JSON header of a safetensors buffer, its claimed size checked against the buffer."""
    if len(packed) < 8:
        raise ValueError(f"not a safetensors buffer: {len(packed)} bytes")
    (size,) = struct.unpack("<Q", packed[:8])
    if size > len(packed) - 8:
        raise ValueError(f"not a safetensors buffer: its header claims {size} bytes of {len(packed) - 8}")
    header = _json(packed[8 : 8 + size])
    if not isinstance(header, dict):
        raise ValueError("not a safetensors buffer: its header is not a JSON object")
    return header


def _json(text: str | bytes) -> object:
    """``json.loads``, with nesting too deep for the parser a ValueError like any other bad JSON."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def content_nbytes(content: RecordDict) -> int:
    """Serialised size of a message's content in Flower's protobuf encoding."""
    return serde.recorddict_to_proto(content).ByteSize()
