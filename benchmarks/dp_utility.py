"""What privacy costs in accuracy: federated runs at several epsilons, several seeds.

Three scenarios, each a set of rows run through the real CLI (``fedpeft simulate``) once
per seed:

``cross-silo`` (``configs/dp-cross-silo.toml``: 5 silos, 20,000 SST-2 sentences from
``../shared/data/sst2``, example-level DP-SGD per silo over the whole run):

* ``example-eps-8``, ``-3``, ``-1``: each silo's noise calibrated to that epsilon at
  delta 1e-5 over its planned participation (every round);
* ``no-dp``: the same federation (data, rounds, adapter) without DP, with the local
  training a non-private run would pick (AdamW on small batches, FedAvg, the same
  number of examples per round);
* ``centralised``: LoRA on the pooled 20,000 sentences, one client, the same examples
  per round: the strong baseline the federation is compared against.

``cross-device`` (``configs/dp-cross-device.toml``: the SST-2 train split of
``../shared/data/sst2`` among 1,000 users, an expected cohort of 100 Poisson-sampled a
round, user-level DP-FedAvg with adaptive clipping): ``user-eps-8`` (epsilon 8 at
delta 1e-4), ``no-dp`` (no clipping, no noise, a fixed cohort of 100), and
``user-eps-8-5000-users`` / ``-10000-users`` (the same cohort from more users, delta
0.1 / users): accuracy against the number of users at a fixed epsilon.

``embedded`` (the data shipped with fedpeft): ``configs/dp-example.toml`` (2 silos),
``configs/dp-client.toml`` (400 clients, user-level DP), the latter's federation
without DP (``dp-client-no-noise``: no clipping, no noise) and the embedded default
``configs/default.toml`` (10 clients, no DP).

Prints a table (mean ± std over the seeds of the final accuracy, the epsilon the
ledger reports), writes JSON whose ``rows`` carry ``scenario``, ``unit``,
``target_epsilon`` (null without DP), ``epsilon`` (the ledger's, the largest over the
seeds), ``seeds``, ``accuracy_mean`` and ``accuracy_std``, and a plot of accuracy
against epsilon. A finished run (its folder holds a complete run of the same config)
is reused, so an interrupted benchmark resumes where it stopped.

    python benchmarks/dp_utility.py --scenario cross-silo --seeds 0,1,2 \\
        --out runs/bench/dp_utility --json docs/figures/dp_utility.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomllib

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from _paths import repo_relative
from _simulate import ROOT, finished, simulate

from fedpeft.config import apply_overrides, parse_config

NO_DP = ["privacy.example.enabled=false"]
NON_PRIVATE_TRAIN = [
    "adapter.lora_alpha=64",
    "train.optimizer=adamw",
    "train.lr=1e-3",
    "train.batch_size=50",
    "train.steps=10",
    "train.group_by_length=true",
    "federation.aggregator=fedavg",
    "federation.aggregator_options={}",
]
"""The cross-silo federation without DP, with the local training a non-private run
picks: AdamW on small batches (grouped by length: a third of the tokens to pad and
compute), plain FedAvg; 500 examples a round per silo, the expected Poisson batch the
private silos take each round."""
CENTRALISED = [
    *NON_PRIVATE_TRAIN,
    "partition.scheme=iid",
    "partition.num_clients=1",
    "federation.min_train_clients=1",
    "federation.min_available_clients=1",
    "train.steps=50",
]
"""All 20,000 sentences on one client, 2,500 examples a round: what the 5 silos see."""


@dataclass(frozen=True)
class Row:
    name: str
    unit: str
    """``example``, ``client`` or ``none``."""
    target_epsilon: float | None
    workload: str
    overrides: tuple[str, ...] = ()


SCENARIOS: dict[str, list[Row]] = {
    "cross-silo": [
        Row("centralised", "none", None, "configs/dp-cross-silo.toml", (*NO_DP, *CENTRALISED)),
        Row("no-dp", "none", None, "configs/dp-cross-silo.toml", (*NO_DP, *NON_PRIVATE_TRAIN)),
        *(
            Row(
                f"example-eps-{eps:g}",
                "example",
                eps,
                "configs/dp-cross-silo.toml",
                (f"privacy.example.target_epsilon={eps}",),
            )
            for eps in (8.0, 3.0, 1.0)
        ),
    ],
    "cross-device": [
        Row("no-dp", "none", None, "configs/dp-cross-device.toml", ("privacy.client.enabled=false",)),
        Row("user-eps-8", "client", 8.0, "configs/dp-cross-device.toml"),
        *(
            # The same expected cohort (100) and delta = 0.1 / users, from more users.
            Row(
                f"user-eps-8-{users}-users",
                "client",
                8.0,
                "configs/dp-cross-device.toml",
                (
                    f"partition.num_clients={users}",
                    f"federation.fraction_train={100 / users:g}",
                    f"privacy.client.delta={0.1 / users:g}",
                ),
            )
            for users in (5_000, 10_000)
        ),
    ],
    "embedded": [
        Row("no-dp", "none", None, "configs/default.toml"),
        Row("dp-example", "example", 8.0, "configs/dp-example.toml"),
        Row("dp-client", "client", 8.0, "configs/dp-client.toml"),
        Row("dp-client-no-noise", "none", None, "configs/dp-client.toml", ("privacy.client.enabled=false",)),
    ],
}


def run_row(scenario: str, row: Row, seed: int, out: Path, extra: list[str]) -> dict[str, Any]:
    """One row at one seed: reuse a finished run of the same config, else simulate it."""
    workload = tomllib.loads((ROOT / row.workload).read_text(encoding="utf-8"))
    config = apply_overrides(workload, [*row.overrides, f"seed={seed}", *extra])
    name = f"{scenario}/{row.name}/seed-{seed}"
    parse_config(config, name)
    folder = out / scenario / row.name / f"seed-{seed}"
    run = finished(folder, config)
    print(f"{name}: {'reusing finished run' if run else 'running'}", flush=True)
    run = run or simulate(name, config, folder)
    last = run["metrics"]["rounds"][-1]
    epsilon = last["privacy"].get(f"epsilon_{row.unit}") if row.unit != "none" else None
    delta = last["privacy"].get(f"delta_{row.unit}") if row.unit != "none" else None
    return {
        "accuracy": last["accuracy"],
        "epsilon": epsilon,
        "delta": delta,
        "wall_seconds": run["wall_seconds"],
    }


def summarise(scenario: str, row: Row, runs: dict[int, dict[str, Any]]) -> dict[str, Any]:
    accuracies = [r["accuracy"] for r in runs.values()]
    epsilons = [r["epsilon"] for r in runs.values() if r["epsilon"] is not None]
    return {
        "scenario": scenario,
        "row": row.name,
        "unit": row.unit,
        "target_epsilon": row.target_epsilon,
        "epsilon": max(epsilons) if epsilons else None,
        "delta": max((r["delta"] for r in runs.values() if r.get("delta") is not None), default=None),
        "seeds": sorted(runs),
        "accuracy_mean": statistics.fmean(accuracies),
        "accuracy_std": statistics.stdev(accuracies) if len(accuracies) > 1 else None,
        "accuracy_per_seed": [runs[s]["accuracy"] for s in sorted(runs)],
        "workload": row.workload,
        "overrides": list(row.overrides),
        "wall_seconds_mean": statistics.fmean(r["wall_seconds"] for r in runs.values()),
        "wall_seconds_per_seed": [runs[s]["wall_seconds"] for s in sorted(runs)],
    }


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for index, scenario in enumerate(sorted({r["scenario"] for r in rows})):
        mine = [r for r in rows if r["scenario"] == scenario]
        private = sorted((r for r in mine if r["unit"] == "example"), key=lambda r: r["epsilon"])
        if private:
            ax.errorbar(
                [r["epsilon"] for r in private],
                [r["accuracy_mean"] for r in private],
                yerr=[r["accuracy_std"] or 0.0 for r in private],
                marker="o",
                capsize=3,
                color=f"C{index}",
                label=f"{scenario}: example-level DP-SGD",
            )
        for r in mine:
            if r["unit"] == "client":
                ax.errorbar(
                    [r["epsilon"]],
                    [r["accuracy_mean"]],
                    yerr=[r["accuracy_std"] or 0.0],
                    fmt="s",
                    capsize=3,
                    color=f"C{index}",
                    label=f"{scenario}: {r['row']} (user-level DP-FedAvg)",
                    zorder=3,
                )
            if r["unit"] == "none":
                style = ":" if r["row"] == "centralised" else "--"
                ax.axhline(
                    r["accuracy_mean"],
                    color=f"C{index}",
                    linestyle=style,
                    alpha=0.7,
                    label=f"{scenario}: {r['row']} (no DP)",
                )
    # The targets' range, whatever was run: a few rows at epsilon ~8 alone would get a
    # log axis a hundredth of a decade wide, labelled in scientific notation.
    ax.set_xscale("log")
    ax.set_xlim(0.7, 12)
    ax.set_xticks([1, 2, 3, 5, 8])
    ax.set_xticklabels(["1", "2", "3", "5", "8"])
    ax.minorticks_off()
    ax.set_xlabel("epsilon (each row's delta in dp_utility.json), from the run's privacy ledger")
    ax.set_ylabel("SST-2 test accuracy (mean ± std over seeds)")
    ax.set_title("Federated LoRA on MiniLM-L6: accuracy against privacy")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def merge_rows(kept: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``kept`` with each row that ``new`` has (same scenario and row) merged in, then the rest of ``new``."""
    fresh = {(r["scenario"], r["row"]): r for r in new}
    merged = [
        merge_seeds(r, fresh.pop((r["scenario"], r["row"]))) if (r["scenario"], r["row"]) in fresh else r
        for r in kept
    ]
    return merged + list(fresh.values())


def merge_seeds(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """One row over the seeds of both, ``new``'s run winning a seed both have.

    Only a row of the same runs (workload and overrides) gains seeds this way: the seeds
    of a row whose recipe changed are dropped with it, so seeds of two recipes never
    share a mean. The workload file's contents are not compared: change a row's recipe
    in the file and rerun every seed.
    """
    if (old["workload"], old["overrides"]) != (new["workload"], new["overrides"]):
        return new
    old_walls = old.get("wall_seconds_per_seed") or [old["wall_seconds_mean"]] * len(old["seeds"])
    accuracy = dict(zip(old["seeds"], old["accuracy_per_seed"], strict=True))
    wall = dict(zip(old["seeds"], old_walls, strict=True))
    accuracy.update(zip(new["seeds"], new["accuracy_per_seed"], strict=True))
    wall.update(zip(new["seeds"], new["wall_seconds_per_seed"], strict=True))
    seeds = sorted(accuracy)
    accuracies = [accuracy[s] for s in seeds]
    epsilons = [e for e in (old["epsilon"], new["epsilon"]) if e is not None]
    return {
        **new,
        "epsilon": max(epsilons) if epsilons else None,
        "seeds": seeds,
        "accuracy_mean": statistics.fmean(accuracies),
        "accuracy_std": statistics.stdev(accuracies) if len(accuracies) > 1 else None,
        "accuracy_per_seed": accuracies,
        "wall_seconds_mean": statistics.fmean(wall[s] for s in seeds),
        "wall_seconds_per_seed": [wall[s] for s in seeds],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--scenario",
        action="append",
        choices=sorted(SCENARIOS),
        help="scenario to run (repeatable; default: cross-silo)",
    )
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    parser.add_argument(
        "--only",
        default="",
        help="comma-separated rows to run, by name or scenario/name (default: all)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override every row's config (a sketch: say so beside its numbers)",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "runs/bench/dp_utility")
    parser.add_argument(
        "--json",
        type=Path,
        default=None,
        help="results file (default: OUT/dp_utility.json); the plot goes beside it",
    )
    parser.add_argument(
        "--merge",
        action="store_true",
        help="keep the rows of an existing results file that this run does not redo, and "
        "the other seeds of a row it does (so a row's seeds can be run one invocation each)",
    )
    args = parser.parse_args()

    seeds = [int(s) for s in args.seeds.split(",") if s]
    wanted = {n for n in args.only.split(",") if n}
    results = []
    for scenario in args.scenario or ["cross-silo"]:
        for row in SCENARIOS[scenario]:
            if wanted and not {row.name, f"{scenario}/{row.name}"} & wanted:
                continue
            runs = {seed: run_row(scenario, row, seed, args.out, args.set) for seed in seeds}
            results.append(summarise(scenario, row, runs))

    print(f"{'scenario':<11} {'row':<22} {'unit':<8} {'target eps':>10} {'ledger eps':>10} {'accuracy':>16}")
    for r in results:
        std = f" ± {r['accuracy_std']:.4f}" if r["accuracy_std"] is not None else " (1 seed)"
        target = "-" if r["target_epsilon"] is None else f"{r['target_epsilon']:g}"
        spent = "-" if r["epsilon"] is None else f"{r['epsilon']:.3g}"
        print(
            f"{r['scenario']:<11} {r['row']:<22} {r['unit']:<8} {target:>10} {spent:>10} "
            f"{r['accuracy_mean']:.4f}{std}"
        )
    path = args.json or args.out / "dp_utility.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    if args.merge and path.is_file():
        results = merge_rows(json.loads(path.read_text(encoding="utf-8"))["rows"], results)
    report = {"overrides": args.set, "rows": results}
    path.write_text(json.dumps(report, indent=2), encoding="utf-8")
    plot(results, path.with_name("accuracy_vs_epsilon.png"))
    print(f"wrote {repo_relative(path)} and {repo_relative(path.with_name('accuracy_vs_epsilon.png'))}")


if __name__ == "__main__":
    main()
