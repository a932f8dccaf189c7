"""``fedpeft report`` on two hand-built run folders: one finished without DP, one unfinished under DP.

The folders are written by the writers a real run uses (``RunHistory.write``,
``Config.to_toml``, the ledger's ``to_data``), so the report reads the real formats.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fedpeft.cli import main
from fedpeft.config import load_config
from fedpeft.history import ClientRoundRecord, RoundRecord, RunHistory, write_json_atomic
from fedpeft.privacy.ledger import SERVER, DpEvent, PrivacyLedger
from fedpeft.report.figures import FIGURE_TITLES, run_figures
from fedpeft.report.runs import load_runs
from tests.audit.test_audit_e2e import CHROMIUM, assert_not_blank, screenshot_page


def _round(number: int, accuracy: float, bytes_up: int, privacy: dict[str, float]) -> RoundRecord:
    clients = [ClientRoundRecord(c, bytes_up // 2, 4096, 40, 0.6 - 0.05 * number, 1.5) for c in range(2)]
    return RoundRecord(
        round=number,
        accuracy=accuracy,
        loss=0.7 - 0.05 * number,
        bytes_up=bytes_up,
        bytes_down=2 * 4096,
        clients=2,
        seconds=2.0,
        train_loss=0.6 - 0.05 * number,
        per_client=clients,
        privacy=privacy,
    )


def _write_run(folder: Path, overrides: list[str], rounds: list[RoundRecord], ledger: PrivacyLedger) -> None:
    config = load_config(None, ["federation.rounds=3", "partition.num_clients=2", *overrides])
    folder.mkdir(parents=True)
    (folder / "config.toml").write_text(config.to_toml(), encoding="utf-8")
    meta = {
        "model": str(folder.parent / "models" / "tiny-bert"),  # absolute: must not reach the page
        "adapter_method": "lora",
        "codec": config.federation.codec,
        "aggregator": config.federation.aggregator,
        "num_clients": 2,
        "warnings": ["a warning the run kept"],
    }
    RunHistory(meta, {"accuracy": 0.5, "loss": 0.69}, rounds).write(folder / "metrics.json")
    if ledger.events:
        write_json_atomic(folder / "privacy_ledger.json", ledger.to_data())


@pytest.fixture()
def two_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """The two run folders in ``tmp_path/runs``, with ``tmp_path`` the current folder."""
    monkeypatch.chdir(tmp_path)
    plain = tmp_path / "runs" / "plain-lora"
    _write_run(
        plain,
        [],
        [_round(r, 0.5 + 0.1 * r, 200_000, {}) for r in (1, 2, 3)],
        PrivacyLedger(),
    )
    private = tmp_path / "runs" / "dp-topk"
    ledger = PrivacyLedger()
    rounds = []
    for r in (1, 2):
        for client in ("0", "1"):
            ledger.record(DpEvent(r, client, "example", 1.1, 0.1, 10))
        ledger.record(DpEvent(r, SERVER, "client", 1.0, 0.5, 1))
        spent = {
            "epsilon_example": 1.5 * r,
            "delta_example": 1e-5,
            "epsilon_client": 2.0 * r,
            "delta_client": 1e-3,
        }
        rounds.append(_round(r, 0.5 + 0.05 * r, 20_000, spent))
    _write_run(
        private,
        [
            "federation.codec=topk",
            "federation.fraction_train=0.5",
            "federation.min_train_clients=1",
            "privacy.example.enabled=true",
            "privacy.example.noise_multiplier=1.1",
            "privacy.client.enabled=true",
            "privacy.client.delta=1e-3",
        ],
        rounds,  # two of three rounds: an unfinished run
        ledger,
    )
    return plain, private


def test_report_of_two_runs_is_one_self_contained_page_that_renders(
    two_runs: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["report", "runs/plain-lora", str(two_runs[1]), "--out", "out"]) == 0
    printed = capsys.readouterr().out
    assert "plain-lora: finished, 3 round(s)" in printed
    assert "dp-topk: unfinished: 2 of 3 rounds" in printed

    html = (tmp_path / "out" / "report.html").read_text(encoding="utf-8")
    assert html.startswith("<!DOCTYPE html>")
    assert "plain-lora" in html and "dp-topk" in html and "unfinished: 2 of 3 rounds" in html
    # Every figure embedded, none fetched: no script, no src/href outside data: URIs.
    assert html.count("src='data:image/png;base64,") == len(FIGURE_TITLES)
    assert "<script" not in html
    assert not re.search(r"(src|href)\s*=\s*['\"](?!data:)", html)
    for title in FIGURE_TITLES.values():
        assert f"alt='{title}'" in html
    # The settings and final metrics of each run, and no machine paths.
    assert "topk" in html and "noise 1.1, max_grad_norm 1, delta 1e-05, rdp" in html
    assert "3.000 at delta 1e-05" in html and "4.000 at delta 0.001" in html
    assert "runs/dp-topk" in html and "runs/models/tiny-bert" in html
    assert str(tmp_path) not in html
    assert "a warning the run kept" in html

    for figure_id in FIGURE_TITLES:
        png = tmp_path / "out" / "figures" / f"{figure_id}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000

    if not CHROMIUM.exists():
        pytest.skip("/usr/bin/chromium not installed (apt-get install chromium; .ci/run installs it)")
    screenshot = tmp_path / "page.png"
    screenshot_page(tmp_path / "out" / "report.html", screenshot, tmp_path / "profile")
    assert_not_blank(screenshot)


def test_a_missing_run_folder_or_metrics_file_is_named(
    two_runs: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["report", "runs/plain-lora", "runs/nowhere", "--out", "out"]) == 2
    assert "fedpeft: error: runs/nowhere: no such run folder" in capsys.readouterr().err
    (two_runs[1] / "metrics.json").unlink()
    assert main(["report", "runs/plain-lora", str(two_runs[1]), "--out", "out"]) == 2
    assert "fedpeft: error: runs/dp-topk/metrics.json: not found" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_run_without_config_still_reports_what_metrics_hold(
    two_runs: tuple[Path, Path], tmp_path: Path
) -> None:
    (two_runs[0] / "config.toml").unlink()
    assert main(["report", *map(str, two_runs), "--out", "out"]) == 0
    html = (tmp_path / "out" / "report.html").read_text(encoding="utf-8")
    assert "no config.toml: settings unknown" in html and "planned rounds unknown" in html


def test_figures_draw_one_line_per_run_and_quantity(two_runs: tuple[Path, Path]) -> None:
    runs = load_runs(list(two_runs))
    figures = {spec["id"]: spec for spec in run_figures(runs)}
    assert list(figures) == list(FIGURE_TITLES)
    accuracy = {s["name"]: s for s in figures["accuracy"]["series"]}
    assert accuracy["plain-lora"]["x"] == [0, 1, 2, 3] and accuracy["dp-topk"]["x"] == [0, 1, 2]
    assert accuracy["plain-lora"]["y"] == pytest.approx([0.5, 0.6, 0.7, 0.8])
    epsilon = {s["name"]: s["y"] for s in figures["epsilon"]["series"]}
    assert epsilon == {"dp-topk: example-level": [1.5, 3.0], "dp-topk: client-level": [2.0, 4.0]}
    cumulative = {s["name"]: s["y"] for s in figures["bytes_cumulative"]["series"]}
    assert cumulative["plain-lora: up"] == [200_000, 400_000, 600_000]
    assert cumulative["dp-topk: down"] == [8192, 16384]
    assert runs[1].ledger is not None and len(runs[1].ledger.events) == 6
