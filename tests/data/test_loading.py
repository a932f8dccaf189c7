import json
from pathlib import Path

import datasets
import pytest

from fedpeft.config import DataConfig
from fedpeft.data import load_text_data
from fedpeft.data.loading import LABEL, TEXT
from fedpeft.errors import DataError


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_tsv_keeps_quotes_and_maps_labels(tmp_path: Path) -> None:
    train = write(tmp_path / "train.tsv", 'sentence\tlabel\nit \'s "great"\t1\nbad\t0\n')
    data = load_text_data(DataConfig(train=str(train), test=str(train)))
    assert data.train[TEXT] == ['it \'s "great"', "bad"]
    assert data.train[LABEL] == [1, 0]
    assert data.label_names == ["0", "1"]


def test_csv_with_custom_columns_and_string_labels(tmp_path: Path) -> None:
    train = write(tmp_path / "train.csv", 'body,topic\n"hello, world",Sports\nmarkets fell,Business\n')
    test = write(tmp_path / "test.csv", "body,topic\nscore,Sports\n")
    data = load_text_data(
        DataConfig(train=str(train), test=str(test), text_column="body", label_column="topic")
    )
    assert data.label_names == ["Business", "Sports"]
    assert data.train[TEXT][0] == "hello, world"
    assert data.train[LABEL] == [1, 0] and data.test[LABEL] == [1]


def test_jsonl(tmp_path: Path) -> None:
    rows = [{"text": "a", "y": 2}, {"text": "b", "y": 10}]
    train = write(tmp_path / "train.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n")
    data = load_text_data(DataConfig(train=str(train), test=str(train), text_column="text", label_column="y"))
    assert data.label_names == ["2", "10"]  # numeric labels sort numerically
    assert data.train[LABEL] == [0, 1]


def test_causal_lm_data_needs_no_label(tmp_path: Path) -> None:
    train = write(tmp_path / "train.jsonl", '{"text": "once upon a time"}\n')
    data = load_text_data(
        DataConfig(train=str(train), test=str(train), text_column="text", label_column=None)
    )
    assert data.label_names is None and data.train.column_names == [TEXT]


def test_hugging_face_dataset_from_disk(tmp_path: Path) -> None:
    splits = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"sentence": ["x", "y", "z"], "label": [0, 1, 0]}),
            "validation": datasets.Dataset.from_dict({"sentence": ["w"], "label": [1]}),
        }
    )
    splits.save_to_disk(str(tmp_path / "ds"))
    config = DataConfig(
        format="hf", train=str(tmp_path / "ds"), test=str(tmp_path / "ds"), test_split="validation"
    )
    data = load_text_data(config)
    assert len(data.train) == 3 and data.test[TEXT] == ["w"]
    with pytest.raises(DataError, match="split 'test'"):
        load_text_data(DataConfig(format="hf", train=str(tmp_path / "ds"), test=str(tmp_path / "ds")))


def test_hugging_face_dataset_from_local_files(tmp_path: Path) -> None:
    folder = tmp_path / "csvds"
    folder.mkdir()
    write(folder / "train.csv", "sentence,label\nfine,1\nbad,0\n")
    write(folder / "test.csv", "sentence,label\nok,1\n")
    data = load_text_data(DataConfig(format="hf", train=str(folder), test=str(folder)))
    assert sorted(data.train[TEXT]) == ["bad", "fine"] and data.test[TEXT] == ["ok"]


def test_shared_sst2_loads() -> None:
    from tests.conftest import SHARED_DATA

    folder = SHARED_DATA / "sst2"
    if not folder.is_dir():
        pytest.skip(f"shared data not present at {folder}")
    data = load_text_data(DataConfig(train=str(folder / "dev.tsv"), test=str(folder / "test.tsv")))
    assert len(data.test) == 872 and data.label_names == ["0", "1"]


def test_builtin_default_data() -> None:
    data = load_text_data(DataConfig())
    assert len(data.train) == 8000 and len(data.test) == 872


@pytest.mark.parametrize(
    ("config_kwargs", "message"),
    [
        ({"train": "nope.tsv"}, "data.train: file not found"),
        ({"text_column": "body"}, "column 'body' not found"),
        ({"label_column": "stars"}, "column 'stars' not found"),
        ({"train": "x.parquet"}, "cannot tell the format"),
    ],
)
def test_bad_input_names_the_problem(tmp_path: Path, config_kwargs: dict, message: str) -> None:
    write(tmp_path / "x.parquet", "")
    good = write(tmp_path / "good.tsv", "sentence\tlabel\nfine\t1\n")
    kwargs = {"train": str(good), "test": str(good), **config_kwargs}
    if kwargs["train"] in ("nope.tsv", "x.parquet"):
        kwargs["train"] = str(tmp_path / kwargs["train"])
    with pytest.raises(DataError, match=message):
        load_text_data(DataConfig(**kwargs))


def test_unseen_test_label_is_rejected(tmp_path: Path) -> None:
    train = write(tmp_path / "train.tsv", "sentence\tlabel\na\t0\n")
    test = write(tmp_path / "test.tsv", "sentence\tlabel\nb\t7\n")
    with pytest.raises(DataError, match="label '7'"):
        load_text_data(DataConfig(train=str(train), test=str(test)))


@pytest.mark.parametrize(
    ("name", "content", "where"),
    [
        ("short.tsv", "sentence\tlabel\nfine\t1\nno label here\nbad\t0\n", "short.tsv:3: no value for 'label'"),
        ("empty.tsv", "sentence\tlabel\nfine\t1\nbad\t\n", "empty.tsv:3: no value for 'label'"),
        ("rows.csv", "sentence,label\nfine,1\n,0\n", "rows.csv:3: no value for 'sentence'"),
        ("keys.jsonl", '{"sentence": "a", "label": 1}\n\n{"sentence": "b"}\n', "keys.jsonl:3: no value for 'label'"),
        ("null.jsonl", '{"sentence": "a", "label": 1}\n{"sentence": "b", "label": null}\n', "null.jsonl:2: no value"),
    ],
)
def test_a_row_without_a_field_names_the_file_and_line(tmp_path: Path, name: str, content: str, where: str) -> None:
    path = write(tmp_path / name, content)
    good = write(tmp_path / "good.tsv", "sentence\tlabel\nfine\t1\n")
    with pytest.raises(DataError, match=f"data.train: .*{where}"):
        load_text_data(DataConfig(train=str(path), test=str(good)))


def test_a_test_row_without_a_field_is_refused_too(tmp_path: Path) -> None:
    good = write(tmp_path / "good.tsv", "sentence\tlabel\nfine\t1\n")
    bad = write(tmp_path / "test.tsv", "sentence\tlabel\nfine\t1\nwhat\n")
    with pytest.raises(DataError, match=r"data.test: .*test.tsv:3: no value for 'label'"):
        load_text_data(DataConfig(train=str(good), test=str(bad)))


@pytest.mark.parametrize("suffix", [".tsv", ".jsonl"])
def test_bytes_that_are_not_utf8_name_the_line(tmp_path: Path, suffix: str) -> None:
    lines = (
        [b"sentence\tlabel", b"fine\t1", b"caf\xe9\t0"]
        if suffix == ".tsv"
        else [b'{"sentence": "fine", "label": 1}', b'{"sentence": "caf\xe9", "label": 0}']
    )
    path = tmp_path / f"latin1{suffix}"
    path.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(DataError, match=rf"latin1{suffix}:{len(lines)}: not UTF-8 \(byte 0xe9\)"):
        load_text_data(DataConfig(train=str(path), test=str(path)))


def test_a_hugging_face_row_without_a_label_names_the_row(tmp_path: Path) -> None:
    datasets.Dataset.from_dict({"sentence": ["a", "b", "c"], "label": [1, None, 0]}).save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(DataError, match=r"row 1: no value for 'label'"):
        load_text_data(DataConfig(format="hf", train=str(tmp_path / "ds"), test=str(tmp_path / "ds")))
