"""Run an attack on captured updates of a simulation and score it against the truth.

The truth is the batch each client trained on, replayed from the run's seeds: the
client's shuffled loader is seeded by (run seed, round, client), so the evaluation
sees exactly the examples of the round without anything being sent or stored. DP-SGD's
Poisson batches cannot be replayed; for them the truth is the client's own record of
its draws (:mod:`fedpeft.attacks.drawn_batches`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from fedpeft.attacks.base import Attack, Reconstruction
from fedpeft.attacks.capture import CapturedUpdate
from fedpeft.attacks.metrics import LeakageMetrics, score_reconstruction
from fedpeft.errors import AttackError
from fedpeft.experiment import Experiment
from fedpeft.training import local_batches


@dataclass(frozen=True)
class AttackOutcome:
    """An attack's result on one captured update."""

    server_round: int
    client_id: int
    threat_model: str
    metrics: LeakageMetrics
    seconds: float
    reconstruction: Reconstruction
    truth: tuple[tuple[int, ...], ...]


def trained_sequences(
    experiment: Experiment,
    client_id: int,
    server_round: int,
    drawn_batches: Sequence[Sequence[int]] | None = None,
) -> list[list[int]]:
    """Token ids (padding removed) of every example the client trained on in the round.

    Args:
        experiment: The run's experiment (its data, partitions and seeds).
        client_id: The client (its partition in a simulation).
        server_round: The captured round.
        drawn_batches: Under DP-SGD, the client's record of its batches (partition
            indices); ignored otherwise, where the seeded loader is replayed.

    Raises:
        AttackError: The round used DP-SGD and no record of its batches is given.

    """
    if experiment.config.privacy.example.enabled:
        if drawn_batches is None:
            raise AttackError(
                f"round {server_round} client {client_id}: DP-SGD batches are Poisson draws from OS "
                "randomness and the client left no record of them (round-RRRR-client-CCCC.batches.json "
                "beside the capture, written by `fedpeft simulate` for captured rounds)"
            )
        examples = experiment.tokenized_partition(client_id)
        return [list(examples[i]["input_ids"]) for batch in drawn_batches for i in batch]
    train = experiment.train_config_for(server_round)
    loader = experiment.client_loader(client_id, server_round)
    sequences = []
    for batch in local_batches(loader, train.epochs, train.steps, train.grad_accumulation):
        for ids, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True):
            sequences.append([int(t) for t, m in zip(ids, mask, strict=True) if m])
    return sequences


def attack_captures(
    experiment: Experiment,
    captures: Sequence[CapturedUpdate],
    attack: Attack,
    secrets: Sequence[str] = (),
    progress: bool = True,
) -> list[AttackOutcome]:
    """Run ``attack`` on each capture and score it against the replayed batch."""
    outcomes = []
    target = experiment.model
    # The attacks' span algebra runs on the CPU in float64, beside the captured updates;
    # training on this side (the memorisation boost) may have left the model on a GPU.
    target.model.to("cpu")
    for index, captured in enumerate(captures, 1):
        experiment.prepare_round(captured.server_round)
        truth = trained_sequences(
            experiment, captured.client_id, captured.server_round, captured.drawn_batches
        )
        if not truth:
            if progress:
                print(
                    f"[{index}/{len(captures)}] round {captured.server_round} client {captured.client_id}: "
                    "its Poisson batches drew no example, so there is nothing to recover; skipped",
                    flush=True,
                )
            continue
        started = time.perf_counter()
        reconstruction = attack.reconstruct(captured.observation, target)
        seconds = time.perf_counter() - started
        metrics = score_reconstruction(reconstruction, truth, target.tokenizer, secrets)
        outcomes.append(
            AttackOutcome(
                captured.server_round,
                captured.client_id,
                captured.observation.threat_model,
                metrics,
                seconds,
                reconstruction,
                tuple(tuple(s) for s in truth),
            )
        )
        if progress:
            print(
                f"[{index}/{len(captures)}] round {captured.server_round} client {captured.client_id}: "
                f"token recall {metrics.token_recall:.3f}  ROUGE-1 {metrics.rouge1:.3f}  "
                f"ROUGE-L {metrics.rougeL:.3f}  {seconds:.1f} s",
                flush=True,
            )
    return outcomes
