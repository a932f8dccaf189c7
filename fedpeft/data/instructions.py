"""Rows of instruction data as chats: a list of turns whose last one is the response.

Every supported format (``data.instruction.format``) is reduced to the same shape, a
``messages`` column of ``{"role", "content"}`` turns ending with the assistant's, so that
rendering (chat template or plain), masking and truncation are written once
(:mod:`fedpeft.data.chat_tokens`). The ``text`` column holds the chat rendered plainly,
for what reads text without a tokenizer (an attack's token prior, a report).
"""

from __future__ import annotations

import string
from collections.abc import Mapping, Sequence
from typing import Any

from fedpeft.config import INSTRUCTION_FIELDS, InstructionConfig
from fedpeft.errors import DataError

MESSAGES = "messages"
ROLES = ("system", "user", "assistant")
OPTIONAL_ROLES = frozenset({"input", "context"})
"""Alpaca's input and Dolly's context: many rows have none."""

Chat = list[dict[str, str]]


def source_columns(config: InstructionConfig) -> tuple[list[str], list[str]]:
    """The columns a split must have, and those it may have (an optional role's)."""
    if config.format == "template":
        fields = _template_fields(config.prompt_template) | _template_fields(config.response_template)
        return sorted(fields), []
    roles = INSTRUCTION_FIELDS[config.format]
    named = {role: config.columns.get(role, role) for role in roles}
    required = [named[r] for r in roles if r not in OPTIONAL_ROLES]
    optional = [named[r] for r in roles if r in OPTIONAL_ROLES]
    return required, optional


def _template_fields(template: str) -> set[str]:
    try:
        return {field for _, field, _, _ in string.Formatter().parse(template) if field}
    except ValueError as err:
        raise DataError(f"data.instruction: cannot read the template {template!r}: {err}") from None


def to_chats(columns: Mapping[str, Sequence[Any]], config: InstructionConfig, key: str) -> list[Chat]:
    """One chat per row of ``columns`` (name -> values).

    ``key`` names the split in errors, which also give the row's index.
    """
    chats = []
    for index in range(len(next(iter(columns.values()), ()))):
        row = {name: values[index] for name, values in columns.items()}
        try:
            chat = _chat_of(row, config)
        except (KeyError, ValueError, TypeError) as err:
            raise DataError(f"{key}: row {index}: {err}") from None
        if config.system_prompt and chat[0]["role"] != "system":
            chat = [{"role": "system", "content": config.system_prompt}, *chat]
        chats.append(chat)
    return chats


def _chat_of(row: Mapping[str, Any], config: InstructionConfig) -> Chat:
    if config.format == "messages":
        return _checked_messages(row[config.columns.get("messages", "messages")])
    if config.format == "template":
        values = {name: _word(config, name, value) for name, value in row.items()}
        return [
            {"role": "user", "content": config.prompt_template.format(**values)},
            {"role": "assistant", "content": config.response_template.format(**values)},
        ]
    roles = INSTRUCTION_FIELDS[config.format]
    text = {role: _text(row.get(config.columns.get(role, role))) for role in roles}
    if config.format == "qa":
        return [
            {"role": "user", "content": text["question"]},
            {"role": "assistant", "content": text["answer"]},
        ]
    extra = text["input"] if config.format == "alpaca" else text["context"]
    response = text["output"] if config.format == "alpaca" else text["response"]
    prompt = text["instruction"] + (f"\n\n{extra}" if extra else "")
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


def _text(value: Any) -> str:
    return "" if value is None else str(value).strip()


def _word(config: InstructionConfig, column: str, value: Any) -> Any:
    words = config.value_words.get(column)
    if words is None:
        return value
    if str(value) not in words:
        raise ValueError(f"{column} = {value!r} has no entry in data.instruction.value_words.{column}")
    return words[str(value)]


def _checked_messages(value: Any) -> Chat:
    if not isinstance(value, Sequence) or isinstance(value, str) or not value:
        raise ValueError("messages must be a non-empty list of {role, content} turns")
    chat = []
    for turn in value:
        if not isinstance(turn, Mapping) or not isinstance(turn.get("content"), str):
            raise ValueError(f"a turn must be an object with a text 'content', got {turn!r}")
        if turn.get("role") not in ROLES:
            raise ValueError(f"a turn's role must be one of {', '.join(ROLES)}, got {turn.get('role')!r}")
        chat.append({"role": str(turn["role"]), "content": str(turn["content"])})
    if chat[-1]["role"] != "assistant" or not chat[-1]["content"].strip():
        raise ValueError("the last turn must be the assistant's response (non-empty): it is what is learned")
    if not any(turn["role"] == "user" for turn in chat):
        raise ValueError("a chat needs at least one user turn before the response")
    return chat


def plain_prompt(chat: Chat) -> str:
    """Every turn but the last in fedpeft's plain template, ending where the response starts.

    The template is public and fixed so that a model tuned with it can be prompted the
    same way: ``### System:``, ``### Instruction:`` and ``### Response:`` headers, each
    followed by its text and a blank line.
    """
    headers = {"system": "### System:", "user": "### Instruction:", "assistant": "### Response:"}
    parts = [f"{headers[turn['role']]}\n{turn['content']}\n\n" for turn in chat[:-1]]
    return "".join(parts) + "### Response:\n"


def plain_text(chat: Chat) -> str:
    """The whole chat in the plain template (prompt, then the response)."""
    return plain_prompt(chat) + chat[-1]["content"]
