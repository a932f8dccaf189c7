"""Everything a run builds from its config, built once per process and shared.

Clients and the server both need the data, the partitions, the model and the update
path; this class loads each lazily and caches it, so a simulated client process that
serves many rounds and many virtual clients loads the model once.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from functools import cached_property
from typing import ClassVar

import datasets
import torch
from torch.utils.data import DataLoader

from fedpeft.aggregation import AGGREGATORS, Aggregator, ClippedUpdates
from fedpeft.audit.plan import AuditPlan
from fedpeft.codecs import CODECS, UpdateCodec
from fedpeft.config import Config, TrainConfig, check_example_delta
from fedpeft.data import Partitions, TextData, load_text_data, partition_dataset
from fedpeft.data.chat_tokens import TokenizationReport, tokenize_chats
from fedpeft.errors import ConfigError
from fedpeft.models import AdapterState, LoadedModel, adapter_state, build_model
from fedpeft.privacy.dp_sgd import sample_rate_of, steps_per_round
from fedpeft.privacy.ledger import calibrate_noise
from fedpeft.slora import SloraStages, Stage
from fedpeft.training import make_collator, make_eval_loader, make_loader, resolve_device, tokenize


class Experiment:
    """Lazily built resources of one run configuration."""

    _cache: ClassVar[dict[str, Experiment]] = {}
    _cache_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, config: Config) -> None:
        self.config = config
        self._tokenized: dict[int, datasets.Dataset] = {}
        self._built_adapter: AdapterState = {}

    @classmethod
    def cached(cls, config: Config) -> Experiment:
        """The process-wide instance for ``config`` (keyed by its fingerprint)."""
        key = config.fingerprint()
        with cls._cache_lock:
            if key not in cls._cache:
                cls._cache[key] = cls(config)
            return cls._cache[key]

    @cached_property
    def data(self) -> TextData:
        """Train and test splits in the common shape."""
        keep = [self.config.partition.column] if self.config.partition.scheme != "iid" else []
        return load_text_data(self.config.data, keep_columns=[c for c in keep if c])

    @cached_property
    def audit_plan(self) -> AuditPlan | None:
        """The audit's planted examples and canaries (None unless ``[audit]`` plants any)."""
        if not self.config.audit.enabled:
            return None
        return AuditPlan.build(self.config.audit, self.data.train, self.config.seed, self.num_labels)

    def with_audit_plan(self, plan: AuditPlan) -> Experiment:
        """The same run with other examples planted: a LiRA shadow's federation.

        Shares what the plan does not change and is already loaded (the data, the model,
        the codec), so a shadow costs its training only; the partitions, their
        tokenization and the DP noise calibrated to their sizes follow ``plan``.
        """
        other = Experiment(self.config)
        _ = self.initial_state  # before the shared model trains as the shadow
        for name in ("data", "num_labels", "model", "initial_state", "device", "codec", "collator"):
            if name in self.__dict__:  # cached properties live in the instance's __dict__
                other.__dict__[name] = self.__dict__[name]
        other._built_adapter = self._built_adapter
        other.__dict__["audit_plan"] = plan
        return other

    @cached_property
    def partitions(self) -> Partitions:
        """The training split divided among clients (with the audit's insertions, if any)."""
        if self.audit_plan is not None:
            return self.audit_plan.partitions(self.config.partition, self.config.seed)
        return partition_dataset(self.data.train, self.config.partition, self.config.seed)

    @cached_property
    def num_labels(self) -> int | None:
        """Classes of the classification head (None for causal LMs)."""
        if self.config.model.task == "causal-lm":
            return None
        return self.data.num_labels

    @cached_property
    def model(self) -> LoadedModel:
        """The peft model and tokenizer; the adapter starts at :attr:`initial_state`."""
        loaded = build_model(
            self.config.model,
            self.config.adapter,
            num_labels=self.num_labels,
            seed=self.config.seed,
            device=self.device,
        )
        if self.config.train.gradient_checkpointing:
            # Non-reentrant: gradients reach the adapter through frozen layers without
            # asking the embeddings' output to require grad.
            loaded.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # Kept now: whoever trains or loads another adapter before first asking for the
        # initial state (the audit loads the final one, then trains shadows) must not get theirs.
        self._built_adapter = adapter_state(loaded.model)
        return loaded

    @cached_property
    def slora(self) -> SloraStages | None:
        """SLoRA's stage switch, or None when ``slora.rounds`` is 0."""
        if self.config.slora.rounds == 0:
            return None
        return SloraStages(self.config.slora, self.config.seed, self.model.model)

    def prepare_round(self, server_round: int) -> Stage | None:
        """Set the model up for ``server_round`` (SLoRA's stage; a no-op otherwise)."""
        return None if self.slora is None else self.slora.enter_round(server_round)

    @cached_property
    def initial_state(self) -> AdapterState:
        """The adapter as initialised under the run seed (the round-0 global adapter).

        The same whenever it is first read, also after the model was trained or loaded
        with another adapter (SLoRA aside: its first stage builds its tensors here).
        """
        model = self.model.model
        if self.slora is None:
            return dict(self._built_adapter)
        self.prepare_round(1)
        return adapter_state(model)

    def train_config_for(self, server_round: int) -> TrainConfig:
        """Local training settings of ``server_round`` (SLoRA's stage 1 may set its own lr)."""
        slora = self.config.slora
        in_stage_one = self.slora is not None and self.slora.stage_of(server_round) == "sparse"
        if in_stage_one and slora.lr is not None:
            return self.config.train.model_copy(update={"lr": slora.lr})
        return self.config.train

    @cached_property
    def device(self) -> torch.device:
        """Where training and evaluation run."""
        return resolve_device(self.config.train.device)

    @cached_property
    def codec(self) -> UpdateCodec:
        """The configured update codec."""
        federation = self.config.federation
        return CODECS.build(federation.codec, federation.codec_options, "federation.codec_options")

    def new_aggregator(self) -> Aggregator:
        """A fresh aggregator (it may hold server state, so it is not cached).

        With ``federation.max_update_norm`` it is wrapped to clip each update first.
        """
        federation = self.config.federation
        aggregator = AGGREGATORS.build(
            federation.aggregator, federation.aggregator_options, "federation.aggregator_options"
        )
        if federation.max_update_norm is not None:
            return ClippedUpdates(aggregator, federation.max_update_norm)
        return aggregator

    @cached_property
    def collator(self) -> Callable[[list[dict]], dict]:
        """Pads tokenized examples into a batch."""
        return make_collator(self.model.tokenizer, self.config.model.task)

    @cached_property
    def privacy_plan(self) -> dict[int, float]:
        """Each client's DP-SGD noise multiplier (empty without ``privacy.example``).

        Fixed, or calibrated so that the client's planned participation (every round,
        ``steps_per_round`` Poisson steps each) spends at most ``target_epsilon``.
        Computed for every client at start, so an impossible target, or a ``delta`` not
        below 1/n for a client's n examples, fails before any training, naming the client
        and the numbers.
        """
        privacy = self.config.privacy.example
        if not privacy.enabled:
            return {}
        try:
            check_example_delta(privacy.delta, self.partitions.sizes())
        except ValueError as err:
            raise ConfigError(str(err)) from None
        plan = {}
        for client_id, size in enumerate(self.partitions.sizes()):
            if privacy.noise_multiplier is not None:
                plan[client_id] = privacy.noise_multiplier
                continue
            assert privacy.target_epsilon is not None
            rate = sample_rate_of(self.config.train.batch_size, size)
            steps = self.config.federation.rounds * steps_per_round(self.config.train, size)
            try:
                plan[client_id] = calibrate_noise(
                    privacy.target_epsilon, privacy.delta, rate, steps, privacy.accountant
                )
            except ValueError as err:
                raise ConfigError(
                    f"privacy.example.target_epsilon: client {client_id} ({size} examples): {err}"
                ) from None
        return plan

    @cached_property
    def instruction_report(self) -> TokenizationReport | None:
        """How the training split's chats fit ``data.max_length`` (None for plain text)."""
        instruction = self.config.data.instruction
        if not instruction.enabled:
            return None
        tokenizer, max_length = self.model.tokenizer, self.config.data.max_length
        return tokenize_chats(self.data.train, tokenizer, max_length, instruction)[1]

    def tokenized_partition(self, client_id: int) -> datasets.Dataset:
        """The client's training examples, tokenized (cached)."""
        return self._tokenized_partition(client_id)

    def _tokenized_partition(self, client_id: int) -> datasets.Dataset:
        if client_id not in self._tokenized:
            self._tokenized[client_id] = tokenize(
                self.partitions[client_id],
                self.model.tokenizer,
                self.config.data.max_length,
                self.config.model.task,
                self.config.data.instruction,
            )
        return self._tokenized[client_id]

    def client_loader(self, client_id: int, server_round: int) -> DataLoader:
        """The client's shuffled training batches, reshuffled each round (seeded)."""
        if not 0 <= client_id < len(self.partitions):
            raise ValueError(f"client id {client_id} outside 0..{len(self.partitions) - 1}")
        seed = self.config.seed * 1_000_003 + server_round * 1_009 + client_id
        return make_loader(
            self._tokenized_partition(client_id),
            self.model.tokenizer,
            self.config.model.task,
            self.config.train.batch_size,
            shuffle=True,
            seed=seed,
            group_by_length=self.config.train.group_by_length,
        )

    @cached_property
    def test_loader(self) -> DataLoader:
        """Batches of the test split, by length (:func:`fedpeft.training.make_eval_loader`)."""
        # Evaluated example by example: never packed.
        instruction = self.config.data.instruction.model_copy(update={"packing": False})
        encoded = tokenize(
            self.data.test,
            self.model.tokenizer,
            self.config.data.max_length,
            self.config.model.task,
            instruction,
        )
        return make_eval_loader(
            encoded, self.model.tokenizer, self.config.model.task, self.config.train.eval_batch_size
        )
