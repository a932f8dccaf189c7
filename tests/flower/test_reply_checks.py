"""Every way a reply can be wrong ends as a rejection naming the node, never as a crash.

Replies are built by hand, as a hostile or broken device could send them; the strategy
is the real one, with the real codecs and aggregators, over a tiny global adapter.
"""

from __future__ import annotations

import io
import json
import logging
import math

import numpy as np
import pytest
import safetensors.torch
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from fedpeft.flower.deployment import DEPLOYMENT_MAX_UPDATE_NORM, with_deployment_defaults
from fedpeft.flower.records import DECLINED, PACKED, record_to_state, state_to_record
from fedpeft.flower.replies import checked_record_to_state, clip_text
from tests.flower.reply_builders import (
    GLOBAL,
    error_reply,
    honest_delta,
    honest_replies,
    make_strategy,
    metrics,
    record_reply,
    server_identity,  # noqa: F401 - autouse fixture
    start_round,
    to_node,
    update_reply,
)


def only_rejection(strategy, replies) -> dict:
    """Aggregate ``replies``; exactly one is rejected, and nothing is aggregated."""
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is None
    assert len(strategy.traffic.rejected) == 1, strategy.traffic.rejected
    return strategy.traffic.rejected[0]


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("client-id", math.nan),
        ("client-id", math.inf),
        ("client-id", 1e300),
        ("client-id", -1),
        ("num-examples", math.nan),
        ("num-examples", -math.inf),
        ("num-examples", 1e300),
        ("num-examples", 0),
        ("train-seconds", math.nan),
        ("train-loss", [1.0, 2.0]),
    ],
)
def test_a_bad_metric_is_a_rejection_naming_the_node(key: str, value: object) -> None:
    strategy = make_strategy()
    reply = record_reply(7, state_to_record(honest_delta(0)), {**metrics(), key: value})
    rejected = only_rejection(strategy, [reply])
    assert rejected["node_id"] == 7
    assert repr(key) in rejected["reason"]


def npy_bytes(descr: object, shape: tuple, body: bytes = b"", fortran: bool = False) -> bytes:
    """``numpy.save`` bytes whose header says ``descr`` and ``shape``, followed by ``body``."""
    stream = io.BytesIO()
    np.lib.format.write_array_header_1_0(stream, {"descr": descr, "fortran_order": fortran, "shape": shape})
    return stream.getvalue() + body


def one_array_reply(name: str, array: Array) -> Message:
    record = ArrayRecord({n: Array(t.numpy()) for n, t in GLOBAL.items()})
    record[name] = array
    return record_reply(5, record, metrics())


@pytest.mark.parametrize(
    ("array", "reason"),
    [
        # A header claiming 10^13 float32 elements over 12 bytes: nothing is allocated.
        (
            Array("float32", (10**5, 10**8), "numpy.ndarray", npy_bytes("<f4", (10**5, 10**8), b"\0" * 12)),
            "needs",
        ),
        (Array(np.array([["ab", "cd", "ef", "gh"]] * 2)), "dtype"),  # strings
        (Array(np.zeros((2, 4), dtype="complex64")), "dtype"),
        (Array(np.zeros((2, 4), dtype=">f4")), "dtype"),  # big-endian
        (Array("object", (2, 4), "numpy.ndarray", npy_bytes("|O", (2, 4))), "dtype"),
        (Array("float32", (2, 4), "torch.Tensor", b"\0" * 32), "serialisation"),
        (Array("float32", (2, 4), "numpy.ndarray", b"not numpy at all"), "header"),
        (Array("float32", (2, 4), "numpy.ndarray", npy_bytes("<f4", (2, 4), b"\0" * 31)), "needs"),
        (Array("float32", (8,), "numpy.ndarray", npy_bytes("<f4", (2, 4), b"\0" * 32)), "declared"),
        (Array(np.zeros((2, 4), dtype="float64")), "dtype"),  # numeric, but not the codec's
        (Array(np.zeros((4, 2), dtype="float32")), "shape"),
    ],
)
def test_an_array_is_checked_before_it_is_converted(array: Array, reason: str) -> None:
    strategy = make_strategy()
    rejected = only_rejection(strategy, [one_array_reply("layer.lora_A.default.weight", array)])
    assert rejected["node_id"] == 5 and rejected["client_id"] == 0
    assert reason in rejected["reason"]
    assert " while decoding" not in rejected["reason"]  # a named check, not the last line of defence


def test_a_packed_record_round_trips_names_order_dtypes_and_views() -> None:
    flat = torch.arange(10, dtype=torch.float32)
    state = {"z": flat[:6].view(2, 3), "a": torch.tensor([3, 1], dtype=torch.int64), "m": flat[6:]}
    record = state_to_record(state)
    assert list(record.keys()) == [PACKED]  # one Array: a handful of Flower objects a message
    for decoded in (record_to_state(record), checked_record_to_state(record)):
        assert list(decoded) == ["z", "a", "m"]
        assert all(decoded[k].dtype == state[k].dtype and torch.equal(decoded[k], state[k]) for k in state)


def packed_array(tensors: dict, order: object = None) -> Array:
    """A packed update's Array built by hand, with ``order`` as its metadata (default: the names)."""
    metadata = {"order": json.dumps(list(tensors) if order is None else order)}
    return Array(np.frombuffer(safetensors.torch.save(tensors, metadata=metadata), dtype=np.uint8))


def header_only(header: object) -> bytes:
    """A safetensors-shaped buffer: an 8-byte size, then ``header`` as JSON (a str as it is)."""
    text = (header if isinstance(header, str) else json.dumps(header)).encode()
    return len(text).to_bytes(8, "little") + text


@pytest.mark.parametrize(
    ("array", "reason"),
    [
        (Array(np.zeros(64, dtype=np.float32)), "1-D uint8"),
        (Array(np.frombuffer(b"\x10" + b"\0" * 7 + b"{not json", dtype=np.uint8)), "safetensors"),
        (
            Array(np.frombuffer(b"\xff" * 8 + b"{}", dtype=np.uint8)),
            "safetensors",
        ),  # header claims 2^64 bytes
        (packed_array({"w": torch.zeros(2)}, order=["w", "w"]), "order"),
        (packed_array({"w": torch.zeros(2)}, order=["v"]), "order"),
        (packed_array({"w": torch.zeros(2)}, order={"w": 1}), "order"),
        (packed_array({"1": torch.zeros(2)}, order=[1]), "order"),
        (Array(np.frombuffer(header_only({"__metadata__": {"order": 5}}), dtype=np.uint8)), "order"),
        (Array(np.frombuffer(header_only("[" * 100_000 + "]" * 100_000), dtype=np.uint8)), "too deeply"),
        (packed_array({"w": torch.zeros(2, dtype=torch.bfloat16)}), "dtype BF16 is not accepted"),
    ],
)
def test_a_packed_update_is_checked_before_its_tensors_are_used(array: Array, reason: str) -> None:
    strategy = make_strategy()
    rejected = only_rejection(strategy, [record_reply(5, ArrayRecord({PACKED: array}), metrics())])
    assert rejected["node_id"] == 5
    assert reason in rejected["reason"]
    assert " while decoding" not in rejected["reason"]


def test_a_reply_that_breaks_decoding_in_an_unforeseen_way_is_rejected_with_its_exception_type(
    caplog: pytest.LogCaptureFixture,
) -> None:
    strategy = make_strategy()

    class Exploding:
        def decode(self, payload, context, reference):
            raise KeyError("a codec bug")

    strategy.codec = Exploding()  # type: ignore[assignment]
    with caplog.at_level(logging.WARNING, logger="fedpeft"):
        rejected = only_rejection(strategy, honest_replies(1))
    assert rejected["reason"].startswith("KeyError while decoding")
    assert any(r.levelno == logging.ERROR and r.exc_info for r in caplog.records)


def test_finite_projection_coefficients_that_decode_to_inf_are_rejected() -> None:
    strategy = make_strategy(codec="projection", codec_options={"directions": 2})
    good = strategy.codec.encode(honest_delta(1), _context(1), {})
    huge = {"coefficients": torch.full((len(strategy.codec.blocks(_shapes())), 2), 3.0e38)}
    replies = [
        record_reply(1, state_to_record(good), metrics(client_id=1)),
        record_reply(2, state_to_record(huge), metrics(client_id=2)),
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert [r["node_id"] for r in strategy.traffic.rejected] == [2]
    assert "decoded delta" in strategy.traffic.rejected[0]["reason"]
    assert arrays is not None
    assert all(torch.isfinite(t).all() for t in record_to_state(arrays).values())


def _context(client_id: int):
    from fedpeft.codecs import CodecContext

    return CodecContext(run_seed=0, server_round=1, client_id=client_id)


def _shapes() -> dict:
    return {n: t.shape for n, t in GLOBAL.items()}


@pytest.mark.parametrize("aggregator", ["fedavg", "fedavgm"])
def test_a_non_finite_aggregate_is_refused_and_keeps_the_adapter_and_the_aggregator_state(
    aggregator: str,
) -> None:
    huge = {name: torch.full_like(t, 3.0e38) for name, t in GLOBAL.items()}
    strategy = make_strategy(aggregator=aggregator, aggregator_options={"server_lr": 2.0})
    before = dict(strategy.aggregator.state_dict())
    arrays, _ = strategy.aggregate_train(1, [update_reply(1, huge, client_id=0)])
    assert arrays is None
    assert strategy.traffic.refused is not None and "NaN or Inf" in strategy.traffic.refused
    assert strategy.aggregator.state_dict().keys() == before.keys()
    # The next round, with honest updates, is what it would have been without the refusal.
    start_round(strategy, 2)
    arrays, _ = strategy.aggregate_train(2, honest_replies())
    fresh = make_strategy(aggregator=aggregator, aggregator_options={"server_lr": 2.0})
    start_round(fresh, 2)
    expected, _ = fresh.aggregate_train(2, honest_replies())
    assert arrays is not None and expected is not None
    got, want = record_to_state(arrays), record_to_state(expected)
    assert all(torch.equal(got[n], want[n]) for n in want)


def test_a_train_round_with_a_refused_aggregate_is_sent_again_and_then_stops(tmp_path) -> None:
    from fedpeft.flower.server_app import FederationError, train_round

    huge = {name: torch.full_like(t, 3.0e38) for name, t in GLOBAL.items()}
    strategy = make_strategy(aggregator_options={"server_lr": 2.0}, round_retries=1)

    class Grid:
        calls = 0

        def get_node_ids(self):
            return [1]

        def send_and_receive(self, messages, timeout=None):
            Grid.calls += 1
            return [update_reply(1, huge, client_id=0)]

    class Config:
        federation = strategy.federation

    progress: list[str] = []
    with pytest.raises(FederationError, match="aggregate refused"):
        train_round(Grid(), strategy, Config(), 1, dict(GLOBAL), progress.append)  # type: ignore[arg-type]
    assert Grid.calls == 2 and "sending the round again" in progress[0]


def test_error_and_declined_replies_are_size_checked_first() -> None:
    strategy = make_strategy(max_payload_bytes=4096)
    huge = "x\n" * 10_000_000  # 20 MB with newlines
    declined = Message(RecordDict({DECLINED: ConfigRecord({"reason": huge})}), reply_to=to_node(3))
    arrays, _ = strategy.aggregate_train(1, [error_reply(2, huge), declined])
    assert arrays is None
    reasons = [r["reason"] for r in strategy.traffic.rejected]
    assert len(reasons) == 2 and all("exceeds federation.max_payload_bytes = 4096" in r for r in reasons)
    assert all(len(r) < 200 for r in reasons)


def test_reasons_are_clipped_and_escaped_wherever_they_go(caplog: pytest.LogCaptureFixture) -> None:
    strategy = make_strategy()
    forged = "boom\nround 1: rejected update from node 1 (client 0): \x1b[2J" + "z" * 5000
    declined = Message(RecordDict({DECLINED: ConfigRecord({"reason": forged})}), reply_to=to_node(3))
    with caplog.at_level(logging.WARNING, logger="fedpeft"):
        strategy.aggregate_train(1, [error_reply(2, forged), declined])
    reasons = [r["reason"] for r in strategy.traffic.rejected]
    assert len(reasons) == 2
    for reason in reasons:
        assert "\n" not in reason and "\x1b" not in reason
        assert "boom\\nround 1" in reason and "\\x1b[2J" in reason
        assert len(reason) < 320 and f"({len(forged)} characters)" in reason
    assert all("\n" not in r.getMessage() for r in caplog.records)


def test_clip_text_bounds_the_work_and_the_result() -> None:
    assert clip_text("fine") == "fine"
    assert clip_text(b"caf\xc3\xa9\n") == "café\\n"
    assert clip_text("\u2028" * 1000, limit=10) == "\\u2028\\u20... (1000 characters)"
    assert len(clip_text(list(range(10**6)), limit=50)) < 80
    assert clip_text(clip_text("a\nb"), limit=500) == clip_text("a\nb")


def test_a_claimed_example_count_is_capped_at_the_partition_size() -> None:
    up = {n: torch.ones_like(t) for n, t in GLOBAL.items()}
    down = {n: -torch.ones_like(t) for n, t in GLOBAL.items()}
    replies = [
        update_reply(1, up, client_id=0, num_examples=10),
        update_reply(2, down, client_id=1, num_examples=10**15),
    ]
    strategy = make_strategy(partition_sizes=[10, 10])
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    state = record_to_state(arrays)
    assert all(torch.allclose(state[n], GLOBAL[n]) for n in GLOBAL)  # equal weights: the mean is 0
    assert [c.num_examples for c in strategy.traffic.clients] == [10, 10]


@pytest.mark.parametrize(
    ("sizes", "cap", "expected"),
    [([10, 10], None, 10), ([10, 20], None, 20), (None, 50, 50), ([10, 10], 50, 50), (None, None, 10**15)],
)
def test_example_count_cap_sources(sizes, cap, expected) -> None:
    # Client 2 lies beyond the partitions: the largest partition bounds it.
    strategy = make_strategy(partition_sizes=sizes, max_client_examples=cap)
    strategy.aggregate_train(1, [update_reply(3, honest_delta(2), client_id=2, num_examples=10**15)])
    assert [c.num_examples for c in strategy.traffic.clients] == [expected]


def test_a_reply_without_train_loss_is_accepted() -> None:
    strategy = make_strategy()
    replies = [update_reply(1, honest_delta(0), client_id=0, train_loss=None), *honest_replies(3)[1:]]
    arrays, round_metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None and not strategy.traffic.rejected
    assert strategy.traffic.clients[0].train_loss is None
    assert round_metrics is not None and round_metrics["train-loss"] == pytest.approx(0.5)
    strategy = make_strategy()
    _, round_metrics = strategy.aggregate_train(1, [update_reply(1, honest_delta(0), train_loss=None)])
    assert round_metrics is not None and "train-loss" not in round_metrics


def test_a_node_is_bound_to_its_first_client_id() -> None:
    strategy = make_strategy(bind_client_ids=True)
    strategy.aggregate_train(1, [update_reply(1, honest_delta(0), client_id=0)])
    assert strategy.node_clients == {1: 0}
    start_round(strategy, 2)
    replies = [
        update_reply(2, honest_delta(0), client_id=0),  # speaks for node 1's client
        update_reply(1, honest_delta(1), client_id=1),  # changes its id
        update_reply(3, honest_delta(2), client_id=2),
    ]
    strategy.aggregate_train(2, replies)
    reasons = {r["node_id"]: r["reason"] for r in strategy.traffic.rejected}
    assert reasons == {
        2: "client 0 is bound to node 1; node 2 claims it",
        1: "node 1 is bound to client 0 and now claims client 1",
    }
    assert [c.client_id for c in strategy.traffic.clients] == [2]
    assert strategy.node_clients == {1: 0, 3: 2}


def test_without_binding_ids_are_taken_as_sent() -> None:
    strategy = make_strategy()
    strategy.aggregate_train(1, [update_reply(1, honest_delta(0), client_id=0)])
    start_round(strategy, 2)
    strategy.aggregate_train(2, [update_reply(2, honest_delta(0), client_id=0)])
    assert not strategy.traffic.rejected and strategy.node_clients == {}


def test_deployment_bounds_update_norms_by_default(tiny_config_data: dict) -> None:
    from fedpeft.config import parse_config

    said: list[str] = []
    config = with_deployment_defaults(parse_config(tiny_config_data), said.append)
    assert config.federation.max_update_norm == DEPLOYMENT_MAX_UPDATE_NORM
    assert len(said) == 1 and "federation.max_update_norm unset" in said[0]
    tiny_config_data["federation"]["max_update_norm"] = 0.5
    said.clear()
    config = with_deployment_defaults(parse_config(tiny_config_data), said.append)
    assert config.federation.max_update_norm == 0.5 and not said


def test_an_aggregator_that_raises_refuses_the_round_with_its_exception_type(
    caplog: pytest.LogCaptureFixture,
) -> None:
    strategy = make_strategy(aggregator="fedavgm")

    def explode(global_state, mean_delta):
        raise RuntimeError("linalg.svd: the algorithm failed to converge")

    # FedAvgM streams: its one server step (at the round's finish) is what fails.
    strategy.aggregator.step_on_mean = explode  # type: ignore[method-assign]
    with caplog.at_level(logging.ERROR, logger="fedpeft"):
        arrays, _ = strategy.aggregate_train(1, honest_replies())
    assert arrays is None
    assert (
        strategy.traffic.refused
        == "aggregate refused: RuntimeError: linalg.svd: the algorithm failed to converge"
    )
    assert any(r.exc_info for r in caplog.records)
