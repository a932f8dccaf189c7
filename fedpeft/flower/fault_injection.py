"""Fault injection for fire drills: a SuperNode that sends what a broken or hostile client would.

An operator checks that a federation survives bad clients the way it survives a fire
drill: start one SuperNode with ``--node-config 'fault="nan"'`` (or another fault
below) and watch the server reject its replies while the global adapter stays exactly
what the honest clients make it. The end-to-end deployment tests do the same. A node
without the ``fault`` key is untouched: the mod returns the reply as it was.

Faults (the ``fault`` node-config value; a comma-separated list such as
``"nan,oversize,none"`` is taken in turn, round r using entry (r - 1) mod its length):

- ``none``: an honest reply;
- ``nan``: every update tensor is filled with NaN;
- ``inf``: every update tensor is filled with +Inf;
- ``oversize``: a 64 MiB junk tensor is added to the update;
- ``wrong-shape``: every update tensor loses its last row;
- ``crash``: the process exits mid-round, as a device losing power would (on a node with
  a warm worker that process is the worker: the node stays silent from then on);
- ``secagg-drop-after-keys``: in a secure (SecAgg+) round the node takes part in the
  setup and key-sharing stages, then fails the stage that collects masked vectors
  instead of training: a device lost after its keys are out. The server must rebuild
  its masks from the survivors' shares (``reconstruction_threshold``). The node fails
  at once rather than going silent, so the round goes on without waiting for
  ``federation.round_timeout``; a device that really dies costs the server that wait
  (or Flower's offline detection, about a minute), and SecAgg+ handles both alike.
  In a plain round the node replies honestly.

Under secure aggregation the update faults (``nan``, ``inf``, ``oversize``,
``wrong-shape``) find no plain update to corrupt (it travels masked, inside Flower's
SecAgg+ records): such a node replies honestly. ``crash`` exits at the round's first
message, its setup stage, before the node shares any key.
"""

from __future__ import annotations

import logging
import math
import os

from flwr.app import ArrayRecord, Context, Message
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

from fedpeft.errors import ConfigError
from fedpeft.flower.records import ROUND_CONFIG, UPDATE, record_to_state, state_to_record

logger = logging.getLogger("fedpeft")

FAULTS = ("none", "nan", "inf", "oversize", "wrong-shape", "crash", "secagg-drop-after-keys")
OVERSIZE_BYTES = 64 * 2**20


def inject_faults(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower client mod: corrupt this node's replies as its ``fault`` node config says."""
    if "fault" not in context.node_config:
        return call_next(msg, context)
    fault = fault_of_round(str(context.node_config["fault"]), msg)
    if fault == "crash":
        logger.warning("fault injection: node exits mid-round")
        os._exit(1)
    if fault == "secagg-drop-after-keys" and secure_stage(msg) == Stage.COLLECT_MASKED_VECTORS:
        logger.warning("fault injection: node drops out of the secure round after sharing its keys")
        raise InjectedDropout(f"fault injection: dropped out of round {round_of(msg)} after sharing keys")
    reply = call_next(msg, context)
    if fault == "none" or reply.has_error() or UPDATE not in reply.content.array_records:
        return reply
    reply.content.array_records[UPDATE] = corrupt_update(reply.content.array_records[UPDATE], fault)
    logger.warning("fault injection: sending a %s update", fault)
    return reply


def fault_of_round(faults: str, msg: Message) -> str:
    """The entry of the ``fault`` list that applies to this message's round."""
    kinds = [k.strip() for k in faults.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in FAULTS]
    if not kinds or unknown:
        raise ConfigError(f"node config 'fault': {faults!r}; each entry one of {', '.join(FAULTS)}")
    return kinds[(round_of(msg) - 1) % len(kinds)]


def round_of(msg: Message) -> int:
    """The server round ``msg`` belongs to.

    fedpeft's round config says it; SecAgg+'s key stages carry only Flower's own
    records, and the round in the message's group id (as fedpeft's plain rounds do too).
    """
    round_config = msg.content.config_records.get(ROUND_CONFIG)
    if round_config is not None:
        return int(round_config["server-round"])  # type: ignore[arg-type]
    return int(msg.metadata.group_id)


def secure_stage(msg: Message) -> str | None:
    """The SecAgg+ stage ``msg`` asks for (None: not a SecAgg+ message)."""
    configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
    return None if configs is None else str(configs.get(Key.STAGE))


class InjectedDropout(RuntimeError):
    """Raised by ``secagg-drop-after-keys``: the ClientApp fails, its reply is an error."""


def corrupt_update(record: ArrayRecord, fault: str) -> ArrayRecord:
    """A copy of ``record`` broken as ``fault`` says (see the module docstring)."""
    import torch  # only a faulty node's training stage needs it

    tensors = record_to_state(record)
    if fault in ("nan", "inf"):
        fill = math.nan if fault == "nan" else math.inf
        tensors = {name: torch.full_like(t, fill) for name, t in tensors.items()}
    elif fault == "wrong-shape":
        tensors = {name: t[:-1] if t.ndim and t.shape[0] > 1 else t[..., :0] for name, t in tensors.items()}
    elif fault == "oversize":
        tensors["junk"] = torch.zeros(OVERSIZE_BYTES // 4, dtype=torch.float32)
    return state_to_record(tensors)
