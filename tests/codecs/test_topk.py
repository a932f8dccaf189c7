import pytest
import torch

from fedpeft.codecs import CodecContext, TopK

CONTEXT = CodecContext(0, 1, 0)


def test_sends_the_largest_entries() -> None:
    delta = {"w": torch.tensor([0.1, -5.0, 0.2, 3.0, -0.3, 0.0, 0.05, 1.0])}
    codec = TopK(density=0.25, error_feedback=False)
    decoded = codec.decode(codec.encode(delta, CONTEXT, {}), CONTEXT, {"w": torch.zeros(8)})["w"]
    torch.testing.assert_close(decoded, torch.tensor([0.0, -5.0, 0, 3.0, 0, 0, 0, 0]))


@pytest.mark.parametrize("scope", ["tensor", "global"])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_error_feedback_conserves_mass(scope: str, dtype: str) -> None:
    """Over rounds: everything sent so far + the residual == every delta so far."""
    codec = TopK(density=0.1, scope=scope, dtype=dtype)  # type: ignore[arg-type]
    reference = {"a": torch.zeros(6, 7), "b": torch.zeros(13)}
    memory: dict[str, torch.Tensor] = {}
    sent = {k: torch.zeros_like(v) for k, v in reference.items()}
    total = {k: torch.zeros_like(v) for k, v in reference.items()}
    g = torch.Generator().manual_seed(0)
    for round_ in range(1, 6):
        delta = {k: torch.randn(v.shape, generator=g) for k, v in reference.items()}
        context = CodecContext(0, round_, 0)
        decoded = codec.decode(codec.encode(delta, context, memory), context, reference)
        for k in reference:
            sent[k] += decoded[k]
            total[k] += delta[k]
            torch.testing.assert_close(sent[k] + memory[k], total[k], rtol=0, atol=1e-5)


def test_residual_is_sent_later() -> None:
    codec = TopK(density=0.5)
    memory: dict[str, torch.Tensor] = {}
    reference = {"w": torch.zeros(2)}
    first = codec.decode(codec.encode({"w": torch.tensor([1.0, 0.9])}, CONTEXT, memory), CONTEXT, reference)
    second = codec.decode(codec.encode({"w": torch.tensor([0.0, 0.2])}, CONTEXT, memory), CONTEXT, reference)
    torch.testing.assert_close(first["w"], torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(second["w"], torch.tensor([0.0, 1.1]))  # the 0.9 held back + 0.2


def test_global_scope_favours_the_tensor_with_larger_updates() -> None:
    codec = TopK(density=0.25, scope="global", error_feedback=False)
    delta = {"big": torch.full((4,), 10.0), "small": torch.full((4,), 0.1)}
    decoded = codec.decode(
        codec.encode(delta, CONTEXT, {}), CONTEXT, {"big": torch.zeros(4), "small": torch.zeros(4)}
    )
    assert decoded["big"].count_nonzero() == 2 and decoded["small"].count_nonzero() == 0


def test_repeated_or_out_of_range_indices_are_rejected() -> None:
    from fedpeft.errors import PayloadError

    codec = TopK(density=0.5, error_feedback=False)
    payload = codec.encode({"w": torch.arange(4.0)}, CONTEXT, {})
    for bad in (torch.tensor([2, 2], dtype=torch.int32), torch.tensor([1, 9], dtype=torch.int32)):
        with pytest.raises(PayloadError, match="out of range or repeated"):
            codec.decode({**payload, "w/indices": bad}, CONTEXT, {"w": torch.zeros(4)})
