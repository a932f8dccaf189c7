"""The server's round checkpoint: everything needed to continue a run after a crash.

One file, ``<run folder>/checkpoint.pt``, rewritten after every completed round by
writing a temporary file beside it, flushing it to disk and renaming it into place,
so a reader (or a restarted server) sees the previous round's checkpoint or the new
one, never half of either. It holds the global adapter, the aggregator's server state,
the privacy ledger and the metrics history up to and including ``completed_round``:
a resumed run starts at ``completed_round + 1`` and counts no round twice.

Notes:
    What clients keep in their own Flower state (top-k error-feedback residuals, each
    client's copy of its DP events) belongs to a Flower run; a resumed run is a new
    Flower run, so clients start that state afresh. The server's ledger, checkpointed
    here, still holds every DP event of the completed rounds.

"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fedpeft.config import Config
from fedpeft.errors import FedPeftError
from fedpeft.history import RunHistory
from fedpeft.privacy.ledger import PrivacyLedger

CHECKPOINT_FILE = "checkpoint.pt"
FORMAT_VERSION = 1


class CheckpointError(FedPeftError):
    """A checkpoint is missing, unreadable, or belongs to another config."""


@dataclass
class RoundCheckpoint:
    """The server's state after ``completed_round``.

    Attributes:
        completed_round: The last round whose aggregate is in ``global_state``.
        config_fingerprint: :meth:`Config.fingerprint` of the run that wrote it.
        global_state: name -> tensor, the global adapter after ``completed_round``.
        aggregator_state: What the aggregator's ``state_dict`` returned.
        ledger: Every DP event of the completed rounds.
        history: ``metrics.json`` up to ``completed_round``.
        finished: True once the run completed its last round.
        node_clients: Flower node id -> the client id bound to it (deployment), so a
            resumed run still refuses a node speaking for another.
        clipping_norm: User-level DP's C for the next round under adaptive clipping
            (None: not adaptive).

    """

    completed_round: int
    config_fingerprint: str
    global_state: dict[str, Tensor]
    aggregator_state: dict[str, Any]
    ledger: PrivacyLedger
    history: RunHistory
    finished: bool = False
    node_clients: dict[int, int] = field(default_factory=dict)
    clipping_norm: float | None = None


def checkpoint_path(run_folder: Path) -> Path:
    """Where a run folder keeps its checkpoint."""
    return run_folder / CHECKPOINT_FILE


def save_checkpoint(run_folder: Path, checkpoint: RoundCheckpoint) -> Path:
    """Write ``checkpoint`` atomically (temporary file, fsync, rename) and return its path."""
    path = checkpoint_path(run_folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "format_version": FORMAT_VERSION,
        "completed_round": checkpoint.completed_round,
        "config_fingerprint": checkpoint.config_fingerprint,
        "finished": checkpoint.finished,
        "global_state": {k: v.detach().cpu().contiguous() for k, v in checkpoint.global_state.items()},
        "aggregator_state": checkpoint.aggregator_state,
        # Plain JSON text: loads under torch.load(weights_only=True) and stays readable.
        "ledger": checkpoint.ledger.to_json(),
        "history": json.dumps(checkpoint.history.to_dict()),
        "node_clients": json.dumps({str(node): client for node, client in checkpoint.node_clients.items()}),
        "clipping_norm": checkpoint.clipping_norm,
    }
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "wb") as out:
            torch.save(data, out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(run_folder: Path) -> RoundCheckpoint | None:
    """The run folder's checkpoint, or None when it has none.

    Raises:
        CheckpointError: The file exists but cannot be read as a fedpeft checkpoint.

    """
    path = checkpoint_path(run_folder)
    if not path.is_file():
        return None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
        if data.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(
                f"{path}: checkpoint format {data.get('format_version')!r}, this fedpeft reads "
                f"{FORMAT_VERSION}"
            )
        return RoundCheckpoint(
            completed_round=int(data["completed_round"]),
            config_fingerprint=str(data["config_fingerprint"]),
            global_state=dict(data["global_state"]),
            aggregator_state=dict(data["aggregator_state"]),
            ledger=PrivacyLedger.from_json(data["ledger"]),
            history=RunHistory.from_dict(json.loads(data["history"])),
            finished=bool(data["finished"]),
            # Absent in checkpoints written before node binding: nothing was bound then.
            node_clients={int(k): int(v) for k, v in json.loads(data.get("node_clients", "{}")).items()},
            # Absent in checkpoints written before adaptive clipping: none was adaptive.
            clipping_norm=None if data.get("clipping_norm") is None else float(data["clipping_norm"]),
        )
    except CheckpointError:
        raise
    except Exception as err:  # a truncated or foreign file: say which and why
        raise CheckpointError(f"{path}: not a readable fedpeft checkpoint ({err})") from None


def check_run_folder(run_folder: Path, config: Config, resume: bool) -> RoundCheckpoint | None:
    """The checkpoint to continue from, after checking ``run_folder`` suits the run.

    A fresh run may reuse a folder whose run finished, never one that stopped midway:
    its checkpoint is work that only a resumed run may continue.

    Raises:
        CheckpointError: Resuming a folder that does not exist or whose checkpoint was
            written under another config; or starting afresh over an unfinished run.

    """
    checkpoint = load_checkpoint(run_folder)
    if resume:
        if not run_folder.is_dir():
            raise CheckpointError(f"--resume {run_folder}: no such run folder")
        if checkpoint is not None and checkpoint.config_fingerprint != config.fingerprint():
            raise CheckpointError(
                f"{checkpoint_path(run_folder)} was written under another config (fingerprint "
                f"{checkpoint.config_fingerprint}, this one {config.fingerprint()}); resume with "
                f"the run's own {run_folder / 'config.toml'}"
            )
        return checkpoint
    if checkpoint is not None and not checkpoint.finished:
        raise CheckpointError(
            f"{run_folder} holds an unfinished run (checkpointed after round "
            f"{checkpoint.completed_round}); continue it with --resume or choose another folder"
        )
    return None
