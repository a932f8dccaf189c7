import re
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


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["federation.codec='zip'"], r"federation\.codec: unknown codec 'zip'"),
        (["federation.aggregator='mean'"], r"federation\.aggregator: unknown aggregator 'mean'"),
        (["federation.codec='topk'", "federation.codec_options={densty=0.1}"], r"codec_options\.densty"),
        (["federation.codec='topk'", "federation.codec_options={density=2.0}"], r"codec_options: density"),
        (["federation.aggregator_options={server_lr=-1}"], r"aggregator_options: server_lr"),
        (["attack.name='nope'"], r"attack\.name: unknown attack 'nope'"),
        (["federation.aggregator='lora_product'", "adapter.freeze_lora_a=true"], r"lora_product needs"),
        (
            ["slora.rounds=1", "audit.membership_examples=10", "audit.shadow_models=2"],
            r"audit\.shadow_training = 'federated' cannot rerun SLoRA",
        ),
    ],
)
def test_late_failures_fail_at_load(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("train.lr=nan", "train.lr"),
        ("train.lr=inf", "train.lr"),
        ("train.lr='nan'", "train.lr"),  # a string pydantic would read as a float
        ("federation.round_timeout=inf", "federation.round_timeout"),
        ("privacy.example.target_epsilon=inf", "privacy.example.target_epsilon"),
        ("federation.codec_options={density=nan}", "federation.codec_options.density"),
        ("adapter.lora_dropout=-inf", "adapter.lora_dropout"),
        ("audit.compare=['example:inf']", "audit.compare"),
    ],
)
def test_non_finite_floats_are_refused_by_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(key) + r"(\[0\])?: .*(finite|epsilon)"):
        load_config(None, [override])


@pytest.mark.parametrize("seed", [-1, 2**32, 2**63 - 1])
def test_seeds_beyond_what_torch_seeds_can_derive_are_refused(seed: int) -> None:
    with pytest.raises(ConfigError, match="seed"):
        load_config(None, [f"seed={seed}"])
    assert load_config(None, [f"seed={2**32 - 1}"]).seed == 2**32 - 1


def test_config_file_that_is_not_utf8_is_named(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b"# caf\xe9\nseed = 1\n")
    with pytest.raises(ConfigError, match=r"latin1\.toml: not UTF-8"):
        load_config(path)


def test_user_level_delta_must_be_below_one_over_the_clients() -> None:
    with pytest.raises(ConfigError, match=r"privacy\.client\.delta = 0\.1 is not below 1/n for n = 10 clients"):
        load_config(None, ["privacy.client.enabled=true", "privacy.client.delta=0.1"])
    assert load_config(None, ["privacy.client.enabled=true", "privacy.client.delta=0.09"])


@pytest.mark.parametrize("unit", ["example", "client"])
def test_an_unset_delta_is_a_warning_that_survives_the_resolved_config(unit: str) -> None:
    extra = ["privacy.example.noise_multiplier=1.0"] if unit == "example" else []
    config = load_config(None, [f"privacy.{unit}.enabled=true", *extra])
    assert config.privacy.example.delta == config.privacy.client.delta == 1e-5
    (warning,) = config.warnings()
    assert f"privacy.{unit}.delta is not set: using 1e-05" in warning
    assert config_from_toml(config.to_toml()).warnings() == [warning]  # what server and devices read
    chosen = load_config(None, [f"privacy.{unit}.enabled=true", f"privacy.{unit}.delta=1e-6", *extra])
    assert chosen.warnings() == []
    assert config_from_toml(chosen.to_toml()).privacy == chosen.privacy
    assert load_config(None, [f"privacy.{unit}.delta=1e-6"]).warnings() == []  # DP off: nothing to say
