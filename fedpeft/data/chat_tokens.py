"""Chats to token ids whose loss covers the response only, and what truncation cost.

A chat is rendered into a prompt (every turn but the last, ending where the assistant
starts) and a response. The prompt's tokens get label -100, so the loss, the DP-SGD
gradient and the evaluation's loss and accuracy are the response's alone, as in
instruction tuning everywhere (Alpaca, FlowerTune). The prompt and the response are
tokenized separately, as a prompt is at generation time.

Truncation never cuts the prompt (an instruction without its end asks something else):
a response that does not fit in ``data.max_length`` is cut at its end and counted, and
an example whose prompt alone fills ``max_length`` is dropped and counted. The counts
are printed at start and kept in ``metrics.json``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import datasets
from transformers import PreTrainedTokenizerBase

from fedpeft.config import InstructionConfig
from fedpeft.data.instructions import MESSAGES, Chat, plain_prompt
from fedpeft.errors import DataError

IGNORE_INDEX = -100
"""The label PyTorch's cross-entropy (and so every ``transformers`` model) skips."""


@dataclass(frozen=True)
class TokenizationReport:
    """How many examples fit ``max_length``, were cut, or were dropped."""

    examples: int
    truncated: int
    """Responses cut at their end to fit (the example still trains, on what is left)."""
    dropped: int
    """Examples whose prompt alone fills ``max_length``: no response token would be left."""
    max_length: int
    prompt_style: str
    """``chat`` (the tokenizer's template) or ``plain``."""

    def describe(self) -> str:
        """One line for the start of a run."""
        line = (
            f"instruction data ({self.prompt_style} template): {self.examples} examples, "
            f"{self.truncated} responses cut at max_length {self.max_length}, {self.dropped} dropped "
            "(prompt alone fills max_length)"
        )
        if self.truncated or self.dropped:
            line += "; raise data.max_length to keep them whole"
        return line

    def as_dict(self) -> dict[str, int | str]:
        """For ``metrics.json``."""
        return asdict(self)


def resolve_prompt_style(tokenizer: PreTrainedTokenizerBase, config: InstructionConfig) -> str:
    """``chat`` or ``plain``: what ``auto`` means for this tokenizer.

    Asking for ``chat`` of a tokenizer without a template is an error.
    """
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if config.prompt_style == "chat" and not has_template:
        raise DataError(
            "data.instruction.prompt_style = 'chat', but the tokenizer has no chat template; "
            "use 'plain' (or 'auto')"
        )
    if config.prompt_style == "plain" or not has_template:
        return "plain"
    return "chat"


def render(chat: Chat, tokenizer: PreTrainedTokenizerBase, style: str) -> tuple[str, str]:
    """The prompt text (up to where the response starts) and the response text.

    With a chat template, the response is what the whole chat adds after the prompt
    rendered with the generation prompt, so it carries the template's end-of-turn
    token, which is how the model learns to stop. With the plain template the EOS token
    is appended when tokenizing (:func:`tokenize_chats`).
    """
    if style == "plain":
        return plain_prompt(chat), chat[-1]["content"]
    prompt = tokenizer.apply_chat_template(chat[:-1], tokenize=False, add_generation_prompt=True)
    whole = tokenizer.apply_chat_template(chat, tokenize=False)
    assert isinstance(prompt, str) and isinstance(whole, str)
    if not whole.startswith(prompt):
        raise DataError(
            "data.instruction: the tokenizer's chat template renders the earlier turns "
            "differently once the response follows, so the response cannot be told apart; "
            "set data.instruction.prompt_style = 'plain'"
        )
    return prompt, whole[len(prompt) :]


def tokenize_chats(
    dataset: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    config: InstructionConfig,
) -> tuple[datasets.Dataset, TokenizationReport]:
    """``input_ids``, ``attention_mask`` and ``labels`` (-100 on the prompt) per example.

    Packed into rows of up to ``max_length`` tokens when ``config.packing`` is on.
    """
    style = resolve_prompt_style(tokenizer, config)
    rendered = [render(chat, tokenizer, style) for chat in dataset[MESSAGES]]
    plain = style == "plain"
    prompts = tokenizer([p for p, _ in rendered], add_special_tokens=plain)["input_ids"]
    responses = tokenizer([r for _, r in rendered], add_special_tokens=False)["input_ids"]
    if plain and tokenizer.eos_token_id is not None:
        responses = [[*ids, tokenizer.eos_token_id] for ids in responses]
    columns: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": [], "labels": []}
    truncated = dropped = 0
    for prompt, response in zip(prompts, responses, strict=True):
        room = max_length - len(prompt)
        if room <= 0 or not response:
            dropped += 1
            continue
        if len(response) > room:
            truncated += 1
            response = response[:room]
        ids = [*prompt, *response]
        columns["input_ids"].append(ids)
        columns["attention_mask"].append([1] * len(ids))
        columns["labels"].append([IGNORE_INDEX] * len(prompt) + list(response))
    report = TokenizationReport(len(rendered), truncated, dropped, max_length, style)
    if not columns["input_ids"]:
        raise DataError(f"data: no example fits data.max_length = {max_length}: {report.describe()}")
    if config.packing:
        columns = pack(columns, max_length)
    return datasets.Dataset.from_dict(columns), report


def pack(columns: dict[str, list[list[int]]], max_length: int) -> dict[str, list[list[int]]]:
    """Consecutive whole examples joined into rows of at most ``max_length`` tokens.

    An example is never split across rows (its prompt and response stay together, and
    its labels keep their -100s). Attention spans the examples of a row, the usual
    trade of packing without per-example attention masks: less padding, a little
    cross-example context.
    """
    packed: dict[str, list[list[int]]] = {name: [] for name in columns}
    current: dict[str, list[int]] = {name: [] for name in columns}
    for index in range(len(columns["input_ids"])):
        if current["input_ids"] and len(current["input_ids"]) + len(columns["input_ids"][index]) > max_length:
            _flush(current, packed)
        for name in columns:
            current[name].extend(columns[name][index])
    _flush(current, packed)
    return packed


def _flush(current: dict[str, list[int]], packed: dict[str, list[list[int]]]) -> None:
    if not current["input_ids"]:
        return
    for name, values in current.items():
        packed[name].append(list(values))
        values.clear()
