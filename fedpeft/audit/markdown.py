"""``report.md``: the report's tables and verdict in Markdown, figures linked as PNG files."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fedpeft.audit.cells import (
    captured_cell,
    captured_words,
    format_cell,
    secure_aggregation_line,
    shadow_training,
)


def _cell(value: Any, missing: str = "∞") -> str:
    return format_cell(value, missing=missing).replace("|", "\\|")


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return [*lines, ""]


def render_markdown(report: dict[str, Any], figure_paths: Mapping[str, str]) -> str:
    """The report as Markdown; ``figure_paths`` maps figure ids to relative PNG paths."""
    s = report["settings"]
    variants = report["variants"]
    out = [
        "# Privacy audit",
        "",
        f"fedpeft {report['fedpeft_version']}, config `{report['config_fingerprint']}`, {report['created']}. "
        f"{s['model']} ({s['task']}), {s['clients']} clients x {s['rounds']} rounds x "
        f"{s['local_steps']} local "
        f"steps of batch {s['batch_size']}. Planted in client(s) {', '.join(map(str, s['audit_clients']))}: "
        f"{s['canaries']} canaries (x{s['canary_repetitions']}), "
        f"{s['membership_examples']} membership examples; "
        f"{s['shadow_models']} shadow models ({shadow_training(s)}).",
        "",
    ]
    for flag in report["flags"]:
        out += [f"> **⚠ {flag['variant']}: {flag['message']}**", ""]

    def figure(figure_id: str, alt: str) -> None:
        if figure_id in figure_paths:
            out.extend([f"![{alt}]({figure_paths[figure_id]})", ""])

    out += ["## Verdict", "", report["verdict"]["summary"], ""]
    for v in report["verdict"]["variants"]:
        out += [
            f"**{v['variant']}: {v['level']} risk.** {v['guarantee'].capitalize()}. "
            f"{'. '.join(v['reasons'])}.",
            "",
        ]
        out += [f"- {tip}" for tip in v["recommendations"]] + [""]

    out += ["## 1. Guarantees", ""]
    rows = []
    for v in variants:
        for unit in v["guarantees"]["units"] or [None]:
            if unit is None:
                rows.append([v["name"], "none", "-", "-", None, v["utility"]["accuracy"]])
            else:
                rows.append(
                    [
                        v["name"],
                        unit["unit"],
                        unit["accountant"],
                        f"{unit['delta']:g}",
                        unit["epsilon_max"],
                        v["utility"]["accuracy"],
                    ]
                )
    out += _table(
        ["variant", "unit", "accountant", "delta", "epsilon (max over clients)", "test accuracy"], rows
    )
    for v in variants:
        out += [f"Assumptions ({v['name']}):", ""] + [f"- {a}" for a in v["guarantees"]["assumptions"]] + [""]
    figure("epsilon_over_rounds", "epsilon over rounds")

    out += ["## 2. Attacks on captured updates", ""]
    for v in variants:
        attacks = v["attacks"]
        if line := secure_aggregation_line(v):
            out += [line, ""]
        if attacks["status"] != "ran":
            out += [f"{v['name']}: {attacks['attack']} not run: {attacks['reason']}.", ""]
            continue
        out += _table(
            ["variant", "round", "client", "batch", "token P", "token R", "ROUGE-L", "secrets"],
            [
                [
                    v["name"],
                    o["round"],
                    captured_cell(o),
                    o["batch_size"],
                    o["token_precision"],
                    o["token_recall"],
                    o["rougeL"],
                    _cell(o["pii_recovery_rate"], missing="-"),
                ]
                for o in attacks["outcomes"]
            ],
        )
        for e in attacks["examples"]:
            out += [
                f"- round {e['round']} {captured_words(e)}: true `{e['true']}`, recovered `{e['recovered']}`"
            ]
        out += [""]

    out += ["## 3. Canary exposure", ""]
    out += _table(
        [
            "variant",
            "canaries",
            "inserted",
            "copies",
            "max possible",
            "mean (inserted)",
            "max (inserted)",
            "mean (never inserted)",
        ],
        [
            [
                v["name"],
                c["count"],
                c["included"],
                c["repetitions"],
                c["max_exposure"],
                c["mean_exposure_included"],
                c["max_exposure_included"],
                c["mean_exposure_excluded"],
            ]
            for v in variants
            if (c := v["canaries"])
        ],
    )
    figure("exposure_histogram", "exposure histogram")

    out += ["## 4. Membership inference", ""]
    out += _table(
        ["variant", "attack", "members", "non-members", "AUC", "TPR @ 0.1 % FPR", "TPR @ 1 % FPR"],
        [
            [
                v["name"],
                a["name"],
                m["members"],
                m["non_members"],
                a["auc"],
                a["tpr_at_fpr"]["0.001"],
                a["tpr_at_fpr"]["0.01"],
            ]
            for v in variants
            if (m := v["membership"])
            for a in m["attacks"]
        ],
    )
    figure("roc_curves", "ROC curves")
    figure("attack_vs_epsilon", "attack vs epsilon")
    figure("attack_vs_batch_size", "attack vs batch size")

    out += ["## 5. Empirical epsilon lower bound", ""]
    out += _table(
        ["variant", "source", "score", "m", "guesses +/-", "correct", "lower bound", "reported", "check"],
        [
            [
                v["name"],
                b["source"],
                b["score"],
                b["m"],
                f"{b['k_plus']}/{b['k_minus']}",
                b["correct"],
                b["epsilon_lower_bound"],
                b["reported_epsilon"],
                "VIOLATED" if b["violation"] else "ok",
            ]
            for v in variants
            for b in v["one_run"]
        ],
    )
    return "\n".join(out) + "\n"
