"""Leakage of the updates clients send, by batch size and update path.

Each row runs fedpeft's real client round (``fedpeft.client.run_client_round``: local
training, then the codec's encoding, exactly what the ClientApp sends), decodes it as
the server does, and runs one attack on the decoded update; the truth is the batch the
client trained on, replayed from its seeded loader. No Flower or Ray is involved, so
the model loads once for every row. The ``lm_prior`` row per batch size (for an
encoder classifier: ``unigram_prior``) is the no-gradient baseline.

    python benchmarks/attacks.py --out runs/bench/attacks.json
    python benchmarks/attacks.py --batch-sizes 1,2 --codecs dense --privacy none,eps8

DP rows (``eps8``, ``eps1``: the client's example-level target over the round) are
scored against the client's own record of its Poisson batches.

``--pii`` plants a synthetic person's message with a secret (phone number, e-mail,
account number: :mod:`fedpeft.attacks.pii`) in front of every training text, and
scores the secrets of each batch as recovered when they appear verbatim in the attack's
sentences (the PII column).

    python benchmarks/attacks.py --pii --batch-sizes 1,2,4 --codecs dense --out runs/bench/attacks-pii.json

``--secure 2,4`` adds, next to each per-client row, the same attack on what a SecAgg+
server holds instead: the sum of m clients' updates (m = 2, 4: the clients per round),
scored against the union of their batches (the ``sum`` column). Each client's payload
goes through Flower's own client arithmetic (weighted by its example count over the
protocol's max weight, stochastically quantised onto the round's grid of
``federation.secure_aggregation``) and the sum is unmasked and decoded as fedpeft's
server does; only the masking, which cancels exactly, is left out. Codecs that cannot
be summed get no secure row.

    python benchmarks/attacks.py --secure 2,4 --batch-sizes 1 --codecs dense --privacy none \
        --attacks recit --out runs/bench/attacks-secagg.json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np
from _paths import repo_relative
from flwr.common.secure_aggregation.quantization import quantize
from torch import Tensor

from fedpeft.attacks import ATTACKS, Observation, score_reconstruction
from fedpeft.attacks.capture import malicious_adapter, threat_model_of
from fedpeft.attacks.evaluation import trained_sequences
from fedpeft.attacks.metrics import secrets_found
from fedpeft.attacks.pii import PiiRecord, make_pii_records, plant_pii
from fedpeft.client import run_client_round
from fedpeft.codecs import CodecContext, Payload
from fedpeft.config import Config, load_config
from fedpeft.data.loading import resolve_data_path
from fedpeft.errors import ConfigError
from fedpeft.experiment import Experiment
from fedpeft.flower.secure_aggregation import PayloadLayout, ProtocolSettings
from fedpeft.privacy import PrivacyLedger

ROOT = Path(__file__).resolve().parent.parent
CODECS_BY_NAME = {
    "dense": ("dense", "{}"),
    "random-mask": ("random_mask", '{density = 0.1, dtype = "float16", rescale = true}'),
    "topk": ("topk", '{density = 0.05, dtype = "float16"}'),
    "projection": ("projection", "{directions = 16}"),
}
"""Row name -> (codec, its options as a TOML inline table)."""


PRIVACY_BY_NAME = {"none": None, "eps8": 8.0, "eps1": 1.0}
"""Row name -> the client's example-level target epsilon over the round (None: no DP)."""


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", type=Path, default=ROOT / "configs/attack-malicious-smollm2.toml")
    parser.add_argument("--batch-sizes", default="1,2,4,8")
    parser.add_argument("--codecs", default=",".join(CODECS_BY_NAME))
    parser.add_argument("--attacks", default="sequence_assembly,recit", help="comma-separated attack names")
    parser.add_argument("--privacy", default=",".join(PRIVACY_BY_NAME), help="none, eps8, eps1")
    parser.add_argument("--clients", type=int, default=2, help="clients (batches) per row")
    parser.add_argument("--pii", action="store_true", help="plant a secret in every training text")
    parser.add_argument(
        "--secure",
        default="",
        help="comma-separated m: also attack the SecAgg+ sum of m clients' updates (e.g. 2,4)",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set data.train=../shared/data/agnews/train.tsv (repeatable)",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "runs/bench/attacks.json")
    args = parser.parse_args()
    args.records = plant_train_file(args) if args.pii else []

    rows: list[dict[str, Any]] = []
    header = (
        f"{'batch':>5} {'privacy':<7} {'codec':<12} {'sum':>3} {'attack':<18} {'tok P':>6} {'tok R':>6} "
        f"{'R-1':>6} {'R-2':>6} {'R-L':>6} {'PII':>6} {'s/batch':>8}"
    )
    print(header, flush=True)
    base = load_config(args.config, args.overrides)
    causal = base.model.task == "causal-lm"
    args.partitions = base.partition.num_clients
    sums = [int(m) for m in args.secure.split(",") if m]
    if any(m < 2 for m in sums):
        raise SystemExit(f"--secure: a sum of fewer than 2 updates hides nothing, got {args.secure}")
    for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
        for privacy_name in args.privacy.split(","):
            target = PRIVACY_BY_NAME[privacy_name]
            for codec_name in args.codecs.split(","):
                attacks = args.attacks.split(",")
                if privacy_name == "none" and codec_name == "dense":
                    # The no-gradient baseline, once per batch size: an LM's guess, or for
                    # a classifier (no LM head) the commonest words of public text.
                    attacks.append("lm_prior" if causal else "unigram_prior")
                # Per-client rows first, then the sums: each switch of config reloads the model.
                for summed, attack_name in [(m, a) for m in (None, *sums) for a in attacks]:
                    try:
                        row = measure_row(args, batch_size, target, codec_name, attack_name, summed)
                    except ConfigError as err:
                        if summed is None:
                            raise
                        # A codec secure aggregation cannot sum: the run would refuse it too.
                        print(f"{batch_size:>5} {privacy_name:<7} {codec_name:<12} {summed:>3} {err}")
                        continue
                    row["privacy"] = privacy_name
                    rows.append(row)
                    print(
                        f"{batch_size:>5} {privacy_name:<7} {codec_name:<12} {summed or '-':>3} "
                        f"{attack_name:<18} {row['token_precision']:>6.3f} {row['token_recall']:>6.3f} "
                        f"{row['rouge1']:>6.3f} {row['rouge2']:>6.3f} {row['rougeL']:>6.3f} "
                        f"{row['pii_recovery_rate']:>6.3f} {row['seconds_per_batch']:>8.1f}",
                        flush=True,
                    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "config": repo_relative(args.config),
                "overrides": args.overrides,
                "clients_per_row": args.clients,
                "secure_sums": sums,
                "pii": args.pii,
                "rows": rows,
            },
            indent=2,
        )
    )
    print(f"wrote {args.out}")


def measure_row(
    args: argparse.Namespace,
    batch_size: int,
    target: float | None,
    codec_name: str,
    attack_name: str,
    summed: int | None = None,
) -> dict[str, Any]:
    """One attack on ``args.clients`` clients' updates, each made by the real client round.

    With ``summed`` = m, the attack runs instead on the SecAgg+ sum of each group of m
    clients (``args.clients // m`` groups, at least one), scored against the union of
    the group's batches (:func:`secure_sum`).

    Raises:
        ConfigError: The codec cannot run under secure aggregation.

    """
    kind, options = CODECS_BY_NAME[codec_name]
    overrides = [
        *args.overrides,
        f"train.batch_size={batch_size}",
        f"federation.codec={kind}",
        f"federation.codec_options={options}",
    ]
    if target is not None:
        overrides += ["privacy.example.enabled=true", f"privacy.example.target_epsilon={target}"]
    groups = [[c] for c in range(args.clients)]
    if summed is not None:
        overrides.append("federation.secure_aggregation.enabled=true")
        groups = [list(range(g * summed, (g + 1) * summed)) for g in range(max(1, args.clients // summed))]
    clients = sum(len(g) for g in groups)
    if clients > args.partitions:  # one partition per client
        overrides.append(f"partition.num_clients={clients}")
    if args.records:  # the messages are ~35 tokens before the sentence: room for both
        overrides += [f"data.train={args.planted_file}", "data.max_length=64"]
    config = load_config(args.config, overrides)
    experiment = latest_experiment(config)
    malicious = config.capture.malicious
    initial = experiment.initial_state
    sent = malicious_adapter(initial, seed=config.seed) if malicious else dict(initial)
    examples = batch_size * len(groups[0])  # in what one observation holds
    attack_options: dict[str, Any] = {}
    if attack_name == "lm_prior":
        attack_options = {"num_sequences": examples, "length": config.data.max_length}
    if attack_name == "unigram_prior":  # about a sentence's distinct tokens per example, from public
        # text of the same kind: the config's test split, disjoint from what the clients hold
        attack_options = {
            "num_tokens": 12 * examples,
            "reference": config.data.test,
            "text_column": config.data.text_column,
        }
    attack = ATTACKS.build(attack_name, attack_options, "attack.options")
    totals: dict[str, float] = {}
    counts: dict[str, int] = {}
    seconds, scored, epsilon = 0.0, 0, None
    for group in groups:
        truth: list[list[int]] = []
        payloads, weights = [], []
        for client_id in group:
            result = run_client_round(experiment, client_id, sent, 1, memory={}, ledger=PrivacyLedger())
            epsilon = result.epsilon
            truth += trained_sequences(experiment, client_id, 1, result.drawn_batches)
            payloads.append(result.payload)
            weights.append(result.num_examples)
        if not truth:  # empty Poisson draws: nothing to recover
            continue
        if summed is None:
            decoded = experiment.codec.decode(payloads[0], CodecContext(config.seed, 1, group[0]), sent)
        else:
            decoded = secure_sum(experiment, payloads, weights, sent)
        observation = Observation(
            threat_model_of(config.train, malicious),
            sent,
            decoded,
            learning_rate=config.train.lr,
            local_steps=config.train.steps,
            num_examples=sum(weights),
        )
        experiment.model.model.to("cpu")  # the client round trains on a GPU where there is one
        started = time.perf_counter()
        reconstruction = attack.reconstruct(observation, experiment.model)
        seconds += time.perf_counter() - started
        tokenizer = experiment.model.tokenizer
        secrets = secrets_found(
            [str(tokenizer.decode(s, skip_special_tokens=True)) for s in truth],
            [r.secret for r in args.records],
        )
        metrics = score_reconstruction(reconstruction, truth, tokenizer, secrets)
        scored += 1
        for key, value in vars(metrics).items():
            if value is not None:  # PII only where the batch held a secret
                totals[key] = totals.get(key, 0.0) + value
                counts[key] = counts.get(key, 0) + 1
    means = {key: value / counts[key] for key, value in totals.items()}
    keys = ("token_precision", "token_recall", "rouge1", "rouge2", "rougeL", "exact_sequence_rate")
    for key in (*keys, "pii_recovery_rate"):
        means.setdefault(key, float("nan"))
    return {
        "batch_size": batch_size,
        "codec": codec_name,
        "codec_options": config.federation.codec_options,
        "attack": attack_name,
        "secure_sum_of": summed,
        "epsilon": epsilon,
        "clients_scored": scored if summed is None else scored * summed,
        "observations_scored": scored,
        "seconds_per_batch": seconds / max(scored, 1),
        **means,
    }


def secure_sum(
    experiment: Experiment, payloads: Sequence[Payload], weights: Sequence[int], sent: dict[str, Tensor]
) -> dict[str, Tensor]:
    """The decoded sum a SecAgg+ server captures from these clients' payloads.

    Each client does what Flower's ``secaggplus_mod`` does to its reply (fedpeft's
    ``secure_reply`` hands it the payload weighted by the example count, at most the
    protocol's ``max_weight``): scale by its weight ratio on the grid, then quantise
    stochastically onto ``[-R, R]`` with Flower's own ``quantize``. The server's unmasked
    sum is the integer sum of those (the masks cancel exactly); it is dequantised and
    divided by the summed ratios as Flower's workflow does, giving the weighted mean,
    which fedpeft's server decodes once with the round-wide randomness and captures
    times the client count (``fedpeft.flower.secure_aggregation.secure_train_round``).
    """
    config = experiment.config
    settings = ProtocolSettings.of(config, experiment.partitions.sizes())
    layout = PayloadLayout.of(payloads[0])
    levels, bound = settings.quantization_range, settings.clipping_range
    np.random.seed(config.seed)  # Flower's stochastic rounding draws from NumPy's global generator
    total = np.zeros(layout.size, dtype=np.int64)
    q_total = 0
    for payload, examples in zip(payloads, weights, strict=True):
        weight = max(1, min(examples, int(settings.max_weight)))
        q_ratio = round(weight / settings.max_weight * levels)
        values = layout.flatten(payload) * (q_ratio / levels)
        total += quantize([values], bound, levels)[0].astype(np.int64)
        q_total += q_ratio
    dequantised = total * (2 * bound / levels) - len(payloads) * bound
    mean = layout.to_payload(layout.split(dequantised * (levels / q_total)))
    context = CodecContext(config.seed, 1, 0).round_wide()
    decoded = experiment.codec.decode(mean, context, sent)
    return {name: value * len(payloads) for name, value in decoded.items()}


_LATEST: dict[str, Experiment] = {}


def latest_experiment(config: Config) -> Experiment:
    """The experiment of ``config``, built once for consecutive rows that share it.

    Only the latest is kept: each holds a model (SmolLM2: about 1 GB), and a full
    table has 18 configs.
    """
    key = config.fingerprint()
    if key not in _LATEST:
        _LATEST.clear()
        _LATEST[key] = Experiment(config)
    return _LATEST[key]


def plant_train_file(args: argparse.Namespace) -> list[PiiRecord]:
    """Write the config's training file with a PII message before every text; its records."""
    config = load_config(args.config, args.overrides)
    source = resolve_data_path(config.data.train)
    if source.suffix != ".jsonl":
        raise SystemExit(f"--pii plants into a JSONL training file, not {source}")
    rows = [json.loads(line) for line in source.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = rows[: config.data.max_train_examples or len(rows)]
    records = make_pii_records(len(rows), seed=config.seed)
    column = config.data.text_column
    planted = plant_pii([row[column] for row in rows], records)
    # Not beside --out: the JSON is what gets kept (docs/figures), the planted text is not.
    args.planted_file = Path(tempfile.mkdtemp(prefix="fedpeft-pii-")) / "train.jsonl"
    args.planted_file.write_text(
        "".join(json.dumps(row | {column: text}) + "\n" for row, text in zip(rows, planted, strict=True)),
        encoding="utf-8",
    )
    return records


if __name__ == "__main__":
    main()
