"""Step time of DP-SGD against non-private training, per Opacus grad_sample_mode.

For each model, times one optimiser step (forward, backward, step) on a fixed batch
of real text (SST-2 sentences, ``--batch-size`` examples padded to ``--length``
tokens) for: non-private AdamW, DP-SGD with ``hooks`` (per-example gradients) and
DP-SGD with ``ghost`` (ghost clipping). The variants are interleaved round-robin over
``--repeats`` rounds (each a call of a few steps) in one process so machine noise hits them alike; the table shows
the median and the ratio to non-private. Prints a table, writes JSON.

    python benchmarks/dp.py --out runs/bench/dp.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import datasets
import torch

from fedpeft.config import ExamplePrivacyConfig, TrainConfig, load_config
from fedpeft.experiment import Experiment
from fedpeft.privacy.dp_sgd import resolve_grad_sample_mode, train_local_private
from fedpeft.training import make_collator, make_loader, tokenize, train_local

ROOT = Path(__file__).resolve().parent.parent
MODELS = {
    "MiniLM-L6 (encoder, classification)": ["model.name_or_path=builtin:all-MiniLM-L6-v2"],
    "SmolLM2-135M (decoder, causal LM)": [
        "model.name_or_path=builtin:SmolLM2-135M-Instruct",
        "model.task=causal-lm",
        'adapter.target_modules=["q_proj", "v_proj"]',
        'data.label_column=""',
    ],
}


def fixed_batch(experiment: Experiment, batch_size: int, length: int) -> datasets.Dataset:
    """``batch_size`` training sentences, each padded/truncated to exactly ``length`` tokens."""
    text = experiment.data.train.select(range(batch_size))
    encoded = tokenize(text, experiment.model.tokenizer, length, experiment.config.model.task)
    encoded = encoded.remove_columns([c for c in encoded.column_names if c not in ("input_ids", "labels")])

    def to_length(row: dict) -> dict:
        ids = (row["input_ids"] * length)[:length]  # repeat short sentences: every row is `length` long
        return {"input_ids": ids, "attention_mask": [1] * length} | (
            {"labels": row["labels"]} if "labels" in row else {}
        )

    return encoded.map(to_length)


STEPS_PER_CALL = 5
"""Steps per timed call: Opacus wraps the model once per call (once per round in a real
client), so its setup is amortised over a few steps as it is over a round."""


def time_variant(experiment: Experiment, batch: datasets.Dataset, variant: str, lr: float) -> float:
    """Seconds per optimiser step of ``variant`` on ``batch`` (mean over one call)."""
    model, task = experiment.model.model, experiment.config.model.task
    train = TrainConfig(steps=STEPS_PER_CALL, batch_size=len(batch), lr=lr)
    started = time.perf_counter()
    if variant == "non-private":
        loader = make_loader(batch, experiment.model.tokenizer, task, len(batch), shuffle=False)
        train_local(model, loader, train, experiment.device)
    else:
        privacy = ExamplePrivacyConfig(enabled=True, noise_multiplier=1.0, grad_sample_mode=variant)  # type: ignore[arg-type]
        train_local_private(
            model,
            batch,
            make_collator(experiment.model.tokenizer, task),
            task,
            train,
            privacy,
            1.0,
            experiment.device,
            batches=[list(range(len(batch)))] * STEPS_PER_CALL,
        )
    if experiment.device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - started) / STEPS_PER_CALL


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=ROOT / "runs/bench/dp.json")
    args = parser.parse_args()

    rows: list[dict[str, Any]] = []
    print(f"{'model':<38} {'variant':<12} {'median s/step':>13} {'x non-private':>13}")
    for label, overrides in MODELS.items():
        config = load_config(ROOT / "configs/default.toml", [*overrides, f"train.device={args.device}"])
        experiment = Experiment(config)
        batch = fixed_batch(experiment, args.batch_size, args.length)
        auto = resolve_grad_sample_mode(experiment.model.model, "auto", args.batch_size)
        variants = ["non-private", "hooks", "ghost"]
        for variant in variants:  # warm-up (allocations, first-call overheads)
            time_variant(experiment, batch, variant, lr=1e-6)
        times: dict[str, list[float]] = {v: [] for v in variants}
        for _ in range(args.repeats):
            for variant in variants:
                times[variant].append(time_variant(experiment, batch, variant, lr=1e-6))
        base = statistics.median(times["non-private"])
        for variant in variants:
            median = statistics.median(times[variant])
            chosen = " (auto)" if variant == auto else ""
            print(f"{label:<38} {variant + chosen:<12} {median:>13.3f} {median / base:>13.2f}")
            rows.append(
                {
                    "model": label,
                    "variant": variant,
                    "auto_choice": variant == auto,
                    "median_seconds": median,
                    "ratio_vs_non_private": median / base,
                    "seconds": times[variant],
                }
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "batch_size": args.batch_size,
        "length": args.length,
        "repeats": args.repeats,
        "device": str(experiment.device),
        "torch_threads": torch.get_num_threads(),
        "rows": rows,
    }
    args.out.write_text(json.dumps(report, indent=2), encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
