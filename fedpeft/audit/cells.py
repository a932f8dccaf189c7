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


def captured_cell(outcome: Mapping[str, Any]) -> str:
    """The client column of an attack outcome: ``3``, or ``sum 0+1+2`` for a secure round's sum.

    Reports written before sums could be captured have no ``sum``: one client's update.
    """
    if outcome.get("sum"):
        return "sum " + "+".join(map(str, outcome.get("clients") or []))
    return str(outcome["client"])


def captured_words(outcome: Mapping[str, Any]) -> str:
    """Whose update an outcome ran on, in a sentence: ``client 3`` or ``the sum of clients 0+1``."""
    if outcome.get("sum"):
        return "the sum of clients " + "+".join(map(str, outcome.get("clients") or []))
    return f"client {outcome['client']}"


def secure_aggregation_line(variant: Mapping[str, Any]) -> str | None:
    """What the attacks of a variant under secure aggregation saw, in words; None for other variants."""
    if not variant.get("secure_aggregation"):
        return None
    outcomes = (variant.get("attacks") or {}).get("outcomes", [])
    sizes = sorted({len(o.get("clients") or []) for o in outcomes if o.get("sum")})
    counted = f" (sums of {', '.join(map(str, sizes))} updates)" if sizes else ""
    return (
        f"{variant['name']} runs under secure aggregation (SecAgg+): the server never holds one "
        f"client's update, so the attacks run on each captured round's sum{counted}, scored against "
        "the union of the summed clients' batches."
    )
