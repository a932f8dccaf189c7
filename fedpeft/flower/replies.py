"""Reading a client's reply as untrusted input: its size, arrays, metrics and free text.

Everything in a reply was chosen by a device the server does not control, so nothing
in it is converted before it is checked: an array's serialised header is read and
compared with the bytes that follow before NumPy or torch allocate anything (a header
may claim 10^13 elements), metric values are checked for type, finiteness and range
before ``int()`` (which raises on NaN and Inf), and every text a client sends (a
decline reason, an error reason, a tensor name) is clipped and escaped before it
reaches a log line, ``metrics.json`` or the checkpoint.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message
from torch import Tensor

from fedpeft.errors import PayloadError
from fedpeft.flower.records import ACCEPTED_DTYPES, PACKED, content_nbytes, is_packed, unpack_state

REASON_CHARS = 200
"""The most characters of client-chosen text kept in a log line or a stored reason."""

NUMPY_STYPE = "numpy.ndarray"
"""Flower's serialisation type of an Array holding ``numpy.save`` bytes (the only one read)."""

MAX_CLIENT_ID = 2**31 - 1
"""Largest client id accepted (the ``partition-id`` a SuperNode is started with)."""

MAX_COUNT = 2**53
"""Largest integer metric accepted: beyond it a float no longer holds every integer."""


def clip_text(value: object, limit: int = REASON_CHARS) -> str:
    r"""``value`` as one printable line of at most about ``limit`` characters.

    Newlines, control characters and anything else unprintable are escaped as ``repr``
    writes them (``\n``, ``\x1b``), so a client cannot forge log lines; printable text
    is left as it is (clipped text clipped again at a larger limit is unchanged).
    Longer text is cut and says how long it was; only its first ``limit`` characters
    are ever looked at, so a 20 MB reason costs no more than a short one.
    """
    if isinstance(value, (list, tuple)):
        value = value[:limit]  # a config value may be a list of a million items
    text = value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)
    escaped = "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text[:limit])
    if len(text) > limit or len(escaped) > limit:
        return f"{escaped[:limit]}... ({len(text)} characters)"
    return escaped


def reply_nbytes(reply: Message) -> int:
    """What a reply carries, in bytes: its content's protobuf size, or its error's reason.

    Raises:
        PayloadError: The content cannot be serialised at all.

    """
    if reply.has_error():
        return len(str(reply.error.reason or "").encode("utf-8", errors="replace")) + 8
    try:
        return content_nbytes(reply.content)
    except (ValueError, TypeError, OverflowError) as err:
        # Only possible in-process (a simulated client): nothing unserialisable crosses
        # the network, e.g. an integer metric beyond int64 or a string in a MetricRecord.
        raise PayloadError(f"reply cannot be serialised: {clip_text(err, 120)}") from None


def checked_record_to_state(record: ArrayRecord) -> dict[str, Tensor]:
    """ArrayRecord -> named CPU tensors, checking each array before anything is allocated.

    Raises:
        PayloadError: An array is not ``numpy.save`` bytes, has a dtype outside
            :data:`ACCEPTED_DTYPES` (objects, strings, structs, big-endian), a header
            that disagrees with the Array's own dtype and shape, or a size its bytes do
            not match. The message names the tensor.

    """
    if is_packed(record):
        return packed_to_state(record[PACKED])
    return {name: array_to_tensor(name, record[name]) for name in record.keys()}


def packed_to_state(array: Array) -> dict[str, Tensor]:
    """A packed update (:func:`fedpeft.flower.records.state_to_record`) -> named tensors, checked.

    Raises:
        PayloadError: The Array is not a 1-D uint8 ``numpy.save`` buffer, its bytes are
            not safetensors with an order naming each tensor once, or a tensor's dtype is
            outside :data:`ACCEPTED_DTYPES`.

    """
    label = "packed payload"
    if array.stype != NUMPY_STYPE:
        raise PayloadError(f"{label}: serialisation {clip_text(array.stype, 40)!r}, expected {NUMPY_STYPE!r}")
    buffer = npy_to_array(label, array.data)
    if buffer.dtype != np.uint8 or buffer.ndim != 1:
        raise PayloadError(f"{label}: {buffer.dtype.name} {buffer.shape}, expected a 1-D uint8 buffer")
    try:
        return unpack_state(buffer.tobytes())
    except ValueError as err:  # JSON and Unicode errors are ValueErrors too
        raise PayloadError(f"{label}: {clip_text(err, 160)}") from None


def array_to_tensor(name: str, array: Array) -> Tensor:
    """One Flower Array -> a tensor, after checking its header against its bytes."""
    label = f"payload tensor {clip_text(name, 80)}"
    if array.stype != NUMPY_STYPE:
        raise PayloadError(f"{label}: serialisation {clip_text(array.stype, 40)!r}, expected {NUMPY_STYPE!r}")
    data = array.data
    values = npy_to_array(label, data)
    if array.dtype != values.dtype.name or tuple(array.shape) != values.shape:
        raise PayloadError(
            f"{label}: declared {clip_text(array.dtype, 20)} {clip_text(tuple(array.shape), 80)} but "
            f"its bytes hold {values.dtype.name} {values.shape}"
        )
    return torch.from_numpy(values)


def npy_to_array(label: str, data: object) -> np.ndarray:
    """``numpy.save`` bytes -> a fresh array, reading the header before anything is allocated.

    Raises:
        PayloadError: Not bytes, an unreadable header, a dtype outside
            :data:`ACCEPTED_DTYPES` (objects, strings, structs, big-endian), or a size
            the bytes do not match. The message starts with ``label``.

    """
    if not isinstance(data, bytes):
        raise PayloadError(f"{label}: data is {type(data).__name__}, expected bytes")
    stream = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(stream)
        elif version == (2, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(stream)
        else:
            raise ValueError(f"npy format version {version} is not read")
    except (ValueError, TypeError, SyntaxError, OverflowError, EOFError) as err:
        raise PayloadError(f"{label}: unreadable array header ({clip_text(err, 120)})") from None
    if dtype.fields is not None or not dtype.isnative or dtype.name not in ACCEPTED_DTYPES:
        accepted = sorted(ACCEPTED_DTYPES)
        raise PayloadError(f"{label}: dtype {clip_text(dtype.str, 40)} is not one of {accepted}")
    if not all(isinstance(d, int) and d >= 0 for d in shape):
        raise PayloadError(f"{label}: shape {clip_text(shape, 80)} is not a list of sizes >= 0")
    count = math.prod(shape)
    offset = stream.tell()
    if len(data) - offset != count * dtype.itemsize:
        raise PayloadError(
            f"{label}: shape {clip_text(tuple(shape), 80)} of {dtype.name} needs "
            f"{count * dtype.itemsize} bytes, the array carries {len(data) - offset}"
        )
    values = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
    values = values.reshape(shape, order="F" if fortran_order else "C")
    return np.array(values, order="C", copy=True)


def int_metric(metrics: Mapping[str, object], key: str, low: int, high: int) -> int:
    """An integer metric in ``[low, high]``; a float is accepted when it is a whole number.

    Raises:
        PayloadError: Missing, a bool or list, not finite, not whole, or out of range.

    """
    value = metrics.get(key)
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise PayloadError(f"metric {key!r} missing or not an integer: {clip_text(value, 60)}")
    if not low <= value <= high:
        raise PayloadError(f"metric {key!r} = {clip_text(value, 60)} outside [{low}, {high}]")
    return value


def float_metric(metrics: Mapping[str, object], key: str) -> float:
    """A finite float metric.

    Raises:
        PayloadError: Missing, a bool or list, or NaN/Inf.

    """
    value = metrics.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PayloadError(f"metric {key!r} missing or not a number: {clip_text(value, 60)}")
    try:
        number = float(value)
    except OverflowError:  # an int beyond float's range
        number = math.inf
    if not math.isfinite(number):
        raise PayloadError(f"metric {key!r} missing or not a finite number: {clip_text(value, 60)}")
    return number


def optional_float_metric(metrics: Mapping[str, object], key: str) -> float | None:
    """:func:`float_metric`, or None when the client did not send ``key``."""
    return float_metric(metrics, key) if key in metrics else None
