"""End to end: `fedpeft audit` with a ``secagg`` variant runs its federation under Flower's
SecAgg+ in a real simulation, attacks the rounds' sums it captured and labels them in the report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import tomli_w

from fedpeft.audit.report import validate_report
from tests.conftest import tiny_config

pytestmark = pytest.mark.slow


def test_a_secagg_variant_is_audited_on_the_sums_the_server_saw(
    tmp_path: Path, tiny_bert_dir: Path, sentiment_files: dict[str, Path]
) -> None:
    config = tiny_config(tiny_bert_dir, sentiment_files)
    config["train"] = {"steps": 2, "batch_size": 4, "lr": 5e-3}
    config["capture"] = {"rounds": [2], "clients": [0]}  # the variant drops the client: sums only
    config["attack"] = {"name": "token_set", "show_examples": 1}
    config["audit"] = {
        "canaries": 4,
        "references": 50,
        "membership_examples": 20,
        "clients": [0],
        "shadow_models": 0,
        "compare": ["secagg"],
    }
    path = tmp_path / "audit.toml"
    path.write_text(tomli_w.dumps(config), encoding="utf-8")
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "fedpeft.cli", "audit", "--config", str(path), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    captures = sorted(p.name for p in (out / "runs" / "secagg" / "captures").iterdir())
    assert captures == ["round-0002-sum.safetensors"]
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    validate_report(report)
    [variant] = report["variants"]
    assert variant["secure_aggregation"] and variant["name"] == "secagg"
    [outcome] = variant["attacks"]["outcomes"]
    # All three clients train every round; the sum is scored on their three batches of 4.
    assert outcome["sum"] and outcome["client"] == -1 and outcome["clients"] == [0, 1, 2]
    assert outcome["sequences"] == 3 * 2 * 4
    assert variant["membership"]["members"] > 0 and variant["canaries"]["count"] == 4
    markdown = (out / "report.md").read_text(encoding="utf-8")
    assert "secagg runs under secure aggregation (SecAgg+)" in markdown and "sum 0+1+2" in markdown
