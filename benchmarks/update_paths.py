"""Every update path on one workload, over several seeds: accuracy against uplink bytes.

Runs the real simulation (``fedpeft simulate``, one fresh process per path and seed) of
a base workload (default ``configs/agnews.toml``: AG News, 20 clients, Dirichlet 0.3)
once per update path and seed. A path is what its shipped config
(``configs/<path>.toml``) sets beyond the workload: the codec and aggregator with their
options, ``adapter.freeze_lora_a`` and the ``[slora]`` section. Model, data, rounds and
local steps are the workload's for every path; the seed sets the partition and the
sampled clients, the same for every path, so each path's gap to dense LoRA is taken
seed by seed (paired) and judged against the 2-point target with a one-sided 95 % t
bound: "within", "outside", or "unsettled" at this many seeds.

Prints a table (mean ± std over seeds), writes JSON (every seed's run beside the means)
and a plot of accuracy against cumulative uplink bytes. A run folder holding a complete
run of the same config is reused, and ``--merge`` adds this invocation's seeds to an
existing results file, so seeds can be gathered one invocation at a time:

    python benchmarks/update_paths.py --seeds 0,1,2 --out runs/bench/update_paths
    python benchmarks/update_paths.py --seeds 1 --merge --json docs/figures/update_paths.json
    python benchmarks/update_paths.py --paths default,projection --seeds 0 --set federation.rounds=2
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
from pathlib import Path
from typing import Any

import tomllib
from scipy.stats import t as student_t

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from _paths import repo_relative
from _simulate import ROOT, finished, simulate

from fedpeft.config import apply_overrides, parse_config

PATHS = {
    "default": "dense LoRA (FedAvg)",
    "random-mask": "random mask 10 %",
    "random-mask-rescaled": "random mask 10 %, rescaled",
    "topk": "top-k 5 % + error feedback",
    "projection": "projection K=16",
    "ffa-lora": "FFA-LoRA",
    "lora-product": "LoRA product + SVD",
    "slora": "SLoRA",
}
"""Config name (``configs/<name>.toml``) -> label in the table."""


def path_sections(path_config: dict[str, Any]) -> dict[str, Any]:
    """The update-path part of a config: codec, aggregator, FFA-LoRA, SLoRA."""
    federation = path_config.get("federation", {})
    overlay: dict[str, Any] = {
        "federation": {
            key: federation[key]
            for key in ("codec", "codec_options", "aggregator", "aggregator_options")
            if key in federation
        }
    }
    if "freeze_lora_a" in path_config.get("adapter", {}):
        overlay["adapter"] = {"freeze_lora_a": path_config["adapter"]["freeze_lora_a"]}
    if "slora" in path_config:
        overlay["slora"] = path_config["slora"]
    return overlay


def merge(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``overlay``'s sections merged key by key (options replaced whole)."""
    merged = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for section, values in overlay.items():
        merged.setdefault(section, {}).update(values)
    return merged


def run_seed(name: str, config: dict[str, Any], seed: int, out: Path) -> dict[str, Any]:
    """One path at one seed: reuse a finished run of the same config, else simulate it.

    Every path at a given seed shares the workload's partition and client sampling (both
    follow the run seed), so a path's gap to dense LoRA can be taken seed by seed.
    """
    config = {**config, "seed": seed}
    folder = out / name / f"seed-{seed}"
    run = finished(folder, config)
    print(
        f"path {name}, seed {seed}: {PATHS.get(name, name)}{' (reusing its finished run)' if run else ''}",
        flush=True,
    )
    if run is None:
        run = simulate(f"{name}/seed-{seed}", config, folder)
        (folder / "commit.txt").write_text(code_version(), encoding="utf-8")
    commit_file = folder / "commit.txt"
    commit = commit_file.read_text(encoding="utf-8") if commit_file.is_file() else "unknown"
    rounds = run["metrics"]["rounds"]
    client_rounds = sum(r["clients"] for r in rounds)
    cumulative, curve = 0, [(0, run["metrics"]["initial"]["accuracy"])]
    for r in rounds:
        cumulative += r["bytes_up"]
        curve.append((cumulative, r["accuracy"]))
    return {
        "seed": seed,
        "final_accuracy": rounds[-1]["accuracy"],
        "best_accuracy": max(r["accuracy"] for r in rounds),
        # Non-IID rounds swing by several points (a round's sampled clients may hold one
        # topic each); the mean of the last rounds is the steadier figure.
        "last3_mean_accuracy": statistics.fmean(r["accuracy"] for r in rounds[-3:]),
        "uplink_bytes_per_client_round": cumulative / client_rounds,
        "uplink_bytes_total": cumulative,
        "wall_seconds": run["wall_seconds"],
        "commit": commit,
        "curve": curve,
    }


def code_version() -> str:
    """The commit the runs were made at (``-dirty`` with uncommitted changes), so seeds
    gathered over several invocations show whether they share a code base."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "fedpeft", "configs"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{commit}-dirty" if dirty else commit


def mean_std(values: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def summarise(name: str, recipe: dict[str, Any], runs: list[dict[str, Any]]) -> dict[str, Any]:
    """A path over its seeds: means and standard deviations, and every seed's own run."""
    runs = sorted(runs, key=lambda r: r["seed"])
    final, final_std = mean_std([r["final_accuracy"] for r in runs])
    last3, last3_std = mean_std([r["last3_mean_accuracy"] for r in runs])
    # The seeds' curves share their rounds; bytes differ by a few per message at most.
    curve = [
        (statistics.fmean(p[0] for p in points), statistics.fmean(p[1] for p in points))
        for points in zip(*(r["curve"] for r in runs), strict=True)
    ]
    return {
        "path": name,
        "label": PATHS.get(name, name),
        "recipe": recipe,
        "seeds": [r["seed"] for r in runs],
        "accuracy_mean": final,
        "accuracy_std": final_std,
        "last3_mean_accuracy": last3,
        "last3_std": last3_std,
        "uplink_bytes_per_client_round": statistics.fmean(r["uplink_bytes_per_client_round"] for r in runs),
        "uplink_bytes_total": statistics.fmean(r["uplink_bytes_total"] for r in runs),
        "wall_seconds_mean": statistics.fmean(r["wall_seconds"] for r in runs),
        "curve": curve,
        "runs": runs,
    }


WITHIN = 0.02
"""The target: each path within 2 points of dense LoRA's accuracy."""


def paired_gap(row: dict[str, Any], dense: dict[str, Any], key: str) -> dict[str, Any]:
    """``row``'s accuracy minus dense LoRA's, seed by seed, and whether it is within 2 points.

    A seed fixes the partition and the sampled clients for every path, so the paired gap
    leaves out most of the round-to-round swing that both runs share. "within" and
    "outside" need the one-sided 95 % t bound of the mean gap to clear -0.02; a gap whose
    bounds straddle it is "unsettled" at this many seeds.
    """
    theirs = {r["seed"]: r[key] for r in dense["runs"]}
    gaps = [r[key] - theirs[r["seed"]] for r in row["runs"] if r["seed"] in theirs]
    if not gaps:
        return {"mean": None, "std": None, "seeds": 0, "verdict": "no common seed"}
    mean, std = mean_std(gaps)
    if std is None:
        verdict = "one seed"
    else:
        margin = float(student_t.ppf(0.95, len(gaps) - 1)) * std / math.sqrt(len(gaps))
        verdict = (
            "within" if mean - margin >= -WITHIN else "outside" if mean + margin < -WITHIN else "unsettled"
        )
    return {"mean": mean, "std": std, "seeds": len(gaps), "per_seed": gaps, "verdict": verdict}


def compare_to_dense(rows: list[dict[str, Any]]) -> None:
    dense = next((r for r in rows if r["path"] == "default"), rows[0])
    for row in rows:
        row["bytes_ratio_vs_dense"] = (
            dense["uplink_bytes_per_client_round"] / row["uplink_bytes_per_client_round"]
        )
        for key, accuracy in (
            ("accuracy_gap_vs_dense", "final_accuracy"),
            ("last3_gap_vs_dense", "last3_mean_accuracy"),
        ):
            row[key] = paired_gap(row, dense, accuracy)
            if row is dense:
                row[key]["verdict"] = "reference"


def merge_runs(kept: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``kept``'s paths with ``new``'s seeds added (``new`` winning a seed both ran), then
    ``new``'s other paths. A path whose recipe (workload and path sections) changed keeps
    only ``new``'s seeds, so two recipes never share a mean; a row from before seeds were
    recorded (no ``runs``) is dropped the same way."""
    fresh = {r["path"]: r for r in new}
    merged = []
    for old in kept:
        row = fresh.pop(old["path"], None)
        if row is None:
            merged.append(old)
        elif old.get("recipe") == row["recipe"] and "runs" in old:
            runs = {r["seed"]: r for r in old["runs"]} | {r["seed"]: r for r in row["runs"]}
            merged.append(summarise(row["path"], row["recipe"], list(runs.values())))
        else:
            merged.append(row)
    return merged + list(fresh.values())


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for row in rows:
        trained = row["curve"][1:]  # the untrained point sits at 0 bytes, off a log axis
        xs = [b / 2**20 for b, _ in trained]
        seeds = len(row["seeds"])
        ax.plot(
            xs,
            [a for _, a in trained],
            marker="o",
            markersize=3,
            label=f"{row['label']} ({seeds} seed{'s' if seeds > 1 else ''})",
        )
    ax.axhline(rows[0]["curve"][0][1], color="gray", linestyle=":", label="before training")
    ax.set_xscale("log")
    ax.set_xlabel("cumulative uplink bytes, all clients (MiB, log scale)")
    ax.set_ylabel("test accuracy (mean over seeds)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def pm(mean: float | None, std: float | None, scale: float = 1.0) -> str:
    if mean is None:
        return "-"
    return f"{mean * scale:.1f} ± {std * scale:.1f}" if std is not None else f"{mean * scale:.1f}"


def print_table(rows: list[dict[str, Any]]) -> None:
    print(
        f"{'path':<28} {'seeds':>5} {'final acc %':>12} {'gap pts':>12} {'verdict':>9} "
        f"{'last-3 acc %':>12} {'last-3 gap':>12} {'up/client-round':>15} {'x fewer':>8} {'wall s':>7}"
    )
    for r in rows:
        gap, gap3 = r["accuracy_gap_vs_dense"], r["last3_gap_vs_dense"]
        print(
            f"{r['label']:<28} {len(r['seeds']):>5} {pm(r['accuracy_mean'], r['accuracy_std'], 100):>12} "
            f"{pm(gap['mean'], gap['std'], 100):>12} {gap['verdict']:>9} "
            f"{pm(r['last3_mean_accuracy'], r['last3_std'], 100):>12} {pm(gap3['mean'], gap3['std'], 100):>12} "
            f"{r['uplink_bytes_per_client_round'] / 1024:>12.1f}Ki {r['bytes_ratio_vs_dense']:>8.1f} "
            f"{r['wall_seconds_mean']:>7.0f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workload", type=Path, default=ROOT / "configs/agnews.toml")
    parser.add_argument("--paths", default=",".join(PATHS), help="comma-separated config names")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override the workload"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "runs/bench/update_paths")
    parser.add_argument(
        "--json",
        type=Path,
        default=None,
        help="results file (default: OUT/update_paths.json); the plot goes beside it",
    )
    parser.add_argument(
        "--merge",
        action="store_true",
        help="keep the paths of an existing results file that this run does not redo, and "
        "the other seeds of a path it does (so seeds can be run one invocation each)",
    )
    args = parser.parse_args()

    workload = apply_overrides(tomllib.loads(args.workload.read_text(encoding="utf-8")), args.set)
    names = [n.strip() for n in args.paths.split(",") if n.strip()]
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    recipes = {}  # a path's config without its seed
    for name in names:  # validate every path before spending any time
        path_config = tomllib.loads((ROOT / "configs" / f"{name}.toml").read_text(encoding="utf-8"))
        recipes[name] = {k: v for k, v in merge(workload, path_sections(path_config)).items() if k != "seed"}
        parse_config(recipes[name], f"{name} on {args.workload.name}")
    args.out.mkdir(parents=True, exist_ok=True)

    # Seed by seed, so an interrupted run leaves whole seeds to reuse and compare.
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    for seed in seeds:
        for name in names:
            runs[name].append(run_seed(name, recipes[name], seed, args.out))
    rows = [summarise(name, recipes[name], runs[name]) for name in names]

    path = args.json or args.out / "update_paths.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    if args.merge and path.is_file():
        rows = merge_runs(json.loads(path.read_text(encoding="utf-8"))["paths"], rows)
    compare_to_dense(rows)
    print_table(rows)
    report = {
        "workload": repo_relative(args.workload),
        "overrides": args.set,
        "config": workload,
        "paths": rows,
    }
    path.write_text(json.dumps(report, indent=2), encoding="utf-8")
    figure = path.with_name("accuracy_vs_bytes.png")
    plot(rows, figure, f"{args.workload.stem}: accuracy vs uplink bytes")
    print(f"wrote {repo_relative(path)} and {repo_relative(figure)}")


if __name__ == "__main__":
    main()
