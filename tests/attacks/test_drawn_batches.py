"""DP-SGD rounds are scored against the client's own record of its Poisson draws."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedpeft.attacks.drawn_batches import load_drawn_batches, record_path, save_drawn_batches
from fedpeft.attacks.evaluation import trained_sequences
from fedpeft.client import run_client_round
from fedpeft.config import parse_config
from fedpeft.errors import AttackError
from fedpeft.experiment import Experiment
from fedpeft.privacy import PrivacyLedger
from tests.conftest import tiny_config


def test_a_dp_round_reports_the_batches_it_drew(
    tiny_bert_dir: Path, sentiment_files: dict[str, Path]
) -> None:
    data = tiny_config(tiny_bert_dir, sentiment_files)
    data["train"] = {"steps": 4, "batch_size": 4, "lr": 5e-3}
    data["privacy"] = {"example": {"enabled": True, "noise_multiplier": 1.0}}
    experiment = Experiment(parse_config(data))
    result = run_client_round(experiment, 1, experiment.initial_state, 1, {}, PrivacyLedger())
    examples = experiment.tokenized_partition(1)
    assert len(result.drawn_batches) == result.steps == 4
    assert all(0 <= i < len(examples) for batch in result.drawn_batches for i in batch)
    drawn = sum(len(batch) for batch in result.drawn_batches)
    assert drawn > 0  # 16 expected draws; all four batches empty has probability ~1e-4

    truth = trained_sequences(experiment, 1, 1, result.drawn_batches)
    assert len(truth) == drawn
    first = result.drawn_batches[next(i for i, b in enumerate(result.drawn_batches) if b)][0]
    assert truth[0] == list(examples[first]["input_ids"])
    with pytest.raises(AttackError, match="left no record"):
        trained_sequences(experiment, 1, 1)


def test_a_record_round_trips_and_a_foreign_file_is_named(tmp_path: Path) -> None:
    assert load_drawn_batches(tmp_path, 2, 3) is None
    save_drawn_batches(tmp_path, 2, 3, [[4, 1], [], [7]])
    assert load_drawn_batches(tmp_path, 2, 3) == ((4, 1), (), (7,))
    record_path(tmp_path, 1, 1).write_text('{"batch": []}', encoding="utf-8")
    with pytest.raises(AttackError, match="not a batch record"):
        load_drawn_batches(tmp_path, 1, 1)
