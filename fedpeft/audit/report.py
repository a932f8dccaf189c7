"""Assemble the audit report's data and write ``report.json``, ``report.html`` and ``report.md``.

``report.json`` is the record: every number and every figure's data, the fedpeft
version and the config's hash, validated against :data:`fedpeft.audit.schema.REPORT_SCHEMA`
before anything is written. The HTML and Markdown files are views of it.
"""

from __future__ import annotations

import datetime
import json
import math
from pathlib import Path
from typing import Any

import jsonschema

import fedpeft
from fedpeft.audit.figures import Figure, figure, histogram_counts, histogram_edges
from fedpeft.audit.schema import REPORT_SCHEMA
from fedpeft.audit.verdict import overall_verdict
from fedpeft.config import Config


def _epsilon_figure(variants: list[dict[str, Any]]) -> Figure:
    series = []
    for variant in variants:
        for unit in variant["guarantees"]["units"]:
            by_round = list(unit["epsilon_by_round"].values())
            if not by_round:
                continue
            rounds = list(range(1, len(by_round[0]) + 1))
            worst = [max((v[r - 1] for v in by_round if v[r - 1] is not None), default=None) for r in rounds]
            series.append(
                {"name": f"{variant['name']} ({unit['unit']}, max over clients)", "x": rounds, "y": worst}
            )
    return figure("epsilon_over_rounds", "Reported epsilon over rounds", "line", "round", "epsilon", series)


def _roc_figure(variants: list[dict[str, Any]]) -> Figure:
    series: list[dict[str, Any]] = []
    for variant in variants:
        membership = variant.get("membership")
        for attack in (membership or {}).get("attacks", []):
            if attack["name"] == "lira_offline":
                continue
            series.append({"name": f"{variant['name']}: {attack['name']}", **_roc_xy(attack["roc"])})
    series.append(
        {"name": "chance", "x": [1e-3, 1.0], "y": [1e-3, 1.0], "style": {"linestyle": ":", "color": "grey"}}
    )
    return figure(
        "roc_curves",
        "Membership inference ROC (log-log)",
        "line",
        "false positive rate",
        "true positive rate",
        series,
        "log",
        "log",
    )


def _roc_xy(roc: dict[str, list[float]]) -> dict[str, list[float]]:
    return {"x": roc["fpr"], "y": roc["tpr"]}


def _exposure_figure(variants: list[dict[str, Any]]) -> Figure:
    series = []
    highs = [v["canaries"]["max_exposure"] for v in variants if v.get("canaries")]
    edges = histogram_edges([], 20, max(highs, default=1.0))
    for variant in variants:
        canaries = variant.get("canaries")
        if not canaries:
            continue
        for included, label in ((True, "inserted"), (False, "never inserted")):
            values = [i["exposure"] for i in canaries["items"] if i["included"] == included]
            series.append(
                {"name": f"{variant['name']}: {label}", "x": edges, "y": histogram_counts(values, edges)}
            )
    return figure("exposure_histogram", "Canary exposure", "stairs", "exposure (bits)", "canaries", series)


def _epsilon_text(epsilon: float | None) -> str:
    return "∞" if epsilon is None else format(epsilon, ".2g")


def _versus_epsilon_figure(variants: list[dict[str, Any]]) -> Figure:
    ordered = sorted(
        variants,
        key=lambda v: -math.inf if v["reported_example_epsilon"] is None else -v["reported_example_epsilon"],
    )
    labels = [f"{v['name']} (eps {_epsilon_text(v['reported_example_epsilon'])})" for v in ordered]
    names = sorted({a["name"] for v in ordered for a in (v.get("membership") or {}).get("attacks", [])})
    series: list[dict[str, Any]] = []
    for name in names:
        aucs = []
        for v in ordered:
            found = [a["auc"] for a in (v.get("membership") or {}).get("attacks", []) if a["name"] == name]
            aucs.append(found[0] if found else None)
        series.append({"name": f"AUC {name}", "x": labels, "y": aucs})
    exposure = []
    for v in ordered:
        canaries = v.get("canaries")
        exposure.append(
            None
            if not canaries or canaries["mean_exposure_included"] is None
            else canaries["mean_exposure_included"] / canaries["max_exposure"]
        )
    series.append(
        {
            "name": "inserted canaries' mean exposure / max",
            "x": labels,
            "y": exposure,
            "style": {"linestyle": "--"},
        }
    )
    return figure(
        "attack_vs_epsilon",
        "Attack success against the reported epsilon",
        "category",
        "variant (reported per-example epsilon)",
        "AUC / normalised exposure",
        series,
    )


def _versus_batch_figure(variants: list[dict[str, Any]]) -> Figure:
    """Best membership AUC and token recall against the local batch size, one line per privacy setting.

    Variants differ in batch size only through ``@<batch_size>`` in ``audit.compare``;
    with one batch size each line is a single point.
    """
    groups: dict[str, list[dict[str, Any]]] = {}
    for v in variants:
        groups.setdefault(v["spec"].partition("@")[0], []).append(v)
    series: list[dict[str, Any]] = []
    for privacy, members in groups.items():
        members = sorted(members, key=lambda v: v["batch_size"])
        sizes = [v["batch_size"] for v in members]
        aucs = [
            max((a["auc"] for a in (v.get("membership") or {}).get("attacks", [])), default=None)
            for v in members
        ]
        series.append(
            {"name": f"{privacy}: best membership AUC", "x": sizes, "y": aucs, "style": {"marker": "o"}}
        )
        recalls = [
            max((o["token_recall"] for o in (v.get("attacks") or {}).get("outcomes", [])), default=None)
            for v in members
        ]
        if any(r is not None for r in recalls):
            series.append(
                {
                    "name": f"{privacy}: token recall (attack)",
                    "x": sizes,
                    "y": recalls,
                    "style": {"marker": "s"},
                }
            )
    return figure(
        "attack_vs_batch_size",
        "Attack success against the local batch size",
        "line",
        "batch size (train.batch_size)",
        "AUC / token recall",
        series,
    )


def flags_of(variants: list[dict[str, Any]], verdict: dict[str, Any]) -> list[dict[str, Any]]:
    """One error flag per variant whose verdict is a violation (bound above the reported epsilon)."""
    return [
        {"level": "error", "variant": v["name"], "message": judged["reasons"][0]}
        for v, judged in zip(variants, verdict["variants"], strict=True)
        if judged["level"] == "violation"
    ]


def refresh_verdict(report: dict[str, Any]) -> dict[str, Any]:
    """``report`` with its verdict and flags judged again from its measurements."""
    verdict = overall_verdict(report["variants"])
    return {**report, "verdict": verdict, "flags": flags_of(report["variants"], verdict)}


def build_report(config: Config, variants: list[dict[str, Any]]) -> dict[str, Any]:
    """The whole report as plain data (see :data:`REPORT_SCHEMA`)."""
    audit = config.audit
    figures = [
        _epsilon_figure(variants),
        _exposure_figure(variants),
        _roc_figure(variants),
        _versus_epsilon_figure(variants),
    ]
    figures.append(_versus_batch_figure(variants))
    verdict = overall_verdict(variants)
    return {
        "schema_version": 1,
        "fedpeft_version": fedpeft.__version__,
        "config_fingerprint": config.fingerprint(),
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "settings": {
            "model": config.model.name_or_path,
            "task": config.model.task,
            "adapter": config.adapter.method,
            "clients": config.partition.num_clients,
            "rounds": config.federation.rounds,
            "local_steps": config.train.steps,
            "batch_size": config.train.batch_size,
            "codec": config.federation.codec,
            "aggregator": config.federation.aggregator,
            "audit_clients": audit.clients,
            "canaries": audit.canaries,
            "canary_repetitions": audit.canary_repetitions,
            "references": audit.references,
            "membership_examples": audit.membership_examples,
            "shadow_models": audit.shadow_models,
            "shadow_training": audit.shadow_training,
            "confidence": audit.confidence,
            "compare": audit.compare,
        },
        "flags": flags_of(variants, verdict),
        "verdict": verdict,
        "variants": variants,
        "figures": figures,
    }


def validate_report(report: dict[str, Any]) -> None:
    """Raise ``jsonschema.ValidationError`` unless ``report`` matches the schema (and is strict JSON)."""
    json.dumps(report, allow_nan=False)
    jsonschema.Draft202012Validator(REPORT_SCHEMA).validate(report)


def write_report(report: dict[str, Any], out_dir: Path) -> list[Path]:
    """Validate, then write ``report.json``, ``report.html``, ``report.md`` and ``figures/*.png``."""
    from fedpeft.audit.figures import render_png
    from fedpeft.audit.html import render_html
    from fedpeft.audit.markdown import render_markdown

    validate_report(report)
    out_dir.mkdir(parents=True, exist_ok=True)
    pngs = {spec["id"]: render_png(spec) for spec in report["figures"]}
    figure_dir = out_dir / "figures"
    figure_dir.mkdir(exist_ok=True)
    written = []
    for name, data in pngs.items():
        path = figure_dir / f"{name}.png"
        path.write_bytes(data)
        written.append(path)
    targets = {
        "report.json": json.dumps(report, indent=2, allow_nan=False, ensure_ascii=False),
        "report.html": render_html(report, pngs),
        "report.md": render_markdown(report, {name: f"figures/{name}.png" for name in pngs}),
    }
    for name, text in targets.items():
        path = out_dir / name
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written
