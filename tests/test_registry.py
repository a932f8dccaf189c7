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
