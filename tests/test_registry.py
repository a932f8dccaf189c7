import pytest

from fedpeft.aggregation import AGGREGATORS
from fedpeft.codecs import CODECS
from fedpeft.errors import ConfigError


def test_unknown_name_lists_choices() -> None:
    with pytest.raises(ConfigError, match=r"federation\.codec: unknown codec 'zip'.*dense"):
        CODECS.get("zip")


def test_unknown_option_names_its_key() -> None:
    with pytest.raises(ConfigError, match=r"federation\.aggregator_options\.momentum"):
        AGGREGATORS.build("fedavg", {"momentum": 0.9}, "federation.aggregator_options")


def test_bad_option_value_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="server_lr"):
        AGGREGATORS.build("fedavg", {"server_lr": -1.0}, "federation.aggregator_options")
    with pytest.raises(ConfigError, match="dtype"):
        CODECS.build("dense", {"dtype": "int8"}, "federation.codec_options")


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("krum", {"num_malicious": "x"}, r"aggregator_options\.num_malicious: expected int, got 'x'"),
        ("krum", {"num_to_keep": 1.5}, r"aggregator_options\.num_to_keep: expected int, got 1\.5"),
        ("fedavg", {"weighted": 1}, r"aggregator_options\.weighted: expected bool, got 1"),
        ("fedavg", {"server_lr": True}, r"aggregator_options\.server_lr: expected float, got True"),
    ],
)
def test_an_option_of_the_wrong_type_names_its_key(name: str, options: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        AGGREGATORS.build(name, options, "federation.aggregator_options")


def test_an_int_is_a_float_option() -> None:
    assert CODECS.build("topk", {"density": 1}, "federation.codec_options") is not None
