"""What a run checks once its data is partitioned, before any training."""

import pytest

from fedpeft.config import parse_config
from fedpeft.errors import ConfigError
from fedpeft.experiment import Experiment


def test_example_delta_must_be_below_one_over_every_clients_examples(tiny_config_data: dict) -> None:
    tiny_config_data["partition"] = {"scheme": "dirichlet", "num_clients": 3, "alpha": 0.3}
    tiny_config_data["privacy"] = {"example": {"enabled": True, "noise_multiplier": 1.0}}
    sizes = Experiment(parse_config(tiny_config_data)).partitions.sizes()
    largest = max(range(len(sizes)), key=sizes.__getitem__)
    assert len(set(sizes)) > 1
    # Below 1/n of the smallest client but not of the largest: the largest binds.
    tiny_config_data["privacy"]["example"]["delta"] = 1.5 / (min(sizes) + max(sizes))
    with pytest.raises(ConfigError, match=rf"client {largest} with n = {max(sizes)} examples"):
        _ = Experiment(parse_config(tiny_config_data)).privacy_plan
    tiny_config_data["privacy"]["example"]["delta"] = 0.99 / max(sizes)
    assert set(Experiment(parse_config(tiny_config_data)).privacy_plan.values()) == {1.0}

