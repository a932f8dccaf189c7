from pathlib import Path

import pytest
import torch

from fedpeft.client import run_client_round
from fedpeft.codecs import CodecContext, Projection
from fedpeft.codecs.projection import group_into_blocks
from fedpeft.config import parse_config
from fedpeft.experiment import Experiment
from fedpeft.models import adapter_state, state_delta
from tests.conftest import tiny_config


def reconstruct(codec: Projection, delta: dict, seed: int) -> dict:
    context = CodecContext(run_seed=seed, server_round=1, client_id=0)
    reference = {k: torch.zeros_like(v) for k, v in delta.items()}
    return codec.decode(codec.encode(delta, context, {}), context, reference)


def test_blocks_group_consecutive_tensors_to_the_median_size() -> None:
    sizes = {"a": 10, "b": 10, "c": 100, "d": 5}
    assert group_into_blocks(sizes, 0.9) == [["a"], ["b"], ["c"], ["d"]]
    assert group_into_blocks(sizes, 3.0) == [["a", "b"], ["c"], ["d"]]


def test_payload_is_k_coefficients_per_block() -> None:
    delta = {"a": torch.randn(4, 8), "b": torch.randn(32), "c": torch.randn(3)}
    payload = Projection(directions=5, block_fraction=1.0).encode(delta, CodecContext(0, 1, 0), {})
    blocks = Projection(block_fraction=1.0).blocks({k: v.shape for k, v in delta.items()})
    assert list(payload) == ["coefficients"]
    assert (
        payload["coefficients"].shape == (len(blocks), 5) and payload["coefficients"].dtype == torch.float32
    )


def test_reconstruction_is_unbiased() -> None:
    g = torch.Generator().manual_seed(0)
    delta = {"a": torch.randn(12, generator=g), "b": torch.randn(2, 4, generator=g)}
    codec = Projection(directions=4)
    trials = 3000
    total = {k: torch.zeros_like(v) for k, v in delta.items()}
    for seed in range(trials):
        for k, v in reconstruct(codec, delta, seed).items():
            total[k] += v
    # per-coordinate variance of one reconstruction <= 2 ||delta_block||^2 / K (~ 12 here);
    # the mean of 3000 has std <= 0.07, so 0.3 is > 4 sigma
    for k in delta:
        torch.testing.assert_close(total[k] / trials, delta[k], rtol=0, atol=0.3)


def test_error_falls_as_k_grows() -> None:
    g = torch.Generator().manual_seed(1)
    delta = {"w": torch.randn(256, generator=g)}

    def mse(k: int) -> float:
        codec = Projection(directions=k)
        return (
            sum(float(((reconstruct(codec, delta, s)["w"] - delta["w"]) ** 2).mean()) for s in range(20)) / 20
        )

    errors = [mse(k) for k in (4, 16, 64)]
    assert errors[0] > errors[1] > errors[2]
    assert errors[0] / errors[2] > 8  # ~ 1/K: 16x in expectation


def test_bad_options_are_refused() -> None:
    with pytest.raises(ValueError, match="directions"):
        Projection(directions=0)


def test_full_parameter_deltas_of_selected_layers_travel_as_coefficients(
    tiny_bert_dir: Path, sentiment_files: dict[str, Path]
) -> None:
    """As in Ferret: whole layers train (peft ``modules_to_save``) and only K numbers per
    block travel for them, whatever their size."""
    data = tiny_config(tiny_bert_dir, sentiment_files)
    data["adapter"]["modules_to_save"] = ["classifier", "layer.1.output.dense"]
    data["federation"].update(codec="projection", codec_options={"directions": 8})
    experiment = Experiment(parse_config(data))
    global_state = dict(experiment.initial_state)
    full = [n for n in global_state if "layer.1.output.dense.modules_to_save" in n]
    assert {global_state[n].shape for n in full} == {torch.Size([32, 64]), torch.Size([32])}

    result = run_client_round(experiment, 0, global_state, server_round=1)
    true_delta = state_delta(adapter_state(experiment.model.model), global_state)
    assert all(true_delta[n].abs().sum() > 0 for n in full)  # the whole layer trained
    coefficients = result.payload["coefficients"]
    blocks = experiment.codec.blocks({n: t.shape for n, t in global_state.items()})  # type: ignore[attr-defined]
    assert result.payload.keys() == {"coefficients"} and coefficients.shape == (len(blocks), 8)
    assert coefficients.numel() < sum(global_state[n].numel() for n in full)

    context = CodecContext(run_seed=0, server_round=1, client_id=0)
    decoded = experiment.codec.decode(result.payload, context, global_state)
    assert {n: t.shape for n, t in decoded.items()} == {n: t.shape for n, t in global_state.items()}
    # Each block's estimate is the projection onto the K directions, scaled by 1/K:
    # <estimate, delta> = ||gamma||^2 / K > 0 for every block with a nonzero update.
    for names in blocks:
        if any(n in full for n in names):
            inner = sum(float((decoded[n] * true_delta[n]).sum()) for n in names)
            assert inner > 0
