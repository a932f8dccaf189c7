"""What one server aggregation costs for LLM-shaped LoRA adapters: dense against rank space.

FedAvg's ``lora_factor_averaging_error`` and the exact ``lora_product`` aggregator
used to form every client's d_out x d_in product ``B_i A_i`` (and ``lora_product`` a
d x d SVD per layer); both now work in rank space (``fedpeft/aggregation/_lora.py``).
This times, side by side in one process, for square d x d projections with LoRA
rank ``--rank``, ``--clients`` updates and 16 or 64 LoRA pairs:

- ``mean``: the weighted mean and step alone (FedAvg without any diagnostic);
- ``fedavg``: ``FedAvg.aggregate`` with its diagnostic, rank space (today's code) and
  dense (the formula as it was, copied below);
- ``lora_product``: ``LoraProduct.aggregate``, rank space and dense.

The dense paths cost the same for every pair of a width, so they are timed once per d
on an adapter of ``--dense-pairs`` pairs and scaled to each pair count (timing them in
full would take about 25 minutes at d = 4096 and 64 pairs, mostly d x d SVDs); there
the rank-space and dense results are compared (relative differences in the JSON).
Prints a table, writes JSON.

    python benchmarks/aggregation.py --threads 1 --out docs/figures/aggregation.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fedpeft.aggregation import ClientUpdate, FedAvg, LoraProduct
from fedpeft.aggregation._lora import LoraPair, lora_pairs, refactor_rank_r
from fedpeft.aggregation._math import weighted_mean
from fedpeft.models import apply_delta

SHAPES = "2048x16,2048x64,4096x16,4096x64"  # d x LoRA pairs


# --- the dense formulas as fedpeft had them before rank space (commit 2018780) ------------


def dense_client_factors(
    global_state: Mapping[str, Tensor], delta: Mapping[str, Tensor], pair: LoraPair
) -> tuple[Tensor, Tensor]:
    """A client's local (B, A) in float64."""
    a = global_state[pair.a].double() + (delta[pair.a].double() if pair.a in delta else 0)
    b = global_state[pair.b].double() + (delta[pair.b].double() if pair.b in delta else 0)
    return b, a


def dense_mean_product(
    global_state: Mapping[str, Tensor],
    deltas: Sequence[Mapping[str, Tensor]],
    weights: Sequence[float],
    pair: LoraPair,
) -> Tensor:
    """``sum_i w_i B_i A_i / sum_i w_i`` (out x in), every product formed."""
    total = float(sum(weights))
    product = torch.zeros(global_state[pair.b].shape[0], global_state[pair.a].shape[1], dtype=torch.float64)
    for delta, weight in zip(deltas, weights, strict=True):
        b, a = dense_client_factors(global_state, delta, pair)
        product += (weight / total) * (b @ a)
    return product


def dense_factor_averaging_error(
    global_state: Mapping[str, Tensor], deltas: Sequence[Mapping[str, Tensor]], weights: Sequence[float]
) -> float:
    """``||mean(B_i A_i) - mean(B_i) mean(A_i)||_F`` over all layers, dense."""
    total = float(sum(weights))
    squared = 0.0
    for pair in lora_pairs(list(global_state)):
        mean_b = sum(
            (w / total) * dense_client_factors(global_state, d, pair)[0]
            for d, w in zip(deltas, weights, strict=True)
        )
        mean_a = sum(
            (w / total) * dense_client_factors(global_state, d, pair)[1]
            for d, w in zip(deltas, weights, strict=True)
        )
        gap = dense_mean_product(global_state, deltas, weights, pair) - mean_b @ mean_a  # type: ignore[operator]
        squared += float((gap**2).sum())
    return squared**0.5


def dense_lora_products(
    global_state: Mapping[str, Tensor], deltas: Sequence[Mapping[str, Tensor]], weights: Sequence[float]
) -> tuple[dict[str, Tensor], float]:
    """lora_product's refactored pairs, dense: the mean product and its d x d SVD per pair."""
    refactored: dict[str, Tensor] = {}
    dropped_squared = 0.0
    for pair in lora_pairs(list(global_state)):
        product = dense_mean_product(global_state, deltas, weights, pair)
        b, a, dropped = refactor_rank_r(product, rank=global_state[pair.a].shape[0])
        refactored[pair.b], refactored[pair.a] = b, a
        dropped_squared += dropped**2
    return refactored, dropped_squared**0.5


# --- the workload -----------------------------------------------------------------------


def lora_state(d: int, rank: int, pairs: int, scale: float, g: torch.Generator) -> dict[str, Tensor]:
    """``pairs`` LoRA pairs on d x d projections, float32, as peft names them."""
    state = {}
    for i in range(pairs):
        state[f"layers.{i}.proj.lora_A.default.weight"] = scale * torch.randn(rank, d, generator=g)
        state[f"layers.{i}.proj.lora_B.default.weight"] = scale * torch.randn(d, rank, generator=g)
    return state


def subset(state: Mapping[str, Tensor], pairs: int) -> dict[str, Tensor]:
    """The first ``pairs`` LoRA pairs of ``state``."""
    keep = {name for pair in lora_pairs(list(state))[:pairs] for name in (pair.a, pair.b)}
    return {name: tensor for name, tensor in state.items() if name in keep}


def seconds(call: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """The fastest of ``repeats`` calls, and the last result."""
    best, result = float("inf"), None
    for _ in range(repeats):
        started = time.perf_counter()
        result = call()
        best = min(best, time.perf_counter() - started)
    return best, result


def workload(d: int, pairs: int, args: argparse.Namespace) -> tuple[dict[str, Tensor], list[ClientUpdate]]:
    """A global adapter and ``--clients`` updates about 1 % of its size, seeded by shape."""
    g = torch.Generator().manual_seed(d + pairs)
    base = lora_state(d, args.rank, pairs, 1 / d**0.5, g)
    updates = [
        ClientUpdate(i, lora_state(d, args.rank, pairs, 1e-2 / d**0.5, g), 10 + 5 * i)
        for i in range(args.clients)
    ]
    return base, updates


def measure_dense(d: int, args: argparse.Namespace) -> dict[str, float]:
    """Dense seconds per LoRA pair at width d, and how far rank space is from dense there.

    Timed on an adapter of ``--dense-pairs`` pairs: the dense cost is the same for
    every pair of a width, so it scales to any pair count.
    """
    base, updates = workload(d, args.dense_pairs, args)
    deltas = [u.delta for u in updates]
    weights = [float(u.num_examples) for u in updates]
    error_s, dense_error = seconds(lambda: dense_factor_averaging_error(base, deltas, weights), 1)
    product_s, (dense_factors, dense_dropped) = seconds(lambda: dense_lora_products(base, deltas, weights), 1)
    rank_error = FedAvg().aggregate(base, updates).metrics["lora_factor_averaging_error"]
    rank_product = LoraProduct().aggregate(base, updates)
    product_gap = max(
        float(
            torch.linalg.matrix_norm(
                rank_product.state[p.b].double() @ rank_product.state[p.a].double()
                - dense_factors[p.b] @ dense_factors[p.a]
            )
            / torch.linalg.matrix_norm(dense_factors[p.b] @ dense_factors[p.a])
        )
        for p in lora_pairs(list(base))
    )
    return {
        "dense_error_seconds_per_pair": error_s / args.dense_pairs,
        "dense_lora_product_seconds_per_pair": product_s / args.dense_pairs,
        "error_relative_difference": abs(rank_error - dense_error) / dense_error,
        "dropped_relative_difference": abs(rank_product.metrics["svd_dropped_norm"] - dense_dropped)
        / dense_dropped,
        "product_relative_difference": product_gap,
    }


def measure(d: int, pairs: int, dense: Mapping[str, float], args: argparse.Namespace) -> dict[str, Any]:
    """One adapter shape: mean and rank-space paths timed, dense from its per-pair seconds."""
    base, updates = workload(d, pairs, args)
    deltas = [u.delta for u in updates]
    weights = [float(u.num_examples) for u in updates]
    mean_s, _ = seconds(lambda: apply_delta(base, weighted_mean(deltas, weights)), args.repeats)
    fedavg_s, fedavg = seconds(lambda: FedAvg().aggregate(base, updates), args.repeats)
    product_s, product = seconds(lambda: LoraProduct().aggregate(base, updates), args.repeats)
    fedavg_dense_s = mean_s + dense["dense_error_seconds_per_pair"] * pairs
    product_dense_s = mean_s + dense["dense_lora_product_seconds_per_pair"] * pairs
    return {
        "d": d,
        "lora_pairs": pairs,
        "rank": args.rank,
        "clients": args.clients,
        "adapter_parameters": sum(t.numel() for t in base.values()),
        "mean_seconds": mean_s,
        "fedavg_rank_space_seconds": fedavg_s,
        "fedavg_dense_seconds": fedavg_dense_s,
        "fedavg_dense_over_rank_space": fedavg_dense_s / fedavg_s,
        "fedavg_rank_space_over_mean": fedavg_s / mean_s,
        "lora_product_rank_space_seconds": product_s,
        "lora_product_dense_seconds": product_dense_s,
        "lora_product_dense_over_rank_space": product_dense_s / product_s,
        "dense_pairs_timed": args.dense_pairs,
        "lora_factor_averaging_error": fedavg.metrics["lora_factor_averaging_error"],
        "svd_dropped_norm": product.metrics["svd_dropped_norm"],
        **dense,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shapes", default=SHAPES, help="comma-separated d x LoRA pairs")
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--dense-pairs", type=int, default=1, help="pairs the dense paths are timed on")
    parser.add_argument("--repeats", type=int, default=2, help="rank-space and mean timings: best of")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/aggregation.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    shapes = [tuple(int(n) for n in shape.split("x")) for shape in args.shapes.split(",")]
    dense = {d: measure_dense(d, args) for d in sorted({d for d, _ in shapes})}
    print(f"dense paths timed ({time.perf_counter() - started:.0f} s)", flush=True)
    rows = []
    for d, pairs in shapes:
        rows.append(measure(d, pairs, dense[d], args))
        print(f"measured d = {d}, {pairs} pairs ({time.perf_counter() - started:.0f} s)", flush=True)
    print(
        f"{args.clients} clients, LoRA r = {args.rank}, torch threads {torch.get_num_threads()}; "
        f"seconds per aggregation (dense scaled from {args.dense_pairs} pairs)"
    )
    header = (
        f"{'d':>5} {'pairs':>5} {'params':>7} {'mean':>7} {'fedavg':>7} {'dense':>8} {'ratio':>7} "
        f"{'lora_product':>12} {'dense':>8} {'ratio':>7} {'diff f64':>9} {'BA diff':>8}"
    )
    print(header)
    for r in rows:
        float64_difference = max(r["error_relative_difference"], r["dropped_relative_difference"])
        print(
            f"{r['d']:>5} {r['lora_pairs']:>5} {r['adapter_parameters'] / 1e6:>6.2f}M {r['mean_seconds']:>7.3f} "
            f"{r['fedavg_rank_space_seconds']:>7.3f} {r['fedavg_dense_seconds']:>8.1f} "
            f"{r['fedavg_dense_over_rank_space']:>6.0f}x {r['lora_product_rank_space_seconds']:>12.3f} "
            f"{r['lora_product_dense_seconds']:>8.1f} {r['lora_product_dense_over_rank_space']:>6.0f}x "
            f"{float64_difference:>9.1e} {r['product_relative_difference']:>8.1e}"
        )
    print(
        "diff f64: relative difference of the diagnostic and of svd_dropped_norm, rank space against dense; "
        "BA diff: of lora_product's B A (stored in float32)"
    )
    result = {
        "command": "python benchmarks/aggregation.py "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg()[0],
        "wall_seconds": time.perf_counter() - started,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2), encoding="utf-8")
    print(f"wrote {args.out} in {result['wall_seconds']:.0f} s")


if __name__ == "__main__":
    main()
