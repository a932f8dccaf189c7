"""Client updates captured on the server, as the attack suite reads them.

The server's strategy saves what it decoded from a client's reply, next to the adapter
it had sent, one safetensors file per (round, client); nothing here imports Flower, so
an attack runs on a saved update alone.
"""

from __future__ import annotations

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


@dataclass(frozen=True)
class CapturedUpdate:
    """One client's update of one round, with what the server knew about it.

    ``drawn_batches`` is the DP client's own record of its Poisson batches when a
    simulation kept one (:mod:`fedpeft.attacks.drawn_batches`): for scoring only, never
    handed to an attack.
    """

    server_round: int
    client_id: int
    observation: Observation
    drawn_batches: tuple[tuple[int, ...], ...] | None = None


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
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    observation = captured.observation
    tensors = {f"global/{k}": v.contiguous() for k, v in observation.global_state.items()}
    tensors |= {f"update/{k}": v.contiguous() for k, v in observation.update.items()}
    metadata = {
        "threat_model": observation.threat_model,
        "learning_rate": repr(observation.learning_rate),
        "local_steps": str(observation.local_steps),
        "num_examples": str(observation.num_examples),
    }
    path = folder / f"round-{captured.server_round:04d}-client-{captured.client_id:04d}.safetensors"
    partial = path.with_suffix(".partial")
    save_file(tensors, str(partial), metadata=metadata)
    partial.replace(path)
    return path


def sum_capture_path(folder: str | Path, server_round: int) -> Path:
    """Where a secure round's sum is captured: ``round-RRRR-sum.safetensors``.

    Under secure aggregation the server never holds an individual update, so what it
    can capture is the round's sum; the name keeps it apart from per-client captures.
    """
    return Path(folder) / f"round-{server_round:04d}-sum.safetensors"


def load_captures(folder: str | Path) -> list[CapturedUpdate]:
    """Every capture in ``folder``, by round then client.

    Raises:
        AttackError: The folder is missing or holds no capture.

    """
    folder = Path(folder)
    if not folder.is_dir():
        raise AttackError(f"no capture folder at {folder}")
    found = []
    for path in sorted(folder.iterdir()):
        match = _NAME.fullmatch(path.name)
        if match:
            found.append(_load_one(path, int(match[1]), int(match[2])))
    if not found:
        raise AttackError(f"{folder} holds no captured update (round-RRRR-client-CCCC.safetensors)")
    return found


def _load_one(path: Path, server_round: int, client_id: int) -> CapturedUpdate:
    drawn = load_drawn_batches(path.parent, server_round, client_id)
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    tensors = load_file(str(path))
    try:
        observation = Observation(
            threat_model=metadata["threat_model"],  # type: ignore[arg-type]
            global_state={
                k.removeprefix("global/"): v for k, v in tensors.items() if k.startswith("global/")
            },
            update={k.removeprefix("update/"): v for k, v in tensors.items() if k.startswith("update/")},
            learning_rate=float(metadata["learning_rate"]),
            local_steps=int(metadata["local_steps"]),
            num_examples=int(metadata["num_examples"]),
        )
    except (KeyError, ValueError) as err:
        raise AttackError(f"{path}: not a capture fedpeft wrote ({err})") from None
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
        path = sum_capture_path(self.folder, server_round)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {f"global/{k}": v.contiguous() for k, v in global_state.items()}
        tensors |= {f"sum/{k}": v.contiguous() for k, v in total.items()}
        metadata = {
            "threat_model": self.threat_model,
            "learning_rate": repr(self.learning_rates[server_round]),
            "local_steps": str(self.local_steps),
            "clients": str(clients),
        }
        partial = path.with_suffix(".partial")
        save_file(tensors, str(partial), metadata=metadata)
        partial.replace(path)
        return path
