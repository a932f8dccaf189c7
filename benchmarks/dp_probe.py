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
import torch

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
    parser.add_argument(
        "--centre-head-input",
        choices=["mean", "standardise"],
        help="experiment, not private: before the head, subtract the mean of its input over the "
        "training data (measured once, without noise), and with 'standardise' also divide each "
        "coordinate by its std times sqrt(width), to test whether the head's conditioning is what "
        "stalls DP training",
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

    if args.centre_head_input:
        centre_head_input(model, experiment, sizes, device, args.centre_head_input == "standardise")

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


def centre_head_input(
    model: torch.nn.Module, experiment: Experiment, sizes: list[int], device: str, standardise: bool
) -> None:
    """Make the classifier see its input minus the input's training mean (from up to 2,000 examples).

    Tests a suspicion about the stall: the pooled features of different sentences share
    most of their energy (a common mean), so the head's loss is steep along that mean
    and flat along what separates the classes. Prints the statistics that say so.
    Measured without noise: a probe of the idea, not a private recipe.
    """
    head = next(m for name, m in model.named_modules() if name.endswith("classifier.modules_to_save.default"))
    inputs: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    hook = head.register_forward_pre_hook(lambda _m, args: inputs.append(args[0].detach()))
    per_client = max(1, 2000 // len(sizes))
    model.eval()
    with torch.no_grad():
        for client_id in range(len(sizes)):
            examples = experiment.tokenized_partition(client_id).select(
                range(min(per_client, sizes[client_id]))
            )
            for start in range(0, len(examples), 100):
                batch = experiment.collator(
                    [examples[i] for i in range(start, min(start + 100, len(examples)))]
                )
                labels.append(batch.pop("labels"))
                model(**{k: v.to(device) for k, v in batch.items()})
    hook.remove()
    features, classes = torch.cat(inputs).double(), torch.cat(labels)
    mean = features.mean(0)
    spectrum = torch.linalg.eigvalsh(torch.cov(features.T))
    separation = features[classes == 1].mean(0) - features[classes == 0].mean(0)
    print(
        f"head input over {len(features)} examples: mean squared norm {features.pow(2).sum(1).mean():.3f}, "
        f"shared mean's {mean.pow(2).sum():.3f}, class means {separation.norm():.3f} apart, "
        f"covariance eigenvalues: largest {spectrum[-1]:.4f}, median {spectrum.median():.2e}",
        flush=True,
    )
    mean = mean.float()
    scale = features.std(0).float() * features.shape[1] ** 0.5 if standardise else torch.ones_like(mean)
    head.register_forward_pre_hook(lambda _m, args: ((args[0] - mean) / scale, *args[1:]))


if __name__ == "__main__":
    main()
