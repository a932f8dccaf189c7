"""Every decoded delta is checked against the global adapter, whatever the codec did."""

from __future__ import annotations

import pytest
import torch

from fedpeft.codecs import CodecContext, Projection
from fedpeft.codecs.base import check_decoded_delta
from fedpeft.errors import PayloadError

REFERENCE = {"a": torch.zeros(4, 8), "b": torch.zeros(8, 4)}


def test_finite_projection_coefficients_can_decode_to_inf_and_the_check_catches_it() -> None:
    codec = Projection(directions=2)
    blocks = len(codec.blocks({n: t.shape for n, t in REFERENCE.items()}))
    payload = {"coefficients": torch.full((blocks, 2), 3.0e38)}
    delta = codec.decode(payload, CodecContext(0, 1, 0), REFERENCE)  # the codec accepts it
    assert not all(torch.isfinite(t).all() for t in delta.values())
    with pytest.raises(PayloadError, match=r"decoded delta .*: contains NaN or Inf"):
        check_decoded_delta(delta, REFERENCE)


@pytest.mark.parametrize(
    ("delta", "match"),
    [
        ({"a": torch.zeros(4, 8)}, r"lacks tensor\(s\) \['b'\]"),
        ({**REFERENCE, "c": torch.zeros(1)}, r"unexpected tensor\(s\) \['c'\]"),
        (
            {"a": torch.zeros(8, 4), "b": torch.zeros(8, 4)},
            r"decoded delta a: torch.float32 \(8, 4\), expected",
        ),
        ({"a": torch.zeros(4, 8, dtype=torch.float64), "b": torch.zeros(8, 4)}, "torch.float64"),
    ],
)
def test_a_delta_that_does_not_fit_is_named(delta: dict, match: str) -> None:
    with pytest.raises(PayloadError, match=match):
        check_decoded_delta(delta, REFERENCE)


def test_a_fitting_finite_delta_passes() -> None:
    check_decoded_delta({"a": torch.ones(4, 8), "b": -torch.ones(8, 4)}, REFERENCE)
