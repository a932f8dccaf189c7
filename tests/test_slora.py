"""SLoRA: the shared sparse mask, the stage switch and the SVD initialisation of LoRA."""

from pathlib import Path

import pytest
import torch

from fedpeft.client import run_client_round
from fedpeft.config import parse_config
from fedpeft.errors import ConfigError
from fedpeft.experiment import Experiment
from fedpeft.slora import lora_layers, mask_positions, sparse_delta
from tests.conftest import tiny_config


def slora_config(tiny_bert_dir: Path, sentiment_files: dict[str, Path], **adapter: object) -> dict:
    data = tiny_config(tiny_bert_dir, sentiment_files)
    data["adapter"].update(adapter)
    data["adapter"]["modules_to_save"] = ["classifier"]
    data["slora"] = {"rounds": 1, "density": 0.05}
    data["federation"]["rounds"] = 2
    return data


@pytest.fixture()
def experiment(tiny_bert_dir: Path, sentiment_files: dict[str, Path]) -> Experiment:
    return Experiment(parse_config(slora_config(tiny_bert_dir, sentiment_files)))


def test_mask_is_shared_fixed_and_of_the_requested_density() -> None:
    first = mask_positions(7, "layer.0.query", 10_000, 0.01)
    assert torch.equal(first, mask_positions(7, "layer.0.query", 10_000, 0.01))
    assert first.numel() == 100 and first.unique().numel() == 100
    assert torch.equal(first, first.sort().values)
    assert not torch.equal(first, mask_positions(7, "layer.0.value", 10_000, 0.01))
    assert not torch.equal(first, mask_positions(8, "layer.0.query", 10_000, 0.01))


def test_stage_one_trains_only_masked_values_and_the_head(experiment: Experiment) -> None:
    model = experiment.model.model
    batch = next(iter(experiment.test_loader))
    model.eval()
    with torch.no_grad():
        before = model(**batch).logits
    state = experiment.initial_state  # round 1 is stage 1
    with torch.no_grad():
        after = model(**batch).logits
    torch.testing.assert_close(before, after)  # zero sparse values change nothing
    assert not any(".lora_" in name for name in state)
    assert any("classifier" in name for name in state)
    values = [n for n in state if n.endswith(".values")]
    assert len(values) == len(dict(lora_layers(model)))
    for name in values:
        numel = dict(model.named_modules())[name.split(".base_layer")[0]].base_layer.weight.numel()
        assert state[name].numel() == round(0.05 * numel)


def test_client_update_touches_base_weights_only_inside_the_mask(experiment: Experiment) -> None:
    global_state = dict(experiment.initial_state)
    layers = dict(lora_layers(experiment.model.model))
    name, layer = next(iter(layers.items()))
    original = layer.base_layer.parametrizations.weight.original.detach().clone()
    result = run_client_round(experiment, 0, global_state, server_round=1)
    assert result.payload.keys() == global_state.keys()
    values = result.payload[f"{name}.base_layer.parametrizations.weight.0.values"]
    assert values.abs().sum() > 0
    effective = layer.base_layer.weight.detach()
    changed = (effective - original).reshape(-1).nonzero().squeeze(1)
    positions = mask_positions(0, name, original.numel(), 0.05)
    assert set(changed.tolist()) <= set(positions.tolist())


def test_svd_init_is_the_best_rank_r_approximation_of_the_stage_one_update(experiment: Experiment) -> None:
    torch.manual_seed(0)
    sparse_state = {n: torch.randn_like(t) for n, t in experiment.initial_state.items()}
    layers = dict(lora_layers(experiment.model.model))
    lora_state, diagnostics = experiment.slora.lora_init(sparse_state)  # type: ignore[union-attr]
    assert any(".lora_A." in n for n in lora_state) and not any(n.endswith(".values") for n in lora_state)
    head = [n for n in lora_state if "classifier" in n]
    assert head and all(torch.equal(lora_state[n], sparse_state[n]) for n in head)
    dropped_squared = 0.0
    for name, layer in layers.items():
        weight = layer.base_layer.weight
        update = sparse_delta(
            sparse_state[f"{name}.base_layer.parametrizations.weight.0.values"],
            mask_positions(0, name, weight.numel(), 0.05),
            weight.shape,
        )
        u, s, vh = torch.linalg.svd(update, full_matrices=False)
        best = (u[:, :4] * s[:4]) @ vh[:4]  # r = 4 in the tiny config
        b = lora_state[f"{name}.lora_B.default.weight"].double()
        a = lora_state[f"{name}.lora_A.default.weight"].double()
        torch.testing.assert_close(layer.scaling["default"] * b @ a, best, atol=1e-5, rtol=1e-5)
        dropped_squared += float(s[4:].pow(2).sum())
    assert diagnostics["slora_svd_dropped_norm"] == pytest.approx(dropped_squared**0.5, rel=1e-5)
    # The model is now in stage 2 and takes the new state.
    experiment.prepare_round(2)
    from fedpeft.models import load_adapter_state

    load_adapter_state(experiment.model.model, lora_state)


def test_svd_init_with_frozen_a_fits_b_by_least_squares(
    tiny_bert_dir: Path, sentiment_files: dict[str, Path]
) -> None:
    data = slora_config(tiny_bert_dir, sentiment_files, freeze_lora_a=True)
    experiment = Experiment(parse_config(data))
    torch.manual_seed(1)
    sparse_state = {n: torch.randn_like(t) for n, t in experiment.initial_state.items()}
    lora_state, _ = experiment.slora.lora_init(sparse_state)  # type: ignore[union-attr]
    assert not any(".lora_A." in n for n in lora_state)
    name, layer = next(iter(lora_layers(experiment.model.model)))
    a = layer.lora_A["default"].weight.detach().double()
    update = sparse_delta(
        sparse_state[f"{name}.base_layer.parametrizations.weight.0.values"],
        mask_positions(0, name, layer.base_layer.weight.numel(), 0.05),
        layer.base_layer.weight.shape,
    )
    b = lora_state[f"{name}.lora_B.default.weight"].double()
    residual = update / layer.scaling["default"] - b @ a
    # Least squares: the residual is orthogonal to the row space of A.
    assert float((residual @ a.T).abs().max()) < 1e-8


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"federation": {"rounds": 1}}, "must be below federation.rounds"),
        ({"adapter": {"method": "ia3", "target_modules": ["query"], "feedforward_modules": []}}, "lora"),
        ({"federation": {"rounds": 2, "aggregator": "lora_product"}}, "lora_product"),
    ],
)
def test_bad_slora_configs_fail_at_load(
    tiny_bert_dir: Path, sentiment_files: dict[str, Path], change: dict, message: str
) -> None:
    data = slora_config(tiny_bert_dir, sentiment_files)
    for section, values in change.items():
        data[section] = {**data.get(section, {}), **values} if section != "adapter" else values
    with pytest.raises(ConfigError, match=message):
        parse_config(data)
