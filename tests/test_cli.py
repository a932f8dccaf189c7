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


def validate(tmp_path: Path, config: dict, capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, str, str]:
    path = tmp_path / "c.toml"
    path.write_text(tomli_w.dumps(config), encoding="utf-8")
    code = main(["validate", "--config", str(path), *extra])
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("fedpeft: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    return lines[0]


def data_file(tmp_path: Path, name: str, content: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(content)
    return str(path)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c, t: c["data"].update(train=str(t / "gone.tsv")), "data.train: file not found"),
        (
            lambda c, t: c["data"].update(train=data_file(t, "rows.tsv", b"sentence\tlabel\ngood\t1\nbad\n")),
            "rows.tsv:3: no value for 'label'",
        ),
        (
            lambda c, t: c["data"].update(test=data_file(t, "l1.tsv", b"sentence\tlabel\ncaf\xe9\t1\n")),
            "l1.tsv:2: not UTF-8",
        ),
        (lambda c, t: c["train"].update(lr=float("nan")), "train.lr: nan is not a finite number"),
        (lambda c, t: c.update(seed=2**40), "seed: "),
        (lambda c, t: c["federation"].update(codec="zip"), "federation.codec: unknown codec 'zip'"),
        (
            lambda c, t: c["federation"].update(aggregator="trimmed_mean", aggregator_options={"beta": 0.7}),
            "federation.aggregator_options: beta must be in [0, 0.5)",
        ),
        (
            # 240 rows in 3 clients: 80 examples each, so delta must be below 1/80.
            lambda c, t: c.update(privacy={"example": {"enabled": True, "noise_multiplier": 1.0, "delta": 0.02}}),
            "privacy.example.delta = 0.02 is not below 1/n for client",
        ),
        (
            lambda c, t: c.update(privacy={"example": {"enabled": True, "target_epsilon": 0.01}}),
            "privacy.example.target_epsilon: client 0",
        ),
    ],
    ids=[
        "missing-data", "row-without-label", "not-utf8", "nan", "seed", "codec", "bad-option",
        "delta-vs-client", "impossible-epsilon",
    ],
)
def test_validate_checks_config_and_data_without_the_model(
    tmp_path: Path,
    tiny_bert_dir: Path,
    sentiment_files: dict,
    capsys: pytest.CaptureFixture[str],
    change,
    message: str,
) -> None:
    config = tiny_config(tiny_bert_dir, sentiment_files)
    config["model"]["name_or_path"] = str(tmp_path / "no-model-here")  # validate never loads it
    assert validate(tmp_path, config, capsys)[0] == 0
    change(config, tmp_path)
    code, out, err = validate(tmp_path, config, capsys)
    assert code == 2 and out == ""
    assert message in one_error_line(err)


def test_a_non_utf8_data_file_names_its_line(
    tmp_path: Path, tiny_bert_dir: Path, sentiment_files: dict, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tiny_config(tiny_bert_dir, sentiment_files)
    config["data"]["test"] = data_file(tmp_path, "l1.tsv", b"sentence\tlabel\nfine\t1\ncaf\xe9\t0\n")
    assert "l1.tsv:3: not UTF-8 (byte 0xe9)" in one_error_line(validate(tmp_path, config, capsys)[2])


def test_validate_warns_of_an_unset_delta(
    tmp_path: Path, tiny_bert_dir: Path, sentiment_files: dict, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tiny_config(tiny_bert_dir, sentiment_files)
    config["privacy"] = {"client": {"enabled": True}}
    code, out, err = validate(tmp_path, config, capsys)
    assert code == 0 and "fedpeft: warning: privacy.client.delta is not set: using 1e-05" in err
    assert "delta" not in out  # the resolved config keeps it unset, so the run warns again


def test_deploy_checks_the_data_before_submitting(
    tmp_path: Path, tiny_bert_dir: Path, sentiment_files: dict, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tiny_config(tiny_bert_dir, sentiment_files)
    config["data"]["train"] = data_file(tmp_path, "rows.jsonl", b'{"sentence": "a", "label": 1}\n{"sentence": "b"}\n')
    path = tmp_path / "c.toml"
    path.write_text(tomli_w.dumps(config), encoding="utf-8")
    code = main(["deploy", "--config", str(path), "--superlink", "nowhere", "--out", str(tmp_path / "run")])
    assert code == 2
    assert "rows.jsonl:2: no value for 'label'" in one_error_line(capsys.readouterr().err)


def test_a_bad_row_stops_a_simulation_with_the_same_line(
    tmp_path: Path, tiny_bert_dir: Path, sentiment_files: dict, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tiny_config(tiny_bert_dir, sentiment_files)
    config["data"]["train"] = data_file(tmp_path, "rows.tsv", b"sentence\tlabel\ngood\t1\nbad\n")
    code, err = run_cli(tmp_path, config, capsys)
    assert code == 2 and "rows.tsv:3: no value for 'label'" in one_error_line(err)
