"""Every update path on one workload: accuracy against the bytes clients send.

Runs the real simulation (``fedpeft simulate``, one fresh process per path) of a base
workload (default ``configs/agnews.toml``: AG News, 20 clients, Dirichlet 0.3) once per
update path. A path is what its shipped config (``configs/<path>.toml``) sets beyond the
workload: the codec and aggregator with their options, ``adapter.freeze_lora_a`` and
the ``[slora]`` section. Model, data, rounds and local steps are the workload's for
every path. Prints a table, writes JSON and a plot of accuracy against cumulative
uplink bytes. A path whose run folder holds a complete run of the same config is
reused, so a rerun after changing one path's config only runs that path.

    python benchmarks/update_paths.py --out runs/bench/update_paths
    python benchmarks/update_paths.py --paths default,projection --set federation.rounds=2
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import tomllib

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


def summarise(name: str, run: dict[str, Any]) -> dict[str, Any]:
    rounds = run["metrics"]["rounds"]
    client_rounds = sum(r["clients"] for r in rounds)
    total_up = sum(r["bytes_up"] for r in rounds)
    cumulative, curve = 0, [(0, run["metrics"]["initial"]["accuracy"])]
    for r in rounds:
        cumulative += r["bytes_up"]
        curve.append((cumulative, r["accuracy"]))
    return {
        "path": name,
        "label": PATHS.get(name, name),
        "final_accuracy": rounds[-1]["accuracy"],
        "best_accuracy": max(r["accuracy"] for r in rounds),
        # Non-IID rounds swing by several points (a round's sampled clients may hold one
        # topic each); the mean of the last rounds is the steadier figure.
        "last3_mean_accuracy": sum(r["accuracy"] for r in rounds[-3:]) / len(rounds[-3:]),
        "uplink_bytes_per_client_round": total_up / client_rounds,
        "uplink_bytes_total": total_up,
        "wall_seconds": run["wall_seconds"],
        "curve": curve,
    }


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for row in rows:
        trained = row["curve"][1:]  # the untrained point sits at 0 bytes, off a log axis
        xs = [b / 2**20 for b, _ in trained]
        ax.plot(xs, [a for _, a in trained], marker="o", markersize=3, label=row["label"])
    ax.axhline(rows[0]["curve"][0][1], color="gray", linestyle=":", label="before training")
    ax.set_xscale("log")
    ax.set_xlabel("cumulative uplink bytes, all clients (MiB, log scale)")
    ax.set_ylabel("test accuracy")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workload", type=Path, default=ROOT / "configs/agnews.toml")
    parser.add_argument("--paths", default=",".join(PATHS), help="comma-separated config names")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override the workload"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "runs/bench/update_paths")
    args = parser.parse_args()

    workload = apply_overrides(tomllib.loads(args.workload.read_text(encoding="utf-8")), args.set)
    names = [n.strip() for n in args.paths.split(",") if n.strip()]
    configs = {}
    for name in names:  # validate every path before spending any time
        path_config = tomllib.loads((ROOT / "configs" / f"{name}.toml").read_text(encoding="utf-8"))
        configs[name] = merge(workload, path_sections(path_config))
        parse_config(configs[name], f"{name} on {args.workload.name}")
    args.out.mkdir(parents=True, exist_ok=True)

    rows = []
    for name in names:
        run = finished(args.out / name, configs[name])
        print(
            f"path {name}: {PATHS.get(name, name)}{' (reusing its finished run)' if run else ''}", flush=True
        )
        rows.append(summarise(name, run or simulate(name, configs[name], args.out / name)))
    dense = next((r for r in rows if r["path"] == "default"), rows[0])
    for row in rows:
        row["bytes_ratio_vs_dense"] = (
            dense["uplink_bytes_per_client_round"] / row["uplink_bytes_per_client_round"]
        )
        row["accuracy_gap_vs_dense"] = row["final_accuracy"] - dense["final_accuracy"]
        row["last3_gap_vs_dense"] = row["last3_mean_accuracy"] - dense["last3_mean_accuracy"]

    header = f"{'path':<28} {'final acc':>9} {'last-3 acc':>10} {'best acc':>8} {'up/client-round':>15} {'total up':>10} {'x fewer':>8} {'wall s':>7}"
    print(header)
    for r in rows:
        print(
            f"{r['label']:<28} {r['final_accuracy']:>9.4f} {r['last3_mean_accuracy']:>10.4f} {r['best_accuracy']:>8.4f} "
            f"{r['uplink_bytes_per_client_round'] / 1024:>12.1f}Ki {r['uplink_bytes_total'] / 2**20:>8.2f}Mi "
            f"{r['bytes_ratio_vs_dense']:>8.1f} {r['wall_seconds']:>7.0f}"
        )
    report = {"workload": repo_relative(args.workload), "overrides": args.set, "config": workload, "paths": rows}
    (args.out / "update_paths.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    plot(rows, args.out / "accuracy_vs_bytes.png", f"{args.workload.stem}: accuracy vs uplink bytes")
    print(f"wrote {args.out / 'update_paths.json'} and {args.out / 'accuracy_vs_bytes.png'}")


if __name__ == "__main__":
    main()
