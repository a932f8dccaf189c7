"""Instruction data: formats to chats, rendering, response-only labels, truncation, packing.

Token ids are checked by hand on a word-level tokenizer whose vocabulary is listed here.
"""

import json
from pathlib import Path

import datasets
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from fedpeft.config import InstructionConfig, parse_config
from fedpeft.data.chat_tokens import IGNORE_INDEX, pack, render, tokenize_chats
from fedpeft.data.instructions import MESSAGES, plain_text, to_chats
from fedpeft.data.loading import load_text_data
from fedpeft.data.partition import partition_dataset
from fedpeft.errors import ConfigError, DataError
from fedpeft.training import make_collator

WORDS = [
    "[PAD]", "[EOS]", "[UNK]", "###", "System:", "Instruction:", "Response:",
    "<user>", "<assistant>", "<system>", "<end>",
    "what", "is", "two", "plus", "four", "five", "be", "brief", "add", "them",
]  # fmt: skip
ID = {word: index for index, word in enumerate(WORDS)}
CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} <end> {% endfor %}"
    "{% if add_generation_prompt %}<assistant> {% endif %}"
)


@pytest.fixture()
def word_tokenizer() -> PreTrainedTokenizerFast:
    """Splits on whitespace; every word of WORDS is one token, the rest [UNK]."""
    model = Tokenizer(models.WordLevel(vocab=ID, unk_token="[UNK]"))
    model.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=model, pad_token="[PAD]", eos_token="[EOS]", unk_token="[UNK]"
    )


def ids(text: str) -> list[int]:
    return [ID[word] for word in text.split()]


def chats(*pairs: tuple[str, str]) -> datasets.Dataset:
    rows = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in pairs]
    return datasets.Dataset.from_dict({MESSAGES: rows})


PLAIN = InstructionConfig(format="qa", prompt_style="plain")
CHAT = InstructionConfig(format="qa", prompt_style="chat")


# --- formats -> chats --------------------------------------------------------------------


def test_each_format_becomes_a_user_turn_and_the_response() -> None:
    alpaca = datasets.Dataset.from_list(
        [
            {"instruction": "add them", "input": "two plus two", "output": "four"},
            {"instruction": "what is two plus two", "input": None, "output": "four"},
        ]
    )
    assert to_chats(alpaca.to_dict(), InstructionConfig(format="alpaca"), "data.train") == [
        [{"role": "user", "content": "add them\n\ntwo plus two"}, {"role": "assistant", "content": "four"}],
        [{"role": "user", "content": "what is two plus two"}, {"role": "assistant", "content": "four"}],
    ]
    dolly = datasets.Dataset.from_list(
        [{"instruction": "add them", "context": "two plus two", "response": "four"}]
    )
    assert (
        to_chats(dolly.to_dict(), InstructionConfig(format="dolly"), "data.train")[0][0]["content"]
        == "add them\n\ntwo plus two"
    )
    renamed = datasets.Dataset.from_list([{"q": "what is two plus two", "a": "four"}])
    config = InstructionConfig(
        format="qa", columns={"question": "q", "answer": "a"}, system_prompt="be brief"
    )
    assert to_chats(renamed.to_dict(), config, "data.train") == [
        [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "what is two plus two"},
            {"role": "assistant", "content": "four"},
        ]
    ]


def test_a_classification_set_posed_as_questions_answers_label_words() -> None:
    rows = datasets.Dataset.from_list(
        [{"sentence": "a fine film", "label": 1}, {"sentence": "dull", "label": 0}]
    )
    config = InstructionConfig(
        format="template",
        prompt_template="Positive or negative?\n{sentence}",
        response_template="{label}",
        value_words={"label": {"0": "negative", "1": "positive"}},
    )
    result = to_chats(rows.to_dict(), config, "data.train")
    assert result[0] == [
        {"role": "user", "content": "Positive or negative?\na fine film"},
        {"role": "assistant", "content": "positive"},
    ]
    assert result[1][1]["content"] == "negative"
    unmapped = datasets.Dataset.from_list([{"sentence": "meh", "label": 2}])
    with pytest.raises(DataError, match=r"data.train: row 0: .*label = 2 has no entry"):
        to_chats(unmapped.to_dict(), config, "data.train")


@pytest.mark.parametrize(
    ("messages", "complaint"),
    [
        ([{"role": "user", "content": "hi"}], "last turn must be the assistant"),
        ([{"role": "assistant", "content": "hi"}], "at least one user turn"),
        ([{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}], "role must be one of"),
        ([{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}], "text 'content'"),
        ("just text", "non-empty list"),
    ],
)
def test_a_malformed_chat_is_refused_naming_its_row(messages, complaint) -> None:
    good = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    with pytest.raises(DataError, match=rf"data.test: row 1: .*{complaint}"):
        to_chats({"messages": [good, messages]}, InstructionConfig(format="messages"), "data.test")


# --- rendering and labels -----------------------------------------------------------------


def test_plain_template_masks_the_prompt_and_ends_the_response_with_eos(word_tokenizer) -> None:
    encoded, report = tokenize_chats(chats(("what is two plus two", "four")), word_tokenizer, 64, PLAIN)
    prompt = ids("### Instruction: what is two plus two ### Response:")
    assert encoded[0]["input_ids"] == [*prompt, ID["four"], ID["[EOS]"]]
    assert encoded[0]["labels"] == [IGNORE_INDEX] * len(prompt) + [ID["four"], ID["[EOS]"]]
    assert encoded[0]["attention_mask"] == [1] * (len(prompt) + 2)
    assert (report.examples, report.truncated, report.dropped, report.prompt_style) == (1, 0, 0, "plain")


def test_chat_template_labels_the_response_and_its_end_of_turn_token(word_tokenizer) -> None:
    word_tokenizer.chat_template = CHAT_TEMPLATE
    chat = [{"role": "user", "content": "what is two plus two"}, {"role": "assistant", "content": "four"}]
    assert render(chat, word_tokenizer, "chat") == (
        "<user> what is two plus two <end> <assistant> ",
        "four <end> ",
    )
    encoded, report = tokenize_chats(chats(("what is two plus two", "four")), word_tokenizer, 64, CHAT)
    prompt = ids("<user> what is two plus two <end> <assistant>")
    assert encoded[0]["input_ids"] == [*prompt, ID["four"], ID["<end>"]]
    assert encoded[0]["labels"] == [IGNORE_INDEX] * len(prompt) + [ID["four"], ID["<end>"]]
    assert report.prompt_style == "chat"
    # auto: the template when there is one, plain otherwise.
    assert (
        tokenize_chats(chats(("two", "four")), word_tokenizer, 64, InstructionConfig(format="qa"))[
            1
        ].prompt_style
        == "chat"
    )
    word_tokenizer.chat_template = None
    assert (
        tokenize_chats(chats(("two", "four")), word_tokenizer, 64, InstructionConfig(format="qa"))[
            1
        ].prompt_style
        == "plain"
    )
    with pytest.raises(DataError, match="has no chat template"):
        tokenize_chats(chats(("two", "four")), word_tokenizer, 64, CHAT)


def test_a_template_that_rewrites_earlier_turns_is_refused(word_tokenizer) -> None:
    # Renders the user turn differently once an assistant turn follows it.
    word_tokenizer.chat_template = (
        "{% for m in messages %}{% if messages[-1]['role'] == 'assistant' %}<system> {% endif %}"
        "<{{ m['role'] }}> {{ m['content'] }} {% endfor %}{% if add_generation_prompt %}<assistant> {% endif %}"
    )
    with pytest.raises(DataError, match="prompt_style = 'plain'"):
        tokenize_chats(chats(("two", "four")), word_tokenizer, 64, CHAT)


def test_truncation_cuts_the_response_end_or_drops_the_example_and_counts_both(word_tokenizer) -> None:
    data = chats(("two", "four five four five"), ("two plus two plus two plus two", "four"), ("what", "five"))
    prompt_of_two = len(ids("### Instruction: two ### Response:"))  # 5
    encoded, report = tokenize_chats(data, word_tokenizer, prompt_of_two + 2, PLAIN)
    assert (report.examples, report.truncated, report.dropped) == (3, 1, 1)
    assert len(encoded) == 2
    cut = encoded[0]
    assert cut["input_ids"][-2:] == [ID["four"], ID["five"]]  # the first two response tokens, no EOS
    assert cut["labels"][:prompt_of_two] == [IGNORE_INDEX] * prompt_of_two
    assert "2 responses" not in report.describe() and "raise data.max_length" in report.describe()
    with pytest.raises(DataError, match=r"no example fits data\.max_length = 3"):
        tokenize_chats(data, word_tokenizer, 3, PLAIN)


def test_packing_joins_whole_examples_up_to_max_length() -> None:
    columns = {
        "input_ids": [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10]],
        "attention_mask": [[1, 1, 1], [1, 1], [1, 1, 1, 1], [1]],
        "labels": [[-100, 2, 3], [-100, 5], [-100, -100, 8, 9], [10]],
    }
    packed = pack(columns, max_length=5)
    assert packed["input_ids"] == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]]
    assert packed["labels"] == [[-100, 2, 3, -100, 5], [-100, -100, 8, 9, 10]]
    assert all(len(row) <= 5 for row in packed["input_ids"])


def test_the_collator_pads_labels_with_ignore_and_keeps_the_prompt_masked(word_tokenizer) -> None:
    encoded, _ = tokenize_chats(
        chats(("two", "four"), ("what is two plus two", "four five")), word_tokenizer, 64, PLAIN
    )
    batch = make_collator(word_tokenizer, "causal-lm")(list(encoded))
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    short = len(encoded[0]["input_ids"])
    assert torch.equal(batch["labels"][0, :short], torch.tensor(encoded[0]["labels"]))
    assert (batch["labels"][0, short:] == IGNORE_INDEX).all() and (
        batch["attention_mask"][0, short:] == 0
    ).all()
    # Plain text (no labels of its own) still becomes every-token language modelling.
    text_batch = make_collator(word_tokenizer, "causal-lm")([{"input_ids": ids("two plus two")}])
    assert text_batch["labels"].tolist() == [ids("two plus two")]


# --- loading, partitioning, config --------------------------------------------------------


def test_loading_gives_chats_and_their_plain_text(tmp_path: Path) -> None:
    rows = [
        {"question": f"what is {n}", "answer": f"#### {n}", "topic": "math" if n % 2 else "words"}
        for n in range(12)
    ]
    path = tmp_path / "qa.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    config = parse_config(
        {
            "model": {"task": "causal-lm", "name_or_path": "x"},
            "data": {
                "train": str(path),
                "test": str(path),
                "max_test_examples": 3,
                "instruction": {"format": "qa"},
            },
            "partition": {
                "scheme": "dirichlet",
                "column": "topic",
                "num_clients": 2,
                "min_partition_size": 1,
            },
        }
    )
    data = load_text_data(config.data, keep_columns=["topic"])
    assert len(data.train) == 12 and len(data.test) == 3 and data.label_names is None
    assert data.train[0][MESSAGES][-1] == {"role": "assistant", "content": "#### 0"}
    assert data.train[0]["text"] == plain_text(data.train[0][MESSAGES])
    # Dirichlet over a category column rather than a label.
    parts = partition_dataset(data.train, config.partition, seed=0)
    assert sum(len(p) for p in parts) == 12
    missing = tmp_path / "bad.jsonl"
    missing.write_text(json.dumps({"question": "q"}) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match="column 'answer' not found"):
        load_text_data(config.data.model_copy(update={"train": str(missing)}))


@pytest.mark.parametrize(
    ("data", "extra", "complaint"),
    [
        ({"format": "qa"}, {"model": {"task": "sequence-classification"}}, "model.task = 'causal-lm'"),
        (
            {"format": "qa", "packing": True},
            {"privacy": {"example": {"enabled": True, "noise_multiplier": 1.0}}},
            "packing",
        ),
        ({"format": "template", "prompt_template": "{x}"}, {}, "needs prompt_template and response_template"),
        ({"format": "qa", "columns": {"output": "y"}}, {}, "not roles of format 'qa'"),
        ({"format": "qa", "prompt_template": "{x}"}, {}, "are for format 'template'"),
    ],
)
def test_instruction_configs_that_cannot_work_are_refused_by_key(data, extra, complaint) -> None:
    raw = {"model": {"task": "causal-lm"}, "data": {"instruction": data}, **extra}
    if "model" in extra:
        raw["model"] = extra["model"]
    with pytest.raises(ConfigError, match=complaint):
        parse_config(raw)
