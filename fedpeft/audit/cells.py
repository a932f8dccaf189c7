"""How a value reads in a report table, the same in HTML and Markdown."""

from __future__ import annotations

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
