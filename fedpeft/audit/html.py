"""``report.html``: one self-contained page (inline CSS, figures as base64 PNG, no scripts)."""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from html import escape
from typing import Any

from fedpeft.audit.cells import (
    captured_cell,
    captured_words,
    format_cell,
    secure_aggregation_line,
    shadow_training,
)

PAGE_CSS = """
body{font-family:-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;max-width:1100px;margin:24px auto;
padding:0 20px;color:#1d2430;background:#fff;line-height:1.45}
h1{font-size:26px;margin-bottom:4px}h2{border-bottom:2px solid #d8dee8;padding-bottom:4px;margin-top:34px}
.meta{color:#5a6577;font-size:13px}table{border-collapse:collapse;margin:10px 0;font-size:14px}
th,td{border:1px solid #d8dee8;padding:4px 9px;text-align:right}th{background:#f1f4f9}
td.l,th.l{text-align:left}.flag{background:#b3001b;color:#fff;padding:14px 18px;border-radius:6px;
font-size:17px;font-weight:600;margin:14px 0}.level{display:inline-block;padding:2px 10px;border-radius:10px;
color:#fff;font-weight:600}.low{background:#2e7d32}.moderate{background:#c77700}.high{background:#c62828}
.violation{background:#6a0014}.verdict{background:#f6f8fb;border-left:5px solid #3c5a99;padding:10px 16px;
margin:10px 0}img{max-width:100%;border:1px solid #e3e7ee;margin:6px 0}
code{background:#f1f4f9;padding:1px 4px}
.note{color:#5a6577;font-size:13px}.grid{display:flex;flex-wrap:wrap;gap:12px}.grid>div{flex:1 1 480px}
"""


def html_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], left: int = 1) -> str:
    """A table, every cell escaped; the first ``left`` columns (names) align left, numbers right."""
    head = "".join(
        f"<th class='l'>{escape(h)}</th>" if i < left else f"<th>{escape(h)}</th>"
        for i, h in enumerate(headers)
    )
    body = "".join(
        "<tr>"
        + "".join(
            f"<td class='l'>{escape(str(c))}</td>" if i < left else f"<td>{escape(str(c))}</td>"
            for i, c in enumerate(row)
        )
        + "</tr>"
        for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def embedded_png(png: bytes, alt: str) -> str:
    """An ``<img>`` carrying the PNG itself (base64), so the page needs no other file."""
    data = base64.b64encode(png).decode("ascii")
    return f"<img alt='{escape(alt)}' src='data:image/png;base64,{data}'>"


def _image(pngs: Mapping[str, bytes], figure_id: str, alt: str) -> str:
    if figure_id not in pngs:
        return ""
    return embedded_png(pngs[figure_id], alt)


def render_html(report: dict[str, Any], pngs: Mapping[str, bytes]) -> str:
    """The report as one HTML page; ``pngs`` maps figure ids to PNG bytes."""
    s = report["settings"]
    variants = report["variants"]
    out = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<title>fedpeft privacy audit</title>",
        f"<style>{PAGE_CSS}</style></head><body>",
        "<h1>Privacy audit</h1>",
        f"<p class='meta'>fedpeft {escape(report['fedpeft_version'])} · "
        f"config {escape(report['config_fingerprint'])} · "
        f"{escape(report['created'])}<br>{escape(s['model'])} ({escape(s['task'])}), {escape(s['adapter'])}, "
        f"{s['clients']} clients × {s['rounds']} rounds × {s['local_steps']} local steps of batch "
        f"{s['batch_size']}; "
        f"codec {escape(s['codec'])}, aggregator {escape(s['aggregator'])}. Planted in client(s) "
        f"{escape(', '.join(map(str, s['audit_clients'])))}: {s['canaries']} canaries "
        f"(×{s['canary_repetitions']} each when inserted), {s['membership_examples']} membership examples; "
        f"{s['shadow_models']} shadow models ({escape(shadow_training(s))}).</p>",
    ]
    for flag in report["flags"]:
        out.append(f"<div class='flag'>⚠ {escape(flag['variant'])}: {escape(flag['message'])}</div>")

    out.append("<h2>Verdict</h2>")
    out.append(f"<p>{escape(report['verdict']['summary'])}</p>")
    for verdict in report["verdict"]["variants"]:
        level = verdict["level"]
        out.append(
            f"<div class='verdict'><b>{escape(verdict['variant'])}</b> "
            f"<span class='level {level}'>{level} risk</span>"
            f"<p>{escape(verdict['guarantee'].capitalize())}. "
            + escape(". ".join(verdict["reasons"]))
            + ".</p><p><b>What would lower it:</b></p><ul>"
            + "".join(f"<li>{escape(t)}</li>" for t in verdict["recommendations"])
            + "</ul></div>"
        )

    out.append("<h2>1. Guarantees</h2>")
    out.append(
        "<p class='note'>The epsilon each variant's privacy ledger reports (computed from the recorded DP "
        "events, per client, cumulative over rounds), the unit it protects and the accountant.</p>"
    )
    rows = []
    for v in variants:
        units = v["guarantees"]["units"]
        if not units:
            rows.append([v["name"], "none", "–", "–", "–", "∞", f"{v['utility']['accuracy']:.3f}"])
        for unit in units:
            noise = sorted(unit["noise_multiplier"].values())
            rows.append(
                [
                    v["name"],
                    unit["unit"],
                    unit["accountant"],
                    f"{unit['delta']:g}",
                    f"{noise[0]:.3f}..{noise[-1]:.3f}" if noise else "–",
                    format_cell(unit["epsilon_max"], 2),
                    f"{v['utility']['accuracy']:.3f}",
                ]
            )
    out.append(
        html_table(
            ["variant", "unit", "accountant", "delta", "noise multiplier", "epsilon (max)", "test accuracy"],
            rows,
        )
    )
    for v in variants:
        for unit in v["guarantees"]["units"]:
            per_client = [
                [c, *(format_cell(e, 2) for e in values)] for c, values in unit["epsilon_by_round"].items()
            ]
            rounds = len(next(iter(unit["epsilon_by_round"].values()), []))
            out.append(
                f"<p><b>{escape(v['name'])}</b>: {escape(unit['unit'])}-level epsilon per party and round</p>"
            )
            out.append(html_table(["client", *(f"round {r}" for r in range(1, rounds + 1))], per_client))
    for v in variants:
        out.append(f"<p><b>Assumptions ({escape(v['name'])})</b></p><ul>")
        out.extend(f"<li>{escape(a)}</li>" for a in v["guarantees"]["assumptions"])
        out.append("</ul>")
    out.append(_image(pngs, "epsilon_over_rounds", "epsilon over rounds"))

    out.append("<h2>2. Attacks on captured updates</h2>")
    for v in variants:
        attacks = v["attacks"]
        if line := secure_aggregation_line(v):
            out.append(f"<p class='note'>{escape(line)}</p>")
        if attacks["status"] != "ran":
            out.append(
                f"<p><b>{escape(v['name'])}</b>: {escape(attacks['attack'])} not run: "
                f"{escape(attacks['reason'])}.</p>"
            )
            continue
        out.append(
            f"<p><b>{escape(v['name'])}</b>: {escape(attacks['attack'])} on "
            f"{len(attacks['outcomes'])} captured {'sum' if v.get('secure_aggregation') else 'update'}(s)</p>"
        )
        out.append(
            html_table(
                [
                    "round",
                    "client",
                    "threat",
                    "batch",
                    "token P",
                    "token R",
                    "ROUGE-1",
                    "ROUGE-L",
                    "exact",
                    "secrets",
                ],
                [
                    [
                        o["round"],
                        captured_cell(o),
                        o["threat_model"],
                        o["batch_size"],
                        f"{o['token_precision']:.3f}",
                        f"{o['token_recall']:.3f}",
                        f"{o['rouge1']:.3f}",
                        f"{o['rougeL']:.3f}",
                        f"{o['exact_sequence_rate']:.3f}",
                        format_cell(o["pii_recovery_rate"], missing="–"),
                    ]
                    for o in attacks["outcomes"]
                ],
                left=3,
            )
        )
        worst = ", ".join(f"round {w['round']} {captured_words(w)}" for w in attacks["worst"])
        out.append(f"<p>Worst cases (highest token recall): {escape(worst)}.</p>")
        for example in attacks["examples"]:
            out.append(
                f"<p class='note'>round {example['round']} {captured_words(example)}<br>true: "
                f"<code>{escape(example['true'])}</code><br>"
                f"recovered: <code>{escape(example['recovered'])}</code></p>"
            )

    out.append("<h2>3. Canary exposure</h2>")
    out.append(
        "<p class='note'>Random secrets (<code>my secret code is d d d d d d</code>) inserted into the audit "
        "clients' data, each with probability 1/2. Exposure = log2 |R| − log2 rank of the canary's loss "
        "among never-inserted candidates R (Carlini et al., The Secret Sharer, 2019): about 1.4 bits for a "
        "secret the "
        "model has not memorised, log2 |R| for one it ranks first.</p>"
    )
    rows = []
    for v in variants:
        c = v["canaries"]
        if c:
            rows.append(
                [
                    v["name"],
                    c["count"],
                    c["included"],
                    c["repetitions"],
                    c["references"],
                    f"{c['max_exposure']:.2f}",
                    format_cell(c["mean_exposure_included"], 2, "–"),
                    format_cell(c["max_exposure_included"], 2, "–"),
                    format_cell(c["mean_exposure_excluded"], 2, "–"),
                ]
            )
    out.append(
        html_table(
            [
                "variant",
                "canaries",
                "inserted",
                "copies",
                "references",
                "max possible",
                "mean (inserted)",
                "max (inserted)",
                "mean (never inserted)",
            ],
            rows,
        )
    )
    for v in variants:
        c = v["canaries"]
        if c:
            top = sorted(c["items"], key=lambda i: -i["exposure"])[:5]
            out.append(
                f"<p><b>{escape(v['name'])}</b>: most exposed canaries"
                f"{'' if c['secrets_shown'] else ' (secrets masked; --show-secrets shows them)'}</p>"
            )
            out.append(
                html_table(
                    ["canary", "label", "inserted", "loss", "exposure", "extrapolated"],
                    [
                        [
                            i["text"],
                            format_cell(i["label"], missing="–"),
                            format_cell(i["included"]),
                            f"{i['loss']:.4f}",
                            f"{i['exposure']:.2f}",
                            format_cell(i["extrapolated_exposure"], 2, "–"),
                        ]
                        for i in top
                    ],
                )
            )
    out.append(_image(pngs, "exposure_histogram", "exposure histogram"))

    out.append("<h2>4. Membership inference</h2>")
    out.append(
        "<p class='note'>Held-out examples, each put into training with probability 1/2. "
        "<i>loss</i>: a lower loss means member (Yeom et al., 2018). <i>lira_online/offline</i>: "
        "the target's confidence against Gaussians fitted to shadow adapters trained with and "
        "without each example (Carlini et al., 2022). AUC 0.5 is chance; the true positive rate at "
        "0.1 % and 1 % false positives is what a confident attacker achieves (with n non-members "
        "the smallest false positive rate is 1/n).</p>"
    )
    rows = []
    for v in variants:
        m = v["membership"]
        if m:
            for a in m["attacks"]:
                rows.append(
                    [
                        v["name"],
                        a["name"],
                        m["members"],
                        m["non_members"],
                        f"{a['auc']:.3f}",
                        f"{100 * a['tpr_at_fpr']['0.001']:.1f} %",
                        f"{100 * a['tpr_at_fpr']['0.01']:.1f} %",
                    ]
                )
    out.append(
        html_table(
            ["variant", "attack", "members", "non-members", "AUC", "TPR @ 0.1 % FPR", "TPR @ 1 % FPR"],
            rows,
            left=2,
        )
    )
    out.append(
        "<div class='grid'><div>"
        + _image(pngs, "roc_curves", "ROC curves")
        + "</div><div>"
        + _image(pngs, "attack_vs_epsilon", "attack vs epsilon")
        + "</div><div>"
        + _image(pngs, "attack_vs_batch_size", "attack vs batch size")
        + "</div></div>"
    )

    out.append("<h2>5. Empirical epsilon lower bound</h2>")
    out.append(
        "<p class='note'>One-run auditing (Steinke, Nasr, Jagielski, 2023): guess the "
        "highest-scoring audit examples in and the lowest out; if training were (epsilon, delta)-DP, "
        "that many correct guesses would be unlikely for any epsilon below the bound (at the stated "
        "confidence). A bound <b>above</b> the reported epsilon means a bug or a broken assumption. "
        "Canaries inserted r times are compared with group privacy's r·epsilon.</p>"
    )
    rows = []
    for v in variants:
        for b in v["one_run"]:
            rows.append(
                [
                    v["name"],
                    b["source"],
                    b["score"],
                    b["m"],
                    f"{b['k_plus']}/{b['k_minus']}",
                    b["correct"],
                    format_cell(b["epsilon_lower_bound"], 2),
                    format_cell(b["reported_epsilon"], 2),
                    f"{100 * b['confidence']:.0f} %",
                    "VIOLATED" if b["violation"] else "ok",
                ]
            )
    out.append(
        html_table(
            [
                "variant",
                "source",
                "score",
                "m",
                "guesses +/−",
                "correct",
                "lower bound",
                "reported",
                "confidence",
                "check",
            ],
            rows,
            left=3,
        )
    )
    out.append("<p class='note'>report.json holds every number and every figure's data.</p></body></html>")
    return "\n".join(out)
