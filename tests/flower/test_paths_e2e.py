"""End to end through the real CLI and Flower's simulation engine: SLoRA's stage switch
and both kinds of DP, on a tiny model (these check plumbing, not accuracy)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import tomli_w
from peft import PeftModel

from fedpeft.config import parse_config
from fedpeft.models import load_base_model
from tests.conftest import tiny_config

pytestmark = pytest.mark.slow


def simulate(folder: Path, config: dict) -> dict:
    config_path = folder / "config-in.toml"
    config_path.write_text(tomli_w.dumps(config), encoding="utf-8")
    out = folder / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "fedpeft.cli", "simulate", "--config", str(config_path), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    metrics["_stdout"] = proc.stdout
    metrics["_out"] = out
    return metrics


def test_slora_switches_to_lora_after_its_sparse_rounds(
    tmp_path: Path, tiny_bert_dir: Path, sentiment_files: dict[str, Path]
) -> None:
    config = tiny_config(tiny_bert_dir, sentiment_files)
    config["federation"]["rounds"] = 3
    config["slora"] = {"rounds": 1, "density": 0.05}
    metrics = simulate(tmp_path, config)
    rounds = metrics["rounds"]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert "slora: stage 2" in metrics["_stdout"]
    assert rounds[1]["aggregation"]["slora_update_norm"] > 0
    # Stage 1 sends the masked values (5 % of query/value) + head: fewer bytes than LoRA.
    assert rounds[0]["bytes_up"] < rounds[1]["bytes_up"]
    # The final checkpoint is a plain peft LoRA adapter on the untouched base.
    resolved = parse_config(config)
    base = load_base_model(resolved.model, num_labels=2)
    model = PeftModel.from_pretrained(base, str(metrics["_out"] / "adapter"))
    assert any("lora_A" in n for n, _ in model.named_parameters())


def test_dp_sgd_and_user_level_dp_epsilons_compose_over_rounds(
    tmp_path: Path, tiny_bert_dir: Path, sentiment_files: dict[str, Path]
) -> None:
    config = tiny_config(tiny_bert_dir, sentiment_files)
    config["federation"]["rounds"] = 3
    config["train"] = {"steps": 4, "batch_size": 8, "lr": 5e-3}
    config["privacy"] = {
        "example": {"enabled": True, "target_epsilon": 8.0, "max_grad_norm": 1.0},
        "client": {"enabled": True, "clipping_norm": 0.5, "noise_multiplier": 0.8},
    }
    metrics = simulate(tmp_path, config)
    rounds = metrics["rounds"]
    example = [r["privacy"]["epsilon_example"] for r in rounds]
    client = [r["privacy"]["epsilon_client"] for r in rounds]
    assert 0 < example[0] < example[1] < example[2] <= 8.0
    assert 0 < client[0] < client[1] < client[2]
    assert all(r["privacy"]["delta_example"] == 1e-5 for r in rounds)
    for r in rounds:  # what each client reported agrees with the server's ledger
        for c in r["per_client"]:
            assert c["dp_noise_multiplier"] > 0 and c["epsilon"] <= r["privacy"]["epsilon_example"] + 1e-9
    ledger = json.loads((metrics["_out"] / "privacy_ledger.json").read_text())
    assert {e["unit"] for e in ledger} == {"example", "client"}
    assert sum(e["party"] == "server" for e in ledger) == 3
    assert "eps(example)" in metrics["_stdout"] and "eps(client)" in metrics["_stdout"]
