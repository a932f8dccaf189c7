"""The simulation half of ``benchmarks/scale.py``: thousands of virtual clients, a cohort a round.

Each row runs ``fedpeft simulate`` in a fresh process on the SST-2 train split of
``../shared/data/sst2`` (60,614 sentences in the copy there) among 1,000 or 10,000 clients, with a cohort
of 50-200 clients a round, and splits every round's federated part
(``train_phase_seconds``: sending the round's messages to the aggregated adapter) into
client compute (the sum of the clients' ``train_seconds``) and framework overhead:

    overhead_ratio = train_phase_seconds x parallel workers / summed client compute

1.0 means the workers did nothing but train; the rest is Flower's dispatch, Ray, the
messages' (de)serialisation, the server's decoding and aggregation, client state on
disk, and workers idle at the end of a round. Round 1 is left out (each worker process
loads the model and the data then). The peak resident memory of the run's whole process
tree is sampled every second: with client state on disk it grows with the cohort, not
with the number of clients that exist.
"""

from __future__ import annotations

import copy
import json
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import psutil
from _simulate import ROOT, finished, simulate

SST2 = ROOT.parent / "shared" / "data" / "sst2"

BASE: dict[str, Any] = {
    "seed": 0,
    "model": {"name_or_path": "builtin:all-MiniLM-L6-v2", "task": "sequence-classification"},
    "adapter": {
        "method": "lora",
        "r": 8,
        "lora_alpha": 16,
        "lora_dropout": 0.0,
        "target_modules": ["query", "value"],
    },
    "data": {"text_column": "sentence", "label_column": "label", "max_length": 64},
    # A cross-device client: a couple of small local steps on its few sentences.
    "train": {"steps": 2, "batch_size": 16, "lr": 3e-3, "device": "auto"},
    "federation": {"rounds": 3, "codec": "dense", "aggregator": "fedavg"},
    "simulation": {"num_cpus_per_client": 1},
}

ROWS = [
    # (clients, scheme, Dirichlet alpha, cohort). At 10,000 clients (6 sentences each)
    # alpha 1 leaves some client without a sentence in every draw; alpha 3 does not.
    (1_000, "iid", None, 50),
    (1_000, "iid", None, 100),
    (1_000, "iid", None, 200),
    (1_000, "dirichlet", 1.0, 100),
    (10_000, "iid", None, 100),
    (10_000, "dirichlet", 3.0, 100),
]


def row_config(clients: int, scheme: str, alpha: float | None, cohort: int, rounds: int) -> dict[str, Any]:
    config = copy.deepcopy(BASE)
    config["data"].update({"train": str(SST2 / "train.tsv"), "test": str(SST2 / "test.tsv")})
    partition: dict[str, Any] = {"scheme": scheme, "num_clients": clients}
    if alpha is not None:
        partition.update({"alpha": alpha, "min_partition_size": 1})
    config["partition"] = partition
    config["federation"].update(
        {"rounds": rounds, "fraction_train": cohort / clients, "min_train_clients": cohort}
    )
    return config


class TreeMemory:
    """Peak summed RSS of this process's descendants, sampled on a thread."""

    def __init__(self, interval: float = 1.0) -> None:
        self.interval = interval
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        me = psutil.Process()
        while not self._stop.wait(self.interval):
            total = 0
            for child in me.children(recursive=True):
                try:
                    total += child.memory_info().rss
                except psutil.Error:  # ended between listing and reading
                    continue
            self.peak_bytes = max(self.peak_bytes, total)


def measure(
    clients: int, scheme: str, alpha: float | None, cohort: int, rounds: int, workers: int, out: Path
) -> dict[str, Any]:
    """One row; a finished run of the same config in its folder is read back, not rerun."""
    name = f"{scheme}-{clients}-cohort-{cohort}"
    config, folder = row_config(clients, scheme, alpha, cohort, rounds), out / name
    saved = folder / "bench-row.json"
    if saved.is_file() and finished(folder, config):
        print(f"  [{name}] reusing the finished run in {folder}", flush=True)
        return json.loads(saved.read_text(encoding="utf-8"))
    started = time.monotonic()
    with TreeMemory() as memory:
        run = simulate(name, config, folder)
    measured = run["metrics"]["rounds"][1:]
    per_round = []
    for record in measured:
        compute = sum(c["train_seconds"] for c in record["per_client"])
        phase = record["train_phase_seconds"]
        per_round.append(
            {
                "round": record["round"],
                "clients": record["clients"],
                "train_phase_seconds": phase,
                "client_compute_seconds": compute,
                "overhead_ratio": phase * workers / compute,
                "round_seconds": record["seconds"],
            }
        )
    ratios = [r["overhead_ratio"] for r in per_round]
    row = {
        "clients": clients,
        "scheme": scheme,
        "alpha": alpha,
        "cohort": cohort,
        "workers": workers,
        "rounds_measured": len(per_round),
        "train_phase_seconds": statistics.fmean(r["train_phase_seconds"] for r in per_round),
        "client_compute_seconds": statistics.fmean(r["client_compute_seconds"] for r in per_round),
        "client_seconds_median": statistics.median(
            c["train_seconds"] for record in measured for c in record["per_client"]
        ),
        "overhead_ratio": statistics.fmean(ratios),
        "overhead_ratio_rounds": ratios,
        "peak_tree_rss_mib": memory.peak_bytes / 2**20,
        "accuracy": run["metrics"]["rounds"][-1]["accuracy"],
        "wall_seconds": time.monotonic() - started,
        "per_round": per_round,
    }
    saved.write_text(json.dumps(row, indent=2), encoding="utf-8")
    return row


def run_all(
    rows: list[tuple[int, str, float | None, int]], rounds: int, workers: int, out: Path
) -> dict[str, Any]:
    if not (SST2 / "train.tsv").is_file():
        raise SystemExit(f"the simulation rows read {SST2 / 'train.tsv'}; it is not there")
    results = []
    for clients, scheme, alpha, cohort in rows:
        print(f"simulating {clients} clients ({scheme}), cohort {cohort}, {rounds} rounds", flush=True)
        results.append(measure(clients, scheme, alpha, cohort, rounds, workers, out))
    print(
        f"{'clients':>7} {'scheme':>9} {'cohort':>6} {'phase s':>8} {'compute s':>9} "
        f"{'client s':>8} {'overhead':>8} {'peak RSS MiB':>12}"
    )
    for r in results:
        print(
            f"{r['clients']:>7} {r['scheme']:>9} {r['cohort']:>6} {r['train_phase_seconds']:>8.1f} "
            f"{r['client_compute_seconds']:>9.1f} {r['client_seconds_median']:>8.2f} "
            f"{r['overhead_ratio']:>8.2f} {r['peak_tree_rss_mib']:>12.0f}"
        )
    summary: dict[str, Any] = {}
    cohort_100 = [r for r in results if r["cohort"] == 100]
    if cohort_100:
        summary["overhead_ratio_cohort_100"] = max(r["overhead_ratio"] for r in cohort_100)
        by_clients = {r["clients"]: r["peak_tree_rss_mib"] for r in cohort_100 if r["scheme"] == "iid"}
        if 1_000 in by_clients and 10_000 in by_clients:
            summary["peak_rss_10000_over_1000_clients"] = by_clients[10_000] / by_clients[1_000]
    return {"simulation_rows": results, "simulation_summary": summary}
