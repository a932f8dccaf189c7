"""End to end through the real CLI and Flower's simulation engine: lora_product's rank-space
refactor replaces the global LoRA factors round after round (plumbing, not accuracy)."""

import math
from pathlib import Path

import pytest

from tests.conftest import tiny_config
from tests.flower.test_paths_e2e import simulate

pytestmark = pytest.mark.slow


def test_lora_product_runs_rounds_and_reports_what_the_refactor_drops(
    tmp_path: Path, tiny_bert_dir: Path, sentiment_files: dict[str, Path]
) -> None:
    config = tiny_config(tiny_bert_dir, sentiment_files)
    config["federation"]["aggregator"] = "lora_product"
    metrics = simulate(tmp_path, config)
    rounds = metrics["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    # 3 clients of rank 4: the mean product has rank up to 12, so the rank-4 refactor drops some.
    for record in rounds:
        dropped = record["aggregation"]["svd_dropped_norm"]
        assert math.isfinite(dropped) and dropped > 0
