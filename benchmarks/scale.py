"""Cross-device scale: one aggregation at cohort scale (streaming against batch), and
thousands of simulated clients (``_scale_simulation.py``; ``--part simulation``).

An LLM-shaped adapter (LoRA r = 8 on ``--pairs`` square d x d projections, d = 4096:
16 pairs = 1 M parameters, 4 MiB of float32) and FedAvg with every default
diagnostic (``lora_factor_averaging_error``). Each measurement runs in a fresh
subprocess; the peak is Linux's VmHWM, reset (``/proc/self/clear_refs``) once the
global adapter and a pool of 4 random updates exist, so "extra" is what aggregation
adds, the new global adapter included (measured with glibc mapping every block over
64 KiB on its own, so that no freed page hides an allocation; the seconds come from a
second run with the default allocator). Every arriving update is a fresh tensor allocation (scaled from the pool), as a
decoded reply is; its creation is not timed.

- ``stream``: ``FedAvg().accumulator`` folds each update in and drops it
  (``--clients`` updates, 1,000 by default); the sketched factor-averaging error.
- ``batch``: the path before streaming, every decoded update kept and then the mean
  and the exact error in rank space (``weighted_mean`` + ``factor_averaging_error``),
  at ``--batch-clients`` (1,000 x 4 MiB would hold 4 GiB of updates on a 2-core box).

Prints a table, writes JSON; ``--part`` runs one half and keeps the other's results.
The summary also carries issue 20's keys measured by other scripts, read from their
JSON: the user-level DP showcase (``benchmarks/dp_utility.py --scenario cross-device``)
and ``deploy_round_ratio`` (``benchmarks/deploy.py --warm-worker``).

    python benchmarks/scale.py --out docs/figures/scale.json
    python benchmarks/scale.py --part simulation --out docs/figures/scale.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _paths import repo_relative
from _scale_simulation import BASE, ROWS, run_all

from fedpeft.aggregation import ClientUpdate, FedAvg
from fedpeft.aggregation._lora import factor_averaging_error
from fedpeft.aggregation._math import weighted_mean
from fedpeft.models import apply_delta


def adapter(d: int, pairs: int, rank: int, seed: int) -> dict[str, torch.Tensor]:
    """LoRA factors of ``pairs`` d x d projections, as peft names them."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for p in range(pairs):
        state[f"layers.{p}.proj.lora_A.default.weight"] = 0.01 * torch.randn(rank, d, generator=g)
        state[f"layers.{p}.proj.lora_B.default.weight"] = 0.01 * torch.randn(d, rank, generator=g)
    return state


def high_water_kib() -> int:
    """VmHWM of this process in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status")


def current_kib() -> int:
    """VmRSS of this process in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def measure(path: str, clients: int, args: argparse.Namespace) -> dict[str, Any]:
    """One measurement, in this (fresh) process."""
    torch.set_num_threads(args.threads)
    base = adapter(args.d, args.pairs, args.rank, 0)
    pool = [{k: v * 0.1 for k, v in adapter(args.d, args.pairs, args.rank, 1 + i).items()} for i in range(4)]
    adapter_bytes = sum(t.numel() * t.element_size() for t in base.values())

    def arrival(i: int) -> ClientUpdate:
        scale = 1.0 + 0.001 * i
        return ClientUpdate(i, {k: v * scale for k, v in pool[i % 4].items()}, 1 + i % 7)

    # Warm up: torch's first calls of each kernel allocate buffers that are no aggregation's.
    warm = FedAvg().accumulator(base, clients)
    warm.add(arrival(0))
    warm.finish()
    factor_averaging_error(base, [arrival(0).delta, arrival(1).delta], [1.0, 2.0])
    del warm
    Path("/proc/self/clear_refs").write_text("5")
    before = current_kib()
    seconds = 0.0
    if path == "stream":
        accumulator = FedAvg().accumulator(base, clients)
        for i in range(clients):
            update = arrival(i)
            started = time.perf_counter()
            accumulator.add(update)
            seconds += time.perf_counter() - started
            del update
        started = time.perf_counter()
        result = accumulator.finish()
        seconds += time.perf_counter() - started
        error, relative_std = (
            result.metrics["lora_factor_averaging_error"],
            result.metrics["lora_factor_averaging_error_relative_std"],
        )
    else:
        updates = [arrival(i) for i in range(clients)]
        started = time.perf_counter()
        deltas = [u.delta for u in updates]
        weights = [float(u.num_examples) for u in updates]
        apply_delta(base, weighted_mean(deltas, weights))
        error, relative_std = factor_averaging_error(base, deltas, weights), 0.0
        seconds = time.perf_counter() - started
    peak_extra = (high_water_kib() - before) * 1024
    return {
        "path": path,
        "clients": clients,
        "adapter_parameters": sum(t.numel() for t in base.values()),
        "adapter_bytes": adapter_bytes,
        "peak_extra_bytes": peak_extra,
        "peak_over_adapter": peak_extra / adapter_bytes,
        "aggregate_seconds": seconds,
        "lora_factor_averaging_error": error,
        "lora_factor_averaging_error_relative_std": relative_std,
    }


def run(path: str, clients: int, args: argparse.Namespace) -> dict[str, Any]:
    """``measure`` in fresh subprocesses (so one path's peak cannot hide another's).

    Twice: the peak with every block over 64 KiB mapped on its own (glibc otherwise
    serves large blocks from its heap once the first is freed and keeps freed heap
    pages resident, so an accumulator could reuse the warm-up's pages unseen by the
    peak), the seconds with the allocator as a server runs it (a fresh mapping per
    block page-faults on every touch).
    """
    command = [sys.executable, __file__, "--measure", path, "--clients", str(clients)]
    command += ["--d", str(args.d), "--pairs", str(args.pairs), "--rank", str(args.rank)]
    command += ["--threads", str(args.threads)]

    def child(env: dict[str, str]) -> dict[str, Any]:
        out = subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout
        return json.loads(out.strip().splitlines()[-1])

    peak = child({**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
    timed = child(dict(os.environ))
    return {**peak, "aggregate_seconds": timed["aggregate_seconds"]}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--batch-clients", type=int, default=32)
    parser.add_argument("--d", type=int, default=4096)
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per measurement")
    parser.add_argument("--measure", choices=["stream", "batch"], help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=Path("runs/bench/scale.json"))
    parser.add_argument(
        "--part",
        choices=["aggregation", "simulation", "all"],
        default="all",
        help="run one half; the other half's rows and summary keys in --out are kept",
    )
    parser.add_argument(
        "--sim-rounds", type=int, default=3, help="rounds per simulation row (the first is not measured)"
    )
    parser.add_argument(
        "--sim-runs", type=Path, default=Path("runs/bench/scale-simulation"), help="run folders"
    )
    parser.add_argument(
        "--dp-utility",
        type=Path,
        default=Path("docs/figures/dp_utility.json"),
        help="results of benchmarks/dp_utility.py --scenario cross-device, summarised here",
    )
    parser.add_argument(
        "--deploy",
        type=Path,
        default=Path("docs/figures/deploy_warm_worker.json"),
        help="results of benchmarks/deploy.py --warm-worker, whose round ratio is summarised here",
    )
    parser.add_argument(
        "--gpu-clients",
        type=Path,
        default=Path("docs/figures/gpu_clients.json"),
        help="results of benchmarks/gpu_clients.py (on a GPU), whose clients per second are summarised here",
    )
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.clients, args)))
        return

    result = json.loads(args.out.read_text()) if args.out.is_file() and args.part != "all" else {}
    summary = dict(result.get("summary", {}))
    if args.part in ("aggregation", "all"):
        half = aggregation(args)
        summary.update(half.pop("summary"))
        result.update(half)
    if args.part in ("simulation", "all"):
        workers = max(1, int((os.cpu_count() or 1) // BASE["simulation"]["num_cpus_per_client"]))
        half = run_all(ROWS, args.sim_rounds, workers, args.sim_runs)
        summary.update(half.pop("simulation_summary"))
        result.update(half)
        result["simulation_command"] = (
            f"python benchmarks/scale.py --part simulation --sim-rounds {args.sim_rounds} "
            f"--sim-runs {repo_relative(args.sim_runs)} --out {repo_relative(args.out)}"
        )
    summary.update(showcase(args.dp_utility))
    summary.update(deployment(args.deploy))
    summary.update(gpu_clients(args.gpu_clients))
    result["summary"] = summary
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {repo_relative(args.out)}")


def showcase(path: Path) -> dict[str, Any]:
    """User-level DP at scale (the cross-device rows of ``benchmarks/dp_utility.py``)."""
    if not path.is_file():
        return {}
    rows = {r["row"]: r for r in json.loads(path.read_text())["rows"] if r["scenario"] == "cross-device"}
    if "user-eps-8" not in rows:
        return {}
    by_users = {"1000": rows["user-eps-8"]}
    by_users.update(
        {
            users: rows[f"user-eps-8-{users}-users"]
            for users in ("5000", "10000")
            if f"user-eps-8-{users}-users" in rows
        }
    )
    summary: dict[str, Any] = {
        "user_dp_eps8_accuracy": rows["user-eps-8"]["accuracy_mean"],
        "user_dp_eps8_accuracy_std": rows["user-eps-8"]["accuracy_std"],
        "user_dp_eps8_seeds": rows["user-eps-8"]["seeds"],
        "user_dp_eps8_accuracy_by_users": {u: r["accuracy_mean"] for u, r in by_users.items()},
        "user_dp_source": repo_relative(path),
    }
    if "no-dp" in rows:
        summary["user_dp_no_dp_accuracy"] = rows["no-dp"]["accuracy_mean"]
    return summary


def deployment(path: Path) -> dict[str, Any]:
    """The deployed round against the simulated one (``benchmarks/deploy.py``'s own run)."""
    if not path.is_file():
        return {}
    return {
        "deploy_round_ratio": json.loads(path.read_text())["summary"]["deploy_round_ratio"],
        "deploy_source": repo_relative(path),
    }


def gpu_clients(path: Path) -> dict[str, Any]:
    """Clients per second on one GPU shared by several clients (``benchmarks/gpu_clients.py``,
    run on a lent GPU machine)."""
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    return {
        "gpu_clients_per_second": data["summary"]["clients_per_second"],
        "gpu_device": data["device"].get("gpu"),
        "gpu_source": repo_relative(path),
    }


def aggregation(args: argparse.Namespace) -> dict[str, Any]:
    """Streaming against batch aggregation of an LLM-shaped adapter (the first half)."""
    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    rows = [
        run("stream", args.clients, args),
        run("stream", args.batch_clients, args),
        run("batch", args.batch_clients, args),
    ]
    print(f"LoRA r = {args.rank}, {args.pairs} pairs of {args.d} x {args.d}; FedAvg with its diagnostic")
    print(
        f"{'path':>7} {'clients':>7} {'peak extra / adapter':>21} {'seconds':>8} {'error':>10} {'rel std':>8}"
    )
    for r in rows:
        print(
            f"{r['path']:>7} {r['clients']:>7} {r['peak_over_adapter']:>21.2f} {r['aggregate_seconds']:>8.2f} "
            f"{r['lora_factor_averaging_error']:>10.3e} {r['lora_factor_averaging_error_relative_std']:>8.3f}"
        )
    stream, small, batch = rows
    return {
        "command": f"python benchmarks/scale.py --part aggregation --clients {args.clients} --batch-clients {args.batch_clients} "
        f"--d {args.d} --pairs {args.pairs} --rank {args.rank} --threads {args.threads} "
        f"--out {repo_relative(args.out)}",
        "cpu_count": os.cpu_count(),
        "torch_threads": args.threads,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg()[0],
        "under_load": load_before > 1.5,
        "wall_seconds": time.perf_counter() - started,
        "rows": rows,
        "summary": {
            "stream_peak_over_adapter": stream["peak_over_adapter"],
            f"aggregate_seconds_{args.clients}x1M": stream["aggregate_seconds"],
            f"batch_peak_over_adapter_{args.batch_clients}_clients": batch["peak_over_adapter"],
            f"stream_peak_over_adapter_{args.batch_clients}_clients": small["peak_over_adapter"],
            f"batch_over_stream_seconds_{args.batch_clients}_clients": batch["aggregate_seconds"]
            / small["aggregate_seconds"],
            "note": "peak extra counts the float32 running sums (1x the adapter; divided in place "
            "into the mean at the end), the update being folded in or the new global adapter (1x) "
            "and the sketch's hashes (8 bytes per factor row and column); the batch path is "
            "measured at a smaller cohort (it holds every update); timings under load when "
            "under_load is true",
        },
    }


if __name__ == "__main__":
    main()
