"""Run an attack on captured updates of a simulation and score it against the truth.

The truth is the batch each client trained on, replayed from the run's seeds: the
client's shuffled loader is seeded by (run seed, round, client), so the evaluation
sees exactly the examples of the round without anything being sent or stored. DP-SGD's
Poisson batches cannot be replayed; for them the truth is the client's own record of
its draws (:mod:`fedpeft.attacks.drawn_batches`). A secure round's captured sum is
scored against the union of its clients' batches: what the attacker could at best
recover from it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from fedpeft.attacks.base import Attack, Reconstruction
from fedpeft.attacks.capture import CapturedUpdate
from fedpeft.attacks.metrics import LeakageMetrics, score_reconstruction
from fedpeft.attacks.progress import format_elapsed, reporting
from fedpeft.errors import AttackError
from fedpeft.experiment import Experiment
from fedpeft.training import local_batches


@dataclass(frozen=True)
class AttackOutcome:
    """An attack's result on one captured update (or sum: ``client_id`` is -1, ``clients`` its clients)."""

    server_round: int
    client_id: int
    clients: tuple[int, ...]
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


def observed_sequences(experiment: Experiment, captured: CapturedUpdate) -> list[list[int]]:
    """The truth of one capture: every sequence its clients trained on in the round, client by client.

    One client's batch for a per-client capture; for a secure round's sum, the union of
    the batches of every client in it (:attr:`CapturedUpdate.contributions`).

    Raises:
        AttackError: A DP-SGD client left no record of its batches.

    """
    return [
        sequence
        for part in captured.contributions
        for sequence in trained_sequences(
            experiment, part.client_id, captured.server_round, part.drawn_batches
        )
    ]


def attack_captures(
    experiment: Experiment,
    captures: Sequence[CapturedUpdate],
    attack: Attack,
    secrets: Sequence[str] = (),
    progress: Callable[[str], None] | bool | None = True,
) -> list[AttackOutcome]:
    """Run ``attack`` on each capture and score it against the replayed batch (or a sum's batches).

    Args:
        experiment: The run's experiment (its model, data, partitions and seeds).
        captures: The captured updates (or sums) to attack, in order.
        attack: The attack.
        secrets: Planted secrets the metrics look for in what is recovered.
        progress: Where a line per capture started and finished goes, and the attack's
            heartbeats (:mod:`fedpeft.attacks.progress`); ``True``: printed at once,
            ``False`` or ``None``: nowhere.

    """
    say = _print_now if progress is True else (progress or None)
    begun = time.perf_counter()
    outcomes = []
    target = experiment.model
    # The attacks' span algebra runs on the CPU in float64, beside the captured updates;
    # training on this side (the memorisation boost) may have left the model on a GPU.
    target.model.to("cpu")
    for index, captured in enumerate(captures, 1):
        experiment.prepare_round(captured.server_round)
        truth = observed_sequences(experiment, captured)
        name = f"[{index}/{len(captures)}] round {captured.server_round} {captured.describe()}"
        if not truth:
            if say:
                say(f"{name}: its Poisson batches drew no example, so there is nothing to recover; skipped")
            continue
        if say:
            tokens = sum(len(s) for s in truth)
            say(f"{name}: attacking ({len(truth)} sequence(s), {tokens} tokens to recover)")
        started = time.perf_counter()
        with reporting(say):
            reconstruction = attack.reconstruct(captured.observation, target)
        seconds = time.perf_counter() - started
        metrics = score_reconstruction(reconstruction, truth, target.tokenizer, secrets)
        outcomes.append(
            AttackOutcome(
                captured.server_round,
                captured.client_id,
                captured.clients,
                captured.observation.threat_model,
                metrics,
                seconds,
                reconstruction,
                tuple(tuple(s) for s in truth),
            )
        )
        if say:
            say(
                f"{name}: token recall {metrics.token_recall:.3f}  ROUGE-1 {metrics.rouge1:.3f}  "
                f"ROUGE-L {metrics.rougeL:.3f}  {seconds:.1f} s (all so far: "
                f"{format_elapsed(time.perf_counter() - begun)})"
            )
    return outcomes


def _print_now(line: str) -> None:
    # Flushed: a run piped into a log file shows a capture's start before its long work.
    print(line, flush=True)
