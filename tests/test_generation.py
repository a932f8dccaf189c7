"""Greedy generation for chats on a tiny Llama: left padding, rendering, scoring."""

from pathlib import Path

import torch

from fedpeft.config import AdapterConfig, InstructionConfig, ModelConfig
from fedpeft.generation import generate, label_words, score_generations, scorer_for
from fedpeft.models import build_model


def tiny(tiny_llama_dir: Path):
    loaded = build_model(
        ModelConfig(name_or_path=str(tiny_llama_dir), task="causal-lm"),
        AdapterConfig(method="lora", r=4, target_modules=["q_proj", "v_proj"]),
        num_labels=None,
    )
    return loaded.model, loaded.tokenizer


def ask(*questions: str) -> list[list[dict[str, str]]]:
    return [[{"role": "user", "content": q}] for q in questions]


def test_an_answer_does_not_depend_on_the_prompts_batched_with_it(tiny_llama_dir: Path) -> None:
    model, tokenizer = tiny(tiny_llama_dir)
    config = InstructionConfig(format="qa")
    short, long = "what comes after 3?", "what comes after the number that follows two and precedes four?"
    alone = generate(model, tokenizer, ask(short), config, torch.device("cpu"), max_new_tokens=6)
    batched = generate(model, tokenizer, ask(long, short), config, torch.device("cpu"), max_new_tokens=6)
    # Left padding: the short prompt's answer is the same whether or not it was padded.
    assert batched[1] == alone[0] and alone[0]
    assert tokenizer.padding_side == "right"  # restored for training


def test_scores_come_with_readable_samples(tiny_llama_dir: Path) -> None:
    model, tokenizer = tiny(tiny_llama_dir)
    chats = [[*chat, {"role": "assistant", "content": "four"}] for chat in ask("a", "b", "c", "d")]
    config = InstructionConfig(format="qa", scorer="exact_match", max_new_tokens=4)
    result = score_generations(model, tokenizer, chats, config, torch.device("cpu"), samples=2)
    assert result is not None and result.scorer == "exact_match" and result.examples == 4
    assert 0.0 <= result.score <= 1.0
    assert [s["prompt"] for s in result.samples] == ["a", "b"]
    assert all(s["reference"] == "four" for s in result.samples)
    assert result.metrics() == {"exact_match": result.score, "examples": 4.0}
    # GSM8K-style references: the share of answers that give a final answer comes along.
    marked = [[*chat[:-1], {"role": "assistant", "content": "2 + 2\n#### 4"}] for chat in chats]
    gsm = score_generations(model, tokenizer, marked, config, torch.device("cpu"))
    assert gsm is not None and set(gsm.metrics()) == {"exact_match", "final_answer_rate", "examples"}
    assert gsm.metrics()["final_answer_rate"] in (0.0, 0.25, 0.5, 0.75, 1.0)
    assert (
        score_generations(
            model, tokenizer, chats, config.model_copy(update={"scorer": "none"}), torch.device("cpu")
        )
        is None
    )


def test_auto_scores_label_words_by_label_and_free_text_by_rouge() -> None:
    words = InstructionConfig(
        format="template", prompt_template="{x}", response_template="{y}", value_words={"y": {"0": "no"}}
    )
    assert scorer_for(words) == "label"
    assert label_words(words) == ["no"]
    assert scorer_for(InstructionConfig(format="alpaca")) == "rouge_l"
