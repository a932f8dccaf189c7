"""Read train/test text from TSV, CSV, JSONL or Hugging Face datasets into one shape.

Whatever the source, the result is a pair of ``datasets.Dataset`` with a ``text``
column and, for classification, an integer ``label`` column (class names are kept in
:attr:`TextData.label_names`). Instruction data (``[data.instruction]``) has a
``messages`` column of chats instead of labels (:mod:`fedpeft.data.instructions`). Extra
columns survive only when asked for (a column to partition by).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import datasets

from fedpeft.config import DataConfig
from fedpeft.data.instructions import MESSAGES, plain_text, source_columns, to_chats
from fedpeft.errors import DataError

TEXT = "text"
LABEL = "label"

_SUFFIX_FORMATS = {".tsv": "tsv", ".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl"}


@dataclass(frozen=True)
class TextData:
    """Train and test splits in the common shape, plus the class names (None for LM)."""

    train: datasets.Dataset
    test: datasets.Dataset
    label_names: list[str] | None

    @property
    def num_labels(self) -> int | None:
        """Number of classes, or None when there are no labels."""
        return None if self.label_names is None else len(self.label_names)


def resolve_data_path(location: str) -> Path:
    """``builtin:<file>`` -> the file inside fedpeft's package data; other paths as given."""
    if location.startswith("builtin:"):
        return Path(str(resources.files("fedpeft.data") / "builtin" / location.removeprefix("builtin:")))
    return Path(location).expanduser()


def load_text_data(config: DataConfig, keep_columns: Sequence[str] = ()) -> TextData:
    """Load both splits, check the configured columns and encode labels as integers.

    Args:
        config: The data section.
        keep_columns: Extra source columns to keep (e.g. the partition column).

    """
    if config.instruction.enabled:
        return _load_instruction_data(config, keep_columns)
    wanted = [config.text_column, *([config.label_column] if config.label_column else [])]
    train_rows = _read_split(config, config.train, config.train_split, "data.train", [*wanted, *keep_columns])
    test_rows = _read_split(config, config.test, config.test_split, "data.test", wanted)
    if config.max_train_examples:
        train_rows = train_rows.select(range(min(config.max_train_examples, len(train_rows))))
    if config.max_test_examples:
        test_rows = test_rows.select(range(min(config.max_test_examples, len(test_rows))))

    label_names = None
    if config.label_column:
        label_names = sorted({str(v) for v in train_rows[config.label_column]}, key=_natural_key)
    train = _to_common_shape(train_rows, config, label_names, keep_columns, "data.train")
    test = _to_common_shape(test_rows, config, label_names, (), "data.test")
    return TextData(train=train, test=test, label_names=label_names)


def _load_instruction_data(config: DataConfig, keep_columns: Sequence[str]) -> TextData:
    """Both splits as chats (``messages``) plus their plain rendering (``text``)."""
    required, _ = source_columns(config.instruction)
    splits = []
    for location, split, key, keep in (
        (config.train, config.train_split, "data.train", keep_columns),
        (config.test, config.test_split, "data.test", ()),
    ):
        rows = _read_split(config, location, split, key, [*required, *keep])
        cap = config.max_train_examples if key == "data.train" else config.max_test_examples
        if cap:
            rows = rows.select(range(min(cap, len(rows))))
        chats = to_chats(rows.to_dict(), config.instruction, key)
        columns: dict[str, list[Any]] = {TEXT: [plain_text(c) for c in chats], MESSAGES: chats}
        for column in keep:
            columns[column] = list(rows[column])
        splits.append(datasets.Dataset.from_dict(columns))
    return TextData(train=splits[0], test=splits[1], label_names=None)


def _natural_key(value: str) -> tuple[int, Any]:
    """Sort numeric labels numerically ("2" < "10") and others alphabetically."""
    try:
        return (0, float(value))
    except ValueError:
        return (1, value)


def _read_split(
    config: DataConfig, location: str, split: str, key: str, wanted: Sequence[str]
) -> datasets.Dataset:
    """Read one split and check that every row has every ``wanted`` field.

    A row without one (a short TSV line, a JSON object without the key, a null or empty
    value) is an error naming the file and line: read silently, a missing label would
    become a class of its own.
    """
    if config.format == "hf":
        rows = _read_hf(location, split, key)
        _check_columns(rows, wanted, key)
        for column in wanted:
            for index, value in enumerate(rows[column]):
                if _missing(value):
                    raise DataError(f"{key}: {location} split {split!r} row {index}: no value for {column!r}")
        return rows
    path = resolve_data_path(location)
    if not path.is_file():
        where = "" if path.is_absolute() else f" (relative to the working folder {Path.cwd()})"
        raise DataError(f"{key}: file not found: {path}{where}; give the file with --set {key}=PATH")
    fmt: str = config.format
    if fmt == "auto":
        fmt = _SUFFIX_FORMATS.get(path.suffix.lower(), "")
        if not fmt:
            raise DataError(
                f"{key}: cannot tell the format of {path.name} from its suffix; "
                "set data.format to tsv, csv, jsonl or hf"
            )
    if fmt == "jsonl":
        numbered = _read_jsonl(path, key)
    else:
        numbered = _read_delimited(path, "\t" if fmt == "tsv" else ",", key)
    if not numbered:
        raise DataError(f"{key}: {path} holds no rows")
    columns = sorted({name for _, record in numbered for name in record})
    for column in wanted:
        if column not in columns:
            raise DataError(f"{key}: column {column!r} not found (columns: {', '.join(columns)})")
    for line_no, record in numbered:
        for column in wanted:
            if _missing(record.get(column)):
                raise DataError(f"{key}: {path}:{line_no}: no value for {column!r}")
    # Every row gets every column (None where it has none, e.g. Alpaca's optional input):
    # from_list would otherwise take the columns of the first row only.
    return datasets.Dataset.from_list([{c: record.get(c) for c in columns} for _, record in numbered])


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _read_text(path: Path, key: str, newline: str | None) -> io.StringIO:
    """The file as text (``newline`` as :func:`open` takes it).

    Bytes that are not UTF-8 are an error naming the line, not a traceback.
    """
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line_no = raw.count(b"\n", 0, err.start) + 1
        raise DataError(
            f"{key}: {path}:{line_no}: not UTF-8 (byte 0x{raw[err.start]:02x}); re-encode the file as UTF-8"
        ) from None
    return io.StringIO(text, newline=newline)


def _read_delimited(path: Path, delimiter: str, key: str) -> list[tuple[int, dict[str, Any]]]:
    """``(line number, row)`` pairs; a short row's missing fields are None."""
    # GLUE-style TSVs contain bare quotes inside sentences: read them without quoting.
    quoting: Literal[0, 3] = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    reader = csv.DictReader(_read_text(path, key, ""), delimiter=delimiter, quoting=quoting)
    rows = []
    try:
        for row in reader:
            line_no = reader.line_num  # a quoted field may span lines: the row's last line
            if None in row:
                raise DataError(f"{key}: {path}:{line_no}: more fields than header columns")
            rows.append((line_no, {k.strip(): (v.strip() if v is not None else v) for k, v in row.items()}))
    except csv.Error as err:
        raise DataError(f"{key}: {path}:{reader.line_num}: {err}") from None
    return rows


def _read_jsonl(path: Path, key: str) -> list[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` pairs, blank lines skipped."""
    rows = []
    for line_no, line in enumerate(_read_text(path, key, None), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{key}: {path}:{line_no}: not valid JSON: {err.msg}") from None
        if not isinstance(record, dict):
            raise DataError(f"{key}: {path}:{line_no}: expected a JSON object per line")
        rows.append((line_no, record))
    return rows


def _read_hf(location: str, split: str, key: str) -> datasets.Dataset:
    """A dataset saved with ``save_to_disk``, a local dataset folder, or a hub name."""
    path = Path(location).expanduser()
    try:
        if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists()):
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise DataError(f"{key}: split {split!r} not in {path} ({', '.join(loaded)})")
                return loaded[split]
            return loaded
        result = datasets.load_dataset(location, split=split)
    except DataError:
        raise
    except (FileNotFoundError, ValueError, ConnectionError, OSError) as err:
        raise DataError(
            f"{key}: cannot load Hugging Face dataset {location!r} split {split!r}: {err}"
        ) from None
    assert isinstance(result, datasets.Dataset)
    return result


def _check_columns(rows: datasets.Dataset, wanted: Sequence[str], key: str) -> None:
    for column in wanted:
        if column not in rows.column_names:
            have = ", ".join(rows.column_names)
            raise DataError(f"{key}: column {column!r} not found (columns: {have})")


def _to_common_shape(
    rows: datasets.Dataset,
    config: DataConfig,
    label_names: list[str] | None,
    keep_columns: Sequence[str],
    key: str,
) -> datasets.Dataset:
    columns: dict[str, list[Any]] = {TEXT: [str(t) for t in rows[config.text_column]]}
    if config.label_column and label_names is not None:
        index = {name: i for i, name in enumerate(label_names)}
        labels = []
        for value in rows[config.label_column]:
            if str(value) not in index:
                raise DataError(f"{key}: label {value!r} does not occur in the training split")
            labels.append(index[str(value)])
        columns[LABEL] = labels
    for column in keep_columns:
        columns[column] = list(rows[column])
    return datasets.Dataset.from_dict(columns)
