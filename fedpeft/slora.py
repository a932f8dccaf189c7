"""SLoRA: a sparse first stage on the base weights, then LoRA initialised from its SVD.

Paper: SLoRA: Federated Parameter Efficient Fine-Tuning of Language Models
(Babakniya et al., 2023). Under strong data heterogeneity, LoRA started from the usual
init (B = 0, A random) converges slowly in federation. SLoRA spends its first rounds
federating a *sparse* update of the base weights under one fixed random mask shared by
every client (density about 1 %), which is cheap to send and trains in the full weight
space. It then factorises the aggregated sparse update ``dW`` per layer with an SVD and
starts LoRA from its top-r factors, so stage 2 (plain LoRA FedAvg) begins where stage 1
got to, in a direction every client agreed on.

How fedpeft realises the two stages:

* Stage 1 trains, in every layer that LoRA adapts, a vector of ``density x numel``
  values placed at a fixed seeded set of weight positions (a torch parametrization:
  ``W = W0 + scatter(values)``). The LoRA factors are frozen; the rest of the adapter's
  trainable tensors (e.g. a classification head) train as usual. Only the values and
  those tensors are in the adapter state, so the mask itself never travels and any
  codec/aggregator applies to the values like to any other delta.
* At the switch the server computes ``dW = scatter(values)`` per layer and sets
  ``B = U_r S_r^1/2 / sqrt(s)``, ``A = S_r^1/2 V_r^T / sqrt(s)`` (``s`` is LoRA's
  ``alpha / r`` scaling), so ``s B A`` is the best rank-r approximation of ``dW``.
  The sparse values are dropped: every client keeps the untouched base ``W0`` and
  stage 2 starts from ``W0 + s B A``. Interpretation: the paper initialises LoRA from
  the stage-1 update; fedpeft does not also fold the residual ``dW - s B A`` into the
  base, because the base never travels and the final checkpoint must be a plain peft
  LoRA adapter on the original model.

Both sides know the stage from the round number alone (``slora.rounds`` is in the
config), so no message carries it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping
from typing import Literal, cast

import torch
from peft.tuners.lora import LoraLayer
from torch import Tensor, nn
from torch.nn.utils import parametrize

from fedpeft.aggregation._lora import refactor_rank_r
from fedpeft.config import SloraConfig
from fedpeft.errors import ConfigError
from fedpeft.models import AdapterState

Stage = Literal["sparse", "lora"]

_VALUES_SUFFIX = ".base_layer.parametrizations.weight.0.values"
"""How a stage-1 value vector is named in the model (torch parametrization naming)."""


class SparseWeightDelta(nn.Module):
    """A parametrization ``W -> W + scatter(values at fixed positions)``.

    The positions are a buffer (regenerated from the seed, never trained or sent) and
    ``values`` starts at zero, so attaching it leaves the model's function unchanged.
    """

    positions: Tensor

    def __init__(self, positions: Tensor) -> None:
        super().__init__()
        self.register_buffer("positions", positions, persistent=False)
        self.values = nn.Parameter(torch.zeros(positions.numel()))

    def forward(self, weight: Tensor) -> Tensor:
        """The base weight plus the sparse update."""
        flat = weight.reshape(-1).index_add(0, self.positions, self.values.to(weight.dtype))
        return flat.view_as(weight)


def mask_positions(seed: int, layer_name: str, numel: int, density: float) -> Tensor:
    """The fixed, shared random positions of one layer's stage-1 update (sorted, int64).

    Seeded by (run seed, layer name) only: every client and every round uses the same
    mask, as SLoRA prescribes, and the server regenerates it without being told.
    """
    digest = hashlib.sha256(f"{seed}/slora/{layer_name}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    keep = max(1, round(density * numel))
    return torch.randperm(numel, generator=generator)[:keep].sort().values


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    """Every LoRA-adapted layer of a peft model, by module name."""
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and isinstance(getattr(module, "base_layer", None), nn.Module):
            yield name, module


def _base_layer(layer: LoraLayer) -> nn.Module:
    return cast(nn.Module, layer.get_base_layer())


def sparse_delta(values: Tensor, positions: Tensor, shape: torch.Size) -> Tensor:
    """The dense update ``scatter(values)`` of one layer's stage-1 vector."""
    flat = torch.zeros(shape.numel(), dtype=torch.float64)
    flat[positions] = values.double()
    return flat.view(shape)


class SloraStages:
    """Switches a peft LoRA model between SLoRA's stages and converts state across.

    Args:
        config: The ``[slora]`` section (``rounds`` stage-1 rounds, mask ``density``).
        run_seed: Seeds the shared masks.
        model: The peft model with its LoRA adapter attached (stage-less at first).

    """

    def __init__(self, config: SloraConfig, run_seed: int, model: nn.Module) -> None:
        if config.rounds < 1:
            raise ValueError("SloraStages needs slora.rounds >= 1")
        self.config = config
        self.run_seed = run_seed
        self.model = model
        self.layers = dict(lora_layers(model))
        if not self.layers:
            raise ConfigError("slora: the adapter has no LoRA layer (set adapter.method = 'lora')")
        # The tensors the adapter trains in stage 2, as the adapter config left them.
        self.lora_trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        self.stage: Stage = "lora"

    def stage_of(self, server_round: int) -> Stage:
        """Stage 1 (``sparse``) for rounds 1..slora.rounds, then ``lora``."""
        return "sparse" if server_round <= self.config.rounds else "lora"

    def enter(self, stage: Stage) -> None:
        """Put the model in ``stage`` (idempotent).

        Attaches or detaches the sparse parametrizations and sets which tensors train.
        """
        if stage == self.stage:
            return
        if stage == "sparse":
            for name, layer in self.layers.items():
                base = _base_layer(layer)
                weight = cast(Tensor, base.weight)
                positions = mask_positions(self.run_seed, name, weight.numel(), self.config.density)
                parametrize.register_parametrization(
                    base, "weight", SparseWeightDelta(positions.to(weight.device))
                )
        else:
            for layer in self.layers.values():
                parametrize.remove_parametrizations(_base_layer(layer), "weight", leave_parametrized=False)
        for name, param in self.model.named_parameters():
            if stage == "sparse":
                trainable = name.endswith(_VALUES_SUFFIX) or (
                    name in self.lora_trainable and ".lora_" not in name
                )
            else:
                trainable = name in self.lora_trainable
            param.requires_grad_(trainable)
        self.stage = stage

    def enter_round(self, server_round: int) -> Stage:
        """Enter the stage of ``server_round`` and return it."""
        stage = self.stage_of(server_round)
        self.enter(stage)
        return stage

    def lora_init(self, sparse_state: Mapping[str, Tensor]) -> tuple[AdapterState, dict[str, float]]:
        """The stage-2 starting state from the aggregated stage-1 state.

        Every LoRA pair is set from the truncated SVD of its layer's sparse update; every
        other trainable tensor (a head) carries over. Leaves the model in stage 2.

        Returns:
            The state and diagnostics: the Frobenius norm of all sparse updates and of
            what the rank-r truncation drops.

        """
        updates: dict[str, Tensor] = {}
        for name, layer in self.layers.items():
            key = f"{name}{_VALUES_SUFFIX}"
            if key not in sparse_state:
                raise ValueError(f"stage-1 state lacks {key}")
            weight = cast(Tensor, _base_layer(layer).weight)
            positions = mask_positions(self.run_seed, name, weight.numel(), self.config.density)
            updates[name] = sparse_delta(sparse_state[key], positions, weight.shape)
        self.enter("lora")
        state = {
            n: p.detach().to("cpu", copy=True) for n, p in self.model.named_parameters() if p.requires_grad
        }
        total_squared = dropped_squared = 0.0
        for name, layer in self.layers.items():
            adapter = layer.active_adapters[0]
            update = updates[name].T if getattr(layer, "fan_in_fan_out", False) else updates[name]
            scaling = float(layer.scaling[adapter])
            rank = layer.r[adapter]
            target = update / scaling
            a_name = f"{name}.lora_A.{adapter}.weight"
            b_name = f"{name}.lora_B.{adapter}.weight"
            if a_name in state:
                b, a, _ = refactor_rank_r(target, rank)
                state[a_name] = a.to(state[a_name].dtype)
            else:  # FFA-LoRA: A stays at its shared init, so fit B to it (least squares).
                a = cast(Tensor, cast(nn.ModuleDict, layer.lora_A)[adapter].weight).detach().double().cpu()
                b = target @ torch.linalg.pinv(a)
            state[b_name] = b.to(state[b_name].dtype)
            dropped_squared += float((target - b @ a).pow(2).sum()) * scaling**2
            total_squared += float(update.pow(2).sum())
        for name, value in sparse_state.items():
            if name in state and ".lora_" not in name:
                state[name] = value.clone()
        diagnostics = {
            "slora_update_norm": total_squared**0.5,
            "slora_svd_dropped_norm": dropped_squared**0.5,
        }
        return state, diagnostics
