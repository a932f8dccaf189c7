"""Property-based: no reply, however built, ends the run or moves the global adapter unduly.

Hypothesis builds reply structures a device could send (random records and keys, metric
values of every type incl. NaN, Inf, 1e300 and lists, arrays of odd dtypes, shapes,
serialisations and declared sizes, error and declined replies) and checks, against the
real strategy, codec and aggregator over a tiny adapter, that

- no exception escapes ``aggregate_train``;
- a rejected reply alone leaves the global adapter unchanged (nothing is returned);
- a rejected reply among honest ones leaves the aggregate bit-identical to the honest
  replies' alone;
- an accepted reply never makes the global adapter non-finite;
- every rejection came from a named check, not from the catch-all (which logs the
  exception type as a bug), unless the reply holds what cannot cross the network.

10,000 cases in all (5,500 + 2,500 + 2,000); about 50 s of one idle core.
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedpeft.flower.records import DECLINED, TRAIN_METRICS, UPDATE, record_to_state
from tests.flower.reply_builders import (
    GLOBAL,
    error_reply,
    honest_replies,
    make_strategy,
    server_identity,  # noqa: F401 - autouse fixture
    start_round,
    to_node,
)

FUZZ = settings(
    deadline=None,
    database=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,
    ],
)
NAMES = list(GLOBAL)
ROGUE_NODE = 999

# --- metric values and records -------------------------------------------------------

numbers = st.one_of(
    st.integers(-3, 300),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([math.nan, math.inf, -math.inf, 1e300, -1e300, 0.5, 2.0**53, 2.0**63, 1e15]),
)
metric_values = st.one_of(
    numbers,
    st.lists(st.integers(-5, 5), max_size=3),
    st.lists(st.floats(allow_nan=True), max_size=3),
)
METRIC_KEYS = ["client-id", "num-examples", "train-loss", "train-seconds", "steps"]
DP_KEYS = ["dp-noise-multiplier", "dp-sample-rate", "dp-steps", "epsilon"]
HONEST = {"client-id": 3, "num-examples": 10, "train-loss": 0.5, "train-seconds": 1.0, "steps": 3}


@st.composite
def metric_records(draw: st.DrawFn) -> tuple[MetricRecord, bool]:
    """A train-metrics record: each key honest, changed, missing or extra; maybe a bool."""
    values: dict[str, object] = {}
    for key in METRIC_KEYS + DP_KEYS * draw(st.booleans()):
        choice = draw(st.sampled_from(["honest", "honest", "random", "missing"]))
        if choice == "honest":
            values[key] = HONEST.get(key, 0.5)
        elif choice == "random":
            values[key] = draw(metric_values)
    for _ in range(draw(st.integers(0, 2))):
        values[draw(st.text(max_size=8))] = draw(metric_values)
    record = MetricRecord(values)
    wire_only = True
    if draw(st.integers(0, 9)) == 0:  # bypass Flower's type check, as in-process code could
        record.__dict__["_data"][draw(st.sampled_from(METRIC_KEYS))] = draw(
            st.sampled_from([True, False, "12", None, b"\x00"])
        )
        wire_only = False
    return record, wire_only


# --- arrays ---------------------------------------------------------------------------

DTYPES = [
    "float32", "float32", "float16", "float64", "int8", "int32", "int64", "uint8", "uint16",
    "uint64", "bool", "complex64", ">f4", ">i8", "<U3", "S2", "V4", "M8[s]", "m8[ms]",
]  # fmt: skip
DESCRS: list[object] = ["<f4", ">f4", "|O", "<U3", "|b1", "<c8", "<M8[s]", [("a", "<f4")], "<f8", "|u1"]


def npy_header(descr: object, shape: tuple, fortran: bool) -> bytes:
    stream = io.BytesIO()
    np.lib.format.write_array_header_1_0(stream, {"descr": descr, "fortran_order": fortran, "shape": shape})
    return stream.getvalue()


shapes = st.one_of(
    st.sampled_from([(2, 4), (4, 2), (8,), (), (0,), (2, 4, 1), (1, 2, 4)]),
    st.lists(st.integers(0, 5), max_size=3).map(tuple),
)
huge_shapes = st.sampled_from([(10**5, 10**8), (2**31 - 1, 2**31 - 1), (10**9,), (2, 4, 10**9)])
values = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.sampled_from([3.0e38, -3.4e38, 1e-45, 0.0]),
)


@st.composite
def arrays(draw: st.DrawFn, shape_of: tuple) -> tuple[Array, bool]:
    """An Array: a real ndarray of some dtype and shape, or hand-written fields and bytes."""
    kind = draw(st.sampled_from(["ndarray", "ndarray", "ndarray", "header", "raw"]))
    if kind == "ndarray":
        shape = shape_of if draw(st.booleans()) else draw(shapes)
        dtype = np.dtype(draw(st.sampled_from(DTYPES)))
        fill = draw(values)
        with np.errstate(all="ignore"):
            if dtype.kind in "fc":
                ndarray = np.full(shape, fill, dtype=dtype)
            elif dtype.kind in "iub":
                ndarray = np.full(shape, 3, dtype=dtype)
            else:
                ndarray = np.zeros(shape, dtype=dtype)
        if draw(st.integers(0, 4)) == 0 and ndarray.ndim == 2:
            ndarray = np.asfortranarray(ndarray)
        return Array(ndarray), True
    shape = draw(st.one_of(shapes, huge_shapes))
    if kind == "header":
        body = draw(st.binary(max_size=64))
        data = npy_header(draw(st.sampled_from(DESCRS)), shape, draw(st.booleans())) + body
    else:
        data = draw(st.binary(max_size=96))
    dtype = draw(st.sampled_from(["float32", "object", "<U3", "", "float64"]))
    declared = shape if draw(st.booleans()) else draw(shapes)
    stype = draw(st.sampled_from(["numpy.ndarray", "numpy.ndarray", "torch.Tensor", "", "pickle"]))
    return Array(dtype, tuple(declared), stype, data), True


@st.composite
def update_records(draw: st.DrawFn) -> tuple[ArrayRecord, bool]:
    """The update record: each tensor honest or odd, some missing, some extra."""
    record = ArrayRecord()
    wire_only = True
    for name in NAMES + ["junk", "layer.lora_A.default.weight\n"] * draw(st.booleans()):
        choice = draw(st.sampled_from(["honest", "odd", "odd", "missing"]))
        shape = tuple(GLOBAL.get(name, torch.zeros(2, 4)).shape)
        if choice == "honest":
            record[name] = Array(np.full(shape, 0.01, dtype="float32"))
        elif choice == "odd":
            record[name], ok = draw(arrays(shape))
            wire_only = wire_only and ok
    return record, wire_only


# --- whole replies --------------------------------------------------------------------

texts = st.one_of(st.text(max_size=40), st.just("x\n" * 300), st.binary(max_size=20))


@st.composite
def replies(draw: st.DrawFn) -> tuple[Message, bool]:
    """Any reply: an error, a decline, or records of every kind (missing, extra, odd)."""
    kind = draw(st.sampled_from(["error", "declined", "records", "records", "records", "records"]))
    if kind == "error":
        reason = draw(st.one_of(st.text(max_size=60), st.just("boom\n" * 100)))
        return error_reply(ROGUE_NODE, reason, code=draw(st.integers(0, 10))), True
    content = RecordDict()
    wire_only = True
    if kind == "declined" or draw(st.integers(0, 9)) == 0:
        reason = draw(st.one_of(texts, st.integers(), st.lists(st.integers(), max_size=3)))
        content[DECLINED] = ConfigRecord({"reason": reason} if draw(st.booleans()) else {})
    others = st.sampled_from([MetricRecord({"x": 1}), ConfigRecord({"y": "z"}), ArrayRecord()])
    for key, records in ((UPDATE, update_records()), (TRAIN_METRICS, metric_records())):
        choice = draw(st.integers(0, 9))
        if choice >= 2:
            content[key], ok = draw(records)
            wire_only = wire_only and ok
        elif choice == 1:  # a record of the wrong type under the key
            content[key] = draw(others)
    if draw(st.booleans()):
        content["extra"] = draw(others)
    return Message(content, reply_to=to_node(ROGUE_NODE)), wire_only


# --- the properties -------------------------------------------------------------------


@pytest.fixture(scope="module")
def quiet() -> Iterator[None]:
    """Thousands of rejection lines would only slow the run; the properties check them."""
    loggers = [logging.getLogger("fedpeft"), logging.getLogger("flwr")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    yield
    for logger, level in zip(loggers, levels, strict=True):
        logger.setLevel(level)


AGGREGATORS = ["fedavg", "trimmed_mean", "krum"]
_CACHE: dict[str, object] = {}


def strategy_for(aggregator: str):
    """One strategy per aggregator, reused: every round starts afresh in configure_train
    (these aggregators keep no state), which keeps 10,000 cases within a minute."""
    if aggregator not in _CACHE:
        _CACHE[aggregator] = make_strategy(aggregator=aggregator)
    strategy = _CACHE[aggregator]
    start_round(strategy, 1, nodes=1)  # type: ignore[arg-type]
    return strategy


def honest() -> list[Message]:
    if "honest" not in _CACHE:
        _CACHE["honest"] = honest_replies(2)
    return _CACHE["honest"]  # type: ignore[return-value]


def baseline(aggregator: str) -> dict[str, torch.Tensor]:
    """The aggregate of the honest replies alone."""
    key = f"baseline-{aggregator}"
    if key not in _CACHE:
        arrays, _ = strategy_for(aggregator).aggregate_train(1, honest())
        assert arrays is not None
        _CACHE[key] = record_to_state(arrays)
    return _CACHE[key]  # type: ignore[return-value]


def check_reply(reply: Message, wire_only: bool, aggregator: str, alone: bool) -> None:
    """Aggregate ``reply`` alone or after the honest replies, and check the properties."""
    expected = baseline(aggregator)
    strategy = strategy_for(aggregator)
    arrays, _ = strategy.aggregate_train(1, [reply] if alone else [*honest(), reply])
    rejected = [r for r in strategy.traffic.rejected if r["node_id"] == ROGUE_NODE]
    if rejected:
        reason = str(rejected[0]["reason"])
        assert "\n" not in reason and len(reason) < 700
        if wire_only:
            assert " while decoding" not in reason, reason  # a named check caught it
        if alone:  # nothing usable: nothing is returned, the global adapter stays
            assert arrays is None and not strategy.traffic.clients
        else:  # bit-identical to the honest replies alone
            assert arrays is not None
            got = record_to_state(arrays)
            assert all(torch.equal(got[n], expected[n]) for n in expected)
    elif arrays is not None:  # accepted: whatever it did, the adapter stays finite
        assert all(torch.isfinite(t).all() for t in record_to_state(arrays).values())


@settings(FUZZ, max_examples=5500)
@given(reply=replies(), aggregator=st.sampled_from(AGGREGATORS), alone=st.booleans())
def test_any_reply(quiet: None, reply: tuple[Message, bool], aggregator: str, alone: bool) -> None:
    check_reply(*reply, aggregator, alone)


@settings(FUZZ, max_examples=2500)
@given(metrics=metric_records(), alone=st.booleans())
def test_any_metrics_with_an_honest_update(
    quiet: None, metrics: tuple[MetricRecord, bool], alone: bool
) -> None:
    update = ArrayRecord(
        {n: Array(np.full(tuple(t.shape), 0.01, dtype="float32")) for n, t in GLOBAL.items()}
    )
    reply = Message(RecordDict({UPDATE: update, TRAIN_METRICS: metrics[0]}), reply_to=to_node(ROGUE_NODE))
    check_reply(reply, metrics[1], "fedavg", alone)


@settings(FUZZ, max_examples=2000)
@given(update=update_records(), alone=st.booleans())
def test_any_update_with_honest_metrics(quiet: None, update: tuple[ArrayRecord, bool], alone: bool) -> None:
    content = RecordDict({UPDATE: update[0], TRAIN_METRICS: MetricRecord(dict(HONEST))})
    check_reply(Message(content, reply_to=to_node(ROGUE_NODE)), update[1], "fedavg", alone)
