import copy
import json
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from fedpeft.config import AdapterConfig, ModelConfig
from fedpeft.errors import ConfigError, ModelLoadError
from fedpeft.model_card import _loading_section
from fedpeft.models import HEAD_FILE, adapter_state, build_model, load_adapter, load_base_model, save_adapter

LORA = AdapterConfig(method="lora", r=4, lora_alpha=8, target_modules=["query", "value"])  # type: ignore[call-arg]


def test_mean_pooled_head_reads_the_mean_of_the_real_tokens(tiny_bert_dir: Path) -> None:
    model = load_base_model(ModelConfig(name_or_path=str(tiny_bert_dir), pooling="mean"), num_labels=2).eval()
    plain = load_base_model(ModelConfig(name_or_path=str(tiny_bert_dir)), num_labels=2).eval()
    ids = torch.tensor([[2, 11, 12, 13, 3, 0, 0]])  # five real tokens, two pads
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0]])
    with torch.no_grad():
        padded = model(input_ids=ids, attention_mask=mask).logits
        alone = model(input_ids=ids[:, :5], attention_mask=mask[:, :5]).logits
        states = plain.base_model(input_ids=ids[:, :5]).last_hidden_state
        by_hand = model.classifier(states.mean(dim=1))
    torch.testing.assert_close(padded, alone)  # pads do not enter the mean
    torch.testing.assert_close(alone, by_hand)
    copied = copy.deepcopy(model)  # its hook feeds its own pooler, not the original's
    with torch.no_grad():
        torch.testing.assert_close(copied(input_ids=ids, attention_mask=mask).logits, alone)
    with torch.no_grad():  # the model's own pooling ([CLS] through the pooler) differs
        assert not torch.allclose(plain(input_ids=ids, attention_mask=mask).logits, padded)


def test_mean_pooled_adapter_saves_and_reloads_with_its_pooling(tiny_bert_dir: Path, tmp_path: Path) -> None:
    config = ModelConfig(name_or_path=str(tiny_bert_dir), pooling="mean")
    trained = build_model(config, LORA, num_labels=2, seed=0)
    state = {k: v + 0.1 * torch.randn_like(v) for k, v in adapter_state(trained.model).items()}
    save_adapter(trained.model, state, tmp_path / "adapter", config.name_or_path, pooling="mean")
    assert json.loads((tmp_path / "adapter" / HEAD_FILE).read_text()) == {"pooling": "mean"}
    batch = trained.tokenizer(["a good film", "a rather dull story"], return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(
            load_adapter(tmp_path / "adapter").model.eval()(**batch).logits,
            trained.model.eval()(**batch).logits,
        )
    with pytest.raises(ModelLoadError, match=r"'mean' pooling, model\.pooling is 'model'"):
        load_adapter(tmp_path / "adapter", ModelConfig(name_or_path=str(tiny_bert_dir)))
    (tmp_path / "adapter" / HEAD_FILE).write_text('{"pooling": "max"}')
    with pytest.raises(ModelLoadError, match="unknown pooling 'max'"):
        load_adapter(tmp_path / "adapter")


def test_default_pooling_writes_no_head_file(tiny_bert_dir: Path, tmp_path: Path) -> None:
    trained = build_model(ModelConfig(name_or_path=str(tiny_bert_dir)), LORA, num_labels=2, seed=0)
    save_adapter(trained.model, adapter_state(trained.model), tmp_path / "adapter", str(tiny_bert_dir))
    assert not (tmp_path / "adapter" / HEAD_FILE).exists()


def test_mean_pooling_is_for_classifiers_that_read_a_pooler(tiny_llama_dir: Path) -> None:
    with pytest.raises(ValidationError, match="only for task 'sequence-classification'"):
        ModelConfig(name_or_path=str(tiny_llama_dir), task="causal-lm", pooling="mean")
    with pytest.raises(ConfigError, match="llama classifier does not read a pooler"):
        load_base_model(ModelConfig(name_or_path=str(tiny_llama_dir), pooling="mean"), num_labels=2)


def test_model_card_loads_a_mean_pooled_base_through_fedpeft(tiny_config_data: dict) -> None:
    from fedpeft.config import parse_config

    config = parse_config({**tiny_config_data, "model": {**tiny_config_data["model"], "pooling": "mean"}})
    section = _loading_section(config, 2)
    assert 'pooling="mean"' in section and "load_base_model" in section
