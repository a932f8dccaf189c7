"""The run-folder contract: per-round metrics, written as ``metrics.json`` after each round.

Outside tools read this file; keep the documented keys stable (see README, "Outputs").
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ClientRoundRecord:
    """One client's traffic and training in one round."""

    client_id: int
    bytes_up: int
    bytes_down: int
    num_examples: int
    """The example count the client's update was weighted by: its claim, capped where
    the server knows its partition or sets ``federation.max_client_examples``."""
    train_loss: float | None
    """None when the client did not send it (DP-SGD clients keep their un-noised loss)."""
    train_seconds: float
    dp_noise_multiplier: float | None = None
    dp_sample_rate: float | None = None
    dp_steps: int | None = None
    epsilon: float | None = None
    """The epsilon the client reported for itself (the ledger's is in ``privacy``)."""


@dataclass(frozen=True)
class RoundRecord:
    """One round: central evaluation after aggregation, bytes summed over clients."""

    round: int
    accuracy: float
    loss: float
    bytes_up: int
    bytes_down: int
    clients: int
    seconds: float
    train_loss: float | None
    """Example-weighted over the clients that sent one; None when none did."""
    train_phase_seconds: float | None = None
    """Of ``seconds``, the federated part: from sending the round's messages to the
    aggregated adapter (client work, transport, decoding, aggregation); the rest is the
    central evaluation and checkpointing. None in metrics written before it existed."""
    rejected: list[dict[str, Any]] = field(default_factory=list)
    per_client: list[ClientRoundRecord] = field(default_factory=list)
    aggregation: dict[str, float] = field(default_factory=dict)
    generation: dict[str, float] = field(default_factory=dict)
    """Instruction tuning: the mean score of greedy answers to the first test examples,
    under the scorer's name (``label``, ``exact_match``, ``rouge_l``), and ``examples``."""
    privacy: dict[str, float] = field(default_factory=dict)
    """Epsilon spent so far, from the run's privacy ledger: ``epsilon_example`` (max over
    clients) with ``delta_example``, ``epsilon_client`` with ``delta_client``."""


@dataclass
class RunHistory:
    """Everything ``metrics.json`` holds."""

    meta: dict[str, Any]
    initial: dict[str, Any]
    """Round 0: ``accuracy`` and ``loss`` (and ``generation``, as in a round's record)."""
    rounds: list[RoundRecord] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data; top-level ``rounds`` is the stable contract."""
        return {**self.meta, "initial": self.initial, "rounds": [asdict(r) for r in self.rounds]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunHistory:
        """Read back :meth:`to_dict` (a ``metrics.json``)."""
        data = dict(data)
        initial = data.pop("initial")
        rounds = []
        for item in data.pop("rounds"):
            per_client = [ClientRoundRecord(**c) for c in item.get("per_client", [])]
            rounds.append(RoundRecord(**{**item, "per_client": per_client}))
        return cls(meta=data, initial=initial, rounds=rounds)

    def write(self, path: Path) -> None:
        """Write atomically (a reader never sees half a file)."""
        write_json_atomic(path, self.to_dict())


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON durably: a reader, or the file after a power loss, is old or new, never half."""
    write_text_atomic(path, json.dumps(data, indent=2))


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, fsync it, rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(text)
        replace_durably(Path(tmp), path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def replace_durably(tmp: Path, path: Path) -> None:
    """Rename the finished file ``tmp`` onto ``path`` so that the new content survives a crash.

    Without the first fsync a power loss can leave the rename on disk but not the data
    (an empty ``path``, the classic ext4/XFS failure); without the second, not the rename.
    """
    with tmp.open("rb") as written:
        os.fsync(written.fileno())
    os.replace(tmp, path)
    fsync_folder(path.parent)


def fsync_folder(folder: Path) -> None:
    """Make the folder's entries (a rename, a new file) durable; a no-op where unsupported."""
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:  # Windows cannot open a folder
        return
    try:
        os.fsync(handle)
    except OSError:
        pass  # some file systems refuse fsync on a folder; the rename is then as durable as they allow
    finally:
        os.close(handle)
