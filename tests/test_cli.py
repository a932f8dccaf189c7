"""The CLI turns bad input into one clear line and exit code 2, before any worker starts."""

from pathlib import Path

import pytest
import tomli_w

from fedpeft.cli import main
from tests.conftest import tiny_config


def run_cli(tmp_path: Path, config: dict, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    path = tmp_path / "c.toml"
    path.write_text(tomli_w.dumps(config), encoding="utf-8")
    code = main(["simulate", "--config", str(path), "--out", str(tmp_path / "out")])
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda c, t: c["model"].update(name_or_path=str(t / "no-model")),
            "model.name_or_path: no such file",
        ),
        (lambda c, t: c["data"].update(train=str(t / "missing.tsv")), "data.train: file not found"),
        (lambda c, t: c["data"].update(text_column="review"), "column 'review' not found"),
        (lambda c, t: c["partition"].update(num_clients=1000), "num_clients = 1000"),
        (lambda c, t: c["train"].update(lr=-1), "train.lr"),
        (
            lambda c, t: c.update(privacy={"example": {"enabled": True, "target_epsilon": 0.01}}),
            "privacy.example.target_epsilon: client 0",
        ),
        (lambda c, t: c.update(slora={"rounds": 5}), "slora.rounds (5) must be below federation.rounds"),
    ],
    ids=[
        "missing-model",
        "missing-data",
        "missing-column",
        "too-many-clients",
        "bad-value",
        "impossible-epsilon",
        "slora-too-long",
    ],
)
def test_bad_input_is_one_clear_line(
    tmp_path: Path,
    tiny_bert_dir: Path,
    sentiment_files: dict,
    capsys: pytest.CaptureFixture[str],
    change,
    message: str,
) -> None:
    config = tiny_config(tiny_bert_dir, sentiment_files)
    change(config, tmp_path)
    code, err = run_cli(tmp_path, config, capsys)
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("fedpeft: error:")]
    assert len(lines) == 1 and message in lines[0], err[-2000:]
    assert "Traceback" not in err


def test_validate_prints_resolved_config(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", "--set", "federation.rounds=7"]) == 0
    assert "rounds = 7" in capsys.readouterr().out
