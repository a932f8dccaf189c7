"""Summable codecs: a round's summed payloads decode to the sum of the clients' decodes.

Secure aggregation shows the server only the sum of the payloads, so ``summable`` must
be True exactly when that sum decodes correctly; both directions are tested here.
"""

from typing import Any

import pytest
import torch

from fedpeft.codecs import CODECS, CodecContext, Projection, RandomMask
from fedpeft.codecs.base import ROUND_WIDE
from fedpeft.errors import ConfigError, PayloadError

RUN_SEED = 11
ROUND = 3
CLIENTS = (0, 1, 5, 9)

SUMMABLE: list[tuple[str, dict[str, Any], float]] = [
    # (codec, options, relative tolerance: float32 rounding, or float16's for its payload)
    ("dense", {}, 1e-5),
    ("dense", {"dtype": "float16"}, 2e-3),
    ("random_mask", {"shared": True}, 1e-5),
    ("random_mask", {"shared": True, "density": 0.3, "rescale": True}, 1e-5),
    ("projection", {"shared": True, "directions": 8}, 1e-5),
]
NOT_SUMMABLE: list[tuple[str, dict[str, Any]]] = [
    ("dense", {"dtype": "bfloat16"}),
    ("random_mask", {}),
    ("random_mask", {"shared": True, "dtype": "bfloat16"}),
    ("projection", {"directions": 8}),
    ("topk", {"density": 0.1}),
    ("topk", {"density": 0.1, "scope": "global", "error_feedback": False}),
]


def case_id(name: str, options: dict[str, Any]) -> str:
    return name + "".join(f"-{k}={v}" for k, v in options.items())


def reference() -> dict[str, torch.Tensor]:
    """Two LoRA pairs (r = 4 on a 32-wide layer) and a classifier bias."""
    return {
        "layer0.query.lora_A.weight": torch.zeros(4, 32),
        "layer0.query.lora_B.weight": torch.zeros(32, 4),
        "layer0.value.lora_A.weight": torch.zeros(4, 32),
        "layer0.value.lora_B.weight": torch.zeros(32, 4),
        "classifier.bias": torch.zeros(2),
    }


def client_delta(client_id: int) -> dict[str, torch.Tensor]:
    """A different delta per client, at a different scale per client."""
    g = torch.Generator().manual_seed(100 + client_id)
    scale = 0.01 * (1 + client_id)
    return {n: scale * torch.randn(t.shape, generator=g) for n, t in reference().items()}


def context(client_id: int, server_round: int = ROUND) -> CodecContext:
    return CodecContext(run_seed=RUN_SEED, server_round=server_round, client_id=client_id)


def summed(payloads: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The element-wise sum of payloads, in float64, cast back to each tensor's dtype."""
    return {
        key: torch.stack([p[key].double() for p in payloads]).sum(0).to(payloads[0][key].dtype)
        for key in payloads[0]
    }


def decode_sum_and_sum_decodes(
    codec: Any,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(decode of the summed payloads, under the round-wide context; sum of each decode)."""
    payloads = [codec.encode(client_delta(c), context(c), {}) for c in CLIENTS]
    decodes = [codec.decode(p, context(c), reference()) for p, c in zip(payloads, CLIENTS, strict=True)]
    from_sum = codec.decode(summed(payloads), context(CLIENTS[0]).round_wide(), reference())
    sum_of = {n: torch.stack([d[n].double() for d in decodes]).sum(0) for n in reference()}
    return from_sum, sum_of


def relative_error(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    diff = torch.cat([(got[n].double() - want[n]).reshape(-1) for n in want])
    norm = torch.cat([want[n].reshape(-1) for n in want])
    return float(diff.norm() / norm.norm())


def test_every_registered_codec_is_classified() -> None:
    assert {name for name, _, _ in SUMMABLE} | {name for name, _ in NOT_SUMMABLE} == set(CODECS.names())


@pytest.mark.parametrize(("name", "options", "rtol"), SUMMABLE, ids=[case_id(n, o) for n, o, _ in SUMMABLE])
def test_summable_codec_decodes_the_sum_of_payloads(name: str, options: dict, rtol: float) -> None:
    codec = CODECS.build(name, options, "federation.codec_options")
    assert codec.summable is True
    from_sum, sum_of = decode_sum_and_sum_decodes(codec)
    assert list(from_sum) == list(reference())
    assert relative_error(from_sum, sum_of) < rtol


@pytest.mark.parametrize(("name", "options"), NOT_SUMMABLE, ids=[case_id(n, o) for n, o in NOT_SUMMABLE])
def test_codec_marked_not_summable_does_not_decode_the_sum(name: str, options: dict) -> None:
    codec = CODECS.build(name, options, "federation.codec_options")
    assert codec.summable is False
    try:
        from_sum, sum_of = decode_sum_and_sum_decodes(codec)
    except PayloadError:  # e.g. summed top-k indices out of range, or summed bit patterns NaN
        return
    assert relative_error(from_sum, sum_of) > 0.1


def test_round_wide_context_drops_only_the_client_id() -> None:
    wide = CodecContext(run_seed=4, server_round=7, client_id=2).round_wide()
    assert wide == CodecContext(run_seed=4, server_round=7, client_id=ROUND_WIDE)
    seeds = {CodecContext(4, 7, c).round_wide().seed_for("w") for c in CLIENTS}
    assert len(seeds) == 1
    others = {
        CodecContext(4, 8, 2).round_wide().seed_for("w"),
        CodecContext(5, 7, 2).round_wide().seed_for("w"),
    }
    assert seeds.isdisjoint(others) and len(others) == 2
    assert wide.seed_for("w") not in {CodecContext(4, 7, c).seed_for("w") for c in CLIENTS}


def test_shared_mask_is_one_per_round() -> None:
    codec = RandomMask(density=0.1, shared=True)
    this_round = {tuple(codec.mask_indices("w", 1024, context(c)).tolist()) for c in CLIENTS}
    next_round = {tuple(codec.mask_indices("w", 1024, context(c, ROUND + 1)).tolist()) for c in CLIENTS}
    assert len(this_round) == 1 and len(next_round) == 1 and this_round != next_round


def test_unshared_mask_is_one_per_client_and_unchanged() -> None:
    codec = RandomMask(density=0.1)
    masks = [codec.mask_indices("w", 1024, context(c)) for c in CLIENTS]
    assert len({tuple(m.tolist()) for m in masks}) == len(CLIENTS)
    # the draw fedpeft made before `shared` existed: the client's own generator
    old = torch.randperm(1024, generator=context(CLIENTS[1]).generator_for("w"))[:103].sort().values
    assert torch.equal(masks[1], old)


def first_coefficient(codec: Projection, client_id: int, server_round: int = ROUND) -> float:
    """The first projection coefficient of one fixed delta (a single 1 x 64 block)."""
    delta = {"w": torch.linspace(-1, 1, 64)}
    return float(codec.encode(delta, context(client_id, server_round), {})["coefficients"][0, 0])


def test_shared_projection_directions_are_one_per_round() -> None:
    codec = Projection(directions=2, shared=True)
    this_round = {first_coefficient(codec, c) for c in CLIENTS}
    assert len(this_round) == 1
    assert this_round != {first_coefficient(codec, CLIENTS[0], ROUND + 1)}
    # by hand: the round-wide generator's first direction
    direction = torch.randn(64, generator=context(ROUND_WIDE).generator_for("block:w"))
    assert this_round.pop() == pytest.approx(float(torch.dot(torch.linspace(-1, 1, 64), direction)), rel=1e-6)


def test_unshared_projection_directions_are_one_per_client_and_unchanged() -> None:
    codec = Projection(directions=2)
    assert len({first_coefficient(codec, c) for c in CLIENTS}) == len(CLIENTS)
    direction = torch.randn(64, generator=context(CLIENTS[2]).generator_for("block:w"))
    expected = float(torch.dot(torch.linspace(-1, 1, 64), direction))
    assert first_coefficient(codec, CLIENTS[2]) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("name", ["random_mask", "projection"])
def test_shared_is_a_config_option(name: str) -> None:
    assert CODECS.build(name, {"shared": True}, "federation.codec_options").summable is True
    assert CODECS.build(name, {}, "federation.codec_options").summable is False
    with pytest.raises(ConfigError, match=r"federation\.codec_options\.shared: expected bool"):
        CODECS.build(name, {"shared": "yes"}, "federation.codec_options")
