"""Try a DP-SGD recipe quickly: a federation of a config's clients in one process.

The parts are the ones ``fedpeft simulate`` uses (``fedpeft.experiment.Experiment``:
data, partition, model, each client's calibrated noise multiplier, DP-SGD with Opacus,
the configured aggregator, the test set), run in a plain loop: every client every round,
one after another, no Flower, no ledger files, no checkpoints. It spends no time on
Ray or messages, so recipes (optimisers, learning rates, steps a round, the head) can
be compared in minutes; what a recipe reaches is then to be confirmed with the CLI
(``benchmarks/dp_utility.py``), whose runs are the ones the docs report as results.

    python benchmarks/dp_probe.py --config configs/dp-cross-silo.toml \\
        --set federation.rounds=20 --json runs/probe/dp-cross-silo.json

Prints the test accuracy and loss after each round; ``--json`` keeps them with the
config's overrides.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import tomllib

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fedpeft.aggregation.base import ClientUpdate
from fedpeft.config import apply_overrides, parse_config
from fedpeft.experiment import Experiment
from fedpeft.models import adapter_state, load_adapter_state, state_delta
from fedpeft.privacy.dp_sgd import train_local_private
from fedpeft.training import evaluate


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", type=Path, required=True, help="a config with privacy.example enabled")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a key")
    parser.add_argument("--json", type=Path, help="write the per-round accuracy and loss here")
    parser.add_argument(
        "--stop-after",
        type=int,
        metavar="ROUNDS",
        help="stop after this many rounds; the noise stays calibrated to federation.rounds",
    )
    parser.add_argument(
        "--no-noise",
        action="store_true",
        help="clip but add no noise (sigma 0): what the recipe does without the noise",
    )
    parser.add_argument(
        "--head-only",
        action="store_true",
        help="train only the classifier head, LoRA frozen (a DP linear probe)",
    )
    args = parser.parse_args()

    data = apply_overrides(tomllib.loads(args.config.read_text(encoding="utf-8")), args.set)
    config = parse_config(data, str(args.config))
    if not config.privacy.example.enabled:
        parser.error("the probe runs DP-SGD clients: enable privacy.example")
    experiment = Experiment(config)
    model, device = experiment.model.model, experiment.device
    noise = {client: 0.0 for client in experiment.privacy_plan} if args.no_noise else experiment.privacy_plan
    lora = [param for name, param in model.named_parameters() if "lora_" in name]
    sizes = experiment.partitions.sizes()
    print(f"clients {sizes}, noise multipliers {[round(noise[c], 3) for c in range(len(sizes))]}", flush=True)

    aggregator = experiment.new_aggregator()
    state = experiment.initial_state
    rounds, start = [], time.perf_counter()
    last_round = min(config.federation.rounds, args.stop_after or config.federation.rounds)
    for server_round in range(1, last_round + 1):
        updates = []
        for client_id, size in enumerate(sizes):
            load_adapter_state(model, state)
            for param in lora:  # frozen for training only: the delta keeps every tensor
                param.requires_grad_(not args.head_only)
            train_local_private(
                model,
                experiment.tokenized_partition(client_id),
                experiment.collator,
                config.model.task,
                experiment.train_config_for(server_round),
                config.privacy.example,
                noise[client_id],
                device,
            )
            for param in lora:
                param.requires_grad_(True)
            updates.append(ClientUpdate(client_id, state_delta(adapter_state(model), state), size))
        state = aggregator.aggregate(state, updates).state
        load_adapter_state(model, state)
        result = evaluate(model, experiment.test_loader, config.model.task, device)
        seconds = time.perf_counter() - start
        rounds.append(
            {"round": server_round, "accuracy": result.accuracy, "loss": result.loss, "seconds": seconds}
        )
        print(
            f"round {server_round}  acc {result.accuracy:.4f}  loss {result.loss:.4f}  {seconds:.0f} s",
            flush=True,
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        record = {
            "config": str(args.config),
            "overrides": args.set,
            "no_noise": args.no_noise,
            "head_only": args.head_only,
            "clients": sizes,
            "rounds": rounds,
        }
        args.json.write_text(json.dumps(record, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
