"""Contract matrix: every registered codec, the same guarantees."""

import pytest
import torch

from fedpeft.codecs import CODECS, CodecContext
from fedpeft.errors import PayloadError

CONTEXT = CodecContext(run_seed=3, server_round=2, client_id=1)
NAMES = CODECS.names()


def reference() -> dict[str, torch.Tensor]:
    return {
        "layer.lora_A": torch.zeros(8, 16),
        "layer.lora_B": torch.zeros(16, 8),
        "head.bias": torch.zeros(3),
    }


def delta(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(t.shape, generator=g) for n, t in reference().items()}


@pytest.mark.parametrize("name", NAMES)
def test_decode_keeps_names_shapes_and_dtypes(name: str) -> None:
    codec = CODECS.build(name, {}, "x")
    decoded = codec.decode(codec.encode(delta(), CONTEXT, {}), CONTEXT, reference())
    assert list(decoded) == list(reference())
    for key, ref in reference().items():
        assert decoded[key].shape == ref.shape and decoded[key].dtype == ref.dtype
        assert torch.isfinite(decoded[key]).all()


EXACT_SETTINGS = {"dense": {}, "random_mask": {"density": 1.0}, "topk": {"density": 1.0}}
APPROXIMATE_ONLY = {"projection"}


def test_every_codec_is_classified() -> None:
    assert set(NAMES) == set(EXACT_SETTINGS) | APPROXIMATE_ONLY


@pytest.mark.parametrize("name", sorted(EXACT_SETTINGS))
def test_exact_setting_round_trips_exactly(name: str) -> None:
    codec = CODECS.build(name, EXACT_SETTINGS[name], "x")
    decoded = codec.decode(codec.encode(delta(), CONTEXT, {}), CONTEXT, reference())
    for key, value in delta().items():
        torch.testing.assert_close(decoded[key], value, rtol=0, atol=0)


def corrupt(payload: dict, how: str) -> dict:
    key = sorted(payload)[0]
    bad = dict(payload)
    if how == "missing":
        del bad[key]
    elif how == "extra":
        bad["intruder"] = torch.zeros(1)
    elif how == "short":
        bad[key] = payload[key].reshape(-1)[:-1].clone()
    elif how == "nan":
        values = [k for k in payload if payload[k].is_floating_point()]
        bad[values[0]] = torch.full_like(payload[values[0]], float("nan"))
    elif how == "dtype":
        bad[key] = payload[key].to(torch.float64)
    return bad


@pytest.mark.parametrize("how", ["missing", "extra", "short", "nan", "dtype"])
@pytest.mark.parametrize("name", NAMES)
def test_malformed_payload_is_rejected(name: str, how: str) -> None:
    codec = CODECS.build(name, {}, "x")
    payload = codec.encode(delta(), CONTEXT, {})
    with pytest.raises(PayloadError):
        codec.decode(corrupt(payload, how), CONTEXT, reference())
