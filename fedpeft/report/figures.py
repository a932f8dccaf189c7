"""The run report's figures as plain data (:mod:`fedpeft.audit.figures` draws them), one line per run.

Every run keeps one colour in every figure; a figure with two quantities per run
(bytes up and down, example- and client-level epsilon) tells them apart by line style.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import accumulate
from typing import Any

from fedpeft.audit.figures import Figure, figure
from fedpeft.report.runs import RunFolder

FIGURE_TITLES = {
    "accuracy": "Test accuracy per round",
    "loss": "Loss per round",
    "bytes_per_round": "Bytes per round",
    "bytes_cumulative": "Cumulative bytes",
    "epsilon": "Epsilon spent per round",
}
"""Figure id -> title; every report has every one of them, in this order."""


def run_figures(runs: Sequence[RunFolder]) -> list[Figure]:
    """The report's figures, in :data:`FIGURE_TITLES` order."""
    figures = [
        _accuracy(runs),
        _loss(runs),
        _bytes(runs, cumulative=False),
        _bytes(runs, cumulative=True),
        _epsilon(runs),
    ]
    return [{**spec, "x_integer": True} for spec in figures]  # x is the round everywhere


def _style(index: int, linestyle: str = "-") -> dict[str, Any]:
    # matplotlib's cycle colours by name: run i is C{i} in every figure.
    return {"color": f"C{index % 10}", "linestyle": linestyle, "marker": "o"}


def _accuracy(runs: Sequence[RunFolder]) -> Figure:
    series = [
        {
            "name": run.label,
            "x": [0, *(r.round for r in run.rounds)],
            "y": [run.history.initial["accuracy"], *(r.accuracy for r in run.rounds)],
            "style": _style(i),
        }
        for i, run in enumerate(runs)
    ]
    return figure(
        "accuracy", FIGURE_TITLES["accuracy"], "line", "round (0: before training)", "accuracy", series
    )


def _loss(runs: Sequence[RunFolder]) -> Figure:
    series = []
    for i, run in enumerate(runs):
        series.append(
            {
                "name": f"{run.label}: test",
                "x": [0, *(r.round for r in run.rounds)],
                "y": [run.history.initial["loss"], *(r.loss for r in run.rounds)],
                "style": _style(i),
            }
        )
        if any(r.train_loss is not None for r in run.rounds):
            series.append(
                {
                    "name": f"{run.label}: clients' training",
                    "x": [r.round for r in run.rounds],
                    "y": [r.train_loss for r in run.rounds],
                    "style": _style(i, "--"),
                }
            )
    return figure("loss", FIGURE_TITLES["loss"], "line", "round (0: before training)", "loss", series)


def _bytes(runs: Sequence[RunFolder], cumulative: bool) -> Figure:
    series = []
    for i, run in enumerate(runs):
        rounds = [r.round for r in run.rounds]
        for direction, linestyle in (("up", "-"), ("down", "--")):
            per_round = [getattr(r, f"bytes_{direction}") for r in run.rounds]
            series.append(
                {
                    "name": f"{run.label}: {direction}",
                    "x": rounds,
                    "y": list(accumulate(per_round)) if cumulative else per_round,
                    "style": _style(i, linestyle),
                }
            )
    figure_id = "bytes_cumulative" if cumulative else "bytes_per_round"
    label = "bytes so far (log scale)" if cumulative else "bytes in the round (log scale)"
    # Codecs differ by orders of magnitude; a linear axis would flatten the small ones.
    return figure(figure_id, FIGURE_TITLES[figure_id], "line", "round", label, series, y_scale="log")


def _epsilon(runs: Sequence[RunFolder]) -> Figure:
    series = []
    for i, run in enumerate(runs):
        for unit, linestyle in (("example", "-"), ("client", "--")):
            key = f"epsilon_{unit}"
            if not any(key in r.privacy for r in run.rounds):
                continue
            series.append(
                {
                    "name": f"{run.label}: {unit}-level",
                    "x": [r.round for r in run.rounds],
                    "y": [r.privacy.get(key) for r in run.rounds],
                    "style": _style(i, linestyle),
                }
            )
    title = FIGURE_TITLES["epsilon"] + ("" if series else " (no run used DP)")
    return figure("epsilon", title, "line", "round", "epsilon", series)
