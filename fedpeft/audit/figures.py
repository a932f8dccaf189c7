"""The report's figures: their data (kept in ``report.json``) and PNG renderings of it.

A figure is plain data, ``{"id", "title", "kind", "x_label", "y_label", "x_scale",
"y_scale", "series": [{"name", "x", "y"}]}``, so a reader of ``report.json`` can redraw
every figure; :func:`render_png` draws one with matplotlib (Agg backend, no display). An
optional ``"x_integer": true`` keeps the x ticks on whole numbers (rounds).

Kinds: ``line`` (x/y numbers), ``stairs`` (x = bin edges, y = counts, one fewer),
``category`` (x = category names shared by every series, y = numbers or null).
"""

from __future__ import annotations

import io
import math
from typing import Any

Figure = dict[str, Any]


def figure(
    figure_id: str,
    title: str,
    kind: str,
    x_label: str,
    y_label: str,
    series: list[dict[str, Any]],
    x_scale: str = "linear",
    y_scale: str = "linear",
) -> Figure:
    """One figure's data."""
    return {
        "id": figure_id,
        "title": title,
        "kind": kind,
        "x_label": x_label,
        "y_label": y_label,
        "x_scale": x_scale,
        "y_scale": y_scale,
        "series": series,
    }


def histogram_edges(values: list[float], bins: int, high: float | None = None) -> list[float]:
    """``bins`` equal-width bin edges from 0 to ``high`` (default: the largest value)."""
    top = high if high is not None else max(values, default=1.0)
    top = top if top > 0 else 1.0
    return [top * i / bins for i in range(bins + 1)]


def histogram_counts(values: list[float], edges: list[float]) -> list[int]:
    """Counts per bin; the last bin is closed on the right."""
    counts = [0] * (len(edges) - 1)
    for value in values:
        for i in range(len(counts)):
            last = i == len(counts) - 1
            if edges[i] <= value < edges[i + 1] or (last and value == edges[-1]):
                counts[i] += 1
                break
    return counts


def render_png(spec: Figure, width: float = 6.4, height: float = 3.6, dpi: int = 110) -> bytes:
    """Draw ``spec`` and return PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(width, height), dpi=dpi)
    try:
        kind = spec["kind"]
        for series in spec["series"]:
            style = series.get("style", {})
            if kind == "stairs":
                ax.stairs(
                    series["y"],
                    series["x"],
                    label=series["name"],
                    fill=style.get("fill", False),
                    alpha=style.get("alpha", 0.8),
                    linewidth=1.5,
                )
            elif kind == "category":
                points = [(x, y) for x, y in zip(series["x"], series["y"], strict=True) if y is not None]
                if points:
                    ax.plot(
                        [p[0] for p in points],
                        [p[1] for p in points],
                        marker="o",
                        label=series["name"],
                        linestyle=style.get("linestyle", "-"),
                    )
            else:
                keep = [
                    (x, y)
                    for x, y in zip(series["x"], series["y"], strict=True)
                    if _positive(x, spec["x_scale"]) and _positive(y, spec["y_scale"])
                ]
                ax.plot(
                    [p[0] for p in keep],
                    [p[1] for p in keep],
                    label=series["name"],
                    linestyle=style.get("linestyle", "-"),
                    color=style.get("color"),
                    marker=style.get("marker"),
                )
        ax.set_xscale(spec["x_scale"])
        if spec.get("x_integer"):  # rounds: no tick at round 1.5
            from matplotlib.ticker import MaxNLocator

            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_yscale(spec["y_scale"])
        ax.set_title(spec["title"], fontsize=11)
        ax.set_xlabel(spec["x_label"])
        ax.set_ylabel(spec["y_label"])
        ax.grid(True, alpha=0.3)
        if spec["series"]:
            ax.legend(fontsize=8)
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png")
        return buffer.getvalue()
    finally:
        plt.close(fig)


def _positive(value: Any, scale: str) -> bool:
    return value is not None and (
        scale != "log" or (isinstance(value, int | float) and value > 0 and math.isfinite(value))
    )
