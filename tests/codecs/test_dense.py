import pytest
import torch

from fedpeft.codecs import CodecContext, Dense
from fedpeft.errors import PayloadError

CONTEXT = CodecContext(run_seed=0, server_round=1, client_id=2)


def reference() -> dict[str, torch.Tensor]:
    return {"a": torch.zeros(3, 4), "b": torch.zeros(5)}


def delta() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"a": torch.randn(3, 4, generator=g), "b": torch.randn(5, generator=g)}


def test_float32_is_exact() -> None:
    codec = Dense()
    decoded = codec.decode(codec.encode(delta(), CONTEXT, {}), CONTEXT, reference())
    for key, value in delta().items():
        torch.testing.assert_close(decoded[key], value, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_halves_bytes_with_small_error(dtype: str) -> None:
    codec = Dense(dtype=dtype)  # type: ignore[arg-type]
    payload = codec.encode(delta(), CONTEXT, {})
    assert sum(t.numel() * t.element_size() for t in payload.values()) == 17 * 2
    assert all(t.numpy().nbytes == t.numel() * 2 for t in payload.values())  # NumPy-representable
    decoded = codec.decode(payload, CONTEXT, reference())
    assert decoded["a"].dtype == torch.float32
    torch.testing.assert_close(decoded["a"], delta()["a"], rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"a": torch.zeros(3, 4)}, "lacks"),
        ({"a": torch.zeros(3, 4), "b": torch.zeros(5), "c": torch.zeros(1)}, "unexpected"),
        ({"a": torch.zeros(4, 3), "b": torch.zeros(5)}, "shape"),
        ({"a": torch.zeros(3, 4, dtype=torch.float64), "b": torch.zeros(5)}, "dtype"),
        ({"a": torch.full((3, 4), float("nan")), "b": torch.zeros(5)}, "NaN"),
        ({"a": torch.zeros(3, 4), "b": torch.tensor([0.0, 0, 0, 0, float("inf")])}, "Inf"),
    ],
)
def test_malformed_payload_is_rejected(payload: dict, message: str) -> None:
    with pytest.raises(PayloadError, match=message):
        Dense().decode(payload, CONTEXT, reference())


def test_context_seeds_differ_by_every_component() -> None:
    seeds = {
        CodecContext(0, 1, 2).seed_for("a"),
        CodecContext(1, 1, 2).seed_for("a"),
        CodecContext(0, 2, 2).seed_for("a"),
        CodecContext(0, 1, 3).seed_for("a"),
        CodecContext(0, 1, 2).seed_for("b"),
    }
    assert len(seeds) == 5
    assert CodecContext(0, 1, 2).seed_for("a") == CodecContext(0, 1, 2).seed_for("a")


def test_bfloat16_payload_with_nan_is_rejected() -> None:
    bad = {"a": torch.full((3, 4), float("nan")), "b": torch.zeros(5)}
    payload = Dense(dtype="bfloat16").encode(bad, CONTEXT, {})
    with pytest.raises(PayloadError, match="NaN"):
        Dense(dtype="bfloat16").decode(payload, CONTEXT, reference())
