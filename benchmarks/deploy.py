"""Deployment vs simulation: per-round wall time and bytes on the wire, same config.

Runs the config twice, side by side in one invocation:

1. on Flower's simulation engine (``fedpeft simulate``), where the bytes are the
   protobuf-encoded message contents the strategy counts (metrics.json);
2. as a real deployment on this machine: a SuperLink with TLS and node
   authentication and one SuperNode process per client, started by the repository's
   server/ and clients/ scripts, the run submitted with ``fedpeft deploy``. Every
   SuperNode dials the SuperLink through a counting TCP relay, so the bytes are what
   crossed the wire: TLS records of the Fleet API's requests and responses, polling,
   heartbeats and the app bundle download included.

Prints a per-round table and the overhead ratios, writes JSON.

    python benchmarks/deploy.py --out runs/bench/deploy
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _simulate import simulate
from _wire import CountingRelay

from fedpeft.checkpoint import load_checkpoint
from fedpeft.config import load_config
from fedpeft.flower.local_federation import LocalFederation

DEFAULT_OVERRIDES = [
    "partition.num_clients=3",
    # Rounds 2..5 are the steady state the ratio is taken over (round 1 downloads the
    # app bundle): four rounds, not two, so one slow round moves it less.
    "federation.rounds=5",
    "federation.min_train_clients=3",
    "federation.min_available_clients=3",
    "train.steps=10",
]


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def run_deployment(
    config_file: Path,
    folder: Path,
    clients: int,
    idle_seconds: float,
    warm: bool,
    threads: int,
    busy_poll: float | None = None,
) -> dict:
    """One deployment run through the counting relay; wire bytes per round.

    Each SuperNode trains on ``threads`` CPU threads, the simulation's
    ``num_cpus_per_client``, so that both share this machine's cores alike.
    """
    federation = LocalFederation(folder / "federation")
    relay = None
    try:
        federation.start_superlink()
        relay = CountingRelay(federation.port)
        for i in range(clients):
            extra = ("--threads", str(threads), *(("--warm-worker",) if warm else ()))
            if busy_poll is not None:
                extra += ("--busy-poll", str(busy_poll))
            federation.start_node(f"node{i}", i, superlink_address=f"127.0.0.1:{relay.port}", extra=extra)
        # Idle traffic (activation, heartbeats, polling) before any run, for reference.
        time.sleep(5.0)
        idle_start = relay.counter.snapshot()
        time.sleep(idle_seconds)
        idle_end = relay.counter.snapshot()
        idle = {
            "seconds": idle_seconds,
            "bytes_up": idle_end[0] - idle_start[0],
            "bytes_down": idle_end[1] - idle_start[1],
        }
        run = folder / "deploy-run"
        started = time.monotonic()
        marks = [relay.counter.snapshot()]
        process = federation.deploy("--config", str(config_file), "--out", str(run))
        rounds = load_config(config_file).federation.rounds
        while process.poll() is None:
            checkpoint = load_checkpoint(run) if (run / "checkpoint.pt").exists() else None
            done = checkpoint.completed_round if checkpoint is not None else 0
            while len(marks) <= min(done, rounds):
                marks.append(relay.counter.snapshot())
                print(f"  [deploy] round {len(marks) - 1}/{rounds} done", flush=True)
            time.sleep(0.2)
        wall = time.monotonic() - started
        if process.returncode != 0 or not (run / "adapter").is_dir():
            raise SystemExit(f"the deployment failed; see {federation.folder / 'logs'}")
        while len(marks) <= rounds:
            marks.append(relay.counter.snapshot())
        wire = [{"bytes_up": b[0] - a[0], "bytes_down": b[1] - a[1]} for a, b in itertools.pairwise(marks)]
        metrics = json.loads((run / "metrics.json").read_text())
        return {
            "metrics": metrics,
            "wall_seconds": wall,
            "wire": wire,
            "idle": idle,
            "connections": relay.counter.connections,
        }
    finally:
        if relay is not None:
            relay.close()
        federation.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", type=Path, default=Path("configs/default.toml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/deploy"))
    parser.add_argument("--idle-seconds", type=float, default=30.0)
    parser.add_argument(
        "--warm-worker",
        action="store_true",
        help="each SuperNode runs its ClientApp tasks in a warm worker (clients/start_supernode.sh --warm-worker)",
    )
    parser.add_argument(
        "--busy-poll",
        type=float,
        default=None,
        metavar="SECONDS",
        help="the SuperNodes' poll interval while a run is busy (clients/start_supernode.sh --busy-poll; "
        "default: the script's, 0.1; 0 keeps Flower's fixed 3 s)",
    )
    args = parser.parse_args()

    config = load_config(args.config, [*DEFAULT_OVERRIDES, *args.overrides])
    args.out.mkdir(parents=True, exist_ok=True)
    config_file = args.out / "config.toml"
    config_file.write_text(config.to_toml(), encoding="utf-8")
    clients = config.partition.num_clients

    print(f"simulation: {clients} virtual clients, {config.federation.rounds} rounds", flush=True)
    sim = simulate("simulation", config.to_dict(), args.out / "simulation")
    print(f"deployment: SuperLink + {clients} SuperNodes over TLS, same config", flush=True)
    threads = max(1, round(config.simulation.num_cpus_per_client))
    dep = run_deployment(
        config_file, args.out, clients, args.idle_seconds, args.warm_worker, threads, args.busy_poll
    )

    rows = []
    for s, d, w in zip(sim["metrics"]["rounds"], dep["metrics"]["rounds"], dep["wire"], strict=True):
        rows.append(
            {
                "round": s["round"],
                "sim_seconds": s["seconds"],
                "deploy_seconds": d["seconds"],
                "payload_up": d["bytes_up"],
                "payload_down": d["bytes_down"],
                "wire_up": w["bytes_up"],
                "wire_down": w["bytes_down"],
                "sim_accuracy": s["accuracy"],
                "deploy_accuracy": d["accuracy"],
            }
        )
    print(
        f"\n{'round':>5} {'sim s':>7} {'deploy s':>8} {'payload up':>11} {'wire up':>10} "
        f"{'payload down':>12} {'wire down':>10} {'acc sim':>8} {'acc dep':>8}"
    )
    for r in rows:
        print(
            f"{r['round']:>5} {r['sim_seconds']:>7.1f} {r['deploy_seconds']:>8.1f} "
            f"{fmt_bytes(r['payload_up']):>11} {fmt_bytes(r['wire_up']):>10} "
            f"{fmt_bytes(r['payload_down']):>12} {fmt_bytes(r['wire_down']):>10} "
            f"{r['sim_accuracy']:>8.4f} {r['deploy_accuracy']:>8.4f}"
        )
    # Round 1 also carries the app bundle (FAB) download and run set-up: report the
    # steady state (rounds 2..R) beside the total.
    steady = rows[1:] or rows
    summary = {
        # Issue 20's name: deployed over simulated round time, rounds 2..R.
        "deploy_round_ratio": sum(r["deploy_seconds"] for r in steady)
        / sum(r["sim_seconds"] for r in steady),
        "wire_over_payload_up": sum(r["wire_up"] for r in steady) / sum(r["payload_up"] for r in steady),
        "wire_over_payload_down": sum(r["wire_down"] for r in steady)
        / sum(r["payload_down"] for r in steady),
        "wire_over_payload_up_all_rounds": sum(r["wire_up"] for r in rows)
        / sum(r["payload_up"] for r in rows),
        "wire_over_payload_down_all_rounds": sum(r["wire_down"] for r in rows)
        / sum(r["payload_down"] for r in rows),
        "sim_wall_seconds": sim["wall_seconds"],
        "deploy_wall_seconds": dep["wall_seconds"],
        "idle_bytes_per_node_per_minute": (dep["idle"]["bytes_up"] + dep["idle"]["bytes_down"])
        / clients
        / (dep["idle"]["seconds"] / 60),
    }
    print(
        f"\nrounds 2..{len(rows)}: deployment round time {summary['deploy_round_ratio']:.2f}x simulation; "
        f"wire/payload up {summary['wire_over_payload_up']:.3f}x, down {summary['wire_over_payload_down']:.3f}x"
    )
    print(
        f"all rounds (round 1 includes the app download): wire/payload up "
        f"{summary['wire_over_payload_up_all_rounds']:.3f}x, down {summary['wire_over_payload_down_all_rounds']:.3f}x"
    )
    print(
        f"whole run: simulation {summary['sim_wall_seconds']:.0f} s, deployment {summary['deploy_wall_seconds']:.0f} s; "
        f"idle link {fmt_bytes(summary['idle_bytes_per_node_per_minute'])} per node per minute"
    )
    report = {
        "config": config.to_dict(),
        "config_fingerprint": config.fingerprint(),
        "clients": clients,
        "warm_worker": args.warm_worker,
        "busy_poll": args.busy_poll,
        "node_threads": threads,
        "rows": rows,
        "summary": summary,
        "idle": dep["idle"],
        "relay_connections": dep["connections"],
    }
    (args.out / "deploy.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    print(f"wrote {args.out / 'deploy.json'}")


if __name__ == "__main__":
    main()
