from pathlib import Path

import pytest

from fedpeft.config import Config, apply_overrides, config_from_toml, load_config, parse_config
from fedpeft.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.rglob("*.toml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path: Path) -> None:
    assert isinstance(load_config(path), Config)


def test_defaults_match_embedded_default() -> None:
    config = load_config(CONFIGS / "default.toml")
    assert config.model.name_or_path == "builtin:all-MiniLM-L6-v2"
    assert config.partition.num_clients == 10 and config.partition.alpha == 0.5
    assert config.federation.rounds == 5 and config.adapter.options["r"] == 8


def test_overrides_are_typed_and_nested() -> None:
    config = load_config(None, ["train.lr=3e-4", "adapter.target_modules=['query']", "data.text_column=text"])
    assert config.train.lr == pytest.approx(3e-4)
    assert config.adapter.options["target_modules"] == ["query"]
    assert config.data.text_column == "text"


def test_override_without_equals_sign_fails() -> None:
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        apply_overrides({}, ["train.lr"])


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("train.lrr=1", "train.lrr"),
        ("federation.rounds=0", "federation.rounds"),
        ("train.batch_size='many'", "train.batch_size"),
        ("partition.scheme='random'", "partition.scheme"),
        ("bogus.key=1", "bogus"),
        ("adapter.rank=8", "adapter.rank"),
        ("adapter.method='nope'", "adapter.method"),
    ],
)
def test_bad_keys_and_values_name_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_steps_and_epochs_are_exclusive() -> None:
    with pytest.raises(ConfigError, match=r"epochs or train\.steps"):
        load_config(None, ["train.epochs=1"])
    assert load_config(None, ["train.epochs=1", "train.steps=0"]).train.epochs == 1


def test_column_partition_needs_a_column() -> None:
    with pytest.raises(ConfigError, match="partition"):
        load_config(None, ["partition.scheme='column'"])


def test_ia3_and_other_peft_configs_pass_through() -> None:
    config = parse_config(
        {"adapter": {"method": "ia3", "target_modules": ["key", "value"], "feedforward_modules": []}}
    )
    assert config.adapter.method == "ia3"
    assert config.adapter.options["target_modules"] == ["key", "value"]


def test_missing_config_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml")


def test_resolved_toml_round_trips() -> None:
    config = load_config(CONFIGS / "default.toml", ["train.lr=2e-4"])
    again = config_from_toml(config.to_toml())
    assert again == config
    assert again.fingerprint() == config.fingerprint()
