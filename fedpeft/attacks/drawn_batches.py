"""A DP client's own record of the batches it drew, kept to score attacks on its update.

DP-SGD's Poisson batches come from the operating system's randomness, so unlike a
seeded loader they cannot be replayed: whoever scores an attack must ask the client
what it trained on. In a simulation the client writes that record beside the captured
update (``round-RRRR-client-CCCC.batches.json``); nothing of it travels in a Flower
message, and no attack reads it (:class:`~fedpeft.attacks.capture.CapturedUpdate`
hands attacks only the observation).

Notes:
    The record names which of the client's examples were sampled, which is exactly
    what DP's amplification by sampling assumes the adversary does not know. Keep it
    to evaluation folders; real SuperNodes never write it.

"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from fedpeft.errors import AttackError
from fedpeft.history import write_json_atomic


def record_path(folder: str | Path, server_round: int, client_id: int) -> Path:
    """Where the record of ``client_id`` in ``server_round`` lies in a capture folder."""
    return Path(folder) / f"round-{server_round:04d}-client-{client_id:04d}.batches.json"


def save_drawn_batches(
    folder: str | Path, server_round: int, client_id: int, batches: Sequence[Sequence[int]]
) -> Path:
    """Write the partition indices of each batch the client drew in ``server_round``."""
    path = record_path(folder, server_round, client_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, {"batches": [[int(i) for i in batch] for batch in batches]})
    return path


def load_drawn_batches(
    folder: str | Path, server_round: int, client_id: int
) -> tuple[tuple[int, ...], ...] | None:
    """The client's record for ``server_round``, or None when it wrote none.

    Raises:
        AttackError: The record exists but is not one fedpeft wrote.

    """
    path = record_path(folder, server_round, client_id)
    if not path.is_file():
        return None
    try:
        batches = json.loads(path.read_text(encoding="utf-8"))["batches"]
        return tuple(tuple(int(i) for i in batch) for batch in batches)
    except (KeyError, TypeError, ValueError) as err:
        raise AttackError(f"{path}: not a batch record fedpeft wrote ({err})") from None
