"""End to end: `fedpeft attack` runs a real simulation whose server captures the updates
it receives (the real message path), then attacks them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import tomli_w

pytestmark = pytest.mark.slow


def attack_config(tiny_llama_dir: Path, sentiment_files: dict[str, Path]) -> dict:
    return {
        "seed": 0,
        "model": {"name_or_path": str(tiny_llama_dir), "task": "causal-lm"},
        "adapter": {
            "method": "lora",
            "r": 8,
            "lora_alpha": 16,
            "lora_dropout": 0.0,
            "target_modules": ["q_proj", "k_proj", "v_proj"],
        },
        "data": {
            "train": str(sentiment_files["train"]),
            "test": str(sentiment_files["test"]),
            "label_column": "",
        },
        "partition": {"scheme": "iid", "num_clients": 2},
        "train": {"steps": 1, "batch_size": 1, "lr": 0.1, "optimizer": "sgd"},
        "federation": {"rounds": 2, "min_train_clients": 2, "min_available_clients": 2},
        "capture": {"rounds": [2], "clients": [1], "malicious": True},
        "attack": {"name": "sequence_assembly", "show_examples": 1},
    }


def run_attack(
    config: dict, folder: Path, out_name: str = "run", extra: tuple[str, ...] = ()
) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """``fedpeft attack`` on ``config`` (written to ``folder``) into ``folder/out_name``; fails loudly."""
    path = folder / "attack.toml"
    path.write_text(tomli_w.dumps(config), encoding="utf-8")
    out = folder / out_name
    proc = subprocess.run(
        [sys.executable, "-m", "fedpeft.cli", "attack", "--config", str(path), "--out", str(out), *extra],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc


def test_malicious_fedsgd_capture_is_inverted(
    tmp_path: Path, tiny_llama_dir: Path, sentiment_files: dict[str, Path]
) -> None:
    config = attack_config(tiny_llama_dir, sentiment_files)
    out, proc = run_attack(config, tmp_path)
    assert sorted(p.name for p in (out / "captures").iterdir()) == ["round-0002-client-0001.safetensors"]
    report = json.loads((out / "attack.json").read_text())
    [outcome] = report["outcomes"]
    assert (outcome["round"], outcome["client"], outcome["threat_model"]) == (2, 1, "malicious")
    # The toy sentences end in a sentiment word before [SEP]: everything but [SEP] is visible.
    assert outcome["metrics"]["token_recall"] == 1.0
    assert outcome["metrics"]["rougeL"] == pytest.approx(1.0)
    assert "recovered:" in proc.stdout
    # The crafted round does not move the global adapter: round 2 evaluates like round 1.
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["rounds"][1]["loss"] == pytest.approx(metrics["rounds"][0]["loss"])

    # Attacking saved captures again needs no federation.
    _, again = run_attack(config, tmp_path, "again", ("--captures", str(out / "captures")))
    assert "partitions" not in again.stdout


def test_a_dp_capture_is_scored_against_the_clients_own_record(
    tmp_path: Path, tiny_llama_dir: Path, sentiment_files: dict[str, Path]
) -> None:
    config = attack_config(tiny_llama_dir, sentiment_files)
    # One example per client and batch 1: Poisson rate 1, so the batch is never empty.
    config["data"]["max_train_examples"] = 2
    config["privacy"] = {"example": {"enabled": True, "noise_multiplier": 1e-7, "max_grad_norm": 1.0}}
    out, _ = run_attack(config, tmp_path)
    assert sorted(p.name for p in (out / "captures").iterdir()) == [
        "round-0002-client-0001.batches.json",
        "round-0002-client-0001.safetensors",
    ]
    record = json.loads((out / "captures" / "round-0002-client-0001.batches.json").read_text())
    assert record == {"batches": [[0]]}
    [outcome] = json.loads((out / "attack.json").read_text())["outcomes"]
    assert outcome["batch_size"] == 1
    # Per-example clipping rescales the gradient and keeps its spans; noise this small
    # leaves them intact, so the sentence is recovered as without DP. (At sigma 1e-4 the
    # tiny model's weakest tokens already drift out of the span: recall 0.67 to 1.0.)
    assert outcome["metrics"]["token_recall"] == 1.0


def test_recit_inverts_what_clients_send_to_a_boosting_server(
    tmp_path: Path, tiny_llama_dir: Path, sentiment_files: dict[str, Path]
) -> None:
    config = attack_config(tiny_llama_dir, sentiment_files)
    config["capture"]["boost_steps"] = 5
    config["attack"]["name"] = "recit"
    out, _ = run_attack(config, tmp_path)
    [outcome] = json.loads((out / "attack.json").read_text())["outcomes"]
    # The boosted adapter's B is not zero, so A's gradient carries the inputs without
    # the crafted-B trick: the sentence is filtered and paired as from a crafted round.
    assert outcome["metrics"]["token_recall"] == 1.0
    assert outcome["metrics"]["rougeL"] == pytest.approx(1.0)


def test_under_secure_aggregation_the_attack_sees_the_rounds_sum_only(
    tmp_path: Path, tiny_llama_dir: Path, sentiment_files: dict[str, Path]
) -> None:
    config = attack_config(tiny_llama_dir, sentiment_files)
    config["federation"]["secure_aggregation"] = {"enabled": True}
    config["capture"] = {"rounds": [2], "malicious": True}  # the server cannot pick a client
    out, proc = run_attack(config, tmp_path)
    assert sorted(p.name for p in (out / "captures").iterdir()) == ["round-0002-sum.safetensors"]
    [outcome] = json.loads((out / "attack.json").read_text())["outcomes"]
    assert (outcome["round"], outcome["client"], outcome["threat_model"]) == (2, -1, "malicious")
    # Scored against both clients' batches (one sentence each), which the sum still shows:
    # SecAgg+ hides who sent which sentence, not the sentences.
    assert outcome["batch_size"] == 2
    assert outcome["metrics"]["token_recall"] >= 0.9
    assert "sum of clients 0+1" in proc.stdout
