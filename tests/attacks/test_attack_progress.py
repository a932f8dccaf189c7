"""Attacking captures says what it is doing: a line per capture started and finished, and the attack's stages."""

from __future__ import annotations

from pathlib import Path

from fedpeft.attacks import ATTACKS, Observation
from fedpeft.attacks.capture import CapturedUpdate, malicious_adapter
from fedpeft.attacks.evaluation import attack_captures
from fedpeft.client import run_client_round
from fedpeft.codecs import CodecContext
from fedpeft.config import parse_config
from fedpeft.experiment import Experiment
from tests.attacks.test_attack_cli import attack_config


def test_each_capture_and_the_attacks_stages_are_reported(
    tiny_llama_dir: Path, sentiment_files: dict[str, Path]
) -> None:
    experiment = Experiment(parse_config(attack_config(tiny_llama_dir, sentiment_files)))
    config = experiment.config
    sent = malicious_adapter(experiment.initial_state, seed=config.seed)
    result = run_client_round(experiment, 1, sent, 2)
    update = experiment.codec.decode(result.payload, CodecContext(config.seed, 2, 1), sent)
    observation = Observation(
        threat_model="malicious",
        global_state=sent,
        update=update,
        learning_rate=config.train.lr,
        local_steps=config.train.steps,
        num_examples=result.num_examples,
    )
    lines: list[str] = []
    [outcome] = attack_captures(
        experiment,
        [CapturedUpdate(2, 1, observation)],
        ATTACKS.build("recit", {}, "attack"),
        progress=lines.append,
    )
    tokens = sum(len(s) for s in outcome.truth)
    assert lines[0] == f"[1/1] round 2 client 1: attacking (1 sequence(s), {tokens} tokens to recover)"
    assert lines[1].startswith("    recit: filtering the vocabulary against ")
    assert any(line.startswith("    recit: pairing ") for line in lines[2:-1])
    assert lines[-1].startswith("[1/1] round 2 client 1: token recall ")
    assert "s (all so far: " in lines[-1]
