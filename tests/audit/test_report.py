"""The report writers and the verdict on reports assembled from real parts (a real
privacy ledger, real ROC and one-run computations), without training anything."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import datasets
import jsonschema
import pytest

from fedpeft.audit.guarantees import example_epsilon, guarantees_section
from fedpeft.audit.measure import membership_section, one_run_section
from fedpeft.audit.plan import AuditPlan
from fedpeft.audit.report import build_report, validate_report, write_report
from fedpeft.audit.shadows import ShadowLosses, shadow_halves
from fedpeft.audit.verdict import variant_verdict
from fedpeft.config import Config, parse_config
from fedpeft.privacy.ledger import SERVER, DpEvent, PrivacyLedger, epsilon_of


def _config(dp: bool) -> Config:
    privacy = {"example": {"enabled": True, "target_epsilon": 8.0}} if dp else {}
    return parse_config(
        {
            "partition": {"scheme": "iid", "num_clients": 2},
            "federation": {"rounds": 2},
            "privacy": privacy,
            "audit": {"membership_examples": 60, "clients": [0, 1], "compare": ["none", "example:8"]},
        }
    )


def _plan() -> AuditPlan:
    train = datasets.Dataset.from_dict(
        {"text": [f"row {i}" for i in range(200)], "label": [i % 2 for i in range(200)]}
    )
    return AuditPlan.build(_config(False).audit, train, seed=0, num_labels=2)


def _variant(config: Config, name: str, leak: float, ledger: PrivacyLedger) -> dict[str, Any]:
    """A variant whose target model gives members ``leak`` lower losses."""
    plan = _plan()
    rng = random.Random(1)
    losses = [0.7 - leak * e.included + rng.gauss(0, 0.05) for e in plan.examples]
    masks = shadow_halves(2, len(plan.examples), seed=0)
    shadows = ShadowLosses(
        losses=[[0.7 - 0.3 * inside + rng.gauss(0, 0.05) for inside in mask] for mask in masks],
        included=masks,
        steps=10,
    )
    membership = membership_section(plan, losses, shadows)
    guarantees = guarantees_section(config, ledger, [100, 120])
    reported = example_epsilon(guarantees, [0, 1])
    one_run = one_run_section(membership, None, reported, 1e-5, 0.95)
    assert membership is not None
    return {
        "name": name,
        "spec": "none" if reported is None else "example:8",
        "config_fingerprint": config.fingerprint(),
        "run_dir": "runs/" + name,
        "seconds": 1.0,
        "utility": {"accuracy": 0.8, "loss": 0.5, "initial_accuracy": 0.5},
        "batch_size": 16,
        "reported_example_epsilon": reported,
        "guarantees": guarantees,
        "canaries": None,
        "membership": {k: v for k, v in membership.items() if k not in ("scores", "included")},
        "one_run": one_run,
        "attacks": {
            "status": "skipped",
            "attack": "sequence_assembly",
            "reason": "no [capture] rounds configured",
        },
    }


def _ledger(sigma: float) -> PrivacyLedger:
    ledger = PrivacyLedger()
    for server_round in (1, 2):
        for client in ("0", "1"):
            ledger.record(DpEvent(server_round, client, "example", sigma, 0.1, 30))
    return ledger


def test_guarantees_come_from_the_ledger() -> None:
    ledger = _ledger(1.0)
    section = guarantees_section(_config(True), ledger, [100, 120])
    [unit] = section["units"]
    assert unit["unit"] == "example" and unit["accountant"] == "rdp"
    first_round = epsilon_of(ledger.select("0", "example")[:1], 1e-5)
    both_rounds = epsilon_of(ledger.select("0", "example"), 1e-5)
    assert unit["epsilon_by_round"]["0"] == pytest.approx([first_round, both_rounds])
    assert unit["epsilon_max"] == pytest.approx(both_rounds)
    assert example_epsilon(section, [0, 1]) == pytest.approx(both_rounds)
    assert any("Poisson" in a for a in section["assumptions"])
    plain = guarantees_section(_config(False), PrivacyLedger(), [100, 120])
    assert plain["units"] == [] and example_epsilon(plain, [0]) is None


def test_report_validates_and_writes_all_three_files(tmp_path: Path) -> None:
    config = _config(False)
    variants = [
        _variant(config, "none", 0.4, PrivacyLedger()),
        _variant(_config(True), "example-eps-8", 0.0, _ledger(1.0)),
    ]
    report = build_report(config, variants)
    validate_report(report)
    written = write_report(report, tmp_path)
    assert {p.name for p in written} >= {"report.json", "report.html", "report.md", "roc_curves.png"}
    again = json.loads((tmp_path / "report.json").read_text(encoding="utf-8"))
    assert again["variants"][0]["membership"]["attacks"][0]["auc"] > 0.9
    verdicts = {v["variant"]: v["level"] for v in again["verdict"]["variants"]}
    assert verdicts == {"none": "high", "example-eps-8": "low"}
    html = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert html.startswith("<!DOCTYPE html>") and html.count("data:image/png;base64,") == len(
        report["figures"]
    )
    assert "class='flag'" not in html


def test_a_bound_above_the_reported_epsilon_is_flagged_loudly(tmp_path: Path) -> None:
    # A "private" variant whose members are obvious: the audit proves more than epsilon 0.05.
    config = _config(True)
    variant = _variant(config, "example-eps-8", 0.4, _ledger(40.0))
    [bound] = variant["one_run"]
    assert bound["reported_epsilon"] < bound["epsilon_lower_bound"] and bound["violation"]
    report = build_report(config, [variant])
    assert report["verdict"]["variants"][0]["level"] == "violation"
    [flag] = report["flags"]
    assert flag["level"] == "error" and "bug" in flag["message"]
    write_report(report, tmp_path)
    assert "class='flag'" in (tmp_path / "report.html").read_text(encoding="utf-8")
    assert "VIOLATED" in (tmp_path / "report.md").read_text(encoding="utf-8")


def test_user_level_dp_is_told_it_does_not_protect_against_the_server() -> None:
    config = parse_config(
        {
            "partition": {"scheme": "iid", "num_clients": 2},
            "federation": {"rounds": 2},
            "privacy": {"client": {"enabled": True, "noise_multiplier": 0.8}},
            "audit": {"membership_examples": 60, "clients": [0, 1], "compare": ["client:50"]},
        }
    )
    ledger = PrivacyLedger()
    for server_round in (1, 2):
        ledger.record(DpEvent(server_round, SERVER, "client", 0.8, 1.0, 1))
    variant = _variant(config, "client-eps-50", 0.4, ledger)
    assert [unit["unit"] for unit in variant["guarantees"]["units"]] == ["client"]
    [verdict] = build_report(config, [variant])["verdict"]["variants"]
    assert verdict["level"] == "high"
    assert any("not against the server" in tip for tip in verdict["recommendations"])
    assert not any("privacy.example.target_epsilon" in tip for tip in verdict["recommendations"])


def test_schema_rejects_broken_reports() -> None:
    config = _config(False)
    report = build_report(config, [_variant(config, "none", 0.4, PrivacyLedger())])
    for breaks in (
        lambda r: r.pop("config_fingerprint"),
        lambda r: r["variants"][0].update(spec="secagg+none"),
        lambda r: r["variants"][0].update(spec="client"),
        lambda r: r["figures"].clear(),
        lambda r: r["verdict"]["variants"][0].update(level="fine"),
    ):
        broken = json.loads(json.dumps(report))
        breaks(broken)
        with pytest.raises(jsonschema.ValidationError):
            validate_report(broken)
    report["variants"][0]["utility"]["loss"] = float("inf")
    with pytest.raises(ValueError):
        validate_report(report)


def test_a_verdict_names_the_rule_that_set_it_and_ignores_a_chance_tpr() -> None:
    # AUC at chance, but 6.2 % of members found at 1 % false positives (chance: p ~ 4e-4):
    # "moderate", and the reasons must say why (they named only the AUC before).
    membership = {
        "members": 195,
        "non_members": 205,
        "auc_null_std": 0.029,
        "attacks": [{"name": "loss", "auc": 0.52, "tpr_at_fpr": {"0.001": 0.0, "0.01": 12 / 195}}],
    }
    variant = {"name": "v", "membership": membership, "one_run": [], "canaries": None}
    variant["guarantees"] = {"dp": True, "units": [{"unit": "example"}]}
    verdict = variant_verdict(variant)
    assert verdict["level"] == "moderate"
    assert any("6.2 % of the members" in reason for reason in verdict["reasons"]), verdict["reasons"]
    # 6 members (3.1 %) at 2 false positives: chance does that in 13 % of runs.
    membership["attacks"][0]["tpr_at_fpr"]["0.01"] = 6 / 195
    verdict = variant_verdict(variant)
    assert verdict["level"] == "low" and not any("false positives" in r for r in verdict["reasons"])


def test_a_secure_aggregation_variant_is_labelled_and_its_attacks_shown_on_sums(tmp_path: Path) -> None:
    from fedpeft.audit.variants import variant_config

    config = variant_config(_config(False), "secagg")
    variant = _variant(config, "secagg", 0.4, PrivacyLedger())
    row = {"round": 2, "client": -1, "clients": [0, 1], "sum": True, "threat_model": "fedavg"}
    row |= {"batch_size": 16, "sequences": 32, "seconds": 1.0, "token_precision": 0.5, "token_recall": 0.25}
    row |= {
        "rouge1": 0.3,
        "rouge2": 0.1,
        "rougeL": 0.2,
        "exact_sequence_rate": 0.0,
        "pii_recovery_rate": None,
    }
    variant |= {
        "spec": "secagg",
        "secure_aggregation": True,
        "attacks": {
            "status": "ran",
            "attack": "token_set",
            "reason": None,
            "outcomes": [row],
            "worst": [{"round": 2, "client": -1, "clients": [0, 1], "sum": True}],
            "examples": [
                {"round": 2, "client": -1, "clients": [0, 1], "sum": True, "true": "a", "recovered": "b"}
            ],
        },
    }
    plain = _variant(_config(False), "none", 0.4, PrivacyLedger())
    report = build_report(config, [plain, variant])
    validate_report(report)
    write_report(report, tmp_path)
    assert any("Secure aggregation" in a for a in variant["guarantees"]["assumptions"])
    assert not any("Secure aggregation" in a for a in plain["guarantees"]["assumptions"])
    markdown = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert "secagg runs under secure aggregation (SecAgg+)" in markdown
    assert "(sums of 2 updates)" in markdown and "none runs under" not in markdown
    assert "| secagg | 2 | sum 0+1 | 16 |" in markdown
    assert "round 2 the sum of clients 0+1: true `a`" in markdown
    html = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert "token_set on 1 captured sum(s)" in html and ">sum 0+1</td>" in html
    assert "round 2 the sum of clients 0+1" in html
