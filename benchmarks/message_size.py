"""What one client round costs on the wire, per codec, beside the full model.

Builds the real messages a client sends (the codec payload in Flower's records,
serialised by Flower's protobuf encoding) for the adapter of a config, and compares
them with what full-model FedAvg would send. Prints a table, writes JSON.

    python benchmarks/message_size.py --config configs/default.toml --out runs/bench/message_size.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch
from flwr.app import MetricRecord, RecordDict

from fedpeft.codecs import CODECS, CodecContext
from fedpeft.config import load_config
from fedpeft.experiment import Experiment
from fedpeft.flower.records import TRAIN_METRICS, UPDATE, content_nbytes, state_to_record
from fedpeft.models import base_model_nbytes

VARIANTS = [
    ("dense", {"dtype": "float32"}),
    ("dense", {"dtype": "float16"}),
    ("dense", {"dtype": "bfloat16"}),
    ("random_mask", {"density": 0.1}),
    ("random_mask", {"density": 0.1, "dtype": "float16"}),
    ("topk", {"density": 0.1}),
    ("topk", {"density": 0.01, "dtype": "float16"}),
    ("projection", {"directions": 32}),
    ("projection", {"directions": 16}),
    ("projection", {"directions": 8}),
]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", type=Path, default=Path("configs/default.toml"))
    parser.add_argument("--out", type=Path, default=Path("runs/bench/message_size.json"))
    args = parser.parse_args()

    config = load_config(args.config)
    experiment = Experiment(config)
    reference = experiment.initial_state
    generator = torch.Generator().manual_seed(0)
    delta = {name: 1e-3 * torch.randn(t.shape, generator=generator) for name, t in reference.items()}
    context = CodecContext(run_seed=0, server_round=1, client_id=0)
    full_model = {  # the pretrained weights, without the adapter peft injected
        name: p.detach()
        for name, p in experiment.model.model.get_base_model().named_parameters()
        if "lora_" not in name and "modules_to_save" not in name
    }
    full_bytes = content_nbytes(RecordDict({UPDATE: state_to_record(full_model)}))
    metrics = MetricRecord({"client-id": 0, "num-examples": 1, "train-loss": 0.0, "steps": 1})

    rows = []
    for name, options in VARIANTS:
        codec = CODECS.build(name, options, "benchmark")
        started = time.perf_counter()
        payload = codec.encode(delta, context, {})
        encode_ms = 1e3 * (time.perf_counter() - started)
        nbytes = content_nbytes(RecordDict({UPDATE: state_to_record(payload), TRAIN_METRICS: metrics}))
        started = time.perf_counter()
        decoded = codec.decode(payload, context, reference)
        decode_ms = 1e3 * (time.perf_counter() - started)
        error = max(float((decoded[k] - delta[k]).abs().max()) for k in delta)
        # relative L2 error of the decoded update (what compression costs, not rounding alone)
        relative = float(
            torch.sqrt(sum(((decoded[k] - delta[k]) ** 2).sum() for k in delta))
            / torch.sqrt(sum((delta[k] ** 2).sum() for k in delta))
        )
        rows.append(
            {
                "codec": name,
                "options": options,
                "uplink_bytes": nbytes,
                "ratio_vs_full_model": full_bytes / nbytes,
                "max_abs_error": error,
                "relative_l2_error": relative,
                "encode_ms": encode_ms,
                "decode_ms": decode_ms,
            }
        )

    print(
        f"model {config.model.name_or_path}: full-model message {full_bytes / 2**20:.1f} MiB, "
        f"raw parameters+buffers {base_model_nbytes(experiment.model.model) / 2**20:.1f} MiB"
    )
    print(
        f"{'codec':<12} {'options':<38} {'uplink':>10} {'x smaller':>10} {'rel L2 err':>10} {'enc ms':>7} {'dec ms':>7}"
    )
    for r in rows:
        print(
            f"{r['codec']:<12} {json.dumps(r['options']):<38} {r['uplink_bytes'] / 1024:>8.1f}Ki "
            f"{r['ratio_vs_full_model']:>10.1f} {r['relative_l2_error']:>10.1e} {r['encode_ms']:>7.2f} {r['decode_ms']:>7.2f}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"full_model_bytes": full_bytes, "rows": rows}, indent=2), encoding="utf-8"
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
