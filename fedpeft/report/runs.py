"""Read run folders for ``fedpeft report``: whatever a run has written so far, finished or not.

A run folder holds ``metrics.json`` (rewritten after every round, so it is there from
round 0 on), ``config.toml`` (written first) and ``privacy_ledger.json`` (once the first
DP event is recorded). Only ``metrics.json`` is required: a report compares what runs
measured, and says what it could not read rather than refusing to draw the rest.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fedpeft.config import Config, load_config
from fedpeft.errors import FedPeftError
from fedpeft.history import RoundRecord, RunHistory
from fedpeft.privacy.ledger import PrivacyLedger


class RunFolderError(FedPeftError):
    """A run folder or its ``metrics.json`` is missing or unreadable; the message names the path."""


@dataclass(frozen=True)
class RunFolder:
    """One run as the report shows it."""

    label: str
    """The run's name in legends and tables: its folder name (its path where names repeat)."""
    shown_path: str
    """The folder relative to the current folder (a report never shows machine paths)."""
    history: RunHistory
    config: Config | None
    """None when ``config.toml`` is missing or does not load (``notes`` says why)."""
    ledger: PrivacyLedger | None
    """None when the run recorded no DP event (or the ledger does not load)."""
    notes: tuple[str, ...]
    """What the reader should know: unreadable files, and the run's own warnings."""

    @property
    def rounds(self) -> list[RoundRecord]:
        """The completed rounds, in order."""
        return self.history.rounds

    @property
    def planned_rounds(self) -> int | None:
        """The rounds the config asked for (None without a config)."""
        return self.config.federation.rounds if self.config is not None else None

    @property
    def status(self) -> str:
        """``finished`` once every planned round is in ``metrics.json``, else how far it got."""
        done, planned = len(self.rounds), self.planned_rounds
        if planned is None:
            return f"{done} round(s), planned rounds unknown"
        if done >= planned:
            return "finished"
        return f"unfinished: {done} of {planned} rounds"


def shown_path(path: str | Path) -> str:
    """``path`` relative to the current folder; relative paths and names stay as given.

    An absolute path names a folder of this machine, which a shared report must not
    carry; a path on another drive (Windows) keeps only its last part.
    """
    path = Path(path)
    if not path.is_absolute():
        return path.as_posix()
    try:
        return Path(os.path.relpath(path, Path.cwd())).as_posix()
    except ValueError:
        return path.name


def load_runs(folders: Sequence[Path]) -> list[RunFolder]:
    """Read every folder, labelled by folder name (by path where two names are the same).

    Raises:
        RunFolderError: A folder or its ``metrics.json`` is missing or not a metrics file.

    """
    shown = [shown_path(folder) for folder in folders]
    names = [Path(folder).resolve().name for folder in folders]
    repeated = Counter(names)
    labels = [path if repeated[name] > 1 else name for name, path in zip(names, shown, strict=True)]
    return [load_run(folder, label, path) for folder, label, path in zip(folders, labels, shown, strict=True)]


def load_run(folder: Path, label: str, shown: str) -> RunFolder:
    """Read one run folder (see the module docstring for which files must be there).

    Raises:
        RunFolderError: ``folder`` or its ``metrics.json`` is missing or not a metrics file.

    """
    if not folder.is_dir():
        raise RunFolderError(f"{shown}: no such run folder")
    history = _read_history(folder / "metrics.json", f"{shown}/metrics.json")
    notes: list[str] = []
    config = None
    config_path = folder / "config.toml"
    if not config_path.is_file():
        notes.append("no config.toml: settings unknown")
    else:
        try:
            config = load_config(config_path)
        except FedPeftError as err:
            message = str(err).replace(str(config_path), f"{shown}/config.toml")
            notes.append(f"config.toml does not load with this fedpeft ({message}): settings unknown")
    ledger = None
    ledger_path = folder / "privacy_ledger.json"
    if ledger_path.is_file():
        try:
            ledger = PrivacyLedger.from_json(ledger_path.read_text(encoding="utf-8"))
        except (ValueError, TypeError, UnicodeDecodeError) as err:
            notes.append(f"privacy_ledger.json does not load ({err})")
    notes.extend(f"run warning: {w}" for w in history.meta.get("warnings") or [])
    return RunFolder(label, shown, history, config, ledger, tuple(notes))


def _read_history(path: Path, shown: str) -> RunHistory:
    if not path.is_file():
        raise RunFolderError(f"{shown}: not found (is this a fedpeft run folder?)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return RunHistory.from_dict(data)
    except (ValueError, UnicodeDecodeError) as err:
        raise RunFolderError(f"{shown}: not readable JSON ({err})") from None
    except (KeyError, TypeError, AttributeError) as err:
        raise RunFolderError(f"{shown}: not a fedpeft metrics file ({type(err).__name__}: {err})") from None
