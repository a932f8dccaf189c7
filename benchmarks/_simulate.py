"""Shared by the benchmarks: run one config through the real CLI in a fresh process."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import tomli_w

from fedpeft.flower.launch import simulate_in_child

ROOT = Path(__file__).resolve().parent.parent


def simulate(name: str, config: dict[str, Any], folder: Path) -> dict[str, Any]:
    """``fedpeft simulate`` ``config`` into ``folder``; echo round lines; return
    ``{"metrics": metrics.json, "wall_seconds": ...}``."""
    folder.mkdir(parents=True, exist_ok=True)
    config_file = folder / "bench-config.toml"
    config_file.write_text(tomli_w.dumps(config), encoding="utf-8")
    started = time.monotonic()

    def echo(line: str) -> None:
        if line.startswith(("round ", "slora:", "DP-SGD")):
            print(f"  [{name}] {line.rstrip()}", flush=True)

    code = simulate_in_child(config_file, folder, folder / "log.txt", echo, cwd=ROOT)
    wall = time.monotonic() - started
    if code != 0:
        raise SystemExit(f"{name} failed (exit {code}); see {folder / 'log.txt'}")
    (folder / "bench-run.json").write_text(json.dumps({"wall_seconds": wall}), encoding="utf-8")
    metrics = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
    return {"metrics": metrics, "wall_seconds": wall}


def finished(folder: Path, config: dict[str, Any]) -> dict[str, Any] | None:
    """A complete earlier run of exactly ``config`` in ``folder`` (same fingerprint), or None.

    Lets a benchmark resume after an interruption, or rerun only the rows whose
    config changed.
    """
    from fedpeft.config import load_config, parse_config

    metrics_file, wall_file = folder / "metrics.json", folder / "bench-run.json"
    if not (metrics_file.is_file() and wall_file.is_file() and (folder / "adapter").is_dir()):
        return None
    metrics = json.loads(metrics_file.read_text(encoding="utf-8"))
    resolved = parse_config(config)
    # Compare the run's own resolved config.toml, re-read by this version of fedpeft, so
    # a config section added since (with its defaults) does not force a rerun.
    if load_config(folder / "config.toml").fingerprint() != resolved.fingerprint():
        return None
    if len(metrics.get("rounds", [])) != resolved.federation.rounds:
        return None
    wall = json.loads(wall_file.read_text(encoding="utf-8"))["wall_seconds"]
    return {"metrics": metrics, "wall_seconds": wall, "reused": True}
