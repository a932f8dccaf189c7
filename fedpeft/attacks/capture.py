"""Client updates captured on the server, as the attack suite reads them.

The server's strategy saves what it decoded from a client's reply, next to the adapter
it had sent, one safetensors file per (round, client); nothing here imports Flower, so
an attack runs on a saved update alone. Under secure aggregation the server holds no
client's update, only the round's sum, and saves that (``round-RRRR-sum.safetensors``):
it loads as one observation whose update is the sum of the round's clients' updates,
which the span attacks take as they are (the sum's rows span the union of the batches'
inputs).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from fedpeft.attacks.drawn_batches import load_drawn_batches
from fedpeft.attacks.observation import Observation, ThreatModel
from fedpeft.config import TrainConfig
from fedpeft.errors import AttackError
from fedpeft.models import AdapterState

_NAME = re.compile(r"round-(\d+)-client-(\d+)\.safetensors")
_SUM_NAME = re.compile(r"round-(\d+)-sum\.safetensors")

SUM_CLIENT_ID = -1
"""``client_id`` of a captured sum: no one client sent it (its clients are in ``summed``)."""


@dataclass(frozen=True)
class Contribution:
    """One client's part in a captured sum, for scoring only.

    Attributes:
        client_id: The client (its partition in a simulation).
        drawn_batches: Its own record of its DP-SGD batches, when it kept one.

    """

    client_id: int
    drawn_batches: tuple[tuple[int, ...], ...] | None = None


@dataclass(frozen=True)
class CapturedUpdate:
    """One client's update of one round, or a secure round's sum, with what the server knew.

    ``drawn_batches`` is the DP client's own record of its Poisson batches when a
    simulation kept one (:mod:`fedpeft.attacks.drawn_batches`): for scoring only, never
    handed to an attack. A captured sum (``summed`` non-empty, ``client_id`` is
    :data:`SUM_CLIENT_ID`) names the clients whose updates it adds up, from the run's
    ``metrics.json``: the truth it is scored against is the union of their batches.
    """

    server_round: int
    client_id: int
    observation: Observation
    drawn_batches: tuple[tuple[int, ...], ...] | None = None
    summed: tuple[Contribution, ...] = ()

    @property
    def is_sum(self) -> bool:
        """Whether the observation is a secure round's sum of several clients' updates."""
        return bool(self.summed)

    @property
    def contributions(self) -> tuple[Contribution, ...]:
        """Every client whose update the observation holds: one, or a sum's clients."""
        return self.summed or (Contribution(self.client_id, self.drawn_batches),)

    @property
    def clients(self) -> tuple[int, ...]:
        """The ids of :attr:`contributions`."""
        return tuple(c.client_id for c in self.contributions)

    def describe(self) -> str:
        """``client 3``, or ``sum of clients 0+2`` for a captured sum."""
        if self.is_sum:
            return "sum of clients " + "+".join(map(str, self.clients))
        return f"client {self.client_id}"


def threat_model_of(train: TrainConfig, malicious: bool) -> ThreatModel:
    """What a captured update is, given the local training the server configured."""
    if malicious:
        return "malicious"
    one_sgd_step = train.epochs == 0 and train.steps == 1 and train.optimizer == "sgd"
    return "fedsgd" if one_sgd_step and train.grad_accumulation == 1 else "fedavg"


def malicious_adapter(state: Mapping[str, Tensor], seed: int) -> AdapterState:
    """The adapter a malicious server sends instead of the global one.

    peft's LoRA init turned around: every A is zero and every B drawn (std 1/sqrt(r)).
    The model then computes exactly what the base model does, so nothing looks wrong,
    while dL/dA = s B^T dL/dh x^T is non-zero and carries every LoRA layer's inputs, and
    the client's delta of A is exact in float32 (it has no large A to be added to).
    Other tensors (a classifier head) are sent as they are.
    """
    generator = torch.Generator().manual_seed(seed)
    crafted = {}
    for name, value in state.items():
        if ".lora_A." in name:
            crafted[name] = torch.zeros_like(value)
        elif ".lora_B." in name:
            rank = value.shape[1]
            crafted[name] = (torch.randn(value.shape, generator=generator) / rank**0.5).to(value.dtype)
        else:
            crafted[name] = value.clone()
    return crafted


def save_capture(folder: str | Path, captured: CapturedUpdate) -> Path:
    """Write ``captured`` as ``round-RRRR-client-CCCC.safetensors`` in ``folder``."""
    observation = captured.observation
    path = Path(folder) / f"round-{captured.server_round:04d}-client-{captured.client_id:04d}.safetensors"
    metadata = {
        "threat_model": observation.threat_model,
        "learning_rate": repr(observation.learning_rate),
        "local_steps": str(observation.local_steps),
        "num_examples": str(observation.num_examples),
    }
    return _write_capture(path, observation.global_state, "update", observation.update, metadata)


def _write_capture(
    path: Path,
    global_state: Mapping[str, Tensor],
    kind: str,
    update: Mapping[str, Tensor],
    metadata: dict[str, str],
) -> Path:
    """Write ``global/<name>`` and ``<kind>/<name>`` tensors with ``metadata``, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"global/{k}": v.contiguous() for k, v in global_state.items()}
    tensors |= {f"{kind}/{k}": v.contiguous() for k, v in update.items()}
    partial = path.with_suffix(".partial")
    save_file(tensors, str(partial), metadata=metadata)
    partial.replace(path)
    return path


def _read_observation(
    path: Path, kind: str, num_examples: Callable[[Mapping[str, str]], int], what: str
) -> Observation:
    """The observation in a capture file written by :func:`_write_capture`."""
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    tensors = load_file(str(path))
    prefix = f"{kind}/"
    try:
        return Observation(
            threat_model=metadata["threat_model"],  # type: ignore[arg-type]
            global_state={
                k.removeprefix("global/"): v for k, v in tensors.items() if k.startswith("global/")
            },
            update={k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)},
            learning_rate=float(metadata["learning_rate"]),
            local_steps=int(metadata["local_steps"]),
            num_examples=num_examples(metadata),
        )
    except (KeyError, ValueError) as err:
        raise AttackError(f"{path}: not a {what} fedpeft wrote ({err})") from None


def sum_capture_path(folder: str | Path, server_round: int) -> Path:
    """Where a secure round's sum is captured: ``round-RRRR-sum.safetensors``.

    Under secure aggregation the server never holds an individual update, so what it
    can capture is the round's sum; the name keeps it apart from per-client captures.
    """
    return Path(folder) / f"round-{server_round:04d}-sum.safetensors"


def load_captures(folder: str | Path, metrics: str | Path | None = None) -> list[CapturedUpdate]:
    """Every capture in ``folder``, per-client updates and secure rounds' sums, by round then client.

    A sum comes first in its round (its ``client_id`` is :data:`SUM_CLIENT_ID`).

    Args:
        folder: The capture folder (a run's ``captures/``).
        metrics: The run's ``metrics.json``, which names the clients of each captured
            sum (default: beside ``folder``); read only when the folder holds a sum.

    Raises:
        AttackError: The folder is missing or holds no capture, or a sum's clients
            cannot be named.

    """
    folder = Path(folder)
    if not folder.is_dir():
        raise AttackError(f"no capture folder at {folder}")
    metrics_path = folder.parent / "metrics.json" if metrics is None else Path(metrics)
    found = []
    for path in sorted(folder.iterdir()):
        match = _NAME.fullmatch(path.name)
        if match:
            found.append(_load_one(path, int(match[1]), int(match[2])))
        elif match := _SUM_NAME.fullmatch(path.name):
            found.append(_load_sum(path, int(match[1]), metrics_path))
    if not found:
        raise AttackError(
            f"{folder} holds no captured update (round-RRRR-client-CCCC.safetensors or "
            "round-RRRR-sum.safetensors)"
        )
    return sorted(found, key=lambda c: (c.server_round, c.client_id))


def round_clients(metrics: str | Path, server_round: int) -> list[tuple[int, int]]:
    """``(client id, example count)`` of every client whose update the round aggregated.

    Read from a run's ``metrics.json`` (``rounds[].per_client``); in a secure round
    these are the clients whose masked vectors are in the unmasked sum.

    Raises:
        AttackError: The file is missing, not a fedpeft metrics file, or has no such round.

    """
    path = Path(metrics)
    try:
        rounds = json.loads(path.read_text(encoding="utf-8"))["rounds"]
        for record in rounds:
            if int(record["round"]) == server_round:
                return [(int(c["client_id"]), int(c["num_examples"])) for c in record["per_client"]]
    except FileNotFoundError:
        raise AttackError(
            f"no {path}: a captured sum's clients are named by the run's metrics.json "
            "(rounds[].per_client), which belongs beside the capture folder"
        ) from None
    except (KeyError, TypeError, ValueError) as err:
        raise AttackError(f"{path}: not a metrics file fedpeft wrote ({err})") from None
    raise AttackError(f"{path}: no round {server_round}, whose sum was captured")


def _load_sum(path: Path, server_round: int, metrics: Path) -> CapturedUpdate:
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    try:
        count = int(metadata["clients"])
    except (KeyError, ValueError) as err:
        raise AttackError(f"{path}: not a sum capture fedpeft wrote ({err})") from None
    clients = round_clients(metrics, server_round)
    if len(clients) != count:
        raise AttackError(
            f"{path} sums {count} updates, but {metrics} names {len(clients)} client(s) in round "
            f"{server_round}: {[c for c, _ in clients]}"
        )
    # What the server knows: the example counts the clients reported.
    reported = sum(n for _, n in clients)
    observation = _read_observation(path, "sum", lambda _: reported, "sum capture")
    summed = tuple(
        Contribution(client, load_drawn_batches(path.parent, server_round, client)) for client, _ in clients
    )
    return CapturedUpdate(server_round, SUM_CLIENT_ID, observation, None, summed)


def _load_one(path: Path, server_round: int, client_id: int) -> CapturedUpdate:
    drawn = load_drawn_batches(path.parent, server_round, client_id)
    observation = _read_observation(path, "update", lambda m: int(m["num_examples"]), "capture")
    return CapturedUpdate(server_round, client_id, observation, drawn)


@dataclass(frozen=True)
class CapturePlan:
    """Which updates the server saves, where, and whether it crafts what it sends.

    Attributes:
        folder: Where captures are written.
        rounds: Captured rounds.
        clients: Captured client ids; empty: every client sampled in a captured round.
        malicious: In captured rounds, send :func:`malicious_adapter` and leave the
            global adapter unchanged afterwards (the round is spent on the attack).
        threat_model: What a captured update is (:func:`threat_model_of`).
        learning_rates: Local learning rate per captured round.
        local_steps: Local optimiser steps per round.
        craft: Makes the adapter a malicious server sends from the global one and a
            seed (default :func:`malicious_adapter`).

    """

    folder: Path
    rounds: frozenset[int]
    clients: frozenset[int]
    malicious: bool
    threat_model: ThreatModel
    learning_rates: Mapping[int, float]
    local_steps: int
    craft: Callable[[Mapping[str, Tensor], int], AdapterState] = malicious_adapter

    def crafts(self, server_round: int) -> bool:
        """Whether the server sends a crafted adapter in ``server_round``."""
        return self.malicious and server_round in self.rounds

    def wants(self, server_round: int, client_id: int) -> bool:
        """Whether the update of ``client_id`` in ``server_round`` is saved."""
        return server_round in self.rounds and (not self.clients or client_id in self.clients)

    def save(
        self,
        server_round: int,
        client_id: int,
        global_state: Mapping[str, Tensor],
        update: Mapping[str, Tensor],
        num_examples: int,
    ) -> Path:
        """Write one decoded update with what the server knew of it."""
        observation = Observation(
            threat_model=self.threat_model,
            global_state=global_state,
            update=update,
            learning_rate=self.learning_rates[server_round],
            local_steps=self.local_steps,
            num_examples=num_examples,
        )
        return save_capture(self.folder, CapturedUpdate(server_round, client_id, observation))

    def save_sum(
        self,
        server_round: int,
        global_state: Mapping[str, Tensor],
        total: Mapping[str, Tensor],
        clients: int,
    ) -> Path:
        """Write a secure round's decoded sum of ``clients`` updates (see :func:`sum_capture_path`)."""
        metadata = {
            "threat_model": self.threat_model,
            "learning_rate": repr(self.learning_rates[server_round]),
            "local_steps": str(self.local_steps),
            "clients": str(clients),
        }
        return _write_capture(
            sum_capture_path(self.folder, server_round), global_state, "sum", total, metadata
        )
