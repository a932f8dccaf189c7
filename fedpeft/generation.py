"""Answers from a causal LM with its adapter: greedy generation for chats, and their scores.

Used by the server's per-round evaluation of instruction tuning (a fixed slice of the
test split, scored by ``data.instruction.scorer``) and by ``fedpeft generate``. Prompts
are rendered exactly as in training (:func:`fedpeft.data.chat_tokens.render`), so the
model is asked the way it was taught.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from fedpeft.config import InstructionConfig
from fedpeft.data.chat_tokens import render, resolve_prompt_style
from fedpeft.data.instructions import Chat
from fedpeft.scoring import gives_final_answer, make_scorer


@dataclass(frozen=True)
class GenerationScore:
    """Mean score of generated responses, with a few of them to read."""

    scorer: str
    score: float
    examples: int
    samples: list[dict[str, str]]
    """The first few: ``prompt`` (the user turn), ``reference`` and ``generated``."""
    extra: dict[str, float] = field(default_factory=dict)
    """Companion scores: ``final_answer_rate`` beside ``exact_match`` on ``####`` answers."""

    def metrics(self) -> dict[str, float]:
        """What a round records: the score, its companions and the number of answers."""
        return {self.scorer: self.score, **self.extra, "examples": float(self.examples)}


def scorer_for(config: InstructionConfig) -> str | None:
    """The configured scorer; ``auto``: ``label`` for label words, else ``rouge_l``."""
    if config.scorer == "none":
        return None
    if config.scorer == "auto":
        return "label" if config.value_words else "rouge_l"
    return config.scorer


def label_words(config: InstructionConfig) -> list[str]:
    """The words a response can be (``value_words`` of the columns the response names)."""
    named = [column for column in config.value_words if "{" + column in config.response_template]
    return sorted({word for column in named for word in config.value_words[column].values()})


@torch.no_grad()
def generate(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    chats: Sequence[Chat],
    config: InstructionConfig,
    device: torch.device,
    max_new_tokens: int,
    batch_size: int = 16,
    progress: Callable[[int, int], None] | None = None,
) -> list[str]:
    """Greedy responses to ``chats`` (each ending with the user turn to answer).

    Rendered as the run trained (``config``); a run on plain text (``format = "none"``)
    continues the user turn's text as it is. Batches are padded on the left so that
    every prompt ends where generation starts.
    """
    if config.enabled:
        style = resolve_prompt_style(tokenizer, config)
        answer_slot = {"role": "assistant", "content": ""}
        prompts = [render([*chat, answer_slot], tokenizer, style)[0] for chat in chats]
    else:
        style = "plain"  # special tokens as the tokenizer adds them to any text
        prompts = [chat[-1]["content"] for chat in chats]
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    was_training = model.training
    model.eval()
    model.to(device)
    answers: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            batch = tokenizer(
                prompts[start : start + batch_size],
                return_tensors="pt",
                padding=True,
                add_special_tokens=style == "plain",
            ).to(device)
            output = model.generate(  # type: ignore[operator]
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            new_tokens = output[:, batch["input_ids"].shape[1] :]
            answers += [t.strip() for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
            if progress is not None:
                progress(len(answers), len(prompts))
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return answers


def score_generations(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    chats: Sequence[Chat],
    config: InstructionConfig,
    device: torch.device,
    samples: int = 3,
) -> GenerationScore | None:
    """Generate an answer to each chat's prompt and score it against its response.

    None when scoring is off (``scorer = "none"``) or there is nothing to score.
    """
    scorer = scorer_for(config)
    if scorer is None or not chats:
        return None
    prompts = [chat[:-1] for chat in chats]
    references = [chat[-1]["content"] for chat in chats]
    answers = generate(model, tokenizer, prompts, config, device, config.max_new_tokens)
    score = make_scorer(scorer, label_words(config))
    scores = [score(answer, reference) for answer, reference in zip(answers, references, strict=True)]
    extra = {}
    if scorer == "exact_match":
        given = [gives_final_answer(a, r) for a, r in zip(answers, references, strict=True)]
        marked = [g for g in given if g is not None]
        if marked:
            extra["final_answer_rate"] = sum(marked) / len(marked)
    shown = [
        {"prompt": chat[-2]["content"], "reference": reference, "generated": answer}
        for chat, reference, answer in list(zip(chats, references, answers, strict=True))[:samples]
    ]
    return GenerationScore(scorer, sum(scores) / len(scores), len(scores), shown, extra)
