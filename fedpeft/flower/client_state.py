"""What a client keeps between rounds: its codec memory and its own DP ledger.

Flower keeps a client's ``Context.state`` per Flower run, and a resumed run (``--resume``)
is a new Flower run. So a SuperNode started with the node config ``state-dir`` also
keeps both in files under ``<state-dir>/<run key>/client-<id>/``, where the run key is
the id the server gives a run when it starts and keeps in its checkpoint: the SuperNode that
serves the resumed run continues the same error-feedback residuals and the same
epsilon, with no round counted twice or lost.

Notes:
    The files hold the client's residuals (parts of its updates never sent) and its
    DP events: keep ``state-dir`` on the device, readable by its owner only.

"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from flwr.app import ConfigRecord, Context
from safetensors.torch import load_file, save_file
from torch import Tensor

from fedpeft.flower.records import CODEC_MEMORY, PRIVACY_LEDGER, record_to_state, state_to_record
from fedpeft.history import write_json_atomic
from fedpeft.privacy.ledger import PrivacyLedger

MEMORY_FILE = "codec_memory.safetensors"
LEDGER_FILE = "privacy_ledger.json"


@dataclass
class ClientState:
    """A client's memory across rounds (never sent to the server).

    Attributes:
        memory: name -> tensor, the codec's memory (top-k residuals); updated in place.
        ledger: The client's DP events; updated in place.

    """

    memory: dict[str, Tensor] = field(default_factory=dict)
    ledger: PrivacyLedger = field(default_factory=PrivacyLedger)


def state_folder(context: Context, run_key: str) -> Path | None:
    """``<state-dir>/<run key>/client-<id>`` when the node keeps state on disk, else None.

    The client id is part of the path so that SuperNodes sharing one ``state-dir`` on a
    machine never read each other's state.
    """
    state_dir = context.node_config.get("state-dir")
    if state_dir is None or not run_key:
        return None
    client_id = context.node_config.get("partition-id")
    return Path(str(state_dir)).expanduser() / run_key / f"client-{client_id}"


def load_client_state(context: Context, run_key: str) -> ClientState:
    """The run's state from ``context.state``, or from ``state-dir`` in a new Flower run."""
    stored = context.state.array_records.get(CODEC_MEMORY)
    ledger_record = context.state.config_records.get(PRIVACY_LEDGER)
    state = ClientState(
        memory=record_to_state(stored) if stored is not None else {},
        ledger=PrivacyLedger.from_json(str(ledger_record["events"])) if ledger_record else PrivacyLedger(),
    )
    folder = state_folder(context, run_key)
    if folder is None:
        return state
    if stored is None and (folder / MEMORY_FILE).is_file():
        state.memory = load_file(str(folder / MEMORY_FILE))
    if ledger_record is None and (folder / LEDGER_FILE).is_file():
        state.ledger = PrivacyLedger.from_json((folder / LEDGER_FILE).read_text(encoding="utf-8"))
    return state


def save_client_state(context: Context, run_key: str, state: ClientState) -> None:
    """Keep ``state`` in ``context.state`` and, with ``state-dir``, in its files (atomically)."""
    if state.memory:
        context.state[CODEC_MEMORY] = state_to_record(state.memory)
    if state.ledger.events:
        context.state[PRIVACY_LEDGER] = ConfigRecord({"events": state.ledger.to_json()})
    folder = state_folder(context, run_key)
    if folder is None:
        return
    folder.mkdir(parents=True, exist_ok=True)
    if state.memory:
        handle, tmp = tempfile.mkstemp(dir=folder, prefix=f".{MEMORY_FILE}.")
        os.close(handle)
        save_file({k: v.contiguous() for k, v in state.memory.items()}, tmp)
        os.replace(tmp, folder / MEMORY_FILE)
    if state.ledger.events:
        write_json_atomic(folder / LEDGER_FILE, state.ledger.to_data())
