"""benchmarks/gpu_clients.py: clients per second from a run folder, and --collect's guard
against reading a run of another config."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import gpu_clients

from fedpeft.config import parse_config


def _args(tmp_path: Path, rounds: int = 3) -> argparse.Namespace:
    return argparse.Namespace(
        clients=4, rounds=rounds, steps=5, model_folder=tmp_path / "models", out=tmp_path / "runs"
    )


def _round(number: int, phase: float, client_seconds: list[float]) -> dict:
    return {
        "round": number,
        "clients": len(client_seconds),
        "train_phase_seconds": phase,
        "per_client": [{"train_seconds": s} for s in client_seconds],
    }


def _write_run(tmp_path: Path, fingerprint: str, rounds: list[dict]) -> None:
    folder = tmp_path / "runs" / "minilm" / "gpus-0.25"
    folder.mkdir(parents=True)
    metrics = {"config_fingerprint": fingerprint, "rounds": rounds}
    (folder / "metrics.json").write_text(json.dumps(metrics), encoding="utf-8")


def test_a_stopped_run_is_read_from_round_two_on(tmp_path: Path) -> None:
    args = _args(tmp_path)
    config = gpu_clients.row_config(gpu_clients.MODELS["minilm"], 0.25, args)
    # Stopped after two of three rounds; round 1 (model loading) is left out.
    rounds = [_round(1, 30.0, [9.0] * 4), _round(2, 2.0, [0.5, 0.4, 0.6, 0.7])]
    _write_run(tmp_path, parse_config(config).fingerprint(), rounds)

    row = gpu_clients.collect(gpu_clients.MODELS["minilm"], 0.25, args, {"gpu_peak_mib": 5000.0})

    assert row["clients_per_second"] == pytest.approx(4 / 2.0)
    assert row["client_seconds_median"] == pytest.approx(0.55)
    assert (row["rounds"], row["rounds_run"], row["rounds_measured"]) == (3, 2, 1)
    assert row["concurrent_clients"] == 4
    assert row["gpu_peak_mib"] == 5000.0
    assert row["random_weights"] is True


def test_collect_refuses_a_run_of_another_config(tmp_path: Path) -> None:
    other = gpu_clients.row_config(gpu_clients.MODELS["minilm"], 0.25, _args(tmp_path, rounds=2))
    _write_run(tmp_path, parse_config(other).fingerprint(), [_round(1, 1.0, [1.0]), _round(2, 1.0, [1.0])])

    with pytest.raises(SystemExit, match="another config"):
        gpu_clients.collect(gpu_clients.MODELS["minilm"], 0.25, _args(tmp_path, rounds=3), None)
