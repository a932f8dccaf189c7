"""How a value reads in a report table, the same in HTML and Markdown."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def format_cell(value: Any, digits: int = 3, missing: str = "∞") -> str:
    """One table cell.

    ``missing`` for None (an unbounded epsilon unless said otherwise), yes/no for
    booleans, floats to ``digits`` places, anything else as it prints.
    """
    if value is None:
        return missing
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def shadow_training(settings: Mapping[str, Any]) -> str:
    """How the report's shadow models were trained, in words (older reports: locally)."""
    if settings.get("shadow_training", "local") == "federated":
        return "each a rerun of the federation"
    return "each one client's local training"
