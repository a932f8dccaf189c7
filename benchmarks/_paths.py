"""Paths as a benchmark's JSON records them: relative to the repository root, so a
committed figure file says the same on every machine and names no home or temp folder."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def repo_relative(path: str | Path) -> str:
    """``path`` relative to the repository root, with ``/`` separators.

    A file outside the repository (``../shared/data/...``) keeps its ``..`` steps: the
    layout beside the checkout is what the figure depends on, not this machine's root.
    """
    return Path(os.path.relpath(Path(path).resolve(), ROOT)).as_posix()
