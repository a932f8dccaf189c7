"""What privacy costs in accuracy: the federated run at several epsilons.

Runs the embedded default federation (``configs/default.toml``: SST-2, 10 clients,
5 rounds of LoRA FedAvg) through the real CLI with:

* example-level DP-SGD (Opacus) calibrated per client to epsilon 1, 3 and 8 at
  delta 1e-5 over its planned participation (every round),
* one user-level DP row (DP-FedAvg on the server) with noise calibrated to client
  epsilon 8 over the 5 rounds (every client sampled each round),
* no DP (epsilon = infinity).

Prints a table (final accuracy, the epsilon the ledger reports, the noise multiplier),
writes JSON and a plot of accuracy against epsilon. A finished row (its run folder
holds a complete run of the same config) is reused, so an interrupted run resumes.

    python benchmarks/dp_utility.py --out runs/bench/dp_utility
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path
from typing import Any

import tomllib

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from _paths import repo_relative
from _simulate import ROOT, finished, simulate

from fedpeft.config import apply_overrides, parse_config
from fedpeft.privacy import calibrate_noise

DELTA = 1e-5
CLIENT_CLIPPING_NORM = 2.0


def rows(workload: dict[str, Any]) -> list[tuple[str, str, float, list[str]]]:
    """(name, unit, target epsilon, overrides) per row."""
    config = parse_config(workload)
    client_sigma = calibrate_noise(
        8.0, DELTA, config.federation.fraction_train, config.federation.rounds, "rdp"
    )
    example = ["privacy.example.enabled=true", f"privacy.example.delta={DELTA}"]
    return [
        ("example-eps-8", "example", 8.0, [*example, "privacy.example.target_epsilon=8.0"]),
        ("example-eps-3", "example", 3.0, [*example, "privacy.example.target_epsilon=3.0"]),
        ("example-eps-1", "example", 1.0, [*example, "privacy.example.target_epsilon=1.0"]),
        (
            "client-eps-8",
            "client",
            8.0,
            [
                "privacy.client.enabled=true",
                f"privacy.client.delta={DELTA}",
                f"privacy.client.clipping_norm={CLIENT_CLIPPING_NORM}",
                f"privacy.client.noise_multiplier={client_sigma:.6f}",
            ],
        ),
        ("no-dp", "none", math.inf, []),
    ]


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    example = sorted((r for r in results if r["unit"] == "example"), key=lambda r: r["epsilon"])
    ax.plot(
        [r["epsilon"] for r in example],
        [r["accuracy"] for r in example],
        marker="o",
        label="example-level DP-SGD",
    )
    for r in results:
        if r["unit"] == "client":
            ax.scatter(
                [r["epsilon"]],
                [r["accuracy"]],
                marker="s",
                color="C3",
                label="user-level DP-FedAvg",
                zorder=3,
            )
        if r["unit"] == "none":
            ax.axhline(r["accuracy"], color="gray", linestyle="--", label="no DP")
    ax.set_xscale("log")
    ax.set_xlabel("epsilon (delta = 1e-5), from the run's privacy ledger")
    ax.set_ylabel("SST-2 test accuracy")
    ax.set_title("Federated LoRA, 10 clients: accuracy vs privacy")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workload", type=Path, default=ROOT / "configs/default.toml")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override the workload"
    )
    parser.add_argument("--only", default="", help="comma-separated row names to run (default: all)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs/bench/dp_utility")
    args = parser.parse_args()

    workload = apply_overrides(tomllib.loads(args.workload.read_text(encoding="utf-8")), args.set)
    wanted = {n for n in args.only.split(",") if n}
    results = []
    for name, unit, target, overrides in rows(workload):
        if wanted and name not in wanted:
            continue
        config = apply_overrides(workload, overrides)
        parse_config(config, name)
        folder = args.out / name
        run = finished(folder, config)
        print(f"row {name}: {'reusing finished run' if run else 'running'}", flush=True)
        run = run or simulate(name, config, folder)
        last = run["metrics"]["rounds"][-1]
        spent = last["privacy"].get(f"epsilon_{unit}", math.inf) if unit != "none" else math.inf
        sigmas = [
            c["dp_noise_multiplier"] for c in last["per_client"] if c.get("dp_noise_multiplier") is not None
        ]
        results.append(
            {
                "row": name,
                "unit": unit,
                "target_epsilon": target,
                "epsilon": spent,
                "delta": DELTA,
                "accuracy": last["accuracy"],
                "noise_multiplier": (
                    f"{min(sigmas):.2f}..{max(sigmas):.2f}"
                    if sigmas
                    else next((o.split("=")[1] for o in overrides if "client.noise_multiplier" in o), "-")
                ),
                "wall_seconds": run["wall_seconds"],
            }
        )
    print(f"{'row':<16} {'unit':<8} {'target eps':>10} {'ledger eps':>10} {'sigma':>12} {'accuracy':>9}")
    for r in results:
        print(
            f"{r['row']:<16} {r['unit']:<8} {r['target_epsilon']:>10.3g} {r['epsilon']:>10.3g} "
            f"{r['noise_multiplier']:>12} {r['accuracy']:>9.4f}"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"workload": repo_relative(args.workload), "overrides": args.set, "rows": results}
    (args.out / "dp_utility.json").write_text(json.dumps(report, indent=2, default=str), encoding="utf-8")
    plot(results, args.out / "accuracy_vs_epsilon.png")
    print(f"wrote {args.out / 'dp_utility.json'} and {args.out / 'accuracy_vs_epsilon.png'}")


if __name__ == "__main__":
    main()
