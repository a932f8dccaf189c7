"""What an adversary on the server side sees of one client's round.

An attack receives an :class:`Observation` and nothing else about the client: never
its data, its labels or its random draws. Ground truth enters only the metrics
(:mod:`fedpeft.attacks.metrics`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from torch import Tensor

ThreatModel = Literal["fedsgd", "fedavg", "malicious"]
"""Who the adversary is and what it may do.

* ``fedsgd``: honest-but-curious server; the client takes one local step of plain
  SGD, so its update is ``-lr`` times the adapter gradient of one batch.
* ``fedavg``: honest-but-curious server; the update is the adapter delta after
  several local steps (of any optimiser).
* ``malicious``: the server may also choose the global adapter (and the adapter
  config) it sends, e.g. a non-zero LoRA B so that the gradient of A carries the
  layer's inputs, or a higher rank on the first layer.
"""

THREAT_MODELS: tuple[ThreatModel, ...] = ("fedsgd", "fedavg", "malicious")


@dataclass(frozen=True)
class Observation:
    """One client update as the server holds it after decoding.

    Attributes:
        threat_model: See :data:`ThreatModel`.
        global_state: The adapter the server sent (name -> tensor, peft names).
        update: The decoded update the client sent: same names and shapes as
            ``global_state`` (new local adapter - global adapter).
        learning_rate: The local learning rate the server configured.
        local_steps: Local optimiser steps the client took (1 under ``fedsgd``).
        num_examples: The example count the client reported (its FedAvg weight).

    """

    threat_model: ThreatModel
    global_state: Mapping[str, Tensor]
    update: Mapping[str, Tensor]
    learning_rate: float
    local_steps: int = 1
    num_examples: int = 0

    def __post_init__(self) -> None:
        if self.threat_model not in THREAT_MODELS:
            raise ValueError(f"threat_model must be one of {THREAT_MODELS}, got {self.threat_model!r}")
        if self.update.keys() != self.global_state.keys():
            missing = sorted(self.global_state.keys() - self.update.keys())[:3]
            extra = sorted(self.update.keys() - self.global_state.keys())[:3]
            raise ValueError(f"update and global adapter differ: missing {missing}, unexpected {extra}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")

    def gradient_estimate(self) -> dict[str, Tensor]:
        """``-update / learning_rate``: the batch gradient under ``fedsgd``.

        Exact for one plain-SGD step up to the client's global-norm clipping, which
        rescales every tensor by one factor and so keeps every span an attack tests.
        After several steps it is the sum of the steps' gradients (plain SGD) or a
        per-coordinate rescaling of them (Adam), which breaks exact span tests.
        """
        return {name: -value.double() / self.learning_rate for name, value in self.update.items()}
