"""What secure aggregation costs: the same federation with and without SecAgg+.

For each client count (``--clients``, default 10, 50 and 100) runs one small
federation twice through the real CLI (``fedpeft simulate``, a fresh process per run,
all in this one invocation, plain and secure back to back): once with plain FedAvg
and once with ``federation.secure_aggregation`` (Flower's SecAgg+, masked vectors as
uint32). No DP, so the two runs differ only by the protocol and its quantisation:
the final adapters are compared coordinate by coordinate against the protocol's grid
step. At ``--dp-clients`` (default 10) a third run adds client-side user-level DP (each
client clips, rounds onto the grid and adds its Skellam noise share): what the noise
costs in time and bytes; its accuracy is noise. ``--shares K`` (odd) adds, where K is
below the cohort, a run with K shares per secret (SecAgg+'s sparse graph: each client
masks with K - 1 neighbours) beside the default, where every client shares with all.

The workload is the embedded default (MiniLM, SST-2) cut down so the whole benchmark
fits in about 25 minutes on 2 otherwise idle CPU cores (31 with ``--shares 15``): an
IID split of ``--examples-per-client`` sentences per client, ``--steps`` local steps,
``--rounds`` rounds, the server's evaluation on ``--test-examples`` sentences. With so little training the accuracy says
little about the model; it is there to show that the two runs agree.

Bytes are the message contents the server counts (metrics.json; all four SecAgg+
stages for a secure round). Round time is the server's wall time per round, its
evaluation included, averaged over rounds 2..R: round 1 also starts the simulation's
client actors and loads the model in each, which is reported apart. Prints a markdown
table with the secure/plain ratios, writes JSON. A run whose folder holds a complete
run of the same config is reused, so an interrupted benchmark resumes.

    python benchmarks/secagg.py --shares 15 --out runs/bench/secagg --json docs/figures/secagg.json
    python benchmarks/secagg.py --clients 4 --rounds 2   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from pathlib import Path
from typing import Any

import tomllib

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _paths import repo_relative
from _simulate import ROOT, finished, simulate
from safetensors.torch import load_file

from fedpeft.config import apply_overrides, parse_config

ADAPTER_FILE = "adapter/adapter_model.safetensors"
SECURE = "federation.secure_aggregation.enabled=true"


def dp_overrides(clients: int) -> list[str]:
    """Client-side user-level DP (distributed Skellam noise) for ``clients`` clients.

    Noise multiplier 1, clipping norm 2; delta 1 / (10 x clients)
    rounded down to a power of ten (1e-2 at 10 clients): a cost row, not a privacy
    recommendation.
    """
    delta = 10.0 ** math.floor(math.log10(0.1 / clients))
    return [
        "privacy.client.enabled=true",
        "privacy.client.clipping_norm=2.0",
        "privacy.client.noise_multiplier=1.0",
        f"privacy.client.delta={delta:g}",
    ]


def workload_overrides(clients: int, args: argparse.Namespace) -> list[str]:
    """The small federation of ``clients`` clients every row of that count runs."""
    return [
        "partition.scheme=iid",
        f"partition.num_clients={clients}",
        f"data.max_train_examples={clients * args.examples_per_client}",
        f"data.max_test_examples={args.test_examples}",
        f"train.steps={args.steps}",
        f"train.batch_size={args.batch_size}",
        f"federation.rounds={args.rounds}",
        "federation.fraction_train=1.0",
        "federation.codec=dense",
        'federation.codec_options.dtype="float32"',
        "federation.aggregator=fedavg",
    ]


def summarise(metrics: dict[str, Any]) -> dict[str, Any]:
    """One run's row: bytes per round and per client, round time, final accuracy.

    Bytes are means over all rounds (every round moves the same messages); round time
    is the mean over rounds 2..R (round 1 alone when there is one), as round 1 also
    starts the client actors.
    """
    rounds = metrics["rounds"]
    client_rounds = sum(r["clients"] for r in rounds) or 1
    steady = rounds[1:] or rounds
    last = rounds[-1]
    return {
        "rounds": len(rounds),
        "clients_per_round": statistics.mean(r["clients"] for r in rounds),
        "bytes_up": statistics.mean(r["bytes_up"] for r in rounds),
        "bytes_down": statistics.mean(r["bytes_down"] for r in rounds),
        "bytes_up_per_client": sum(r["bytes_up"] for r in rounds) / client_rounds,
        "bytes_down_per_client": sum(r["bytes_down"] for r in rounds) / client_rounds,
        "seconds_per_round": statistics.mean(r["seconds"] for r in steady),
        "round_seconds": [r["seconds"] for r in rounds],
        # The clients' own training time, summed: the same work in every run of a client
        # count, so a run that shared the CPUs with other jobs shows here.
        "client_train_seconds": [sum(c["train_seconds"] for c in r["per_client"]) for r in rounds],
        "first_round_seconds": rounds[0]["seconds"],
        "accuracy": last["accuracy"],
        "loss": last["loss"],
        "initial_accuracy": metrics["initial"]["accuracy"],
        "epsilon_client": last.get("privacy", {}).get("epsilon_client"),
        "dp_noise_std": last.get("aggregation", {}).get("dp_noise_std"),
    }


def ratios(plain: dict[str, Any], secure: dict[str, Any]) -> dict[str, float]:
    """Secure over plain for bytes and round time; accuracy and loss differences (secure - plain)."""
    return {
        "bytes_up_ratio": secure["bytes_up"] / plain["bytes_up"],
        "bytes_down_ratio": secure["bytes_down"] / plain["bytes_down"],
        "seconds_ratio": secure["seconds_per_round"] / plain["seconds_per_round"],
        "accuracy_gap": secure["accuracy"] - plain["accuracy"],
        "loss_gap": secure["loss"] - plain["loss"],
    }


def grid_step(clients: int, config: dict[str, Any]) -> float:
    """The protocol's quantisation step in payload units, ``2 R / 2**bits``, for ``config``."""
    resolved = parse_config(config)
    secure = resolved.federation.secure_aggregation
    levels = 2 ** secure.bits_for(clients)
    return 2 * secure.range_for(resolved.privacy.client) / levels


def adapter_difference(plain_folder: Path, secure_folder: Path) -> float:
    """The largest absolute difference between the two runs' final adapters."""
    plain, secure = load_file(plain_folder / ADAPTER_FILE), load_file(secure_folder / ADAPTER_FILE)
    if plain.keys() != secure.keys():
        raise SystemExit(f"the adapters of {plain_folder} and {secure_folder} hold different tensors")
    return max(float((plain[k].double() - secure[k].double()).abs().max()) for k in plain)


def fmt_bytes(n: float) -> str:
    """``n`` bytes in KiB or MiB."""
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 1024:.1f} KiB"


def markdown(rows: list[dict[str, Any]]) -> str:
    """The rows as a markdown table, ratios on the secure rows."""
    lines = [
        "| clients | run | up per round | up per client | down per round | down per client "
        "| s per round (2..R) | round 1 s | accuracy | up x | down x | time x |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ratio = r.get("ratios")
        tail = (
            f"{ratio['bytes_up_ratio']:.2f} | {ratio['bytes_down_ratio']:.2f} | {ratio['seconds_ratio']:.2f}"
            if ratio
            else "| |"
        )
        lines.append(
            f"| {r['clients']} | {r['run']} | {fmt_bytes(r['bytes_up'])} | {fmt_bytes(r['bytes_up_per_client'])} "
            f"| {fmt_bytes(r['bytes_down'])} | {fmt_bytes(r['bytes_down_per_client'])} "
            f"| {r['seconds_per_round']:.1f} | {r['first_round_seconds']:.1f} | {r['accuracy']:.4f} | {tail} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workload", type=Path, default=ROOT / "configs/default.toml")
    parser.add_argument("--clients", default="10,50,100", help="comma-separated client counts")
    parser.add_argument("--examples-per-client", type=int, default=16)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--test-examples", type=int, default=256)
    parser.add_argument(
        "--shares",
        type=int,
        default=0,
        help="also run SecAgg+ with this many shares per secret (odd) where it is below the cohort (0: none)",
    )
    parser.add_argument(
        "--dp-clients",
        type=int,
        default=10,
        help="client count that also runs secure with client-side DP (0: none)",
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override the workload"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "runs/bench/secagg")
    parser.add_argument("--json", type=Path, default=None, help="default: <out>/secagg.json")
    args = parser.parse_args()
    if args.shares and (args.shares < 3 or args.shares % 2 == 0):
        # Flower 1.41 tells the clients an even count, then builds neighbourhoods of one
        # more: every client then fails the share-keys stage with an IndexError.
        parser.error(f"--shares must be odd and >= 3 (or 0), got {args.shares}")

    workload = apply_overrides(tomllib.loads(args.workload.read_text(encoding="utf-8")), args.set)
    counts = [int(c) for c in args.clients.split(",") if c.strip()]
    plan: list[tuple[int, str, dict[str, Any]]] = []
    for clients in counts:  # validate every run before spending any time
        base = apply_overrides(workload, workload_overrides(clients, args))
        plan.append((clients, "plain", base))
        plan.append((clients, "secure", apply_overrides(base, [SECURE])))
        if 0 < args.shares < clients - 1:
            sparse = [SECURE, f"federation.secure_aggregation.num_shares={args.shares}"]
            plan.append((clients, f"secure-{args.shares}-shares", apply_overrides(base, sparse)))
        if clients == args.dp_clients:
            plan.append((clients, "secure+dp", apply_overrides(base, [SECURE, *dp_overrides(clients)])))
    for clients, run, config in plan:
        parse_config(config, f"{run}, {clients} clients")

    rows: list[dict[str, Any]] = []
    for clients, run, config in plan:
        folder = args.out / f"{clients}-{run}"
        result = finished(folder, config)
        print(f"{clients} clients, {run}: {'reusing its finished run' if result else 'running'}", flush=True)
        result = result or simulate(f"{clients} {run}", config, folder)
        row = {"clients": clients, "run": run, "secure": run != "plain", "dp": run.endswith("dp")}
        row |= summarise(result["metrics"]) | {"wall_seconds": result["wall_seconds"]}
        if run != "plain":
            plain = next(r for r in rows if r["clients"] == clients and r["run"] == "plain")
            row["ratios"] = ratios(plain, row)
            row["grid_step"] = grid_step(clients, config)
            row["max_adapter_difference"] = adapter_difference(args.out / f"{clients}-plain", folder)
        rows.append(row)

    table = markdown(rows)
    print()
    print(table)
    print()
    for r in rows:
        if "grid_step" in r:
            print(
                f"{r['clients']} clients, {r['run']}: final adapters differ by at most "
                f"{r['max_adapter_difference']:.3g} (grid step {r['grid_step']:.3g})"
            )
    report = {
        "workload": repo_relative(args.workload),
        "overrides": args.set,
        "settings": {
            "examples_per_client": args.examples_per_client,
            "steps": args.steps,
            "batch_size": args.batch_size,
            "rounds": args.rounds,
            "test_examples": args.test_examples,
            "clients": counts,
            "shares": args.shares,
            "dp_clients": args.dp_clients,
            "partition": "iid",
            "codec": "dense float32",
            "aggregator": "fedavg",
            "secure_aggregation": "SecAgg+ defaults: num_shares 1.0 (every client), reconstruction_threshold 0.5, "
            "R = 1 without DP, 2**bits levels with bits = min(24, 31 - ceil(log2 clients))",
        },
        "notes": {
            "bytes": "message contents the server counts, mean per round (all clients) and per client-round; "
            "secure rounds count all four SecAgg+ stages",
            "seconds_per_round": "server wall time per round, its evaluation included, mean over rounds 2..R; "
            "round 1 (first_round_seconds) also starts the client actors and loads the model in each",
            "accuracy": "final test accuracy on test_examples sentences after a few local steps: shows that "
            "secure and plain runs agree, not what the model can reach; loss_gap and max_adapter_difference "
            "are the sharper comparison",
            "max_adapter_difference": "largest absolute difference between the plain and secure runs' final "
            "adapters; grid_step is the protocol's quantisation step 2R/2**bits. Flower rounds "
            "stochastically (unseeded NumPy), so each round's mean lands within about a grid step of the "
            "plain one; the local training of later rounds starts from that and can widen the gap",
            "ratios": "secure over plain at the same client count; accuracy_gap and loss_gap are secure - plain",
            "growth": "with num_shares 1.0 every client shares keys and masks with every other, so the key "
            "stages and the server's unmasking grow with the square of the cohort; --shares K bounds them",
            "runs_wall_seconds": "sum of the runs' wall times, each a fresh process (a reused run counts "
            "the time it took when it ran)",
        },
        "num_cpus_per_client": workload.get("simulation", {}).get("num_cpus_per_client", 1),
        "cpu_count": os.cpu_count(),
        "runs_wall_seconds": sum(r["wall_seconds"] for r in rows),
        "rows": rows,
        "table": table,
    }
    out = args.json or args.out / "secagg.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2), encoding="utf-8")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
