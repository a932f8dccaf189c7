"""`fedpeft audit` turns bad input into one clear line before any federation runs, and
rewrites a report from its JSON."""

from pathlib import Path

import pytest
import tomli_w

from fedpeft.audit.report import build_report, write_report
from fedpeft.cli import main
from fedpeft.privacy.ledger import PrivacyLedger
from tests.audit.test_report import _config, _variant
from tests.conftest import tiny_config


def _audit(tmp_path: Path, config: dict, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    path = tmp_path / "audit.toml"
    path.write_text(tomli_w.dumps(config), encoding="utf-8")
    code = main(["audit", "--config", str(path), "--out", str(tmp_path / "out")])
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    ("audit", "message"),
    [
        ({}, "plant canaries or membership examples"),
        ({"membership_examples": 5000}, "audit.membership_examples = 5000"),
        (
            {"membership_examples": 20, "compare": ["example:0.001"]},
            "privacy.example.target_epsilon: client 0",
        ),
        ({"membership_examples": 20, "clients": [7]}, "audit.clients [7] outside"),
    ],
    ids=["nothing-planted", "too-many-held-out", "unreachable-epsilon", "unknown-client"],
)
def test_bad_audits_fail_before_training(
    tmp_path: Path,
    tiny_bert_dir: Path,
    sentiment_files: dict[str, Path],
    capsys: pytest.CaptureFixture[str],
    audit: dict,
    message: str,
) -> None:
    config = tiny_config(tiny_bert_dir, sentiment_files) | {"audit": audit}
    code, err = _audit(tmp_path, config, capsys)
    assert code == 2 and message in err, err
    assert not (tmp_path / "out" / "runs").exists()


def test_report_only_rewrites_the_views_from_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _config(False)
    write_report(build_report(config, [_variant(config, "none", 0.4, PrivacyLedger())]), tmp_path)
    (tmp_path / "report.html").unlink()
    (tmp_path / "report.md").unlink()
    assert main(["audit", "--out", str(tmp_path), "--report-only"]) == 0
    assert (tmp_path / "report.html").stat().st_size > 10_000
    assert "## 4. Membership inference" in (tmp_path / "report.md").read_text(encoding="utf-8")
