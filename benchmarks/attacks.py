"""Leakage of the updates clients send, by batch size and update path.

Each row runs fedpeft's real client round (``fedpeft.client.run_client_round``: local
training, then the codec's encoding, exactly what the ClientApp sends), decodes it as
the server does, and runs one attack on the decoded update; the truth is the batch the
client trained on, replayed from its seeded loader. No Flower or Ray is involved, so
the model loads once for every row. The ``lm_prior`` row per batch size is the
no-gradient baseline.

    python benchmarks/attacks.py --out runs/bench/attacks.json
    python benchmarks/attacks.py --batch-sizes 1,2 --codecs dense
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from fedpeft.attacks import ATTACKS, Observation, score_reconstruction
from fedpeft.attacks.capture import malicious_adapter, threat_model_of
from fedpeft.attacks.evaluation import trained_sequences
from fedpeft.client import run_client_round
from fedpeft.codecs import CodecContext
from fedpeft.config import load_config
from fedpeft.experiment import Experiment

ROOT = Path(__file__).resolve().parent.parent
CODECS_BY_NAME = {
    "dense": ("dense", "{}"),
    "random-mask": ("random_mask", '{density = 0.1, dtype = "float16", rescale = true}'),
    "topk": ("topk", '{density = 0.05, dtype = "float16"}'),
    "projection": ("projection", "{directions = 16}"),
}
"""Row name -> (codec, its options as a TOML inline table)."""


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", type=Path, default=ROOT / "configs/attack-malicious-smollm2.toml")
    parser.add_argument("--batch-sizes", default="1,2,4,8")
    parser.add_argument("--codecs", default=",".join(CODECS_BY_NAME))
    parser.add_argument("--attack", default="sequence_assembly")
    parser.add_argument("--clients", type=int, default=2, help="clients (batches) per row")
    parser.add_argument("--out", type=Path, default=ROOT / "runs/bench/attacks.json")
    args = parser.parse_args()

    rows: list[dict[str, Any]] = []
    header = f"{'batch':>5} {'codec':<12} {'attack':<18} {'tok P':>6} {'tok R':>6} {'R-1':>6} {'R-2':>6} {'R-L':>6} {'s/batch':>8}"
    print(header, flush=True)
    for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
        runs = [(name, args.attack) for name in args.codecs.split(",")] + [("dense", "lm_prior")]
        for codec_name, attack_name in runs:
            kind, options = CODECS_BY_NAME[codec_name]
            overrides = [f"train.batch_size={batch_size}", f"federation.codec={kind}"]
            config = load_config(args.config, [*overrides, f"federation.codec_options={options}"])
            experiment = Experiment(config)
            codec = experiment.codec
            malicious = config.capture.malicious
            initial = experiment.initial_state
            sent = malicious_adapter(initial, seed=config.seed) if malicious else dict(initial)
            attack_options = (
                {"num_sequences": batch_size, "length": config.data.max_length}
                if attack_name == "lm_prior"
                else {}
            )
            attack = ATTACKS.build(attack_name, attack_options, "attack.options")
            totals: dict[str, float] = {}
            seconds = 0.0
            for client_id in range(args.clients):
                result = run_client_round(experiment, client_id, sent, 1, memory={})
                context = CodecContext(config.seed, 1, client_id)
                decoded = codec.decode(result.payload, context, sent)
                observation = Observation(
                    threat_model_of(config.train, malicious),
                    sent,
                    decoded,
                    learning_rate=config.train.lr,
                    local_steps=config.train.steps,
                    num_examples=result.num_examples,
                )
                started = time.perf_counter()
                reconstruction = attack.reconstruct(observation, experiment.model)
                seconds += time.perf_counter() - started
                truth = trained_sequences(experiment, client_id, 1)
                metrics = score_reconstruction(reconstruction, truth, experiment.model.tokenizer)
                for key, value in vars(metrics).items():
                    if value is not None:
                        totals[key] = totals.get(key, 0.0) + value / args.clients
            row = {
                "batch_size": batch_size,
                "codec": codec_name,
                "codec_options": config.federation.codec_options,
                "attack": attack_name,
                "seconds_per_batch": seconds / args.clients,
                **totals,
            }
            rows.append(row)
            print(
                f"{batch_size:>5} {codec_name:<12} {attack_name:<18} {row['token_precision']:>6.3f} {row['token_recall']:>6.3f} "
                f"{row['rouge1']:>6.3f} {row['rouge2']:>6.3f} {row['rougeL']:>6.3f} {row['seconds_per_batch']:>8.1f}",
                flush=True,
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"config": str(args.config), "clients_per_row": args.clients, "rows": rows}, indent=2)
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
