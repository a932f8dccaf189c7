"""What a client keeps between rounds: its codec memory and its own DP ledger.

Flower keeps a client's ``Context.state`` per Flower run, and a resumed run (``--resume``)
is a new Flower run. So a SuperNode started with the node config ``state-dir`` keeps
both in files under ``<state-dir>/<run key>/client-<id>/`` instead, where the run key
is the id the server gives a run when it starts and keeps in its checkpoint: the
SuperNode that serves the resumed run continues the same error-feedback residuals and
the same epsilon, with no round counted twice or lost. A simulation keeps every
virtual client's state there too (``<run folder>/client-state``): Flower holds all of
its virtual clients' contexts in the simulation's process, which would otherwise grow
by an adapter's worth of residuals for every client that ever trained; on disk, a
round reads and writes the state of its cohort only.

Each file is written twice, ``<file>.bak`` first, each to a temporary file that is
fsynced before it is renamed into place (and the folder after), so a power loss leaves
at least one whole copy. Reading takes the main file, or the backup when the main file
is unreadable; the ledger takes whichever of the two holds more events, since ledgers
only grow and the longer one can only over-count epsilon.

Notes:
    The files hold the client's residuals (parts of its updates never sent) and its
    DP events: keep ``state-dir`` on the device, readable by its owner only. The run key
    comes from the server, so it is accepted only in the shape the server makes
    (``uuid4().hex``): a server cannot steer where the device writes. A ledger that
    neither copy holds readably is an error, never a fresh ledger, which would restart
    the client's epsilon at 0.

"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from flwr.app import ConfigRecord, Context
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from fedpeft.errors import ClientStateError, ConfigError
from fedpeft.flower.records import CODEC_MEMORY, PRIVACY_LEDGER, record_to_state, state_to_record
from fedpeft.history import replace_durably, write_text_atomic
from fedpeft.privacy.ledger import PrivacyLedger

MEMORY_FILE = "codec_memory.safetensors"
LEDGER_FILE = "privacy_ledger.json"
BACKUP_SUFFIX = ".bak"
RUN_KEY = re.compile(r"[0-9a-f]{32}")
"""The shape of a run key: ``uuid.uuid4().hex``, as the server makes it."""

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class ClientState:
    """A client's memory across rounds (never sent to the server).

    Attributes:
        memory: name -> tensor, the codec's memory (top-k residuals); updated in place.
        ledger: The client's DP events; updated in place.

    """

    memory: dict[str, Tensor] = field(default_factory=dict)
    ledger: PrivacyLedger = field(default_factory=PrivacyLedger)


def state_folder(context: Context, run_key: str, state_dir: Path | None = None) -> Path | None:
    """``<state-dir>/<run key>/client-<id>`` when the node keeps state on disk, else None.

    ``state_dir`` (the simulation's) takes the place of the node config's ``state-dir``.

    The client id is part of the path so that SuperNodes sharing one ``state-dir`` on a
    machine never read each other's state.

    Raises:
        ClientStateError: ``run_key`` (chosen by the server) is not 32 lowercase hex
            digits, or the folder would lie outside ``state-dir``.
        ConfigError: The node config's ``partition-id`` is not an integer >= 0.

    """
    state_dir = state_dir or context.node_config.get("state-dir")  # type: ignore[assignment]
    if state_dir is None or not run_key:
        return None
    if not RUN_KEY.fullmatch(run_key):
        raise ClientStateError(
            f"run key {run_key[:80]!r} from the server is not 32 lowercase hex digits "
            "(uuid4().hex); refusing to make a state folder from it"
        )
    client_id = context.node_config.get("partition-id")
    if isinstance(client_id, bool) or not isinstance(client_id, int) or client_id < 0:
        raise ConfigError(f"node config 'partition-id': expected an integer >= 0, got {client_id!r}")
    root = Path(str(state_dir)).expanduser().resolve()
    folder = (root / run_key / f"client-{client_id}").resolve()
    if not folder.is_relative_to(root):
        raise ClientStateError(f"state folder {folder} for run key {run_key!r} lies outside state-dir {root}")
    return folder


def load_client_state(context: Context, run_key: str, state_dir: Path | None = None) -> ClientState:
    """The run's state from its files with a state folder (see :func:`state_folder`), else ``context.state``.

    Raises:
        ClientStateError: The ledger file exists but neither it nor its backup can be
            read (see the module's notes), or the run key is malformed.

    """
    folder = state_folder(context, run_key, state_dir)
    if folder is not None:
        return ClientState(_load_memory(folder / MEMORY_FILE), _load_ledger(folder / LEDGER_FILE))
    stored = context.state.array_records.get(CODEC_MEMORY)
    ledger_record = context.state.config_records.get(PRIVACY_LEDGER)
    return ClientState(
        memory=record_to_state(stored) if stored is not None else {},
        ledger=PrivacyLedger.from_json(str(ledger_record["events"])) if ledger_record else PrivacyLedger(),
    )


def save_client_state(
    context: Context, run_key: str, state: ClientState, state_dir: Path | None = None
) -> None:
    """Keep ``state`` in its files (durably) with a state folder, else in ``context.state``."""
    folder = state_folder(context, run_key, state_dir)
    if folder is None:
        if state.memory:
            context.state[CODEC_MEMORY] = state_to_record(state.memory)
        if state.ledger.events:
            context.state[PRIVACY_LEDGER] = ConfigRecord({"events": state.ledger.to_json()})
        return
    folder.mkdir(parents=True, exist_ok=True)
    if state.memory:
        memory = {k: v.contiguous() for k, v in state.memory.items()}
        for path in (_backup_of(folder / MEMORY_FILE), folder / MEMORY_FILE):
            _save_tensors(memory, path)
    if state.ledger.events:
        text = json.dumps(state.ledger.to_data(), indent=2)
        for path in (_backup_of(folder / LEDGER_FILE), folder / LEDGER_FILE):
            write_text_atomic(path, text)


def _backup_of(path: Path) -> Path:
    return path.with_name(path.name + BACKUP_SUFFIX)


def _save_tensors(tensors: dict[str, Tensor], path: Path) -> None:
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(handle)
    try:
        save_file(tensors, tmp)
        replace_durably(Path(tmp), path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_copies(path: Path, read: Callable[[Path], T]) -> tuple[list[T], list[str]]:
    """Read ``path`` and its backup: the readable copies, and a reason per unreadable one."""
    copies, problems = [], []
    for candidate in (path, _backup_of(path)):
        if not candidate.is_file():
            continue
        try:
            copies.append(read(candidate))
        except (OSError, ValueError, TypeError, KeyError, SafetensorError) as err:
            problems.append(f"{candidate}: {type(err).__name__}: {str(err)[:200]}")
    return copies, problems


def _read_ledger(path: Path) -> PrivacyLedger:
    text = path.read_text(encoding="utf-8")  # UnicodeDecodeError is a ValueError
    data = json.loads(text)
    if not isinstance(data, list) or not all(isinstance(item, dict) for item in data):
        raise ValueError("expected a JSON list of DP events")
    return PrivacyLedger.from_json(text)


def _load_ledger(path: Path) -> PrivacyLedger:
    """The client's ledger from ``path`` or its backup, whichever holds more events.

    Raises:
        ClientStateError: A copy exists but none is readable. A fresh ledger would count
            the client's epsilon from 0 again, so the client refuses to train instead.

    """
    ledgers, problems = _read_copies(path, _read_ledger)
    if problems and ledgers:
        log.warning("privacy ledger: recovered from the readable copy; unreadable: %s", "; ".join(problems))
    if problems and not ledgers:
        raise ClientStateError(
            f"privacy ledger {path} cannot be read ({'; '.join(problems)}); the client will not "
            "train with a fresh ledger (it would under-count epsilon). Restore the file, or, if this "
            "device's DP budget may restart, delete it"
        )
    return max(ledgers, key=lambda ledger: len(ledger.events), default=PrivacyLedger())


def _load_memory(path: Path) -> dict[str, Tensor]:
    """The codec memory from ``path``, else from its backup, else empty (logged).

    Losing the residuals costs accuracy only (they are never-sent parts of past
    updates, not privacy accounting), so an unreadable memory is recovered, not fatal.
    """
    memories, problems = _read_copies(path, lambda p: load_file(str(p)))
    if problems:
        fallback = "the backup" if memories else "empty residuals"
        log.warning("codec memory: unreadable (%s); continuing with %s", "; ".join(problems), fallback)
    return memories[0] if memories else {}
