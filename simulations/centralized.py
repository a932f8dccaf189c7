"""Centralised baseline: the same model, adapter and step budget, with the data pooled.

The federated gap is only visible beside this number. The budget is matched in
optimiser steps: a federation of R rounds, K sampled clients and S local steps takes
R*K*S steps in total, so the centralised run takes R*K*S steps of the same batch size
on the union of the clients' data (the full training split).

    python simulations/centralized.py --config configs/default.toml --out runs/centralized
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import asdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")

import torch

from fedpeft.config import load_config
from fedpeft.experiment import Experiment
from fedpeft.models import adapter_state, save_adapter
from fedpeft.training import evaluate, make_loader, tokenize, train_local


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", type=Path, default=Path("configs/default.toml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", type=Path, default=Path("runs/centralized"))
    parser.add_argument("--evals", type=int, default=5, help="evaluate this many times along the way")
    args = parser.parse_args()

    config = load_config(args.config, args.overrides)
    if config.train.steps == 0:
        raise SystemExit("centralized.py matches a step budget: use a config with train.steps > 0")
    experiment = Experiment(config)
    clients_per_round = max(
        math.ceil(config.partition.num_clients * config.federation.fraction_train),
        config.federation.min_train_clients,
    )
    clients_per_round = min(clients_per_round, config.partition.num_clients)
    total_steps = config.federation.rounds * clients_per_round * config.train.steps
    chunk = math.ceil(total_steps / args.evals)
    print(
        f"centralised LoRA: {total_steps} steps = {config.federation.rounds} rounds x "
        f"{clients_per_round} clients x {config.train.steps} local steps, batch {config.train.batch_size}"
    )

    model = experiment.model.model
    encoded = tokenize(
        experiment.data.train, experiment.model.tokenizer, config.data.max_length, config.model.task
    )
    torch.manual_seed(config.seed)
    history = []
    done, started = 0, time.monotonic()
    while done < total_steps:
        steps = min(chunk, total_steps - done)
        loader = make_loader(
            encoded,
            experiment.model.tokenizer,
            config.model.task,
            config.train.batch_size,
            True,
            seed=done,
            group_by_length=config.train.group_by_length,
        )
        # One schedule over the whole budget would differ from the clients' per-round
        # schedule; with the default constant schedule the two are the same.
        train_local(model, loader, config.train.model_copy(update={"steps": steps}), experiment.device)
        done += steps
        result = evaluate(model, experiment.test_loader, config.model.task, experiment.device)
        seconds = time.monotonic() - started
        history.append({"steps": done, **asdict(result), "seconds": seconds})
        print(
            f"steps {done:>5}/{total_steps}  acc {result.accuracy:.4f}  "
            f"loss {result.loss:.4f}  {seconds:.0f} s"
        )

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "config.toml").write_text(config.to_toml(), encoding="utf-8")
    state = adapter_state(model)
    save_adapter(model, state, args.out / "adapter", config.model.name_or_path, pooling=config.model.pooling)
    summary = {"total_steps": total_steps, "final_accuracy": history[-1]["accuracy"], "history": history}
    (args.out / "metrics.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    print(f"final accuracy {history[-1]['accuracy']:.4f}; wrote {args.out}")


if __name__ == "__main__":
    main()
