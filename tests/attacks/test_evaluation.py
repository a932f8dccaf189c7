"""Scoring against the truth: a secure round's sum is scored against the union of its clients' batches."""

from __future__ import annotations

from pathlib import Path

import torch

from fedpeft.attacks import ATTACKS
from fedpeft.attacks.capture import CapturePlan, load_captures, malicious_adapter
from fedpeft.attacks.evaluation import attack_captures, trained_sequences
from fedpeft.client import run_client_round
from fedpeft.codecs import CodecContext
from fedpeft.config import parse_config
from fedpeft.experiment import Experiment
from tests.attacks.test_attack_cli import attack_config
from tests.attacks.test_capture import write_metrics


def test_an_attack_on_a_sum_recovers_every_clients_batch_and_is_scored_on_their_union(
    tmp_path: Path, tiny_llama_dir: Path, sentiment_files: dict[str, Path]
) -> None:
    data = attack_config(tiny_llama_dir, sentiment_files)
    data["partition"]["num_clients"] = 3
    data["federation"] |= {"rounds": 1, "min_available_clients": 3}
    data["capture"] = {"rounds": [1], "malicious": True}
    data["attack"] = {"name": "token_set"}
    experiment = Experiment(parse_config(data))
    config = experiment.config
    sent = malicious_adapter(experiment.initial_state, seed=config.seed)
    total: dict[str, torch.Tensor] = {}
    for client_id in (0, 2):  # client 1 is not in the round
        result = run_client_round(experiment, client_id, sent, 1)
        delta = experiment.codec.decode(result.payload, CodecContext(config.seed, 1, client_id), sent)
        total = {k: total.get(k, 0) + v for k, v in delta.items()}
    plan = CapturePlan(tmp_path / "captures", frozenset({1}), frozenset(), True, "malicious", {1: 0.1}, 1)
    plan.save_sum(1, sent, total, clients=2)
    write_metrics(tmp_path, {1: [(0, 80), (2, 80)]})

    [captured] = load_captures(plan.folder)
    attack = ATTACKS.build("token_set", {}, "attack.options")
    [outcome] = attack_captures(experiment, [captured], attack, progress=False)
    first, second = trained_sequences(experiment, 0, 1), trained_sequences(experiment, 2, 1)
    assert first != second
    assert (outcome.client_id, outcome.clients) == (-1, (0, 2))
    assert [list(s) for s in outcome.truth] == first + second
    # The sum's rows span both batches' inputs: the span test passes each client's tokens
    # (all but the last, [SEP], which feeds only the unused last logit).
    special = set(experiment.model.tokenizer.all_special_ids)
    found = set(outcome.reconstruction.token_ids)
    for sequence in (first[0], second[0]):
        assert set(sequence[:-1]) - special <= found
    assert outcome.metrics.token_recall == 1.0
    assert outcome.metrics.token_precision == 1.0
