"""``fedpeft report``: runs side by side in one self-contained ``report.html`` plus its PNGs.

The page carries everything it shows (CSS inline, figures as base64 PNG, no scripts,
no links to other files), so it can be mailed or attached to an issue as one file; the
same figures are written beside it as ``figures/<id>.png`` for slides and papers.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from html import escape
from pathlib import Path

import fedpeft
from fedpeft.audit.cells import format_cell
from fedpeft.audit.figures import render_png
from fedpeft.audit.html import PAGE_CSS, embedded_png, html_table
from fedpeft.config import Config
from fedpeft.report.figures import FIGURE_TITLES, run_figures
from fedpeft.report.runs import RunFolder, load_runs, shown_path

_CSS = ".figures>div{flex:0 1 calc(50% - 6px)}"  # two a row, the last one no wider


@dataclass(frozen=True)
class WrittenReport:
    """What :func:`write_run_report` wrote."""

    html: Path
    figures: dict[str, Path]
    """Figure id -> its PNG file."""
    runs: list[RunFolder]


def write_run_report(folders: Sequence[Path], out_dir: Path) -> WrittenReport:
    """Read the run folders and write ``out_dir/report.html`` and ``out_dir/figures/*.png``.

    Raises:
        RunFolderError: A folder or its ``metrics.json`` is missing or unreadable.

    """
    runs = load_runs(folders)
    pngs = {spec["id"]: render_png(spec) for spec in run_figures(runs)}
    figure_dir = out_dir / "figures"
    figure_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for figure_id, png in pngs.items():
        written[figure_id] = figure_dir / f"{figure_id}.png"
        written[figure_id].write_bytes(png)
    html = out_dir / "report.html"
    html.write_text(render_run_report(runs, pngs), encoding="utf-8")
    return WrittenReport(html, written, runs)


def render_run_report(runs: Sequence[RunFolder], pngs: Mapping[str, bytes]) -> str:
    """The page; ``pngs`` maps every id of :data:`FIGURE_TITLES` to PNG bytes."""
    created = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    out = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>fedpeft runs: {escape(', '.join(run.label for run in runs))}</title>",
        f"<style>{PAGE_CSS}{_CSS}</style></head><body>",
        "<h1>Runs side by side</h1>",
        f"<p class='meta'>fedpeft {escape(fedpeft.__version__)} · {escape(created)} · "
        + escape(", ".join(f"{run.label} = {run.shown_path}" for run in runs))
        + "</p>",
    ]
    unfinished = [run.label for run in runs if run.status != "finished"]
    if unfinished:
        out.append(
            "<p class='note'>Not finished (their lines stop at their last completed round): "
            + escape(", ".join(unfinished))
            + ".</p>"
        )
    out.append("<h2>Settings</h2>")
    out.append(
        html_table(_SETTINGS_HEADERS, [_settings_row(run) for run in runs], left=len(_SETTINGS_HEADERS))
    )
    out.append("<h2>Final metrics</h2>")
    out.append(
        "<p class='note'>After the last completed round: the central test evaluation, traffic summed "
        "over rounds, and the epsilon the run's privacy ledger had spent (example-level: the most any "
        "client spent).</p>"
    )
    out.append(html_table(_FINAL_HEADERS, [_final_row(run) for run in runs], left=2))
    out.append("<h2>Per round</h2>")
    out.append(
        "<p class='note'>One colour per run. Loss: solid the central test loss, dashed the clients' "
        "training loss (example-weighted). Bytes: solid up (clients to server), dashed down. Epsilon, "
        "from the privacy ledger: solid example-level (the most any client spent), dashed "
        "client-level.</p><div class='grid figures'>"
    )
    for figure_id, title in FIGURE_TITLES.items():
        out.append(f"<div>{embedded_png(pngs[figure_id], title)}</div>")
    out.append("</div>")
    notes = [(run.label, note) for run in runs for note in run.notes]
    if notes:
        out.append("<h2>Notes</h2><ul>")
        out.extend(f"<li><b>{escape(label)}</b>: {escape(note)}</li>" for label, note in notes)
        out.append("</ul>")
    out.append(
        "<p class='note'>Each run's metrics.json holds every number shown; figures/*.png beside this "
        "page are the figures.</p></body></html>"
    )
    return "\n".join(out)


_SETTINGS_HEADERS = [
    "run",
    "status",
    "model",
    "adapter",
    "codec",
    "aggregator",
    "clients",
    "rounds",
    "DP (example)",
    "DP (client)",
    "secure aggregation",
]


def _settings_row(run: RunFolder) -> list[str]:
    meta, config = run.history.meta, run.config
    model = shown_path(str(meta.get("model", config.model.name_or_path if config else "?")))
    if config is None:
        return [
            run.label,
            run.status,
            model,
            str(meta.get("adapter_method", "?")),
            str(meta.get("codec", "?")),
            str(meta.get("aggregator", "?")),
            str(meta.get("num_clients", "?")),
            "?",
            "?",
            "?",
            "?",
        ]
    federation = config.federation
    return [
        run.label,
        run.status,
        model,
        _adapter(config),
        federation.codec + _options(federation.codec_options),
        federation.aggregator + _options(federation.aggregator_options),
        f"{config.partition.num_clients} ({federation.fraction_train:.0%} a round)",
        str(federation.rounds),
        _example_dp(config),
        _client_dp(config),
        "on" if federation.secure_aggregation.enabled else "off",
    ]


def _adapter(config: Config) -> str:
    adapter = config.adapter
    rank = adapter.options.get("r")
    return (
        adapter.method
        + (f" r={rank}" if rank is not None else "")
        + (" FFA" if adapter.freeze_lora_a else "")
    )


def _options(options: Mapping[str, object]) -> str:
    return f" ({', '.join(f'{k}={v}' for k, v in sorted(options.items()))})" if options else ""


def _example_dp(config: Config) -> str:
    example = config.privacy.example
    if not example.enabled:
        return "off"
    noise = (
        f"noise {example.noise_multiplier:g}"
        if example.noise_multiplier is not None
        else f"target epsilon {example.target_epsilon:g}"
    )
    return f"{noise}, max_grad_norm {example.max_grad_norm:g}, delta {example.delta:g}, {example.accountant}"


def _client_dp(config: Config) -> str:
    client = config.privacy.client
    if not client.enabled:
        return "off"
    clipping = f"clipping_norm {client.clipping_norm:g}" + (" (adaptive)" if client.adaptive_clipping else "")
    return f"noise {client.noise_multiplier:g}, {clipping}, delta {client.delta:g}, {client.accountant}"


_FINAL_HEADERS = [
    "run",
    "status",
    "rounds done",
    "accuracy",
    "test loss",
    "train loss",
    "MiB up",
    "MiB down",
    "epsilon (example)",
    "epsilon (client)",
    "seconds",
]


def _final_row(run: RunFolder) -> list[str]:
    rounds = run.rounds
    last = rounds[-1] if rounds else None
    accuracy = last.accuracy if last else run.history.initial["accuracy"]
    loss = last.loss if last else run.history.initial["loss"]
    return [
        run.label,
        run.status,
        str(len(rounds)),
        f"{accuracy:.4f}",
        f"{loss:.4f}",
        format_cell(last.train_loss if last else None, 4, "–"),
        f"{sum(r.bytes_up for r in rounds) / 2**20:.3g}",
        f"{sum(r.bytes_down for r in rounds) / 2**20:.3g}",
        _epsilon(last.privacy if last else {}, "example"),
        _epsilon(last.privacy if last else {}, "client"),
        f"{sum(r.seconds for r in rounds):.1f}",
    ]


def _epsilon(privacy: Mapping[str, float], unit: str) -> str:
    if f"epsilon_{unit}" not in privacy:
        return "–"
    return f"{privacy[f'epsilon_{unit}']:.3f} at delta {privacy[f'delta_{unit}']:g}"
