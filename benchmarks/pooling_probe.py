"""Which head input carries the classes: a linear probe of a config's frozen base model.

For each head input a sequence classifier could read (``model``: the architecture's
own, for BERT the ``[CLS]`` state through the pooler; ``cls``: the ``[CLS]`` state
itself; ``mean``: the mean of the token states, ``model.pooling = "mean"``) this fits a
logistic regression (L-BFGS, a small L2 penalty, no DP) on the frozen features of the
config's training data and scores it on its test data. The base never trains, so the
numbers are what a head alone can reach: the ceiling of a DP linear probe, and the
signal DP-SGD has to find under its noise.

    python benchmarks/pooling_probe.py --config configs/dp-cross-silo.toml \\
        --json docs/figures/pooling_probe.json

Prints a table (accuracy; the features' mean norm; the distance between the two class
means over the features' root-mean-square spread, a signal-to-noise ratio a DP step
sees) and writes JSON with the same rows.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import tomllib
import torch
from torch import Tensor

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from _paths import repo_relative

from fedpeft.config import apply_overrides, parse_config
from fedpeft.data.loading import LABEL, TEXT, load_text_data
from fedpeft.models import load_base_model, load_tokenizer
from fedpeft.pooling import MeanPooler

HEAD_INPUTS = ("model", "cls", "mean")


def features(
    config_path: Path, overrides: list[str], batch_size: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``{split: {head input: (rows, width) features, "label": labels}}`` and the config used."""
    data = apply_overrides(tomllib.loads(config_path.read_text(encoding="utf-8")), overrides)
    config = parse_config(data, str(config_path))
    text = load_text_data(config.data)
    if text.num_labels is None:
        raise SystemExit("the probe needs a classification config (data.label_column)")
    model_config = config.model.model_copy(update={"pooling": "model"})
    base = load_base_model(model_config, num_labels=text.num_labels, seed=config.seed).eval()
    tokenizer = load_tokenizer(model_config)
    mean_pooler = MeanPooler()  # what model.pooling = "mean" puts in the pooler's place
    out: dict[str, Any] = {}
    for split, rows in (("train", text.train), ("test", text.test)):
        sentences, labels = rows[TEXT], rows[LABEL]
        order = sorted(range(len(sentences)), key=lambda i: len(sentences[i]))  # less padding
        parts: dict[str, list[Tensor]] = {name: [] for name in HEAD_INPUTS}
        started = time.monotonic()
        with torch.no_grad():
            for start in range(0, len(order), batch_size):
                chunk = order[start : start + batch_size]
                batch = tokenizer(
                    [sentences[i] for i in chunk],
                    padding=True,
                    truncation=True,
                    max_length=config.data.max_length,
                    return_tensors="pt",
                )
                encoded = base.base_model(**batch)
                states = encoded.last_hidden_state
                mean_pooler.attention_mask = batch["attention_mask"]
                pooled = encoded.pooler_output if encoded.pooler_output is not None else states[:, 0]
                parts["model"].append(pooled)
                parts["cls"].append(states[:, 0])
                parts["mean"].append(mean_pooler(states))
        back = torch.argsort(torch.tensor(order))
        out[split] = {name: torch.cat(p)[back] for name, p in parts.items()}
        out[split]["label"] = torch.tensor(labels)
        print(f"{split}: {len(sentences)} rows encoded in {time.monotonic() - started:.0f} s", flush=True)
    return out, {
        "config": repo_relative(config_path),
        "overrides": overrides,
        "model": config.model.name_or_path,
    }


def fit_probe(train: Tensor, labels: Tensor, classes: int) -> tuple[Tensor, Tensor]:
    """Multinomial logistic regression, L2 1e-4, L-BFGS to convergence."""
    weight = torch.zeros(train.shape[1], classes, requires_grad=True)
    bias = torch.zeros(classes, requires_grad=True)
    optimiser = torch.optim.LBFGS([weight, bias], max_iter=500, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimiser.zero_grad()
        loss = torch.nn.functional.cross_entropy(train @ weight + bias, labels) + 1e-4 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimiser.step(closure)
    return weight.detach(), bias.detach()


def class_separation(train: Tensor, labels: Tensor) -> float:
    """Distance of the two class means over the root-mean-square spread around them."""
    first, second = train[labels == 0], train[labels == 1]
    spread = torch.cat([first - first.mean(0), second - second.mean(0)]).pow(2).sum(1).mean().sqrt()
    return float((first.mean(0) - second.mean(0)).norm() / spread)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", type=Path, default=Path("configs/dp-cross-silo.toml"))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a key")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--json", type=Path, help="write the rows here")
    args = parser.parse_args()

    torch.manual_seed(0)
    splits, source = features(args.config, args.set, args.batch_size)
    train, test = splits["train"], splits["test"]
    classes = int(train["label"].max()) + 1
    rows = []
    print(f"{'head input':<10} {'accuracy':>8} {'mean norm':>9} {'separation':>10}")
    for name in HEAD_INPUTS:
        weight, bias = fit_probe(train[name], train["label"], classes)
        accuracy = float(((test[name] @ weight + bias).argmax(1) == test["label"]).float().mean())
        norm = float(train[name].norm(dim=1).mean())
        separation = class_separation(train[name], train["label"]) if classes == 2 else None
        rows.append({"head_input": name, "accuracy": accuracy, "mean_norm": norm, "separation": separation})
        shown = f"{separation:10.3f}" if separation is not None else f"{'-':>10}"
        print(f"{name:<10} {accuracy:8.4f} {norm:9.3f} {shown}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        result = {**source, "train_rows": len(train["label"]), "test_rows": len(test["label"]), "rows": rows}
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {repo_relative(args.json)}")


if __name__ == "__main__":
    main()
