"""Federated instruction tuning end to end: the real CLI and Flower's simulation engine
on a tiny Llama, with the loss on responses only (plain and under DP-SGD)."""

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from tests.flower.test_paths_e2e import simulate

pytestmark = pytest.mark.slow

NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def write_qa(path: Path, n: int, seed: int) -> Path:
    """Questions about a digit whose answers follow one fixed, learnable pattern."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        digit = rng.randrange(10)
        rows.append(
            {"question": f"what comes after {digit}?", "answer": f"the answer is {NUMBERS[(digit + 1) % 10]}"}
        )
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


def instruct_config(tiny_llama_dir: Path, folder: Path) -> dict:
    return {
        "seed": 0,
        "model": {"name_or_path": str(tiny_llama_dir), "task": "causal-lm"},
        # The tiny model's random output layer bounds how far LoRA alone can move its
        # predictions, so it trains (and travels) too.
        "adapter": {
            "method": "lora",
            "r": 8,
            "target_modules": ["q_proj", "v_proj"],
            "modules_to_save": ["lm_head"],
        },
        "data": {
            "train": str(write_qa(folder / "train.jsonl", 120, 0)),
            "test": str(write_qa(folder / "test.jsonl", 24, 1)),
            "max_length": 32,
            "instruction": {"format": "qa", "generation_examples": 8, "max_new_tokens": 8},
        },
        "partition": {"scheme": "iid", "num_clients": 2},
        "train": {"steps": 15, "batch_size": 8, "lr": 1e-2},
        "federation": {"rounds": 2, "min_train_clients": 2, "min_available_clients": 2},
        "simulation": {"num_cpus_per_client": 1},
    }


def test_held_out_response_loss_falls_over_federated_rounds(tmp_path: Path, tiny_llama_dir: Path) -> None:
    metrics = simulate(tmp_path, instruct_config(tiny_llama_dir, tmp_path))
    losses = [metrics["initial"]["loss"]] + [r["loss"] for r in metrics["rounds"]]
    # Measured: 10.3 (about log of the 30k-token vocabulary), 3.0, 0.9.
    assert losses[2] < losses[1] < losses[0] - 2, losses
    report = metrics["instruction_data"]
    assert (report["examples"], report["truncated"], report["dropped"]) == (120, 0, 0)
    assert report["prompt_style"] == "plain"  # the BERT tokenizer has no chat template
    assert "instruction data (plain template): 120 examples" in metrics["_stdout"]
    # Greedy answers to the first test questions, scored by ROUGE-L (auto, free text), and
    # kept to read: "the answer is five" once trained.
    rouge = [metrics["initial"]["generation"]["rouge_l"]] + [
        r["generation"]["rouge_l"] for r in metrics["rounds"]
    ]
    assert rouge[-1] > rouge[0] + 0.3, rouge
    samples = json.loads((metrics["_out"] / "generations.json").read_text())
    assert sorted(samples) == ["0", "1", "2"] and samples["2"][0]["reference"].startswith("the answer is")
    # The run's adapter answers from the command line, as the run was trained to.
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedpeft.cli",
            "generate",
            "--run",
            str(metrics["_out"]),
            "--prompt",
            "what comes after 4?",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().startswith("the answer is"), proc.stdout


def test_dp_sgd_trains_on_responses_and_accounts_each_example(tmp_path: Path, tiny_llama_dir: Path) -> None:
    config = instruct_config(tiny_llama_dir, tmp_path)
    config["train"] = {"steps": 5, "batch_size": 16, "lr": 1e-2}
    config["privacy"] = {"example": {"enabled": True, "target_epsilon": 8.0, "max_grad_norm": 1.0}}
    metrics = simulate(tmp_path, config)
    rounds = metrics["rounds"]
    assert 0 < rounds[0]["privacy"]["epsilon_example"] < rounds[1]["privacy"]["epsilon_example"] <= 8.0
    assert all(r["loss"] < 100 for r in rounds)  # finite (NaN compares False)


def test_an_instruction_tuning_update_is_inverted_by_the_attack_suite(
    tmp_path: Path, tiny_llama_dir: Path
) -> None:
    from tests.attacks.test_attack_cli import attack_config, run_attack

    config = attack_config(
        tiny_llama_dir,
        {"train": write_qa(tmp_path / "train.jsonl", 40, 0), "test": write_qa(tmp_path / "test.jsonl", 8, 1)},
    )
    config["data"] = {
        **config["data"],
        "label_column": "",
        "max_length": 32,
        "instruction": {"format": "qa", "scorer": "none"},
    }
    out, proc = run_attack(config, tmp_path)
    [outcome] = json.loads((out / "attack.json").read_text())["outcomes"]
    # The truth is the whole trained sequence, prompt template included (public knowledge).
    # Every token but the last comes back (a causal LM's last token feeds only the unused
    # last logit; 12 of 13 here) and nothing that was not there.
    assert outcome["metrics"]["token_recall"] == pytest.approx(12 / 13), outcome["metrics"]
    assert outcome["metrics"]["token_precision"] == 1.0
    assert "recovered:" in proc.stdout
